//! Rotating the cluster CA from the master: the files a rotation keeps, and the
//! bundles it pushes.
//!
//! ```text
//! <certs>/next/         the next CA while a rotation is in its overlap: a certificate
//!                       directory of its own (ca.pem, ca.key, master.*, crl.pem, hosts/)
//! <certs>/previous/     the CA a rotation replaced, until every host holds the final bundle
//! <certs>/archive/<T>/  replaced CAs, T the Unix time the rotation ended
//! ```
//!
//! 1. [`MasterDir::begin_rotation`] makes `next/`: a new CA, a new master certificate,
//!    an empty CRL, and a new certificate for each host with the names of its current
//!    one. From then on [`MasterDir::client_config`] trusts both CAs.
//! 2. Each host is pushed [`MasterDir::overlap_bundle`] (both CAs trusted, both CRLs,
//!    its new certificate), and proved with [`MasterDir::next_proof_config`].
//! 3. [`MasterDir::switch_to_next`] moves the current files to `previous/` and those
//!    of `next/` in their place: the master now presents its new certificate.
//! 4. Each host is pushed its final bundle ([`PushedBundle::from_dir`] of
//!    `hosts/<id>/`: the new CA only), proved with the new master's configuration.
//! 5. [`MasterDir::archive_previous`] moves `previous/` under `archive/`.

use std::fs;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::files;
use crate::layout::{CA_KEY, CA_PEM, CRL_PEM, HOSTS_DIR, HOST_PEM, MASTER_KEY, MASTER_PEM};
use crate::{MasterDir, PushedBundle};

/// The next CA's directory during a rotation.
const NEXT: &str = "next";
/// The replaced CA's directory until a rotation ends.
const PREVIOUS: &str = "previous";
/// Where replaced CAs are kept.
const ARCHIVE: &str = "archive";
/// What moves from one CA's directory to another.
const MOVED: [&str; 6] = [CA_KEY, CA_PEM, MASTER_KEY, MASTER_PEM, CRL_PEM, HOSTS_DIR];

impl MasterDir {
    /// The next CA's directory (`next/`), whether or not a rotation is under way.
    pub fn next(&self) -> MasterDir {
        MasterDir::new(self.path().join(NEXT))
    }

    /// The replaced CA's directory (`previous/`), present between
    /// [`MasterDir::switch_to_next`] and [`MasterDir::archive_previous`].
    pub fn previous(&self) -> MasterDir {
        MasterDir::new(self.path().join(PREVIOUS))
    }

    /// Makes the next CA in `next/` (unless a rotation already began: then it is
    /// kept) and a certificate from it for each of `hosts` that has none there yet,
    /// with the names of the host's current certificate.
    ///
    /// Errors: [`Error::MissingCa`] without a current CA; [`Error::InvalidName`] for
    /// a host id; I/O and rcgen errors naming the file.
    pub fn begin_rotation(&self, hosts: &[&str]) -> Result<MasterDir> {
        let next = self.next();
        if !self.ca_pem().is_file() {
            return Err(Error::MissingCa {
                path: self.ca_pem(),
            });
        }
        if !next.ca_pem().is_file() {
            let current = crate::tls::load_certs(&self.ca_pem())?;
            let name = crate::peer_name(&current[0]).unwrap_or_else(|| "erel CA".into());
            let base: String = name
                .split(" #")
                .next()
                .unwrap_or(&name)
                .chars()
                .take(48)
                .collect();
            let stamp = time::OffsetDateTime::now_utc().unix_timestamp();
            next.create(&format!("{base} #{stamp}"))?;
        }
        for id in hosts {
            if next.host_dir(id).join(HOST_PEM).is_file() {
                continue;
            }
            let (ips, dns) = self.host_names(id)?;
            next.issue_host(id, &ips, &dns)?;
        }
        Ok(next)
    }

    /// The IP addresses and DNS names (besides the id) of host `id`'s current
    /// certificate; none when it has no bundle here.
    fn host_names(&self, id: &str) -> Result<(Vec<IpAddr>, Vec<String>)> {
        use x509_parser::extensions::GeneralName;
        let path = self.host_dir(id).join(HOST_PEM);
        if !path.is_file() {
            return Ok((Vec::new(), Vec::new()));
        }
        let certs = crate::tls::load_certs(&path)?;
        let (_, cert) = x509_parser::parse_x509_certificate(certs[0].as_ref())
            .map_err(|e| Error::parse(&path, format!("not a valid certificate: {e}")))?;
        let (mut ips, mut dns) = (Vec::new(), Vec::new());
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(name) if *name != id => dns.push(name.to_string()),
                    GeneralName::IPAddress(bytes) => {
                        if let Ok(octets) = <[u8; 4]>::try_from(*bytes) {
                            ips.push(IpAddr::from(octets));
                        } else if let Ok(octets) = <[u8; 16]>::try_from(*bytes) {
                            ips.push(IpAddr::from(octets));
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok((ips, dns))
    }

    /// Host `id`'s bundle of an overlap: its certificate from this directory's CA,
    /// trusting that CA and `old`'s, with both CRLs, so masters of either are accepted.
    /// Before the switch this is `next/` with the current directory as `old`; after
    /// it, the current directory with `previous/`.
    pub fn overlap_bundle(&self, old: &MasterDir, id: &str) -> Result<PushedBundle> {
        let crls = format!(
            "{}{}",
            files::read_to_string(&self.crl_pem())?,
            files::read_to_string(&old.crl_pem())?
        );
        Ok(PushedBundle::from_dir(&self.host_dir(id))?
            .also_trusting(&files::read_to_string(&old.ca_pem())?)
            .with_crl(crls))
    }

    /// Issues a new master certificate and key in place of the current ones (after
    /// `revoke("master")`, for instance).
    pub fn renew_master(&self) -> Result<()> {
        let ca = self.load_ca()?;
        let master = ca.issue(&crate::pki::LeafSpec::new(
            crate::layout::MASTER_COMMON_NAME,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ))?;
        self.write_master(&master)
    }

    /// Replaces host `id`'s bundle by one with a new key and certificate naming what
    /// its current certificate names (after `revoke(id)`, for instance).
    pub fn renew_host(&self, id: &str) -> Result<PathBuf> {
        let (ips, dns) = self.host_names(id)?;
        self.replace_host(id, &ips, &dns)
    }

    /// Host `id`'s bundle as this directory holds it (`hosts/<id>/`), with the
    /// current `crl.pem`.
    pub fn host_bundle(&self, id: &str) -> Result<PushedBundle> {
        Ok(PushedBundle::from_dir(&self.host_dir(id))?
            .with_crl(files::read_to_string(&self.crl_pem())?))
    }

    /// The configuration that pushes a revoked host its new certificate: the
    /// master's (see [`MasterDir::client_config`]) without the CRL check, so the
    /// host's own revoked certificate is let in for that push. The chain to `ca.pem`
    /// and the host's name are still checked. During an overlap (`next/ca.pem`
    /// exists) it is [`MasterDir::client_config`] itself.
    ///
    /// Errors: those of [`MasterDir::client_config`].
    pub fn revoked_host_push_config(&self) -> Result<Arc<rustls::ClientConfig>> {
        if self.next().ca_pem().is_file() {
            return self.client_config();
        }
        let files = [self.ca_pem(), self.master_pem(), self.master_key()];
        crate::tls::client_config(
            [&files[0], &files[1], &files[2]].map(PathBuf::as_path),
            None,
            crate::tls::SentChain::Checked,
        )
    }

    /// The configuration that proves a host holds its next certificate: presents the
    /// current master certificate and trusts the next CA alone, with its CRL.
    pub fn next_proof_config(&self) -> Result<Arc<rustls::ClientConfig>> {
        let next = self.next();
        let files = [self.ca_pem(), self.master_pem(), self.master_key()];
        crate::tls::client_config_trusting(
            [&files[0], &files[1], &files[2]].map(PathBuf::as_path),
            [next.ca_pem().as_path()],
            [next.crl_pem().as_path()],
        )
    }

    /// Whether a switch began and did not end (a crash in the middle): `previous/`
    /// and `next/` both present. [`MasterDir::switch_to_next`] finishes it.
    pub fn switch_interrupted(&self) -> bool {
        self.previous().path().exists() && self.next().path().exists()
    }

    /// Moves the current CA's files to `previous/` and the next CA's in their place;
    /// `next/` is removed. From then on the master presents its new certificate.
    ///
    /// Each of the twelve renames is made only when still to do (a name is in
    /// `previous/` once its first move is done, and gone from `next/` once its second
    /// is), so a switch stopped at any point is finished by calling this again.
    ///
    /// Errors: [`Error::Missing`] when a CA file to move is in neither place; I/O
    /// errors naming the file.
    pub fn switch_to_next(&self) -> Result<()> {
        self.switch_stopping_after(usize::MAX)
    }

    /// [`MasterDir::switch_to_next`], stopping after `renames` renames (to test a
    /// crash in the middle).
    fn switch_stopping_after(&self, renames: usize) -> Result<()> {
        let (next, previous) = (self.next(), self.previous());
        files::create_dir_private(previous.path())?;
        // Every name is in both directories before its first move, so a name's
        // place alone says which of its moves are done.
        for name in MOVED {
            if previous.path().join(name).symlink_metadata().is_ok() {
                continue;
            }
            for dir in [self, &next] {
                let path = dir.path().join(name);
                if path.symlink_metadata().is_err() {
                    if name != HOSTS_DIR {
                        return Err(Error::Missing { path });
                    }
                    files::create_dir_private(&path)?;
                }
            }
        }
        let mut done = 0;
        let mut rename = |from: PathBuf, to: PathBuf| -> Result<bool> {
            if done == renames {
                return Ok(false);
            }
            fs::rename(&from, &to).map_err(|e| Error::io(&to, e))?;
            done += 1;
            Ok(true)
        };
        for name in MOVED {
            let kept = previous.path().join(name);
            if kept.symlink_metadata().is_err() && !rename(self.path().join(name), kept)? {
                return Ok(());
            }
        }
        files::sync_dir(previous.path())?;
        for name in MOVED {
            let from = next.path().join(name);
            if from.symlink_metadata().is_ok() && !rename(from, self.path().join(name))? {
                return Ok(());
            }
        }
        files::sync_dir(self.path())?;
        fs::remove_dir_all(next.path()).map_err(|e| Error::io(next.path(), e))?;
        files::sync_dir(self.path())?;
        tracing::info!(dir = %self.path().display(), "switched to the next CA");
        Ok(())
    }

    /// Moves `previous/` to `archive/<unix time>/` and returns that directory.
    pub fn archive_previous(&self) -> Result<PathBuf> {
        let archive = self.path().join(ARCHIVE);
        files::create_dir_private(&archive)?;
        let stamp = time::OffsetDateTime::now_utc().unix_timestamp();
        let to = archive.join(stamp.to_string());
        fs::rename(self.previous().path(), &to).map_err(|e| Error::io(&to, e))?;
        files::sync_dir(self.path())?;
        Ok(to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes of `name` under `dir` (a file) or of its host `a`'s certificate
    /// (for `hosts/`).
    fn content(dir: &MasterDir, name: &str) -> Vec<u8> {
        let path = if name == HOSTS_DIR {
            dir.host_dir("a").join(HOST_PEM)
        } else {
            dir.path().join(name)
        };
        fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn a_switch_stopped_after_any_rename_is_finished_by_the_next_call() {
        for k in 0..=2 * MOVED.len() {
            let tmp = tempfile::tempdir().expect("tempdir");
            let certs = MasterDir::new(tmp.path().join("certs"));
            certs.init("test").expect("init");
            certs.issue_host("a", &[], &[]).expect("host");
            let next = certs.begin_rotation(&["a"]).expect("begin");
            let old: Vec<_> = MOVED.iter().map(|n| content(&certs, n)).collect();
            let new: Vec<_> = MOVED.iter().map(|n| content(&next, n)).collect();

            certs.switch_stopping_after(k).expect("switch stopped");
            if k < 2 * MOVED.len() {
                assert!(certs.switch_interrupted(), "after {k} renames");
                certs.switch_to_next().expect("switch finished");
            }

            assert!(!certs.switch_interrupted(), "after {k} renames");
            assert!(!next.path().exists(), "after {k} renames");
            for (i, name) in MOVED.iter().enumerate() {
                assert_eq!(content(&certs, name), new[i], "{name} after {k} renames");
                assert_eq!(
                    content(&certs.previous(), name),
                    old[i],
                    "previous/{name} after {k} renames"
                );
            }
            certs
                .client_config()
                .expect("the new master's configuration");
        }
    }
}
