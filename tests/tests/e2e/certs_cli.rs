//! `erel certs init | host | revoke` as an operator runs them, checked with openssl.

use std::path::Path;
use std::process::{Command, Output};

use crate::helper::{output_text, MASTER_BIN};

fn erel(certs: &Path, args: &[&str]) -> Output {
    Command::new(MASTER_BIN)
        .arg("--certs")
        .arg(certs)
        .args(args)
        .output()
        .expect("run erel")
}

fn openssl(args: &[&str]) -> Output {
    Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl is installed by scripts/test.sh")
}

#[test]
fn certs_init_and_host_make_certificates_openssl_accepts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = dir.path().join("certs");
    let init = erel(&certs, &["certs", "init"]);
    assert!(init.status.success(), "{}", output_text(&init));
    let host = erel(&certs, &["certs", "host", "web-1", "--ip", "127.0.0.1"]);
    assert!(host.status.success(), "{}", output_text(&host));

    let ca = certs.join("ca.pem");
    let host_pem = certs.join("hosts/web-1/host.pem");
    let master_pem = certs.join("master.pem");
    for cert in [&host_pem, &master_pem] {
        let verify = openssl(&[
            "verify",
            "-CAfile",
            ca.to_str().expect("utf8"),
            cert.to_str().expect("utf8"),
        ]);
        assert!(verify.status.success(), "{}", output_text(&verify));
        assert!(String::from_utf8_lossy(&verify.stdout).contains(": OK"));
    }
    let host_text = output_text(&openssl(&[
        "x509",
        "-noout",
        "-text",
        "-in",
        host_pem.to_str().expect("utf8"),
    ]));
    assert!(
        host_text.contains("TLS Web Server Authentication"),
        "{host_text}"
    );
    assert!(
        !host_text.contains("TLS Web Client Authentication"),
        "{host_text}"
    );
    assert!(host_text.contains("DNS:web-1"), "{host_text}");
    assert!(host_text.contains("IP Address:127.0.0.1"), "{host_text}");
    assert!(host_text.contains("Digital Signature"), "{host_text}");
    let master_text = output_text(&openssl(&[
        "x509",
        "-noout",
        "-text",
        "-in",
        master_pem.to_str().expect("utf8"),
    ]));
    assert!(
        master_text.contains("TLS Web Client Authentication"),
        "{master_text}"
    );
    assert!(
        !master_text.contains("TLS Web Server Authentication"),
        "{master_text}"
    );
    let ca_text = output_text(&openssl(&[
        "x509",
        "-noout",
        "-text",
        "-in",
        ca.to_str().expect("utf8"),
    ]));
    assert!(ca_text.contains("CA:TRUE"), "{ca_text}");
    assert!(ca_text.contains("Certificate Sign"), "{ca_text}");

    use std::os::unix::fs::PermissionsExt;
    for key in [
        certs.join("ca.key"),
        certs.join("master.key"),
        certs.join("hosts/web-1/host.key"),
    ] {
        let mode = std::fs::metadata(&key).expect("key").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", key.display());
    }

    // Revocation shows in openssl's CRL check.
    let revoke = erel(&certs, &["certs", "revoke", "web-1"]);
    assert!(revoke.status.success(), "{}", output_text(&revoke));
    let crl = certs.join("crl.pem");
    let checked = openssl(&[
        "verify",
        "-crl_check",
        "-CAfile",
        ca.to_str().expect("utf8"),
        "-CRLfile",
        crl.to_str().expect("utf8"),
        host_pem.to_str().expect("utf8"),
    ]);
    assert!(!checked.status.success());
    assert!(
        output_text(&checked).contains("revoked"),
        "{}",
        output_text(&checked)
    );
}

#[test]
fn certs_errors_name_the_file_and_never_overwrite_a_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = dir.path().join("certs");
    let no_ca = erel(&certs, &["certs", "host", "web-1"]);
    assert!(!no_ca.status.success());
    assert!(
        output_text(&no_ca).contains("ca.pem"),
        "{}",
        output_text(&no_ca)
    );

    assert!(erel(&certs, &["certs", "init"]).status.success());
    let before = std::fs::read(certs.join("ca.pem")).expect("ca");
    let again = erel(&certs, &["certs", "init"]);
    assert!(!again.status.success());
    assert!(
        output_text(&again).contains("ca.pem") || output_text(&again).contains("ca.key"),
        "{}",
        output_text(&again)
    );
    assert_eq!(std::fs::read(certs.join("ca.pem")).expect("ca"), before);

    let unknown = erel(&certs, &["certs", "revoke", "web-9"]);
    assert!(!unknown.status.success());
    assert!(
        output_text(&unknown).contains("web-9"),
        "{}",
        output_text(&unknown)
    );

    let bad = erel(&certs, &["certs", "host", "Web_1"]);
    assert!(!bad.status.success());
    assert!(output_text(&bad).contains("Web_1"), "{}", output_text(&bad));
}
