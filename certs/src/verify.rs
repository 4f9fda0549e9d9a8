//! The peer verifiers of both ends: rustls-webpki's, with erel's revocation
//! policy (see `revocation`), and refusals that name the certificate at fault.
//!
//! rustls reports "unknown issuer" and "unknown revocation status" without saying
//! which certificate or which CA. These wrappers leave every decision to
//! [`WebPkiServerVerifier`] and [`rustls::server::WebPkiClientVerifier`] and only replace those two
//! errors with a [`PeerRefusal`] that names the peer's certificate and the issuer
//! it lacks (a CRL from it, or its certificate). `explain::explain_rustls_error`
//! shows that text.
//!
//! On the agent's side only the revocation error is replaced: a replaced error is
//! sent to the master as a `certificate_unknown` alert, and "unknown issuer" keeps
//! its more telling `unknown_ca` alert.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error as TlsError, OtherError,
    SignatureScheme,
};

/// A refused peer certificate, explained: which certificate, which issuer, what
/// is missing. Carried in `CertificateError::Other`.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct PeerRefusal {
    /// The whole explanation.
    pub(crate) message: String,
}

/// rustls shows `CertificateError::Other` with `Debug` (in the agent's log line of
/// a refused handshake, for instance), so `Debug` is the plain sentence too.
impl std::fmt::Debug for PeerRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::fmt::Display for PeerRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PeerRefusal {}

fn refusal(message: String) -> TlsError {
    TlsError::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(PeerRefusal {
        message,
    }))))
}

/// Replaces the two errors rustls reports without naming a certificate by a
/// [`PeerRefusal`] that does. `peer` is what the refused certificate belongs to,
/// `own` the side that refuses it. Without `intermediates` (the agent's side)
/// "unknown issuer" stays as it is, with its `unknown_ca` alert.
fn explain(
    error: TlsError,
    end_entity: &CertificateDer<'_>,
    intermediates: Option<&[CertificateDer<'_>]>,
    crl_issuers: &[String],
    (peer, own): (&str, &str),
) -> TlsError {
    match (error, intermediates) {
        (TlsError::InvalidCertificate(CertificateError::UnknownRevocationStatus), _) => refusal(
            crate::revocation::describe_unknown_status(end_entity, crl_issuers, peer, own),
        ),
        (TlsError::InvalidCertificate(CertificateError::UnknownIssuer), Some(intermediates)) => {
            refusal(crate::chain::describe_unknown_issuer(
                end_entity,
                intermediates,
                peer,
                own,
            ))
        }
        (other, _) => other,
    }
}

/// The signature checks both verifiers leave to the one they wrap, unchanged.
macro_rules! delegate_signature_checks {
    () => {
        delegate_signature_checks!(verify_tls12_signature, verify_tls13_signature);

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.inner.supported_verify_schemes()
        }
    };
    ($($check:ident),+) => {
        $(
            fn $check(
                &self,
                message: &[u8],
                cert: &CertificateDer<'_>,
                dss: &DigitallySignedStruct,
            ) -> Result<HandshakeSignatureValid, TlsError> {
                self.inner.$check(message, cert, dss)
            }
        )+
    };
}

/// The master's verifier of agents.
#[derive(Debug)]
pub(crate) struct AgentVerifier {
    pub(crate) inner: Arc<WebPkiServerVerifier>,
    /// Issuers of the CRLs the master holds.
    pub(crate) crl_issuers: Vec<String>,
}

impl ServerCertVerifier for AgentVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .map_err(|e| {
                let sides = ("agent", "master");
                explain(e, end_entity, Some(intermediates), &self.crl_issuers, sides)
            })
    }

    delegate_signature_checks!();
}

/// The agent's verifier of masters.
#[derive(Debug)]
pub(crate) struct MasterVerifier {
    pub(crate) inner: Arc<dyn ClientCertVerifier>,
    /// Issuers of the CRLs the agent holds.
    pub(crate) crl_issuers: Vec<String>,
}

impl ClientCertVerifier for MasterVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(|e| explain(e, end_entity, None, &self.crl_issuers, ("master", "agent")))
    }

    delegate_signature_checks!();
}
