//! `erel certs init | host | revoke` as an operator runs them, checked with openssl.

use std::path::Path;
use std::process::{Command, Output};

use crate::helper::{output_text, temp_path, MASTER_BIN};

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

fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf8")
}

#[test]
fn certs_init_and_host_make_certificates_openssl_accepts() {
    let (_dir, certs) = temp_path("certs");
    let init = erel(&certs, &["certs", "init"]);
    assert!(init.status.success(), "{}", output_text(&init));
    let host = erel(&certs, &["certs", "host", "web-1", "--ip", "127.0.0.1"]);
    assert!(host.status.success(), "{}", output_text(&host));

    let ca = certs.join("ca.pem");
    let host_pem = certs.join("hosts/web-1/host.pem");
    let master_pem = certs.join("master.pem");
    let ca_str = path_str(&ca);
    for cert in [&host_pem, &master_pem] {
        let verify = openssl(&["verify", "-CAfile", ca_str, path_str(cert)]);
        assert!(verify.status.success(), "{}", output_text(&verify));
        assert!(String::from_utf8_lossy(&verify.stdout).contains(": OK"));
    }
    let host_says = [
        "TLS Web Server Authentication",
        "DNS:web-1",
        "IP Address:127.0.0.1",
        "Digital Signature",
    ];
    let shown: [(&Path, &[&str], &[&str]); 3] = [
        (&host_pem, &host_says, &["TLS Web Client Authentication"]),
        (
            &master_pem,
            &["TLS Web Client Authentication"],
            &["TLS Web Server Authentication"],
        ),
        (&ca, &["CA:TRUE", "Certificate Sign"], &[]),
    ];
    for (cert, has, lacks) in shown {
        let text = output_text(&openssl(&[
            "x509",
            "-noout",
            "-text",
            "-in",
            path_str(cert),
        ]));
        for part in has {
            assert!(text.contains(part), "{part:?} missing from {text}");
        }
        for part in lacks {
            assert!(!text.contains(part), "{part:?} should not be in {text}");
        }
    }

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
    let (crl, host_pem) = (path_str(&crl), path_str(&host_pem));
    let checked = openssl(&[
        "verify",
        "-crl_check",
        "-CAfile",
        ca_str,
        "-CRLfile",
        crl,
        host_pem,
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
    let (_dir, certs) = temp_path("certs");
    let said = refused(&certs, &["certs", "host", "web-1"]);
    assert!(said.contains("ca.pem"), "{said}");

    assert!(erel(&certs, &["certs", "init"]).status.success());
    let before = std::fs::read(certs.join("ca.pem")).expect("ca");
    let said = refused(&certs, &["certs", "init"]);
    assert!(said.contains("ca.pem") || said.contains("ca.key"), "{said}");
    assert_eq!(std::fs::read(certs.join("ca.pem")).expect("ca"), before);

    let said = refused(&certs, &["certs", "revoke", "web-9"]);
    assert!(said.contains("web-9"), "{said}");

    let said = refused(&certs, &["certs", "host", "Web_1"]);
    assert!(said.contains("Web_1"), "{said}");
}

/// Runs `erel` with `args`, which must fail; returns what it printed.
fn refused(certs: &Path, args: &[&str]) -> String {
    let out = erel(certs, args);
    assert!(!out.status.success(), "{}", output_text(&out));
    output_text(&out)
}

#[test]
fn certs_host_never_overwrites_a_host_key_without_force() {
    let (dir, certs) = temp_path("certs");
    assert!(erel(&certs, &["certs", "init"]).status.success());
    let first = erel(&certs, &["certs", "host", "web-1", "--ip", "127.0.0.1"]);
    assert!(first.status.success(), "{}", output_text(&first));
    let key = certs.join("hosts/web-1/host.key");
    let pem = certs.join("hosts/web-1/host.pem");
    let key_before = std::fs::read(&key).expect("host.key");
    let pem_before = std::fs::read(&pem).expect("host.pem");

    let said = refused(&certs, &["certs", "host", "web-1", "--ip", "127.0.0.1"]);
    assert!(said.contains(path_str(&key)), "names the key file: {said}");
    assert!(said.contains("--force"), "says how to replace it: {said}");
    assert!(
        said.starts_with("erel: certs host web-1: ") && said.trim_end().lines().count() == 1,
        "one line, the program named once: {said}"
    );
    assert_eq!(std::fs::read(&key).expect("host.key"), key_before);
    assert_eq!(std::fs::read(&pem).expect("host.pem"), pem_before);

    let forced = erel(
        &certs,
        &["certs", "host", "web-1", "--ip", "127.0.0.1", "--force"],
    );
    assert!(forced.status.success(), "{}", output_text(&forced));
    assert_ne!(std::fs::read(&key).expect("host.key"), key_before);
    let verify = openssl(&[
        "verify",
        "-CAfile",
        path_str(&certs.join("ca.pem")),
        path_str(&pem),
    ]);
    assert!(verify.status.success(), "{}", output_text(&verify));

    // `certs init` on a directory holding only a master key leaves that key alone.
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).expect("dir");
    std::fs::write(other.join("master.key"), b"kept").expect("key");
    let said = refused(&other, &["certs", "init"]);
    assert!(said.contains("master.key"), "{said}");
    assert_eq!(
        std::fs::read(other.join("master.key")).expect("key"),
        b"kept"
    );
}
