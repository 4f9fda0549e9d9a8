use std::path::{Path, PathBuf};

use super::*;
use crate::amqp::log::Signed;
use crate::cluster::ArchiveLookup;

/// A folder with a key pair, two archives and a cluster file naming them.
struct Fixture {
    dir: tempfile::TempDir,
    signer: SigningKey,
    trusted: TrustedKey,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (secret, public) = (dir.path().join("k.key"), dir.path().join("k.pub"));
        keygen(&secret, &public, false).expect("keygen");
        std::fs::write(dir.path().join("web-1.tar.gz"), b"web archive bytes").expect("write");
        std::fs::write(dir.path().join("api-2.tar.gz"), vec![7u8; 10_000]).expect("write");
        Fixture {
            signer: SigningKey::load(&secret).expect("secret"),
            trusted: TrustedKey::load(&public).expect("public"),
            dir,
        }
    }

    fn text(revision: u64) -> String {
        format!(
            "revision = {revision}\n\
             [[host]]\nid = \"h1\"\naddr = \"127.0.0.1:7070\"\ngroup = \"web\"\n\
             [[host]]\nid = \"h2\"\naddr = \"127.0.0.1:7071\"\ngroup = \"api\"\n\
             [group.web]\nrelease = \"web\"\nversion = \"1\"\narchive = \"web-1.tar.gz\"\n\
             [group.api]\nrelease = \"api\"\nversion = \"2\"\narchive = \"api-2.tar.gz\"\n"
        )
    }

    fn plan(&self, text: &str) -> Plan {
        Plan::parse(
            text,
            "cluster.toml",
            &ArchiveLookup::Beside(self.dir.path().to_path_buf()),
        )
        .expect("valid")
    }

    /// Bundles revision `revision`, expiring at `expires`, signed by `key`.
    fn bundle_with(&self, key: &SigningKey, expires: Option<OffsetDateTime>) -> PathBuf {
        let text = Fixture::text(3);
        let output = self.dir.path().join("out/b.erel");
        std::fs::create_dir_all(output.parent().expect("parent")).expect("mkdir");
        create(&CreateOptions {
            cluster_text: &text,
            plan: &self.plan(&text),
            key,
            created: OffsetDateTime::now_utc(),
            expires,
            output: &output,
        })
        .expect("create");
        output
    }

    fn bundle(&self) -> PathBuf {
        self.bundle_with(&self.signer, None)
    }

    fn verify(&self, path: &Path) -> Result<Verified> {
        verify(path, &self.trusted, OffsetDateTime::now_utc())
    }

    fn refusal(&self, path: &Path) -> String {
        self.verify(path).expect_err("refused").to_string()
    }
}

/// The members of a bundle, in order.
fn members(path: &Path) -> Vec<(String, Vec<u8>)> {
    let mut tar = tar::Archive::new(std::fs::File::open(path).expect("open"));
    tar.entries()
        .expect("entries")
        .map(|entry| {
            let mut entry = entry.expect("entry");
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).expect("read");
            (entry_name(&entry), bytes)
        })
        .collect()
}

/// Writes `members` as a bundle at `path`.
fn write_members(path: &Path, members: &[(String, Vec<u8>)]) {
    let mut tar = tar::Builder::new(Vec::new());
    for (name, bytes) in members {
        tar.append_data(&mut header(bytes.len() as u64, 0), name, bytes.as_slice())
            .expect("append");
    }
    std::fs::write(path, tar.into_inner().expect("finish")).expect("write");
}

/// Rewrites the bundle at `path` with `change` applied to its members.
fn rewrite(path: &Path, change: impl FnOnce(&mut Vec<(String, Vec<u8>)>)) {
    let mut all = members(path);
    change(&mut all);
    write_members(path, &all);
}

#[test]
fn a_bundle_holds_its_manifest_signature_cluster_and_archives_and_verifies() {
    let fx = Fixture::new();
    let path = fx.bundle();
    let names: Vec<String> = members(&path).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            MANIFEST,
            SIGNATURE,
            CLUSTER,
            "archives/api-2.tar.gz",
            "archives/web-1.tar.gz"
        ]
    );
    let verified = fx.verify(&path).expect("verifies");
    assert_eq!(verified.manifest.revision, 3);
    assert_eq!(verified.cluster_text, Fixture::text(3));
    assert_eq!(verified.manifest.archives[0].size, 10_000);
    assert_eq!(verified.manifest.expires_at, None);
    assert_eq!(
        Manifest::parse(&verified.manifest_text).expect("parses"),
        verified.manifest
    );
    let comment = minisign::SignatureBox::from_string(&verified.signature)
        .expect("minisig")
        .trusted_comment()
        .expect("comment");
    assert!(comment.contains("revision 3"), "{comment}");
    assert_eq!(
        keys::comment_digest(&comment),
        Some(sha256_hex(verified.manifest_text.as_bytes()).as_str())
    );
    // No temporary file is left beside it.
    let left: Vec<_> = std::fs::read_dir(path.parent().expect("dir"))
        .expect("list")
        .collect();
    assert_eq!(left.len(), 1);
}

#[test]
fn a_changed_archive_byte_is_tampering() {
    let fx = Fixture::new();
    let path = fx.bundle();
    rewrite(&path, |all| all[4].1[0] ^= 1);
    let refused = fx.refusal(&path);
    assert!(
        refused.starts_with(&format!(
            "{}: tampered: archives/web-1.tar.gz",
            path.display()
        )),
        "{refused}"
    );
}

#[test]
fn a_changed_manifest_is_tampering() {
    let fx = Fixture::new();
    let path = fx.bundle();
    rewrite(&path, |all| {
        let text = String::from_utf8(all[0].1.clone()).expect("utf-8");
        all[0].1 = text
            .replace("\"revision\": 3", "\"revision\": 9")
            .into_bytes();
    });
    let refused = fx.refusal(&path);
    assert!(
        refused.contains(": tampered: the manifest was changed"),
        "{refused}"
    );
}

#[test]
fn missing_extra_and_misplaced_members_are_tampering() {
    let fx = Fixture::new();
    let path = fx.bundle();
    let original = members(&path);
    rewrite(&path, |all| {
        all.pop();
    });
    assert!(fx
        .refusal(&path)
        .contains("tampered: archives/web-1.tar.gz, which the manifest names, is missing"));
    rewrite(&path, |all| {
        all.push(("archives/evil.tar.gz".into(), b"x".to_vec()))
    });
    assert!(fx
        .refusal(&path)
        .contains("tampered: it holds archives/evil.tar.gz"));
    let mut swapped = original.clone();
    swapped.swap(0, 1);
    write_members(&path, &swapped);
    assert!(fx
        .refusal(&path)
        .contains("tampered: manifest.json.minisig where manifest.json must be"));
    let mut twice = original;
    twice.push(twice[3].clone());
    write_members(&path, &twice);
    assert!(fx
        .refusal(&path)
        .contains("tampered: archives/api-2.tar.gz is not one regular file"));
}

#[test]
fn an_expired_bundle_is_refused_and_one_not_yet_expired_is_not() {
    let fx = Fixture::new();
    let past = OffsetDateTime::now_utc() - time::Duration::hours(1);
    let path = fx.bundle_with(&fx.signer, Some(past));
    let refused = fx.refusal(&path);
    assert!(
        refused.contains(": expired: the bundle of revision 3 expired at"),
        "{refused}"
    );
    let future = OffsetDateTime::now_utc() + time::Duration::hours(1);
    let path = fx.bundle_with(&fx.signer, Some(future));
    let verified = fx.verify(&path).expect("not expired");
    assert_eq!(verified.manifest.expires_at, Some(format_time(future)));
}

#[test]
fn a_bundle_signed_by_another_key_is_refused() {
    let fx = Fixture::new();
    let (secret, public) = (fx.dir.path().join("o.key"), fx.dir.path().join("o.pub"));
    keygen(&secret, &public, false).expect("keygen");
    let other = SigningKey::load(&secret).expect("secret");
    let path = fx.bundle_with(&other, None);
    let refused = fx.refusal(&path);
    assert!(
        refused.contains(&format!(": signed by another key: key id {}", other.id())),
        "{refused}"
    );
}

#[test]
fn manifests_with_unsafe_names_or_another_format_are_refused() {
    let fx = Fixture::new();
    let good = fx.verify(&fx.bundle()).expect("verifies").manifest;
    let mut bad = good.clone();
    bad.archives[0].name = "../etc/passwd".into();
    assert!(Manifest::parse(&bad.to_text())
        .expect_err("unsafe")
        .contains("not a file name"));
    let mut bad = good.clone();
    bad.archives[1].name = bad.archives[0].name.clone();
    assert!(Manifest::parse(&bad.to_text())
        .expect_err("twice")
        .contains("named twice"));
    let mut bad = good;
    bad.format = "erel-bundle/9".into();
    assert!(Manifest::parse(&bad.to_text())
        .expect_err("format")
        .contains("format"));
}

#[test]
fn archives_are_copied_once_and_a_different_one_in_place_is_never_replaced() {
    let fx = Fixture::new();
    let path = fx.bundle();
    let manifest = fx.verify(&path).expect("verifies").manifest;
    let artifacts = crate::fixtures::artifacts_holding(
        fx.dir.path(),
        &fx.dir.path().join("api-2.tar.gz"),
        "api-2.tar.gz",
    );
    let missing = missing_archives(&manifest, &artifacts).expect("checked");
    assert_eq!(
        missing.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
        ["web-1.tar.gz"]
    );
    assert_eq!(
        copy_archives(&path, &missing, &artifacts).expect("copied"),
        1
    );
    assert_eq!(
        std::fs::read(artifacts.join("web-1.tar.gz")).expect("read"),
        b"web archive bytes"
    );
    assert!(missing_archives(&manifest, &artifacts)
        .expect("checked")
        .is_empty());
    std::fs::write(artifacts.join("web-1.tar.gz"), b"other").expect("write");
    let refused = missing_archives(&manifest, &artifacts)
        .expect_err("differs")
        .to_string();
    assert!(
        refused.contains("web-1.tar.gz: exists with other contents"),
        "{refused}"
    );
    assert_eq!(
        std::fs::read(artifacts.join("web-1.tar.gz")).expect("read"),
        b"other"
    );
    let names: Vec<_> = std::fs::read_dir(&artifacts).expect("list").collect();
    assert_eq!(names.len(), 2, "no temporary file is left");
}

#[test]
fn a_master_checks_a_revisions_signature_text_and_archives() {
    let fx = Fixture::new();
    let verified = fx.verify(&fx.bundle()).expect("verifies");
    let plan = fx.plan(&verified.cluster_text);
    let entry = |body: &str, signed: Option<Signed>| LogEntry {
        offset: Some(0),
        revision: Some(3),
        publisher: None,
        published_at_ms: None,
        message_id: None,
        body: body.as_bytes().to_vec(),
        signed,
    };
    let text = verified.cluster_text.as_str();
    check_signed_revision(&fx.trusted, &entry(text, Some(verified.signed())), &plan)
        .expect("signed");
    let unsigned =
        check_signed_revision(&fx.trusted, &entry(text, None), &plan).expect_err("unsigned");
    assert!(
        unsigned.starts_with("revision 3 is not signed"),
        "{unsigned}"
    );
    let changed = format!("{text}# changed\n");
    let tampered = check_signed_revision(
        &fx.trusted,
        &entry(&changed, Some(verified.signed())),
        &plan,
    )
    .expect_err("changed");
    assert!(
        tampered.contains("tampered: its text is not the one signed"),
        "{tampered}"
    );
    let mut forged = verified.signed();
    forged.manifest = forged
        .manifest
        .replace("\"revision\": 3", "\"revision\": 4");
    let refused =
        check_signed_revision(&fx.trusted, &entry(text, Some(forged)), &plan).expect_err("forged");
    assert!(
        refused.contains("tampered: the manifest was changed"),
        "{refused}"
    );
    // An archive swapped in the artifact directory is not the one signed.
    std::fs::write(fx.dir.path().join("web-1.tar.gz"), b"swapped").expect("write");
    let swapped = fx.plan(text);
    let refused =
        check_signed_revision(&fx.trusted, &entry(text, Some(verified.signed())), &swapped)
            .expect_err("swapped");
    assert!(
        refused.contains("archive web-1.tar.gz in the artifact directory"),
        "{refused}"
    );
}
