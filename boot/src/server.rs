//! The agent's server: mutual TLS, the `Hello` handshake, and one `match` that
//! dispatches the five commands.
//!
//! The accept loop only accepts and spawns. Each connection runs under named timeouts
//! (handshake, `Hello`, idle, transfer stall). A peer first takes a place in the budget
//! of pending handshakes (`peers`: short timeout, capped per address, the oldest
//! dropped for a newcomer); only once its certificate is verified does it take one of
//! the `max_connections` session permits, so peers without a certificate cannot use up
//! the masters' room. A master beyond that limit is told so with `Busy`. Nothing a peer
//! sends is read before its certificate is verified, and a session's certificate is
//! verified again at its next request once the bundle changes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use erel_certs::ServerTls;
use erel_proto::rules;
use erel_proto::text::quote;
use erel_proto::{
    read_frame_body, write_frame, ErrorKind, ErrorReply, FrameError, Hello, Request, Response,
    Start, Stop, Unpack, PROTOCOL_VERSION,
};
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::error::{Error, Result};
use crate::fs::Root;
use crate::peers::{HandshakeSlot, Handshakes};
use crate::settings::Limits;
use crate::supervisor::Supervisor;
use crate::{ping, retention, unpack, write_file};

/// Time allowed for the master's `Hello` after the handshake.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection with no request for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Time allowed to write one answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long shutdown waits for connections in progress.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a refused connection is drained before it is closed.
pub(crate) const REFUSAL_LINGER: Duration = Duration::from_secs(2);
/// Bytes read from the socket at once, beneath TLS. rustls asks for at most 4 KiB per
/// read (its `READ_SIZE`), so a 16 KiB record of a file's bytes took four or five
/// `recvfrom` calls; through this buffer one call brings in several records.
const SOCKET_READ_BUFFER: usize = 64 << 10;

/// Everything a connection needs to execute commands.
#[derive(Debug)]
pub(crate) struct Agent {
    /// The root directory.
    pub(crate) root: Root,
    /// This host's id, as its certificate names it.
    pub(crate) host_id: String,
    /// Limits on what a command may write.
    pub(crate) limits: Limits,
    /// The release supervisor.
    pub(crate) supervisor: Supervisor,
    pub(crate) started: Instant,
}

/// The TLS configuration, reloaded from the bundle directory when its files change, so
/// a rotated CA, host certificate or CRL applies to new connections without a restart.
pub(crate) struct TlsSource {
    dir: PathBuf,
    current: Mutex<Loaded>,
    /// The bundle a master pushed under the root, served before `dir` when taken.
    pushed: Option<crate::bundle::Pushed>,
}

/// The configuration in use, and the bundle files last tried.
struct Loaded {
    tls: ServerTls,
    /// The files last tried, whether they loaded or not: a replacement that did not
    /// load is not tried again (nor warned about again) until the files change, so
    /// connections, an unauthenticated flood included, cost one look at the files'
    /// metadata each, not a parse of the bundle.
    tried: erel_certs::BundleFingerprint,
}

impl TlsSource {
    /// Loads the bundle in `dir` (`ca.pem`, `host.pem`, `host.key`, optional `crl.pem`).
    pub(crate) fn load(dir: PathBuf) -> std::result::Result<Self, erel_certs::Error> {
        let tried = erel_certs::bundle_fingerprint(&dir);
        let tls = erel_certs::server_tls(&dir)?;
        let current = Mutex::new(Loaded { tls, tried });
        Ok(TlsSource {
            dir,
            current,
            pushed: None,
        })
    }

    /// The same, serving first with the bundle a master pushed (see `bundle`).
    pub(crate) fn with_pushed(self, pushed: crate::bundle::Pushed) -> Self {
        let pushed = Some(pushed);
        TlsSource { pushed, ..self }
    }

    /// A master authenticated on a connection served with `config` with `chain`.
    fn authenticated(&self, config: &Arc<rustls::ServerConfig>, chain: &[CertificateDer<'_>]) {
        if let Some(pushed) = &self.pushed {
            pushed.authenticated(config, chain);
        }
    }

    /// The configuration for a new connection or a session's next request, reloading
    /// the bundle first if it changed. A bundle that no longer loads (for example
    /// half-copied) keeps the previous one, and is tried again (and warned about again)
    /// only once its files change again.
    pub(crate) fn current(&self) -> ServerTls {
        if let Some(tls) = self.pushed.as_ref().and_then(|pushed| pushed.config()) {
            return tls;
        }
        let fingerprint = erel_certs::bundle_fingerprint(&self.dir);
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if current.tried != fingerprint {
            current.tried = fingerprint;
            match erel_certs::server_tls(&self.dir) {
                Ok(tls) => {
                    info!(dir = %self.dir.display(), "certificate bundle changed; reloaded");
                    current.tls = tls;
                }
                Err(e) => {
                    warn!(dir = %self.dir.display(), error = %e, "certificate bundle changed but does not load; keeping the previous one");
                }
            }
        }
        current.tls.clone()
    }
}

/// What a session's master authenticated with. Before each request the bundle is looked
/// at as for a new connection; once it changed, the master's chain is judged again by
/// the new bundle's verifier (CAs, dates, CRL), so a revoked master or one of a retired
/// CA loses a session it already had. A transfer under way is judged at its start only.
pub(crate) struct Credentials {
    source: Arc<TlsSource>,
    served: ServerTls,
    chain: Vec<CertificateDer<'static>>,
}

impl Credentials {
    /// Why the master would no longer be accepted, if it would not.
    fn still_valid(&mut self) -> std::result::Result<(), String> {
        let now = self.source.current();
        if !Arc::ptr_eq(&now.config, &self.served.config) {
            now.verify_master(&self.chain)?;
            self.served = now;
        }
        Ok(())
    }
}

/// Serves connections from `listener` until `shutdown` is cancelled, then waits up to
/// [`DRAIN_TIMEOUT`] for connections in progress. Releases are left running.
pub(crate) async fn serve(
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
        let served = tls.current();
        let source = tls.clone();
        let agent = agent.clone();
        let shutdown = shutdown.clone();
        let sessions = sessions.clone();
        tracker.spawn(async move {
            let served = (served, source);
            connection(stream, peer, slot, served, agent, sessions, shutdown).await;
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
    (served, source): (ServerTls, Arc<TlsSource>),
    agent: Arc<Agent>,
    sessions: Arc<Semaphore>,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let limit = agent.limits.handshake_timeout;
    let acceptor = TlsAcceptor::from(served.config.clone());
    let stream = BufReader::with_capacity(SOCKET_READ_BUFFER, stream);
    let handshake = async {
        match tokio::time::timeout(limit, acceptor.accept(stream).into_fallible()).await {
            Ok(Ok(tls)) => Some(tls),
            Ok(Err((e, stream))) => {
                warn!(%peer, error = %e, "TLS handshake refused");
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
    let chain: Vec<_> = (tls
        .get_ref()
        .1
        .peer_certificates()
        .unwrap_or_default()
        .iter())
    .map(|c| c.clone().into_owned())
    .collect();
    source.authenticated(&served.config, &chain);
    let peer_name = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(erel_certs::peer_name)
        .unwrap_or_else(|| "unknown".to_string());
    let credentials = Credentials {
        source,
        served,
        chain,
    };
    let mut conn = Connection::new(tls, peer, peer_name, agent, Some(credentials));
    let Ok(_permit) = sessions.try_acquire_owned() else {
        conn.refuse_at_limit().await;
        let _ = tokio::time::timeout(REFUSAL_LINGER, conn.stream.shutdown()).await;
        return;
    };
    conn.serve(shutdown).await;
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// A session with a master who authenticated as `peer_name`.
    /// A session on `stream`; `credentials` is `None` only for a stream that was not
    /// authenticated by TLS (the hidden `Sessions` entry point).
    pub(crate) fn new(
        stream: S,
        peer: SocketAddr,
        peer_name: String,
        agent: Arc<Agent>,
        credentials: Option<Credentials>,
    ) -> Self {
        Connection {
            stream,
            peer,
            peer_name,
            agent,
            ended_by_command: false,
            credentials,
        }
    }

    /// Runs the session (`Hello`, then requests until the master closes, a refusal ends
    /// it or `shutdown` is cancelled), logs how it ended and shuts the stream down.
    pub(crate) async fn serve(mut self, shutdown: CancellationToken) {
        let conn = &mut self;
        match conn.run(shutdown).await {
            Ok(()) => debug!(peer = %conn.peer, name = %conn.peer_name, "connection closed"),
            Err(e) if conn.ended_by_command => {
                debug!(peer = %conn.peer, error = %e, "connection ended")
            }
            Err(e) => {
                info!(peer = %conn.peer, name = %conn.peer_name, error = %e, "connection ended")
            }
        }
        let _ = conn.stream.shutdown().await;
    }
}

/// After refusing a handshake, the alert has been queued: shut our side down and drain
/// what the peer already sent for a moment, so the close is not a reset that would
/// swallow the alert telling the master why it was refused.
async fn linger_after_refusal<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) {
    let _ = stream.shutdown().await;
    let mut sink = tokio::io::sink();
    let _ = tokio::time::timeout(REFUSAL_LINGER, tokio::io::copy(&mut stream, &mut sink)).await;
}

/// One authenticated master's connection.
pub(crate) struct Connection<S> {
    pub(crate) stream: S,
    pub(crate) peer: SocketAddr,
    pub(crate) peer_name: String,
    pub(crate) agent: Arc<Agent>,
    /// A command's log line already said why the connection ends.
    ended_by_command: bool,
    /// Judged again before each request (none without TLS: see [`Connection::new`]).
    credentials: Option<Credentials>,
}

/// What a step of a connection returns: an error ends the connection.
pub(crate) type ConnResult<T = ()> = std::result::Result<T, ConnError>;

/// How a connection ends when it must.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnError {
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

    async fn run(&mut self, shutdown: CancellationToken) -> ConnResult {
        if !self.handshake().await? {
            return Ok(());
        }
        loop {
            let body = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                read = tokio::time::timeout(IDLE_TIMEOUT, read_frame_body(&mut self.stream)) => match read {
                    Err(_) => return Err(ConnError::Timeout("the next request")),
                    Ok(Err(e)) => return Err(self.refuse_frame(e).await),
                    Ok(Ok(None)) => return Ok(()),
                    Ok(Ok(Some(body))) => body,
                },
            };
            let request = match erel_proto::decode_body::<Request>(&body) {
                Ok(request) => request,
                Err(e) => return Err(self.refuse_frame(e).await),
            };
            let judged = self.credentials.as_mut().map(Credentials::still_valid);
            if let Some(Err(why)) = judged {
                let why = format!("{why} after this session began; the connection is closed");
                warn!(peer = %self.peer, name = %self.peer_name, %why, "session ended");
                self.ended_by_command = true;
                self.reply_error(ErrorKind::BadRequest, why.clone()).await?;
                return Err(ConnError::Reported(why));
            }
            self.dispatch(request).await?;
        }
    }

    /// Answers a frame that could not be read or decoded; returns the error that ends the
    /// connection.
    pub(crate) async fn refuse_frame(&mut self, error: FrameError) -> ConnError {
        if matches!(error, FrameError::Io(_) | FrameError::Truncated { .. }) {
            return error.into();
        }
        warn!(peer = %self.peer, name = %self.peer_name, %error, "undecodable frame");
        match self
            .reply_error(ErrorKind::BadRequest, error.to_string())
            .await
        {
            Ok(()) => ConnError::Reported(error.to_string()),
            Err(cut) => cut,
        }
    }

    /// Reads the master's `Hello` and answers with ours. False when refused.
    async fn handshake(&mut self) -> ConnResult<bool> {
        let first = tokio::time::timeout(HELLO_TIMEOUT, read_frame_body(&mut self.stream))
            .await
            .map_err(|_| ConnError::Timeout("Hello"))?;
        let body = match first {
            Ok(Some(body)) => body,
            Ok(None) => return Ok(false),
            Err(e) => return Err(self.refuse_frame(e).await),
        };
        let hello = match erel_proto::decode_body::<Request>(&body) {
            Ok(Request::Hello(hello)) => hello,
            Ok(other) => {
                let message = format!("the first frame must be Hello, got {}", other.name());
                self.reply_error(ErrorKind::BadRequest, message).await?;
                return Ok(false);
            }
            Err(e) => return Err(self.refuse_frame(e).await),
        };
        if hello.protocol != PROTOCOL_VERSION {
            let message = format!(
                "this agent speaks protocol {PROTOCOL_VERSION}; {} ({}) speaks {}",
                quote(&hello.name),
                quote(&hello.software),
                hello.protocol
            );
            warn!(peer = %self.peer, name = %self.peer_name, protocol = hello.protocol, "protocol version mismatch");
            self.reply_error(ErrorKind::VersionMismatch, message)
                .await?;
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

    /// Answers with an error of `kind`.
    async fn reply_error(&mut self, kind: ErrorKind, message: String) -> ConnResult {
        self.reply(&Response::Error(ErrorReply::new(kind, message)))
            .await
    }

    pub(crate) async fn reply(&mut self, response: &Response) -> ConnResult {
        tokio::time::timeout(REPLY_TIMEOUT, write_frame(&mut self.stream, response))
            .await
            .map_err(|_| ConnError::Timeout("the master to read our reply"))??;
        Ok(())
    }

    /// The one dispatch: every request variant is named, with no catch-all. Each
    /// command's outcome is logged here, once.
    async fn dispatch(&mut self, request: Request) -> ConnResult {
        let agent = self.agent.clone();
        let command = snake_case(request.name());
        let (subject, outcome) = match request {
            // A second `Hello` on a connection.
            Request::Hello(_) => {
                let refused = Error::BadRequest("Hello was already exchanged".into());
                (String::new(), Ok(Err(refused)))
            }
            Request::Ping(_) => (
                String::new(),
                Ok(Ok(Response::Pong(ping::ping(&agent).await))),
            ),
            Request::WriteFile(request) => write_file::transfer(self, request).await,
            Request::Unpack(request) => unpack(&agent, request).await,
            Request::Start(request) => start(&agent, request).await,
            Request::Stop(request) => stop(&agent, request).await,
        };
        let (peer, name) = (self.peer, &self.peer_name);
        match &outcome {
            Ok(Err(error)) => {
                warn!(%peer, %name, %command, %subject, ok = false, %error, "command")
            }
            // The connection ends instead of an answer (cut, stalled, taken over, or a
            // refusal already sent).
            Err(error) => {
                warn!(%peer, %name, %command, %subject, ok = false, %error, "command");
                self.ended_by_command = true;
            }
            Ok(Ok(_)) if subject.is_empty() => debug!(%peer, %name, %command, ok = true, "command"),
            Ok(Ok(_)) => info!(%peer, %name, %command, %subject, ok = true, "command"),
        }
        let response = outcome?.unwrap_or_else(|e| Response::Error(e.to_reply()));
        self.reply(&response).await
    }

    /// Passes a result on; an error is reported to the master and ends the connection.
    pub(crate) async fn reported<T>(&mut self, outcome: Result<T>) -> ConnResult<T> {
        match outcome {
            Ok(value) => Ok(value),
            Err(e) => {
                self.reply(&Response::Error(e.to_reply())).await?;
                Err(ConnError::Reported(e.to_string()))
            }
        }
    }
}

/// What a command came to: its subject for the log, and its answer, or the error that
/// ends the connection instead.
pub(crate) type Outcome = (String, ConnResult<Result<Response>>);

/// `Unpack`, on a blocking thread.
async fn unpack(agent: &Arc<Agent>, request: Unpack) -> Outcome {
    let subject = format!("{} -> {}", request.archive, request.dest);
    let agent = agent.clone();
    let outcome = blocking(move || {
        unpack::unpack(&agent.root, &request, &agent.limits).map(Response::Unpacked)
    })
    .await;
    (subject, Ok(outcome))
}

/// `Start`; once started, versions of that release beyond the kept ones are removed,
/// after the answer.
async fn start(agent: &Arc<Agent>, request: Start) -> Outcome {
    let mut subject = format!("{} {}", request.name, request.version);
    let outcome = agent.supervisor.start(&request).await;
    if let Ok(started) = &outcome {
        subject += &format!(" pid={}", started.pid);
        retention::prune_after_start(agent, &request.name);
    }
    (subject, Ok(outcome.map(Response::Started)))
}

/// `Stop`, with the grace capped at [`rules::MAX_STOP_GRACE`].
async fn stop(agent: &Agent, request: Stop) -> Outcome {
    let grace = Duration::from_millis(request.grace_ms).min(rules::MAX_STOP_GRACE);
    let outcome = agent.supervisor.stop(&request.name, grace).await;
    let subject = match &outcome {
        Ok(stopped) => format!(
            "{} was_running={} killed={}",
            request.name, stopped.was_running, stopped.killed
        ),
        Err(_) => request.name,
    };
    (subject, Ok(outcome.map(Response::Stopped)))
}

/// `WriteFile` as `write_file`: how commands are named in the log.
fn snake_case(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        if c.is_ascii_uppercase() && !out.is_empty() {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// Runs blocking file or archive work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    job: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(job)
        .await
        .map_err(|e| Error::Internal(format!("blocking task failed: {e}")))?
}
