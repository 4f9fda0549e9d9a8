//! The master's side of `WriteFile`: offer, resume decision, raw bytes, commit.
//!
//! When the caller knows the file's sha256 (a cluster file names it, or the digest cache
//! has it) the file is read once, straight onto the socket, and a file the agent already
//! holds costs nothing. When it does not, the file is hashed while it is sent and the
//! digest goes last, in `WriteCommit`; a resume then checks the agent's staged prefix
//! against our own first bytes before skipping them (see `proto/PROTOCOL.md`).

use std::io::Read;
use std::path::{Path, PathBuf};

use erel_proto::{
    Request, Response, Sha256, WriteBegin, WriteCommit, WriteFile, WriteOffer, Written,
};
use sha2::Digest;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::{timeout, AgentClient, BusyWait, TRANSFER_STALL_TIMEOUT};
use crate::error::{Error, Result};

/// Bytes read from disk per chunk.
const CHUNK: usize = 256 * 1024;
/// Chunks read ahead of the socket.
const CHUNKS_AHEAD: usize = 4;

/// What to send: a local file, and its digest when already known.
#[derive(Debug, Clone)]
pub struct WriteSource {
    /// The local file.
    pub path: PathBuf,
    /// Its sha256, when known in advance.
    pub sha256: Option<Sha256>,
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
    pub async fn write_file(
        &mut self,
        source: &WriteSource,
        dest: &str,
        mode: u32,
        progress: &mut (dyn FnMut(Progress) + Send),
    ) -> Result<Written> {
        let path = source.path.clone();
        let meta = tokio::fs::metadata(&path)
            .await
            .map_err(|e| Error::local(&path, format!("cannot read: {e}")))?;
        if !meta.is_file() {
            return Err(Error::local(&path, "not a regular file"));
        }
        let size = meta.len();
        let request = Request::WriteFile(WriteFile {
            path: dest.to_string(),
            mode,
            size,
            sha256: source.sha256,
        });
        // A transfer of the same file cut a moment ago may still hold the agent's
        // staging: the agent hands it over within a bounded time, and we wait for that.
        let mut busy = BusyWait::new();
        let offer = loop {
            self.send(&request).await?;
            match self
                .receive_with(TRANSFER_STALL_TIMEOUT, "WriteOffer")
                .await?
            {
                Response::WriteOffer(offer) => break offer,
                Response::Error(reply) => busy.retry_or_fail(&self.host, reply).await?,
                other => return Err(self.unexpected("WriteOffer", &other)),
            }
        };
        if offer.have > size {
            return Err(self.protocol_error(format!(
                "agent offered {} bytes of a {size}-byte file",
                offer.have
            )));
        }
        let (offset, hasher) = self.resume_point(source, &offer).await?;
        self.send(&WriteBegin { offset }).await?;
        progress(Progress {
            total: size,
            skipped: offset,
            sent: 0,
        });
        let digest = match self
            .stream_file(&path, offset, size, hasher, progress)
            .await
        {
            Ok(digest) => digest,
            Err(e) => return Err(self.explain_cut_transfer(e).await),
        };
        let sha256 = match (source.sha256, digest) {
            (Some(known), _) => known,
            (None, Some(computed)) => computed,
            (None, None) => return Err(Error::local(&path, "internal: no digest computed")),
        };
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
        let prefix = tokio::task::spawn_blocking(move || hash_prefix(&path, have))
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
        offset: u64,
        size: u64,
        hasher: Option<sha2::Sha256>,
        progress: &mut (dyn FnMut(Progress) + Send),
    ) -> Result<Option<Sha256>> {
        let (tx, mut rx) = mpsc::channel::<std::io::Result<Vec<u8>>>(CHUNKS_AHEAD);
        let reader_path = path.to_path_buf();
        let reader = tokio::task::spawn_blocking(move || {
            read_chunks(&reader_path, offset, size, hasher, &tx)
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
                format!("file changed while sending: {sent} of {want} bytes read"),
            ));
        }
        Ok(digest)
    }

    /// After a failed send, the agent may have said why before closing: read it.
    async fn explain_cut_transfer(&mut self, error: Error) -> Error {
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

    async fn receive_with(&mut self, limit: std::time::Duration, what: &str) -> Result<Response> {
        tokio::time::timeout(limit, self.receive())
            .await
            .map_err(|_| timeout(&self.host, format!("waiting for {what}")))?
    }
}

fn hash_prefix(path: &Path, len: u64) -> Result<sha2::Sha256> {
    let file =
        std::fs::File::open(path).map_err(|e| Error::local(path, format!("cannot open: {e}")))?;
    let mut hasher = sha2::Sha256::new();
    let mut limited = file.take(len);
    let mut buf = vec![0u8; CHUNK];
    let mut seen = 0u64;
    loop {
        let n = limited
            .read(&mut buf)
            .map_err(|e| Error::local(path, format!("read failed: {e}")))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        seen += n as u64;
    }
    if seen != len {
        return Err(Error::local(path, "file shrank while reading"));
    }
    Ok(hasher)
}

fn read_chunks(
    path: &Path,
    offset: u64,
    size: u64,
    mut hasher: Option<sha2::Sha256>,
    tx: &mpsc::Sender<std::io::Result<Vec<u8>>>,
) -> Result<Option<Sha256>> {
    use std::io::{Seek, SeekFrom};
    let mut file =
        std::fs::File::open(path).map_err(|e| Error::local(path, format!("cannot open: {e}")))?;
    file.seek(SeekFrom::Start(offset))
        .map_err(|e| Error::local(path, format!("seek failed: {e}")))?;
    let mut left = size - offset;
    while left > 0 {
        let want = usize::try_from(left).unwrap_or(CHUNK).min(CHUNK);
        let mut chunk = vec![0u8; want];
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
