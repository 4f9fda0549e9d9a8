//! The agent's server: mutual TLS, the `Hello` handshake, and one `match` that
//! dispatches the five commands.
//!
//! The accept loop only accepts and spawns. Each connection runs under named timeouts
//! (handshake, `Hello`, idle, transfer stall). A peer first takes a place in the budget
//! of pending handshakes (`peers`: short timeout, capped per address, the oldest
//! dropped for a newcomer); only once its certificate is verified does it take one of
//! the `max_connections` session permits, so peers without a certificate cannot use up
//! the masters' room. A master beyond that limit is told so with `Busy`. Nothing a peer
//! sends is read before its certificate is verified.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use erel_proto::text::quote;
use erel_proto::{
    read_frame, read_frame_body, write_frame, ErrorKind, ErrorReply, FrameError, Hello, Pong,
    Request, Response, WriteBegin, WriteCommit, WriteFile, PROTOCOL_VERSION,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::error::{Error, Result};
use crate::fs::{free_disk, Root};
use crate::peers::{HandshakeSlot, Handshakes};
use crate::settings::{Limits, Supervision};
use crate::supervisor::Supervisor;
use crate::{retention, unpack, write_file};

/// Time allowed for the master's `Hello` after the handshake.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection with no request for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// A transfer that makes no progress for this long is abandoned (its bytes are kept).
pub const TRANSFER_STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Time allowed to write one answer.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest grace a `Stop` may ask for.
pub const MAX_STOP_GRACE: Duration = Duration::from_secs(600);
/// How long shutdown waits for connections in progress.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a refused connection is drained before it is closed.
pub const REFUSAL_LINGER: Duration = Duration::from_secs(2);

/// Size of one chunk of a transfer's raw bytes.
const CHUNK: usize = 256 * 1024;
/// Chunks in flight between the socket and the disk writer.
const CHUNKS_IN_FLIGHT: usize = 4;

/// Everything a connection needs to execute commands.
#[derive(Debug)]
pub struct Agent {
    /// The root directory.
    pub root: Root,
    /// This host's id, as its certificate names it.
    pub host_id: String,
    /// Limits on what a command may write.
    pub limits: Limits,
    /// Supervision settings (for retention).
    pub supervision: Supervision,
    /// The release supervisor.
    pub supervisor: Supervisor,
    started: Instant,
}

impl Agent {
    /// Builds the agent's shared state.
    pub fn new(
        root: Root,
        host_id: String,
        limits: Limits,
        supervision: Supervision,
        supervisor: Supervisor,
    ) -> Self {
        Agent {
            root,
            host_id,
            limits,
            supervision,
            supervisor,
            started: Instant::now(),
        }
    }
}

/// The TLS configuration, reloaded from the bundle directory when its files change, so
/// a rotated CA, host certificate or CRL applies to new connections without a restart.
pub struct TlsSource {
    dir: PathBuf,
    current: Mutex<Loaded>,
}

/// The bundle in use, and the last replacement that was refused.
struct Loaded {
    /// The files the acceptor was built from.
    fingerprint: erel_certs::BundleFingerprint,
    acceptor: TlsAcceptor,
    /// The files of a replacement that did not load: not tried again (nor warned
    /// about again) until they change, so connections, an unauthenticated flood
    /// included, cost one look at the files' metadata each, not a parse of the bundle.
    refused: Option<erel_certs::BundleFingerprint>,
}

impl std::fmt::Debug for TlsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSource").field("dir", &self.dir).finish()
    }
}

impl TlsSource {
    /// Loads the bundle in `dir` (`ca.pem`, `host.pem`, `host.key`, optional `crl.pem`).
    pub fn load(dir: PathBuf) -> std::result::Result<Self, erel_certs::Error> {
        let fingerprint = erel_certs::bundle_fingerprint(&dir);
        let config = erel_certs::server_config(&dir)?;
        Ok(TlsSource {
            dir,
            current: Mutex::new(Loaded {
                fingerprint,
                acceptor: TlsAcceptor::from(config),
                refused: None,
            }),
        })
    }

    /// The acceptor for a new connection, reloading the bundle first if it changed. A
    /// bundle that no longer loads (for example half-copied) keeps the previous one,
    /// and is tried again (and warned about again) only once its files change again.
    pub fn acceptor(&self) -> TlsAcceptor {
        let fingerprint = erel_certs::bundle_fingerprint(&self.dir);
        let mut current = match self.current.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if current.fingerprint != fingerprint && current.refused.as_ref() != Some(&fingerprint) {
            match erel_certs::server_config(&self.dir) {
                Ok(config) => {
                    info!(dir = %self.dir.display(), "certificate bundle changed; reloaded");
                    *current = Loaded {
                        fingerprint,
                        acceptor: TlsAcceptor::from(config),
                        refused: None,
                    };
                }
                Err(e) => {
                    warn!(dir = %self.dir.display(), error = %e, "certificate bundle changed but does not load; keeping the previous one");
                    current.refused = Some(fingerprint);
                }
            }
        }
        current.acceptor.clone()
    }
}

/// Serves connections from `listener` until `shutdown` is cancelled, then waits up to
/// [`DRAIN_TIMEOUT`] for connections in progress. Releases are left running.
pub async fn serve(
    listener: TcpListener,
    agent: Arc<Agent>,
    tls: Arc<TlsSource>,
    shutdown: CancellationToken,
) {
    let sessions = Arc::new(Semaphore::new(agent.limits.max_connections));
    let handshakes = Handshakes::new(
        agent.limits.max_handshakes,
        agent.limits.max_handshakes_per_address,
    );
    let tracker = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (slot, _crowded) = handshakes.admit(peer.ip());
        let acceptor = tls.acceptor();
        let agent = agent.clone();
        let shutdown = shutdown.clone();
        let sessions = sessions.clone();
        tracker.spawn(async move {
            connection(stream, peer, slot, acceptor, agent, sessions, shutdown).await;
        });
    }
    tracker.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, tracker.wait())
        .await
        .is_err()
    {
        warn!("connections still open after the drain timeout; leaving them");
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    slot: HandshakeSlot,
    acceptor: TlsAcceptor,
    agent: Arc<Agent>,
    sessions: Arc<Semaphore>,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let limit = agent.limits.handshake_timeout;
    let handshake = async {
        match tokio::time::timeout(limit, acceptor.accept(stream).into_fallible()).await {
            Ok(Ok(tls)) => Some(tls),
            Ok(Err((e, stream))) => {
                info!(%peer, error = %e, "TLS handshake refused");
                linger_after_refusal(stream).await;
                None
            }
            Err(_) => {
                info!(%peer, timeout_ms = limit.as_millis() as u64, "TLS handshake timed out");
                None
            }
        }
    };
    let tls = tokio::select! {
        tls = handshake => tls,
        () = slot.evicted() => {
            debug!(%peer, "pending TLS handshake dropped to make room for a newer peer");
            None
        }
        () = shutdown.cancelled() => None,
    };
    // Authenticated or not, this peer no longer counts as a pending handshake.
    drop(slot);
    let Some(tls) = tls else {
        return;
    };
    let peer_name = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(erel_certs::peer_name)
        .unwrap_or_else(|| "unknown".to_string());
    let mut conn = Connection {
        stream: tls,
        peer,
        peer_name,
        agent,
    };
    let Ok(_permit) = sessions.try_acquire_owned() else {
        conn.refuse_at_limit().await;
        let _ = tokio::time::timeout(REFUSAL_LINGER, conn.stream.shutdown()).await;
        return;
    };
    match conn.run(shutdown).await {
        Ok(()) => debug!(peer = %conn.peer, name = %conn.peer_name, "connection closed"),
        Err(e) => info!(peer = %conn.peer, name = %conn.peer_name, error = %e, "connection ended"),
    }
    let _ = conn.stream.shutdown().await;
}

/// After refusing a handshake, the alert has been queued: shut our side down and drain
/// what the peer already sent for a moment, so the close is not a reset that would
/// swallow the alert telling the master why it was refused.
async fn linger_after_refusal(mut stream: TcpStream) {
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 4096];
    let drain = async {
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(REFUSAL_LINGER, drain).await;
}

struct Connection<S> {
    stream: S,
    peer: SocketAddr,
    peer_name: String,
    agent: Arc<Agent>,
}

/// How a connection ends when it must.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("closed after an error was reported: {0}")]
    Reported(String),
    #[error("the transfer of {0} was taken over by a newer request for the same file")]
    TakenOver(String),
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// An authenticated master beyond `max_connections`: read its `Hello` (it proved
    /// who it is) and answer `Busy`, naming the limit, so its error says why.
    async fn refuse_at_limit(&mut self) {
        let limit = self.agent.limits.max_connections;
        warn!(peer = %self.peer, name = %self.peer_name, limit, "connection limit reached; refusing a master");
        let hello = tokio::time::timeout(HELLO_TIMEOUT, read_frame_body(&mut self.stream)).await;
        if !matches!(hello, Ok(Ok(Some(_)))) {
            return;
        }
        let refusal = Error::Busy(format!(
            "this agent is at its limit of {limit} connections from masters (setting \
             max_connections); retry when one ends"
        ));
        let _ = self.reply(&Response::Error(refusal.to_reply())).await;
    }

    async fn run(&mut self, shutdown: CancellationToken) -> std::result::Result<(), ConnError> {
        if !self.handshake().await? {
            return Ok(());
        }
        loop {
            let body = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                read = tokio::time::timeout(IDLE_TIMEOUT, read_frame_body(&mut self.stream)) => match read {
                    Err(_) => return Err(ConnError::Timeout("the next request")),
                    Ok(Err(e)) => return self.refuse_frame(e).await,
                    Ok(Ok(None)) => return Ok(()),
                    Ok(Ok(Some(body))) => body,
                },
            };
            let request = match erel_proto::decode_body::<Request>(&body) {
                Ok(request) => request,
                Err(e) => return self.refuse_frame(e).await,
            };
            self.dispatch(request).await?;
        }
    }

    /// Answers a frame that could not be read or decoded, then ends the connection.
    async fn refuse_frame(&mut self, error: FrameError) -> std::result::Result<(), ConnError> {
        if matches!(error, FrameError::Io(_) | FrameError::Truncated { .. }) {
            return Err(error.into());
        }
        warn!(peer = %self.peer, name = %self.peer_name, %error, "undecodable frame");
        let reply = ErrorReply::new(ErrorKind::BadRequest, error.to_string());
        self.reply(&Response::Error(reply)).await?;
        Err(ConnError::Reported(error.to_string()))
    }

    /// Reads the master's `Hello` and answers with ours. False when refused.
    async fn handshake(&mut self) -> std::result::Result<bool, ConnError> {
        let first = tokio::time::timeout(HELLO_TIMEOUT, read_frame_body(&mut self.stream))
            .await
            .map_err(|_| ConnError::Timeout("Hello"))?;
        let body = match first {
            Ok(Some(body)) => body,
            Ok(None) => return Ok(false),
            Err(e) => return self.refuse_frame(e).await.map(|()| false),
        };
        let hello = match erel_proto::decode_body::<Request>(&body) {
            Ok(Request::Hello(hello)) => hello,
            Ok(other) => {
                let reply = ErrorReply::new(
                    ErrorKind::BadRequest,
                    format!("the first frame must be Hello, got {}", other.name()),
                );
                self.reply(&Response::Error(reply)).await?;
                return Ok(false);
            }
            Err(e) => return self.refuse_frame(e).await.map(|()| false),
        };
        if hello.protocol != PROTOCOL_VERSION {
            let reply = ErrorReply::new(
                ErrorKind::VersionMismatch,
                format!(
                    "this agent speaks protocol {PROTOCOL_VERSION}; {} ({}) speaks {}",
                    quote(&hello.name),
                    quote(&hello.software),
                    hello.protocol
                ),
            );
            warn!(peer = %self.peer, name = %self.peer_name, protocol = hello.protocol, "protocol version mismatch");
            self.reply(&Response::Error(reply)).await?;
            return Ok(false);
        }
        info!(peer = %self.peer, name = %self.peer_name, master = %hello.name, software = %hello.software, "master connected");
        let ours = Hello {
            protocol: PROTOCOL_VERSION,
            name: self.agent.host_id.clone(),
            software: format!("erel-boot {}", env!("CARGO_PKG_VERSION")),
        };
        self.reply(&Response::Hello(ours)).await?;
        Ok(true)
    }

    async fn reply(&mut self, response: &Response) -> std::result::Result<(), ConnError> {
        tokio::time::timeout(REPLY_TIMEOUT, write_frame(&mut self.stream, response))
            .await
            .map_err(|_| ConnError::Timeout("the master to read our reply"))??;
        Ok(())
    }

    /// The one dispatch: every request variant is named, with no catch-all.
    async fn dispatch(&mut self, request: Request) -> std::result::Result<(), ConnError> {
        let agent = self.agent.clone();
        let (command, outcome) = match request {
            Request::Hello(_) => (
                "hello",
                Err(Error::BadRequest("Hello was already exchanged".into())),
            ),
            Request::Ping(_) => ("ping", Ok(Response::Pong(ping(&agent).await))),
            Request::WriteFile(write) => {
                // The transfer answers for itself: it has several frames.
                return self.write_file(write).await;
            }
            Request::Unpack(request) => {
                let what = format!("{} -> {}", request.archive, request.dest);
                let outcome = blocking(move || {
                    unpack::unpack(&agent.root, &request, &agent.limits).map(Response::Unpacked)
                })
                .await;
                info!(peer = %self.peer, name = %self.peer_name, command = "unpack", %what, ok = outcome.is_ok(), "command");
                return self.answer(outcome).await;
            }
            Request::Start(request) => {
                let what = format!("{} {}", request.name, request.version);
                let outcome = agent.supervisor.start(&request).await;
                if outcome.is_ok() {
                    prune_old_versions(&agent, &request.name).await;
                }
                info!(peer = %self.peer, name = %self.peer_name, command = "start", release = %what, ok = outcome.is_ok(), "command");
                return self.answer(outcome.map(Response::Started)).await;
            }
            Request::Stop(request) => {
                let grace = Duration::from_millis(request.grace_ms).min(MAX_STOP_GRACE);
                let outcome = agent.supervisor.stop(&request.name, grace).await;
                info!(peer = %self.peer, name = %self.peer_name, command = "stop", release = %request.name, ok = outcome.is_ok(), "command");
                return self.answer(outcome.map(Response::Stopped)).await;
            }
        };
        debug!(peer = %self.peer, name = %self.peer_name, command, ok = outcome.is_ok(), "command");
        self.answer(outcome).await
    }

    async fn answer(&mut self, outcome: Result<Response>) -> std::result::Result<(), ConnError> {
        let response = match outcome {
            Ok(response) => response,
            Err(e) => {
                info!(peer = %self.peer, name = %self.peer_name, error = %e, "refused");
                Response::Error(e.to_reply())
            }
        };
        self.reply(&response).await
    }

    /// A `WriteFile` transfer: offer, begin, raw bytes, commit (see PROTOCOL.md).
    async fn write_file(&mut self, request: WriteFile) -> std::result::Result<(), ConnError> {
        let agent = self.agent.clone();
        let req = request.clone();
        let offer = blocking(move || write_file::offer(&agent.root, &req, &agent.limits)).await;
        let offer = match offer {
            Ok(offer) => offer,
            Err(e) => {
                info!(peer = %self.peer, name = %self.peer_name, command = "write_file", path = %request.path, error = %e, "refused");
                return self.reply(&Response::Error(e.to_reply())).await;
            }
        };
        let wanted = offer.wanted();
        self.reply(&Response::WriteOffer(erel_proto::WriteOffer {
            have: offer.have,
            have_sha256: offer.have_sha256,
        }))
        .await?;

        let begin: WriteBegin = self
            .read_transfer_frame("WriteBegin", &wanted, &request.path)
            .await?;
        let req = request.clone();
        let receiver = blocking(move || write_file::begin(offer, &req, begin.offset)).await;
        let receiver = match receiver {
            Ok(receiver) => receiver,
            Err(e) => {
                // The master is about to stream raw bytes: report and close.
                self.reply(&Response::Error(e.to_reply())).await?;
                return Err(ConnError::Reported(e.to_string()));
            }
        };
        let remaining = request.size.saturating_sub(begin.offset);
        let received = self
            .stream_to_disk(receiver, remaining, &request.path, &wanted)
            .await?;
        let receiver = match received {
            Ok(receiver) => receiver,
            Err(e) => {
                self.reply(&Response::Error(e.to_reply())).await?;
                return Err(ConnError::Reported(e.to_string()));
            }
        };
        let commit: WriteCommit = self
            .read_transfer_frame("WriteCommit", &wanted, &request.path)
            .await?;
        let outcome = blocking(move || receiver.commit(commit.sha256)).await;
        info!(peer = %self.peer, name = %self.peer_name, command = "write_file", path = %request.path,
              size = request.size, offset = begin.offset, ok = outcome.is_ok(), "command");
        self.answer(outcome.map(Response::Written)).await
    }

    /// Reads the next frame of a transfer of `path`; ends the transfer when a newer
    /// request for the same file takes it over (`wanted`).
    async fn read_transfer_frame<T: serde::de::DeserializeOwned>(
        &mut self,
        what: &'static str,
        wanted: &CancellationToken,
        path: &str,
    ) -> std::result::Result<T, ConnError> {
        let read = tokio::select! {
            _ = wanted.cancelled() => return Err(self.taken_over(path).await),
            read = tokio::time::timeout(TRANSFER_STALL_TIMEOUT, read_frame::<T, _>(&mut self.stream)) => read,
        };
        match read {
            Err(_) => Err(ConnError::Timeout(what)),
            Ok(Ok(Some(frame))) => Ok(frame),
            Ok(Ok(None)) => Err(ConnError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("connection closed before {what}"),
            ))),
            Ok(Err(e)) => {
                self.refuse_frame(e).await?;
                Err(ConnError::Timeout(what))
            }
        }
    }

    /// A newer request for the same file took this transfer over: say so (the master,
    /// if still there, reads it when its sending fails) and end the connection.
    async fn taken_over(&mut self, path: &str) -> ConnError {
        let error = Error::Busy(format!(
            "the transfer of {path} was taken over by a newer request for the same file; \
             the bytes received here are kept for it"
        ));
        info!(peer = %self.peer, name = %self.peer_name, command = "write_file", %path, "taken over by a newer request");
        let _ = tokio::time::timeout(
            REFUSAL_LINGER,
            write_frame(&mut self.stream, &Response::Error(error.to_reply())),
        )
        .await;
        ConnError::TakenOver(path.to_string())
    }

    /// Copies `remaining` raw bytes from the socket to the staging file. The disk side
    /// runs on a blocking thread so hashing and writing overlap with receiving; memory
    /// stays at a few chunks whatever the size. The outer error ends the connection (the
    /// staged bytes are kept for a resume); the inner one is reported to the master.
    async fn stream_to_disk(
        &mut self,
        mut receiver: write_file::Receiver,
        remaining: u64,
        path: &str,
        wanted: &CancellationToken,
    ) -> std::result::Result<Result<write_file::Receiver>, ConnError> {
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
                read = tokio::time::timeout(
                    TRANSFER_STALL_TIMEOUT,
                    read_some(&mut self.stream, &mut chunk),
                ) => Some(read),
            };
            let Some(read) = read else {
                read_error = Some(ConnError::TakenOver(path.to_string()));
                break;
            };
            let n = match read {
                Err(_) => {
                    read_error = Some(ConnError::Timeout("transfer bytes"));
                    break;
                }
                Ok(Err(e)) => {
                    read_error = Some(ConnError::Io(e));
                    break;
                }
                Ok(Ok(0)) => {
                    read_error = Some(ConnError::Io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("connection closed with {left} bytes of {path} still to come"),
                    )));
                    break;
                }
                Ok(Ok(n)) => n,
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
        if let Some(e) = read_error {
            // Dropping the receiver syncs what arrived, for a later resume.
            drop(written);
            if let ConnError::TakenOver(path) = e {
                return Err(self.taken_over(&path).await);
            }
            return Err(e);
        }
        Ok(written.and_then(|inner| inner))
    }
}

/// Reads as many bytes as are available, filling up to all of `buf` when they arrive.
async fn read_some<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut [u8]) -> std::io::Result<usize> {
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

async fn ping(agent: &Agent) -> Pong {
    let root = agent.root.path().to_path_buf();
    let free = tokio::task::spawn_blocking(move || free_disk(&root))
        .await
        .unwrap_or(0);
    let mut pong = Pong {
        host_id: agent.host_id.clone(),
        // The containment mode rides in this text field (no protocol change):
        // `0.1.0 (containment: cgroup v2 …)` or `0.1.0 (containment: fallback to …)`.
        agent_version: format!(
            "{} (containment: {})",
            env!("CARGO_PKG_VERSION"),
            agent.supervisor.containment()
        ),
        uptime_secs: agent.started.elapsed().as_secs(),
        free_disk_bytes: free,
        releases: agent.supervisor.statuses().await,
    };
    fit_in_a_frame(&mut pong);
    pong
}

/// Many crashed releases with long output tails could exceed the frame limit: shorten
/// the tails (newest output kept) until the answer fits.
fn fit_in_a_frame(pong: &mut Pong) {
    let mut limit = erel_proto::OUTPUT_TAIL_MAX;
    while erel_proto::encode_body(&*pong).map_or(true, |body| body.len() > erel_proto::MAX_FRAME) {
        if limit == 0 {
            pong.releases.truncate(pong.releases.len() / 2);
            continue;
        }
        limit /= 2;
        for release in &mut pong.releases {
            if release.output_tail.len() > limit {
                let mut cut = release.output_tail.len() - limit;
                while !release.output_tail.is_char_boundary(cut) {
                    cut += 1;
                }
                release.output_tail.drain(..cut);
            }
        }
    }
}

/// After a successful start, removes versions of that release beyond the kept ones.
async fn prune_old_versions(agent: &Arc<Agent>, name: &str) {
    let keep: Vec<String> = agent
        .supervisor
        .statuses()
        .await
        .into_iter()
        .filter(|status| status.name == name)
        .filter_map(|status| status.version)
        .collect();
    let agent = agent.clone();
    let name = name.to_string();
    let keep_newest = agent.supervision.keep_versions;
    let outcome = blocking(move || retention::prune(&agent.root, &name, &keep, keep_newest)).await;
    match outcome {
        Ok(removed) if !removed.is_empty() => info!(?removed, "removed old versions"),
        Ok(_) => {}
        Err(e) => warn!(error = %e, "could not remove old versions"),
    }
}

async fn blocking<T: Send + 'static>(
    job: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(job)
        .await
        .map_err(|e| Error::Internal(format!("blocking task failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use erel_proto::{ReleaseState, ReleaseStatus, MAX_FRAME, OUTPUT_TAIL_MAX};

    use super::*;

    #[test]
    fn a_ping_answer_too_large_for_a_frame_keeps_the_newest_output() {
        let tail = format!("{}END", "x".repeat(OUTPUT_TAIL_MAX - 3));
        let releases = (0..60)
            .map(|i| ReleaseStatus {
                name: format!("release-{i}"),
                versions: vec!["1".into()],
                version: Some("1".into()),
                desired_running: true,
                pid: None,
                state: ReleaseState::CrashLooping,
                restarts: 5,
                up_secs: None,
                output_tail: tail.clone(),
            })
            .collect();
        let mut pong = Pong {
            host_id: "web-1".into(),
            agent_version: "0.1.0".into(),
            uptime_secs: 1,
            free_disk_bytes: 1,
            releases,
        };
        let before = erel_proto::encode_body(&pong).expect("encode").len();
        assert!(
            before > MAX_FRAME,
            "the sample must overflow ({before} bytes)"
        );
        fit_in_a_frame(&mut pong);
        let after = erel_proto::encode_body(&pong).expect("encode").len();
        assert!(after <= MAX_FRAME, "{after} bytes");
        assert_eq!(pong.releases.len(), 60, "every release is still reported");
        for release in &pong.releases {
            assert!(release.output_tail.ends_with("END"), "newest output kept");
            assert!(release.output_tail.len() < OUTPUT_TAIL_MAX);
        }
    }
}
