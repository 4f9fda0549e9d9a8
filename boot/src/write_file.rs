//! `WriteFile`: resumable, verified, atomic file transfers into the root.
//!
//! [`transfer`] runs a transfer on a connection in three blocking steps:
//!
//! 1. [`offer`] checks the request (path, mode, size, free disk) and reports what the
//!    agent already holds: `size` when the destination already has the announced
//!    content, otherwise the bytes staged by an earlier, interrupted attempt.
//! 2. [`begin`] opens the staging file at the offset the master chose, and
//!    [`Receiver::write`] appends the raw bytes as they arrive, hashing them on the way
//!    (memory stays flat whatever the file size).
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
//! Parts nobody resumed are removed by [`sweep_stale`] when the agent starts.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use erel_proto::{
    read_frame, write_frame, Response, Sha256, WriteBegin, WriteCommit, WriteFile, WriteOffer,
    Written,
};
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256 as Hasher};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::digest;
use crate::error::{Error, Result};
use crate::fs::{free_disk, remove_if_present, rename_durably, PathLock, Root};
use crate::server::{blocking, ConnError, Connection, REFUSAL_LINGER};
use crate::settings::Limits;

/// Mode of staging files: only the agent reads what is not verified yet.
const PART_MODE: u32 = 0o600;

/// Staged bytes nobody resumed for this long are removed by [`sweep_stale`] at startup.
pub const STALE_STAGING_AGE: Duration = Duration::from_secs(3 * 24 * 3600);

/// Suffix of staging files under `.erel/staging/`.
const PART_SUFFIX: &str = ".part";

/// A transfer that makes no progress for this long is abandoned (its bytes are kept).
const TRANSFER_STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Size of one chunk of a transfer's raw bytes.
const CHUNK: usize = 256 * 1024;

/// Chunks in flight between the socket and the disk writer.
const CHUNKS_IN_FLIGHT: usize = 4;

/// How long a new `WriteFile` waits for an earlier transfer of the same key to let go
/// of its staging file before it is refused with [`Error::Busy`]. The holder lets go
/// at once unless it is verifying, syncing or renaming the file.
pub const TAKE_OVER_WAIT: Duration = Duration::from_secs(20);

/// What the agent already holds for a `WriteFile`, and the staging to continue it.
pub struct Offer {
    /// Bytes already held (`size` when the destination already has this content).
    pub have: u64,
    /// Digest of those bytes.
    pub have_sha256: Sha256,
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

impl fmt::Debug for Offer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Offer")
            .field("have", &self.have)
            .field("have_sha256", &self.have_sha256)
            .field("target", &self.target)
            .field("present", &self.present)
            .finish_non_exhaustive()
    }
}

/// Checks a `WriteFile` and finds what is already there. Blocking.
///
/// Refuses a path [`Root::resolve`] refuses, a mode with setuid, setgid or sticky bits
/// or above `0o777`, a size above [`Limits::max_file_bytes`], a destination that is a
/// directory or not a regular file, and a transfer that would eat into
/// [`Limits::disk_reserve_bytes`].
pub fn offer(root: &Root, request: &WriteFile, limits: &Limits) -> Result<Offer> {
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
            return Err(Error::Conflict {
                path: name,
                reason: "is a directory; a file cannot replace it".into(),
            });
        }
        Ok(meta) if !meta.is_file() => {
            return Err(Error::Conflict {
                path: name,
                reason: "exists and is not a regular file".into(),
            });
        }
        Ok(meta) => Some(meta.len()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io("inspect", &dest, e)),
    };

    let key = match request.sha256 {
        Some(digest) => format!("sha-{}", digest.to_hex()),
        None => {
            let relative = crate::unpack::relative(root, &dest);
            let path_digest = digest::of_bytes(relative.as_bytes());
            format!("path-{}-{}", path_digest.to_hex(), request.size)
        }
    };
    let part = root.state("staging").join(format!("{key}{PART_SUFFIX}"));
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
    let free = free_disk(&root.state("staging"));
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
    pub fn wanted(&self) -> tokio_util::sync::CancellationToken {
        self._lock.wanted()
    }
}

/// Refuses special bits and anything that is not a permission mode.
fn check_mode(name: &str, mode: u32) -> Result<()> {
    if mode & 0o7000 != 0 {
        return Err(Error::BadRequest(format!(
            "mode {mode:#o} for {name}: setuid, setgid and sticky bits are refused"
        )));
    }
    if mode > 0o777 {
        return Err(Error::BadRequest(format!(
            "mode {mode:#o} for {name} is not a permission mode (at most 0o777)"
        )));
    }
    Ok(())
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
    let mut file = File::open(&target.part).map_err(|e| Error::io("open", &target.part, e))?;
    let hasher =
        digest::of_prefix(&mut file, len).map_err(|e| Error::io("read", &target.part, e))?;
    Ok((len, hasher))
}

/// An open staging file receiving the raw bytes of a transfer.
pub struct Receiver {
    target: Target,
    /// `None` when nothing is to be received (content already in place) or after commit.
    file: Option<File>,
    hasher: Hasher,
    /// Bytes in the staging file, including those held before this connection.
    total: u64,
    /// Bytes received by this receiver.
    received: u64,
    present: bool,
    /// Released before the final sync on drop, so a request taking over need not wait
    /// for the disk.
    lock: Option<PathLock>,
}

impl fmt::Debug for Receiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Receiver")
            .field("target", &self.target)
            .field("total", &self.total)
            .field("received", &self.received)
            .field("present", &self.present)
            .finish_non_exhaustive()
    }
}

/// Starts receiving at `offset` (at most `offer.have`; 0 discards what was staged). Blocking.
pub fn begin(offer: Offer, request: &WriteFile, offset: u64) -> Result<Receiver> {
    let Offer {
        have,
        target,
        hasher,
        present,
        _lock: lock,
        ..
    } = offer;
    if request.path != target.name
        || request.size != target.size
        || request.mode != target.mode
        || request.sha256 != target.expected
    {
        return Err(Error::Internal(format!(
            "begin for {} does not match its offer for {}",
            request.path, target.name
        )));
    }
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
            present: true,
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
        .map_err(|e| Error::io("open", &target.part, e))?;
    let hasher = if offset == have && !present {
        let len = file
            .metadata()
            .map_err(|e| Error::io("inspect", &target.part, e))?
            .len();
        if len != have {
            return Err(Error::Internal(format!(
                "staging file {} changed size from {have} to {len} while locked",
                target.part.display()
            )));
        }
        hasher
    } else {
        file.set_len(offset)
            .map_err(|e| Error::io("truncate", &target.part, e))?;
        file.seek(SeekFrom::Start(0))
            .map_err(|e| Error::io("seek", &target.part, e))?;
        digest::of_prefix(&mut file, offset).map_err(|e| Error::io("read", &target.part, e))?
    };
    file.seek(SeekFrom::Start(offset))
        .map_err(|e| Error::io("seek", &target.part, e))?;
    Ok(Receiver {
        target,
        file: Some(file),
        hasher,
        total: offset,
        received: 0,
        present: false,
        lock: Some(lock),
    })
}

impl Receiver {
    /// Bytes still expected before the commit.
    pub fn remaining(&self) -> u64 {
        self.target.size - self.total
    }

    /// Appends a chunk and hashes it. Blocking.
    pub fn write(&mut self, chunk: &[u8]) -> Result<()> {
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
        file.write_all(chunk)
            .map_err(|e| Error::io("write", &self.target.part, e))?;
        self.hasher.update(chunk);
        self.total += len;
        self.received += len;
        Ok(())
    }

    /// Verifies size and digest, fsyncs, renames into place, applies the mode. Blocking.
    ///
    /// A digest that does not match discards the staged bytes, so a retry starts clean.
    /// A size that does not match keeps them: they are what arrived.
    pub fn commit(mut self, sha256: Sha256) -> Result<Written> {
        if self.present {
            return self.commit_present(sha256);
        }
        let size = self.target.size;
        if self.total != size {
            return Err(Error::ChecksumMismatch {
                path: self.target.name.clone(),
                reason: format!(
                    "expected {size} bytes, received {} before the commit",
                    self.total
                ),
            });
        }
        let actual = digest::finish(self.hasher.clone());
        let mismatch = if actual != sha256 {
            Some(format!(
                "content has sha256 {actual}, the commit names {sha256}"
            ))
        } else {
            match self.target.expected {
                Some(expected) if expected != sha256 => Some(format!(
                    "the commit names sha256 {sha256}, the request announced {expected}"
                )),
                _ => None,
            }
        };
        if let Some(reason) = mismatch {
            self.file = None;
            remove_if_present(&self.target.part)?;
            return Err(Error::ChecksumMismatch {
                path: self.target.name.clone(),
                reason,
            });
        }

        let Some(file) = self.file.take() else {
            return Err(Error::Internal(format!(
                "no staging file open for {}",
                self.target.name
            )));
        };
        let part = &self.target.part;
        file.set_permissions(fs::Permissions::from_mode(self.target.mode))
            .map_err(|e| Error::io("set mode of", part, e))?;
        file.sync_all().map_err(|e| Error::io("fsync", part, e))?;
        drop(file);

        let dest = self.place_parent()?;
        if fs::symlink_metadata(&dest).is_ok_and(|meta| meta.is_dir()) {
            return Err(Error::Conflict {
                path: self.target.name.clone(),
                reason: "became a directory during the transfer".into(),
            });
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
        let expected = self.target.expected.unwrap_or(sha256);
        if sha256 != expected {
            return Err(Error::ChecksumMismatch {
                path: self.target.name.clone(),
                reason: format!(
                    "the commit names sha256 {sha256}, the request announced {expected}"
                ),
            });
        }
        let dest = &self.target.dest;
        let meta = fs::symlink_metadata(dest).map_err(|e| Error::io("inspect", dest, e))?;
        if !meta.is_file() {
            return Err(Error::Conflict {
                path: self.target.name.clone(),
                reason: "stopped being a regular file during the transfer".into(),
            });
        }
        if meta.permissions().mode() & 0o7777 != self.target.mode {
            fs::set_permissions(dest, fs::Permissions::from_mode(self.target.mode))
                .map_err(|e| Error::io("set mode of", dest, e))?;
        }
        Ok(Written {
            sha256,
            size: self.target.size,
            received: 0,
        })
    }

    /// Creates the destination's parent directories and checks again that no part of
    /// the path became a symlink meanwhile. Returns the destination.
    fn place_parent(&self) -> Result<PathBuf> {
        let dest = &self.target.dest;
        let again = self.target.root.create_parents(&self.target.name)?;
        if &again != dest {
            return Err(Error::Internal(format!(
                "{} resolved to {} then {}",
                self.target.name,
                dest.display(),
                again.display()
            )));
        }
        Ok(again)
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
pub fn sweep_stale(root: &Root, older_than: Duration) -> Result<usize> {
    let staging = root.state("staging");
    let now = SystemTime::now();
    let entries = fs::read_dir(&staging).map_err(|e| Error::io("list", &staging, e))?;
    let mut removed = 0;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("list", &staging, e))?;
        let path = entry.path();
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
            fs::remove_dir_all(&path).map_err(|e| Error::io("remove", &path, e))?;
            removed += 1;
        } else if !meta.is_file() || age >= older_than {
            fs::remove_file(&path).map_err(|e| Error::io("remove", &path, e))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// A `WriteFile` on a connection: offer, begin, raw bytes, commit (see PROTOCOL.md).
/// Returns the answer to the commit (or the refusal of the offer); an error ends the
/// connection, after telling the master why when it can still hear it.
pub(crate) async fn transfer<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    request: WriteFile,
) -> std::result::Result<Result<Response>, ConnError> {
    let (agent, req) = (conn.agent.clone(), request.clone());
    let offer = match blocking(move || offer(&agent.root, &req, &agent.limits)).await {
        Ok(offer) => offer,
        Err(e) => return Ok(Err(e)),
    };
    let wanted = offer.wanted();
    let answer = Response::WriteOffer(WriteOffer {
        have: offer.have,
        have_sha256: offer.have_sha256,
    });
    conn.reply(&answer).await?;
    let path = &request.path;
    let WriteBegin { offset } = read_transfer_frame(conn, "WriteBegin", &wanted, path).await?;
    let req = request.clone();
    let receiver = blocking(move || begin(offer, &req, offset)).await;
    // The master is about to stream raw bytes: a refusal is reported and ends the
    // connection.
    let receiver = conn.reported(receiver).await?;
    let remaining = request.size.saturating_sub(offset);
    let received = stream_to_disk(conn, receiver, remaining, path, &wanted).await?;
    let receiver = conn.reported(received).await?;
    let WriteCommit { sha256 } = read_transfer_frame(conn, "WriteCommit", &wanted, path).await?;
    Ok(blocking(move || receiver.commit(sha256))
        .await
        .map(Response::Written))
}

/// Reads the next frame of a transfer of `path`; ends the transfer when a newer request
/// for the same file takes it over (`wanted`).
async fn read_transfer_frame<T: DeserializeOwned, S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    what: &'static str,
    wanted: &CancellationToken,
    path: &str,
) -> std::result::Result<T, ConnError> {
    let read = tokio::select! {
        _ = wanted.cancelled() => return Err(taken_over(conn, path).await),
        read = tokio::time::timeout(TRANSFER_STALL_TIMEOUT, read_frame::<T, _>(&mut conn.stream)) => read,
    };
    match read {
        Err(_) => Err(ConnError::Timeout(what)),
        Ok(Ok(Some(frame))) => Ok(frame),
        Ok(Ok(None)) => Err(ConnError::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("connection closed before {what}"),
        ))),
        Ok(Err(e)) => {
            conn.refuse_frame(e).await?;
            Err(ConnError::Timeout(what))
        }
    }
}

/// A newer request for the same file took this transfer over: say so (the master, if
/// still there, reads it when its sending fails) and end the connection.
async fn taken_over<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    path: &str,
) -> ConnError {
    let error = Error::Busy(format!(
        "the transfer of {path} was taken over by a newer request for the same file; \
         the bytes received here are kept for it"
    ));
    info!(peer = %conn.peer, name = %conn.peer_name, command = "write_file", %path, "taken over by a newer request");
    let reply = Response::Error(error.to_reply());
    let _ = tokio::time::timeout(REFUSAL_LINGER, write_frame(&mut conn.stream, &reply)).await;
    ConnError::TakenOver(path.to_string())
}

/// Copies `remaining` raw bytes from the socket to the staging file. The disk side runs
/// on a blocking thread so hashing and writing overlap with receiving; memory stays at a
/// few chunks whatever the size. The outer error ends the connection (the staged bytes
/// are kept for a resume); the inner one is reported to the master.
async fn stream_to_disk<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    mut receiver: Receiver,
    remaining: u64,
    path: &str,
    wanted: &CancellationToken,
) -> std::result::Result<Result<Receiver>, ConnError> {
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(CHUNKS_IN_FLIGHT);
    let writer = tokio::task::spawn_blocking(move || {
        while let Some(chunk) = rx.blocking_recv() {
            receiver.write(&chunk)?;
        }
        Ok(receiver)
    });
    let mut left = remaining;
    let mut read_error = None;
    while left > 0 {
        let want = usize::try_from(left).unwrap_or(CHUNK).min(CHUNK);
        let mut chunk = vec![0u8; want];
        let read = tokio::select! {
            _ = wanted.cancelled() => None,
            read = tokio::time::timeout(TRANSFER_STALL_TIMEOUT, read_some(&mut conn.stream, &mut chunk)) => Some(read),
        };
        let n = match read {
            None => {
                read_error = Some(ConnError::TakenOver(path.to_string()));
                break;
            }
            Some(Err(_)) => {
                read_error = Some(ConnError::Timeout("transfer bytes"));
                break;
            }
            Some(Ok(Err(e))) => {
                read_error = Some(ConnError::Io(e));
                break;
            }
            Some(Ok(Ok(0))) => {
                read_error = Some(ConnError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("connection closed with {left} bytes of {path} still to come"),
                )));
                break;
            }
            Some(Ok(Ok(n))) => n,
        };
        chunk.truncate(n);
        left -= n as u64;
        if tx.send(chunk).await.is_err() {
            break; // the writer failed; its error is reported below
        }
    }
    drop(tx);
    let written = writer
        .await
        .map_err(|e| Error::Internal(format!("transfer writer panicked: {e}")));
    let Some(error) = read_error else {
        return Ok(written.and_then(|inner| inner));
    };
    // Dropping the receiver syncs what arrived, for a later resume, and lets a request
    // taking over have the staging at once.
    drop(written);
    match error {
        ConnError::TakenOver(path) => Err(taken_over(conn, &path).await),
        error => Err(error),
    }
}

/// Reads as many bytes as are available, filling up to all of `buf` when they arrive.
async fn read_some<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = match stream.read(&mut buf[filled..]).await {
            Ok(n) => n,
            // Keep what arrived: the next read reports the error.
            Err(_) if filled > 0 => break,
            Err(e) => return Err(e),
        };
        if n == 0 {
            break;
        }
        filled += n;
        if filled >= buf.len() / 2 {
            break;
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    struct Fixture {
        _dir: tempfile::TempDir,
        root: Root,
        limits: Limits,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = Root::open(&dir.path().join("root")).expect("open root");
        let limits = Limits {
            max_file_bytes: 16 << 20,
            disk_reserve_bytes: 0,
            ..Limits::default()
        };
        Fixture {
            _dir: dir,
            root,
            limits,
        }
    }

    /// Deterministic, incompressible-looking content.
    fn content(size: usize) -> Vec<u8> {
        let mut state: u32 = 0x9e37_79b9;
        (0..size)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state >> 24) as u8
            })
            .collect()
    }

    fn digest(bytes: &[u8]) -> Sha256 {
        digest::of_bytes(bytes)
    }

    fn request(path: &str, data: &[u8], known: bool) -> WriteFile {
        WriteFile {
            path: path.into(),
            mode: 0o640,
            size: data.len() as u64,
            sha256: known.then(|| digest(data)),
        }
    }

    fn send(receiver: &mut Receiver, bytes: &[u8]) {
        for chunk in bytes.chunks(7_000) {
            receiver.write(chunk).expect("write");
        }
    }

    /// A whole transfer from the offset the master would choose.
    fn push(f: &Fixture, req: &WriteFile, data: &[u8]) -> Result<Written> {
        let offer = offer(&f.root, req, &f.limits)?;
        let offset = offer.have;
        assert_eq!(offer.have_sha256, digest(&data[..offset as usize]));
        let mut receiver = begin(offer, req, offset)?;
        send(&mut receiver, &data[offset as usize..]);
        receiver.commit(digest(data))
    }

    fn staging_files(f: &Fixture) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(f.root.state("staging"))
            .expect("list staging")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn full_transfer_lands_with_its_mode() {
        let f = fixture();
        let data = content(1 << 20);
        let req = request("archives/beat-0.1.0.tar.gz", &data, false);
        let written = push(&f, &req, &data).expect("push");
        assert_eq!(written.size, data.len() as u64);
        assert_eq!(written.received, data.len() as u64);
        assert_eq!(written.sha256, digest(&data));
        let dest = f.root.path().join("archives/beat-0.1.0.tar.gz");
        assert_eq!(fs::read(&dest).expect("read"), data);
        let mode = fs::metadata(&dest).expect("meta").permissions().mode() & 0o7777;
        assert_eq!(mode, 0o640);
        assert!(staging_files(&f).is_empty(), "{:?}", staging_files(&f));
    }

    #[test]
    fn empty_file_transfers() {
        let f = fixture();
        let req = request("empty", b"", true);
        let written = push(&f, &req, b"").expect("push");
        assert_eq!(written.received, 0);
        assert_eq!(fs::read(f.root.path().join("empty")).expect("read"), b"");
    }

    #[test]
    fn cut_transfer_resumes_where_it_stopped() {
        let f = fixture();
        let data = content(300_000);
        let half = 123_457usize;
        let req = request("archives/a.tar.gz", &data, true);
        let first = offer(&f.root, &req, &f.limits).expect("offer");
        assert_eq!(first.have, 0);
        let mut receiver = begin(first, &req, 0).expect("begin");
        send(&mut receiver, &data[..half]);
        drop(receiver); // the connection is cut

        assert!(!f.root.path().join("archives/a.tar.gz").exists());
        let second = offer(&f.root, &req, &f.limits).expect("offer again");
        assert_eq!(second.have, half as u64);
        assert_eq!(second.have_sha256, digest(&data[..half]));
        let mut receiver = begin(second, &req, half as u64).expect("resume");
        assert_eq!(receiver.remaining(), (data.len() - half) as u64);
        send(&mut receiver, &data[half..]);
        let written = receiver.commit(digest(&data)).expect("commit");
        assert_eq!(written.received, (data.len() - half) as u64);
        assert_eq!(
            fs::read(f.root.path().join("archives/a.tar.gz")).expect("read"),
            data
        );
        assert!(staging_files(&f).is_empty());
    }

    #[test]
    fn digest_keyed_resume_survives_a_new_destination() {
        let f = fixture();
        let data = content(50_000);
        let req = request("one/a.bin", &data, true);
        let mut receiver =
            begin(offer(&f.root, &req, &f.limits).expect("offer"), &req, 0).expect("begin");
        send(&mut receiver, &data[..20_000]);
        drop(receiver);
        let other = request("two/b.bin", &data, true);
        let written = push(&f, &other, &data).expect("push");
        assert_eq!(written.received, 30_000);
    }

    #[test]
    fn unknown_digest_resumes_by_path_and_size() {
        let f = fixture();
        let data = content(200_000);
        let half = 70_001usize;
        let req = request("data/file.bin", &data, false);
        let mut receiver =
            begin(offer(&f.root, &req, &f.limits).expect("offer"), &req, 0).expect("begin");
        send(&mut receiver, &data[..half]);
        drop(receiver);
        assert_eq!(staging_files(&f).len(), 1);
        assert!(staging_files(&f)[0].starts_with("path-"));

        // Another size is another staging key: nothing to resume.
        let shorter = request("data/file.bin", &data[..1000], false);
        assert_eq!(offer(&f.root, &shorter, &f.limits).expect("offer").have, 0);

        let second = offer(&f.root, &req, &f.limits).expect("offer again");
        assert_eq!(second.have, half as u64);
        // The master compares this with the digest of its own first `have` bytes.
        assert_eq!(second.have_sha256, digest(&data[..half]));
        let mut receiver = begin(second, &req, half as u64).expect("resume");
        send(&mut receiver, &data[half..]);
        let written = receiver.commit(digest(&data)).expect("commit");
        assert_eq!(written.received, (data.len() - half) as u64);
        assert_eq!(
            fs::read(f.root.path().join("data/file.bin")).expect("read"),
            data
        );
    }

    #[test]
    fn offset_zero_discards_what_was_staged() {
        let f = fixture();
        let old = content(10_000);
        let mut new = old.clone();
        new[10] ^= 0xff; // the file changed between attempts
        let req_old = request("f.bin", &old, false);
        let mut receiver = begin(
            offer(&f.root, &req_old, &f.limits).expect("offer"),
            &req_old,
            0,
        )
        .expect("begin");
        send(&mut receiver, &old[..5_000]);
        drop(receiver);

        let req = request("f.bin", &new, false);
        let again = offer(&f.root, &req, &f.limits).expect("offer");
        assert_eq!(again.have, 5_000);
        assert_ne!(again.have_sha256, digest(&new[..5_000]));
        let mut receiver = begin(again, &req, 0).expect("restart");
        send(&mut receiver, &new);
        let written = receiver.commit(digest(&new)).expect("commit");
        assert_eq!(written.received, new.len() as u64);
        assert_eq!(fs::read(f.root.path().join("f.bin")).expect("read"), new);
    }

    #[test]
    fn repeated_push_with_known_digest_sends_nothing() {
        let f = fixture();
        let data = content(64_000);
        let req = request("archives/x.tar.gz", &data, true);
        push(&f, &req, &data).expect("first push");
        let dest = f.root.path().join("archives/x.tar.gz");
        let inode = fs::metadata(&dest).expect("meta").ino();

        let again = WriteFile {
            mode: 0o600,
            ..req.clone()
        };
        let offer = offer(&f.root, &again, &f.limits).expect("offer");
        assert_eq!(offer.have, data.len() as u64);
        assert_eq!(offer.have_sha256, digest(&data));
        let receiver = begin(offer, &again, data.len() as u64).expect("begin");
        assert_eq!(receiver.remaining(), 0);
        let written = receiver.commit(digest(&data)).expect("commit");
        assert_eq!(written.received, 0);
        assert_eq!(written.size, data.len() as u64);
        let meta = fs::metadata(&dest).expect("meta");
        assert_eq!(meta.ino(), inode, "the file must not be rewritten");
        assert_eq!(
            meta.permissions().mode() & 0o7777,
            0o600,
            "the new mode applies"
        );
        assert!(staging_files(&f).is_empty());
    }

    #[test]
    fn wrong_digest_is_refused_and_discarded() {
        let f = fixture();
        let data = content(40_000);
        let req = request("bad.bin", &data, false);
        let mut receiver =
            begin(offer(&f.root, &req, &f.limits).expect("offer"), &req, 0).expect("begin");
        send(&mut receiver, &data);
        let wrong = digest(b"something else");
        let err = receiver.commit(wrong).unwrap_err();
        assert!(matches!(err, Error::ChecksumMismatch { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains(&wrong.to_hex()), "{text}");
        assert!(text.contains(&digest(&data).to_hex()), "{text}");
        assert!(text.contains("bad.bin"), "{text}");
        assert!(!f.root.path().join("bad.bin").exists());
        assert!(staging_files(&f).is_empty(), "the part must be removed");
        // A retry starts clean.
        assert_eq!(offer(&f.root, &req, &f.limits).expect("offer").have, 0);
    }

    #[test]
    fn content_other_than_announced_is_refused() {
        let f = fixture();
        let data = content(1_000);
        let req = WriteFile {
            sha256: Some(digest(b"announced")),
            ..request("x.bin", &data, false)
        };
        let mut receiver =
            begin(offer(&f.root, &req, &f.limits).expect("offer"), &req, 0).expect("begin");
        send(&mut receiver, &data);
        let err = receiver.commit(digest(&data)).unwrap_err();
        assert!(matches!(err, Error::ChecksumMismatch { .. }), "{err}");
        assert!(
            err.to_string().contains(&digest(b"announced").to_hex()),
            "{err}"
        );
        assert!(!f.root.path().join("x.bin").exists());
        assert!(staging_files(&f).is_empty());
    }

    #[test]
    fn short_or_long_transfers_are_refused() {
        let f = fixture();
        let data = content(1_000);
        let req = request("short.bin", &data, false);
        let mut receiver =
            begin(offer(&f.root, &req, &f.limits).expect("offer"), &req, 0).expect("begin");
        send(&mut receiver, &data[..600]);
        let err = receiver.write(&content(401)).unwrap_err();
        assert!(matches!(err, Error::BadRequest(_)), "{err}");
        let err = receiver.commit(digest(&data)).unwrap_err();
        assert!(matches!(err, Error::ChecksumMismatch { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("expected 1000 bytes, received 600"),
            "{err}"
        );
        assert!(!f.root.path().join("short.bin").exists());
        // What arrived is kept for a resume.
        assert_eq!(offer(&f.root, &req, &f.limits).expect("offer").have, 600);
    }

    #[test]
    fn offset_beyond_what_is_held_is_refused() {
        let f = fixture();
        let data = content(1_000);
        let req = request("o.bin", &data, false);
        let offer = offer(&f.root, &req, &f.limits).expect("offer");
        let err = begin(offer, &req, 1).unwrap_err();
        assert!(matches!(err, Error::BadRequest(_)), "{err}");
        assert!(err.to_string().contains("offset 1"), "{err}");
    }

    #[test]
    fn too_large_is_refused() {
        let f = fixture();
        let req = WriteFile {
            path: "big.bin".into(),
            mode: 0o644,
            size: f.limits.max_file_bytes + 1,
            sha256: None,
        };
        let err = offer(&f.root, &req, &f.limits).unwrap_err();
        assert!(matches!(err, Error::TooLarge { .. }), "{err}");
        assert!(err.to_string().contains("big.bin"), "{err}");
    }

    #[test]
    fn no_space_is_refused() {
        let mut f = fixture();
        f.limits.disk_reserve_bytes = u64::MAX;
        let err = offer(&f.root, &request("x.bin", b"abc", false), &f.limits).unwrap_err();
        assert!(matches!(err, Error::NoSpace { .. }), "{err}");
    }

    #[test]
    fn special_modes_are_refused() {
        let f = fixture();
        for mode in [0o4755, 0o2755, 0o1777, 0o100644] {
            let req = WriteFile {
                mode,
                ..request("bin/tool", b"#!/bin/sh\n", false)
            };
            let err = offer(&f.root, &req, &f.limits).unwrap_err();
            assert!(matches!(err, Error::BadRequest(_)), "{mode:o}: {err}");
            assert!(err.to_string().contains(&format!("{mode:#o}")), "{err}");
        }
    }

    #[test]
    fn bad_paths_are_refused() {
        let f = fixture();
        for path in [
            ".erel/staging/x.part",
            ".erel/releases/beat.json",
            "../x",
            "/etc/x",
        ] {
            let err = offer(&f.root, &request(path, b"x", false), &f.limits).unwrap_err();
            assert!(matches!(err, Error::InvalidPath { .. }), "{path}: {err}");
        }
    }

    #[test]
    fn symlinked_parent_is_refused() {
        let f = fixture();
        let outside = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink(outside.path(), f.root.path().join("link")).expect("symlink");
        let err = offer(&f.root, &request("link/file", b"x", false), &f.limits).unwrap_err();
        assert!(matches!(err, Error::InvalidPath { .. }), "{err}");
        assert!(fs::read_dir(outside.path()).expect("list").next().is_none());
    }

    #[test]
    fn symlink_planted_during_the_transfer_is_refused() {
        let f = fixture();
        let outside = tempfile::tempdir().expect("tempdir");
        let data = content(100);
        let req = request("later/deeper/file", &data, false);
        let mut receiver =
            begin(offer(&f.root, &req, &f.limits).expect("offer"), &req, 0).expect("begin");
        send(&mut receiver, &data);
        std::os::unix::fs::symlink(outside.path(), f.root.path().join("later")).expect("symlink");
        let err = receiver.commit(digest(&data)).unwrap_err();
        assert!(matches!(err, Error::InvalidPath { .. }), "{err}");
        assert!(fs::read_dir(outside.path()).expect("list").next().is_none());
    }

    #[test]
    fn directory_destination_is_a_conflict() {
        let f = fixture();
        fs::create_dir_all(f.root.path().join("releases/beat")).expect("mkdir");
        let err = offer(&f.root, &request("releases/beat", b"x", false), &f.limits).unwrap_err();
        assert!(matches!(err, Error::Conflict { .. }), "{err}");
    }

    /// Offers `req` on another thread; the handle yields its result.
    fn offer_elsewhere(f: &Fixture, req: &WriteFile) -> std::thread::JoinHandle<Result<Offer>> {
        let (root, req, limits) = (f.root.clone(), req.clone(), f.limits.clone());
        std::thread::spawn(move || offer(&root, &req, &limits))
    }

    /// Polls `condition` every 10 ms for up to `limit`.
    fn eventually(limit: Duration, condition: impl Fn() -> bool) -> bool {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if condition() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        condition()
    }

    #[test]
    fn a_repeated_transfer_takes_over_and_resumes() {
        let f = fixture();
        let data = content(1_000);
        let req = request("same.bin", &data, true);
        let first = offer(&f.root, &req, &f.limits).expect("offer");
        let first_wanted = first.wanted();
        let mut receiver = begin(first, &req, 0).expect("begin");
        send(&mut receiver, &data[..300]);
        assert!(!first_wanted.is_cancelled());

        // The repeat asks the holder to let go and waits for it, not a refusal.
        let second = offer_elsewhere(&f, &req);
        assert!(
            eventually(TAKE_OVER_WAIT, || first_wanted.is_cancelled()),
            "the holder is asked to let go"
        );
        assert!(!second.is_finished(), "the newcomer waits for the holder");
        drop(receiver); // the holder stops, keeping its bytes
        let second = second.join().expect("join").expect("takes over");
        assert_eq!(second.have, 300, "resumes from what the holder received");
        let mut receiver = begin(second, &req, 300).expect("begin");
        send(&mut receiver, &data[300..]);
        receiver.commit(digest(&data)).expect("commit");
        assert_eq!(
            fs::read(f.root.path().join("same.bin")).expect("read"),
            data
        );
        assert!(staging_files(&f).is_empty());
    }

    #[test]
    fn the_same_content_elsewhere_takes_over_too_other_content_is_not_held_up() {
        let f = fixture();
        let data = content(1_000);
        let req = request("same.bin", &data, true);
        let first = offer(&f.root, &req, &f.limits).expect("offer");
        let wanted = first.wanted();
        // Other content goes through while the first transfer holds its staging.
        let other = content(999);
        push(&f, &request("other.bin", &other, true), &other).expect("other push");
        assert!(!wanted.is_cancelled());
        // The same digest to another destination shares the staging: it takes over.
        let copy = offer_elsewhere(&f, &request("copy.bin", &data, true));
        assert!(eventually(TAKE_OVER_WAIT, || wanted.is_cancelled()));
        drop(first);
        let copy = copy.join().expect("join").expect("takes over");
        assert_eq!(copy.have, 0);
        // Without a digest, the key is the path and size: a repeat takes over as well.
        let unknown = request("nodigest.bin", &data, false);
        let held = offer(&f.root, &unknown, &f.limits).expect("offer");
        let wanted = held.wanted();
        let repeat = offer_elsewhere(&f, &unknown);
        assert!(eventually(TAKE_OVER_WAIT, || wanted.is_cancelled()));
        drop(held);
        repeat.join().expect("join").expect("takes over");
        drop(copy);
    }

    #[test]
    fn sweep_removes_stale_parts_only() {
        let f = fixture();
        let data = content(1_000);
        let held_req = request("held.bin", &data, false);
        let held = offer(&f.root, &held_req, &f.limits).expect("offer");
        let mut receiver = begin(held, &held_req, 0).expect("begin");
        send(&mut receiver, &data[..10]);
        let stale_req = request("stale.bin", &data, false);
        let mut stale = begin(
            offer(&f.root, &stale_req, &f.limits).expect("offer"),
            &stale_req,
            0,
        )
        .expect("begin");
        send(&mut stale, &data[..10]);
        drop(stale);

        assert_eq!(sweep_stale(&f.root, STALE_STAGING_AGE).expect("sweep"), 0);
        assert_eq!(sweep_stale(&f.root, Duration::ZERO).expect("sweep"), 1);
        assert_eq!(staging_files(&f).len(), 1, "the held part stays");
        send(&mut receiver, &data[10..]);
        receiver.commit(digest(&data)).expect("commit");
    }
}
