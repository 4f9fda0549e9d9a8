//! Real mutual-TLS handshakes over 127.0.0.1, one good and many refused.

use std::path::Path;
use std::sync::Arc;

use erel_certs::{
    bundle_fingerprint, client_config_from, explain_tls_error, layout, server_config, testing,
    MasterDir,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::helper::{
    attempt, attempt_between, expect_exchanged, expect_refused, expect_server_refused, pki,
    Outcome, Pki,
};

/// [`attempt`] by a master presenting the certificate `odd` (which trusts the
/// CA it names) to the agent on `pki`'s bundle.
async fn attempt_presenting(pki: &Pki, odd: &testing::CertFiles) -> Outcome {
    let server = server_config(&pki.bundle).expect("server config");
    let client = client_config_from(&odd.ca, &odd.cert, &odd.key, None).expect("client");
    attempt(server, client, "web-1").await
}

#[tokio::test]
async fn master_and_agent_complete_a_mutual_tls_exchange() {
    let pki = pki("web-1");
    let server = server_config(&pki.bundle).expect("server config");
    let client = pki.master.client_config().expect("client config");

    expect_exchanged(attempt(server, client, "web-1").await, "web-1");
}

#[tokio::test]
async fn the_master_and_agent_settle_on_aes_128_gcm() {
    let pki = pki("web-1");
    let server = server_config(&pki.bundle).expect("server config");
    let client = pki.master.client_config().expect("client config");

    let (client_result, server_result) = attempt(server, client, "web-1").await;

    let aes_128 = Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    assert_eq!(client_result.expect("master side").suite, aes_128);
    assert_eq!(server_result.expect("agent side").suite, aes_128);
}

/// The agent takes the master's order: a master that prefers another suite (an older
/// build, ring's default order) or offers only one still gets it.
#[tokio::test]
async fn the_agent_takes_the_suite_the_master_prefers() {
    use rustls::crypto::ring::cipher_suite as suites;
    let pki = pki("web-1");
    for (offered, wanted) in [
        (
            vec![
                suites::TLS13_AES_256_GCM_SHA384,
                suites::TLS13_AES_128_GCM_SHA256,
            ],
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
        ),
        (
            vec![suites::TLS13_CHACHA20_POLY1305_SHA256],
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
        ),
    ] {
        let server = server_config(&pki.bundle).expect("server config");
        let ours = pki.master.client_config().expect("client config");
        let provider = rustls::crypto::CryptoProvider {
            cipher_suites: offered,
            ..rustls::crypto::ring::default_provider()
        };
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls13")
            .with_root_certificates(cluster_roots(&pki))
            .with_client_cert_resolver(ours.client_auth_cert_resolver.clone());
        let (client_result, server_result) = attempt(server, Arc::new(client), "web-1").await;
        assert_eq!(client_result.expect("master side").suite, Some(wanted));
        assert_eq!(server_result.expect("agent side").suite, Some(wanted));
    }
}

/// The cluster CA of `pki`, as a plain rustls root store.
fn cluster_roots(pki: &Pki) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(pki.master.ca_pem()).expect("ca.pem") {
        roots.add(cert.expect("cert")).expect("root");
    }
    roots
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let pki = pki("web-1");
    let server = server_config(&pki.bundle).expect("server config");
    let roots = cluster_roots(&pki);
    let client = rustls::ClientConfig::builder_with_provider(erel_certs::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_root_certificates(roots)
        .with_no_client_auth();

    let (client_result, server_result) = attempt(server, Arc::new(client), "web-1").await;

    expect_refused(client_result, "no client certificate");
    expect_server_refused(server_result, "presented no certificate");
}

#[tokio::test]
async fn client_certificate_from_another_ca_is_refused() {
    let pki = pki("web-1");
    let server = server_config(&pki.bundle).expect("server config");
    let foreign = testing::foreign_client(&pki.scratch("foreign")).expect("foreign cert");
    // Trust the real cluster CA for the agent, but present the foreign certificate.
    let client = client_config_from(&pki.master.ca_pem(), &foreign.cert, &foreign.key, None)
        .expect("client");

    let (client_result, server_result) = attempt(server, client, "web-1").await;

    let explained = expect_refused(client_result, "unknown CA");
    assert!(
        explained.contains("signed by the cluster CA"),
        "{explained}"
    );
    expect_server_refused(server_result, "not signed by the cluster CA");
}

#[tokio::test]
async fn agent_with_another_host_id_is_refused_by_the_master() {
    let pki = pki("web-1");
    let server = server_config(&pki.bundle).expect("server config");
    let client = pki.master.client_config().expect("client config");

    let (client_result, server_result) = attempt(server, client, "web-2").await;

    let explained = expect_refused(client_result, "does not name host 'web-2'");
    assert!(
        explained.contains("(it names DNS:web-1, IP:127.0.0.1)"),
        "names as openssl writes them: {explained}"
    );
    assert!(
        server_result.is_err(),
        "the server must not complete either"
    );
}

/// A master presenting a certificate `make` writes (from the cluster CA, but one
/// no real master has) is refused by the agent, and the master hears `expected`.
async fn odd_client_is_refused(
    make: fn(&MasterDir, &Path) -> erel_certs::Result<testing::CertFiles>,
    expected: &str,
) {
    let pki = pki("web-1");
    let odd = make(&pki.master, &pki.scratch("odd")).expect("cert");
    let (client_result, server_result) = attempt_presenting(&pki, &odd).await;

    expect_refused(client_result, expected);
    assert!(server_result.is_err());
}

#[tokio::test]
async fn expired_client_certificate_is_refused() {
    odd_client_is_refused(testing::expired_client, "certificate expired").await;
}

#[tokio::test]
async fn client_certificate_without_client_auth_is_refused() {
    odd_client_is_refused(testing::client_without_client_auth, "clientAuth").await;
}

#[tokio::test]
async fn revoked_master_certificate_is_refused_after_reload() {
    let pki = pki("web-1");
    let before = bundle_fingerprint(&pki.bundle);
    pki.master.revoke("master").expect("revoke master");
    let after = bundle_fingerprint(&pki.bundle);
    assert_ne!(
        before, after,
        "the bundle's crl.pem changed; a server must notice"
    );

    let (client_result, server_result) = attempt_between(&pki.bundle, &pki.master).await;

    expect_refused(client_result, "certificate revoked");
    expect_server_refused(server_result, "revoked");

    // A new master certificate gets in again.
    pki.master.reissue_master().expect("reissue master");
    let (client_result, _) = attempt_between(&pki.bundle, &pki.master).await;
    assert_eq!(client_result.expect("new master certificate").echoed, 42);
}

#[tokio::test]
async fn revoked_host_certificate_is_refused_by_the_master() {
    let pki = pki("web-1");
    // The agent still runs with its (now revoked) certificate.
    let server = server_config(&pki.bundle).expect("server config");
    pki.master.revoke("web-1").expect("revoke web-1");
    let client = pki.master.client_config().expect("client config");

    let (client_result, _) = attempt(server, client, "web-1").await;

    expect_refused(client_result, "revoked");

    // Re-issuing gives a new serial, which is not revoked.
    let bundle = pki
        .master
        .replace_host("web-1", &[crate::helper::LOOPBACK], &[])
        .expect("re-issue");
    let (client_result, _) = attempt_between(&bundle, &pki.master).await;
    assert_eq!(client_result.expect("re-issued host").echoed, 42);
}

#[tokio::test]
async fn agent_certificate_from_another_ca_is_refused_by_the_master() {
    let pki = pki("web-1");
    let foreign = testing::foreign_host_bundle("web-1", &pki.scratch("foreign")).expect("bundle");
    let (client_result, _) =
        attempt_between(foreign.cert.parent().expect("dir"), &pki.master).await;

    expect_refused(client_result, "not signed by the cluster CA");
}

#[tokio::test]
async fn expired_agent_certificate_is_refused_by_the_master() {
    let pki = pki("web-1");
    let dir = pki.scratch("expired-host");
    testing::expired_host_bundle(&pki.master, "web-1", &dir).expect("bundle");
    let (client_result, _) = attempt_between(&dir, &pki.master).await;

    expect_refused(client_result, "expired");
}

#[tokio::test]
async fn agent_without_crl_still_verifies_clients() {
    let pki = pki("web-1");
    std::fs::remove_file(pki.bundle.join(layout::CRL_PEM)).expect("remove crl");
    let (client_result, _) = attempt_between(&pki.bundle, &pki.master).await;
    assert_eq!(client_result.expect("exchange").echoed, 42);

    let foreign = testing::foreign_client(&pki.scratch("foreign")).expect("foreign cert");
    let server = server_config(&pki.bundle).expect("server config without crl");
    let client = client_config_from(&pki.master.ca_pem(), &foreign.cert, &foreign.key, None)
        .expect("client");
    let (client_result, _) = attempt(server, client, "web-1").await;
    expect_refused(client_result, "unknown CA");
}

#[test]
fn non_tls_errors_are_not_explained() {
    let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
    assert_eq!(explain_tls_error(&refused), None);
    let other = std::io::Error::other("something else");
    assert_eq!(explain_tls_error(&other), None);
    let garbage = std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        rustls::Error::General("x".into()),
    );
    assert_eq!(explain_tls_error(&garbage), None);
}
