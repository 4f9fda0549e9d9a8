//! Revocation: what `crl.pem` may hold and how it is used.
//!
//! # Policy
//!
//! * `crl.pem` holds one or more CRLs (RFC 5280 section 5), one per issuing CA:
//!   with an operator's PKI, the CRL of each intermediate that issues host or
//!   master certificates, and the root's too if it issues any directly.
//! * Each CRL must be signed by a CA the bundle knows: a certificate in `ca.pem`,
//!   or an intermediate in the chain of the bundle's own certificate. Its issuer
//!   must allow CRL signing (keyUsage cRLSign, when the extension is present), and
//!   no two CRLs may come from the same CA, and it must be signed with an algorithm
//!   the handshake verifies (`signatures`). Anything else is refused when the files
//!   are loaded, naming the CRL's issuer: a CRL that cannot be authenticated
//!   cannot be trusted to say that a certificate is *not* revoked.
//! * Only the peer's own (end-entity) certificate is checked, against the CRL of
//!   the CA that issued it (rustls-webpki `RevocationCheckDepth::EndEntity`).
//!   Intermediates are not checked: an intermediate is withdrawn by taking it, or
//!   its root, out of `ca.pem`.
//! * When `crl.pem` is present and holds no CRL from the CA that issued a peer's
//!   certificate, the status is unknown and the peer is refused
//!   (`UnknownStatusPolicy::Deny`); the error names the certificate and its issuer.
//! * A CRL's nextUpdate is not enforced (`ExpirationPolicy::Ignore`): a CRL is
//!   replaced when something is revoked, not on a schedule, and an agent must not
//!   lock every master out the day a CRL job fails. A CRL past its nextUpdate is
//!   still used, with a warning each time it is loaded, since a CA that publishes
//!   on a schedule may have revoked more since.
//! * Without `crl.pem` an agent checks no revocation; the master always needs one.

use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer};

use crate::chain::{name, parse_all, Parsed};
use crate::error::{Error, Result};

/// The CRLs of `crl.pem`, authenticated, and the names of their issuers (for
/// messages about a certificate whose issuer has none).
#[derive(Debug, Default)]
pub(crate) struct Crls {
    /// The CRLs, DER, in file order.
    pub(crate) ders: Vec<CertificateRevocationListDer<'static>>,
    /// Each CRL's issuer, as [`name`] writes it.
    pub(crate) issuers: Vec<String>,
}

/// Reads every CRL of `path` and checks each against `cas` (the certificates of
/// `ca.pem` and the intermediates of the bundle's own chain), as the module docs
/// describe.
///
/// Errors: [`Error::Missing`] when the file does not exist; [`Error::Parse`] naming
/// `path` when it holds no CRL, a malformed one, one from a CA not in `cas`, one
/// whose signature does not verify, one from a CA without cRLSign, or two from the
/// same CA.
pub(crate) fn load(path: &Path, cas: &[CertificateDer<'static>]) -> Result<Crls> {
    parse(path, &crate::files::read(path)?, cas)
}

/// As [`load`], from PEM text already read; `path` names where it came from.
pub(crate) fn parse(path: &Path, pem: &[u8], cas: &[CertificateDer<'static>]) -> Result<Crls> {
    let ders = CertificateRevocationListDer::pem_slice_iter(pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| crate::tls::pem_error(path, e))?;
    if ders.is_empty() {
        return Err(Error::parse(
            path,
            "no CRL (\"X509 CRL\" PEM section) in this file",
        ));
    }
    let cas = parse_all(path, cas)?;
    let mut issuers: Vec<(Vec<u8>, String)> = Vec::new();
    for (i, der) in ders.iter().enumerate() {
        let which = format!("CRL #{}", i + 1);
        let (_, crl) = x509_parser::parse_x509_crl(der.as_ref())
            .map_err(|e| Error::parse(path, format!("{which} is not a valid CRL: {e}")))?;
        let issuer = name(crl.issuer());
        if !crate::signatures::verifiable(der.as_ref()) {
            return Err(Error::parse(
                path,
                format!(
                    "{which} is signed by {issuer} with {}, which no handshake can verify ({}); have {issuer} make it again with one of those (openssl ca -gencrl -md sha256)",
                    crate::signatures::describe(&crl.signature_algorithm),
                    crate::signatures::ACCEPTED,
                ),
            ));
        }
        let raw = crl.issuer().as_raw().to_vec();
        let Some(ca) = cas.iter().find(|ca| ca.cert.subject().as_raw() == raw) else {
            return Err(Error::parse(
                path,
                format!(
                    "{which} is issued by {issuer}, which is not a CA of this bundle ({}); a CRL is only trusted from a CA in ca.pem or in the chain of the bundle's own certificate: if {issuer} is an intermediate CA that issues the peers' certificates (the hosts' on the master, the masters' on an agent), add its certificate to ca.pem",
                    known(&cas)
                ),
            ));
        };
        if crl.verify_signature(ca.cert.public_key()).is_err() {
            return Err(Error::parse(
                path,
                format!(
                    "{which} claims to be from {issuer}, but its signature does not verify with that CA's key (a CRL of another CA with the same name, or a damaged file?)"
                ),
            ));
        }
        if let Ok(Some(usage)) = ca.cert.key_usage() {
            if !usage.value.crl_sign() {
                return Err(Error::parse(
                    path,
                    format!("{which} is issued by {issuer}, whose certificate does not allow signing CRLs (its keyUsage lacks cRLSign)"),
                ));
            }
        }
        if issuers.iter().any(|(seen, _)| *seen == raw) {
            return Err(Error::parse(
                path,
                format!(
                    "{which} is the second CRL from {issuer}; keep only the newest CRL of each CA"
                ),
            ));
        }
        if let Some(next) = crl.next_update() {
            if next < x509_parser::time::ASN1Time::now() {
                tracing::warn!(
                    path = %path.display(),
                    crl = %which,
                    issuer = %issuer,
                    next_update = %next,
                    "CRL is past its nextUpdate: still used (nextUpdate is not enforced), but whatever its CA revoked since is not known here; put a fresh CRL from this CA in crl.pem"
                );
            }
        }
        issuers.push((raw, issuer));
    }
    Ok(Crls {
        ders,
        issuers: issuers.into_iter().map(|(_, name)| name).collect(),
    })
}

/// The CAs known to a bundle, for messages: `"CN=a", "CN=b"`.
fn known(cas: &[Parsed<'_>]) -> String {
    let names: Vec<String> = cas.iter().map(|ca| name(ca.cert.subject())).collect();
    if names.is_empty() {
        "it knows no CA".to_string()
    } else {
        format!("it knows {}", names.join(", "))
    }
}

/// Why a peer's certificate has an unknown revocation status: it names the
/// certificate, its issuer, and the CAs whose CRLs `crl.pem` does hold. `peer` is
/// "agent" or "master"; `own` is the side that refused.
pub(crate) fn describe_unknown_status(
    end_entity: &CertificateDer<'_>,
    crl_issuers: &[String],
    peer: &str,
    own: &str,
) -> String {
    let (subject, issuer) = match x509_parser::parse_x509_certificate(end_entity.as_ref()) {
        Ok((_, cert)) => (name(cert.subject()), name(cert.issuer())),
        Err(_) => ("(unparsable)".to_string(), "its issuer".to_string()),
    };
    let held = if crl_issuers.is_empty() {
        "none".to_string()
    } else {
        crl_issuers.join(", ")
    };
    format!(
        "the revocation status of the {peer}'s certificate {subject} is unknown: the {own}'s crl.pem holds no CRL from its issuer {issuer} (it holds CRLs from {held}); add the CRL of {issuer} to crl.pem"
    )
}
