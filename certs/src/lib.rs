//! Certificates and TLS for an erel cluster.
//!
//! The master keeps a certificate directory ([`MasterDir`], layout in [`layout`]):
//! a cluster CA, the master's client certificate, a CRL, and one bundle per host
//! that is copied to that host for its agent. Everything trusts only the cluster
//! CA, speaks TLS 1.3 only, and uses the ring provider passed explicitly.
//!
//! Modules:
//! * [`layout`]: the file names of the directory and of a host bundle.
//! * `store`: [`MasterDir`] — `init`, `issue_host`, `revoke`, the master's client config.
//! * `pki`: key, certificate and CRL generation with rcgen (validity in
//!   `CA_VALIDITY` and `LEAF_VALIDITY`: 20 and 5 years).
//! * `tls`: the rustls configurations ([`server_config`], the master's through
//!   [`MasterDir::client_config`]), [`server_name`], [`peer_name`] and
//!   [`bundle_fingerprint`] for reloading.
//! * `chain`: a bundle's own chain, from its certificate to a CA of `ca.pem`.
//! * `keys`: private keys in PKCS#8, PKCS#1 or SEC1 PEM.
//! * `revocation`: what `crl.pem` may hold, and the revocation policy.
//! * `signatures`: the signature algorithms a handshake verifies.
//! * `verify`: the peer verifiers, whose refusals name the certificate at fault.
//! * `explain`: [`explain_tls_error`], a refused handshake as a sentence.
//! * `testing` (feature `testing`, for tests only): odd certificates for other
//!   crates' negative tests, and an operator's PKI made with `openssl`. The feature
//!   also makes public what only tests use: `client_config_from` (a client
//!   configuration from explicit files), `provider`, `MasterDir::reissue_master` and
//!   `MasterDir::host_ids`.
//! * `rotation`: rotating the CA from the master: `next/`, `previous/`, `archive/`.
//! * `files`: atomic writes; keys are mode 0600 from the start.
//! * `pushed`: [`PushedBundle`], a host's bundle as one file the master writes to
//!   the agent's root, validated as a whole before the agent serves with it.
//!
//! ```
//! # fn main() -> erel_certs::Result<()> {
//! # let tmp = tempfile::tempdir().expect("tempdir");
//! use erel_certs::MasterDir;
//!
//! let certs = MasterDir::new(tmp.path().join("certs"));
//! certs.init("prod")?;                                   // erel certs init
//! let bundle = certs.issue_host("web-1", &[], &[])?;     // erel certs host web-1
//! let agent = erel_certs::server_config(&bundle)?;       // erel-boot --certs <bundle>
//! let master = certs.client_config()?;                   // erel ping web-1@...
//! let expect = erel_certs::server_name("web-1")?;
//! # let _ = (agent, master, expect);
//! # Ok(())
//! # }
//! ```
//!
//! # PKI options
//!
//! The files may as well come from an operator's own CA, with intermediates:
//!
//! * `ca.pem`: the CAs to trust; every certificate in it is a trust anchor (the
//!   root, and intermediates if the operator keeps them there).
//! * `host.pem` / `master.pem`: the certificate first, then the intermediates that
//!   issued it. [`server_config`] and [`MasterDir::client_config`] check that it
//!   chains to `ca.pem` and send the path found, intermediates of `ca.pem` included.
//! * `host.key` / `master.key`: PKCS#8, PKCS#1 or SEC1 PEM; RSA, ECDSA P-256/P-384
//!   or Ed25519.
//! * `crl.pem`: one CRL per issuing CA, each signed by a CA of the bundle.
//!
//! Revocation policy: only the peer's own certificate is checked, against the CRL
//! of the CA that issued it (rustls-webpki `RevocationCheckDepth::EndEntity`); when
//! `crl.pem` holds none from that CA the peer is refused
//! (`UnknownStatusPolicy::Deny`), and the refusal names the certificate and that
//! CA; nextUpdate is not enforced. Without `crl.pem` an agent checks no revocation.
//! Every refusal when loading is an [`Error::Parse`] naming the file and the
//! certificate at fault.
//!
//! Revocations are recorded only in `crl.pem` itself: [`MasterDir::revoke`] reads
//! the current CRL (checking its signature), adds the serial number and re-signs
//! it with the next CRL number.
#![deny(missing_docs)]

mod chain;
mod error;
mod explain;
mod files;
mod keys;
pub mod layout;
mod pki;
mod pushed;
mod revocation;
mod rotation;
mod signatures;
mod store;
#[cfg(feature = "testing")]
pub mod testing;
mod tls;
mod verify;

pub use error::{Error, Result};
pub use explain::{certificate_names, explain_tls_error};
pub use pushed::{Expected, PushedBundle, PUSHED_BUNDLE, PUSHED_BUNDLE_MODE};
pub use store::MasterDir;
pub use tls::{
    bundle_fingerprint, peer_name, server_config, server_name, server_tls, BundleFingerprint,
    ServerTls,
};
#[cfg(feature = "testing")]
pub use tls::{client_config_from, provider};

/// The longest host id: one DNS label.
const MAX_HOST_ID_LEN: usize = 63;

/// Checks a host id: 1 to 63 characters of lowercase letters, digits and `-`,
/// neither starting nor ending with `-`, and not all digits. Such an id is a
/// valid DNS label, usable as a TLS server name and as a directory name.
pub fn validate_host_id(id: &str) -> Result<()> {
    let reason = if id.is_empty() {
        Some("a host id must not be empty".to_string())
    } else if id.len() > MAX_HOST_ID_LEN {
        Some(format!(
            "a host id has at most {MAX_HOST_ID_LEN} characters, this one has {}",
            id.len()
        ))
    } else if let Some(bad) = id
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        Some(format!(
            "{bad:?} is not allowed; use lowercase letters a-z, digits and '-'"
        ))
    } else if id.starts_with('-') || id.ends_with('-') {
        Some("a host id must not start or end with '-'".to_string())
    } else if id.bytes().all(|b| b.is_ascii_digit()) {
        Some("a host id must not be all digits (it would read as a number, not a name)".to_string())
    } else {
        None
    };
    Error::name_check(id, reason)
}
