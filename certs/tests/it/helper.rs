//! A fresh PKI in a temporary directory, an agent-like TLS echo server and a
//! master-like client, each phase under a timeout.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use erel_certs::MasterDir;
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Bound on every connection phase in these tests.
pub const PHASE_TIMEOUT: Duration = Duration::from_secs(10);

pub const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A cluster CA with one host bundle, in a temporary directory.
pub struct Pki {
    pub tmp: tempfile::TempDir,
    pub master: MasterDir,
    pub bundle: PathBuf,
}

/// `init` plus `issue_host(host_id, [127.0.0.1], [])`.
pub fn pki(host_id: &str) -> Pki {
    let tmp = tempfile::tempdir().expect("tempdir");
    let master = MasterDir::new(tmp.path().join("certs"));
    master.init("test").expect("init");
    let bundle = master
        .issue_host(host_id, &[LOOPBACK], &[])
        .expect("issue_host");
    Pki {
        tmp,
        master,
        bundle,
    }
}

impl Pki {
    /// A scratch directory inside the temporary directory.
    pub fn scratch(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }
}

/// How often [`poll_until`] looks again.
const POLL_EVERY: Duration = Duration::from_millis(200);

/// Calls `probe` every [`POLL_EVERY`] until it gives a value or `limit` passes; the
/// value, or `None` when time ran out. The one bounded wait of these tests.
pub fn poll_until<T>(limit: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if let Some(value) = probe() {
            return Some(value);
        }
        std::thread::sleep(POLL_EVERY);
    }
    probe()
}

/// What the server saw of one connection.
#[derive(Debug)]
pub struct Served {
    /// The client's name from its certificate.
    pub peer: Option<String>,
    /// The cipher suite the handshake settled on.
    pub suite: Option<rustls::CipherSuite>,
}

/// Accepts one connection: TLS handshake, read one byte, echo it back.
/// The handle yields the handshake or I/O error the server saw.
pub async fn echo_once(config: Arc<ServerConfig>) -> (SocketAddr, JoinHandle<io::Result<Served>>) {
    let listener = TcpListener::bind((LOOPBACK, 0)).await.expect("bind");
    let addr = listener.local_addr().expect("local_addr");
    let handle = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let accepted = tokio::time::timeout(
            PHASE_TIMEOUT,
            TlsAcceptor::from(config).accept(tcp).into_fallible(),
        )
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"))?;
        let mut tls = match accepted {
            Ok(tls) => tls,
            Err((err, tcp)) => {
                linger(tcp).await;
                return Err(err);
            }
        };
        let peer = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(erel_certs::peer_name);
        let suite = tls.get_ref().1.negotiated_cipher_suite().map(|s| s.suite());
        let mut byte = [0u8; 1];
        timeout(tls.read_exact(&mut byte)).await?;
        timeout(tls.write_all(&byte)).await?;
        timeout(tls.shutdown()).await?;
        Ok(Served { peer, suite })
    });
    (addr, handle)
}

/// What each side of one attempt got: the master's side, then the agent's.
pub type Outcome = (io::Result<Exchanged>, io::Result<Served>);

/// What the client saw of a successful exchange.
#[derive(Debug)]
pub struct Exchanged {
    /// The byte echoed back.
    pub echoed: u8,
    /// The server's name from its certificate.
    pub peer: Option<String>,
    /// The cipher suite the handshake settled on.
    pub suite: Option<rustls::CipherSuite>,
}

/// Connects to `addr` expecting host `host_id`, writes one byte and reads it back.
/// Under TLS 1.3 a refused client certificate shows up here on the read.
pub async fn exchange(
    config: Arc<ClientConfig>,
    addr: SocketAddr,
    host_id: &str,
) -> io::Result<Exchanged> {
    let name = erel_certs::server_name(host_id).expect("server name");
    let tcp = timeout(TcpStream::connect(addr)).await?;
    let mut tls = timeout(TlsConnector::from(config).connect(name, tcp)).await?;
    let peer = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(erel_certs::peer_name);
    let suite = tls.get_ref().1.negotiated_cipher_suite().map(|s| s.suite());
    timeout(tls.write_all(&[42])).await?;
    timeout(tls.flush()).await?;
    let mut byte = [0u8; 1];
    timeout(tls.read_exact(&mut byte)).await?;
    Ok(Exchanged {
        echoed: byte[0],
        peer,
        suite,
    })
}

/// One full attempt: server from `server`, client from `client` expecting `host_id`.
/// Returns what each side got.
pub async fn attempt(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    host_id: &str,
) -> Outcome {
    let (addr, handle) = echo_once(server).await;
    let client_result = exchange(client, addr, host_id).await;
    let server_result = tokio::time::timeout(PHASE_TIMEOUT, handle)
        .await
        .expect("server finished in time")
        .expect("server task did not panic");
    (client_result, server_result)
}

/// [`attempt`] between an agent on `bundle` and the master of `master`, which
/// expects host `web-1`.
pub async fn attempt_between(bundle: &Path, master: &MasterDir) -> Outcome {
    let server = erel_certs::server_config(bundle).expect("agent loads its bundle");
    let client = master.client_config().expect("master loads its directory");
    attempt(server, client, "web-1").await
}

/// Expects a complete exchange, whoever the sides are.
pub fn expect_echoed((client_result, server_result): Outcome) {
    assert_eq!(client_result.expect("master side").echoed, 42);
    server_result.expect("agent side");
}

/// Expects a complete exchange in which each side names the other: the agent
/// `host_id`, the master `erel-master`.
pub fn expect_exchanged(results: Outcome, host_id: &str) {
    let (client_result, server_result) = results;
    let exchanged = client_result.expect("master side");
    assert_eq!(exchanged.echoed, 42);
    assert_eq!(exchanged.peer.as_deref(), Some(host_id));
    let served = server_result.expect("agent side");
    assert_eq!(served.peer.as_deref(), Some("erel-master"));
}

/// Expects the server to fail too, with an explanation containing `expected`.
/// Returns the explanation.
pub fn expect_server_refused(result: io::Result<Served>, expected: &str) -> String {
    let err = result.expect_err("the agent must refuse");
    let explained = erel_certs::explain_tls_error(&err)
        .unwrap_or_else(|| panic!("not explained as a TLS problem: {err:?}"));
    assert!(explained.contains(expected), "{explained}");
    explained
}

/// Expects the client to fail, with an explanation containing `expected`.
/// Returns the explanation.
pub fn expect_refused(result: io::Result<Exchanged>, expected: &str) -> String {
    let err = match result {
        Ok(ok) => panic!("the exchange should have failed, got {ok:?}"),
        Err(err) => err,
    };
    let explained = erel_certs::explain_tls_error(&err)
        .unwrap_or_else(|| panic!("not explained as a TLS problem: {err:?}"));
    assert!(
        explained.contains(expected),
        "explanation {explained:?} should contain {expected:?} (error: {err:?})"
    );
    explained
}

/// After a refused handshake: send FIN and drain what the client still sends
/// (bounded), so the client reads our alert instead of a reset caused by closing
/// a socket with unread data in it.
async fn linger(mut tcp: TcpStream) {
    let _ = tcp.shutdown().await;
    let mut sink = tokio::io::sink();
    let _ =
        tokio::time::timeout(Duration::from_secs(2), tokio::io::copy(&mut tcp, &mut sink)).await;
}

async fn timeout<T, E: Into<io::Error>>(
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> io::Result<T> {
    match tokio::time::timeout(PHASE_TIMEOUT, fut).await {
        Ok(result) => result.map_err(Into::into),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "test phase timed out",
        )),
    }
}
