//! The master's certificate directory: layout, refusals, modes, revocation bookkeeping.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use erel_certs::{layout, validate_host_id, Error, MasterDir};

use crate::helper::{pki, poll_until, Pki, LOOPBACK};

fn mode(path: &Path) -> u32 {
    fs::metadata(path).expect("metadata").permissions().mode() & 0o777
}

#[test]
fn init_writes_the_documented_layout() {
    let pki = pki("web-1");
    let dir = pki.master.path();
    for name in [
        layout::CA_PEM,
        layout::CA_KEY,
        layout::MASTER_PEM,
        layout::MASTER_KEY,
        layout::CRL_PEM,
    ] {
        assert!(dir.join(name).is_file(), "{name} missing");
    }
    for name in [
        layout::CA_PEM,
        layout::HOST_PEM,
        layout::HOST_KEY,
        layout::CRL_PEM,
    ] {
        assert!(pki.bundle.join(name).is_file(), "bundle {name} missing");
    }
    assert_eq!(pki.bundle, dir.join("hosts").join("web-1"));
    assert_eq!(
        fs::read(dir.join(layout::CA_PEM)).expect("ca"),
        fs::read(pki.bundle.join(layout::CA_PEM)).expect("bundle ca")
    );
    assert_eq!(
        pki.master.host_ids().expect("ids"),
        vec!["web-1".to_string()]
    );
    // No staging or temporary names left behind.
    for d in [dir.to_path_buf(), dir.join("hosts"), pki.bundle.clone()] {
        for entry in fs::read_dir(&d).expect("read_dir") {
            let name = entry.expect("entry").file_name();
            assert!(
                !name.to_string_lossy().starts_with('.'),
                "left over: {name:?}"
            );
        }
    }
}

#[test]
fn key_files_are_private_and_certificates_public() {
    let pki = pki("web-1");
    let dir = pki.master.path();
    assert_eq!(mode(&dir.join(layout::CA_KEY)), 0o600);
    assert_eq!(mode(&dir.join(layout::MASTER_KEY)), 0o600);
    assert_eq!(mode(&pki.bundle.join(layout::HOST_KEY)), 0o600);
    assert_eq!(mode(&dir.join(layout::CA_PEM)), 0o644);
    assert_eq!(mode(&dir.join(layout::MASTER_PEM)), 0o644);
    assert_eq!(mode(&dir.join(layout::CRL_PEM)), 0o644);
    assert_eq!(mode(&pki.bundle.join(layout::HOST_PEM)), 0o644);
    assert_eq!(mode(&dir.join("hosts")), 0o700);
    pki.master.reissue_master().expect("reissue");
    assert_eq!(mode(&dir.join(layout::MASTER_KEY)), 0o600);
}

#[test]
fn init_twice_refuses_and_keeps_the_ca() {
    let pki = pki("web-1");
    let ca = pki.master.ca_pem();
    let before = fs::read(&ca).expect("ca.pem");
    let key_before = fs::read(pki.master.path().join(layout::CA_KEY)).expect("ca.key");

    let err = pki
        .master
        .init("test")
        .expect_err("second init must refuse");

    match &err {
        Error::AlreadyExists { path } => assert_eq!(path, &ca),
        other => panic!("expected AlreadyExists, got {other:?}"),
    }
    assert!(err.to_string().contains("ca.pem"), "{err}");
    assert_eq!(fs::read(&ca).expect("ca.pem"), before);
    assert_eq!(
        fs::read(pki.master.path().join(layout::CA_KEY)).expect("ca.key"),
        key_before
    );
}

#[test]
fn init_refuses_when_only_the_key_exists() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let master = MasterDir::new(tmp.path());
    fs::write(tmp.path().join(layout::CA_KEY), b"precious").expect("write");
    let err = master.init("test").expect_err("must refuse");
    assert!(
        matches!(&err, Error::AlreadyExists { path } if path.ends_with("ca.key")),
        "{err:?}"
    );
    assert_eq!(
        fs::read(tmp.path().join(layout::CA_KEY)).expect("read"),
        b"precious"
    );
    assert!(!tmp.path().join(layout::CA_PEM).exists());
}

#[test]
fn issue_host_without_ca_names_ca_pem() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let master = MasterDir::new(tmp.path().join("certs"));
    let err = master
        .issue_host("web-1", &[LOOPBACK], &[])
        .expect_err("no CA yet");
    match &err {
        Error::MissingCa { path } => assert_eq!(path, &master.ca_pem()),
        other => panic!("expected MissingCa, got {other:?}"),
    }
    let message = err.to_string();
    assert!(message.contains("ca.pem"), "{message}");
    assert!(message.contains("erel certs init"), "{message}");
}

#[test]
fn revoke_of_unknown_name_names_the_path() {
    let pki = pki("web-1");
    let err = pki.master.revoke("web-9").expect_err("unknown host");
    match &err {
        Error::UnknownHost { id, path } => {
            assert_eq!(id, "web-9");
            assert_eq!(path, &pki.master.host_dir("web-9").join(layout::HOST_PEM));
        }
        other => panic!("expected UnknownHost, got {other:?}"),
    }
    assert!(err.to_string().contains("web-9"), "{err}");
    assert!(matches!(
        pki.master.revoke("../x"),
        Err(Error::InvalidName { .. })
    ));
}

#[test]
fn revoke_keeps_earlier_entries_counts_up_and_is_idempotent() {
    let pki = pki("web-1");
    pki.master
        .issue_host("web-2", &[LOOPBACK], &[])
        .expect("web-2");
    let (number, entries) = crl_summary(&pki.master.crl_pem());
    assert_eq!((number, entries), (1, 0));

    pki.master.revoke("master").expect("revoke master");
    assert_eq!(crl_summary(&pki.master.crl_pem()), (2, 1));
    pki.master.revoke("web-1").expect("revoke web-1");
    assert_eq!(crl_summary(&pki.master.crl_pem()), (3, 2));
    let crl = fs::read(pki.master.crl_pem()).expect("crl");

    pki.master.revoke("web-1").expect("revoke web-1 again");
    assert_eq!(crl_summary(&pki.master.crl_pem()), (3, 2));
    assert_eq!(
        fs::read(pki.master.crl_pem()).expect("crl"),
        crl,
        "unchanged"
    );

    for host in ["web-1", "web-2"] {
        let copy = fs::read(pki.master.host_dir(host).join(layout::CRL_PEM)).expect("bundle crl");
        assert_eq!(copy, crl, "{host} bundle has the current CRL");
    }

    // A newly issued bundle carries the current CRL too.
    let web3 = pki.master.issue_host("web-3", &[], &[]).expect("web-3");
    assert_eq!(fs::read(web3.join(layout::CRL_PEM)).expect("crl"), crl);
}

/// The host certificate and key of the bundle in `dir`, as bytes.
fn host_cert_and_key(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    let read = |name: &str| fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    (read(layout::HOST_PEM), read(layout::HOST_KEY))
}

/// A PKI with host `web-1` issued, and its bundle's certificate and key as issued.
fn web_1_issued() -> (Pki, (Vec<u8>, Vec<u8>)) {
    let pki = pki("web-1");
    let issued = host_cert_and_key(&pki.bundle);
    (pki, issued)
}

#[test]
fn reissuing_a_host_replaces_its_bundle() {
    let (pki, before) = web_1_issued();
    let again = pki
        .master
        .replace_host("web-1", &[LOOPBACK], &["web-1.example.org".to_string()])
        .expect("re-issue");
    assert_eq!(again, pki.bundle);
    let after = host_cert_and_key(&again);
    assert_ne!(after.0, before.0, "a new certificate");
    assert_ne!(after.1, before.1, "a new key");
    let hosts: Vec<_> = fs::read_dir(pki.master.path().join("hosts"))
        .expect("hosts")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(hosts, vec!["web-1".to_string()], "no leftovers");
}

#[test]
fn issuing_for_a_host_with_a_bundle_refuses_and_keeps_its_key() {
    let (pki, before) = web_1_issued();
    let err = pki
        .master
        .issue_host("web-1", &[LOOPBACK], &[])
        .expect_err("refused");
    match &err {
        Error::BundleExists { id, path } => {
            assert_eq!(id, "web-1");
            assert_eq!(path, &pki.bundle.join(layout::HOST_KEY));
        }
        other => panic!("expected BundleExists, got {other:?}"),
    }
    assert!(err.to_string().contains("--force"), "{err}");
    assert_eq!(host_cert_and_key(&pki.bundle), before, "the bundle is kept");
    let hosts = fs::read_dir(pki.master.path().join("hosts"))
        .expect("hosts")
        .count();
    assert_eq!(hosts, 1, "no staging leftovers");
}

#[test]
fn init_never_overwrites_a_master_key_left_without_a_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let master = MasterDir::new(dir.path().join("certs"));
    fs::create_dir_all(master.path()).expect("dir");
    fs::write(master.master_key(), b"an operator's key").expect("key");
    let err = master.init("prod").expect_err("refused");
    assert!(
        matches!(&err, Error::AlreadyExists { path } if path == &master.master_key()),
        "{err:?}"
    );
    assert_eq!(
        fs::read(master.master_key()).expect("key"),
        b"an operator's key"
    );
    assert!(!master.ca_pem().exists(), "nothing written");
}

#[test]
fn issue_host_rejects_bad_names() {
    let pki = pki("web-1");
    for id in ["", "Web-1", "../x", "a/b", "master"] {
        let err = pki.master.issue_host(id, &[], &[]).expect_err(id);
        assert!(matches!(err, Error::InvalidName { .. }), "{id}: {err:?}");
    }
    let err = pki
        .master
        .issue_host("web-2", &[], &["not a name".to_string()])
        .expect_err("bad dns");
    assert!(err.to_string().contains("not a name"), "{err}");
    assert!(!pki.master.host_dir("web-2").exists());
}

#[test]
fn init_rejects_bad_cluster_names() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let master = MasterDir::new(tmp.path());
    for name in ["", "  ", "a\nb", &"x".repeat(49)] {
        assert!(
            matches!(master.init(name), Err(Error::InvalidName { .. })),
            "{name:?}"
        );
    }
    assert!(!tmp.path().join(layout::CA_PEM).exists());
}

#[test]
fn host_ids_are_dns_labels() {
    for bad in [
        "",
        "A",
        "-x",
        "x-",
        "a/b",
        "../x",
        "a.b",
        "a_b",
        "é",
        "123",
        &"a".repeat(64),
    ] {
        let err = validate_host_id(bad).expect_err(bad);
        assert!(matches!(err, Error::InvalidName { .. }), "{bad:?}");
        assert!(erel_certs::server_name(bad).is_err(), "{bad:?}");
    }
    for good in ["a", "web-1", "db01", "1a", &"a".repeat(63)] {
        validate_host_id(good).unwrap_or_else(|e| panic!("{good}: {e}"));
        erel_certs::server_name(good).unwrap_or_else(|e| panic!("{good}: {e}"));
    }
}

#[test]
fn client_config_needs_the_crl() {
    let pki = pki("web-1");
    fs::remove_file(pki.master.crl_pem()).expect("remove");
    let err = pki.master.client_config().expect_err("no crl");
    assert!(
        matches!(&err, Error::Missing { path } if path.ends_with("crl.pem")),
        "{err:?}"
    );
}

#[test]
fn server_config_names_a_missing_bundle_file() {
    let pki = pki("web-1");
    fs::remove_file(pki.bundle.join(layout::HOST_KEY)).expect("remove");
    let err = erel_certs::server_config(&pki.bundle).expect_err("no key");
    assert!(
        matches!(&err, Error::Missing { path } if path.ends_with("host.key")),
        "{err:?}"
    );
    let err = erel_certs::server_config(&pki.scratch("nothing")).expect_err("no bundle");
    assert!(err.to_string().contains("ca.pem"), "{err}");
}

#[test]
fn fingerprint_notices_a_replaced_file() {
    let pki = pki("web-1");
    let before = erel_certs::bundle_fingerprint(&pki.bundle);
    assert_eq!(before, erel_certs::bundle_fingerprint(&pki.bundle));
    assert_eq!(before.files().count(), 4);
    pki.master
        .replace_host("web-1", &[LOOPBACK], &[])
        .expect("re-issue");
    assert_ne!(before, erel_certs::bundle_fingerprint(&pki.bundle));
}

#[test]
fn fingerprint_notices_a_file_rewritten_in_place_with_its_length_and_mtime_kept() {
    use std::os::unix::fs::FileExt;
    let pki = pki("web-1");
    let ca = pki.bundle.join(layout::CA_PEM);
    // Freshly written files may change again within one timestamp tick: such a
    // snapshot is unsettled, and differs from the settled one taken later.
    let fresh = erel_certs::bundle_fingerprint(&pki.bundle);
    assert!(!fresh.is_settled());
    let before = poll_until(std::time::Duration::from_secs(12), || {
        Some(erel_certs::bundle_fingerprint(&pki.bundle)).filter(|now| now.is_settled())
    })
    .expect("never settled");
    assert_ne!(fresh, before, "the files are read once more when settled");
    assert_eq!(before, erel_certs::bundle_fingerprint(&pki.bundle));

    // Same length, same mtime, same inode: only the ctime moves (`cp -p`, `rsync -t`).
    let mtime = fs::metadata(&ca).and_then(|m| m.modified()).expect("mtime");
    let file = fs::OpenOptions::new().write(true).open(&ca).expect("open");
    file.write_all_at(b"-----", 0).expect("rewrite");
    file.set_times(fs::FileTimes::new().set_modified(mtime))
        .expect("set mtime");
    drop(file);
    let after = erel_certs::bundle_fingerprint(&pki.bundle);
    assert_eq!(
        before
            .files()
            .map(|(_, len, mtime)| (len, mtime))
            .collect::<Vec<_>>(),
        after
            .files()
            .map(|(_, len, mtime)| (len, mtime))
            .collect::<Vec<_>>()
    );
    assert_ne!(before, after, "a file rewritten in place is a change");
}

#[test]
fn nothing_secret_in_debug_output() {
    let pki = pki("web-1");
    let key = fs::read_to_string(pki.master.path().join(layout::CA_KEY)).expect("key");
    let body: String = key.lines().nth(1).expect("pem body").to_string();
    let debug = format!("{:?}", pki.master);
    assert!(!debug.contains(&body));
}

#[test]
fn error_is_usable_with_anyhow() {
    fn assert_send_sync<T: std::error::Error + Send + Sync + 'static>() {}
    assert_send_sync::<Error>();
}

/// (CRL number, number of entries) of a CRL file.
fn crl_summary(path: &Path) -> (u64, usize) {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateRevocationListDer::from_pem_file(path).expect("crl");
    let (_, crl) = x509_parser::parse_x509_crl(der.as_ref()).expect("parse");
    let number = crl
        .crl_number()
        .expect("crl number")
        .to_u64_digits()
        .first()
        .copied()
        .unwrap_or(0);
    (number, crl.iter_revoked_certificates().count())
}
