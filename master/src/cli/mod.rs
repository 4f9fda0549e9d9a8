//! The `erel` program: parses the command line, runs one command, maps the outcome to
//! an exit status (0 only when everything asked for was done). `main.rs` only calls
//! [`main`], so the end-to-end tests can build the same program.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod agent;
pub mod certs;
mod context;

pub use context::Context;

/// Drives erel boot agents: certificates, agent commands, deploys, configs.
#[derive(Debug, Parser)]
#[command(name = "erel", version, about)]
struct Cli {
    /// Certificate directory (ca.pem, master.pem, hosts/<ID>/ …).
    #[arg(
        long,
        global = true,
        env = "EREL_CERTS",
        default_value = "certs",
        value_name = "DIR"
    )]
    certs: PathBuf,
    /// The cluster file [default: cluster.toml]; a HOST argument may be one of its ids.
    #[arg(long, global = true, env = "EREL_CLUSTER", value_name = "FILE")]
    cluster: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Certificates: the cluster CA, host bundles, revocation.
    #[command(subcommand)]
    Certs(certs::CertsCommand),
    /// Pings agents: reachability, version, releases and their states.
    Ping(agent::PingArgs),
    /// Writes a local file to an agent (WriteFile), resumably, with progress.
    Push(agent::PushArgs),
    /// Unpacks an archive on an agent.
    Unpack(agent::UnpackArgs),
    /// Starts a release version on an agent.
    Start(agent::StartArgs),
    /// Stops a release on an agent.
    Stop(agent::StopArgs),
    /// The whole story on one machine: CA, three agents, deploy, roll, rollback.
    Demo,
}

/// Runs one `erel` command; the exit status is 0 only when all of it was done.
pub fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EREL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("erel: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(run(cli));
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("erel: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let ctx = Context::new(cli.certs);
    let cluster = cli.cluster.as_deref();
    match cli.command {
        Command::Certs(command) => certs::run(&ctx, command),
        Command::Ping(args) => agent::ping(&ctx, cluster, args).await,
        Command::Push(args) => agent::push(&ctx, cluster, args).await,
        Command::Unpack(args) => agent::unpack(&ctx, cluster, args).await,
        Command::Start(args) => agent::start(&ctx, cluster, args).await,
        Command::Stop(args) => agent::stop(&ctx, cluster, args).await,
        Command::Demo => {
            eprintln!("erel demo: not built yet (the rolling deploy comes first)");
            Ok(ExitCode::from(2))
        }
    }
}
