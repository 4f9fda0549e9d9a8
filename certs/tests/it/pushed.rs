//! The pushed bundle: one TOML file, validated as a whole; every refusal names its check.

use std::fs;
use std::path::Path;

use erel_certs::{layout, testing, Error, Expected, MasterDir, PushedBundle};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::helper::{pki, LOOPBACK};

/// The chain of the master's certificate in `master`, as an agent sees it.
fn master_chain(master: &MasterDir) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(master.master_pem())
        .expect("master.pem")
        .collect::<Result<_, _>>()
        .expect("PEM")
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).expect("read")
}

/// The check a refusal names; panics on anything but a refusal.
fn refused_check(outcome: erel_certs::Result<impl std::fmt::Debug>) -> (&'static str, String) {
    match outcome {
        Err(e @ Error::Refused { check, .. }) => (check, e.to_string()),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// A cluster with host `web-1`, and the bundle of a second host `web-2`.
fn web_1_and_web_2() -> (crate::helper::Pki, std::path::PathBuf) {
    let pki = pki("web-1");
    let other = pki
        .master
        .issue_host("web-2", &[LOOPBACK], &[])
        .expect("web-2");
    (pki, other)
}

/// The refusal of `bundle` by an agent of host `web-1` that has seen no master yet.
fn refused_for_web_1(bundle: &PushedBundle) -> (&'static str, String) {
    let expected = Expected {
        host_id: "web-1",
        masters: &[],
    };
    refused_check(bundle.validate(Path::new("b.toml"), &expected))
}

#[test]
fn a_host_bundle_round_trips_through_toml_and_is_taken() {
    let pki = pki("web-1");
    let bundle = PushedBundle::from_dir(&pki.bundle).expect("from_dir");
    let text = bundle.to_toml();
    let path = pki.tmp.path().join("bundle.toml");
    let parsed = PushedBundle::parse(&path, &text).expect("parse");
    assert_eq!(parsed, bundle);
    assert!(
        !format!("{bundle:?}").contains("PRIVATE KEY"),
        "Debug shows the key"
    );
    let masters = [master_chain(&pki.master)];
    let expected = Expected {
        host_id: "web-1",
        masters: &masters,
    };
    parsed
        .validate(&path, &expected)
        .expect("a host's own bundle is taken");
}

#[test]
fn a_file_that_is_not_a_bundle_is_refused_by_the_format_check() {
    let path = Path::new("bundle.toml");
    let (check, message) = refused_check(PushedBundle::parse(path, "format = 1\nca = 3\n"));
    assert_eq!(check, "format");
    assert!(
        message.starts_with("bundle.toml: refused (format)"),
        "{message}"
    );
    let (check, message) = refused_check(PushedBundle::parse(
        path,
        "format = 2\nca = \"\"\ncertificate = \"\"\nkey = \"\"\n",
    ));
    assert_eq!(check, "format");
    assert!(message.contains("format 2 is not known"), "{message}");
}

#[test]
fn a_key_that_does_not_match_its_certificate_is_refused() {
    let (pki, other) = web_1_and_web_2();
    let own = pki.bundle.clone();
    let bundle = PushedBundle::new(
        read(&own.join(layout::CA_PEM)),
        read(&own.join(layout::HOST_PEM)),
        read(&other.join(layout::HOST_KEY)),
        Some(read(&own.join(layout::CRL_PEM))),
    );
    let (check, message) = refused_for_web_1(&bundle);
    assert_eq!(check, "key", "{message}");
    assert!(message.contains("does not belong to"), "{message}");
}

#[test]
fn a_bundle_for_another_host_is_refused() {
    let (_pki, other) = web_1_and_web_2();
    let bundle = PushedBundle::from_dir(&other).expect("from_dir");
    let (check, message) = refused_for_web_1(&bundle);
    assert_eq!(check, "same host", "{message}");
    assert!(
        message.contains("\"web-2\"") && message.contains("\"web-1\""),
        "{message}"
    );
}

#[test]
fn a_bundle_that_would_lock_out_the_master_is_refused_and_an_overlap_is_taken() {
    let old = pki("web-1");
    let new = MasterDir::new(old.scratch("next"));
    new.init("next").expect("init");
    let new_bundle = new.issue_host("web-1", &[LOOPBACK], &[]).expect("host");
    let masters = [master_chain(&old.master)];
    let expected = Expected {
        host_id: "web-1",
        masters: &masters,
    };
    let path = Path::new("b.toml");
    let only_new = PushedBundle::from_dir(&new_bundle).expect("from_dir");
    let (check, message) = refused_check(only_new.validate(path, &expected));
    assert_eq!(check, "master kept", "{message}");
    assert!(message.contains("erel-master"), "{message}");

    let crls = format!("{}{}", read(&new.crl_pem()), read(&old.master.crl_pem()));
    let overlap = only_new
        .also_trusting(&read(&old.master.ca_pem()))
        .with_crl(crls);
    overlap
        .validate(path, &expected)
        .expect("the overlap keeps the old master");
}

#[test]
fn a_revoked_host_certificate_is_refused() {
    let pki = pki("web-1");
    pki.master.revoke("web-1").expect("revoke");
    let bundle = PushedBundle::from_dir(&pki.bundle).expect("from_dir");
    let (check, message) = refused_for_web_1(&bundle);
    assert_eq!(check, "not revoked", "{message}");
    assert!(message.contains("CRL number 2"), "{message}");
}

#[test]
fn an_expired_host_certificate_is_refused() {
    let pki = pki("web-1");
    let dir = pki.tmp.path().join("expired");
    testing::expired_host_bundle(&pki.master, "web-1", &dir).expect("expired");
    let bundle = PushedBundle::from_dir(&dir).expect("from_dir");
    let (check, message) = refused_for_web_1(&bundle);
    assert_eq!(check, "valid now", "{message}");
}

#[test]
fn a_crl_from_a_foreign_ca_is_refused() {
    let foreign = pki("web-1");
    let pki = pki("web-1");
    let bundle = PushedBundle::from_dir(&pki.bundle)
        .expect("from_dir")
        .with_crl(read(&foreign.master.crl_pem()));
    let (check, message) = refused_for_web_1(&bundle);
    assert_eq!(check, "crl", "{message}");
    assert!(message.contains("does not verify"), "{message}");
}

#[test]
fn a_masters_chain_is_judged_again_by_a_newer_bundle() {
    let pki = pki("web-1");
    let before = master_chain(&pki.master);
    let served = erel_certs::server_tls(&pki.bundle).expect("bundle");
    served
        .verify_master(&before)
        .expect("the master of the bundle passes");
    assert_eq!(
        served.verify_master(&[]).expect_err("no certificate"),
        "the master presented no certificate"
    );

    pki.master.revoke("master").expect("revoke");
    // The bundle loaded before the revocation still passes it: the judgement is the
    // bundle's, not the files'.
    served
        .verify_master(&before)
        .expect("judged by the old CRL");
    let newer = erel_certs::server_tls(&pki.bundle).expect("bundle with the new CRL");
    let why = newer.verify_master(&before).expect_err("revoked");
    let pem = read(&pki.master.master_pem());
    let (_, der) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("PEM");
    let serial = der
        .parse_x509()
        .expect("certificate")
        .raw_serial_as_string();
    assert_eq!(
        why,
        format!("the master's certificate was revoked (serial {serial})")
    );

    // A master of another CA (of the same name): no longer accepted, naming why.
    let other = crate::helper::pki("web-1");
    let why = newer
        .verify_master(&master_chain(&other.master))
        .expect_err("another CA");
    assert!(
        why.starts_with("the master's certificate is no longer accepted: ")
            && why.contains("not signed by the cluster CA"),
        "{why}"
    );
}
