//! Private keys as operators' tools write them.
//!
//! A key file holds exactly one unencrypted private key in PEM, in any of the three
//! encodings that openssl, step-ca and cfssl produce:
//!
//! | PEM label | encoding | algorithms |
//! | --- | --- | --- |
//! | `PRIVATE KEY` | PKCS#8 (RFC 5208) | RSA, ECDSA P-256/P-384, Ed25519 (RFC 8410) |
//! | `RSA PRIVATE KEY` | PKCS#1 (RFC 8017, `openssl genrsa -traditional`) | RSA |
//! | `EC PRIVATE KEY` | SEC1 (RFC 5915, `openssl ecparam -genkey`) | ECDSA P-256/P-384 |
//!
//! Other PEM sections in the file (such as `EC PARAMETERS`, which `openssl ecparam`
//! writes before the key) are ignored. RSA keys must have 2048 to 8192 bits (what the
//! ring provider signs with). Encrypted keys are refused with a message saying how to
//! decrypt them, since the agent starts unattended and has no one to ask for a password.

use std::path::Path;

use rustls::pki_types::pem::{PemObject, SectionKind};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer, PrivateSec1KeyDer};

use crate::error::{Error, Result};

/// What the accepted encodings are, for error messages.
const ACCEPTED: &str = "expected one unencrypted PEM private key: \"BEGIN PRIVATE KEY\" (PKCS#8), \"BEGIN RSA PRIVATE KEY\" (PKCS#1) or \"BEGIN EC PRIVATE KEY\" (SEC1)";

/// What the ring provider can sign with, for error messages.
const ALGORITHMS: &str =
    "erel signs with RSA (2048 to 8192 bits), ECDSA on P-256 or P-384, or Ed25519";

/// Reads the one private key in the PEM file `path` (see the module docs for the
/// accepted encodings) and checks that the ring provider can sign with it.
///
/// Errors: [`Error::Missing`] when the file does not exist; [`Error::Parse`] naming
/// `path` when it is encrypted, holds no key or several, is malformed, or holds a
/// key of an algorithm or size that cannot be used.
pub(crate) fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    warn_if_exposed(path);
    parse_key(path, &crate::files::read(path)?)
}

/// As [`load_key`], from PEM text already read; `path` names where it came from.
pub(crate) fn parse_key(path: &Path, bytes: &[u8]) -> Result<PrivateKeyDer<'static>> {
    if is_encrypted(bytes) {
        return Err(Error::parse(
            path,
            "this private key is encrypted; the agent and the master start unattended, so store it unencrypted with mode 0600 (for example `openssl pkey -in KEY -out KEY.plain`)",
        ));
    }
    if String::from_utf8_lossy(bytes).contains("-----BEGIN RSA-PSS PRIVATE KEY-----") {
        return Err(Error::parse(path, RSA_PSS));
    }
    let mut keys = Vec::new();
    let mut others = Vec::new();
    for section in <(SectionKind, Vec<u8>)>::pem_slice_iter(bytes) {
        let (kind, der) = section.map_err(|e| Error::parse(path, format!("malformed PEM: {e}")))?;
        match kind {
            SectionKind::PrivateKey => {
                keys.push(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der)))
            }
            SectionKind::RsaPrivateKey => {
                keys.push(PrivateKeyDer::Pkcs1(PrivatePkcs1KeyDer::from(der)))
            }
            SectionKind::EcPrivateKey => {
                keys.push(PrivateKeyDer::Sec1(PrivateSec1KeyDer::from(der)))
            }
            other => others.push(label(other)),
        }
    }
    let key = match keys.len() {
        1 => keys.pop().expect("one key"),
        0 if others.is_empty() => {
            return Err(Error::parse(path, format!("no private key; {ACCEPTED}")))
        }
        0 => {
            return Err(Error::parse(
                path,
                format!("no private key (found {}); {ACCEPTED}", others.join(", ")),
            ))
        }
        n => {
            return Err(Error::parse(
                path,
                format!("{n} private keys in one file; {ACCEPTED}"),
            ))
        }
    };
    let encoding = encoding(&key);
    crate::tls::provider()
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|_| {
            if is_rsa_pss(&key) {
                return Error::parse(path, RSA_PSS);
            }
            Error::parse(
                path,
                format!("a {encoding} private key that cannot be used: {ALGORITHMS}"),
            )
        })?;
    Ok(key)
}

/// An RSA key restricted to PSS (RFC 4055 id-RSASSA-PSS), which ring cannot sign
/// with. Its size is not the problem, so the general list would mislead.
const RSA_PSS: &str = "an RSA-PSS key (id-RSASSA-PSS, as `openssl genpkey -algorithm RSA-PSS` makes it), which erel cannot sign with; TLS 1.3 signs with PSS from a plain RSA key anyway: make one with `openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048` and have the CA issue the certificate for it";

/// The DER of the id-RSASSA-PSS object identifier (1.2.840.113549.1.1.10).
const RSASSA_PSS_OID: [u8; 11] = [
    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0a,
];

/// Whether a PKCS#8 key's algorithm is id-RSASSA-PSS. The algorithm identifier
/// follows the version within the first bytes, before any key material.
fn is_rsa_pss(key: &PrivateKeyDer<'_>) -> bool {
    let PrivateKeyDer::Pkcs8(pkcs8) = key else {
        return false;
    };
    let head = &pkcs8.secret_pkcs8_der()[..pkcs8.secret_pkcs8_der().len().min(32)];
    head.windows(RSASSA_PSS_OID.len())
        .any(|window| window == RSASSA_PSS_OID)
}

/// Explains a key that rustls found not to match its certificate.
pub(crate) fn mismatch(cert: &Path, key: &Path) -> Error {
    Error::parse(
        key,
        format!(
            "this private key does not belong to the first certificate in {} (the certificate must come first, followed by its intermediates)",
            cert.display()
        ),
    )
}

/// Whether the PEM text holds an encrypted key: PKCS#8 `ENCRYPTED PRIVATE KEY`, or
/// a traditional key with an RFC 1421 `Proc-Type: 4,ENCRYPTED` header.
fn is_encrypted(pem: &[u8]) -> bool {
    let text = String::from_utf8_lossy(pem);
    text.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----")
        || text.contains("Proc-Type: 4,ENCRYPTED")
}

fn encoding(key: &PrivateKeyDer<'_>) -> &'static str {
    match key {
        PrivateKeyDer::Pkcs1(_) => "PKCS#1",
        PrivateKeyDer::Sec1(_) => "SEC1",
        PrivateKeyDer::Pkcs8(_) => "PKCS#8",
        _ => "private",
    }
}

fn label(kind: SectionKind) -> &'static str {
    match kind {
        SectionKind::Certificate => "a certificate",
        SectionKind::PublicKey => "a public key",
        SectionKind::Crl => "a CRL",
        SectionKind::Csr => "a certificate request",
        _ => "another PEM section",
    }
}

/// Logs a warning when a private key file is readable by group or others.
pub(crate) fn warn_if_exposed(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "private key is readable by group or others; it should be mode 0600");
        }
    }
}
