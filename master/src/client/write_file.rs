//! The master's side of `WriteFile`: offer, resume decision, raw bytes, commit.
//!
//! When the caller knows the file's sha256 (a cluster file names it, or the digest cache
//! has it) the file is read once, straight onto the socket, and a file the agent already
//! holds costs nothing. When it does not, the file is hashed while it is sent and the
//! digest goes last, in `WriteCommit`; a resume then checks the agent's staged prefix
//! against our own first bytes before skipping them (see `proto/PROTOCOL.md`).
//!
//! The file is opened once and every byte sent is read from that one open file. Its
//! [`FileStamp`] is taken when it is opened and compared again, on the open file and on
//! its path, after the last byte is sent and before `WriteCommit`: a file written,
//! touched or replaced meanwhile fails the push, naming the file, and the connection is
//! closed without a commit, so the agent never makes torn or stale content visible.
//! A digest remembered for an earlier state of the file (`WriteSource::sha256_of`) is
//! used only when the opened file is still in that state: a file rebuilt or replaced
//! after the lookup is hashed as it is sent, since the agent may hold the old content.

use std::io::Read;
use std::path::{Path, PathBuf};

use erel_proto::{
    rules, Request, Response, Sha256, WriteBegin, WriteCommit, WriteFile, WriteOffer, Written,
};
use sha2::Digest;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::{timeout, AgentClient, TRANSFER_STALL_TIMEOUT};
use crate::digest_cache::{hash_into, FileStamp};
use crate::error::{Error, Result};

/// Bytes read from disk per chunk.
pub(super) const CHUNK: usize = 256 * 1024;
/// Chunks read ahead of the socket.
const CHUNKS_AHEAD: usize = 4;
/// The most bytes one push of a file of `size` bytes holds in its read buffers: the
/// chunks read ahead of the socket and the one being sent, each at most [`CHUNK`].
pub(crate) fn push_buffer_bytes(size: u64) -> usize {
    usize::try_from(size).unwrap_or(CHUNK).min(CHUNK) * (CHUNKS_AHEAD + 1)
}

/// Time allowed to close a connection whose transfer is abandoned.
const ABANDON_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// What to send: a local file, and its digest when already known.
#[derive(Debug, Clone)]
pub struct WriteSource {
    /// The local file.
    pub path: PathBuf,
    /// Its sha256, when known in advance.
    pub sha256: Option<Sha256>,
    /// The state of the file `sha256` was computed from, when it was remembered for one
    /// (a digest cache). A file found in another state when it is opened was rebuilt or
    /// replaced since: that digest is not used and the file is hashed as it is sent.
    /// `None` when `sha256` names the content wanted whatever the file holds (the
    /// agent then refuses other bytes).
    pub sha256_of: Option<FileStamp>,
}

/// How far a transfer has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// The file's size.
    pub total: u64,
    /// Bytes the agent already held, not sent again.
    pub skipped: u64,
    /// Bytes sent on this connection so far.
    pub sent: u64,
}

impl AgentClient {
    /// `WriteFile`: puts `source` at `dest` (relative to the agent's root) with `mode`.
    /// Resumes an interrupted transfer and sends nothing for a file already in place.
    ///
    /// Fails with [`Error::Local`] naming the file when it is written to, touched or
    /// replaced between being opened and its last byte being sent; nothing is then
    /// committed and this connection is closed (connect again to retry).
    pub async fn write_file(
        &mut self,
        source: &WriteSource,
        dest: &str,
        mode: u32,
        progress: &mut (dyn FnMut(Progress) + Send),
    ) -> Result<Written> {
        let path = source.path.clone();
        let opened = path.clone();
        let (file, stamp) = tokio::task::spawn_blocking(move || open_stamped(&opened))
            .await
            .map_err(|e| Error::local(&path, format!("opening failed: {e}")))??;
        let size = stamp.size();
        let known = match (&source.sha256, &source.sha256_of) {
            // Remembered for another state of the file: the file is not what it was
            // computed from, and the agent may hold exactly that older content.
            (Some(_), Some(of)) if !of.same_state(&stamp) => None,
            (known, _) => *known,
        };
        let source = &WriteSource {
            path: source.path.clone(),
            sha256: known,
            sha256_of: None,
        };
        let request = Request::WriteFile(WriteFile {
            path: dest.to_string(),
            mode,
            size,
            sha256: source.sha256,
        });
        // A transfer of the same file cut a moment ago may still hold the agent's
        // staging: the agent answers `Busy` and hands it over within a bounded time; the
        // caller's retry policy waits that out.
        let offer = self.offer(&request, size).await?;
        let (offset, hasher) = self.resume_point(source, &file, &offer).await?;
        self.send(&WriteBegin { offset }).await?;
        progress(Progress {
            total: size,
            skipped: offset,
            sent: 0,
        });
        let digest = match self
            .stream_file(&path, &file, offset, size, hasher, progress)
            .await
        {
            Ok(digest) => digest,
            Err(e @ Error::Local { .. }) => {
                // Our side failed mid-stream: end the exchange without a commit.
                self.abandon().await;
                return Err(e);
            }
            Err(e) => return Err(self.explain_cut_transfer(e).await),
        };
        if let Err(e) = unchanged_since(&path, &file, &stamp).await {
            // No commit: the agent keeps what it staged (a later push checks it before
            // resuming) and makes nothing visible.
            self.abandon().await;
            return Err(e);
        }
        let sha256 = match (source.sha256, digest) {
            (Some(known), _) => known,
            (None, Some(computed)) => computed,
            (None, None) => return Err(Error::local(&path, "internal: no digest computed")),
        };
        self.commit(sha256).await
    }

    /// Sends `request` (a `WriteFile` of `size` bytes) and returns the agent's
    /// `WriteOffer`: how many bytes of that content it holds already.
    ///
    /// Errors: the agent's refusal ([`Error::Agent`]), another answer, or an offer of
    /// more bytes than the file has (a protocol error); timeouts and cut connections.
    pub(super) async fn offer(&mut self, request: &Request, size: u64) -> Result<WriteOffer> {
        self.send(request).await?;
        let offer = match self
            .receive_with(TRANSFER_STALL_TIMEOUT, rules::answer_name(request))
            .await?
        {
            Response::WriteOffer(offer) => offer,
            Response::Error(reply) => {
                return Err(Error::Agent {
                    host: self.host.id.clone(),
                    reply,
                })
            }
            other => return Err(self.unexpected(rules::answer_name(request), &other)),
        };
        if offer.have > size {
            return Err(self.protocol_error(format!(
                "agent offered {} bytes of a {size}-byte file",
                offer.have
            )));
        }
        Ok(offer)
    }

    /// Sends `WriteCommit` with the content's digest `sha256` and returns the agent's
    /// `Written`; errors: the agent's refusal (a digest mismatch, say), another answer,
    /// timeouts and cut connections.
    pub(super) async fn commit(&mut self, sha256: Sha256) -> Result<Written> {
        self.send(&WriteCommit { sha256 }).await?;
        match self.receive_with(TRANSFER_STALL_TIMEOUT, "Written").await? {
            Response::Written(written) => Ok(written),
            Response::Error(reply) => Err(Error::Agent {
                host: self.host.id.clone(),
                reply,
            }),
            other => Err(self.unexpected("Written", &other)),
        }
    }

    /// Where to start sending, and the hasher primed with the skipped bytes when the
    /// digest is computed on the way.
    async fn resume_point(
        &self,
        source: &WriteSource,
        file: &std::fs::File,
        offer: &WriteOffer,
    ) -> Result<(u64, Option<sha2::Sha256>)> {
        if source.sha256.is_some() {
            // The agent keyed its staging by the digest we named: its bytes are a prefix
            // of this content, and it verifies the whole file at the end anyway.
            return Ok((offer.have, None));
        }
        if offer.have == 0 {
            return Ok((0, Some(sha2::Sha256::new())));
        }
        let path = source.path.clone();
        let have = offer.have;
        let file = file
            .try_clone()
            .map_err(|e| Error::local(&source.path, format!("cannot read: {e}")))?;
        let prefix = tokio::task::spawn_blocking(move || hash_prefix(&path, file, have))
            .await
            .map_err(|e| Error::local(&source.path, format!("hashing failed: {e}")))??;
        let ours = Sha256(prefix.clone().finalize().into());
        if ours == offer.have_sha256 {
            Ok((have, Some(prefix)))
        } else {
            // The file changed since the interrupted attempt: send it all.
            Ok((0, Some(sha2::Sha256::new())))
        }
    }

    /// Sends bytes `offset..size` of `path`, read and hashed on a blocking thread so the
    /// disk, the hash and the socket overlap. Returns the digest when hashing.
    async fn stream_file(
        &mut self,
        path: &Path,
        file: &std::fs::File,
        offset: u64,
        size: u64,
        hasher: Option<sha2::Sha256>,
        progress: &mut (dyn FnMut(Progress) + Send),
    ) -> Result<Option<Sha256>> {
        let (tx, mut rx) = mpsc::channel::<std::io::Result<Vec<u8>>>(CHUNKS_AHEAD);
        // Buffers sent go back to the reader, which fills them again: a push allocates
        // a handful of chunks, not one per 256 KiB read (each allocated, zeroed, its
        // pages faulted in, then freed on another thread).
        let (recycle, recycled) = std::sync::mpsc::channel::<Vec<u8>>();
        let reader_path = path.to_path_buf();
        let reader_file = file
            .try_clone()
            .map_err(|e| Error::local(path, format!("cannot read: {e}")))?;
        let hashing = hasher.is_some();
        let reader = tokio::task::spawn_blocking(move || {
            let chunks = Chunks {
                tx: &tx,
                recycled: &recycled,
            };
            read_chunks(&reader_path, reader_file, offset, size, hasher, chunks)
        });
        let mut sent = 0u64;
        let want = size - offset;
        while let Some(chunk) = rx.recv().await {
            let chunk = chunk.map_err(|e| Error::local(path, format!("read failed: {e}")))?;
            tokio::time::timeout(TRANSFER_STALL_TIMEOUT, self.stream.write_all(&chunk))
                .await
                .map_err(|_| timeout(&self.host, "sending file bytes".to_string()))?
                .map_err(|e| super::io_error(&self.host, "sending file bytes", e))?;
            sent += chunk.len() as u64;
            // The reader may have finished and gone: the buffer is then dropped here.
            let _ = recycle.send(chunk);
            progress(Progress {
                total: size,
                skipped: offset,
                sent,
            });
        }
        let digest = reader
            .await
            .map_err(|e| Error::local(path, format!("reader failed: {e}")))??;
        if sent != want {
            return Err(Error::local(
                path,
                format!(
                    "the file changed while it was being sent (it shrank: {sent} of {want} \
                     bytes read); nothing was committed on the agent"
                ),
            ));
        }
        let why = if hashing {
            "to send and hash"
        } else {
            "to send"
        };
        crate::digest_cache::note_read(path, sent, hashing, why);
        Ok(digest)
    }

    /// Closes the connection in the middle of a transfer, so that the agent commits
    /// nothing; bounded, as the agent may not be reading.
    pub(super) async fn abandon(&mut self) {
        let _ = tokio::time::timeout(ABANDON_TIMEOUT, self.stream.shutdown()).await;
    }

    /// After a failed send, the agent may have said why before closing: read it.
    pub(super) async fn explain_cut_transfer(&mut self, error: Error) -> Error {
        if !matches!(error, Error::Protocol { .. } | Error::Timeout { .. }) {
            return error;
        }
        let reply = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            erel_proto::read_frame::<Response, _>(&mut self.stream),
        )
        .await;
        match reply {
            Ok(Ok(Some(Response::Error(reply)))) => Error::Agent {
                host: self.host.id.clone(),
                reply,
            },
            _ => error,
        }
    }

    pub(super) async fn receive_with(
        &mut self,
        limit: std::time::Duration,
        what: &str,
    ) -> Result<Response> {
        tokio::time::timeout(limit, self.receive())
            .await
            .map_err(|_| timeout(&self.host, format!("waiting for {what}")))?
    }
}

/// Opens the file to send and takes its stamp from the open file (blocking).
pub(super) fn open_stamped(path: &Path) -> Result<(std::fs::File, FileStamp)> {
    let file =
        std::fs::File::open(path).map_err(|e| Error::local(path, format!("cannot read: {e}")))?;
    let meta = file
        .metadata()
        .map_err(|e| Error::local(path, format!("cannot read: {e}")))?;
    if !meta.is_file() {
        return Err(Error::local(path, "not a regular file"));
    }
    Ok((file, FileStamp::of(&meta)))
}

/// Fails when the open file or the file at `path` is not in the state `before` any more.
pub(super) async fn unchanged_since(
    path: &Path,
    file: &std::fs::File,
    before: &FileStamp,
) -> Result<()> {
    let file = file
        .try_clone()
        .map_err(|e| Error::local(path, format!("cannot read: {e}")))?;
    let checked = path.to_path_buf();
    let (open, named) = tokio::task::spawn_blocking(move || {
        (
            FileStamp::of_file(&file, &checked),
            FileStamp::take(&checked),
        )
    })
    .await
    .map_err(|e| Error::local(path, format!("checking failed: {e}")))?;
    let change = match (open, named) {
        (Ok(open), Ok(named)) => before.change(&open).or_else(|| before.change(&named)),
        (Err(e), _) | (_, Err(e)) => Some(format!("it can no longer be read ({e})")),
    };
    match change {
        None => Ok(()),
        Some(change) => Err(Error::local(
            path,
            format!(
                "the file changed while it was being sent ({change}); nothing was committed \
                 on the agent: push it again once it is complete"
            ),
        )),
    }
}

fn hash_prefix(path: &Path, mut file: std::fs::File, len: u64) -> Result<sha2::Sha256> {
    use std::io::{Seek, SeekFrom};
    file.seek(SeekFrom::Start(0))
        .map_err(|e| Error::local(path, format!("seek failed: {e}")))?;
    let mut hasher = sha2::Sha256::new();
    let seen = hash_into(&mut hasher, &mut file.take(len))
        .map_err(|e| Error::local(path, format!("read failed: {e}")))?;
    if seen != len {
        return Err(Error::local(path, "file shrank while reading"));
    }
    Ok(hasher)
}

/// Where [`read_chunks`] sends the chunks it reads, and where the sender gives their
/// buffers back once their bytes are on the socket.
struct Chunks<'a> {
    tx: &'a mpsc::Sender<std::io::Result<Vec<u8>>>,
    recycled: &'a std::sync::mpsc::Receiver<Vec<u8>>,
}

impl Chunks<'_> {
    /// A buffer of `len` bytes to read into: one given back when there is one.
    fn buffer(&self, len: usize) -> Vec<u8> {
        match self.recycled.try_recv() {
            Ok(mut buffer) => {
                buffer.resize(len, 0);
                buffer
            }
            Err(_) => vec![0u8; len],
        }
    }
}

/// Reads bytes `offset..size` of `file` in chunks of [`CHUNK`] bytes (blocking),
/// hashing them when `hasher` is given, and sends them to the socket side; stops early
/// when the file shrank (the sender notices the short count) or the sender gave up.
fn read_chunks(
    path: &Path,
    mut file: std::fs::File,
    offset: u64,
    size: u64,
    mut hasher: Option<sha2::Sha256>,
    chunks: Chunks<'_>,
) -> Result<Option<Sha256>> {
    use std::io::{Seek, SeekFrom};
    let tx = chunks.tx;
    file.seek(SeekFrom::Start(offset))
        .map_err(|e| Error::local(path, format!("seek failed: {e}")))?;
    let mut left = size - offset;
    while left > 0 {
        let want = usize::try_from(left).unwrap_or(CHUNK).min(CHUNK);
        let mut chunk = chunks.buffer(want);
        let mut filled = 0;
        while filled < want {
            match file.read(&mut chunk[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return Ok(None);
                }
            }
        }
        if filled == 0 {
            break; // shrank: the sender notices the short count
        }
        chunk.truncate(filled);
        if let Some(h) = hasher.as_mut() {
            h.update(&chunk);
        }
        left -= filled as u64;
        if tx.blocking_send(Ok(chunk)).is_err() {
            return Ok(None); // the socket side gave up
        }
    }
    Ok(hasher.map(|h| Sha256(h.finalize().into())))
}
