//! The `erel` program: parses the command line, runs one command, maps the outcome to
//! an exit status (0 only when everything asked for was done). `main.rs` only calls
//! [`main`], so the end-to-end tests can build the same program.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};

mod agent;
mod amqp;
mod bundle;
mod certs;
mod config;
mod context;
mod daemon;
mod demo;
mod deploy;
mod kit;
mod lifecycle;
mod status;
mod watch;

pub(crate) use context::Context;

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
    /// Stops a release on an agent (HOST NAME), or on the hosts of a group (--group).
    Stop(lifecycle::StopArgs),
    /// Stops a release on an agent and starts it again (HOST NAME), or a rolling cold
    /// restart of what each host of a group runs, gated on health (--group).
    Restart(lifecycle::RestartArgs),
    /// Takes a group's hosts on its version back to the one unpacked before it (or to
    /// `--to VERSION`); hosts on another version are left as they are.
    Rollback(lifecycle::RollbackArgs),
    /// Prints a release's recent output on an agent; `--follow` keeps printing what is new.
    Logs(agent::LogsArgs),
    /// Table of every host in the cluster: group, desired and running release, state;
    /// with `--amqp`, also which master holds each group.
    Status(status::StatusArgs),
    /// Brings the cluster's hosts to their desired versions, rolling, gated on health.
    Deploy(deploy::DeployArgs),
    /// The daemon: keeps the cluster converged, from the cluster file (`--cluster FILE`,
    /// default cluster.toml) or from the config log on RabbitMQ (`--amqp URL`, or
    /// `EREL_AMQP` when no `--cluster` is given, with `--state-dir` and `--artifacts`).
    Master(daemon::MasterArgs),
    /// The config log on RabbitMQ: publish, show, history, holders.
    #[command(subcommand)]
    Config(config::ConfigCommand),
    /// Sealed bundles for air gaps: keygen, create, verify, import.
    #[command(subcommand)]
    Bundle(bundle::BundleCommand),
    /// Prints what the masters do, live, from RabbitMQ.
    Watch(watch::WatchArgs),
    /// The whole story on one machine: CA, three agents, deploy, roll, rollback.
    Demo(demo::DemoArgs),
    /// The demo's release program: serves `beat VERSION HOST` on $BEAT_PORT.
    #[command(hide = true)]
    DemoBeat,
}

/// Runs one `erel` command; the exit status is 0 only when all of it was done.
pub fn main() -> ExitCode {
    // `erel demo` runs agents in this process; their output writers are this program.
    if let Some(code) = erel_boot::run_output_writer_if_asked() {
        return code;
    }
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let Command::Master(args) = &mut cli.command {
        let master = matches.subcommand_matches("master");
        let cluster_given = [Some(&matches), master]
            .into_iter()
            .flatten()
            .any(|m| m.value_source("cluster") == Some(ValueSource::CommandLine));
        let amqp = master.and_then(|m| amqp_source(m, "url"));
        if let Err(e) = args.amqp.pick_mode(cluster_given, amqp) {
            eprintln!("{}", error_line(&e.to_string()));
            return ExitCode::FAILURE;
        }
    }
    let filter = log_filter(
        matches!(cli.command, Command::Master(_)),
        std::env::var("EREL_LOG").ok(),
    );
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    raise_open_files_limit();
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
            eprintln!("{}", error_line(&erel_proto::text::error_chain(&e)));
            ExitCode::FAILURE
        }
    }
}

/// Raises this process's soft limit on open files (`RLIMIT_NOFILE`) to its hard limit,
/// which any process may do (setrlimit(2)): a rolling deploy holds one connection per
/// host of the rollout from its first ping to the host's switch, so a fleet of 1,000
/// hosts needs more than the soft limit of 1,024 many systems start a shell with. The
/// hard limit stays the operator's (`ulimit -Hn`, systemd's `LimitNOFILE=`); when it
/// cannot be read or raised, the soft limit stays as it was, logged at debug level.
fn raise_open_files_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::debug!("open files limit stays {soft}: raising it to {hard}: {e}");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::debug!("open files limit not read: {e}"),
    }
}

/// An error as the program prints it: prefixed `erel: `, unless it names the command
/// itself already (`erel stop: ...`), so the program is named once.
fn error_line(text: &str) -> String {
    if text.starts_with("erel ") || text.starts_with("erel:") {
        text.to_string()
    } else {
        format!("erel: {text}")
    }
}

/// Where the value of `id` (an `--amqp URL` flag) came from: the command line or the
/// environment (`EREL_AMQP`); `None` when it has none.
fn amqp_source(matches: &ArgMatches, id: &str) -> Option<ValueSource> {
    matches
        .try_contains_id(id)
        .ok()
        .filter(|given| *given)
        .and_then(|_| matches.value_source(id))
}

async fn run(cli: Cli) -> crate::Result<ExitCode> {
    let ctx = Context::new(cli.certs);
    let cluster = cli.cluster.as_deref();
    match cli.command {
        Command::Certs(command) => certs::run(&ctx, cluster, command).await,
        Command::Ping(args) => agent::ping(&ctx, cluster, args).await,
        Command::Push(args) => agent::push(&ctx, cluster, args).await,
        Command::Unpack(args) => agent::unpack(&ctx, cluster, args).await,
        Command::Start(args) => agent::start(&ctx, cluster, args).await,
        Command::Stop(args) => lifecycle::stop(&ctx, cluster, args).await,
        Command::Restart(args) => lifecycle::restart(&ctx, cluster, args).await,
        Command::Rollback(args) => lifecycle::rollback(&ctx, &cluster_file(cluster), args).await,
        Command::Logs(args) => agent::logs(&ctx, cluster, args).await,
        Command::Status(args) => status::status(&ctx, &cluster_file(cluster), args).await,
        Command::Deploy(args) => deploy::deploy(&ctx, &cluster_file(cluster), args).await,
        Command::Master(args) => daemon::master(&ctx, &cluster_file(cluster), args).await,
        Command::Demo(args) => demo::demo(args).await,
        Command::DemoBeat => demo::beat().await,
        Command::Config(command) => config::run(command).await,
        Command::Bundle(command) => bundle::run(command, &cluster_file(cluster)).await,
        Command::Watch(args) => watch::watch(args).await,
    }
}

/// A release's state in the words every command uses (`status`, `ping`, `deploy`):
/// `running`, `stopped`, `exited with code N`, `killed by signal N`, `exited`,
/// `crash-looping`.
pub(crate) fn state_words(release: &erel_proto::ReleaseStatus) -> String {
    use erel_proto::ReleaseState;
    match &release.state {
        ReleaseState::Running => "running".to_string(),
        ReleaseState::Stopped => "stopped".to_string(),
        ReleaseState::Exited { code, signal } => match (code, signal) {
            (Some(code), _) => format!("exited with code {code}"),
            (None, Some(signal)) => format!("killed by signal {signal}"),
            (None, None) => "exited".to_string(),
        },
        ReleaseState::CrashLooping => "crash-looping".to_string(),
    }
}

/// erel's own crates: the only log targets a command other than the daemon shows by
/// default.
const EREL_TARGETS: [&str; 4] = ["erel_master", "erel_certs", "erel_boot", "erel_proto"];

/// The `tracing` filter (`EnvFilter` directives): `EREL_LOG` when set and not empty.
/// Else, for the daemon, which logs what it does: erel's own `info` and other crates'
/// warnings, lapin's excepted (the daemon reports a lost broker itself, once per
/// attempt). Else erel's own warnings only: the other commands print their own results
/// and errors, and a library's log line (lapin's ERROR on a refused login) would only
/// come before erel's message.
fn log_filter(daemon: bool, erel_log: Option<String>) -> String {
    if let Some(given) = erel_log.filter(|text| !text.trim().is_empty()) {
        return given;
    }
    let (others, own) = if daemon {
        ("warn,lapin=off", "info")
    } else {
        ("off", "warn")
    };
    let own: Vec<String> = EREL_TARGETS.iter().map(|t| format!("{t}={own}")).collect();
    format!("{others},{}", own.join(","))
}

/// The cluster file: `--cluster FILE`, else `cluster.toml`.
fn cluster_file(given: Option<&Path>) -> PathBuf {
    given
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(crate::cluster::DEFAULT_CLUSTER_FILE))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        // Catches clashing flags (a subcommand flag with a global one's id, …) before an
        // operator meets them as a panic.
        super::Cli::command().debug_assert();
    }

    #[test]
    fn typical_invocations_parse() {
        // Parsing runs clap's typed extraction, which panics when two arguments share an
        // id with different types: each command an operator types must get through it.
        for line in [
            "erel certs init",
            "erel --certs /etc/erel/certs certs init",
            "erel certs init --name prod",
            "erel certs host web-1 --ip 127.0.0.1 --dns web-1.example.org",
            "erel certs host web-1 --ip 10.0.0.11 --kit web-1.tar.gz --listen 10.0.0.11:7070 --agent erel-boot",
            "erel certs revoke master",
            "erel ping web-1@127.0.0.1:7070 --json",
            "erel push web-1@127.0.0.1:7070 app.tar.gz archives/app.tar.gz --mode 600",
            "erel unpack web-1@127.0.0.1:7070 archives/app.tar.gz releases/app/1",
            "erel start web-1@127.0.0.1:7070 app 1 --env A=B -- bin/app foreground",
            "erel stop web-1@127.0.0.1:7070 app --grace 3",
            "erel restart web-1 app",
            "erel restart web-1@127.0.0.1:7070 app 2 --grace 3 --env A=B --user app -- bin/app foreground",
            "erel deploy --cluster cluster.toml --group web --dry-run",
            "erel deploy --group web --hosts web-1,web-2 --exclude web-3",
            "erel restart --group web --hosts web-1",
            "erel stop --group web --exclude web-2,web-3 --json",
            "erel rollback --group web --group api",
            "erel status --cluster cluster.toml --json",
            "erel status --amqp amqp://127.0.0.1:5672/%2f",
            "erel master --cluster cluster.toml --interval 5",
            "erel master --amqp amqp://127.0.0.1:5672/%2f --state-dir s --name m1 --artifacts a",
            "erel config publish cluster.toml --amqp amqp://127.0.0.1:5672/%2f",
            "erel config show --json --amqp amqp://127.0.0.1:5672/%2f",
            "erel config history --amqp amqp://127.0.0.1:5672/%2f",
            "erel watch --amqp amqp://127.0.0.1:5672/%2f",
            "erel bundle keygen --secret-key k.key --public-key k.pub",
            "erel bundle create --cluster c.toml --secret-key k.key --expires-in 30d -o b.erel",
            "erel bundle verify b.erel --public-key k.pub",
            "erel bundle import b.erel --public-key k.pub --artifacts a --amqp amqp://127.0.0.1:5672/%2f",
            "erel master --amqp amqp://127.0.0.1:5672/%2f --state-dir s --artifacts a --trusted-key k.pub",
            "erel demo",
        ] {
            let args = line.split_whitespace();
            if let Err(e) = <super::Cli as clap::Parser>::try_parse_from(args) {
                panic!("{line}: {e}");
            }
        }
    }

    #[test]
    fn an_error_names_the_program_once() {
        assert_eq!(
            super::error_line("erel stop: use `erel stop HOST NAME ..`"),
            "erel stop: use `erel stop HOST NAME ..`"
        );
        assert_eq!(
            super::error_line("cluster.toml: revision: missing"),
            "erel: cluster.toml: revision: missing"
        );
    }

    #[test]
    fn library_logs_are_off_by_default_except_in_the_daemon_and_erel_log_wins() {
        let quiet = super::log_filter(false, None);
        assert!(quiet.starts_with("off,"), "{quiet}");
        assert!(quiet.contains("erel_master=warn"), "{quiet}");
        tracing_subscriber::EnvFilter::try_new(&quiet).expect("a valid filter");
        assert_eq!(super::log_filter(false, Some(" ".into())), quiet);
        let daemon = super::log_filter(true, None);
        assert!(daemon.starts_with("warn,"), "{daemon}");
        assert!(daemon.contains("erel_master=info"), "{daemon}");
        assert_eq!(
            super::log_filter(false, Some("lapin=debug".into())),
            "lapin=debug"
        );
    }

    #[test]
    fn release_states_have_one_spelling() {
        use erel_proto::{ReleaseState, ReleaseStatus};
        let status = |state| ReleaseStatus {
            name: "beat".into(),
            versions: vec![],
            version: None,
            desired_running: true,
            pid: None,
            state,
            restarts: 0,
            up_secs: None,
            output_tail: String::new(),
        };
        let cases = [
            (ReleaseState::Running, "running"),
            (ReleaseState::Stopped, "stopped"),
            (
                ReleaseState::Exited {
                    code: Some(3),
                    signal: None,
                },
                "exited with code 3",
            ),
            (
                ReleaseState::Exited {
                    code: None,
                    signal: Some(9),
                },
                "killed by signal 9",
            ),
            (ReleaseState::CrashLooping, "crash-looping"),
        ];
        for (state, words) in cases {
            assert_eq!(super::state_words(&status(state)), words);
        }
    }

    #[test]
    fn a_grace_beyond_the_agents_limit_is_refused_naming_it() {
        // u64::MAX seconds once overflowed the wait for the answer (a panic).
        for grace in ["601", "18446744073709551615"] {
            let line = format!("erel stop web-1@127.0.0.1:7070 app --grace {grace}");
            let err = <super::Cli as clap::Parser>::try_parse_from(line.split_whitespace())
                .expect_err("refused");
            assert!(err.to_string().contains("0..=600"), "{err}");
        }
    }
}
