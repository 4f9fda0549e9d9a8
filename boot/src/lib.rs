//! The erel boot agent: installed once per host, never changed.
//!
//! One public function, [`run`]: given its [`Config`], a bound listener and a shutdown
//! token, the agent serves the five commands until the token is cancelled. (Hidden
//! beside it, `Sessions` serves the same sessions without TLS, for the fuzz targets in
//! `fuzz/`.) The modules behind it:
//!
//! - `server`: the mutual-TLS listener, the `Hello` handshake, the one exhaustive
//!   dispatch; `peers`: the budget of peers still in the TLS handshake.
//! - one module per command: `ping`, `write_file`, `unpack`, and `supervisor` (`Start`,
//!   `Stop`, restarts, crash-loop detection, adoption); `retention` removes old versions.
//! - `fs`: the root, the rules for every path the master names, the release layout,
//!   durable writes and the agent's lock; `digest`: sha256 of a file or its first bytes.
//! - `bundle`: the certificate bundle a master pushes to `certs/bundle.toml`, judged
//!   as a whole, on probation until a master authenticates with it.
//! - `config`: flags and `boot.toml` validated once; `settings`: limits and supervision;
//!   `error`: the one error type; `cli`: the program (parse, bind, signals, [`run`]).
#![deny(missing_docs)]
#![warn(unreachable_pub)]

mod bundle;
mod cli;
mod config;
mod digest;
mod error;
mod fs;
mod peers;
mod ping;
mod retention;
mod server;
mod settings;
mod supervisor;
mod unpack;
#[cfg(test)]
mod wait;
mod write_file;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use config::Config;
pub use error::Error;
pub use settings::{CgroupParent, Limits, OutputWriter, Supervision};

/// The `erel-boot` program. Exported only because the end-to-end tests build the same
/// program under another name and cannot reach a binary target's `main`.
pub use cli::main;

/// Runs the output writer when this process was started as one. Exported only because the
/// output writer is the running program re-run through `/proc/self/exe`: a program that
/// embeds the agent (such as `erel demo`) must call it first in its `main`.
pub use cli::run_output_writer_if_asked;

/// Runs the agent: takes the root's lock, clears what a crash left (stale transfers,
/// interrupted unpacks, the trash), starts the supervisor (adopting releases still
/// running), then serves `listener` until `shutdown` is cancelled. On shutdown it waits
/// for connections in progress, a bounded while, and detaches from the releases, which
/// keep running.
///
/// # Errors
///
/// [`Error::Startup`] when the certificate bundle, the root, its lock or the supervisor
/// cannot be set up; the agent has then served nothing.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let host_id = host_id(&config.certs)?;
    let tls = server::TlsSource::load(config.certs.clone())
        .map_err(|e| Error::startup(format!("certificate bundle {}", config.certs.display()), e))?;
    let (root, _agent_lock) = open_root(&config.root)?;
    let pushed = bundle::Pushed::open(&root, &host_id, config.limits.bundle_probation);
    let tls = tls.with_pushed(pushed);
    let supervisor =
        supervisor::Supervisor::open(root.clone(), host_id.clone(), config.supervision)
            .await
            .map_err(|e| Error::startup("starting the release supervisor", e))?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::startup("listening address", e))?;
    info!(%host_id, listen = %local, root = %root.path().display(), "erel-boot {} serving", env!("CARGO_PKG_VERSION"));
    let agent = Arc::new(server::Agent {
        root,
        host_id,
        limits: config.limits,
        supervisor: supervisor.clone(),
        started: std::time::Instant::now(),
    });
    server::serve(listener, agent, Arc::new(tls), shutdown).await;
    supervisor.detach().await;
    if config.remove_cgroups_on_exit {
        supervisor.remove_empty_cgroups();
    }
    Ok(())
}

/// Opens the root, takes its lock, and clears what a crash left (stale transfers,
/// interrupted unpacks, the trash).
fn open_root(path: &Path) -> Result<(fs::Root, fs::AgentLock), Error> {
    let root = fs::Root::open(path)
        .map_err(|e| Error::startup(format!("root directory {}", path.display()), e))?;
    // Before anything under the root is touched: one agent per root.
    let agent_lock = fs::AgentLock::acquire(&root)?;
    write_file::sweep_stale(&root, write_file::STALE_STAGING_AGE)
        .map_err(|e| Error::startup("cleaning stale transfers", e))?;
    unpack::sweep_stale(&root).map_err(|e| Error::startup("cleaning interrupted unpacks", e))?;
    retention::sweep_trash(&root)
        .map_err(|e| Error::startup("removing versions left in the trash", e))?;
    Ok((root, agent_lock))
}

/// The agent's command side without its listener and TLS: a root opened as [`run`] opens
/// it and a supervisor, serving sessions on streams whose peer is taken as already
/// authenticated.
///
/// Exported, hidden, only for the fuzz targets (`fuzz/`), which feed arbitrary bytes to
/// the decoding and execution of requests against a temporary root. A program serving
/// masters uses [`run`], which verifies every peer's certificate first.
#[doc(hidden)]
#[derive(Debug)]
pub struct Sessions {
    agent: Arc<server::Agent>,
    _lock: fs::AgentLock,
}

impl Sessions {
    /// Opens `root` (creating its layout, taking its lock, clearing what a crash left)
    /// and starts the supervisor, as [`run`] does, for the host named `host_id`.
    ///
    /// # Errors
    ///
    /// [`Error::Startup`] when the root, its lock or the supervisor cannot be set up.
    pub async fn open(
        root: &Path,
        host_id: &str,
        limits: Limits,
        supervision: Supervision,
    ) -> Result<Self, Error> {
        let (root, lock) = open_root(root)?;
        let host_id = host_id.to_string();
        let supervisor = supervisor::Supervisor::open(root.clone(), host_id.clone(), supervision)
            .await
            .map_err(|e| Error::startup("starting the release supervisor", e))?;
        let agent = Arc::new(server::Agent {
            root,
            host_id,
            limits,
            supervisor,
            started: std::time::Instant::now(),
        });
        Ok(Sessions { agent, _lock: lock })
    }

    /// Serves one session on `stream` as a connection after its TLS handshake, with a
    /// peer named `peer_name` at `peer`: the `Hello`, then requests until the stream ends
    /// or a refusal ends the session.
    pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: S,
        peer: SocketAddr,
        peer_name: &str,
    ) {
        let conn = server::Connection::new(
            stream,
            peer,
            peer_name.to_string(),
            self.agent.clone(),
            None,
        );
        conn.serve(CancellationToken::new()).await;
    }

    /// Detaches from the releases (they keep running) and releases the root's lock.
    pub async fn close(self) {
        self.agent.supervisor.detach().await;
    }
}

/// The host id the bundle's `host.pem` names.
fn host_id(certs: &std::path::Path) -> Result<String, Error> {
    use rustls::pki_types::pem::PemObject;
    let host_pem = certs.join("host.pem");
    let cert = rustls::pki_types::CertificateDer::from_pem_file(&host_pem)
        .map_err(|e| Error::startup(format!("{}: not a PEM certificate", host_pem.display()), e))?;
    erel_certs::peer_name(&cert).ok_or_else(|| Error::Startup {
        what: format!("{}: names no host id", host_pem.display()),
        source: None,
    })
}
