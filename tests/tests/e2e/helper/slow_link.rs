//! A slow link as a TCP proxy in the test process (this kernel has no `netem`): each
//! chunk read from one end is written to the other after a fixed delay, with optional
//! jitter, in the order it was read. A connection attempt crosses the link too: the
//! proxy connects to its upstream one delay after it accepted, and a refusal comes back
//! to the client one delay later as a reset.
//!
//! What a proxy cannot carry: the TCP handshake. The client's `connect` completes at
//! the proxy at once, before the upstream is asked, so a bare TCP connect through it
//! succeeds whatever listens behind it; whatever the client sends or reads afterwards
//! takes the delay, and meets the refusal.
//!
//! A tap may watch the bytes going upstream as they are read (a test waiting for a
//! given request to be on its way).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Chunks read but not yet written, per direction of one connection; a reader waits
/// when its writer is that far behind.
const CHUNKS_IN_FLIGHT: usize = 1024;
/// The largest chunk read at once.
const CHUNK: usize = 64 << 10;

/// What one direction of the link does to a chunk.
#[derive(Debug, Clone, Copy)]
pub struct Delay {
    /// Added to every chunk.
    pub fixed: Duration,
    /// Up to this much more, drawn per chunk (order is kept all the same: a chunk never
    /// overtakes the one read before it).
    pub jitter: Duration,
}

impl Delay {
    /// A fixed delay without jitter.
    pub const fn fixed(fixed: Duration) -> Self {
        Delay {
            fixed,
            jitter: Duration::ZERO,
        }
    }

    /// The most a chunk waits.
    pub fn most(&self) -> Duration {
        self.fixed + self.jitter
    }
}

/// Watches the bytes going upstream.
pub type Tap = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// What crossed the link so far.
#[derive(Debug, Default)]
pub struct Traffic {
    /// Connections carried to the upstream.
    pub connections: AtomicU64,
    /// Connections the upstream refused (reset at the client).
    pub refused: AtomicU64,
    /// Bytes written upstream.
    pub upstream_bytes: AtomicU64,
    /// Bytes written back to clients.
    pub client_bytes: AtomicU64,
}

struct Link {
    delay: Delay,
    tap: Option<Tap>,
    traffic: Traffic,
    /// xorshift64 state for the jitter.
    seed: Mutex<u64>,
}

impl Link {
    /// This chunk's delay.
    fn next_delay(&self) -> Duration {
        if self.delay.jitter.is_zero() {
            return self.delay.fixed;
        }
        let mut seed = self.seed.lock().expect("jitter seed");
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        let jitter_ns = u64::try_from(self.delay.jitter.as_nanos()).unwrap_or(u64::MAX);
        self.delay.fixed + Duration::from_nanos(*seed % jitter_ns.max(1))
    }
}

/// A set of routes (a listening address to an upstream address), all with the same
/// [`Delay`] each way. Everything stops when dropped.
pub struct SlowLink {
    link: Arc<Link>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl SlowLink {
    /// A link delaying each chunk by `delay`, each way, with no route yet.
    pub fn new(delay: Delay) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("slow-link")
            .enable_all()
            .build()
            .expect("the slow link's runtime");
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1;
        SlowLink {
            link: Arc::new(Link {
                delay,
                tap: None,
                traffic: Traffic::default(),
                seed: Mutex::new(seed),
            }),
            runtime: Some(runtime),
        }
    }

    /// Calls `tap` with every chunk going upstream, as it is read. Before any route.
    pub fn tapping_upstream(mut self, tap: impl Fn(&[u8]) + Send + Sync + 'static) -> Self {
        let link = Arc::get_mut(&mut self.link).expect("a tap is set before any route");
        link.tap = Some(Arc::new(tap));
        self
    }

    /// Listens on `listen` (port 0: any free one) and carries every connection to
    /// `upstream`; the address it listens on. Panics when it cannot listen there.
    pub fn route(&self, listen: SocketAddr, upstream: SocketAddr) -> SocketAddr {
        let listener = std::net::TcpListener::bind(listen)
            .unwrap_or_else(|e| panic!("the slow link cannot listen on {listen}: {e}"));
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local address");
        let runtime = self.runtime.as_ref().expect("running");
        let _entered = runtime.enter();
        let listener = tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
        let link = self.link.clone();
        runtime.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(carry(client, upstream, link.clone()));
            }
        });
        addr
    }

    /// What crossed the link so far.
    pub fn traffic(&self) -> &Traffic {
        &self.link.traffic
    }
}

impl Drop for SlowLink {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// A chunk and when it is due at the other end; `None` bytes: the end of the stream.
struct Chunk {
    due: Instant,
    bytes: Option<Vec<u8>>,
}

/// Carries one accepted connection to `upstream` across the link.
async fn carry(client: TcpStream, upstream: SocketAddr, link: Arc<Link>) {
    let accepted = Instant::now();
    let _ = client.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    // What the client sends right away is on its way while the upstream is asked.
    let (to_upstream, upstream_chunks) = mpsc::channel(CHUNKS_IN_FLIGHT);
    let reading = tokio::spawn(read_chunks(client_read, to_upstream, link.clone(), true));
    tokio::time::sleep_until(accepted + link.next_delay()).await;
    let server = match TcpStream::connect(upstream).await {
        Ok(server) => server,
        Err(_) => {
            link.traffic.refused.fetch_add(1, Ordering::Relaxed);
            reading.abort();
            tokio::time::sleep(link.next_delay()).await;
            let _ = client_write.as_ref().set_zero_linger();
            return;
        }
    };
    link.traffic.connections.fetch_add(1, Ordering::Relaxed);
    let _ = server.set_nodelay(true);
    let (server_read, server_write) = server.into_split();
    let (to_client, client_chunks) = mpsc::channel(CHUNKS_IN_FLIGHT);
    let answering = tokio::spawn(read_chunks(server_read, to_client, link.clone(), false));
    tokio::join!(
        write_chunks(upstream_chunks, server_write, &link.traffic.upstream_bytes),
        write_chunks(client_chunks, client_write, &link.traffic.client_bytes),
    );
    reading.abort();
    answering.abort();
}

/// Reads `from` into due chunks until its end (a read error counts as one).
async fn read_chunks(mut from: OwnedReadHalf, to: mpsc::Sender<Chunk>, link: Arc<Link>, tap: bool) {
    let mut last_due = Instant::now();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let bytes = match from.read(&mut buf).await {
            Ok(0) | Err(_) => None,
            Ok(n) => Some(buf[..n].to_vec()),
        };
        if let (true, Some(tap), Some(bytes)) = (tap, &link.tap, &bytes) {
            tap(bytes);
        }
        let due = (Instant::now() + link.next_delay()).max(last_due);
        last_due = due;
        let end = bytes.is_none();
        if to.send(Chunk { due, bytes }).await.is_err() || end {
            return;
        }
    }
}

/// Writes each chunk to `to` when it is due; shuts `to` down at the end of the stream.
async fn write_chunks(mut from: mpsc::Receiver<Chunk>, mut to: OwnedWriteHalf, bytes: &AtomicU64) {
    while let Some(chunk) = from.recv().await {
        tokio::time::sleep_until(chunk.due).await;
        match chunk.bytes {
            Some(data) => {
                if to.write_all(&data).await.is_err() {
                    return;
                }
                bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            None => {
                let _ = to.shutdown().await;
                return;
            }
        }
    }
}
