//! The pushed bundle: a host's whole certificate bundle as one file, which the master
//! writes to an agent with one `WriteFile` and the agent validates as a whole before
//! it serves with it.
//!
//! ```toml
//! # certs/bundle.toml under the agent's root, mode 0600
//! format = 1
//! ca = "-----BEGIN CERTIFICATE-----\n…"           # the CAs to trust (several: an overlap)
//! certificate = "-----BEGIN CERTIFICATE-----\n…"  # the host's certificate, then intermediates
//! key = "-----BEGIN PRIVATE KEY-----\n…"          # its private key
//! crl = "-----BEGIN X509 CRL-----\n…"             # optional: one CRL per issuing CA
//! ```
//!
//! Each field holds what the file of the same part of a bundle directory holds
//! (`ca.pem`, `host.pem`, `host.key`, `crl.pem`), so the same rules apply (see the
//! crate's "PKI options"). [`PushedBundle::validate`] adds what a bundle arriving over
//! the wire must also pass, each refusal an [`Error::Refused`] naming its check:
//!
//! | check | what it asks |
//! | --- | --- |
//! | `format` | the file is this TOML, format 1 |
//! | `ca`, `certificate`, `key`, `crl` | that part loads as in a bundle directory: the key matches the certificate, the certificate chains to a CA of `ca`, every CRL is signed by a CA of the bundle |
//! | `valid now` | the host's certificate is within its validity period |
//! | `not revoked` | no CRL of the bundle lists the host's certificate |
//! | `same host` | the certificate names the host id the agent already has |
//! | `master kept` | a master certificate that recently authenticated to the agent is still accepted |

use std::path::{Path, PathBuf};

use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::ClientCertVerifier as _;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::layout::{CA_PEM, CRL_PEM, HOST_KEY, HOST_PEM};
use crate::tls::{self, BundleParts, ServerTls};

/// Where the pushed bundle lives, relative to the agent's root.
pub const PUSHED_BUNDLE: &str = "certs/bundle.toml";
/// The file mode a pushed bundle is written with (it holds a private key).
pub const PUSHED_BUNDLE_MODE: u32 = 0o600;
/// The format this crate writes and reads.
const FORMAT: u32 = 1;

/// A host bundle as one TOML file (format in the module docs). `Debug` never shows
/// the key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushedBundle {
    format: u32,
    /// The CAs to trust, PEM (several during a rotation's overlap).
    pub ca: String,
    /// The host's certificate, then its intermediates, PEM.
    pub certificate: String,
    key: String,
    /// The CRLs, PEM, one per issuing CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl: Option<String>,
}

impl std::fmt::Debug for PushedBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushedBundle")
            .field("ca", &self.ca)
            .field("certificate", &self.certificate)
            .field("key", &"(elided)")
            .field("crl", &self.crl)
            .finish()
    }
}

/// What an agent knows when it judges a pushed bundle.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    /// The agent's host id: the pushed certificate must name it.
    pub host_id: &'a str,
    /// Chains (certificate first) of masters that authenticated to the agent
    /// recently; when there are any, the bundle must accept at least one. Empty
    /// right after the agent starts: nothing to keep then.
    pub masters: &'a [Vec<CertificateDer<'static>>],
}

impl PushedBundle {
    /// A bundle from its parts, PEM text each (the key included).
    pub fn new(ca: String, certificate: String, key: String, crl: Option<String>) -> Self {
        PushedBundle {
            format: FORMAT,
            ca,
            certificate,
            key,
            crl,
        }
    }

    /// The bundle of a host bundle directory (`ca.pem`, `host.pem`, `host.key`,
    /// `crl.pem` when present). Errors: [`Error::Missing`] or [`Error::Io`] naming the file.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let read = |name: &str| crate::files::read_to_string(&dir.join(name));
        let crl_path = dir.join(CRL_PEM);
        let crl = if crl_path.exists() {
            Some(read(CRL_PEM)?)
        } else {
            None
        };
        Ok(Self::new(
            read(CA_PEM)?,
            read(HOST_PEM)?,
            read(HOST_KEY)?,
            crl,
        ))
    }

    /// The same bundle trusting the CAs of `ca_pem` as well, after its own.
    pub fn also_trusting(mut self, ca_pem: &str) -> Self {
        if !self.ca.ends_with('\n') {
            self.ca.push('\n');
        }
        self.ca.push_str(ca_pem);
        self
    }

    /// The same bundle with `crl_pem` in place of its CRLs.
    pub fn with_crl(mut self, crl_pem: String) -> Self {
        self.crl = Some(crl_pem);
        self
    }

    /// The file's text.
    pub fn to_toml(&self) -> String {
        let body = toml::to_string(self).expect("a bundle of strings serializes");
        format!("# erel pushed certificate bundle (holds a private key: mode 0600)\n{body}")
    }

    /// Parses the text of `path` ([`Error::Refused`], check `format`, when it is not
    /// this TOML or not format 1).
    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        let refuse = |reason: String| Error::Refused {
            path: path.to_path_buf(),
            check: "format",
            reason,
        };
        let bundle: PushedBundle = toml::from_str(text).map_err(|e| {
            refuse(format!(
                "not a pushed bundle (TOML with format, ca, certificate, key, crl): {e}"
            ))
        })?;
        if bundle.format != FORMAT {
            return Err(refuse(format!(
                "format {} is not known here (this agent reads format {FORMAT})",
                bundle.format
            )));
        }
        Ok(bundle)
    }

    /// Reads and parses `path`.
    pub fn read(path: &Path) -> Result<Self> {
        Self::parse(path, &crate::files::read_to_string(path)?)
    }

    /// Checks the bundle as a whole (the table in the module docs) and returns the
    /// agent's server configuration from it, built as [`crate::server_tls`] builds
    /// one from a directory. `path` names the file in messages.
    ///
    /// Errors: [`Error::Refused`] naming `path` and the check that failed.
    pub fn validate(&self, path: &Path, expected: &Expected<'_>) -> Result<ServerTls> {
        let refuse = |check: &'static str, reason: String| Error::Refused {
            path: path.to_path_buf(),
            check,
            reason,
        };
        let part = |name: &str, text: &str| (PathBuf::from(name), text.as_bytes().to_vec());
        let parts = BundleParts {
            ca: part("ca", &self.ca),
            host: part("certificate", &self.certificate),
            key: part("key", &self.key),
            crl: self.crl.as_deref().map(|crl| part("crl", crl)),
        };
        let built = tls::server_parts(&parts).map_err(|e| match e {
            Error::Parse { path: part, reason } => {
                let check = match part.to_str() {
                    Some("ca") => "ca",
                    Some("key") => "key",
                    Some("crl") => "crl",
                    _ => "certificate",
                };
                refuse(check, reason)
            }
            Error::Missing { path: part } => refuse("format", format!("no {}", part.display())),
            other => refuse("certificate", other.to_string()),
        })?;
        let leaf = &built.chain[0];
        let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
            .map_err(|e| refuse("certificate", format!("not a valid certificate: {e}")))?;
        let subject = crate::chain::name(cert.subject());
        if !cert.validity().is_valid() {
            return Err(refuse(
                "valid now",
                format!(
                    "the host's certificate {subject} is valid from {} to {}, not now",
                    cert.validity().not_before,
                    cert.validity().not_after
                ),
            ));
        }
        if let Some(number) = revoked_by(&cert, &built.crls) {
            return Err(refuse(
                "not revoked",
                format!("the host's certificate {subject} (serial {}) is listed by the bundle's CRL number {number} of its issuer", cert.raw_serial_as_string()),
            ));
        }
        let named = crate::peer_name(leaf).unwrap_or_default();
        if named != expected.host_id {
            return Err(refuse(
                "same host",
                format!(
                    "the certificate names host {named:?}, this agent is {:?}; a pushed bundle cannot change a host's identity",
                    expected.host_id
                ),
            ));
        }
        if !expected.masters.is_empty() {
            let now = UnixTime::now();
            let mut refusals = Vec::new();
            for master in expected.masters {
                let Some((end_entity, intermediates)) = master.split_first() else {
                    continue;
                };
                match built
                    .verifier
                    .verify_client_cert(end_entity, intermediates, now)
                {
                    Ok(_) => return Ok(built.tls()),
                    Err(e) => refusals.push(format!(
                        "{}: {}",
                        crate::peer_name(end_entity).unwrap_or_else(|| "(unnamed)".into()),
                        crate::explain::explain_rustls_error(&e).unwrap_or_else(|| e.to_string())
                    )),
                }
            }
            return Err(refuse(
                "master kept",
                format!(
                    "none of the {} master certificates that authenticated here recently would be accepted ({}); this bundle would lock the master out",
                    refusals.len(),
                    refusals.join("; ")
                ),
            ));
        }
        Ok(built.tls())
    }
}

/// The CRL number (or "without a number") of the CRL in `crls` from `cert`'s issuer
/// that lists `cert`, if one does.
fn revoked_by(
    cert: &x509_parser::certificate::X509Certificate<'_>,
    crls: &[rustls::pki_types::CertificateRevocationListDer<'static>],
) -> Option<String> {
    crls.iter().find_map(|der| {
        let (_, crl) = x509_parser::parse_x509_crl(der.as_ref()).ok()?;
        let listed = crl.issuer().as_raw() == cert.issuer().as_raw()
            && crl
                .iter_revoked_certificates()
                .any(|revoked| revoked.serial() == &cert.serial);
        listed.then(|| {
            crl.crl_number()
                .map_or_else(|| "(without a number)".to_string(), |n| n.to_string())
        })
    })
}
