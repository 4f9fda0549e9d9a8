//! `Unpack`: safe, atomic unpacking of `.tar.gz` and `.tar` archives under the root.
//!
//! The archive is opened once: hashed (and checked against the request's digest), then
//! read again from the same open file, so a concurrent `WriteFile` replacing it cannot
//! slip other content in between. Its entries are walked ([`entries`]) into a fresh
//! staging directory `.erel/unpack/<unique>/tree/`, with every path and link kept inside
//! it ([`confine`]). On any error the staging directory is removed: `dest` does not exist
//! and nothing outside the staging directory was written.
//!
//! When the tree is complete it is synced (`syncfs`), its marker is written
//! ([`marker`]), and it is renamed onto `dest` without replacing anything
//! (`renameat2(RENAME_NOREPLACE)` where available), and the parent is synced.
//!
//! # Idempotency
//!
//! An `Unpack` whose `dest` exists counts as done only when the marker names the same
//! digest *and* the same device, inode and birth time as `dest`: a crash between marker
//! and rename leaves a marker for a `dest` that does not exist (ignored and rewritten by
//! the next attempt), and a `dest` that something else put there is a `Conflict`, never
//! a false `already`. (On a file system that records no birth time, a directory made at
//! `dest` that reuses the tree's inode number would be taken for it; only the agent
//! writes under the root, so that needs a person to replace the directory by hand.) A
//! restored backup has new inodes: a `Conflict`, which is the safe answer. When the
//! request names the digest, a done `dest` is answered without reading the archive.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use erel_proto::{Sha256, Unpack, Unpacked};

use crate::digest;
use crate::error::{Error, IoContext, Result};
use crate::fs::{empty_dir, sync_dir, unique_name, PathLock, Root, State};
use crate::settings::Limits;

mod confine;
mod entries;
mod marker;
mod pax;
mod sparse;
mod stream;

#[cfg(test)]
mod differential;
#[cfg(test)]
mod tests;

pub(crate) use marker::{marker_path, markers_in_use, read_marker, Marker};

/// Unpacks `request.archive` into `request.dest` through a staging directory. Blocking.
pub(crate) fn unpack(root: &Root, request: &Unpack, limits: &Limits) -> Result<Unpacked> {
    let archive_path = root.resolve(&request.archive)?;
    let dest = root.resolve(&request.dest)?;
    let dest_rel = root.relative(&dest);
    let _lock = PathLock::acquire(dest.clone(), &request.dest)?;
    let done = |sha256: Sha256| {
        marker::current(root, &dest, &dest_rel)
            .filter(|marker| marker.sha256 == sha256.to_hex())
            .map(|marker| marker.unpacked(sha256, true))
    };
    if let Some(done) = request.sha256.and_then(done) {
        return Ok(done);
    }

    let mut file = open_archive(&archive_path, &request.archive)?;
    let sha256 = digest::of_open_file(&mut file, &archive_path)?;
    if let Some(expected) = request.sha256.filter(|expected| *expected != sha256) {
        return Err(Error::ChecksumMismatch {
            path: request.archive.clone(),
            reason: format!("archive has sha256 {sha256}, the request names {expected}"),
        });
    }
    if let Some(done) = done(sha256) {
        return Ok(done);
    }
    check_free(root, &dest, &dest_rel, &request.dest)?;

    let staging = root.state(State::Unpack).join(unique_name());
    let tree = staging.join("tree");
    make_dir(&staging)?;
    let outcome = (|| {
        let counts = entries::extract(file, &request.archive, &tree, limits)?;
        sync_tree(&tree)?;
        let archive = root.relative(&archive_path);
        let marker = Marker::of_tree(&tree, &dest_rel, archive, sha256, counts)?;
        let marker_file = marker.write(root)?;
        place(root, &tree, &dest, &request.dest).inspect_err(|_| {
            // The marker names an inode that is not at `dest`; remove it anyway.
            let _ = fs::remove_file(&marker_file);
        })?;
        Ok(marker.unpacked(sha256, false))
    })();
    // On success the tree was renamed away and this removes an empty directory; on
    // failure it removes everything that was written.
    if let Err(e) = fs::remove_dir_all(&staging) {
        // Removed at the next start by `sweep_stale`; the unpack itself is settled.
        tracing::warn!(path = %staging.display(), error = %e, "could not remove unpack staging");
    }
    outcome
}

/// Creates a directory only the agent can enter.
fn make_dir(path: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .mode(0o700)
        .create(path)
        .io("create staging directory", path)
}

/// Refuses a `dest` that exists (and was found not done), saying what it holds.
fn check_free(root: &Root, dest: &Path, dest_rel: &str, dest_name: &str) -> Result<()> {
    let reason = match fs::symlink_metadata(dest) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("inspect", dest, e)),
        Ok(meta) if !meta.is_dir() => {
            "exists and is not a directory; unpack into a path that does not exist".into()
        }
        Ok(_) => match marker::current(root, dest, dest_rel) {
            Some(marker) => format!(
                "holds what was unpacked from {} (sha256 {}), not this archive",
                marker.archive, marker.sha256
            ),
            None => format!(
                "exists as a directory with {} entries that this agent did not unpack from \
                 this archive; remove it or unpack elsewhere",
                fs::read_dir(dest).map(|d| d.count()).unwrap_or(0)
            ),
        },
    };
    Err(Error::Conflict {
        path: dest_name.to_string(),
        reason,
    })
}

/// Creates `dest`'s parents (refusing, as [`Root::resolve`] does, a symlink that
/// appeared on the way) and renames `tree` onto `dest` without replacing anything, then
/// syncs the parent directory.
fn place(root: &Root, tree: &Path, dest: &Path, dest_name: &str) -> Result<()> {
    root.create_parents(dest_name)?;
    match rename_no_replace(tree, dest) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists || dest.exists() => {
            return Err(Error::Conflict {
                path: dest_name.to_string(),
                reason: "appeared while the archive was being unpacked".into(),
            });
        }
        Err(e) => return Err(Error::io("rename into place", dest, e)),
    }
    sync_dir(dest.parent().unwrap_or(root.path()))
}

/// Renames without replacing an existing `to`.
fn rename_no_replace(from: &Path, to: &Path) -> io::Result<()> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use nix::errno::Errno;
        use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
        match renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE) {
            Ok(()) => return Ok(()),
            // File systems without RENAME_NOREPLACE: fall back to check, then rename.
            Err(Errno::EINVAL) | Err(Errno::ENOSYS) => {}
            Err(errno) => return Err(io::Error::from(errno)),
        }
    }
    if fs::symlink_metadata(to).is_ok() {
        return Err(io::ErrorKind::AlreadyExists.into());
    }
    fs::rename(from, to)
}

/// Makes everything written under `tree` durable.
fn sync_tree(tree: &Path) -> Result<()> {
    let dir = File::open(tree).io("open", tree)?;
    nix::unistd::syncfs(&dir).io("sync file system of", tree)
}

/// Opens the archive: it must exist and be a regular file.
fn open_archive(path: &Path, name: &str) -> Result<File> {
    let what = match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_file() => {
            return File::open(path).io("open", path);
        }
        Ok(_) => "archive (as a regular file)",
        Err(e) if e.kind() == io::ErrorKind::NotFound => "archive",
        Err(e) => return Err(Error::io("inspect", path, e)),
    };
    Err(Error::NotFound {
        what,
        path: name.to_string(),
    })
}

/// Removes staging directories left by an unpack interrupted by a crash. Run at startup,
/// before any request is served.
pub(crate) fn sweep_stale(root: &Root) -> Result<()> {
    empty_dir(&root.state(State::Unpack))
}
