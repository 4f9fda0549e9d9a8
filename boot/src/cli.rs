//! The `erel-boot` program: parses flags or `boot.toml`, sets up logging, binds,
//! installs signal handlers and calls [`crate::run`]. `main.rs` only calls [`main`], so
//! the end-to-end tests can build the same program.

use std::process::ExitCode;

use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::info;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::config::{Config, Flags};
use crate::error::Error;

/// Runs the agent until SIGTERM; the exit status says whether it started. Run as
/// `erel-boot output-writer LOG MAX_BYTES`, it is instead the output writer of one release
/// run (see [`run_output_writer_if_asked`]).
pub fn main() -> ExitCode {
    if let Some(code) = run_output_writer_if_asked() {
        return code;
    }
    // `EREL_LOG` holds `tracing` targets and levels (`info`, `debug`, `info,erel_boot=debug`);
    // read as `Targets`, which needs no regular expressions, unlike `EnvFilter`, so the
    // static agent stays small. Unreadable or unset: `info`.
    let filter = std::env::var("EREL_LOG")
        .ok()
        .and_then(|directives| directives.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .finish()
        .with(filter)
        .init();
    let flags = Flags::parse();
    let outcome = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::startup("cannot start the runtime", e))
        .and_then(|runtime| runtime.block_on(run(flags)));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, once: the journal takes stderr as it is.
            eprintln!("erel-boot: {}", erel_proto::text::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// When this program was started as an output writer (first argument `output-writer`, as
/// the supervisor starts it by default through `/proc/self/exe`), runs the writer and
/// returns its exit status; otherwise `None`. A program that embeds the agent (such as
/// `erel demo`) calls this first thing in its `main`.
pub fn run_output_writer_if_asked() -> Option<ExitCode> {
    let mut args = std::env::args_os().skip(1);
    if args.next()? != crate::supervisor::OUTPUT_WRITER_COMMAND {
        return None;
    }
    let rest: Vec<_> = args.collect();
    Some(crate::supervisor::run_output_writer(&rest))
}

async fn run(flags: Flags) -> Result<(), Error> {
    // First of all, so that a SIGTERM that arrives while the agent starts (a service
    // manager stopping it at once) ends it cleanly once it serves, instead of killing it.
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| Error::startup("cannot install the SIGTERM handler", e))?;
    let mut int = signal(SignalKind::interrupt())
        .map_err(|e| Error::startup("cannot install the SIGINT handler", e))?;
    let config = Config::from_flags(flags).map_err(|e| Error::Startup {
        what: e.to_string(),
        source: None,
    })?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| Error::startup(format!("cannot listen on {}", config.listen), e))?;
    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        info!("shutting down; supervised releases keep running");
        signals.cancel();
    });
    crate::run(config, listener, shutdown).await
}
