//! The low-level agent commands: `ping`, `push`, `unpack`, `start`, `stop`, `restart`,
//! and `logs`
//! (a release's output, from `Ping`'s output tail).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use crate::client::retry::{Retry, RetryPolicy};
use crate::client::{gave_up, stop_request, unpack_request, HostSession, Progress, WriteSource};
use crate::cluster::{GroupPlan, GroupState, HostPlan};
use crate::digest_cache::{DigestCache, FileStamp};
use crate::error::{Result, ResultExt as _};
use crate::{Error, HostAddr};
use clap::Args;
use erel_proto::{
    ErrorKind, Ping, Pong, ReleaseState, ReleaseStatus, Request, Start, Started, Stopped, Unpacked,
    WriteFile,
};
use indicatif::{ProgressBar, ProgressStyle};

use super::Context;

/// `erel ping HOST.. [--json]`.
#[derive(Debug, Args)]
pub(super) struct PingArgs {
    /// Agents as ID@ADDR:PORT, or host ids from the cluster file.
    #[arg(required = true)]
    hosts: Vec<String>,
    /// Print everything each agent reports, as JSON.
    #[arg(long)]
    json: bool,
}

/// `erel push HOST FILE DEST [--mode M]`.
#[derive(Debug, Args)]
pub(super) struct PushArgs {
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
pub(super) struct UnpackArgs {
    /// The agent, as ID@ADDR:PORT or a host id from the cluster file.
    host: String,
    /// The archive on the agent, relative to its root.
    archive: String,
    /// The destination directory on the agent, e.g. releases/beat/0.2.0.
    dest: String,
}

/// `erel start HOST NAME VERSION [--env K=V].. [--user U] [-- ARGV..]`.
///
/// For a host id of the cluster file, the group of that host whose release is NAME
/// gives the argv, the env (the group's, the host's merged over it) and the user; the
/// flags given here override them, and the command says which it overrode.
#[derive(Debug, Args)]
pub(super) struct StartArgs {
    /// The agent, as ID@ADDR:PORT or a host id from the cluster file.
    host: String,
    /// Release name.
    name: String,
    /// Release version (a directory under releases/NAME/ on the agent).
    version: String,
    #[command(flatten)]
    settings: StartSettings,
    /// `--take-over`, and where the daemons' leases are (`--amqp`).
    #[command(flatten)]
    hold: super::daemon::HoldArgs,
}

/// What a `Start` carries beyond name and version, as given on the command line.
#[derive(Debug, Args)]
pub(super) struct StartSettings {
    /// An environment variable for the release (repeatable; merged over the group's).
    #[arg(long = "env", value_name = "K=V", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Run as this user on the agent [default: the group's user, if any].
    #[arg(long)]
    user: Option<String>,
    /// The command, relative to the version directory [default: the group's argv, else
    /// bin/NAME foreground].
    #[arg(last = true)]
    argv: Vec<String>,
}

/// `erel stop HOST NAME [--grace SECS]`.
#[derive(Debug, Args)]
pub(super) struct StopArgs {
    /// The agent, as ID@ADDR:PORT or a host id from the cluster file.
    pub(super) host: String,
    /// Release name.
    pub(super) name: String,
    /// Seconds between SIGTERM and SIGKILL (at most the agent's limit, 600)
    /// [default: the group's stop_grace_secs, else 10].
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=erel_proto::rules::MAX_STOP_GRACE.as_secs()))]
    pub(super) grace: Option<u64>,
}

/// `erel restart HOST NAME [VERSION] [--grace SECS] [--env K=V].. [--user U] [-- ARGV..]`:
/// stop, then start with the settings `erel start` would use.
#[derive(Debug, Args)]
pub(super) struct RestartArgs {
    /// The agent, as ID@ADDR:PORT or a host id from the cluster file.
    pub(super) host: String,
    /// Release name.
    pub(super) name: String,
    /// Version to start [default: the version the agent runs or last ran, else the
    /// group's].
    pub(super) version: Option<String>,
    /// Seconds between SIGTERM and SIGKILL [default: the group's stop_grace_secs, else 10].
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=erel_proto::rules::MAX_STOP_GRACE.as_secs()))]
    pub(super) grace: Option<u64>,
    #[command(flatten)]
    pub(super) settings: StartSettings,
}

impl StartSettings {
    /// The settings given, as the command line spells them (`--env K=V`, `--user U`,
    /// `-- ARGV..`); empty when none was.
    pub(super) fn given(&self) -> Vec<String> {
        let mut given: Vec<String> = self
            .env
            .iter()
            .map(|(key, value)| format!("--env {key}={value}"))
            .collect();
        if let Some(user) = &self.user {
            given.push(format!("--user {user}"));
        }
        if !self.argv.is_empty() {
            given.push(format!("-- {}", self.argv.join(" ")));
        }
        given
    }
}

/// `erel logs HOST NAME [--follow]`.
#[derive(Debug, Args)]
pub(super) struct LogsArgs {
    /// The agent, as ID@ADDR:PORT or a host id from the cluster file.
    host: String,
    /// Release name.
    name: String,
    /// Keep printing new output, asking the agent every second, until interrupted.
    #[arg(long, short)]
    follow: bool,
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
    /// Everything `Ping` returned, each release's `state` in the words every command
    /// uses ([`super::state_words`]), with `exit_code` / `exit_signal` beside it when
    /// it exited.
    #[serde(serialize_with = "serialize_pong")]
    agent: Option<Pong>,
}

fn serialize_pong<S: serde::Serializer>(
    pong: &Option<Pong>,
    to: S,
) -> std::result::Result<S::Ok, S::Error> {
    use serde::Serialize as _;
    pong.as_ref().map(pong_json).serialize(to)
}

/// A `Pong` as `ping --json` prints it (see [`PingReport::agent`]).
fn pong_json(pong: &Pong) -> serde_json::Value {
    let mut json = serde_json::to_value(pong).unwrap_or(serde_json::Value::Null);
    let Some(releases) = json.get_mut("releases").and_then(|r| r.as_array_mut()) else {
        return json;
    };
    for (json, release) in releases.iter_mut().zip(&pong.releases) {
        let Some(fields) = json.as_object_mut() else {
            continue;
        };
        fields.insert("state".into(), super::state_words(release).into());
        if let ReleaseState::Exited { code, signal } = &release.state {
            fields.insert("exit_code".into(), serde_json::json!(code));
            fields.insert("exit_signal".into(), serde_json::json!(signal));
        }
    }
    json
}

/// Pings every host at once and prints one line each.
pub(super) async fn ping(
    ctx: &Context,
    cluster: Option<&Path>,
    args: PingArgs,
) -> Result<ExitCode> {
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
        _ => super::state_words(release),
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
pub(super) async fn push(
    ctx: &Context,
    cluster: Option<&Path>,
    args: PushArgs,
) -> Result<ExitCode> {
    let host = resolve(&args.host, cluster)?;
    // The largest the request can be: the real size once read, a full digest.
    let size = std::fs::metadata(&args.file).map_or(u64::MAX, |m| m.len());
    refuse_oversized(
        &host,
        &Request::WriteFile(WriteFile {
            path: args.dest.clone(),
            mode: args.mode,
            size,
            sha256: Some(erel_proto::Sha256([0; 32])),
        }),
    )?;
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
pub(super) async fn unpack(
    ctx: &Context,
    cluster: Option<&Path>,
    args: UnpackArgs,
) -> Result<ExitCode> {
    let request = unpack_request(&args.archive, &args.dest, None);
    refuse_oversized(&resolve(&args.host, cluster)?, &request)?;
    let (host, mut session) = open(ctx, cluster, &args.host)?;
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

/// A host argument resolved, with the group of that host running the release, when
/// the host came from the cluster file and one of its groups runs it.
struct Target {
    host: HostAddr,
    group: Option<(HostPlan, GroupPlan)>,
    /// The cluster file the group came from.
    cluster: Option<PathBuf>,
    /// Why no group applies, when the host came from the cluster file.
    no_group: Option<String>,
}

impl Target {
    fn resolve(text: &str, cluster: Option<&Path>, release: &str) -> Result<Target> {
        let (host, plan) = crate::cluster::resolve_host_in(text, cluster)?;
        let Some(plan) = plan else {
            return Ok(Target {
                host,
                group: None,
                cluster: None,
                no_group: None,
            });
        };
        let Some(member) = plan.host(&host.id) else {
            return Ok(Target {
                host,
                group: None,
                cluster: None,
                no_group: None,
            });
        };
        match plan.group_running(member, release) {
            Some(group) => Ok(Target {
                group: Some((member.clone(), group.clone())),
                cluster: Some(super::cluster_file(cluster)),
                host,
                no_group: None,
            }),
            None => Ok(Target {
                cluster: None,
                no_group: Some(format!(
                    "{}: no group of this host runs '{release}' in {}; only the command line's settings apply",
                    host.id, plan.origin
                )),
                host,
                group: None,
            }),
        }
    }

    /// The line saying that `--grace` overrode the group's `stop_grace_secs`, when it did.
    fn grace_note(&self, flag: Option<u64>) -> Option<String> {
        let (secs, (_, group)) = (flag?, self.group.as_ref()?);
        (Duration::from_secs(secs) != group.stop_grace).then(|| {
            format!(
                "{}: --grace {secs} from the command line overrides stop_grace_secs {} of group '{}'",
                self.host.id,
                group.stop_grace.as_secs(),
                group.name
            )
        })
    }

    /// The grace of a stop: `--grace`, else the group's, else the default.
    fn stop_grace(&self, flag: Option<u64>) -> Duration {
        match (flag, &self.group) {
            (Some(secs), _) => Duration::from_secs(secs),
            (None, Some((_, group))) => group.stop_grace,
            (None, None) => Duration::from_secs(crate::cluster::DEFAULT_STOP_GRACE_SECS),
        }
    }

    /// The `Start` for `version`, and a line for each setting the flags overrode.
    fn start_request(
        &self,
        name: &str,
        version: &str,
        flags: StartSettings,
    ) -> (Start, Vec<String>) {
        let Some((host, group)) = &self.group else {
            return (
                Start {
                    name: name.to_string(),
                    version: version.to_string(),
                    argv: flags.argv,
                    env: flags.env,
                    user: flags.user,
                },
                Vec::new(),
            );
        };
        let mut start = group.start_request(host, version);
        let mut notes = Vec::new();
        let whose = format!("of group '{}'", group.name);
        if !flags.argv.is_empty() {
            notes.push(format!(
                "argv from the command line, not the one {whose}: {}",
                flags.argv.join(" ")
            ));
            start.argv = flags.argv;
        }
        if !flags.env.is_empty() {
            let mut env: std::collections::BTreeMap<String, String> =
                start.env.into_iter().collect();
            let mut overridden = Vec::new();
            for (key, value) in flags.env {
                if env.insert(key.clone(), value).is_some() {
                    overridden.push(key);
                }
            }
            if !overridden.is_empty() {
                notes.push(format!(
                    "env from the command line overrides {} {whose}",
                    overridden.join(", ")
                ));
            }
            start.env = env.into_iter().collect();
        }
        if let Some(user) = flags.user {
            notes.push(format!(
                "user '{user}' from the command line, not '{}' {whose}",
                start.user.as_deref().unwrap_or("(none)")
            ));
            start.user = Some(user);
        }
        (start, notes)
    }

    /// A warning when the group running the release is marked `state = "stopped"`:
    /// starting it by hand lasts only until the next deploy or daemon pass.
    fn stopped_group_warning(&self, name: &str) -> Option<String> {
        let (_, group) = self.group.as_ref()?;
        (group.state == GroupState::Stopped).then(|| {
            format!(
                "{}: group '{}' is marked state = \"stopped\": the next deploy, or a daemon's pass, stops {name} again",
                self.host.id, group.name
            )
        })
    }

    /// Holds the host's group against its daemon while `command` acts on release
    /// `name` by hand: a daemon keeps the group as its config says, so it would undo
    /// the command at its next pass. Refused naming the holder unless `--take-over`,
    /// which warns that the change lasts until that daemon's next pass. `None` for a
    /// host in no group of the cluster file.
    async fn hold(
        &self,
        command: &str,
        name: &str,
        hold: &super::daemon::HoldArgs,
    ) -> Result<Option<super::daemon::Hold>> {
        let (Some((_, group)), Some(cluster)) = (&self.group, &self.cluster) else {
            return Ok(None);
        };
        let groups = [group.name.clone()];
        let held = super::daemon::ensure_not_held(cluster, &groups, command, hold)
            .await
            .map_err(|e| match e {
                Error::Usage(refused) => Error::Usage(format!(
                    "{}: {refused}. That daemon keeps group '{}' as its config says: it \
                     would undo this `{command}` of {name} at its next pass",
                    self.host.id, group.name
                )),
                other => other,
            })?;
        if hold.take_over() {
            eprintln!(
                "warning: {}: {command} of {name} lasts until the next pass of the daemon \
                 keeping group '{}': it repairs drift back to the group's config unless the \
                 config changes",
                self.host.id, group.name
            );
        }
        Ok(Some(held))
    }

    /// Runs `work` on a session with the host while the group is held against its
    /// daemon (see [`Self::hold`]), then hands the group back, whatever `work` returned.
    async fn while_held<T>(
        &self,
        ctx: &Context,
        (command, name): (&str, &str),
        hold: &super::daemon::HoldArgs,
        work: impl AsyncFnOnce(&mut HostSession) -> Result<T>,
    ) -> Result<T> {
        let held = self.hold(command, name, hold).await?;
        let outcome = async {
            let mut session = HostSession::new(self.host.clone(), ctx.connector()?);
            work(&mut session).await
        }
        .await;
        if let Some(held) = held {
            held.release().await;
        }
        outcome
    }

    fn describe(&self) -> Option<String> {
        match &self.group {
            Some((_, group)) => Some(format!(
                "{}: settings of group '{}' (release {}, stop_grace_secs {})",
                self.host.id,
                group.name,
                group.release,
                group.stop_grace.as_secs()
            )),
            None => self.no_group.clone(),
        }
    }
}

/// Sends `start`; the line saying what happened.
/// Sends a start; the line saying what happened. A release started with a cluster
/// file (`record`) is recorded beside it ([`crate::started::record`]) with the request
/// sent; one that already ran is not (what it runs with did not change).
async fn send_start(
    host: &HostAddr,
    session: &mut HostSession,
    start: Start,
    record: Option<&Path>,
) -> Result<String> {
    let (name, version) = (start.name.clone(), start.version.clone());
    let started: Started = session.command(Request::Start(start.clone())).await?;
    if let (Some(cluster), false) = (record, started.already_running) {
        if let Err(e) = crate::started::record(cluster, &host.id, &start, started.pid) {
            eprintln!("warning: the start is not recorded, status will say argv/env unknown: {e}");
        }
    }
    let how = if started.already_running {
        "already running"
    } else {
        "started"
    };
    Ok(format!(
        "{}: {name} {version} {how}, pid {}",
        host.id, started.pid
    ))
}

/// Sends a stop; the line saying what happened.
async fn send_stop(
    host: &HostAddr,
    session: &mut HostSession,
    name: &str,
    grace: Duration,
) -> Result<String> {
    let stopped: Stopped = session.command(stop_request(name, grace)).await?;
    let how = match (stopped.was_running, stopped.killed) {
        (false, _) => "was not running".to_string(),
        (true, false) => "stopped".to_string(),
        (true, true) => format!("killed after the grace period of {}s", grace.as_secs()),
    };
    Ok(format!("{}: {name} {how}", host.id))
}

/// Starts a release on one agent.
pub(super) async fn start(
    ctx: &Context,
    cluster: Option<&Path>,
    args: StartArgs,
) -> Result<ExitCode> {
    let target = Target::resolve(&args.host, cluster, &args.name)?;
    let (request, notes) = target.start_request(&args.name, &args.version, args.settings);
    refuse_oversized(&target.host, &Request::Start(request.clone()))?;
    let notes = notes
        .iter()
        .map(|note| format!("{}: {note}", target.host.id));
    let warning = target.stopped_group_warning(&args.name);
    print_lines(target.describe().into_iter().chain(notes).chain(warning));
    let record = target.cluster.as_deref();
    let command = ("erel start", args.name.as_str());
    let started = target
        .while_held(ctx, command, &args.hold, async |session| {
            send_start(&target.host, session, request, record).await
        })
        .await?;
    println!("{started}");
    Ok(ExitCode::SUCCESS)
}

/// Stops a release on one agent.
pub(super) async fn stop(
    ctx: &Context,
    cluster: Option<&Path>,
    args: StopArgs,
    hold: &super::daemon::HoldArgs,
) -> Result<ExitCode> {
    let target = Target::resolve(&args.host, cluster, &args.name)?;
    let grace = target.stop_grace(args.grace);
    print_lines(
        target
            .describe()
            .into_iter()
            .chain(target.grace_note(args.grace)),
    );
    let stopped = target
        .while_held(ctx, ("erel stop", &args.name), hold, async |session| {
            send_stop(&target.host, session, &args.name, grace).await
        })
        .await?;
    println!("{stopped}");
    Ok(ExitCode::SUCCESS)
}

/// Stops a release on one agent, then starts it again with the settings `start` uses.
pub(super) async fn restart(
    ctx: &Context,
    cluster: Option<&Path>,
    args: RestartArgs,
    hold: &super::daemon::HoldArgs,
) -> Result<ExitCode> {
    let target = Target::resolve(&args.host, cluster, &args.name)?;
    let name = args.name.clone();
    target
        .while_held(ctx, ("erel restart", &name), hold, async |session| {
            restart_held(session, &target, args).await
        })
        .await
}

/// Refuses `request` for `host` when it could never reach the agent: its frame would be
/// over [`erel_proto::MAX_FRAME`] (see [`crate::client::oversized`]). Called before
/// anything is sent, so a refused `restart` stops nothing. A `Start` names its largest
/// value.
fn refuse_oversized(host: &HostAddr, request: &Request) -> Result<()> {
    let Some(len) = crate::client::oversized(request) else {
        return Ok(());
    };
    let largest = match request {
        Request::Start(start) => {
            let (part, part_len) = crate::client::largest_start_part(start);
            format!(" ({part} is {part_len} bytes)")
        }
        _ => String::new(),
    };
    Err(Error::Usage(format!(
        "{}: the {} request would be {len} bytes, over the agent's {}-byte frame limit{largest}; refused before anything was changed",
        host.id,
        request.name(),
        erel_proto::MAX_FRAME
    )))
}

/// Prints each line on its own.
fn print_lines(lines: impl IntoIterator<Item = String>) {
    for line in lines {
        println!("{line}");
    }
}

async fn restart_held(
    session: &mut HostSession,
    target: &Target,
    args: RestartArgs,
) -> Result<ExitCode> {
    let version = match args.version {
        Some(version) => version,
        None => {
            let pong: Pong = session.command(Request::Ping(Ping {})).await?;
            let ran = pong
                .releases
                .into_iter()
                .find(|r| r.name == args.name)
                .and_then(|r| r.version);
            let desired = target.group.as_ref().map(|(_, g)| g.version.clone());
            ran.or(desired).ok_or_else(|| {
                Error::Usage(format!(
                    "{}: '{}' has never run there and no group of the host runs it: give VERSION",
                    target.host.id, args.name
                ))
            })?
        }
    };
    let (request, notes) = target.start_request(&args.name, &version, args.settings);
    refuse_oversized(&target.host, &Request::Start(request.clone()))?;
    match target.describe() {
        Some(line) => println!("{line}"),
        // The agent does not say what a release was started with: a restart without a
        // group starts it with exactly what is given here.
        None => println!(
            "{}: no cluster group: {} {version} is started with the command line's argv, env and user only",
            target.host.id, args.name
        ),
    }
    for note in notes {
        println!("{}: {note}", target.host.id);
    }
    if let Some(line) = target.grace_note(args.grace) {
        println!("{line}");
    }
    if let Some(line) = target.stopped_group_warning(&args.name) {
        println!("{line}");
    }
    let grace = target.stop_grace(args.grace);
    println!(
        "{}",
        send_stop(&target.host, session, &args.name, grace).await?
    );
    let started = send_start(&target.host, session, request, target.cluster.as_deref());
    println!("{}", started.await?);
    Ok(ExitCode::SUCCESS)
}

/// How often `erel logs --follow` asks the agent for the release's output.
pub(super) const FOLLOW_INTERVAL: Duration = Duration::from_secs(1);

/// Printed by `erel logs --follow` where more output came between two looks than the
/// output tail holds, so some of it was never seen.
pub(super) const OUTPUT_SKIPPED: &str = "[… output skipped …]";

/// Prints release `NAME`'s recent output on one agent: the output tail its `Ping`
/// reports (at most [`erel_proto::OUTPUT_TAIL_MAX`] bytes, from the start of a line).
/// With `--follow`, asks again every [`FOLLOW_INTERVAL`] on the same connection and
/// prints only what is new (see [`new_output`]) until interrupted.
///
/// # Errors
///
/// The host cannot be resolved or reached, or it has no release `NAME` (the error names
/// the host, the release, and the releases the host has).
pub(super) async fn logs(
    ctx: &Context,
    cluster: Option<&Path>,
    args: LogsArgs,
) -> Result<ExitCode> {
    use std::io::Write as _;
    let (host, mut session) = open(ctx, cluster, &args.host)?;
    let mut shown = output_tail(&mut session, &host, &args.name).await?;
    let mut out = std::io::stdout();
    let mut print = |text: &str| -> Result<()> {
        out.write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .context("writing to standard output")
    };
    print(&shown)?;
    if !args.follow {
        return Ok(ExitCode::SUCCESS);
    }
    loop {
        tokio::time::sleep(FOLLOW_INTERVAL).await;
        let tail = output_tail(&mut session, &host, &args.name).await?;
        match new_output(&shown, &tail) {
            NewOutput::Continues(new) => print(new)?,
            NewOutput::Skipped(new) => {
                let gap = if shown.is_empty() || shown.ends_with('\n') {
                    ""
                } else {
                    "\n"
                };
                print(&format!("{gap}{OUTPUT_SKIPPED}\n{new}"))?;
            }
        }
        shown = tail;
    }
}

/// Release `name`'s output tail as `host`'s `Ping` reports it.
async fn output_tail(session: &mut HostSession, host: &HostAddr, name: &str) -> Result<String> {
    let pong: Pong = session.command(Request::Ping(Ping {})).await?;
    if let Some(release) = pong.releases.iter().find(|r| r.name == name) {
        return Ok(release.output_tail.clone());
    }
    let known: Vec<&str> = pong.releases.iter().map(|r| r.name.as_str()).collect();
    let has = if known.is_empty() {
        "it has no releases".to_string()
    } else {
        format!("its releases: {}", known.join(", "))
    };
    Err(Error::Usage(format!(
        "host {} ({}) has no release {name}; {has}",
        host.id, host.addr
    )))
}

/// What a new look at an output tail shows beyond the previous one.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum NewOutput<'a> {
    /// The new tail continues the previous one: this is what follows it (may be empty).
    Continues(&'a str),
    /// The two tails do not overlap: more output came than a tail holds, and what came
    /// between them is lost to this view. The whole new tail.
    Skipped(&'a str),
}

/// Compares two looks at a release's output tail, a sliding window over one stream of
/// output: the longest end of `old` that starts `new` is output seen twice, and what
/// follows it in `new` is new. No overlap means more than a tail's worth arrived between
/// the looks ([`NewOutput::Skipped`]), unless `old` was empty. The tail carries no
/// offsets, so output that repeats itself exactly (the same line over a whole tail) can
/// show as nothing new.
pub(super) fn new_output<'a>(old: &str, new: &'a str) -> NewOutput<'a> {
    let longest = old.len().min(new.len());
    let overlap = (0..=longest)
        .rev()
        .filter(|&n| new.is_char_boundary(n) && old.is_char_boundary(old.len() - n))
        .find(|&n| old.ends_with(&new[..n]));
    match overlap {
        Some(0) | None if !old.is_empty() && !new.is_empty() => NewOutput::Skipped(new),
        Some(n) => NewOutput::Continues(&new[n..]),
        None => NewOutput::Continues(new),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{ArchiveLookup, Plan};

    const CLUSTER: &str = r#"
revision = 1

[[host]]
id = "web-1"
addr = "127.0.0.1:7070"
groups = ["web", "metrics"]
env = { PORT = "8081" }

[group.web]
release = "pong"
version = "0.2.0"
archive = "pong.tar.gz"
argv = ["bin/pong", "foreground"]
env = { PORT = "8080", MODE = "prod" }
user = "pong"
stop_grace_secs = 30

[group.metrics]
release = "probe"
version = "1.0.0"
archive = "probe.tar.gz"
"#;

    fn target(release: &str) -> Target {
        let plan = Plan::parse(CLUSTER, "cluster.toml", &ArchiveLookup::Unchecked).expect("valid");
        let host = plan.host("web-1").expect("web-1");
        Target {
            host: host.host_addr(),
            group: plan
                .group_running(host, release)
                .map(|g| (host.clone(), g.clone())),
            cluster: None,
            no_group: None,
        }
    }

    fn flags(env: &[(&str, &str)], user: Option<&str>, argv: &[&str]) -> StartSettings {
        StartSettings {
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            user: user.map(str::to_string),
            argv: argv.iter().map(|a| a.to_string()).collect(),
        }
    }

    #[test]
    fn the_group_running_the_release_gives_argv_env_user_and_grace() {
        let web = target("pong");
        let (start, notes) = web.start_request("pong", "0.1.0", flags(&[], None, &[]));
        assert_eq!(start.version, "0.1.0");
        assert_eq!(start.argv, ["bin/pong", "foreground"]);
        assert_eq!(
            start.env,
            [
                ("MODE".to_string(), "prod".to_string()),
                ("PORT".to_string(), "8081".to_string())
            ],
            "the host's env wins over the group's"
        );
        assert_eq!(start.user.as_deref(), Some("pong"));
        assert!(notes.is_empty(), "{notes:?}");
        assert_eq!(web.stop_grace(None), Duration::from_secs(30));
        assert_eq!(web.stop_grace(Some(2)), Duration::from_secs(2));

        // The other group of the same host, for its own release.
        let metrics = target("probe");
        assert_eq!(
            metrics.stop_grace(None),
            Duration::from_secs(crate::cluster::DEFAULT_STOP_GRACE_SECS)
        );
        let (start, _) = metrics.start_request("probe", "1.0.0", flags(&[], None, &[]));
        assert!(start.argv.is_empty() && start.user.is_none());
        assert_eq!(start.env, [("PORT".to_string(), "8081".to_string())]);
    }

    #[test]
    fn starting_the_release_of_a_stopped_group_warns_that_it_will_be_stopped_again() {
        assert_eq!(target("pong").stopped_group_warning("pong"), None);
        let text = CLUSTER.replace(
            "stop_grace_secs = 30\n",
            "stop_grace_secs = 30\nstate = \"stopped\"\n",
        );
        let plan = Plan::parse(&text, "cluster.toml", &ArchiveLookup::Unchecked).expect("valid");
        let host = plan.host("web-1").expect("web-1");
        let web = Target {
            host: host.host_addr(),
            group: Some((host.clone(), plan.groups["web"].clone())),
            cluster: None,
            no_group: None,
        };
        let warning = web.stopped_group_warning("pong").expect("warned");
        assert!(
            warning.starts_with("web-1: group 'web' is marked state = \"stopped\"")
                && warning.ends_with("stops pong again"),
            "{warning}"
        );
    }

    #[test]
    fn flags_override_the_group_and_say_so() {
        let web = target("pong");
        let (start, notes) = web.start_request(
            "pong",
            "0.2.0",
            flags(
                &[("MODE", "debug"), ("EXTRA", "1")],
                Some("root"),
                &["bin/pong", "console"],
            ),
        );
        assert_eq!(start.argv, ["bin/pong", "console"]);
        assert!(start
            .env
            .contains(&("MODE".to_string(), "debug".to_string())));
        assert!(start.env.contains(&("EXTRA".to_string(), "1".to_string())));
        assert!(start
            .env
            .contains(&("PORT".to_string(), "8081".to_string())));
        assert_eq!(start.user.as_deref(), Some("root"));
        let said = notes.join("\n");
        assert!(
            said.contains("argv from the command line, not the one of group 'web'"),
            "{said}"
        );
        assert!(said.contains("overrides MODE of group 'web'"), "{said}");
        assert!(
            !said.contains("EXTRA"),
            "an added variable overrides nothing: {said}"
        );
        assert!(
            said.contains("user 'root' from the command line, not 'pong' of group 'web'"),
            "{said}"
        );

        let web = target("pong");
        assert_eq!(web.grace_note(None), None);
        assert_eq!(
            web.grace_note(Some(2)).as_deref(),
            Some("web-1: --grace 2 from the command line overrides stop_grace_secs 30 of group 'web'")
        );

        // No group: the flags alone, nothing to say.
        let none = target("other");
        let (start, notes) =
            none.start_request("other", "1", flags(&[("A", "b")], None, &["bin/x"]));
        assert_eq!(start.argv, ["bin/x"]);
        assert_eq!(start.env, [("A".to_string(), "b".to_string())]);
        assert!(notes.is_empty());
    }

    #[test]
    fn a_request_from_flags_that_could_not_fit_in_a_frame_is_refused() {
        let host: HostAddr = "web-1@127.0.0.1:7070".parse().expect("host");
        let long = "d".repeat(erel_proto::MAX_FRAME);
        let cases = [
            (unpack_request("archives/a.tar", &long, None), "Unpack"),
            (
                Request::WriteFile(WriteFile {
                    path: long.clone(),
                    mode: 0o644,
                    size: 1,
                    sha256: None,
                }),
                "WriteFile",
            ),
        ];
        for (request, name) in &cases {
            let error = refuse_oversized(&host, request)
                .expect_err("too large")
                .to_string();
            assert!(
                error.contains(&format!("web-1: the {name} request would be 655"))
                    && error
                        .contains("65536-byte frame limit; refused before anything was changed"),
                "{error}"
            );
        }
        let none = target("other");
        let (start, _) = none.start_request("other", "1", flags(&[], None, &["bin/x", &long]));
        let error = refuse_oversized(&host, &Request::Start(start))
            .expect_err("too large")
            .to_string();
        assert!(error.contains("(argv[1] is 65536 bytes)"), "{error}");
        // What fits is let through.
        let (start, _) = none.start_request("other", "1", flags(&[("A", "b")], None, &["bin/x"]));
        assert!(refuse_oversized(&host, &Request::Start(start)).is_ok());
    }

    #[test]
    fn output_that_grew_shows_only_what_is_new() {
        assert_eq!(new_output("", "a\n"), NewOutput::Continues("a\n"));
        assert_eq!(new_output("a\n", "a\nb\n"), NewOutput::Continues("b\n"));
        assert_eq!(new_output("a\nb\n", "a\nb\n"), NewOutput::Continues(""));
        // The window slid: its start dropped out, its end grew.
        assert_eq!(
            new_output("a\nb\nc\n", "b\nc\nd\n"),
            NewOutput::Continues("d\n")
        );
        // A line finished between the looks.
        assert_eq!(new_output("a\nb", "a\nbc\n"), NewOutput::Continues("c\n"));
    }

    #[test]
    fn a_tail_with_nothing_in_common_says_output_was_skipped() {
        assert_eq!(new_output("a\nb\n", "x\ny\n"), NewOutput::Skipped("x\ny\n"));
        assert_eq!(new_output("a\n", ""), NewOutput::Continues(""));
    }

    #[test]
    fn overlaps_are_found_at_character_boundaries() {
        assert_eq!(new_output("é\nà", "àb"), NewOutput::Continues("b"));
    }
}
