//! The socket side of a `WriteFile`: the offer answered, `WriteBegin` read, the raw bytes
//! copied from the socket to the staging file (hashed on the way, a few chunks in
//! memory), `WriteCommit` read; a newer request for the same file takes the transfer
//! over at any point.

use std::io;
use std::time::Duration;

use erel_proto::{
    read_frame, write_frame, Response, WriteBegin, WriteCommit, WriteFile, WriteOffer,
};
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{begin, offer, Receiver};
use crate::error::{Error, Result};
use crate::server::{blocking, ConnError, ConnResult, Connection, Outcome, REFUSAL_LINGER};

/// A transfer that makes no progress for this long is abandoned (its bytes are kept).
const TRANSFER_STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Size of one chunk of a transfer's raw bytes.
const CHUNK: usize = 256 * 1024;

/// Chunks in flight between the socket and the disk writer.
const CHUNKS_IN_FLIGHT: usize = 4;

/// A `WriteFile` on a connection: offer, begin, raw bytes, commit (see PROTOCOL.md).
/// Returns what was written (path, size and the offset the master began at, for the
/// log) and the answer to the commit, or the refusal of the offer; an error ends the
/// connection, after telling the master why when it can still hear it.
pub(crate) async fn transfer<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    request: WriteFile,
) -> Outcome {
    let mut subject = format!("{} size={}", request.path, request.size);
    let outcome = receive(conn, request, &mut subject).await;
    (subject, outcome)
}

/// The transfer itself; `subject` gains the offset once the master has chosen it.
async fn receive<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    request: WriteFile,
    subject: &mut String,
) -> ConnResult<Result<Response>> {
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
    *subject += &format!(" offset={offset}");
    let receiver = blocking(move || begin(offer, offset)).await;
    // The master is about to stream raw bytes: a refusal is reported and ends the
    // connection.
    let receiver = conn.reported(receiver).await?;
    let remaining = request.size.saturating_sub(offset);
    let received = stream_to_disk(conn, receiver, remaining, path, &wanted).await?;
    let receiver = conn.reported(received).await?;
    let WriteCommit { sha256 } = read_transfer_frame(conn, "WriteCommit", &wanted, path).await?;
    let written = blocking(move || receiver.commit(sha256)).await;
    Ok(written.map(Response::Written))
}

/// Reads the next frame of a transfer of `path`; ends the transfer when a newer request
/// for the same file takes it over (`wanted`).
async fn read_transfer_frame<T: DeserializeOwned, S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    what: &'static str,
    wanted: &CancellationToken,
    path: &str,
) -> ConnResult<T> {
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
        Ok(Err(e)) => Err(conn.refuse_frame(e).await),
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
    let reply = Response::Error(error.to_reply());
    let _ = tokio::time::timeout(REFUSAL_LINGER, write_frame(&mut conn.stream, &reply)).await;
    ConnError::TakenOver(path.to_string())
}

/// Copies `remaining` raw bytes from the socket to the staging file. The disk side runs
/// on a blocking thread so hashing and writing overlap with receiving; memory stays at a
/// few chunks whatever the size. The outer error ends the connection (the staged bytes
/// are kept for a resume); the inner one is reported to the master.
///
/// The chunk buffers go round: the writer hands each one back once written, and the
/// socket side fills it again. At most `CHUNKS_IN_FLIGHT + 2` are ever allocated (the
/// ones queued, the one being written, the one being filled), each of at most
/// [`CHUNK`] bytes and zeroed once. A fresh
/// buffer per chunk would cost, at this size (above glibc's `mmap` threshold), a map,
/// page faults on every page, a fill with zeros and an unmap, for every 256 KiB.
async fn stream_to_disk<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    mut receiver: Receiver,
    remaining: u64,
    path: &str,
    wanted: &CancellationToken,
) -> ConnResult<Result<Receiver>> {
    let (tx, mut rx) = mpsc::channel::<Chunk>(CHUNKS_IN_FLIGHT);
    let (give_back, mut returned) = mpsc::unbounded_channel::<Vec<u8>>();
    let writer = tokio::task::spawn_blocking(move || {
        while let Some(chunk) = rx.blocking_recv() {
            receiver.write(chunk.filled())?;
            // The socket side may have stopped; the buffer is then simply freed.
            let _ = give_back.send(chunk.buf);
        }
        Ok(receiver)
    });
    let mut left = remaining;
    let mut read_error = None;
    while left > 0 {
        let want = usize::try_from(left).unwrap_or(CHUNK).min(CHUNK);
        // `want` never grows, so a buffer given back is large enough.
        let mut buf = returned.try_recv().unwrap_or_else(|_| vec![0u8; want]);
        let read = tokio::select! {
            _ = wanted.cancelled() => Err(ConnError::TakenOver(path.to_string())),
            read = tokio::time::timeout(TRANSFER_STALL_TIMEOUT, read_some(&mut conn.stream, &mut buf[..want])) => match read {
                Err(_) => Err(ConnError::Timeout("transfer bytes")),
                Ok(Err(e)) => Err(ConnError::Io(e)),
                Ok(Ok(0)) => Err(ConnError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("connection closed with {left} bytes of {path} still to come"),
                ))),
                Ok(Ok(n)) => Ok(n),
            },
        };
        let len = match read {
            Ok(n) => n,
            Err(error) => {
                read_error = Some(error);
                break;
            }
        };
        left -= len as u64;
        if tx.send(Chunk { buf, len }).await.is_err() {
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

/// A buffer on its way to the disk, of which the first `len` bytes arrived.
struct Chunk {
    buf: Vec<u8>,
    len: usize,
}

impl Chunk {
    /// The bytes that arrived.
    fn filled(&self) -> &[u8] {
        &self.buf[..self.len]
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
