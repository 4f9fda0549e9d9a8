//! The low-level agent commands: `ping`, `push`, `unpack`, `start`, `stop`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use crate::client::{gave_up, stop_request, unpack_request, HostSession, Progress, WriteSource};
use crate::digest_cache::{DigestCache, FileStamp};
use crate::error::{Result, ResultExt as _};
use crate::rollout::decide::{Retry, RetryPolicy};
use crate::{Error, HostAddr};
use clap::Args;
use erel_proto::{
    ErrorKind, Ping, Pong, ReleaseState, ReleaseStatus, Request, Start, Started, Stopped, Unpacked,
};
use indicatif::{ProgressBar, ProgressStyle};

use super::Context;

/// `erel ping HOST.. [--json]`.
#[derive(Debug, Args)]
pub struct PingArgs {
    /// Agents as ID@ADDR:PORT, or host ids from the cluster file.
    #[arg(required = true)]
    hosts: Vec<String>,
    /// Print everything each agent reports, as JSON.
    #[arg(long)]
    json: bool,
}

/// `erel push HOST FILE DEST [--mode M]`.
#[derive(Debug, Args)]
pub struct PushArgs {
    /// The agent, as ID@ADDR:PORT or a host id from the cluster file.
    host: String,
    /// The local file.
    file: PathBuf,
    /// Destination relative to the agent's root, e.g. archives/beat-0.2.0.tar.gz.
    dest: String,
    /// Permission bits, in octal.
    #[arg(long, default_value = "644", value_parser = parse_mode)]
    mode: u32,
    /// The file's sha256 when known (skips hashing; a file already on the agent costs nothing).
    #[arg(long)]
    sha256: Option<String>,
}

/// `erel unpack HOST ARCHIVE DEST`.
#[derive(Debug, Args)]
pub struct UnpackArgs {
    /// The agent, as ID@ADDR:PORT or a host id from the cluster file.
    host: String,
    /// The archive on the agent, relative to its root.
    archive: String,
    /// The destination directory on the agent, e.g. releases/beat/0.2.0.
    dest: String,
}

/// `erel start HOST NAME VERSION [--env K=V].. [-- ARGV..]`.
#[derive(Debug, Args)]
pub struct StartArgs {
    /// The agent, as ID@ADDR:PORT or a host id from the cluster file.
    host: String,
    /// Release name.
    name: String,
    /// Release version (a directory under releases/NAME/ on the agent).
    version: String,
    /// An environment variable for the release (repeatable).
    #[arg(long = "env", value_name = "K=V", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Run as this user on the agent.
    #[arg(long)]
    user: Option<String>,
    /// The command, relative to the version directory [default: bin/NAME foreground].
    #[arg(last = true)]
    argv: Vec<String>,
}

/// `erel stop HOST NAME [--grace SECS]`.
#[derive(Debug, Args)]
pub struct StopArgs {
    /// The agent, as ID@ADDR:PORT or a host id from the cluster file.
    pub(super) host: String,
    /// Release name.
    pub(super) name: String,
    /// Seconds between SIGTERM and SIGKILL (at most the agent's limit, 600).
    #[arg(long, default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(0..=erel_proto::rules::MAX_STOP_GRACE.as_secs()))]
    pub(super) grace: u64,
}

fn parse_mode(text: &str) -> std::result::Result<u32, String> {
    let mode = u32::from_str_radix(text.trim_start_matches("0o"), 8)
        .map_err(|_| format!("'{text}' is not an octal mode such as 644 or 755"))?;
    if erel_proto::rules::check_file_mode(mode).is_err() {
        return Err(format!(
            "mode {text} has bits above 0777 (setuid, setgid and sticky are refused)"
        ));
    }
    Ok(mode)
}

fn parse_env(text: &str) -> std::result::Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("'{text}' is not K=V"))?;
    if key.is_empty() {
        return Err(format!("'{text}' has an empty name"));
    }
    Ok((key.to_string(), value.to_string()))
}

/// Resolves a `HOST` argument: `ID@ADDR:PORT`, or an id from the cluster file (the
/// one given with `--cluster`, else `cluster.toml` when it exists).
fn resolve(text: &str, cluster: Option<&Path>) -> Result<HostAddr> {
    crate::cluster::resolve_host(text, cluster)
}

/// Resolves a `HOST` argument and opens a session with it.
fn open(ctx: &Context, cluster: Option<&Path>, text: &str) -> Result<(HostAddr, HostSession)> {
    let host = resolve(text, cluster)?;
    let session = HostSession::new(host.clone(), ctx.connector()?);
    Ok((host, session))
}

/// One host's answer to `ping`, as `--json` prints it.
#[derive(Debug, serde::Serialize)]
struct PingReport {
    host: String,
    addr: String,
    reachable: bool,
    error: Option<String>,
    agent: Option<Pong>,
}

/// Pings every host at once and prints one line each.
pub async fn ping(ctx: &Context, cluster: Option<&Path>, args: PingArgs) -> Result<ExitCode> {
    let hosts = args
        .hosts
        .iter()
        .map(|text| resolve(text, cluster))
        .collect::<Result<Vec<HostAddr>>>()?;
    let connector = ctx.connector()?;
    let mut tasks = tokio::task::JoinSet::new();
    for (index, host) in hosts.into_iter().enumerate() {
        let mut session = HostSession::new(host.clone(), connector.clone());
        tasks.spawn(async move {
            let outcome = session.command::<Pong>(Request::Ping(Ping {})).await;
            (index, host, outcome)
        });
    }
    let mut reports = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let (index, host, outcome) = joined.context("ping task failed")?;
        let report = match outcome {
            Ok(pong) => PingReport {
                host: host.id,
                addr: host.addr,
                reachable: true,
                error: None,
                agent: Some(pong),
            },
            Err(e) => PingReport {
                host: host.id,
                addr: host.addr,
                reachable: false,
                error: Some(e.to_string()),
                agent: None,
            },
        };
        reports.push((index, report));
    }
    reports.sort_by_key(|(index, _)| *index);
    let reports: Vec<PingReport> = reports.into_iter().map(|(_, r)| r).collect();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&reports).context("encoding the answers")?
        );
    } else {
        for report in &reports {
            println!("{}", ping_line(report));
        }
    }
    Ok(if reports.iter().all(|r| r.reachable) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn ping_line(report: &PingReport) -> String {
    let Some(pong) = &report.agent else {
        return format!(
            "{} {} unreachable: {}",
            report.host,
            report.addr,
            report.error.as_deref().unwrap_or("unknown error")
        );
    };
    let mut line = format!(
        "{} {} ok erel-boot {} up {}s, {} free",
        report.host,
        report.addr,
        pong.agent_version,
        pong.uptime_secs,
        human_bytes(pong.free_disk_bytes)
    );
    if pong.releases.is_empty() {
        line.push_str("; no releases");
    }
    for release in &pong.releases {
        line.push_str("; ");
        line.push_str(&release_summary(release));
    }
    line
}

/// A release in a few words: `beat 0.2.0 running pid 42 restarts 0`.
fn release_summary(release: &ReleaseStatus) -> String {
    let version = release.version.as_deref().unwrap_or("-");
    let state = match &release.state {
        ReleaseState::Running => format!("running pid {}", release.pid.unwrap_or(0)),
        ReleaseState::Stopped => "stopped".to_string(),
        ReleaseState::Exited { code, signal } => match (code, signal) {
            (Some(code), _) => format!("exited with code {code}"),
            (None, Some(signal)) => format!("killed by signal {signal}"),
            (None, None) => "exited".to_string(),
        },
        ReleaseState::CrashLooping => "crash-looping".to_string(),
    };
    format!(
        "{} {version} {state} restarts {}",
        release.name, release.restarts
    )
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Pushes one file with a progress bar.
pub async fn push(ctx: &Context, cluster: Option<&Path>, args: PushArgs) -> Result<ExitCode> {
    let host = resolve(&args.host, cluster)?;
    let cache = DigestCache::for_user();
    // Taken before anything reads the file: a digest is recorded below only if the
    // file is still in this state after the push.
    let stamp = FileStamp::take(&args.file)?;
    let (sha256, sha256_of) = match &args.sha256 {
        Some(text) => (
            Some(erel_proto::Sha256::from_hex(text).ok_or_else(|| {
                Error::Usage(format!("--sha256 '{text}' is not 64 hex characters"))
            })?),
            None,
        ),
        None => match cache.clone() {
            // May hash the file again (a recently changed one): off the async threads.
            Some(cache) => {
                let file = args.file.clone();
                match tokio::task::spawn_blocking(move || cache.get_stamped(&file)).await {
                    Ok(Some((sha256, of))) => (Some(sha256), Some(of)),
                    _ => (None, None),
                }
            }
            None => (None, None),
        },
    };
    let source = WriteSource {
        path: args.file.clone(),
        sha256,
        sha256_of,
    };
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(format!(
        "{} -> {}:{}",
        args.file.display(),
        host.id,
        args.dest
    ));
    // Another push of the same file (another master, or a repeat of a cut command)
    // takes the agent's transfer over, and the agent then ends this connection with
    // `Busy`; the bytes sent are kept for whichever request holds the file. Taking it
    // back at once would only take it from a master that is sending, so this push
    // waits about as long as the rest of the file takes at the rate it saw, then goes
    // on from what the agent holds (nothing, when the other push finished it).
    let mut busy: Option<(RetryPolicy, std::time::Instant)> = None;
    let written = loop {
        let mut seen = Progress {
            total: 0,
            skipped: 0,
            sent: 0,
        };
        let mut on_progress = |p: Progress| {
            seen = p;
            bar.set_length(p.total);
            bar.set_position(p.skipped + p.sent);
        };
        let started = std::time::Instant::now();
        let attempt = match ctx.connector()?.connect(&host).await {
            Ok(mut client) => {
                client
                    .write_file(&source, &args.dest, args.mode, &mut on_progress)
                    .await
            }
            Err(e) => {
                bar.finish_and_clear();
                return Err(e);
            }
        };
        match attempt {
            // Taken over before it sent anything: a plain `Busy`, waited out within
            // its bound.
            Err(e) if e.agent_kind() == Some(ErrorKind::Busy) && seen.sent == 0 => {
                let (policy, began) = busy
                    .get_or_insert_with(|| (RetryPolicy::for_push(), std::time::Instant::now()));
                match policy.after(&e, began.elapsed()) {
                    Retry::Again(pause) | Retry::Reconnect(pause) => {
                        tokio::time::sleep(pause).await
                    }
                    Retry::GiveUp => break Err(gave_up(e, began.elapsed())),
                }
            }
            // Taken over, or cut, after it moved the file on (the agent's `Busy` may be
            // lost to the reset of a connection it closed while bytes were in flight).
            Err(e) if e.is_transient() && seen.sent > 0 => {
                busy = None;
                tokio::time::sleep(taken_over_pause(&seen, started.elapsed())).await;
            }
            other => break other,
        }
    };
    bar.finish_and_clear();
    let written = written?;
    if let Some(cache) = cache {
        cache.put(&args.file, &stamp, written.sha256);
    }
    let how = if written.received == 0 {
        "already present, nothing sent".to_string()
    } else if written.received < written.size {
        format!(
            "resumed, sent {} of {}",
            human_bytes(written.received),
            human_bytes(written.size)
        )
    } else {
        format!("sent {}", human_bytes(written.received))
    };
    println!(
        "{}:{} {} sha256 {} ({how})",
        host.id,
        args.dest,
        human_bytes(written.size),
        written.sha256
    );
    Ok(ExitCode::SUCCESS)
}

/// How long a push whose transfer another push took over waits before it goes on:
/// half as long again as the rest of the file takes at the rate this push had, so
/// the other push, sending, can finish it; within 1 s and [`TAKEN_OVER_PAUSE_MAX`].
fn taken_over_pause(seen: &Progress, elapsed: Duration) -> Duration {
    let done = seen.skipped + seen.sent;
    let rest = seen.total.saturating_sub(done);
    let rate = seen.sent as f64 / elapsed.as_secs_f64().max(0.001);
    let estimate = Duration::from_secs_f64((1.5 * rest as f64 / rate.max(1.0)).min(3600.0));
    estimate.clamp(Duration::from_secs(1), TAKEN_OVER_PAUSE_MAX)
}

/// The longest pause of a push whose transfer was taken over (see [`push`]).
const TAKEN_OVER_PAUSE_MAX: Duration = Duration::from_secs(30);

/// Unpacks an archive on one agent.
pub async fn unpack(ctx: &Context, cluster: Option<&Path>, args: UnpackArgs) -> Result<ExitCode> {
    let (host, mut session) = open(ctx, cluster, &args.host)?;
    let request = unpack_request(&args.archive, &args.dest, None);
    let done: Unpacked = session.command(request).await?;
    if done.already {
        println!(
            "{}:{} already unpacked from {} (sha256 {})",
            host.id, args.dest, args.archive, done.sha256
        );
    } else {
        println!(
            "{}:{} unpacked from {}: {} entries, {}",
            host.id,
            args.dest,
            args.archive,
            done.entries,
            human_bytes(done.bytes)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Starts a release on one agent.
pub async fn start(ctx: &Context, cluster: Option<&Path>, args: StartArgs) -> Result<ExitCode> {
    let (host, mut session) = open(ctx, cluster, &args.host)?;
    let started: Started = session
        .command(Request::Start(Start {
            name: args.name.clone(),
            version: args.version.clone(),
            argv: args.argv,
            env: args.env,
            user: args.user,
        }))
        .await?;
    let how = if started.already_running {
        "already running"
    } else {
        "started"
    };
    println!(
        "{}: {} {} {how}, pid {}",
        host.id, args.name, args.version, started.pid
    );
    Ok(ExitCode::SUCCESS)
}

/// Stops a release on one agent.
pub async fn stop(ctx: &Context, cluster: Option<&Path>, args: StopArgs) -> Result<ExitCode> {
    let (host, mut session) = open(ctx, cluster, &args.host)?;
    let request = stop_request(&args.name, Duration::from_secs(args.grace));
    let stopped: Stopped = session.command(request).await?;
    let how = match (stopped.was_running, stopped.killed) {
        (false, _) => "was not running",
        (true, false) => "stopped",
        (true, true) => "killed after the grace period",
    };
    println!("{}: {} {how}", host.id, args.name);
    Ok(ExitCode::SUCCESS)
}
