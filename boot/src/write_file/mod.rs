//! `WriteFile`: resumable, verified, atomic file transfers into the root.
//!
//! [`transfer`] runs a transfer on a connection in three blocking steps:
//!
//! 1. [`offer`] checks the request (path, mode, size, free disk) and reports what the
//!    agent already holds: `size` when the destination already has the announced
//!    content, otherwise the bytes staged by an earlier, interrupted attempt.
//! 2. [`begin`] opens the staging file at the offset the master chose, and
//!    [`Receiver::write`] appends the raw bytes as they arrive, hashing them on the way
//!    (memory stays flat whatever the file size) and starting their write-out to the
//!    disk every few MiB, so the commit's `fsync` finds little left to write.
//! 3. [`Receiver::commit`] checks size and digest, fsyncs, applies the mode and renames
//!    the file into place, then fsyncs the directory. Nothing unverified is ever visible.
//!
//! Staged bytes live in `.erel/staging/<key>.part` (mode 0600). The key is
//! `sha-<digest>` when the master announced the digest, so a resume survives a change
//! of destination, and `path-<sha256 of the path>-<size>` otherwise. A receiver
//! dropped before its commit (a cut connection) syncs what it received, so the next
//! offer for the same file reports those bytes. Two transfers of the same key never
//! interleave: a new request for a key that another holds is a repeat after a cut (the
//! protocol lets the master repeat any command at once), so it takes the staging over.
//! The holder is asked to let go ([`Offer::wanted`]); it stops where it is, keeping its
//! bytes, and the new request resumes from them. Only a holder that does not let go
//! within [`TAKE_OVER_WAIT`] (it is committing) makes the new request [`Error::Busy`].
//! A write refused for lack of space (`ENOSPC`) is the exception: the staged bytes are
//! removed at once, so a full disk is not kept full by a transfer that cannot finish.
//! Parts nobody resumed are removed by [`sweep_stale`] when the agent starts.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use erel_proto::rules;
use erel_proto::{ErrorKind, Sha256, WriteFile, Written};
use sha2::{Digest, Sha256 as Hasher};

use crate::digest;
use crate::error::{Error, IoContext, Result};
use crate::fs::{
    free_disk, remove_if_present, rename_durably, start_writeback, PathLock, Root, State,
};
use crate::settings::Limits;

mod transfer;

pub(crate) use transfer::transfer;

/// Mode of staging files: only the agent reads what is not verified yet.
const PART_MODE: u32 = 0o600;

/// Staged bytes nobody resumed for this long are removed by [`sweep_stale`] at startup.
pub(crate) const STALE_STAGING_AGE: Duration = Duration::from_secs(3 * 24 * 3600);

/// Bytes a transfer writes before it starts their write-out to the disk
/// ([`start_writeback`]): the disk writes while the next bytes arrive, and the commit's
/// `fsync` waits for the last step only instead of the whole file. Large enough that the
/// system call is rare (32 per GiB), small enough that little is left at the commit.
const WRITEBACK_STEP: u64 = 32 * 1024 * 1024;

/// Suffix of staging files under `.erel/staging/`.
const PART_SUFFIX: &str = ".part";

/// How long a new `WriteFile` waits for an earlier transfer of the same key to let go
/// of its staging file before it is refused with [`Error::Busy`]. The holder lets go
/// at once unless it is verifying, syncing or renaming the file.
pub(crate) const TAKE_OVER_WAIT: Duration = Duration::from_secs(20);

/// What the agent already holds for a `WriteFile`, and the staging to continue it.
#[derive(Debug)]
pub(crate) struct Offer {
    /// Bytes already held (`size` when the destination already has this content).
    pub(crate) have: u64,
    /// Digest of those bytes.
    pub(crate) have_sha256: Sha256,
    target: Target,
    /// Hasher state after the `have` staged bytes, so resuming need not re-read them.
    hasher: Hasher,
    /// The destination already holds exactly the announced content.
    present: bool,
    _lock: PathLock,
}

/// Everything about a transfer that does not change once the request is checked.
#[derive(Debug, Clone)]
struct Target {
    /// The root the destination was resolved under.
    root: Root,
    /// The path as the master named it, for messages.
    name: String,
    /// The destination, absolute.
    dest: PathBuf,
    /// The staging file, absolute.
    part: PathBuf,
    mode: u32,
    size: u64,
    expected: Option<Sha256>,
}

/// Checks a `WriteFile` and finds what is already there. Blocking.
///
/// Refuses a path [`Root::resolve`] refuses, a mode with setuid, setgid or sticky bits
/// or above `0o777`, a size above [`Limits::max_file_bytes`], a destination that is a
/// directory or not a regular file, and a transfer that would eat into
/// [`Limits::disk_reserve_bytes`].
pub(crate) fn offer(root: &Root, request: &WriteFile, limits: &Limits) -> Result<Offer> {
    let dest = root.resolve(&request.path)?;
    let name = request.path.clone();
    check_mode(&name, request.mode)?;
    if request.size > limits.max_file_bytes {
        return Err(Error::TooLarge {
            what: format!("file size for {name}"),
            value: request.size,
            limit: limits.max_file_bytes,
        });
    }
    let existing = match fs::symlink_metadata(&dest) {
        Ok(meta) if meta.is_dir() => {
            return Err(conflict(&name, "is a directory; a file cannot replace it"))
        }
        Ok(meta) if !meta.is_file() => {
            return Err(conflict(&name, "exists and is not a regular file"))
        }
        Ok(meta) => Some(meta.len()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io("inspect", &dest, e)),
    };

    let key = match request.sha256 {
        Some(digest) => format!("sha-{}", digest.to_hex()),
        None => {
            let relative = root.relative(&dest);
            let path_digest = digest::of_bytes(relative.as_bytes());
            format!("path-{}-{}", path_digest.to_hex(), request.size)
        }
    };
    let part = root
        .state(State::Staging)
        .join(format!("{key}{PART_SUFFIX}"));
    let lock = PathLock::take_over(part.clone(), &name, TAKE_OVER_WAIT)?;
    let target = Target {
        root: root.clone(),
        name,
        dest,
        part,
        mode: request.mode,
        size: request.size,
        expected: request.sha256,
    };

    if let (Some(expected), Some(len)) = (request.sha256, existing) {
        if len == request.size && digest::of_file(&target.dest)? == expected {
            // Bytes staged by an earlier attempt are not needed any more.
            remove_if_present(&target.part)?;
            return Ok(Offer {
                have: request.size,
                have_sha256: expected,
                target,
                hasher: Hasher::new(),
                present: true,
                _lock: lock,
            });
        }
    }

    let (have, hasher) = staged_prefix(&target)?;
    let need = target.size - have;
    let free = free_disk(&root.state(State::Staging));
    if free.saturating_sub(limits.disk_reserve_bytes) < need {
        return Err(Error::NoSpace {
            what: target.name.clone(),
            need,
            free,
            reserve: limits.disk_reserve_bytes,
        });
    }
    Ok(Offer {
        have,
        have_sha256: digest::finish(hasher.clone()),
        target,
        hasher,
        present: false,
        _lock: lock,
    })
}

impl Offer {
    /// Cancelled when a newer request for the same file takes this transfer over; the
    /// connection then stops receiving (the bytes it staged are kept for the newcomer).
    pub(crate) fn wanted(&self) -> tokio_util::sync::CancellationToken {
        self._lock.wanted()
    }
}

impl Target {
    /// The refusal of content or a size other than announced.
    fn mismatch(&self, reason: String) -> Error {
        let path = self.name.clone();
        Error::ChecksumMismatch { path, reason }
    }

    /// Refuses a commit naming another digest than the request announced.
    fn check_announced(&self, sha256: Sha256) -> Result<()> {
        match self.expected {
            Some(expected) if expected != sha256 => Err(self.mismatch(format!(
                "the commit names sha256 {sha256}, the request announced {expected}"
            ))),
            _ => Ok(()),
        }
    }
}

/// The refusal of a destination that holds something a file cannot replace.
fn conflict(name: &str, reason: &str) -> Error {
    let (path, reason) = (name.to_string(), reason.to_string());
    Error::Conflict { path, reason }
}

/// Refuses a mode the protocol's rule refuses ([`rules::check_file_mode`]).
fn check_mode(name: &str, mode: u32) -> Result<()> {
    rules::check_file_mode(mode)
        .map_err(|fault| Error::BadRequest(format!("mode {mode:#o} for {name}: {fault}")))
}

/// The bytes staged for `target` and their hasher; discards a staging file longer than
/// the announced size or that is not a regular file.
fn staged_prefix(target: &Target) -> Result<(u64, Hasher)> {
    let len = match fs::symlink_metadata(&target.part) {
        Ok(meta) if meta.is_file() && meta.len() <= target.size => meta.len(),
        Ok(_) => {
            remove_if_present(&target.part)?;
            return Ok((0, Hasher::new()));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((0, Hasher::new())),
        Err(e) => return Err(Error::io("inspect", &target.part, e)),
    };
    let mut file = File::open(&target.part).io("open", &target.part)?;
    let hasher = digest::of_prefix(&mut file, len).io("read", &target.part)?;
    Ok((len, hasher))
}

/// An open staging file receiving the raw bytes of a transfer.
#[derive(Debug)]
pub(crate) struct Receiver {
    target: Target,
    /// `None` when nothing is to be received (content already in place) or after commit.
    file: Option<File>,
    hasher: Hasher,
    /// Bytes in the staging file, including those held before this connection.
    total: u64,
    /// Bytes received by this receiver.
    received: u64,
    /// Offset up to which the write-out to the disk has been started.
    written_back: u64,
    /// Bytes written between two starts of their write-out: [`WRITEBACK_STEP`].
    writeback_step: u64,
    /// Released before the final sync on drop, so a request taking over need not wait
    /// for the disk.
    lock: Option<PathLock>,
}

/// Starts receiving at `offset` (at most `offer.have`; 0 discards what was staged). Blocking.
pub(crate) fn begin(offer: Offer, offset: u64) -> Result<Receiver> {
    let Offer {
        have,
        target,
        hasher,
        present,
        _lock: lock,
        ..
    } = offer;
    if offset > have {
        return Err(Error::BadRequest(format!(
            "WriteBegin offset {offset} for {} is beyond the {have} bytes the agent holds",
            target.name
        )));
    }
    if present && offset == have {
        return Ok(Receiver {
            target,
            file: None,
            hasher,
            total: have,
            received: 0,
            written_back: have,
            writeback_step: WRITEBACK_STEP,
            lock: Some(lock),
        });
    }
    if present && offset != 0 {
        return Err(Error::BadRequest(format!(
            "WriteBegin offset {offset} for {}: the file is already in place; resend from 0 or \
             not at all (offset {have})",
            target.name
        )));
    }

    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(PART_MODE)
        .open(&target.part)
        .io("open", &target.part)?;
    // Content in place was answered above, so this is a resume of staged bytes.
    let hasher = if offset == have {
        let len = file.metadata().io("inspect", &target.part)?.len();
        if len != have {
            return Err(Error::Internal(format!(
                "staging file {} changed size from {have} to {len} while locked",
                target.part.display()
            )));
        }
        hasher
    } else {
        file.set_len(offset).io("truncate", &target.part)?;
        file.seek(SeekFrom::Start(0)).io("seek", &target.part)?;
        digest::of_prefix(&mut file, offset).io("read", &target.part)?
    };
    file.seek(SeekFrom::Start(offset))
        .io("seek", &target.part)?;
    Ok(Receiver {
        target,
        file: Some(file),
        hasher,
        total: offset,
        received: 0,
        written_back: offset,
        writeback_step: WRITEBACK_STEP,
        lock: Some(lock),
    })
}

impl Receiver {
    /// Bytes still expected before the commit.
    pub(crate) fn remaining(&self) -> u64 {
        self.target.size - self.total
    }

    /// Appends a chunk and hashes it; every `writeback_step` ([`WRITEBACK_STEP`]) bytes, starts writing the
    /// bytes so far to the disk without waiting for them. Blocking.
    pub(crate) fn write(&mut self, chunk: &[u8]) -> Result<()> {
        if chunk.is_empty() {
            return Ok(());
        }
        let len = chunk.len() as u64;
        if len > self.remaining() {
            return Err(Error::BadRequest(format!(
                "more than the announced {} bytes sent for {}",
                self.target.size, self.target.name
            )));
        }
        let Some(file) = self.file.as_mut() else {
            return Err(Error::Internal(format!(
                "no staging file open for {}",
                self.target.name
            )));
        };
        if let Err(e) = file.write_all(chunk) {
            let error = Error::io("write", &self.target.part, e);
            if error.kind() == ErrorKind::NoSpace {
                // Bytes kept for a resume would go on holding the room that the running
                // release and the retry after space is freed need: a full disk discards them.
                self.file = None;
                remove_if_present(&self.target.part)?;
            }
            return Err(error);
        }
        self.hasher.update(chunk);
        self.total += len;
        self.received += len;
        let unflushed = self.total - self.written_back;
        if unflushed >= self.writeback_step {
            // Advisory: a failure here is the disk's, and the commit's fsync reports it.
            let _ = start_writeback(file, self.written_back, unflushed);
            self.written_back = self.total;
        }
        Ok(())
    }

    /// Verifies size and digest, fsyncs, renames into place, applies the mode. Blocking.
    ///
    /// A digest that does not match discards the staged bytes, so a retry starts clean.
    /// A size that does not match keeps them: they are what arrived.
    pub(crate) fn commit(mut self, sha256: Sha256) -> Result<Written> {
        if self.file.is_none() {
            return self.commit_present(sha256);
        }
        let size = self.target.size;
        if self.total != size {
            let received = self.total;
            let reason = format!("expected {size} bytes, received {received} before the commit");
            return Err(self.target.mismatch(reason));
        }
        let actual = digest::finish(self.hasher.clone());
        let verdict = if actual != sha256 {
            let reason = format!("content has sha256 {actual}, the commit names {sha256}");
            Err(self.target.mismatch(reason))
        } else {
            self.target.check_announced(sha256)
        };
        if let Err(refusal) = verdict {
            self.file = None;
            remove_if_present(&self.target.part)?;
            return Err(refusal);
        }

        let Some(file) = self.file.take() else {
            return Err(Error::Internal(format!(
                "no staging file open for {}",
                self.target.name
            )));
        };
        let part = &self.target.part;
        file.set_permissions(fs::Permissions::from_mode(self.target.mode))
            .io("set mode of", part)?;
        file.sync_all().io("fsync", part)?;
        drop(file);

        // Creates the destination's parents and checks again that no step of the path
        // became a symlink meanwhile. The path it returns is `root/<name>` as in the
        // offer: both come from the same root and the same checked name.
        let dest = self.target.root.create_parents(&self.target.name)?;
        if fs::symlink_metadata(&dest).is_ok_and(|meta| meta.is_dir()) {
            let reason = "became a directory during the transfer";
            return Err(conflict(&self.target.name, reason));
        }
        rename_durably(part, &dest)?;
        Ok(Written {
            sha256: actual,
            size,
            received: self.received,
        })
    }

    /// The content is already in place: check the digest, fix the mode, write nothing.
    fn commit_present(self, sha256: Sha256) -> Result<Written> {
        self.target.check_announced(sha256)?;
        let dest = &self.target.dest;
        let meta = fs::symlink_metadata(dest).io("inspect", dest)?;
        if !meta.is_file() {
            let reason = "stopped being a regular file during the transfer";
            return Err(conflict(&self.target.name, reason));
        }
        if meta.permissions().mode() & 0o7777 != self.target.mode {
            fs::set_permissions(dest, fs::Permissions::from_mode(self.target.mode))
                .io("set mode of", dest)?;
        }
        Ok(Written {
            sha256,
            size: self.target.size,
            received: 0,
        })
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        // Uncommitted: keep what arrived, durably, for the next offer to resume from.
        // The claim goes first: a request taking over reads the same bytes through the
        // page cache and need not wait for them to reach the disk.
        let file = self.file.take();
        drop(self.lock.take());
        if let Some(file) = file {
            let _ = file.sync_data();
        }
    }
}

/// Removes staging files not touched for `older_than`, and any that is not a regular
/// file. Files held by a running transfer are left alone. Returns how many were removed.
pub(crate) fn sweep_stale(root: &Root, older_than: Duration) -> Result<usize> {
    let staging = root.state(State::Staging);
    let now = SystemTime::now();
    let entries = fs::read_dir(&staging).io("list", &staging)?;
    let mut removed = 0;
    for entry in entries {
        let path = entry.io("list", &staging)?.path();
        if PathLock::is_held(&path) {
            continue;
        }
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        let age = meta
            .modified()
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .unwrap_or(Duration::ZERO);
        if meta.is_dir() {
            // Nothing the agent writes here is a directory.
            fs::remove_dir_all(&path).io("remove", &path)?;
            removed += 1;
        } else if !meta.is_file() || age >= older_than {
            fs::remove_file(&path).io("remove", &path)?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests;
