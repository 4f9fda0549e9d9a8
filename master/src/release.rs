//! Release tarballs built on the spot, relx-style: no top directory, `bin/<name>` starts
//! the release, `releases/<version>/RELEASE` stands in for `start.boot`. `erel demo`
//! deploys the beat release built here, and the end-to-end tests build theirs the same
//! way.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// One file of a release tarball.
#[derive(Clone)]
pub struct ReleaseFile {
    /// Its path inside the tarball.
    pub path: String,
    /// Its bytes.
    pub data: Vec<u8>,
    /// Its mode.
    pub mode: u32,
}

impl std::fmt::Debug for ReleaseFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReleaseFile")
            .field("path", &self.path)
            .field("size", &self.data.len())
            .field("mode", &format_args!("{:o}", self.mode))
            .finish()
    }
}

impl ReleaseFile {
    /// `bin/<name>` = `script`, executable.
    pub fn start_script(name: &str, script: &str) -> Self {
        ReleaseFile {
            path: format!("bin/{name}"),
            data: script.as_bytes().to_vec(),
            mode: 0o755,
        }
    }

    /// The `releases/<version>/RELEASE` marker.
    pub fn marker(name: &str, version: &str) -> Self {
        ReleaseFile {
            path: format!("releases/{version}/RELEASE"),
            data: format!("{name} {version}\n").into_bytes(),
            mode: 0o644,
        }
    }

    /// The local program `program`, as the executable `path` inside.
    pub fn program(path: &str, program: &Path) -> Result<Self> {
        let data = std::fs::read(program).map_err(|e| Error::local(program, e))?;
        Ok(ReleaseFile {
            path: path.to_string(),
            data,
            mode: 0o755,
        })
    }
}

/// Writes `dir/<name>-<version>.tar.gz` holding `files` in order; returns its path.
pub fn write_tarball(
    dir: &Path,
    name: &str,
    version: &str,
    files: &[ReleaseFile],
) -> Result<PathBuf> {
    let path = dir.join(format!("{name}-{version}.tar.gz"));
    let failed = |e: std::io::Error| Error::local(&path, e);
    let file = std::fs::File::create(&path).map_err(failed)?;
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    for file in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(file.data.len() as u64);
        header.set_mode(file.mode);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mtime(1_700_000_000);
        tar.append_data(&mut header, &file.path, file.data.as_slice())
            .map_err(failed)?;
    }
    let mut gz = tar.into_inner().map_err(failed)?;
    gz.flush().map_err(failed)?;
    gz.finish().map_err(failed)?;
    Ok(path)
}

/// The beat release: `server` packed as `bin/beat-server`, run by `bin/<name>` from the
/// release's directory with `server_args` before the script's own arguments. A `fail`
/// mode is baked in as `BEAT_FAIL` (`exit`: the server dies at once with code 3;
/// `silent`: it never listens), so the release is broken on purpose.
#[derive(Debug, Clone, Copy)]
pub struct BeatRelease<'a> {
    /// Release name.
    pub name: &'a str,
    /// Version.
    pub version: &'a str,
    /// The server program to pack.
    pub server: &'a Path,
    /// Arguments the start script passes the server first.
    pub server_args: &'a [&'a str],
    /// `BEAT_FAIL`, when the release is broken on purpose.
    pub fail: Option<&'a str>,
}

impl BeatRelease<'_> {
    /// Writes `dir/<name>-<version>.tar.gz`; returns its path.
    pub fn write(&self, dir: &Path) -> Result<PathBuf> {
        let fail = self
            .fail
            .map(|mode| format!("BEAT_FAIL={mode} "))
            .unwrap_or_default();
        let args: String = self.server_args.iter().map(|a| format!("{a} ")).collect();
        let script = format!(
            "#!/bin/sh\ncd \"$(dirname \"$0\")/..\"\n{fail}exec bin/beat-server {args}\"$@\"\n"
        );
        let files = [
            ReleaseFile::start_script(self.name, &script),
            ReleaseFile::program("bin/beat-server", self.server)?,
            ReleaseFile::marker(self.name, self.version),
        ];
        write_tarball(dir, self.name, self.version, &files)
    }
}
