//! Turning TLS authentication failures into sentences an operator can act on.
//!
//! Under TLS 1.3 the client finishes its side of the handshake before the server
//! has judged the client's certificate, so a master whose certificate is refused
//! usually learns it on its first read, as an `io::Error` wrapping
//! `rustls::Error::AlertReceived(..)`. The wording is the master's point of view
//! (the master is the TLS client, the agent the server).

use std::error::Error as StdError;

use rustls::{AlertDescription, CertificateError, Error as TlsError};

use crate::verify::PeerRefusal;

/// Explains an I/O error from a TLS connection if it is a TLS authentication or
/// negotiation problem (a refused, unknown, expired or revoked certificate, a
/// wrong host name, an incompatible TLS version); `None` for anything else, such
/// as a refused TCP connection or a timeout.
pub fn explain_tls_error(err: &std::io::Error) -> Option<String> {
    let mut source: Option<&(dyn StdError + 'static)> = err.get_ref().map(|e| e as _);
    while let Some(e) = source {
        if let Some(tls) = e.downcast_ref::<TlsError>() {
            return explain_rustls_error(tls);
        }
        source = e.source();
    }
    None
}

/// Explains a [`rustls::Error`] as [`explain_tls_error`] does.
pub(crate) fn explain_rustls_error(err: &TlsError) -> Option<String> {
    match err {
        TlsError::AlertReceived(alert) => explain_alert(*alert),
        TlsError::InvalidCertificate(cert) => Some(explain_peer_certificate(cert)),
        TlsError::NoCertificatesPresented => {
            Some("the peer presented no certificate (a certificate signed by the cluster CA is required)".into())
        }
        TlsError::PeerIncompatible(why) => Some(format!(
            "the peer cannot speak TLS 1.3 with us ({why:?}); erel requires TLS 1.3"
        )),
        TlsError::InvalidCertRevocationList(why) => Some(format!(
            "the certificate revocation list (crl.pem) is unusable: {why:?}"
        )),
        _ => None,
    }
}

const NOT_CLUSTER: &str = "is this master's certificate signed by the cluster CA?";

fn explain_alert(alert: AlertDescription) -> Option<String> {
    let refused = "the agent refused our certificate";
    let text = match alert {
        AlertDescription::CertificateRequired => {
            "the agent refused us: no client certificate was presented (the agent requires the master's certificate)".to_string()
        }
        AlertDescription::UnknownCA => format!(
            "{refused}: unknown CA (is this master's certificate signed by the cluster CA, and does master.pem carry the intermediate CAs after it?)"
        ),
        AlertDescription::BadCertificate => format!("{refused}: bad certificate ({NOT_CLUSTER})"),
        AlertDescription::CertificateRevoked => format!(
            "{refused}: certificate revoked (issue a new master certificate)"
        ),
        AlertDescription::CertificateExpired => format!(
            "{refused}: certificate expired or not yet valid (check its dates and both clocks)"
        ),
        AlertDescription::UnsupportedCertificate => format!(
            "{refused}: certificate not allowed for client authentication (it lacks the clientAuth extended key usage)"
        ),
        AlertDescription::DecryptError => {
            format!("{refused}: a signature did not verify ({NOT_CLUSTER})")
        }
        AlertDescription::CertificateUnknown => format!(
            "{refused}: certificate not accepted (the agent's log names the reason; does the agent's crl.pem hold a CRL from the CA that issued this master's certificate? {NOT_CLUSTER})"
        ),
        AlertDescription::AccessDenied => {
            format!("{refused}: certificate not accepted ({NOT_CLUSTER})")
        }
        AlertDescription::ProtocolVersion => {
            "the peer refused our TLS version (erel speaks TLS 1.3 only)".to_string()
        }
        AlertDescription::HandshakeFailure | AlertDescription::InsufficientSecurity => {
            "TLS handshake failure: no common cipher suite or key exchange (erel uses TLS 1.3 with the ring provider)".to_string()
        }
        _ => return None,
    };
    Some(text)
}

fn explain_peer_certificate(err: &CertificateError) -> String {
    match err {
        CertificateError::NotValidForNameContext {
            expected,
            presented,
        } => {
            let expected = expected.to_str();
            if presented.is_empty() {
                format!("the agent's certificate does not name host '{expected}'")
            } else {
                format!(
                    "the agent's certificate does not name host '{expected}' (it names {})",
                    certificate_names(presented)
                )
            }
        }
        CertificateError::NotValidForName => {
            "the agent's certificate does not name the host we expected".to_string()
        }
        CertificateError::UnknownIssuer => {
            "the peer's certificate is not signed by the cluster CA (unknown CA)".to_string()
        }
        CertificateError::Revoked => "the peer's certificate is revoked (listed in crl.pem)".to_string(),
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            "the peer's certificate expired".to_string()
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            "the peer's certificate is not valid yet (check the clocks)".to_string()
        }
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            "the peer's certificate is not issued for this use (wrong extended key usage: agents need serverAuth, the master clientAuth)".to_string()
        }
        CertificateError::UnknownRevocationStatus => {
            "the peer's revocation status is unknown (crl.pem holds no CRL from the CA that issued its certificate)".to_string()
        }
        CertificateError::Other(other) => match other.0.downcast_ref::<PeerRefusal>() {
            Some(refusal) => refusal.to_string(),
            None => format!("the peer's certificate is not acceptable: {other}"),
        },
        CertificateError::ExpiredRevocationList
        | CertificateError::ExpiredRevocationListContext { .. } => {
            "the certificate revocation list (crl.pem) has expired".to_string()
        }
        CertificateError::BadSignature => {
            "the peer's certificate has a bad signature (not signed by the cluster CA?)".to_string()
        }
        other => format!("the peer's certificate is not acceptable: {other}"),
    }
}

/// The subject alternative names a certificate presents, as openssl and operators
/// write them: `DNS:web-1, IP:127.0.0.1` (RFC 5280 section 4.2.1.6 GeneralName kinds:
/// `DNS:`, `IP:`, `URI:`; others as given).
///
/// `presented` is what rustls reports in
/// [`CertificateError::NotValidForNameContext`]: webpki's `Debug` text of each
/// name, `DnsName("web-1")` or `IpAddress(127.0.0.1)`.
pub fn certificate_names(presented: &[String]) -> String {
    presented
        .iter()
        .map(|name| certificate_name(name))
        .collect::<Vec<_>>()
        .join(", ")
}

fn certificate_name(presented: &str) -> String {
    let kinds = [
        ("DnsName(", "DNS:"),
        ("IpAddress(", "IP:"),
        ("UniformResourceIdentifier(", "URI:"),
    ];
    for (debug, prefix) in kinds {
        if let Some(inner) = presented
            .strip_prefix(debug)
            .and_then(|rest| rest.strip_suffix(')'))
        {
            let inner = inner
                .strip_prefix('"')
                .and_then(|i| i.strip_suffix('"'))
                .unwrap_or(inner);
            return format!("{prefix}{}", inner.escape_debug());
        }
    }
    presented.escape_debug().to_string()
}

#[cfg(test)]
mod name_tests {
    use super::certificate_names;

    #[test]
    fn names_read_as_openssl_writes_them() {
        let presented = [
            "DnsName(\"web-1\")".to_string(),
            "IpAddress(127.0.0.1)".to_string(),
            "IpAddress(::1)".to_string(),
            "UniformResourceIdentifier(\"spiffe://x\")".to_string(),
            "DirectoryName".to_string(),
        ];
        assert_eq!(
            certificate_names(&presented),
            "DNS:web-1, IP:127.0.0.1, IP:::1, URI:spiffe://x, DirectoryName"
        );
    }

    #[test]
    fn control_characters_in_a_name_are_escaped() {
        let presented = ["DnsName(\"evil\nline\")".to_string()];
        assert_eq!(certificate_names(&presented), "DNS:evil\\nline");
    }
}
