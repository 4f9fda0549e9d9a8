//! [`MasterDir`]: the master's certificate directory (see [`crate::layout`]).

use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{ExtendedKeyUsagePurpose, RevokedCertParams, SerialNumber};
use time::OffsetDateTime;
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::files::{self, Existing, KEY_MODE, PUBLIC_MODE};
use crate::layout::{
    CA_KEY, CA_PEM, CRL_PEM, HOSTS_DIR, HOST_KEY, HOST_PEM, MASTER_COMMON_NAME, MASTER_KEY,
    MASTER_NAME, MASTER_PEM,
};
use crate::pki::{Ca, LeafSpec};
use crate::tls::{self, SentChain};
use crate::validate_host_id;

/// The longest cluster name accepted, so the CA's common name fits in 64 characters.
const MAX_CLUSTER_NAME: usize = 48;

/// The master's certificate directory: the cluster CA, the master's client
/// certificate, the CRL, and one bundle per host under `hosts/<ID>/`.
///
/// Holds only a path; every method reads what it needs from disk, so several
/// processes may share a directory. Every file is written atomically (temporary
/// name, fsync, rename); keys are mode 0600 from the moment they exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterDir {
    path: PathBuf,
}

impl MasterDir {
    /// A certificate directory at `path` (nothing is read or created yet).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        MasterDir { path: path.into() }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cluster CA certificate (`ca.pem`).
    pub fn ca_pem(&self) -> PathBuf {
        self.path.join(CA_PEM)
    }

    /// The master's client certificate (`master.pem`).
    pub fn master_pem(&self) -> PathBuf {
        self.path.join(MASTER_PEM)
    }

    /// The master's private key (`master.key`).
    pub fn master_key(&self) -> PathBuf {
        self.path.join(MASTER_KEY)
    }

    /// The CRL (`crl.pem`).
    pub fn crl_pem(&self) -> PathBuf {
        self.path.join(CRL_PEM)
    }

    /// The bundle directory of host `id` (`hosts/<id>/`), whether or not it exists.
    pub fn host_dir(&self, id: &str) -> PathBuf {
        self.path.join(HOSTS_DIR).join(id)
    }

    /// Creates a new cluster CA (common name "`<cluster_name>` erel CA", valid 20
    /// years), a master client certificate (common name `erel-master`, clientAuth,
    /// valid 5 years) and an empty CRL. The directory is created (0700) if needed.
    ///
    /// Refuses with [`Error::AlreadyExists`] naming the file if `ca.pem`, `ca.key`,
    /// `master.pem` or `master.key` already exists: an existing CA or key is never
    /// overwritten, and nothing is written. Should init be interrupted after writing
    /// `ca.key`, the next init refuses too; remove the directory and start again.
    pub fn init(&self, cluster_name: &str) -> Result<()> {
        validate_cluster_name(cluster_name)?;
        self.create(&format!("{cluster_name} erel CA"))?;
        info!(dir = %self.path.display(), cluster = cluster_name, "created cluster CA and master certificate");
        Ok(())
    }

    /// [`MasterDir::init`] with a CA named `ca_name`.
    pub(crate) fn create(&self, ca_name: &str) -> Result<()> {
        let existing_files = [
            self.ca_pem(),
            self.path.join(CA_KEY),
            self.master_key(),
            self.master_pem(),
        ];
        for existing in existing_files {
            if existing.symlink_metadata().is_ok() {
                return Err(Error::AlreadyExists { path: existing });
            }
        }
        let ca = Ca::generate(ca_name)?;
        let master = ca.issue(&LeafSpec::new(
            MASTER_COMMON_NAME,
            ExtendedKeyUsagePurpose::ClientAuth,
        ))?;
        let crl = ca.sign_crl(&1u32.into(), Vec::new())?;

        files::create_dir_private(&self.path)?;
        // The key first: a lone ca.key is harmless, and a lone ca.pem would
        // look like a usable CA.
        let ca_key = ca.key_pem();
        files::write_atomic(
            &self.path.join(CA_KEY),
            ca_key.as_bytes(),
            KEY_MODE,
            Existing::Refuse,
        )?;
        files::write_atomic(
            &self.ca_pem(),
            ca.cert_pem.as_bytes(),
            PUBLIC_MODE,
            Existing::Refuse,
        )?;
        // Refuse rather than replace: a master key that appeared meanwhile stays.
        files::write_atomic(
            &self.master_key(),
            master.key_pem.as_bytes(),
            KEY_MODE,
            Existing::Refuse,
        )?;
        files::write_atomic(
            &self.master_pem(),
            master.cert_pem.as_bytes(),
            PUBLIC_MODE,
            Existing::Refuse,
        )?;
        files::write_atomic(
            &self.crl_pem(),
            crl.as_bytes(),
            PUBLIC_MODE,
            Existing::Replace,
        )
    }

    /// Issues a new master client certificate (`master.pem`, `master.key`), for
    /// instance after `revoke("master")`. The old one is not revoked by this. For
    /// tests only (feature `testing`): no command reissues the master's certificate.
    #[cfg(feature = "testing")]
    pub fn reissue_master(&self) -> Result<()> {
        let ca = self.load_ca()?;
        let master = ca.issue(&LeafSpec::new(
            MASTER_COMMON_NAME,
            ExtendedKeyUsagePurpose::ClientAuth,
        ))?;
        self.write_master(&master)?;
        info!(dir = %self.path.display(), "issued a new master certificate");
        Ok(())
    }

    /// Writes the master's certificate and key, replacing any old ones: the key
    /// first, so that a new certificate is never paired with an old key.
    pub(crate) fn write_master(&self, master: &crate::pki::Issued) -> Result<()> {
        files::write_atomic(
            &self.master_key(),
            master.key_pem.as_bytes(),
            KEY_MODE,
            Existing::Replace,
        )?;
        files::write_atomic(
            &self.master_pem(),
            master.cert_pem.as_bytes(),
            PUBLIC_MODE,
            Existing::Replace,
        )
    }

    /// Writes the bundle for host `id` under `hosts/<id>/`: `ca.pem`, `host.pem`,
    /// `host.key` (0600) and `crl.pem`, and returns that directory.
    ///
    /// The host certificate has common name `id`, extended key usage serverAuth,
    /// and subject alternative names `DNS:<id>`, each of `dns` and each of `ips`;
    /// it is valid 5 years. `id` must pass [`validate_host_id`] and must not be
    /// `master` (that name is reserved for [`MasterDir::revoke`]).
    ///
    /// Refuses with [`Error::BundleExists`] naming `hosts/<id>/host.key` (or the
    /// directory) when `id` already has a bundle: a host key is never overwritten
    /// unless asked for with [`MasterDir::replace_host`]. Nothing is written then.
    /// The new bundle is built in a staging directory and moved in by rename.
    ///
    /// Fails with [`Error::MissingCa`] naming `ca.pem` when there is no CA yet.
    pub fn issue_host(&self, id: &str, ips: &[IpAddr], dns: &[String]) -> Result<PathBuf> {
        self.write_host(id, ips, dns, Existing::Refuse)
    }

    /// As [`MasterDir::issue_host`] (`erel certs host ID --force`), but an existing
    /// bundle of `id` is replaced as a whole by one with a new key and certificate.
    /// The old certificate stays valid until it expires unless it is revoked first
    /// (`revoke(id)`, then `replace_host(id, ..)`).
    pub fn replace_host(&self, id: &str, ips: &[IpAddr], dns: &[String]) -> Result<PathBuf> {
        self.write_host(id, ips, dns, Existing::Replace)
    }

    fn write_host(
        &self,
        id: &str,
        ips: &[IpAddr],
        dns: &[String],
        existing: Existing,
    ) -> Result<PathBuf> {
        validate_host_id(id)?;
        if id == MASTER_NAME {
            return Err(Error::InvalidName {
                name: id.to_string(),
                reason: format!("'{MASTER_NAME}' is reserved for the master's own certificate"),
            });
        }
        for name in dns {
            rustls::pki_types::DnsName::try_from(name.as_str()).map_err(|_| {
                Error::InvalidName {
                    name: name.clone(),
                    reason: "not a valid DNS name".into(),
                }
            })?;
        }
        if existing == Existing::Refuse {
            self.refuse_existing_bundle(id)?;
        }
        let ca = self.load_ca()?;
        let crl = files::read(&self.crl_pem())?;
        let mut spec = LeafSpec::new(id, ExtendedKeyUsagePurpose::ServerAuth);
        spec.dns = std::iter::once(id.to_string())
            .chain(dns.iter().cloned())
            .collect();
        spec.ips = ips.to_vec();
        let host = ca.issue(&spec)?;

        let hosts = self.path.join(HOSTS_DIR);
        files::create_dir_private(&hosts)?;
        let dest = self.host_dir(id);
        let staging = files::staging_name(&dest, "staging");
        let written = write_bundle(&staging, &ca, &host, &crl).and_then(|()| {
            if existing == Existing::Refuse {
                // Checked again: a bundle written meanwhile is kept too.
                self.refuse_existing_bundle(id)?;
            }
            swap_in(&staging, &dest)
        });
        if written.is_err() {
            let _ = fs::remove_dir_all(&staging);
        }
        written?;
        info!(host = id, dir = %dest.display(), "issued host certificate bundle");
        Ok(dest)
    }

    /// [`Error::BundleExists`] when `hosts/<id>/` exists, naming its key when it has one.
    fn refuse_existing_bundle(&self, id: &str) -> Result<()> {
        let dir = self.host_dir(id);
        if dir.symlink_metadata().is_err() {
            return Ok(());
        }
        let key = dir.join(HOST_KEY);
        let path = if key.symlink_metadata().is_ok() {
            key
        } else {
            dir
        };
        Err(Error::BundleExists {
            id: id.to_string(),
            path,
        })
    }

    /// Adds the certificate of `name` to the CRL: a host id with a bundle under
    /// `hosts/`, or `"master"` for `master.pem`.
    ///
    /// `crl.pem` is re-signed with its CRL number incremented and every earlier
    /// entry kept (the CRL itself is the list of revocations; there is no other
    /// record), then copied into every host bundle. Revoking a certificate that is
    /// already listed changes nothing but still refreshes the bundles' copies.
    ///
    /// Agents read the CRL from their bundle, so the new `crl.pem` must reach each
    /// host (and the agent reload it) before the revocation takes effect there.
    ///
    /// Fails with [`Error::UnknownHost`] naming the certificate file looked for.
    pub fn revoke(&self, name: &str) -> Result<()> {
        let cert_path = if name == MASTER_NAME {
            self.master_pem()
        } else {
            validate_host_id(name)?;
            self.host_dir(name).join(HOST_PEM)
        };
        if !cert_path.is_file() {
            return Err(Error::UnknownHost {
                id: name.to_string(),
                path: cert_path,
            });
        }
        let serial = crate::pki::cert_serial(&cert_path)?;
        let ca = self.load_ca()?;
        let crl_path = self.crl_pem();
        let mut state = ca.read_crl(&crl_path)?;
        if state.contains(&serial) {
            info!(name, serial = %serial, "certificate already revoked");
        } else {
            state.revoked.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&serial.to_bytes_be()),
                revocation_time: OffsetDateTime::now_utc(),
                reason_code: None,
                invalidity_date: None,
            });
            let number = state.number + 1u32;
            let pem = ca.sign_crl(&number, state.revoked)?;
            files::write_atomic(&crl_path, pem.as_bytes(), PUBLIC_MODE, Existing::Replace)?;
            info!(name, serial = %serial, crl_number = %number, "revoked certificate");
        }
        self.refresh_bundle_crls()
    }

    /// Copies `crl.pem` into every host bundle under `hosts/`.
    fn refresh_bundle_crls(&self) -> Result<()> {
        let crl = files::read(&self.crl_pem())?;
        for dir in self.host_dirs()? {
            files::write_atomic(&dir.join(CRL_PEM), &crl, PUBLIC_MODE, Existing::Replace)?;
        }
        Ok(())
    }

    /// The ids of every host with a bundle under `hosts/`, sorted. For tests only
    /// (feature `testing`).
    #[cfg(feature = "testing")]
    pub fn host_ids(&self) -> Result<Vec<String>> {
        let mut ids: Vec<String> = self
            .host_dirs()?
            .iter()
            .filter_map(|d| d.file_name().and_then(|n| n.to_str()).map(str::to_string))
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// The rustls client configuration of the master: presents `master.pem` /
    /// `master.key`, trusts only `ca.pem`, and checks `crl.pem` (which must exist).
    /// During a rotation (`next/ca.pem` exists) it trusts the next CA as well, with
    /// its CRL.
    /// The server's certificate must chain to `ca.pem`, carry the serverAuth extended
    /// key usage and name the [`crate::server_name`] the connection is made to.
    ///
    /// Works as well with an operator's own PKI in this directory (no `ca.key`
    /// needed): `master.pem` must start with the master's certificate and chain to
    /// `ca.pem`, through intermediates after it or in `ca.pem`; the chain found is
    /// what the master sends. Refusals are [`Error::Parse`] naming the file and the
    /// certificate at fault.
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>> {
        let crl = self.crl_pem();
        if !crl.is_file() {
            return Err(Error::Missing { path: crl });
        }
        let files = [&self.ca_pem(), &self.master_pem(), &self.master_key()];
        let next = self.next();
        if next.ca_pem().is_file() {
            // A rotation's overlap: hosts may already serve certificates of the next CA.
            return tls::client_config_trusting(
                files.map(PathBuf::as_path),
                [&self.ca_pem(), &next.ca_pem()],
                [&crl, &next.crl_pem()],
            );
        }
        tls::client_config(files.map(PathBuf::as_path), Some(&crl), SentChain::Checked)
    }

    pub(crate) fn load_ca(&self) -> Result<Ca> {
        Ca::load(&self.ca_pem(), &self.path.join(CA_KEY))
    }

    /// Bundle directories: entries of `hosts/` whose names are valid host ids
    /// (which skips staging directories, whose names start with a dot).
    fn host_dirs(&self) -> Result<Vec<PathBuf>> {
        let hosts = self.path.join(HOSTS_DIR);
        let entries = match fs::read_dir(&hosts) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(&hosts, e)),
        };
        let mut dirs = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&hosts, e))?;
            let path = entry.path();
            let is_bundle = entry
                .file_name()
                .to_str()
                .is_some_and(|n| validate_host_id(n).is_ok())
                && path.join(HOST_PEM).is_file();
            if is_bundle {
                dirs.push(path);
            } else if !entry.file_name().to_string_lossy().starts_with('.') {
                warn!(path = %path.display(), "not a host bundle; ignored");
            }
        }
        Ok(dirs)
    }
}

fn validate_cluster_name(name: &str) -> Result<()> {
    let reason = if name.trim().is_empty() {
        Some("a cluster name must not be empty".to_string())
    } else if name.chars().count() > MAX_CLUSTER_NAME {
        Some(format!("at most {MAX_CLUSTER_NAME} characters"))
    } else if name.chars().any(char::is_control) {
        Some("control characters are not allowed".to_string())
    } else {
        None
    };
    Error::name_check(name, reason)
}

/// Writes a complete bundle into the new directory `dir`.
fn write_bundle(dir: &Path, ca: &Ca, host: &crate::pki::Issued, crl: &[u8]) -> Result<()> {
    files::create_dir_private(dir)?;
    let contents = [
        (CA_PEM, ca.cert_pem.as_bytes(), PUBLIC_MODE),
        (HOST_KEY, host.key_pem.as_bytes(), KEY_MODE),
        (HOST_PEM, host.cert_pem.as_bytes(), PUBLIC_MODE),
        (CRL_PEM, crl, PUBLIC_MODE),
    ];
    for (name, bytes, mode) in contents {
        files::write_atomic(&dir.join(name), bytes, mode, Existing::Refuse)?;
    }
    Ok(())
}

/// Moves the finished bundle `staging` to `dest`, replacing any old bundle.
///
/// Two renames (old bundle aside, new one in); a crash between them leaves the
/// old bundle under a hidden `.<id>.old-*` name and no `<id>`, never a mix.
fn swap_in(staging: &Path, dest: &Path) -> Result<()> {
    let parent = dest.parent().unwrap_or(Path::new("."));
    let old = if dest.symlink_metadata().is_ok() {
        let old = files::staging_name(dest, "old");
        fs::rename(dest, &old).map_err(|e| Error::io(dest, e))?;
        Some(old)
    } else {
        None
    };
    if let Err(e) = fs::rename(staging, dest) {
        if let Some(old) = &old {
            let _ = fs::rename(old, dest);
        }
        return Err(Error::io(dest, e));
    }
    files::sync_dir(parent)?;
    if let Some(old) = old {
        // The new bundle is in place; a leftover hidden directory is only untidy.
        if let Err(e) = fs::remove_dir_all(&old) {
            warn!(path = %old.display(), error = %e, "could not remove the replaced bundle");
        }
    }
    Ok(())
}
