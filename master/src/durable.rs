//! The master's one durable write: a file is written to a temporary name in its
//! directory, fsynced, renamed over the old one, and the directory fsynced, so a crash
//! at any instant leaves the old contents or the new, never a mix. The state
//! directory's config and the digest cache's entries are written this way.

use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

/// Writes `dir/name` through a temporary file: write, fsync, rename, fsync the directory.
pub(crate) fn write(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::local(dir, format!("cannot create the directory: {e}")))?;
    let target = dir.join(name);
    let mut staging = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|e| Error::local(dir, format!("cannot create a temporary file: {e}")))?;
    staging
        .write_all(bytes)
        .and_then(|()| staging.as_file().sync_all())
        .map_err(|e| Error::local(staging.path(), format!("cannot write: {e}")))?;
    staging
        .persist(&target)
        .map_err(|e| Error::local(&target, format!("cannot rename into place: {}", e.error)))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::local(dir, format!("cannot sync the directory: {e}")))?;
    Ok(())
}
