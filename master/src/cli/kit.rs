//! Host kits (`erel certs host ID --kit FILE.tar.gz`): one archive with everything a
//! blank host needs to run the agent.
//!
//! ```text
//! erel-host-<ID>/
//!     erel-boot            the agent binary (0755)
//!     certs/               the host's bundle (0700): ca.pem host.pem host.key (0600) crl.pem
//!     boot.toml            the shipped boot.toml.example, listening where asked
//!     erel-boot.service    the shipped systemd unit, unchanged
//!     install.sh           the idempotent installer (0755)
//!     README.md            what the kit holds and how to install it
//! ```

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};

use erel_certs::layout::{CA_PEM, CRL_PEM, HOST_KEY, HOST_PEM};
use flate2::write::GzEncoder;
use flate2::Compression;

use crate::error::{Error, Result};

/// The installer, the same for every host.
const INSTALL_SH: &str = include_str!("../../../boot/kit/install.sh");
/// The kit's README; `@ID@` and `@LISTEN@` are replaced.
const README: &str = include_str!("../../../boot/kit/README.md");
/// The agent's settings as shipped, with every default spelled out.
const BOOT_TOML: &str = include_str!("../../../boot/boot.toml.example");
/// The agent's hardened systemd unit, shipped as is.
const UNIT: &str = include_str!("../../../boot/erel-boot.service");
/// The `listen` line of [`BOOT_TOML`], which a kit replaces.
const SHIPPED_LISTEN: &str = "listen = \"0.0.0.0:7070\"\n";

/// The agent's listen address when `--listen` is not given (the agent's own default).
pub(super) const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 7070));
/// The agent binary's file name, in the kit and beside `erel` by default.
const AGENT_NAME: &str = "erel-boot";

/// What goes into one host's kit.
#[derive(Debug)]
pub(super) struct Kit<'a> {
    /// The host id.
    pub(super) id: &'a str,
    /// The host's bundle directory (`hosts/<ID>/`).
    pub(super) bundle: &'a Path,
    /// The agent binary to ship.
    pub(super) agent: &'a Path,
    /// Where the agent listens, written into `boot.toml`.
    pub(super) listen: SocketAddr,
}

/// The agent binary to ship: `given`, else `erel-boot` in the directory of the running
/// `erel`. Refuses, naming the path, when it is not a file.
pub(super) fn agent_binary(given: Option<PathBuf>) -> Result<PathBuf> {
    let path = match given {
        Some(path) => path,
        None => std::env::current_exe()
            .map_err(|e| Error::Usage(format!("cannot find the running erel program: {e}")))?
            .with_file_name(AGENT_NAME),
    };
    if !path.is_file() {
        return Err(Error::local(
            &path,
            "no agent binary here: build the static agent with scripts/build-agent.sh, \
             or name one with --agent FILE",
        ));
    }
    Ok(path)
}

/// Refuses, before anything is issued, a kit path that exists unless `force`.
pub(super) fn check_target(path: &Path, force: bool) -> Result<()> {
    if !force && path.symlink_metadata().is_ok() {
        return Err(exists(path));
    }
    Ok(())
}

fn exists(path: &Path) -> Error {
    Error::local(
        path,
        "already exists (a kit holds a host key): --force replaces it, and the host's bundle",
    )
}

/// Writes `kit` to `path` durably and with mode 0600 (it holds the host's key): to a
/// temporary file in the same directory, fsynced, renamed into place (over an existing
/// file only when `force`), the directory fsynced. Errors name the file at fault.
pub(super) fn write(kit: &Kit<'_>, path: &Path, force: bool) -> Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::local(dir, format!("cannot create the directory: {e}")))?;
    // A temporary file is created with mode 0600.
    let staging = tempfile::Builder::new()
        .prefix(".erel-kit.")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|e| Error::local(dir, format!("cannot create a temporary file: {e}")))?;
    let gz = GzEncoder::new(BufWriter::new(staging.as_file()), Compression::default());
    let mut tar = tar::Builder::new(gz);
    kit.append_to(&mut tar)?;
    tar.into_inner()
        .and_then(GzEncoder::finish)
        .and_then(|mut out| out.flush())
        .and_then(|()| staging.as_file().sync_all())
        .map_err(|e| Error::local(staging.path(), format!("cannot write: {e}")))?;
    let persisted = if force {
        staging.persist(path)
    } else {
        staging.persist_noclobber(path)
    };
    persisted.map_err(|e| match e.error.kind() {
        std::io::ErrorKind::AlreadyExists => exists(path),
        _ => Error::local(path, format!("cannot rename into place: {}", e.error)),
    })?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::local(dir, format!("cannot sync the directory: {e}")))
}

impl Kit<'_> {
    /// The one top directory of the archive.
    fn top(&self) -> String {
        format!("erel-host-{}", self.id)
    }

    /// The kit's `boot.toml`: the shipped example, listening on [`Kit::listen`].
    fn boot_toml(&self) -> String {
        let listen = format!("listen = \"{}\"\n", self.listen);
        format!(
            "# Settings of the erel boot agent on host {}, from its kit.\n{}",
            self.id,
            BOOT_TOML.replacen(SHIPPED_LISTEN, &listen, 1)
        )
    }

    fn append_to<W: Write>(&self, tar: &mut tar::Builder<W>) -> Result<()> {
        let top = self.top();
        let text = |name: &str, mode: u32, body: &str| Entry {
            path: format!("{top}/{name}"),
            mode,
            body: Body::Bytes(body.as_bytes().to_vec()),
        };
        let readme = README
            .replace("@ID@", self.id)
            .replace("@LISTEN@", &self.listen.to_string());
        let mut entries = vec![
            Entry::dir(&top, 0o755),
            text("README.md", 0o644, &readme),
            text("install.sh", 0o755, INSTALL_SH),
            Entry {
                path: format!("{top}/{AGENT_NAME}"),
                mode: 0o755,
                body: Body::File(self.agent.to_path_buf()),
            },
            text("boot.toml", 0o644, &self.boot_toml()),
            text("erel-boot.service", 0o644, UNIT),
            Entry::dir(&format!("{top}/certs"), 0o700),
        ];
        for (name, mode) in [
            (CA_PEM, 0o644),
            (HOST_PEM, 0o644),
            (HOST_KEY, 0o600),
            (CRL_PEM, 0o644),
        ] {
            entries.push(Entry {
                path: format!("{top}/certs/{name}"),
                mode,
                body: Body::File(self.bundle.join(name)),
            });
        }
        let mtime = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        for entry in entries {
            entry.append(tar, mtime)?;
        }
        Ok(())
    }
}

/// One member of the archive.
struct Entry {
    path: String,
    mode: u32,
    body: Body,
}

/// What a member holds.
enum Body {
    Dir,
    Bytes(Vec<u8>),
    /// A local file, streamed.
    File(PathBuf),
}

impl Entry {
    fn dir(path: &str, mode: u32) -> Self {
        Entry {
            path: format!("{path}/"),
            mode,
            body: Body::Dir,
        }
    }

    /// Appends this member, owned by root, modified at `mtime` (seconds since the epoch).
    fn append<W: Write>(self, tar: &mut tar::Builder<W>, mtime: u64) -> Result<()> {
        let mut header = tar::Header::new_gnu();
        let (data, size): (Box<dyn Read>, u64) = match self.body {
            Body::Dir => {
                header.set_entry_type(tar::EntryType::Directory);
                (Box::new(std::io::empty()), 0)
            }
            Body::Bytes(bytes) => {
                let size = bytes.len() as u64;
                (Box::new(std::io::Cursor::new(bytes)), size)
            }
            Body::File(source) => {
                let cannot = |e: std::io::Error| Error::local(&source, format!("cannot read: {e}"));
                let file = File::open(&source).map_err(cannot)?;
                let size = file.metadata().map_err(cannot)?.len();
                // A file that grows meanwhile is cut at the size announced.
                (Box::new(file.take(size)), size)
            }
        };
        header.set_size(size);
        header.set_mode(self.mode);
        header.set_mtime(mtime);
        header.set_uid(0);
        header.set_gid(0);
        header
            .set_username("root")
            .and_then(|()| header.set_groupname("root"))
            .and_then(|()| tar.append_data(&mut header, &self.path, data))
            .map_err(|e| Error::local(&self.path, format!("cannot add to the kit: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_boot_toml_listens_where_asked_and_keeps_the_paths_install_sh_rewrites() {
        assert_eq!(SHIPPED_LISTEN, format!("listen = \"{DEFAULT_LISTEN}\"\n"));
        assert!(BOOT_TOML.contains(SHIPPED_LISTEN));
        let kit = Kit {
            id: "web-1",
            bundle: Path::new("unused"),
            agent: Path::new("unused"),
            listen: "10.0.0.11:7443".parse().expect("addr"),
        };
        let text = kit.boot_toml();
        let lines: Vec<&str> = text.lines().collect();
        for line in [
            "listen = \"10.0.0.11:7443\"",
            "root = \"/var/lib/erel\"",
            "certs = \"/etc/erel/certs\"",
        ] {
            assert!(lines.contains(&line), "{line} not in:\n{text}");
        }
        assert!(UNIT
            .lines()
            .any(|l| l == "ExecStart=/usr/local/bin/erel-boot --config /etc/erel/boot.toml"));
        let value: toml::Table = toml::from_str(&text).expect("valid TOML");
        assert_eq!(value["listen"].as_str(), Some("10.0.0.11:7443"));
    }

    #[test]
    fn a_kit_holds_one_directory_with_the_agent_bundle_and_installer_in_their_modes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let master = erel_certs::MasterDir::new(dir.path().join("certs"));
        master.init("test").expect("init");
        let bundle = master.issue_host("web-1", &[], &[]).expect("bundle");
        let agent = dir.path().join("erel-boot");
        std::fs::write(&agent, b"\x7fELF agent").expect("write agent");
        let kit = Kit {
            id: "web-1",
            bundle: &bundle,
            agent: &agent,
            listen: DEFAULT_LISTEN,
        };
        let path = dir.path().join("kits/web-1.tar.gz");
        write(&kit, &path, false).expect("write kit");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).expect("kit").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let mut members = Vec::new();
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(
            File::open(&path).expect("open"),
        ));
        for entry in archive.entries().expect("entries") {
            let mut entry = entry.expect("entry");
            let name = entry.path().expect("path").display().to_string();
            let mode = entry.header().mode().expect("mode");
            let mut body = Vec::new();
            entry.read_to_end(&mut body).expect("read");
            members.push((name, mode, body));
        }
        let names: Vec<(&str, u32)> = members.iter().map(|(n, m, _)| (n.as_str(), *m)).collect();
        assert_eq!(
            names,
            [
                ("erel-host-web-1/", 0o755),
                ("erel-host-web-1/README.md", 0o644),
                ("erel-host-web-1/install.sh", 0o755),
                ("erel-host-web-1/erel-boot", 0o755),
                ("erel-host-web-1/boot.toml", 0o644),
                ("erel-host-web-1/erel-boot.service", 0o644),
                ("erel-host-web-1/certs/", 0o700),
                ("erel-host-web-1/certs/ca.pem", 0o644),
                ("erel-host-web-1/certs/host.pem", 0o644),
                ("erel-host-web-1/certs/host.key", 0o600),
                ("erel-host-web-1/certs/crl.pem", 0o644),
            ]
        );
        let body = |name: &str| {
            members
                .iter()
                .find(|(n, _, _)| n.ends_with(name))
                .map(|(_, _, b)| b.clone())
                .expect("member")
        };
        assert_eq!(body("/erel-boot"), b"\x7fELF agent");
        assert_eq!(body("erel-boot.service"), UNIT.as_bytes());
        assert_eq!(
            body("host.key"),
            std::fs::read(bundle.join(HOST_KEY)).expect("key")
        );

        let err = write(&kit, &path, false).expect_err("refused").to_string();
        assert!(
            err.contains("web-1.tar.gz") && err.contains("--force"),
            "{err}"
        );
        write(&kit, &path, true).expect("replaced with --force");
        let left: Vec<_> = std::fs::read_dir(path.parent().expect("dir"))
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(left, ["web-1.tar.gz"], "no temporary file left behind");
    }
}
