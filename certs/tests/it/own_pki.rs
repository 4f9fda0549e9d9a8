//! An operator's own PKI made with the `openssl` command line (root CA, intermediate
//! CA, leaves with keys in PKCS#1, SEC1 or PKCS#8, CRLs from `openssl ca`), used
//! for real mutual-TLS handshakes both ways. These tests need `openssl` on PATH
//! and fail, saying so, without it.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use erel_certs::testing::openssl::{concat, KeyKind, Leaf, Pki};
use erel_certs::{explain_tls_error, layout, server_config, Error, MasterDir};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::helper::{
    attempt, attempt_between, expect_echoed, expect_exchanged, expect_refused,
    expect_server_refused, Outcome,
};

/// A scratch directory with an "Example" root and intermediate.
struct Site {
    tmp: tempfile::TempDir,
    pki: Pki,
}

fn site() -> Site {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"), "Example").expect("openssl PKI");
    Site { tmp, pki }
}

/// What goes into one side's files.
struct Files<'a> {
    /// `ca.pem`, in order.
    ca: Vec<&'a Path>,
    /// `host.pem` or `master.pem`, in order (the leaf first, normally).
    chain: Vec<&'a Path>,
    /// `host.key` or `master.key`.
    key: &'a Path,
    /// `crl.pem`, CRLs in order; none: no file.
    crls: Vec<String>,
}

impl<'a> Files<'a> {
    /// `ca.pem` = root, the leaf followed by the intermediate, the intermediate's CRL.
    fn issue_input(site: &'a Site, leaf: &'a Leaf) -> Self {
        Files {
            ca: vec![&site.pki.root.cert],
            chain: vec![&leaf.cert, &site.pki.intermediate.cert],
            key: &leaf.key,
            crls: vec![site.pki.crl(&site.pki.intermediate).expect("crl")],
        }
    }

    /// `ca.pem` = the intermediate then the root, the leaf alone, the
    /// intermediate's CRL.
    fn intermediate_in_ca_pem(site: &'a Site, leaf: &'a Leaf) -> Self {
        Files {
            ca: vec![&site.pki.intermediate.cert, &site.pki.root.cert],
            chain: vec![&leaf.cert],
            ..Files::issue_input(site, leaf)
        }
    }

    fn write(&self, dir: &Path, cert_name: &str, key_name: &str) {
        fs::create_dir_all(dir).expect("mkdir");
        fs::write(dir.join(layout::CA_PEM), concat(&self.ca).expect("ca")).expect("ca.pem");
        fs::write(dir.join(cert_name), concat(&self.chain).expect("chain")).expect("cert");
        fs::copy(self.key, dir.join(key_name)).expect("key");
        if !self.crls.is_empty() {
            fs::write(dir.join(layout::CRL_PEM), self.crls.concat()).expect("crl.pem");
        }
    }
}

impl Site {
    /// Writes an agent bundle under `name`.
    fn bundle(&self, name: &str, files: &Files<'_>) -> PathBuf {
        let dir = self.tmp.path().join(name);
        files.write(&dir, layout::HOST_PEM, layout::HOST_KEY);
        dir
    }

    /// Writes a master certificate directory under `name`.
    fn master(&self, name: &str, files: &Files<'_>) -> MasterDir {
        let dir = self.tmp.path().join(name);
        files.write(&dir, layout::MASTER_PEM, layout::MASTER_KEY);
        MasterDir::new(dir)
    }

    /// Why the agent refuses the bundle `files` written under `name`.
    fn bundle_refusal(&self, name: &str, files: &Files<'_>) -> String {
        parse_error(server_config(&self.bundle(name, files)))
    }

    /// Why the master refuses the directory `files` written under `name`.
    fn master_refusal(&self, name: &str, files: &Files<'_>) -> String {
        parse_error(self.master(name, files).client_config())
    }

    /// Host `web-1` (EC, SEC1) and a master with a key of `master_kind`, both
    /// issued by the intermediate.
    fn host_and_master(&self, master_kind: KeyKind) -> (Leaf, Leaf) {
        let host = self.host("web-1", KeyKind::EcP256Sec1);
        (host, self.master_leaf("master", master_kind))
    }

    fn host(&self, id: &str, kind: KeyKind) -> Leaf {
        self.pki
            .issue_host(&self.pki.intermediate, id, kind)
            .expect("host certificate")
    }

    fn master_leaf(&self, stem: &str, kind: KeyKind) -> Leaf {
        self.pki
            .issue_master(&self.pki.intermediate, stem, kind)
            .expect("master certificate")
    }
}

fn parse_error(result: Result<impl std::fmt::Debug, Error>) -> String {
    match result {
        Err(e @ Error::Parse { .. }) => e.to_string(),
        other => panic!("expected a Parse error, got {other:?}"),
    }
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

fn assert_contains(text: &str, parts: &[&str]) {
    for part in parts {
        assert!(text.contains(part), "{text:?} should contain {part:?}");
    }
}

/// The input of the issue: RSA master key in PKCS#1, EC host key in SEC1, leaves
/// followed by the intermediate, `ca.pem` the root, `crl.pem` the intermediate's CRL.
#[tokio::test]
async fn intermediate_issued_pkcs1_master_and_sec1_host_shake_hands() {
    let site = site();
    let (host, master) = site.host_and_master(KeyKind::RsaPkcs1);
    assert!(fs::read_to_string(&master.key)
        .expect("key")
        .contains("BEGIN RSA PRIVATE KEY"));
    assert!(fs::read_to_string(&host.key)
        .expect("key")
        .contains("BEGIN EC PRIVATE KEY"));
    let bundle = site.bundle("bundle", &Files::issue_input(&site, &host));
    let certs = site.master("certs", &Files::issue_input(&site, &master));

    expect_exchanged(attempt_between(&bundle, &certs).await, "web-1");
}

/// Every key encoding and algorithm erel signs with, on both sides at once.
#[tokio::test]
async fn every_supported_key_encoding_works_on_both_sides() {
    let site = site();
    for (i, kind) in [
        KeyKind::RsaPkcs8,
        KeyKind::EcP256Pkcs8,
        KeyKind::EcP384Sec1,
        KeyKind::Ed25519,
        KeyKind::RsaPkcs1,
        KeyKind::EcP256Sec1,
    ]
    .into_iter()
    .enumerate()
    {
        let host = site.host(&format!("web-{i}"), kind);
        let master = site.master_leaf(&format!("master-{i}"), kind);
        let bundle = site.bundle(&format!("bundle-{i}"), &Files::issue_input(&site, &host));
        let certs = site.master(&format!("certs-{i}"), &Files::issue_input(&site, &master));
        let server = server_config(&bundle).unwrap_or_else(|e| panic!("{kind:?} host: {e}"));
        let client = certs
            .client_config()
            .unwrap_or_else(|e| panic!("{kind:?} master: {e}"));
        let (client_result, server_result) = attempt(server, client, &format!("web-{i}")).await;
        let exchanged = client_result.unwrap_or_else(|e| panic!("{kind:?}: {e}"));
        assert_eq!(exchanged.echoed, 42, "{kind:?}");
        server_result.unwrap_or_else(|e| panic!("{kind:?} agent side: {e}"));
    }
}

/// Intermediates may sit in `ca.pem` rather than after the leaf; a side whose
/// `ca.pem` holds them sends them along to a peer that trusts only the root.
#[tokio::test]
async fn intermediates_in_ca_pem_are_used_and_sent_along() {
    let site = site();
    let (host, master) = site.host_and_master(KeyKind::RsaPkcs1);
    let crl = site.pki.crl(&site.pki.intermediate).expect("crl");
    // The agent: root and intermediate in ca.pem, host.pem only the leaf.
    let bundle = site.bundle(
        "bundle",
        &Files {
            ca: vec![&site.pki.root.cert, &site.pki.intermediate.cert],
            chain: vec![&host.cert],
            key: &host.key,
            crls: vec![crl.clone()],
        },
    );
    // The master trusts only the root: it needs the agent to send the intermediate.
    let certs = site.master(
        "certs",
        &Files {
            ca: vec![&site.pki.root.cert],
            chain: vec![&master.cert, &site.pki.intermediate.cert],
            key: &master.key,
            crls: vec![crl],
        },
    );
    expect_echoed(attempt_between(&bundle, &certs).await);

    // The other way round: the master keeps the intermediate in ca.pem and sends
    // only its leaf; the agent, trusting the root alone, still gets the chain.
    let certs = site.master("certs-2", &Files::intermediate_in_ca_pem(&site, &master));
    let bundle = site.bundle("bundle-2", &Files::issue_input(&site, &host));
    expect_echoed(attempt_between(&bundle, &certs).await);
}

/// crl.pem with one CRL per CA (root and intermediate) is fine; two from one CA is not.
#[tokio::test]
async fn crl_pem_holds_one_crl_per_issuing_ca() {
    let site = site();
    let (host, master) = site.host_and_master(KeyKind::RsaPkcs8);
    let root_crl = site.pki.crl(&site.pki.root).expect("root crl");
    let int_crl = site.pki.crl(&site.pki.intermediate).expect("int crl");
    let mut files = Files::issue_input(&site, &host);
    files.crls = vec![root_crl.clone(), int_crl.clone()];
    let bundle = site.bundle("bundle", &files);
    let mut files = Files::issue_input(&site, &master);
    files.crls = vec![int_crl.clone(), root_crl];
    let certs = site.master("certs", &files);
    let (client_result, _) = attempt_between(&bundle, &certs).await;
    assert_eq!(client_result.expect("exchange").echoed, 42);

    let mut files = Files::issue_input(&site, &host);
    files.crls = vec![int_crl.clone(), int_crl];
    let bundle = site.bundle("bundle-dup", &files);
    let text = parse_error(server_config(&bundle));
    assert_contains(
        &text,
        &["crl.pem", "CRL #2", "second CRL", "Example Intermediate CA"],
    );
}

/// A handshake between a host and a master of the intermediate, after the
/// intermediate revoked the host's certificate (`revoke_host`) or the master's,
/// once the revoked side's own files were written.
async fn attempt_after_revoking(revoke_host: bool) -> Outcome {
    let site = site();
    let (host, master) = site.host_and_master(KeyKind::RsaPkcs1);
    let write_bundle = || site.bundle("bundle", &Files::issue_input(&site, &host));
    let write_certs = || site.master("certs", &Files::issue_input(&site, &master));
    let (revoked, bundle, certs) = if revoke_host {
        (&host, write_bundle(), None)
    } else {
        (&master, PathBuf::new(), Some(write_certs()))
    };
    site.pki
        .revoke(&site.pki.intermediate, revoked)
        .expect("openssl ca -revoke");
    let (bundle, certs) = match certs {
        None => (bundle, write_certs()),
        Some(certs) => (write_bundle(), certs),
    };
    attempt_between(&bundle, &certs).await
}

#[tokio::test]
async fn host_revoked_by_the_intermediate_crl_is_refused_by_the_master() {
    let (client_result, _) = attempt_after_revoking(true).await;
    expect_refused(client_result, "revoked");
}

#[tokio::test]
async fn master_revoked_by_the_intermediate_crl_is_refused_by_the_agent() {
    let (client_result, server_result) = attempt_after_revoking(false).await;
    expect_refused(client_result, "certificate revoked");
    expect_server_refused(server_result, "revoked");
}

/// crl.pem holds only the root's CRL: the intermediate's leaves have no CRL to be
/// checked against, and the refusal names the leaf and the issuer lacking one.
#[tokio::test]
async fn a_missing_crl_for_the_issuer_is_named_on_both_sides() {
    let site = site();
    let (host, master) = site.host_and_master(KeyKind::RsaPkcs1);
    let root_crl = site.pki.crl(&site.pki.root).expect("root crl");

    // The master lacks the intermediate's CRL: it cannot vouch for the agent.
    let bundle = site.bundle("bundle", &Files::issue_input(&site, &host));
    let mut files = Files::issue_input(&site, &master);
    files.crls = vec![root_crl.clone()];
    let certs = site.master("certs", &files);
    let (client_result, _) = attempt_between(&bundle, &certs).await;
    let explained = expect_refused(client_result, "revocation status");
    assert_contains(
        &explained,
        &[
            "agent's certificate \"O=Example, CN=web-1\"",
            "no CRL from its issuer \"O=Example, CN=Example Intermediate CA\"",
            "Example Root CA",
            "crl.pem",
        ],
    );

    // The agent lacks it: the agent's own error names the master's certificate.
    let mut files = Files::issue_input(&site, &host);
    files.crls = vec![root_crl];
    let bundle = site.bundle("bundle-2", &files);
    let certs = site.master("certs-2", &Files::issue_input(&site, &master));
    let (client_result, server_result) = attempt_between(&bundle, &certs).await;
    let on_master = expect_refused(client_result, "crl.pem");
    assert!(on_master.contains("agent refused"), "{on_master}");
    let server_err = server_result.expect_err("agent refuses");
    let on_agent = explain_tls_error(&server_err).expect("explained");
    assert_contains(
        &on_agent,
        &[
            "master's certificate \"O=Example, CN=erel-master\"",
            "agent's crl.pem holds no CRL from its issuer \"O=Example, CN=Example Intermediate CA\"",
        ],
    );
    // The agent's log line shows the same sentence.
    assert!(
        server_err.to_string().contains("Example Intermediate CA"),
        "{server_err}"
    );
}

/// A CRL from a CA the bundle does not know cannot be authenticated and is refused
/// when the files are loaded; so is one that only borrows a known CA's name.
#[test]
fn a_crl_from_a_foreign_ca_is_refused_when_loaded() {
    let site = site();
    let (host, master) = site.host_and_master(KeyKind::RsaPkcs1);
    let foreign = Pki::new(&site.tmp.path().join("foreign"), "Foreign").expect("foreign PKI");
    let foreign_crl = foreign.crl(&foreign.intermediate).expect("foreign crl");

    let mut files = Files::issue_input(&site, &host);
    files.crls = vec![foreign_crl.clone()];
    let text = site.bundle_refusal("bundle", &files);
    assert_contains(
        &text,
        &[
            "crl.pem",
            "CRL #1 is issued by \"O=Foreign, CN=Foreign Intermediate CA\"",
            "not a CA of this bundle",
            "Example Root CA",
        ],
    );
    let mut files = Files::issue_input(&site, &master);
    files.crls = vec![
        site.pki.crl(&site.pki.intermediate).expect("crl"),
        foreign_crl,
    ];
    let text = site.master_refusal("certs", &files);
    assert_contains(&text, &["CRL #2", "Foreign Intermediate CA"]);

    // Same names, other keys: a look-alike PKI's intermediate CRL.
    let twin = Pki::new(&site.tmp.path().join("twin"), "Example").expect("twin PKI");
    let mut files = Files::issue_input(&site, &host);
    files.crls = vec![twin.crl(&twin.intermediate).expect("twin crl")];
    let text = site.bundle_refusal("bundle-twin", &files);
    assert_contains(
        &text,
        &["Example Intermediate CA", "signature does not verify"],
    );
}

/// A leaf whose intermediate is in neither file is refused when loaded, naming the
/// leaf and the missing issuer; an agent that sends only its leaf to a master
/// without the intermediate is refused at the handshake, naming the same.
#[tokio::test]
async fn a_leaf_without_its_intermediate_is_refused_with_a_clear_message() {
    let site = site();
    let (host, master) = site.host_and_master(KeyKind::RsaPkcs1);

    let mut files = Files::issue_input(&site, &host);
    files.chain = vec![&host.cert];
    let text = site.bundle_refusal("bundle", &files);
    assert_contains(
        &text,
        &[
            "host.pem",
            "\"O=Example, CN=web-1\" is issued by \"O=Example, CN=Example Intermediate CA\"",
            "neither in",
            "ca.pem",
            "append the intermediate",
        ],
    );
    let mut files = Files::issue_input(&site, &master);
    files.chain = vec![&master.cert];
    let text = site.master_refusal("certs", &files);
    assert_contains(
        &text,
        &["master.pem", "CN=erel-master", "Example Intermediate CA"],
    );

    // At the handshake: an agent (built by hand) presenting the leaf alone.
    let certs = site.master("certs-ok", &Files::issue_input(&site, &master));
    let leaf = CertificateDer::from_pem_file(&host.cert).expect("leaf");
    let key = PrivateKeyDer::from_pem_file(&host.key).expect("key");
    let server = rustls::ServerConfig::builder_with_provider(erel_certs::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_no_client_auth()
        .with_single_cert(vec![leaf], key)
        .expect("server");
    let (client_result, _) = attempt(
        Arc::new(server),
        certs.client_config().expect("master"),
        "web-1",
    )
    .await;
    let explained = expect_refused(client_result, "not signed by the cluster CA");
    assert_contains(
        &explained,
        &[
            "agent's certificate \"O=Example, CN=web-1\"",
            "issued by \"O=Example, CN=Example Intermediate CA\"",
            "sent 0 intermediate",
        ],
    );
}

/// Other ways a certificate file can be wrong: intermediate first, a leaf after
/// the leaf, a chain ending at a root that ca.pem does not hold.
#[test]
fn misordered_or_foreign_chains_are_refused_when_loaded() {
    let site = site();
    let host = site.host("web-1", KeyKind::EcP256Sec1);
    let other = site.host("web-2", KeyKind::EcP256Sec1);

    let mut files = Files::issue_input(&site, &host);
    files.chain = vec![&site.pki.intermediate.cert, &host.cert];
    let text = site.bundle_refusal("first-is-ca", &files);
    assert_contains(
        &text,
        &["host.pem", "first certificate", "is a CA certificate"],
    );

    let mut files = Files::issue_input(&site, &host);
    files.chain = vec![&host.cert, &other.cert, &site.pki.intermediate.cert];
    let text = site.bundle_refusal("two-leaves", &files);
    assert_contains(
        &text,
        &["certificate #2", "CN=web-2", "not a CA certificate"],
    );

    // The agent's ca.pem is another PKI's root; host.pem carries its own root.
    let foreign = Pki::new(&site.tmp.path().join("foreign"), "Foreign").expect("foreign PKI");
    let mut files = Files::issue_input(&site, &host);
    files.ca = vec![&foreign.root.cert];
    files.chain = vec![&host.cert, &site.pki.intermediate.cert, &site.pki.root.cert];
    files.crls = Vec::new();
    let text = site.bundle_refusal("foreign-root", &files);
    assert_contains(&text, &["ends at the root", "Example Root CA", "not in"]);
}

/// Keys: encrypted, of a curve erel cannot sign with, RSA-PSS, another certificate's, or no
/// key at all; each refused naming the key file and what to do.
#[test]
fn unusable_keys_are_refused_with_the_reason() {
    let site = site();
    let host = site.host("web-1", KeyKind::EcP256Sec1);
    let other = site.host("web-2", KeyKind::EcP256Pkcs8);
    let p521 = site.host("web-3", KeyKind::EcP521Pkcs8);
    let key = |name: &str| site.tmp.path().join(format!("{name}.key"));
    let (encrypted, traditional) = (key("encrypted"), key("traditional"));
    let (pss, pss_traditional) = (key("pss"), key("pss-traditional"));
    let host_key = path_str(&host.key);
    let encrypt = [
        "-aes256",
        "-passout",
        "pass:secret",
        "-in",
        host_key,
        "-out",
    ];
    run_openssl(&[&["pkey"][..], &encrypt, &[path_str(&encrypted)]].concat());
    // The traditional form: SEC1 with a "Proc-Type: 4,ENCRYPTED" header.
    run_openssl(&[&["ec"][..], &encrypt, &[path_str(&traditional)]].concat());
    assert!(fs::read_to_string(&traditional)
        .expect("key")
        .contains("Proc-Type: 4,ENCRYPTED"));
    // RSA-PSS: an RSA key of a usable size, but restricted to PSS; as PKCS#8, and
    // as the traditional form `openssl rsa -traditional` writes of it.
    let pss_options = "rsa_keygen_bits:2048";
    let pss_str = path_str(&pss);
    run_openssl(&[
        "genpkey",
        "-algorithm",
        "RSA-PSS",
        "-pkeyopt",
        pss_options,
        "-out",
        pss_str,
    ]);
    let pss_traditional_str = path_str(&pss_traditional);
    run_openssl(&[
        "rsa",
        "-traditional",
        "-in",
        pss_str,
        "-out",
        pss_traditional_str,
    ]);

    let pss_says: &[&str] = &["host.key", "RSA-PSS key", "genpkey -algorithm RSA "];
    let cases: [(&str, &Path, &[&str]); 7] = [
        (
            "encrypted",
            &encrypted,
            &["host.key", "encrypted", "openssl pkey"],
        ),
        ("traditional", &traditional, &["host.key", "encrypted"]),
        (
            "p521",
            &p521.key,
            &["host.key", "PKCS#8", "cannot be used", "P-256 or P-384"],
        ),
        ("pss", &pss, pss_says),
        ("pss-traditional", &pss_traditional, pss_says),
        (
            "mismatch",
            &other.key,
            &["host.key", "does not belong", "host.pem"],
        ),
        (
            "no-key",
            &host.cert,
            &[
                "host.key",
                "no private key",
                "a certificate",
                "BEGIN RSA PRIVATE KEY",
            ],
        ),
    ];
    for (name, key, says) in cases {
        // The P-521 key comes with its own certificate; the others pair with web-1's.
        let leaf = if name == "p521" { &p521 } else { &host };
        let mut files = Files::issue_input(&site, leaf);
        files.key = key;
        assert_contains(&site.bundle_refusal(name, &files), says);
    }
}

/// Runs the openssl command line, which must succeed.
fn run_openssl(args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl");
    assert!(out.status.success(), "{out:?}");
}

/// `erel certs host` may issue from an operator's intermediate kept as ca.pem and
/// ca.key: a PKCS#1 ca.key is refused with the command that converts it, and the
/// converted PKCS#8 key issues bundles that shake hands with the operator's master.
#[tokio::test]
async fn erel_certs_issues_from_an_operators_intermediate_with_a_pkcs8_key() {
    let site = site();
    let master = site.master_leaf("master", KeyKind::RsaPkcs1);
    let certs = site.master("certs", &Files::intermediate_in_ca_pem(&site, &master));
    let ca_key = certs.path().join(layout::CA_KEY);
    let openssl = run_openssl;
    let int_key = site.pki.intermediate.key.to_str().expect("utf-8");
    let ca_key_str = ca_key.to_str().expect("utf-8");
    openssl(&["rsa", "-traditional", "-in", int_key, "-out", ca_key_str]);
    assert!(fs::read_to_string(&ca_key)
        .expect("ca.key")
        .contains("BEGIN RSA PRIVATE KEY"));
    let text = parse_error(certs.issue_host("web-1", &[crate::helper::LOOPBACK], &[]));
    assert_contains(&text, &["ca.key", "PKCS#1 or SEC1", "openssl pkcs8 -topk8"]);

    openssl(&[
        "pkcs8", "-topk8", "-nocrypt", "-in", int_key, "-out", ca_key_str,
    ]);
    let bundle = certs
        .issue_host("web-1", &[crate::helper::LOOPBACK], &[])
        .expect("issue from the operator's intermediate");
    let (client_result, server_result) = attempt_between(&bundle, &certs).await;
    assert_eq!(client_result.expect("master side").echoed, 42);
    assert_eq!(
        server_result.expect("agent side").peer.as_deref(),
        Some("erel-master")
    );
}

/// A CA may sign with an algorithm that no handshake can verify (SHA-1, ECDSA with
/// SHA-512). A certificate or CRL so signed is refused when loaded, naming it and the
/// algorithm, rather than accepted and then failing every handshake, or blamed on a
/// re-keyed CA.
#[test]
fn signatures_no_handshake_can_verify_are_refused_when_loaded() {
    let site = site();
    let host = site.host("web-1", KeyKind::EcP256Sec1);

    // A leaf signed with SHA-1 by the RSA intermediate.
    let sha1 = site
        .pki
        .issue_host_signed_with(
            &site.pki.intermediate,
            "web-2",
            KeyKind::EcP256Sec1,
            "-sha1",
        )
        .expect("sha1 leaf");
    let text = parse_error(server_config(
        &site.bundle("sha1-leaf", &Files::issue_input(&site, &sha1)),
    ));
    assert_contains(
        &text,
        &[
            "host.pem",
            "\"O=Example, CN=web-2\" is signed by \"O=Example, CN=Example Intermediate CA\"",
            "sha1WithRSAEncryption",
            "no handshake can verify",
        ],
    );

    // A leaf signed with ECDSA and SHA-512 by the P-384 root (in ca.pem).
    let sha512 = site
        .pki
        .issue_host_signed_with(&site.pki.root, "web-3", KeyKind::EcP256Sec1, "-sha512")
        .expect("sha512 leaf");
    let mut files = Files::issue_input(&site, &sha512);
    files.chain = vec![&sha512.cert];
    files.crls = Vec::new();
    let text = site.bundle_refusal("sha512-leaf", &files);
    assert_contains(
        &text,
        &[
            "host.pem",
            "CN=web-3",
            "ecdsa-with-SHA512",
            "no handshake can verify",
        ],
    );
    assert!(!text.contains("re-keyed"), "{text}");

    // CRLs: SHA-1 from the RSA intermediate, SHA-512 from the ECDSA root.
    for (name, crl) in [
        (
            "sha1WithRSAEncryption",
            site.pki.crl_signed_with(&site.pki.intermediate, "sha1"),
        ),
        (
            "ecdsa-with-SHA512",
            site.pki.crl_signed_with(&site.pki.root, "sha512"),
        ),
    ] {
        let mut files = Files::issue_input(&site, &host);
        files.crls.push(crl.expect("crl"));
        let text = site.bundle_refusal(&format!("crl-{name}"), &files);
        assert_contains(&text, &["crl.pem", "CRL #2", name, "-md sha256"]);

        let master = site.master_leaf(&format!("master-{name}"), KeyKind::EcP256Pkcs8);
        let mut files = Files::issue_input(&site, &master);
        files.crls = vec![site
            .pki
            .crl_signed_with(&site.pki.intermediate, "sha1")
            .expect("crl")];
        let text = parse_error(
            site.master(&format!("certs-{name}"), &files)
                .client_config(),
        );
        assert_contains(&text, &["crl.pem", "CRL #1", "sha1WithRSAEncryption"]);
    }
}

/// Hosts and masters from different intermediates: each side needs the CRL of the
/// other side's intermediate, which it can only authenticate with that intermediate
/// in its ca.pem. With ca.pem holding the root alone the CRL is refused, saying to
/// add the intermediate; with it, the sides shake hands and revocation applies.
#[tokio::test]
async fn hosts_and_masters_from_different_intermediates() {
    let site = site();
    let masters_ca = site
        .pki
        .issue_intermediate("masters", "/O=Example/CN=Example Masters CA")
        .expect("masters intermediate");
    let host = site.host("web-1", KeyKind::EcP256Sec1);
    let master = site
        .pki
        .issue_master(&masters_ca, "master", KeyKind::Ed25519)
        .expect("master");
    let masters_crl = site.pki.crl(&masters_ca).expect("masters crl");
    let hosts_crl = site.pki.crl(&site.pki.intermediate).expect("hosts crl");

    let root_only = Files {
        ca: vec![&site.pki.root.cert],
        chain: vec![&host.cert, &site.pki.intermediate.cert],
        key: &host.key,
        crls: vec![masters_crl.clone()],
    };
    let text = parse_error(server_config(&site.bundle("root-only", &root_only)));
    assert_contains(
        &text,
        &[
            "crl.pem",
            "Example Masters CA",
            "add its certificate to ca.pem",
        ],
    );

    let bundle = site.bundle(
        "bundle",
        &Files {
            ca: vec![&site.pki.root.cert, &masters_ca.cert],
            chain: vec![&host.cert, &site.pki.intermediate.cert],
            key: &host.key,
            crls: vec![masters_crl],
        },
    );
    let certs = site.master(
        "certs",
        &Files {
            ca: vec![&site.pki.root.cert, &site.pki.intermediate.cert],
            chain: vec![&master.cert, &masters_ca.cert],
            key: &master.key,
            crls: vec![hosts_crl],
        },
    );
    expect_echoed(attempt_between(&bundle, &certs).await);

    site.pki.revoke(&masters_ca, &master).expect("revoke");
    fs::write(
        bundle.join(layout::CRL_PEM),
        site.pki.crl(&masters_ca).expect("crl"),
    )
    .expect("crl.pem");
    let (client_result, _) = attempt_between(&bundle, &certs).await;
    expect_refused(client_result, "certificate revoked");
}

/// A CRL the verifier cannot take (here an indirect one) is blamed on crl.pem and
/// named, not on ca.pem, on both sides.
#[test]
fn a_crl_of_a_kind_the_verifier_does_not_take_is_named() {
    let site = site();
    let (host, master) = site.host_and_master(KeyKind::EcP256Pkcs8);
    let indirect = site
        .pki
        .indirect_crl(&site.pki.intermediate)
        .expect("indirect crl");
    let mut files = Files::issue_input(&site, &host);
    files.crls = vec![
        site.pki.crl(&site.pki.root).expect("root crl"),
        indirect.clone(),
    ];
    let text = site.bundle_refusal("bundle", &files);
    assert_contains(&text, &["crl.pem", "CRL #2", "IndirectCrl", "indirect"]);
    assert!(!text.contains("ca.pem"), "{text}");

    let mut files = Files::issue_input(&site, &master);
    files.crls = vec![indirect];
    let text = site.master_refusal("certs", &files);
    assert_contains(&text, &["crl.pem", "CRL #1", "IndirectCrl"]);
}
