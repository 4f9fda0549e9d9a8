//! One file pushed to many agents at once (a rollout's archive) with one read of it:
//! a [`SharedFile`] reads each chunk from disk once into a window of recent chunks, and
//! every host's push ([`AgentClient::write_shared`]) sends it from there, instead of
//! each push reading the whole file again into buffers of its own.
//!
//! The window holds at most [`WINDOW_CHUNKS`] chunks of [`CHUNK`] bytes. Pushes running
//! side by side find their chunks in it; a push that falls further behind than the
//! window reads the chunks it needs again (the same bytes, as the file is checked
//! unchanged), so the memory stays bounded whatever the spread of the hosts' speeds: the
//! window, plus the chunk each push is sending and the next one it has fetched (16 MiB
//! and 512 KiB a push), against five chunks a push when each read the file itself.
//!
//! Only for a file whose sha256 is known (the agent verifies the whole file and refuses
//! other bytes). The file is opened once, on the first push, and its [`FileStamp`] is
//! taken then; after each push's last byte and before its `WriteCommit`, the stamp is
//! taken again on the open file and on the path, as `write_file` does for one push: a
//! file written, touched or replaced meanwhile fails the push, naming the file, and
//! nothing is committed.

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use erel_proto::{Request, Sha256, WriteBegin, WriteFile, Written};
use tokio::io::AsyncWriteExt;
use tokio::sync::OnceCell;

use super::write_file::{open_stamped, unchanged_since, CHUNK};
use super::{timeout, AgentClient, TRANSFER_STALL_TIMEOUT};
use crate::digest_cache::FileStamp;
use crate::error::{Error, Result};

/// Chunks a [`SharedFile`] keeps for the pushes behind the first: 16 MiB.
pub(crate) const WINDOW_CHUNKS: usize = 64;

/// One chunk of the file, as read from disk.
type Chunk = Arc<Vec<u8>>;

/// A local file of known digest, read once for all the pushes of it that run at once
/// (see the module's documentation).
pub struct SharedFile {
    path: PathBuf,
    sha256: Sha256,
    /// The open file and its stamp when it was opened, on the first push.
    opened: OnceCell<(Arc<File>, FileStamp)>,
    /// The chunks read last, oldest first, by index (offset / [`CHUNK`]); a chunk being
    /// read is here already, so that pushes wanting it wait for that one read.
    window: Mutex<VecDeque<(u64, Arc<OnceCell<Chunk>>)>>,
    /// Bytes read from disk so far.
    bytes_read: AtomicU64,
}

impl std::fmt::Debug for SharedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedFile")
            .field("path", &self.path)
            .field("sha256", &self.sha256)
            .finish()
    }
}

impl SharedFile {
    /// `path`, whose content is `sha256`; nothing is opened or read yet.
    pub fn new(path: impl Into<PathBuf>, sha256: Sha256) -> Self {
        SharedFile {
            path: path.into(),
            sha256,
            opened: OnceCell::new(),
            window: Mutex::new(VecDeque::with_capacity(WINDOW_CHUNKS)),
            bytes_read: AtomicU64::new(0),
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes read from disk so far, by every push together: the file's size once when
    /// the pushes ran side by side.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }

    /// The open file and its stamp, opening it on first use (blocking work on the
    /// blocking pool).
    async fn opened(&self) -> Result<&(Arc<File>, FileStamp)> {
        self.opened
            .get_or_try_init(|| async {
                let path = self.path.clone();
                let (file, stamp) = tokio::task::spawn_blocking(move || open_stamped(&path))
                    .await
                    .map_err(|e| Error::local(&self.path, format!("opening failed: {e}")))??;
                Ok::<_, Error>((Arc::new(file), stamp))
            })
            .await
    }

    /// Chunk `index` of a file of `size` bytes: from the window, else read once for
    /// every push asking for it meanwhile.
    async fn chunk(&self, file: &Arc<File>, size: u64, index: u64) -> Result<Chunk> {
        let cell = {
            let mut window = self.window.lock().unwrap_or_else(PoisonError::into_inner);
            match window.iter().find(|(at, _)| *at == index) {
                Some((_, cell)) => cell.clone(),
                None => {
                    if window.len() >= WINDOW_CHUNKS {
                        window.pop_front();
                    }
                    let cell = Arc::new(OnceCell::new());
                    window.push_back((index, cell.clone()));
                    cell
                }
            }
        };
        cell.get_or_try_init(|| self.read_chunk(file, size, index))
            .await
            .cloned()
    }

    /// Reads chunk `index` from disk (on the blocking pool); fails, naming the file,
    /// when the file has fewer bytes than its stamp said (it shrank).
    async fn read_chunk(&self, file: &Arc<File>, size: u64, index: u64) -> Result<Chunk> {
        let start = index * CHUNK as u64;
        let len = usize::try_from(size.saturating_sub(start))
            .unwrap_or(CHUNK)
            .min(CHUNK);
        let file = file.clone();
        let read = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len];
            file.read_exact_at(&mut buf, start).map(|()| buf)
        })
        .await
        .map_err(|e| Error::local(&self.path, format!("reader failed: {e}")))?;
        let buf = read.map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::local(
                    &self.path,
                    "the file changed while it was being sent (it shrank); nothing was \
                     committed on the agent",
                )
            } else {
                Error::local(&self.path, format!("read failed: {e}"))
            }
        })?;
        self.bytes_read.fetch_add(len as u64, Ordering::Relaxed);
        Ok(Arc::new(buf))
    }
}

impl Drop for SharedFile {
    /// Counts the pushes' reads as one read of the file, with the bytes they took from
    /// disk (see [`crate::digest_cache::files_read`]).
    fn drop(&mut self) {
        let bytes = self.bytes_read();
        if bytes > 0 {
            crate::digest_cache::note_read(&self.path, bytes, false, "to send");
        }
    }
}

impl AgentClient {
    /// `WriteFile` of `shared` at `dest` (relative to the agent's root) with `mode`,
    /// its bytes taken from the window `shared` keeps for every push of it (see the
    /// module's documentation). Resumes an interrupted transfer and sends nothing for a
    /// file already in place, as [`AgentClient::write_file`] does for a file of known
    /// digest.
    ///
    /// Fails with [`Error::Local`] naming the file when it cannot be read, or is written
    /// to, touched or replaced between its first push opening it and this push's last
    /// byte; nothing is then committed and this connection is closed.
    pub async fn write_shared(
        &mut self,
        shared: &SharedFile,
        dest: &str,
        mode: u32,
    ) -> Result<Written> {
        let (file, stamp) = shared.opened().await?;
        let size = stamp.size();
        let request = Request::WriteFile(WriteFile {
            path: dest.to_string(),
            mode,
            size,
            sha256: Some(shared.sha256),
        });
        let offer = self.offer(&request, size).await?;
        // The agent keyed its staging by the digest we named: its bytes are a prefix of
        // this content, and it verifies the whole file at the end.
        let offset = offer.have;
        self.send(&WriteBegin { offset }).await?;
        match self.stream_shared(shared, file, size, offset).await {
            Ok(()) => {}
            Err(e @ Error::Local { .. }) => {
                self.abandon().await;
                return Err(e);
            }
            Err(e) => return Err(self.explain_cut_transfer(e).await),
        }
        if let Err(e) = unchanged_since(&shared.path, file, stamp).await {
            self.abandon().await;
            return Err(e);
        }
        self.commit(shared.sha256).await
    }

    /// Sends bytes `offset..size` from the shared window, fetching the next chunk while
    /// the current one goes out, so the disk and the socket overlap.
    async fn stream_shared(
        &mut self,
        shared: &SharedFile,
        file: &Arc<File>,
        size: u64,
        offset: u64,
    ) -> Result<()> {
        let chunk_len = CHUNK as u64;
        let mut index = offset / chunk_len;
        // Where the first chunk's bytes to send begin (a resumed push).
        let mut skip = usize::try_from(offset % chunk_len).unwrap_or(0);
        let mut next = if offset < size {
            Some(shared.chunk(file, size, index).await?)
        } else {
            None
        };
        let host = &self.host;
        let stream = &mut self.stream;
        while let Some(chunk) = next {
            let following = index + 1;
            let send = async {
                tokio::time::timeout(TRANSFER_STALL_TIMEOUT, stream.write_all(&chunk[skip..]))
                    .await
                    .map_err(|_| timeout(host, "sending file bytes".to_string()))?
                    .map_err(|e| super::io_error(host, "sending file bytes", e))
            };
            let fetch = async {
                if following * chunk_len < size {
                    shared.chunk(file, size, following).await.map(Some)
                } else {
                    Ok(None)
                }
            };
            let (sent, fetched) = tokio::join!(send, fetch);
            sent?;
            next = fetched?;
            skip = 0;
            index = following;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of `len` bytes, each its offset modulo a prime, in a temporary directory.
    fn file_of(len: usize) -> (tempfile::TempDir, PathBuf, Vec<u8>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("app.tar.gz");
        let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &bytes).expect("write");
        (dir, path, bytes)
    }

    #[tokio::test]
    async fn pushes_side_by_side_read_each_chunk_once() {
        let len = CHUNK * 3 + 17;
        let (_dir, path, bytes) = file_of(len);
        let shared = SharedFile::new(&path, Sha256([0; 32]));
        let (file, stamp) = shared.opened().await.expect("open").clone();
        let chunks = (len as u64).div_ceil(CHUNK as u64);
        // Four pushes taking every chunk in turn, interleaved.
        for index in 0..chunks {
            for _push in 0..4 {
                let chunk = shared
                    .chunk(&file, stamp.size(), index)
                    .await
                    .expect("chunk");
                let start = index as usize * CHUNK;
                assert_eq!(chunk.as_slice(), &bytes[start..(start + CHUNK).min(len)]);
            }
        }
        assert_eq!(shared.bytes_read(), len as u64, "one read for four pushes");
    }

    #[tokio::test]
    async fn a_push_behind_the_window_reads_its_chunks_again() {
        let chunks = WINDOW_CHUNKS as u64 + 2;
        let len = usize::try_from(chunks).expect("small") * CHUNK;
        let (_dir, path, bytes) = file_of(len);
        let shared = SharedFile::new(&path, Sha256([0; 32]));
        let (file, stamp) = shared.opened().await.expect("open").clone();
        for index in 0..chunks {
            shared
                .chunk(&file, stamp.size(), index)
                .await
                .expect("chunk");
        }
        assert_eq!(shared.window.lock().expect("lock").len(), WINDOW_CHUNKS);
        // Chunk 0 left the window: read again, same bytes; the last one is still there.
        let first = shared.chunk(&file, stamp.size(), 0).await.expect("chunk");
        assert_eq!(first.as_slice(), &bytes[..CHUNK]);
        shared
            .chunk(&file, stamp.size(), chunks - 1)
            .await
            .expect("chunk");
        assert_eq!(shared.bytes_read(), (len + CHUNK) as u64);
        assert_eq!(shared.window.lock().expect("lock").len(), WINDOW_CHUNKS);
    }

    #[tokio::test]
    async fn a_file_that_shrank_fails_naming_it() {
        let (_dir, path, _) = file_of(CHUNK * 2);
        let shared = SharedFile::new(&path, Sha256([0; 32]));
        let (file, stamp) = shared.opened().await.expect("open").clone();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(CHUNK as u64 + 1))
            .expect("truncate");
        let error = shared
            .chunk(&file, stamp.size(), 1)
            .await
            .expect_err("a short read");
        let text = error.to_string();
        assert!(
            text.contains("app.tar.gz") && text.contains("shrank"),
            "{text}"
        );
    }
}
