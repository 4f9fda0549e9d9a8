//! The master's typed client for one agent: connect, handshake, and one exchange per
//! command. Every phase runs under its own timeout (connect, handshake, each answer,
//! whose bound `budget` gives; a transfer's stall), none wrapped around another, and
//! every failure names the host. An exchange is tried once: `retry` says when a
//! failed command is tried again, `session` holds the [`Connector`], the one way to
//! open connections, and the [`HostSession`] that tries a command again as that policy
//! says; `write_file` the resumable transfer, `shared_push` the same transfer of one file
//! to many agents at once, read once for all of them.

pub(crate) mod budget;
pub(crate) mod retry;
mod session;
mod shared_push;
mod write_file;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use erel_proto::{
    read_frame, rules, write_frame, FrameError, Hello, Pong, Request, Response, Sha256, Start,
    Started, Stop, Stopped, Unpack, Unpacked, MAX_FRAME, PROTOCOL_VERSION,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::error::{Error, Result};
use budget::answer_budget;
use retry::{Retry, RetryPolicy};

pub(crate) use retry::gave_up;
pub use session::Connector;
pub(crate) use session::{HostSession, DEFAULT_CONNECT_TIMEOUT};
pub use shared_push::SharedFile;
pub(crate) use write_file::push_buffer_bytes;
pub use write_file::{Progress, WriteSource};

/// A transfer making no progress for this long is abandoned.
pub const TRANSFER_STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a connection to an agent may go without a sign of life from the agent's
/// side of TCP (an acknowledgement of what was sent, or of a keepalive probe while
/// waiting for an answer) before it is given up as dead: a host that lost power or its
/// network. A live agent's kernel acknowledges at once however busy the agent is, so
/// this bounds only silence, never slow work such as a long `Unpack`.
pub const DEAD_PEER_TIMEOUT: Duration = Duration::from_secs(20);
/// Silence on an idle connection before the first keepalive probe, and between probes
/// (`tcp(7)`: `TCP_KEEPIDLE`, `TCP_KEEPINTVL`); enough probes fit in
/// [`DEAD_PEER_TIMEOUT`] that one lost probe is not taken for a dead peer.
const KEEPALIVE_EVERY: Duration = Duration::from_secs(5);
const _: () = assert!(KEEPALIVE_EVERY.as_secs() * 3 <= DEAD_PEER_TIMEOUT.as_secs());
/// Time allowed to send our `close_notify` when a client is closed.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long each phase of opening a connection may take; one timeout per phase, none
/// wrapped around another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PhaseTimeouts {
    /// Opening the TCP connection.
    pub(crate) connect: Duration,
    /// The TLS handshake and the `Hello` exchange.
    pub(crate) handshake: Duration,
}

impl PhaseTimeouts {
    /// `limit` for each phase.
    pub(crate) fn both(limit: Duration) -> Self {
        PhaseTimeouts {
            connect: limit,
            handshake: limit,
        }
    }
}

/// An agent to talk to: its host id (which its certificate must name) and address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostAddr {
    /// The host id.
    pub id: String,
    /// `ADDR:PORT`.
    pub addr: String,
}

impl FromStr for HostAddr {
    type Err = Error;

    /// Parses `ID@ADDR:PORT`.
    fn from_str(text: &str) -> Result<Self> {
        let invalid = |reason: &str| Error::InvalidHost {
            text: text.to_string(),
            reason: reason.to_string(),
        };
        let (id, addr) = text
            .split_once('@')
            .ok_or_else(|| invalid("expected ID@ADDR:PORT"))?;
        erel_certs::validate_host_id(id).map_err(|e| invalid(&e.to_string()))?;
        let (host, port) = addr
            .rsplit_once(':')
            .ok_or_else(|| invalid("the address needs a port, as ADDR:PORT"))?;
        if host.is_empty() {
            return Err(invalid("the address is empty"));
        }
        port.parse::<u16>()
            .map_err(|_| invalid(&format!("'{port}' is not a port number")))?;
        Ok(HostAddr {
            id: id.to_string(),
            addr: addr.to_string(),
        })
    }
}

impl fmt::Display for HostAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.id, self.addr)
    }
}

/// An authenticated connection to one agent.
///
/// The connection ends with a TLS `close_notify` alert (RFC 8446, section 6.1) on every
/// path: [`AgentClient::close`] sends it and waits for it to leave, and dropping a client
/// (after an error, or a panic) queues it without waiting, so the agent sees an orderly
/// end rather than a truncated stream.
pub struct AgentClient {
    stream: TlsStream<TcpStream>,
    host: HostAddr,
    hello: Hello,
}

impl fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentClient")
            .field("host", &self.host)
            .field("agent", &self.hello.software)
            .finish()
    }
}

/// Makes TCP give `tcp` up once the agent's side stays silent for [`DEAD_PEER_TIMEOUT`]:
/// keepalive probes while the connection waits for an answer (a long `Unpack`, say),
/// and `TCP_USER_TIMEOUT` (`tcp(7)`, Linux) for what was sent and not acknowledged,
/// which also ends the probing once it runs past the timeout. A read or write on a
/// connection given up fails (`ETIMEDOUT`), as a reset would make it. Best effort: a
/// system that refuses an option keeps its defaults, and the timeouts per command
/// still hold.
fn detect_dead_peer(tcp: &TcpStream) {
    let socket = socket2::SockRef::from(tcp);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_EVERY)
        .with_interval(KEEPALIVE_EVERY);
    let _ = socket.set_tcp_keepalive(&keepalive);
    #[cfg(target_os = "linux")]
    let _ = socket.set_tcp_user_timeout(Some(DEAD_PEER_TIMEOUT));
}

impl AgentClient {
    /// Connects, verifies the agent's certificate names `host.id`, and exchanges `Hello`,
    /// each phase within its own timeout; [`Connector::connect`] is the way in.
    pub(crate) async fn connect_within(
        host: &HostAddr,
        tls: Arc<rustls::ClientConfig>,
        master_name: &str,
        timeouts: PhaseTimeouts,
    ) -> Result<Self> {
        let tcp = tokio::time::timeout(timeouts.connect, TcpStream::connect(&host.addr))
            .await
            .map_err(|_| {
                timeout(
                    host,
                    format!(
                        "connecting to {} (no answer within {}s)",
                        host.addr,
                        timeouts.connect.as_secs_f32()
                    ),
                )
            })?
            .map_err(|source| Error::Connect {
                host: host.id.clone(),
                addr: host.addr.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        detect_dead_peer(&tcp);
        let server_name = erel_certs::server_name(&host.id)?;
        let connector = TlsConnector::from(tls);
        let handshake = async {
            let stream = connector
                .connect(server_name, tcp)
                .await
                .map_err(|e| handshake_error(host, e))?;
            let mut client = AgentClient {
                stream,
                host: host.clone(),
                hello: Hello {
                    protocol: 0,
                    name: String::new(),
                    software: String::new(),
                },
            };
            let ours = Hello {
                protocol: PROTOCOL_VERSION,
                name: master_name.to_string(),
                software: format!("erel {}", env!("CARGO_PKG_VERSION")),
            };
            let request = Request::Hello(ours);
            client.send(&request).await?;
            match client.receive().await? {
                Response::Hello(theirs) => {
                    if theirs.protocol != PROTOCOL_VERSION {
                        return Err(client.protocol_error(format!(
                            "agent speaks protocol {}, this master {PROTOCOL_VERSION}",
                            theirs.protocol
                        )));
                    }
                    client.hello = theirs;
                    Ok(client)
                }
                Response::Error(reply) => Err(Error::Agent {
                    host: host.id.clone(),
                    reply,
                }),
                other => Err(client.unexpected(rules::answer_name(&request), &other)),
            }
        };
        tokio::time::timeout(timeouts.handshake, handshake)
            .await
            .map_err(|_| timeout(host, "during the TLS handshake and Hello".to_string()))?
    }

    /// The host this client talks to.
    pub fn host(&self) -> &HostAddr {
        &self.host
    }

    /// Ends the connection in order: sends TLS `close_notify` and shuts the socket's
    /// sending side, within [`CLOSE_TIMEOUT`]. Dropping a client does the same without
    /// waiting; this is for callers that can wait.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.stream.shutdown()).await;
    }

    /// One command, `Ping`, `Unpack`, `Start` or `Stop`, and its answer of type `A`
    /// ([`Pong`], [`Unpacked`], [`Started`], [`Stopped`]), within the bound that command
    /// has outside a rollout (`budget::answer_budget`: 15 s for `Ping`, 600 s for
    /// `Unpack`, 120 s for `Start`, the grace plus 30 s for `Stop`). A `Busy` agent is
    /// asked again on this connection, with growing pauses, for up to 60 s (the one retry
    /// policy, `retry::RetryPolicy`); a client alone cannot reconnect, a host's session
    /// does, with the same policy, around the single exchange and not around this.
    /// Requests: `Request::Ping(Ping {})`, [`unpack_request`], `Request::Start(..)`,
    /// [`stop_request`].
    ///
    /// # Errors
    ///
    /// [`Error::Agent`] with the agent's refusal (a `Busy` still so after the retries
    /// says for how long), [`Error::Timeout`] naming the command when no answer came
    /// within its bound, [`Error::Protocol`] for an answer of another type, and the
    /// connection's I/O and frame errors.
    pub async fn command<A: Answer>(&mut self, request: Request) -> Result<A> {
        let limit = answer_budget(&request);
        let began = tokio::time::Instant::now();
        let mut policy = RetryPolicy::new();
        loop {
            let error = match self.exchange(request.clone(), limit).await {
                Ok(answer) => return Ok(answer),
                Err(error) => error,
            };
            match policy.after(&error, began.elapsed()) {
                Retry::Again(pause) => tokio::time::sleep(pause).await,
                Retry::Reconnect(_) | Retry::GiveUp => return Err(gave_up(error, began.elapsed())),
            }
        }
    }

    /// Sends `request` and reads its answer, of type `A`, within `limit`; an agent error
    /// (`Busy` included) becomes [`Error::Agent`]. Nothing is retried here: a rollout's
    /// [`HostSession`] retries as [`RetryPolicy`] says.
    pub(crate) async fn exchange<A: Answer>(
        &mut self,
        request: Request,
        limit: Duration,
    ) -> Result<A> {
        let what = request.name();
        let exchange = async {
            self.send(&request).await?;
            self.receive().await
        };
        let response = tokio::time::timeout(limit, exchange)
            .await
            .map_err(|_| timeout(&self.host, format!("waiting for the answer to {what}")))??;
        match response {
            Response::Error(reply) => Err(Error::Agent {
                host: self.host.id.clone(),
                reply,
            }),
            other => A::from_response(other)
                .map_err(|other| self.unexpected(rules::answer_name(&request), &other)),
        }
    }

    async fn send<T: serde::Serialize>(&mut self, frame: &T) -> Result<()> {
        write_frame(&mut self.stream, frame)
            .await
            .map_err(|e| self.frame_error(e))
    }

    async fn receive(&mut self) -> Result<Response> {
        match read_frame::<Response, _>(&mut self.stream).await {
            Ok(Some(response)) => Ok(response),
            Ok(None) => Err(self.protocol_error(
                "the agent closed the connection without an answer (it may be shutting down)"
                    .to_string(),
            )),
            Err(e) => Err(self.frame_error(e)),
        }
    }

    fn frame_error(&self, error: FrameError) -> Error {
        match error {
            FrameError::Io(e) => io_error(&self.host, "on the connection", e),
            other => self.protocol_error(other.to_string()),
        }
    }

    fn protocol_error(&self, message: String) -> Error {
        Error::Protocol {
            host: self.host.id.clone(),
            message,
        }
    }

    fn unexpected(&self, wanted: &str, got: &Response) -> Error {
        self.protocol_error(format!("expected {wanted}, the agent sent {}", got.name()))
    }
}

impl Drop for AgentClient {
    fn drop(&mut self) {
        queue_close_notify(&mut self.stream);
    }
}

/// Sends TLS `close_notify` without waiting: the alert goes out now if the socket can
/// take it (it is a few dozen bytes), and is dropped if it cannot, as on a broken
/// connection. Sending it twice is harmless: rustls sends it once.
fn queue_close_notify(stream: &mut TlsStream<TcpStream>) {
    /// The socket's non-blocking write, as [`std::io::Write`] for rustls.
    struct NowOrNever<'a>(&'a TcpStream);
    impl std::io::Write for NowOrNever<'_> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.try_write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let (tcp, tls) = stream.get_mut();
    tls.send_close_notify();
    while tls.wants_write() {
        match tls.write_tls(&mut NowOrNever(tcp)) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

/// The answer a command expects, picked out of a [`Response`]: [`Pong`] for `Ping`,
/// [`Unpacked`] for `Unpack`, [`Started`] for `Start`, [`Stopped`] for `Stop`.
pub trait Answer: Sized {
    /// The answer, or the response as it came when it is another one.
    fn from_response(response: Response) -> std::result::Result<Self, Response>;
}

macro_rules! answer {
    ($($variant:ident),*) => {$(
        impl Answer for $variant {
            fn from_response(response: Response) -> std::result::Result<Self, Response> {
                match response {
                    Response::$variant(answer) => Ok(answer),
                    other => Err(other),
                }
            }
        }
    )*};
}

answer!(Pong, Unpacked, Started, Stopped);

/// The `Unpack` request for `archive` into `dest` (both relative to the agent's
/// root), checked against `sha256` when given.
pub fn unpack_request(archive: &str, dest: &str, sha256: Option<Sha256>) -> Request {
    Request::Unpack(Unpack {
        archive: archive.to_string(),
        dest: dest.to_string(),
        sha256,
    })
}

/// The `Stop` request for release `name` with `grace`: SIGTERM to the release's
/// process group, SIGKILL after `grace` (in milliseconds on the wire, saturating).
pub fn stop_request(name: &str, grace: Duration) -> Request {
    Request::Stop(Stop {
        name: name.to_string(),
        grace_ms: u64::try_from(grace.as_millis()).unwrap_or(u64::MAX),
    })
}

/// The size in bytes of `request`'s frame body when it is over [`MAX_FRAME`], the most
/// either side of the protocol accepts; `None` when it fits. The size is that of the
/// body the codec would send (`erel_proto::encode_body`), not an estimate, so a request
/// refused here is exactly one the agent could never receive.
pub fn oversized(request: &Request) -> Option<usize> {
    let len = match erel_proto::encode_body(request) {
        Ok(body) => body.len(),
        // postcard fails to encode nothing erel sends; a failure reads as too large.
        Err(_) => usize::MAX,
    };
    (len > MAX_FRAME).then_some(len)
}

/// The largest single value of a [`Start`]: its field (`argv[N]`, `env.KEY`, `user`,
/// `name`, `version`) and its size in bytes (a variable counts its name and value), to
/// name what made a too-large request too large.
pub fn largest_start_part(start: &Start) -> (String, usize) {
    let argv = start
        .argv
        .iter()
        .enumerate()
        .map(|(i, arg)| (format!("argv[{i}]"), arg.len()));
    let env = start
        .env
        .iter()
        .map(|(key, value)| (format!("env.{key}"), key.len() + value.len()));
    let others = [
        ("name".to_string(), start.name.len()),
        ("version".to_string(), start.version.len()),
        (
            "user".to_string(),
            start.user.as_deref().map_or(0, str::len),
        ),
    ];
    argv.chain(env)
        .chain(others)
        .max_by_key(|(_, len)| *len)
        .unwrap_or_default()
}

/// A failed TLS handshake, explained. An agent that closes the connection before the
/// handshake completes either is not an erel agent or had no room for one more peer
/// that has not yet proved who it is (its budget of unauthenticated handshakes).
fn handshake_error(host: &HostAddr, error: std::io::Error) -> Error {
    use std::io::ErrorKind as Kind;
    if erel_certs::explain_tls_error(&error).is_none()
        && matches!(
            error.kind(),
            Kind::UnexpectedEof
                | Kind::ConnectionReset
                | Kind::ConnectionAborted
                | Kind::BrokenPipe
        )
    {
        return Error::Protocol {
            host: host.id.clone(),
            message: format!(
                "the agent at {} closed the connection during the TLS handshake ({error}): its \
                 room for connections still proving who they are may be full (its log says \
                 so), or it is not an erel agent; retry",
                host.addr
            ),
        };
    }
    io_error(host, "during the TLS handshake", error)
}

/// Turns an I/O error into a TLS error when it is one, else a protocol error.
fn io_error(host: &HostAddr, phase: &str, error: std::io::Error) -> Error {
    if let Some(message) = erel_certs::explain_tls_error(&error) {
        return Error::Tls {
            host: host.id.clone(),
            addr: host.addr.clone(),
            message,
        };
    }
    Error::Protocol {
        host: host.id.clone(),
        message: format!("{phase}: {error}"),
    }
}

fn timeout(host: &HostAddr, phase: String) -> Error {
    Error::Timeout {
        host: host.id.clone(),
        phase,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_to_agents_find_a_silent_peer_dead_within_the_bound() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let tcp = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        detect_dead_peer(&tcp);
        let socket = socket2::SockRef::from(&tcp);
        assert!(socket.keepalive().expect("SO_KEEPALIVE"));
        assert_eq!(
            socket.tcp_keepalive_time().expect("TCP_KEEPIDLE"),
            KEEPALIVE_EVERY
        );
        assert_eq!(
            socket.tcp_keepalive_interval().expect("TCP_KEEPINTVL"),
            KEEPALIVE_EVERY
        );
        #[cfg(target_os = "linux")]
        assert_eq!(
            socket.tcp_user_timeout().expect("TCP_USER_TIMEOUT"),
            Some(DEAD_PEER_TIMEOUT)
        );
        assert!(
            KEEPALIVE_EVERY * 3 <= DEAD_PEER_TIMEOUT,
            "room for a lost probe"
        );
    }

    #[test]
    fn parses_host_addresses() {
        let host: HostAddr = "web-1@127.0.0.1:7070".parse().expect("parse");
        assert_eq!(host.id, "web-1");
        assert_eq!(host.addr, "127.0.0.1:7070");
        let v6: HostAddr = "db-2@[::1]:7070".parse().expect("parse");
        assert_eq!(v6.addr, "[::1]:7070");
        for bad in [
            "web-1",
            "web-1@host",
            "@h:1",
            "Web_1@h:1",
            "w@:1",
            "w@h:notaport",
        ] {
            let err = bad.parse::<HostAddr>().unwrap_err().to_string();
            assert!(err.contains(bad), "{bad}: {err}");
        }
    }
}
