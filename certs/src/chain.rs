//! Certificate chains: from a bundle's own certificate up to a CA it trusts.
//!
//! A certificate file (`host.pem`, `master.pem`) starts with the certificate of
//! the host or master itself and may go on with the intermediate CA certificates
//! that issued it, in any order. `ca.pem` holds the CAs a bundle trusts: the root,
//! and intermediates too if the operator prefers to keep them there. Every
//! certificate in `ca.pem` is a trust anchor (RFC 5280 section 6.1.1 (d) leaves the
//! choice of anchors to the relying party).
//!
//! When a configuration is built, the bundle's own chain is checked once, without
//! regard to dates, so that a missing or wrong intermediate is reported when the
//! files are loaded, naming the certificate whose issuer cannot be found, rather
//! than as an "unknown CA" at every handshake. The chain then sent to peers is the
//! path found: the certificate, its intermediates in order, and the intermediates
//! of `ca.pem` above them (never a self-signed root), so a peer whose `ca.pem` holds
//! only the root can still verify it.

use std::path::Path;

use rustls::pki_types::CertificateDer;
use x509_parser::certificate::X509Certificate;
use x509_parser::x509::X509Name;

use crate::error::{Error, Result};

/// The longest chain accepted, certificate and anchor included.
const MAX_CHAIN: usize = 8;

/// One certificate, parsed, with its DER.
pub(crate) struct Parsed<'a> {
    pub(crate) der: &'a CertificateDer<'static>,
    pub(crate) cert: X509Certificate<'a>,
}

/// Parses every certificate of `file`; an unparsable one is an error naming its
/// position in the file.
pub(crate) fn parse_all<'a>(
    file: &Path,
    certs: &'a [CertificateDer<'static>],
) -> Result<Vec<Parsed<'a>>> {
    certs
        .iter()
        .enumerate()
        .map(|(i, der)| {
            x509_parser::parse_x509_certificate(der.as_ref())
                .map(|(_, cert)| Parsed { der, cert })
                .map_err(|e| {
                    Error::parse(
                        file,
                        format!(
                            "certificate #{} is not a valid X.509 certificate: {e}",
                            i + 1
                        ),
                    )
                })
        })
        .collect()
}

/// A distinguished name as operators read it, quoted: `"CN=web-1, O=Example"`.
pub(crate) fn name(name: &X509Name<'_>) -> String {
    let text = name.to_string();
    if text.is_empty() {
        "(an empty name)".to_string()
    } else {
        format!("\"{text}\"")
    }
}

/// A file's name without its directory, for sentences about a bundle whose
/// directory the error already names.
fn short(path: &Path) -> std::path::Display<'_> {
    Path::new(path.file_name().unwrap_or(path.as_os_str())).display()
}

/// Whether `parent`'s key signed `child` (names match and the signature verifies).
pub(crate) fn signed_by(child: &X509Certificate<'_>, parent: &X509Certificate<'_>) -> bool {
    child.issuer().as_raw() == parent.subject().as_raw()
        && child.verify_signature(Some(parent.public_key())).is_ok()
}

/// Whether `cert` is a self-signed root.
fn self_signed(cert: &X509Certificate<'_>) -> bool {
    signed_by(cert, cert)
}

/// The chain a bundle sends for its own certificate: checks that the first
/// certificate of `cert_file` (`certs`) chains to a certificate of `ca_file`
/// (`anchors`) through the other certificates of `cert_file`, and returns that
/// path (see the module docs).
///
/// Errors ([`Error::Parse`] naming the file at fault): the first certificate is a
/// CA; a later one is not a CA; an issuer is found in neither file (the message
/// names the certificate and the issuer it lacks); a certificate of the issuer's
/// name is there but did not sign it; the path ends at a root not in `ca_file`;
/// the path is longer than eight certificates.
pub(crate) fn own_chain(
    cert_file: &Path,
    certs: &[CertificateDer<'static>],
    ca_file: &Path,
    anchors: &[CertificateDer<'static>],
) -> Result<Vec<CertificateDer<'static>>> {
    let file = parse_all(cert_file, certs)?;
    let roots = parse_all(ca_file, anchors)?;
    let Some((leaf, extras)) = file.split_first() else {
        return Err(Error::parse(cert_file, "no certificate in this file"));
    };
    if leaf.cert.is_ca() {
        return Err(Error::parse(
            cert_file,
            format!(
                "the first certificate, {}, is a CA certificate; the file must start with this host's or master's own certificate, followed by its intermediate CAs",
                name(leaf.cert.subject())
            ),
        ));
    }
    if let Some((i, odd)) = extras.iter().enumerate().find(|(_, x)| !x.cert.is_ca()) {
        return Err(Error::parse(
            cert_file,
            format!(
                "certificate #{}, {}, is not a CA certificate; after the first certificate only the CAs that issued it may follow",
                i + 2,
                name(odd.cert.subject())
            ),
        ));
    }

    let mut chain = vec![leaf.der.clone()];
    let mut current = leaf;
    while chain.len() < MAX_CHAIN {
        verifiable_signature(cert_file, current)?;
        if let Some(anchor) = roots.iter().find(|r| signed_by(&current.cert, &r.cert)) {
            // Trusted. Send the non-root CAs of ca.pem above this point along too.
            let mut top = anchor;
            while !self_signed(&top.cert) && chain.len() < MAX_CHAIN {
                if chain.contains(top.der) {
                    break;
                }
                verifiable_signature(ca_file, top)?;
                chain.push(top.der.clone());
                match roots.iter().find(|r| signed_by(&top.cert, &r.cert)) {
                    Some(next) => top = next,
                    None => break,
                }
            }
            return Ok(chain);
        }
        let Some(next) = extras.iter().find(|x| signed_by(&current.cert, &x.cert)) else {
            return Err(missing_issuer(
                cert_file, ca_file, leaf, current, &file, &roots,
            ));
        };
        if self_signed(&next.cert) {
            return Err(Error::parse(
                cert_file,
                format!(
                    "the chain of {} ends at the root {}, which is not in {}: this certificate is not from a CA that {} trusts",
                    name(leaf.cert.subject()),
                    name(next.cert.subject()),
                    short(ca_file),
                    short(ca_file)
                ),
            ));
        }
        if chain.contains(next.der) {
            break;
        }
        chain.push(next.der.clone());
        current = next;
    }
    Err(Error::parse(
        cert_file,
        format!(
            "the chain of {} does not reach a CA of {} within {MAX_CHAIN} certificates",
            name(leaf.cert.subject()),
            short(ca_file)
        ),
    ))
}

/// Refuses a certificate of the path whose issuer signed it with an algorithm the
/// handshake cannot verify (see `signatures`), naming both and the algorithm.
fn verifiable_signature(file: &Path, cert: &Parsed<'_>) -> Result<()> {
    if crate::signatures::verifiable(cert.der.as_ref()) {
        return Ok(());
    }
    Err(Error::parse(
        file,
        format!(
            "{} is signed by {} with {}, which no handshake can verify ({}); have {} sign it again with one of those",
            name(cert.cert.subject()),
            name(cert.cert.issuer()),
            crate::signatures::describe(&cert.cert.signature_algorithm),
            crate::signatures::ACCEPTED,
            name(cert.cert.issuer()),
        ),
    ))
}

/// The error for a certificate (`current`) whose issuer is in neither file.
fn missing_issuer(
    cert_file: &Path,
    ca_file: &Path,
    leaf: &Parsed<'_>,
    current: &Parsed<'_>,
    file: &[Parsed<'_>],
    roots: &[Parsed<'_>],
) -> Error {
    let subject = name(current.cert.subject());
    let issuer = name(current.cert.issuer());
    let same_name = file
        .iter()
        .map(|p| (p, cert_file))
        .chain(roots.iter().map(|p| (p, ca_file)))
        .find(|(p, _)| p.cert.subject().as_raw() == current.cert.issuer().as_raw());
    let reason = if let Some((_, holder)) = same_name {
        format!(
            "{subject} names {issuer} as its issuer, and {} holds a certificate of that name, but that certificate's key did not sign {subject} (a re-keyed CA, or another PKI's CA with the same name?)",
            short(holder)
        )
    } else if std::ptr::eq(current, leaf) {
        format!(
            "{subject} is issued by {issuer}, which is neither in {} after it nor in {}: append the intermediate CA certificates to {} after {subject}, or add them to {}; if {issuer} belongs to another PKI, this certificate is not signed by the cluster CA",
            short(cert_file),
            short(ca_file),
            short(cert_file),
            short(ca_file)
        )
    } else {
        format!(
            "the chain of {} stops at {subject}, whose issuer {issuer} is neither in {} nor in {}: add {issuer} to {} if it is the root, or to {} if it is an intermediate",
            name(leaf.cert.subject()),
            short(cert_file),
            short(ca_file),
            short(ca_file),
            short(cert_file)
        )
    };
    Error::parse(cert_file, reason)
}

/// Why a peer's chain (`end_entity` and the `intermediates` it sent) does not reach
/// a trusted CA (`anchors`), for a handshake refused with "unknown issuer": names
/// the certificate where the chain stops and the issuer it lacks. `peer` is "agent"
/// or "master"; `own` is the side that refused.
pub(crate) fn describe_unknown_issuer(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    peer: &str,
    own: &str,
) -> String {
    let Ok((_, leaf)) = x509_parser::parse_x509_certificate(end_entity.as_ref()) else {
        return format!("the {peer}'s certificate is not signed by the cluster CA (unknown CA)");
    };
    let sent: Vec<X509Certificate<'_>> = intermediates
        .iter()
        .filter_map(|der| x509_parser::parse_x509_certificate(der.as_ref()).ok())
        .map(|(_, cert)| cert)
        .collect();
    let mut current = &leaf;
    for _ in 0..MAX_CHAIN {
        match sent.iter().find(|c| {
            c.subject().as_raw() == current.issuer().as_raw() && !std::ptr::eq(*c, current)
        }) {
            Some(next) => current = next,
            None => break,
        }
    }
    let stop = if std::ptr::eq(current, &leaf) {
        format!(
            "it is issued by {}, which is not in the {own}'s ca.pem, and the {peer} sent {} intermediate certificate(s)",
            name(leaf.issuer()),
            sent.len()
        )
    } else {
        format!(
            "its chain stops at {}, issued by {}, which is neither in the {own}'s ca.pem nor among the {} intermediate certificate(s) the {peer} sent",
            name(current.subject()),
            name(current.issuer()),
            sent.len()
        )
    };
    format!(
        "the {peer}'s certificate {} is not signed by the cluster CA (unknown CA): {stop}; if that CA is an intermediate of the cluster's PKI, put it after the {peer}'s own certificate in its certificate file, or into the {own}'s ca.pem",
        name(leaf.subject())
    )
}
