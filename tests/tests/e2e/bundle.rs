//! Sealed bundles, with real files, the real broker and real masters: a bundle made on
//! one side is verified and imported on the other, and a master that trusts its key
//! applies it; a tampered archive or manifest, an expired bundle, one signed by another
//! key and an older revision are each refused saying which, with the artifact directory
//! and the config log left as they were; a master that trusts a key ignores a plainly
//! published revision and applies a signed one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use crate::helper::amqp::{erel, logs, BrokerLock, MasterProc, TestBroker};
use crate::helper::fleet::Fleet;
use crate::helper::release::beat_release;
use crate::helper::{output_text, wait_until_blocking, Pki};

const CONVERGE: Duration = Duration::from_secs(60);
/// How long a master may take to see a publish and store it: generous for a machine whose
/// two cores are shared with a broker and other builds; every use polls a condition.
const RECEIVE: Duration = Duration::from_secs(60);

/// A signing key pair and the folders of both sides of the air gap: `source` holds the
/// cluster files and the archives they name, `artifacts` is the masters' (empty at
/// first).
struct AirGap {
    keys: tempfile::TempDir,
    artifacts: tempfile::TempDir,
    out: tempfile::TempDir,
    /// Bundles made so far (each gets a name of its own).
    made: std::cell::Cell<u32>,
}

impl AirGap {
    fn new(pki: &Pki) -> Self {
        let gap = AirGap {
            keys: tempfile::tempdir().expect("tempdir"),
            artifacts: tempfile::tempdir().expect("tempdir"),
            out: tempfile::tempdir().expect("tempdir"),
            made: std::cell::Cell::new(0),
        };
        gap.keygen(pki, "ops");
        gap
    }

    fn keygen(&self, pki: &Pki, name: &str) {
        let (secret, public) = (self.key(name, "key"), self.key(name, "pub"));
        let out = run(
            pki,
            &[
                "bundle",
                "keygen",
                "--secret-key",
                &secret,
                "--public-key",
                &public,
            ],
        );
        assert!(out.status.success(), "{}", output_text(&out));
    }

    fn key(&self, name: &str, kind: &str) -> String {
        path_text(&self.keys.path().join(format!("{name}.{kind}")))
    }

    fn public_key(&self) -> String {
        self.key("ops", "pub")
    }

    /// `erel bundle create` of the cluster file `cluster`, signed by key `name`, with
    /// `extra` flags; returns the bundle's path.
    fn create(&self, pki: &Pki, cluster: &Path, name: &str, extra: &[&str]) -> PathBuf {
        self.made.set(self.made.get() + 1);
        let bundle = self
            .out
            .path()
            .join(format!("bundle-{}.erel", self.made.get()));
        let mut words = vec![
            "--cluster".to_string(),
            path_text(cluster),
            "bundle".to_string(),
            "create".to_string(),
            "--secret-key".to_string(),
            self.key(name, "key"),
            "-o".to_string(),
            path_text(&bundle),
        ];
        words.extend(extra.iter().map(|w| w.to_string()));
        let words: Vec<&str> = words.iter().map(String::as_str).collect();
        let out = run(pki, &words);
        assert!(out.status.success(), "create: {}", output_text(&out));
        bundle
    }

    fn verify(&self, pki: &Pki, bundle: &Path) -> Output {
        run(
            pki,
            &[
                "bundle",
                "verify",
                &path_text(bundle),
                "--public-key",
                &self.public_key(),
            ],
        )
    }

    fn import(&self, pki: &Pki, broker: &TestBroker, bundle: &Path) -> Output {
        erel(
            pki,
            &["bundle", "import", &path_text(bundle)],
            broker,
            &[
                "--public-key",
                &self.public_key(),
                "--artifacts",
                &path_text(self.artifacts.path()),
            ],
        )
    }

    /// Every file of the artifact directory with its contents.
    fn artifacts(&self) -> BTreeMap<String, Vec<u8>> {
        std::fs::read_dir(self.artifacts.path())
            .expect("list")
            .map(|e| {
                let e = e.expect("entry");
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).expect("read"),
                )
            })
            .collect()
    }

    /// A master that trusts the `ops` key, its archives in the artifact directory.
    fn master(&self, fleet: &Fleet, broker: &TestBroker, name: &str) -> MasterProc {
        let key = self.public_key();
        fleet.master_with(
            broker,
            name,
            self.artifacts.path(),
            &["--trusted-key", &key],
        )
    }
}

fn path_text(path: &Path) -> String {
    path.to_str().expect("utf-8 path").to_string()
}

fn run(pki: &Pki, words: &[&str]) -> Output {
    pki.erel().args(words).output().expect("run erel")
}

/// (revision, signed) of every record of the config log.
fn log_records(broker: &TestBroker) -> Vec<(Option<u64>, bool)> {
    broker
        .config_log()
        .iter()
        .map(|e| (e.revision(), e.signed.is_some()))
        .collect()
}

#[test]
fn bundle_create_verify_import_and_a_trusting_master_applies_only_signed_revisions() {
    let _lock = BrokerLock::shared();
    let fleet = Fleet::with_beat_releases("bundle-ok", &["web"]);
    let broker = TestBroker::new("bundle-ok", &["web"]);
    let gap = AirGap::new(&fleet.pki);
    let mut master = gap.master(&fleet, &broker, "gapped");

    // Made beside the archives, checked and imported on the other side.
    let v1 = fleet.write("cluster-1.toml", &fleet.config(1, "1.0.0", ""));
    let bundle = gap.create(&fleet.pki, &v1, "ops", &["--expires-in", "1h"]);
    let out = gap.verify(&fleet.pki, &bundle);
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("revision   1"), "{text}");
    assert!(text.contains("archive    beat-1.0.0.tar.gz"), "{text}");
    let out = gap.import(&fleet.pki, &broker, &bundle);
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("1 archive(s) copied") && text.contains("published revision 1"),
        "{text}"
    );
    assert_eq!(
        gap.artifacts().get("beat-1.0.0.tar.gz"),
        Some(&std::fs::read(fleet.dir.path().join("beat-1.0.0.tar.gz")).expect("read")),
    );
    assert_eq!(log_records(&broker), [(Some(1), true)]);
    fleet.wait_all_run("1.0.0", CONVERGE, "the host runs 1.0.0", || master.log());
    assert_eq!(master.held_revision(), Some(1));

    // A plain publish (of a revision whose archive the artifact directory holds) is in
    // the log, but this master does not apply it.
    let (ok, text) = fleet.publish(&broker, &fleet.config(2, "1.0.0", "max_in_flight = 1"));
    assert!(ok, "{text}");
    assert!(
        wait_until_blocking(RECEIVE, || master
            .log()
            .contains("revision 2 is not signed")),
        "the unsigned revision is rejected, naming it\n{}",
        master.log()
    );
    assert_eq!(master.held_revision(), Some(1), "{}", master.log());
    assert!(fleet.all_run("1.0.0"), "untouched: {:?}", fleet.beats());

    // Unsigned, and naming an archive this master's artifact directory lacks: what is
    // wrong for good (no signature) is said first; it is not kept waiting for the
    // archive.
    let (ok, text) = fleet.publish(&broker, &fleet.config(3, "2.0.0", ""));
    assert!(ok, "{text}");
    assert!(
        wait_until_blocking(RECEIVE, || master
            .log()
            .contains("revision 3 is not signed")),
        "the unsigned revision is rejected, naming it\n{}",
        master.log()
    );
    assert!(
        !master.log().contains("waiting for revision 3"),
        "{}",
        master.log()
    );

    // A signed newer one is applied.
    let v4 = fleet.write("cluster-4.toml", &fleet.config(4, "2.0.0", ""));
    let out = gap.import(
        &fleet.pki,
        &broker,
        &gap.create(&fleet.pki, &v4, "ops", &[]),
    );
    assert!(out.status.success(), "{}", output_text(&out));
    fleet.wait_all_run("2.0.0", CONVERGE, "the host runs 2.0.0", || {
        logs(&[&master])
    });
    assert_eq!(master.held_revision(), Some(4));
    assert!(master.terminate(), "clean exit\n{}", master.log());
}

/// Flips one byte of the member `member` of the bundle at `path`, in place.
fn flip_byte(path: &Path, member: &str, at: u64) {
    let mut tar = tar::Archive::new(std::fs::File::open(path).expect("open"));
    let offset = tar
        .entries()
        .expect("entries")
        .map(|e| e.expect("entry"))
        .find(|e| e.path().expect("path").to_string_lossy() == member)
        .map(|e| e.raw_file_position())
        .expect("member");
    let mut bytes = std::fs::read(path).expect("read");
    let index = usize::try_from(offset + at).expect("fits");
    bytes[index] ^= 0x20;
    std::fs::write(path, bytes).expect("write");
}

#[test]
fn bundle_refusals_say_which_and_change_nothing() {
    let _lock = BrokerLock::shared();
    let pki = Pki::new();
    let source = tempfile::tempdir().expect("tempdir");
    for version in ["1.0.0", "2.0.0", "3.0.0"] {
        beat_release(source.path(), "beat", version);
    }
    let cluster = |revision: u64, version: &str| {
        let path = source.path().join(format!("cluster-{revision}.toml"));
        let text = format!(
            "revision = {revision}\n[[host]]\nid = \"h1\"\naddr = \"127.0.0.1:1\"\ngroup = \"web\"\n\
             [group.web]\nrelease = \"beat\"\nversion = \"{version}\"\narchive = \"beat-{version}.tar.gz\"\n"
        );
        std::fs::write(&path, text).expect("write");
        path
    };
    let broker = TestBroker::new("bundle-refused", &["web"]);
    let gap = AirGap::new(&pki);
    gap.keygen(&pki, "other");
    let out = gap.import(
        &pki,
        &broker,
        &gap.create(&pki, &cluster(2, "2.0.0"), "ops", &[]),
    );
    assert!(out.status.success(), "{}", output_text(&out));
    let (artifacts, records) = (gap.artifacts(), log_records(&broker));

    let v3 = cluster(3, "3.0.0");
    let tampered_archive = gap.create(&pki, &v3, "ops", &[]);
    flip_byte(&tampered_archive, "archives/beat-3.0.0.tar.gz", 100);
    let tampered_manifest = gap.create(&pki, &v3, "ops", &["--expires-in", "1d"]);
    // `"revision": 3` becomes `"revision": 2`: same length, another revision.
    let manifest = std::fs::read(&tampered_manifest).expect("read");
    let at = manifest
        .windows(13)
        .position(|w| w == b"\"revision\": 3")
        .expect("revision in the manifest");
    let mut bytes = std::fs::read(&tampered_manifest).expect("read");
    bytes[at + 12] = b'2';
    std::fs::write(&tampered_manifest, bytes).expect("write");
    // A time already past is refused when the bundle is made; one that passes after it was
    // made is refused by verify and import. The bound is the expiry (1 s) many times over.
    let past = run(
        &pki,
        &[
            "--cluster",
            &path_text(&v3),
            "bundle",
            "create",
            "--secret-key",
            &gap.key("ops", "key"),
            "-o",
            &path_text(&gap.out.path().join("past.erel")),
            "--expires",
            "2020-01-01T00:00:00Z",
        ],
    );
    let text = output_text(&past);
    assert!(
        !past.status.success()
            && text.contains("--expires 2020-01-01T00:00:00Z: that is already past"),
        "{text}"
    );
    assert!(
        !gap.out.path().join("past.erel").exists(),
        "no bundle written"
    );
    let expired = gap.create(&pki, &v3, "ops", &["--expires-in", "1s"]);
    assert!(
        wait_until_blocking(Duration::from_secs(30), || {
            output_text(&gap.verify(&pki, &expired)).contains("expired: the bundle of revision 3")
        }),
        "the bundle made to expire in 1 s never expired"
    );
    let other_key = gap.create(&pki, &v3, "other", &[]);
    let older = gap.create(&pki, &cluster(1, "1.0.0"), "ops", &[]);
    // Equal to the current revision (2): not newer either.
    let equal = gap.create(&pki, &cluster(2, "2.0.0"), "ops", &[]);
    // More than 2^32 above the current revision (2).
    let far = gap.create(&pki, &cluster(3 + (1 << 32), "3.0.0"), "ops", &[]);

    for (bundle, words, on_verify) in [
        (
            &tampered_archive,
            "tampered: archives/beat-3.0.0.tar.gz does not match",
            true,
        ),
        (
            &tampered_manifest,
            "tampered: the manifest was changed after it was signed",
            true,
        ),
        (
            &expired,
            "expired: the bundle of revision 3 expired at",
            true,
        ),
        (&other_key, "signed by another key", true),
        (&older, "not newer than the current revision", false),
        (&equal, "not newer than the current revision", false),
        (
            &far,
            "too far ahead: the bundle holds revision 4294967299",
            false,
        ),
    ] {
        if on_verify {
            let out = gap.verify(&pki, bundle);
            let text = output_text(&out);
            assert!(
                !out.status.success() && text.contains(words),
                "verify: {words}: {text}"
            );
        }
        let out = gap.import(&pki, &broker, bundle);
        let text = output_text(&out);
        assert!(!out.status.success(), "import succeeded: {words}: {text}");
        assert!(text.contains(words), "import: {words}: {text}");
        assert_eq!(
            gap.artifacts(),
            artifacts,
            "artifacts untouched after: {words}"
        );
        assert_eq!(
            log_records(&broker),
            records,
            "log untouched after: {words}"
        );
    }

    // An archive already in the artifact directory with other contents is never
    // replaced: the import is refused naming it, and nothing is published.
    let v3_ok = gap.create(&pki, &v3, "ops", &["--expires-in", "2d"]);
    let squatter = gap.artifacts.path().join("beat-3.0.0.tar.gz");
    std::fs::write(&squatter, b"not the release").expect("write");
    let out = gap.import(&pki, &broker, &v3_ok);
    let text = output_text(&out);
    assert!(
        !out.status.success() && text.contains("beat-3.0.0.tar.gz: exists with other contents"),
        "{text}"
    );
    assert_eq!(std::fs::read(&squatter).expect("read"), b"not the release");
    assert_eq!(log_records(&broker), records);
    std::fs::remove_file(&squatter).expect("remove");
    let out = gap.import(&pki, &broker, &v3_ok);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(log_records(&broker).last(), Some(&(Some(3), true)));
}
