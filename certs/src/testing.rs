//! Odd certificates for negative tests, usable from any crate's tests.
//!
//! Nothing in product code uses this module. Each function writes PEM files into
//! a directory the caller owns (a temporary directory) and returns their paths.
//! [`openssl`] makes an operator's own PKI (root, intermediate, leaves, CRLs) with
//! the `openssl` command line.

pub mod openssl;

use std::path::{Path, PathBuf};

use rcgen::ExtendedKeyUsagePurpose;
use time::{Duration, OffsetDateTime};

use crate::error::Result;
use crate::files::{self, Existing, KEY_MODE, PUBLIC_MODE};
use crate::layout::{CA_KEY, CA_PEM, HOST_KEY, HOST_PEM, MASTER_COMMON_NAME};
use crate::pki::{Ca, Issued, LeafSpec};
use crate::MasterDir;

/// Paths of a certificate, its key, and the CA that signed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// The CA certificate that signed `cert` (trust this to accept it).
    pub ca: PathBuf,
    /// The certificate, PEM.
    pub cert: PathBuf,
    /// Its private key, PEM (mode 0600).
    pub key: PathBuf,
}

/// A client certificate (CN `erel-master`, clientAuth) signed by a brand-new CA
/// that is not the cluster's. Writes `ca.pem`, `client.pem`, `client.key` to `dir`.
pub fn foreign_client(dir: &Path) -> Result<CertFiles> {
    let ca = Ca::generate("foreign erel CA")?;
    let leaf = ca.issue(&LeafSpec::new(
        MASTER_COMMON_NAME,
        ExtendedKeyUsagePurpose::ClientAuth,
    ))?;
    write(dir, &ca, &leaf, "client")
}

/// A client certificate signed by the cluster CA of `master` whose validity
/// ended a day ago. Writes `client.pem`, `client.key` to `dir`.
pub fn expired_client(master: &MasterDir, dir: &Path) -> Result<CertFiles> {
    let ca = load_ca(master)?;
    let mut spec = LeafSpec::new(MASTER_COMMON_NAME, ExtendedKeyUsagePurpose::ClientAuth);
    expire(&mut spec);
    write_leaf(master, dir, &ca.issue(&spec)?, "client")
}

/// A certificate signed by the cluster CA of `master` that is fine in every way
/// except that it lacks the clientAuth extended key usage (it has serverAuth
/// only). Writes `client.pem`, `client.key` to `dir`.
pub fn client_without_client_auth(master: &MasterDir, dir: &Path) -> Result<CertFiles> {
    let ca = load_ca(master)?;
    let spec = LeafSpec::new(MASTER_COMMON_NAME, ExtendedKeyUsagePurpose::ServerAuth);
    write_leaf(master, dir, &ca.issue(&spec)?, "client")
}

/// A host bundle for `id` (`ca.pem`, `host.pem`, `host.key`, no CRL) in `dir`,
/// signed by a brand-new CA that is not the cluster's.
pub fn foreign_host_bundle(id: &str, dir: &Path) -> Result<CertFiles> {
    crate::validate_host_id(id)?;
    let ca = Ca::generate("foreign erel CA")?;
    let mut spec = LeafSpec::new(id, ExtendedKeyUsagePurpose::ServerAuth);
    spec.dns = vec![id.to_string()];
    write(dir, &ca, &ca.issue(&spec)?, "host")
}

/// A host bundle for `id` (`ca.pem`, `host.pem`, `host.key`, no CRL) in `dir`,
/// signed by the cluster CA of `master`, whose validity ended a day ago.
pub fn expired_host_bundle(master: &MasterDir, id: &str, dir: &Path) -> Result<CertFiles> {
    crate::validate_host_id(id)?;
    let ca = load_ca(master)?;
    let mut spec = LeafSpec::new(id, ExtendedKeyUsagePurpose::ServerAuth);
    spec.dns = vec![id.to_string()];
    expire(&mut spec);
    write(dir, &ca, &ca.issue(&spec)?, "host")
}

fn expire(spec: &mut LeafSpec<'_>) {
    let now = OffsetDateTime::now_utc();
    spec.not_before = now - Duration::days(30);
    spec.not_after = now - Duration::days(1);
}

fn load_ca(master: &MasterDir) -> Result<Ca> {
    Ca::load(&master.path().join(CA_PEM), &master.path().join(CA_KEY))
}

/// Writes `leaf` into `dir`, pointing `ca` at the cluster's `ca.pem`.
fn write_leaf(master: &MasterDir, dir: &Path, leaf: &Issued, stem: &str) -> Result<CertFiles> {
    let (cert, key) = write_pair(dir, leaf, stem)?;
    Ok(CertFiles {
        ca: master.ca_pem(),
        cert,
        key,
    })
}

/// Writes `ca.pem` and `leaf` into `dir`.
fn write(dir: &Path, ca: &Ca, leaf: &Issued, stem: &str) -> Result<CertFiles> {
    files::create_dir_private(dir)?;
    let ca_path = dir.join(CA_PEM);
    files::write_atomic(
        &ca_path,
        ca.cert_pem.as_bytes(),
        PUBLIC_MODE,
        Existing::Replace,
    )?;
    let (cert, key) = write_pair(dir, leaf, stem)?;
    Ok(CertFiles {
        ca: ca_path,
        cert,
        key,
    })
}

fn write_pair(dir: &Path, leaf: &Issued, stem: &str) -> Result<(PathBuf, PathBuf)> {
    files::create_dir_private(dir)?;
    let (cert, key) = if stem == "host" {
        (dir.join(HOST_PEM), dir.join(HOST_KEY))
    } else {
        (
            dir.join(format!("{stem}.pem")),
            dir.join(format!("{stem}.key")),
        )
    };
    files::write_atomic(&key, leaf.key_pem.as_bytes(), KEY_MODE, Existing::Replace)?;
    files::write_atomic(
        &cert,
        leaf.cert_pem.as_bytes(),
        PUBLIC_MODE,
        Existing::Replace,
    )?;
    Ok((cert, key))
}
