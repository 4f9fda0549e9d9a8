//! Cross-checks with the `openssl` command line, when it is installed.
//! Each test returns early (passing) when `openssl` is not on PATH.

use std::path::Path;
use std::process::{Command, Output};

use erel_certs::layout;

use crate::helper::pki;

fn openssl(args: &[&str]) -> Option<Output> {
    match Command::new("openssl").args(args).output() {
        Ok(out) => Some(out),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("openssl not on PATH; skipping");
            None
        }
        Err(e) => panic!("running openssl: {e}"),
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// `openssl verify` of `leaf` against the CAs of `ca` and the CRLs of `crl`.
fn verify_with_crl(ca: &Path, crl: &Path, leaf: &Path) -> Option<Output> {
    let (ca, crl, leaf) = (path_str(ca), path_str(crl), path_str(leaf));
    openssl(&["verify", "-crl_check", "-CAfile", ca, "-CRLfile", crl, leaf])
}

fn x509_text(path: &Path) -> Option<String> {
    let out = openssl(&["x509", "-in", path.to_str()?, "-noout", "-text"])?;
    assert!(out.status.success(), "{}", text(&out));
    Some(text(&out))
}

#[test]
fn openssl_verifies_the_chain_and_sees_the_right_extensions() {
    let pki = pki("web-1");
    let bundle = pki
        .master
        .issue_host(
            "web-2",
            &["10.0.0.12".parse().expect("ip")],
            &["web-2.example.org".to_string()],
        )
        .expect("issue web-2");
    let ca = pki.master.ca_pem();
    let ca = ca.to_str().expect("utf-8 path");
    let host = bundle.join(layout::HOST_PEM);
    let master = pki.master.master_pem();
    let crl = pki.master.crl_pem();

    for leaf in [&host, &master] {
        let Some(out) = openssl(&["verify", "-CAfile", ca, leaf.to_str().expect("utf-8")]) else {
            return;
        };
        assert!(out.status.success(), "{}", text(&out));
        let out = verify_with_crl(&pki.master.ca_pem(), &crl, leaf).expect("openssl");
        assert!(out.status.success(), "with CRL: {}", text(&out));
    }

    let Some(ca_text) = x509_text(&pki.master.ca_pem()) else {
        return;
    };
    let ca_says = [
        "CA:TRUE",
        "Certificate Sign, CRL Sign",
        "Digital Signature",
        "test erel CA",
    ];
    assert_says(&ca_text, &ca_says, &[]);

    let host_says = [
        "TLS Web Server Authentication",
        "Digital Signature",
        "CA:FALSE",
        "DNS:web-2",
        "DNS:web-2.example.org",
        "IP Address:10.0.0.12",
        "CN = web-2",
        "prime256v1",
    ];
    let host_text = x509_text(&host).expect("openssl");
    assert_says(&host_text, &host_says, &["TLS Web Client Authentication"]);

    let master_says = ["TLS Web Client Authentication", "CN = erel-master"];
    let master_text = x509_text(&master).expect("openssl");
    assert_says(
        &master_text,
        &master_says,
        &["TLS Web Server Authentication"],
    );
}

/// Expects `text` to contain each of `has` and none of `lacks`.
fn assert_says(text: &str, has: &[&str], lacks: &[&str]) {
    for part in has {
        assert!(text.contains(part), "{part:?} missing from {text}");
    }
    for part in lacks {
        assert!(!text.contains(part), "{part:?} should not be in {text}");
    }
}

#[test]
fn openssl_sees_a_revoked_certificate_in_the_crl() {
    let pki = pki("web-1");
    pki.master.revoke("web-1").expect("revoke");
    let ca = pki.master.ca_pem();
    let host = pki.bundle.join(layout::HOST_PEM);
    let crl = pki.bundle.join(layout::CRL_PEM);
    let Some(out) = verify_with_crl(&ca, &crl, &host) else {
        return;
    };
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("certificate revoked"), "{}", text(&out));
}

#[tokio::test]
async fn tls12_client_is_refused() {
    let pki = pki("web-1");
    let server = erel_certs::server_config(&pki.bundle).expect("server config");
    let (addr, handle) = crate::helper::echo_once(server).await;
    let bundle = pki.bundle.clone();
    let master = pki.master.clone();
    let ca = bundle.join(layout::CA_PEM);
    let (cert, key) = (master.master_pem(), master.master_key());
    let client = tokio::task::spawn_blocking(move || {
        let mut args = vec!["s_client", "-tls1_2"];
        let connect = addr.to_string();
        args.extend(["-connect", &connect]);
        args.extend(["-CAfile", path_str(&ca), "-cert", path_str(&cert)]);
        args.extend(["-key", path_str(&key)]);
        openssl(&args)
    })
    .await
    .expect("join");
    let Some(out) = client else {
        return;
    };
    assert!(!out.status.success(), "{}", text(&out));
    let server_err = handle
        .await
        .expect("join")
        .expect_err("server must refuse TLS 1.2");
    let explained = erel_certs::explain_tls_error(&server_err).expect("explained");
    assert!(explained.contains("TLS 1.3"), "{explained}");
}
