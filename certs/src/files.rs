//! Atomic, permission-aware file writes.
//!
//! Every file is written to a temporary name in its final directory, fsynced, and
//! then moved into place, so a reader sees either the old contents or the new, never
//! a torn file. Key files are created with mode 0600 from their first byte.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// Mode of private key files.
pub(crate) const KEY_MODE: u32 = 0o600;
/// Mode of certificates and CRLs.
pub(crate) const PUBLIC_MODE: u32 = 0o644;
/// Mode of directories this crate creates (they hold keys).
pub(crate) const DIR_MODE: u32 = 0o700;

/// What to do when the destination already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Existing {
    /// Replace it atomically.
    Replace,
    /// Fail with [`Error::AlreadyExists`]; checked atomically (hard link, not rename).
    Refuse,
}

/// Writes `bytes` to `path` with `mode`, atomically.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32, existing: Existing) -> Result<()> {
    let dir = parent_of(path);
    let (tmp, mut file) = create_temp(path, mode)?;
    let written = write_and_sync(&mut file, bytes, mode)
        .map_err(|e| Error::io(&tmp, e))
        .and_then(|()| {
            drop(file);
            match existing {
                Existing::Replace => fs::rename(&tmp, path).map_err(|e| Error::io(path, e)),
                Existing::Refuse => match fs::hard_link(&tmp, path) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        Err(Error::AlreadyExists {
                            path: path.to_path_buf(),
                        })
                    }
                    Err(e) => Err(Error::io(path, e)),
                },
            }
        });
    // After a rename the temp name is gone; after a hard link or a failure it
    // must be removed. A failure to remove it is not worth reporting.
    let _ = fs::remove_file(&tmp);
    written?;
    sync_dir(dir)
}

/// Creates `dir` and its parents with mode 0700 where they do not exist.
pub(crate) fn create_dir_private(dir: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(|e| Error::io(dir, e))
}

/// Fsyncs a directory so renames inside it survive a crash.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// Reads a whole file, mapping "not found" to [`Error::Missing`].
pub(crate) fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(|e| not_found_or_io(path, e))
}

/// Reads a whole UTF-8 file, mapping "not found" to [`Error::Missing`].
pub(crate) fn read_to_string(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|e| not_found_or_io(path, e))
}

/// [`Error::Missing`] for a missing file, [`Error::Io`] otherwise.
pub(crate) fn not_found_or_io(path: &Path, e: io::Error) -> Error {
    if e.kind() == io::ErrorKind::NotFound {
        Error::Missing {
            path: path.to_path_buf(),
        }
    } else {
        Error::io(path, e)
    }
}

/// A unique hidden name next to `path`, for staging.
pub(crate) fn staging_name(path: &Path, tag: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    parent_of(path).join(format!(".{name}.{tag}-{}-{n}", std::process::id()))
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Creates a fresh temporary file next to `path`, with `mode` from the start.
fn create_temp(path: &Path, mode: u32) -> Result<(PathBuf, File)> {
    // A stale temp file left by a crashed process with a reused pid could collide;
    // try a few names before giving up.
    let mut last = None;
    for _ in 0..8 {
        let tmp = staging_name(path, "tmp");
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some((tmp, e)),
            Err(e) => return Err(not_found_or_io(parent_of(path), e)),
        }
    }
    match last {
        Some((tmp, e)) => Err(Error::io(tmp, e)),
        None => Err(Error::io(
            path,
            io::Error::other("no temporary name available"),
        )),
    }
}

fn write_and_sync(file: &mut File, bytes: &[u8], mode: u32) -> io::Result<()> {
    // The umask may have narrowed the mode; set it exactly. It never widens
    // beyond `mode`, so a key file is 0600 (or narrower) at every instant.
    file.set_permissions(Permissions::from_mode(mode))?;
    file.write_all(bytes)?;
    file.sync_all()
}
