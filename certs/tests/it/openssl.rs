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
        let out = openssl(&[
            "verify",
            "-crl_check",
            "-CAfile",
            ca,
            "-CRLfile",
            crl.to_str().expect("utf-8"),
            leaf.to_str().expect("utf-8"),
        ])
        .expect("openssl");
        assert!(out.status.success(), "with CRL: {}", text(&out));
    }

    let Some(ca_text) = x509_text(&pki.master.ca_pem()) else {
        return;
    };
    assert!(ca_text.contains("CA:TRUE"), "{ca_text}");
    assert!(ca_text.contains("Certificate Sign, CRL Sign"), "{ca_text}");
    assert!(ca_text.contains("Digital Signature"), "{ca_text}");
    assert!(ca_text.contains("test erel CA"), "{ca_text}");

    let host_text = x509_text(&host).expect("openssl");
    assert!(
        host_text.contains("TLS Web Server Authentication"),
        "{host_text}"
    );
    assert!(
        !host_text.contains("TLS Web Client Authentication"),
        "{host_text}"
    );
    assert!(host_text.contains("Digital Signature"), "{host_text}");
    assert!(host_text.contains("CA:FALSE"), "{host_text}");
    assert!(host_text.contains("DNS:web-2"), "{host_text}");
    assert!(host_text.contains("DNS:web-2.example.org"), "{host_text}");
    assert!(host_text.contains("IP Address:10.0.0.12"), "{host_text}");
    assert!(host_text.contains("CN = web-2"), "{host_text}");
    assert!(host_text.contains("prime256v1"), "{host_text}");

    let master_text = x509_text(&master).expect("openssl");
    assert!(
        master_text.contains("TLS Web Client Authentication"),
        "{master_text}"
    );
    assert!(
        !master_text.contains("TLS Web Server Authentication"),
        "{master_text}"
    );
    assert!(master_text.contains("CN = erel-master"), "{master_text}");
}

#[test]
fn openssl_sees_a_revoked_certificate_in_the_crl() {
    let pki = pki("web-1");
    pki.master.revoke("web-1").expect("revoke");
    let ca = pki.master.ca_pem();
    let host = pki.bundle.join(layout::HOST_PEM);
    let crl = pki.bundle.join(layout::CRL_PEM);
    let Some(out) = openssl(&[
        "verify",
        "-crl_check",
        "-CAfile",
        ca.to_str().expect("utf-8"),
        "-CRLfile",
        crl.to_str().expect("utf-8"),
        host.to_str().expect("utf-8"),
    ]) else {
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
    let client = tokio::task::spawn_blocking(move || {
        openssl(&[
            "s_client",
            "-connect",
            &addr.to_string(),
            "-tls1_2",
            "-CAfile",
            bundle.join(layout::CA_PEM).to_str().expect("utf-8"),
            "-cert",
            master.master_pem().to_str().expect("utf-8"),
            "-key",
            master.master_key().to_str().expect("utf-8"),
        ])
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
