//! `erel status [--cluster FILE] [--json]`: one row per host and group (a host in two
//! groups has two rows, a waiting host one row in state `waiting`) with its address,
//! reachability, desired and running release, state, uptime, restarts, the group's
//! health probes (TCP and HTTP) looked at once now through the rollout's own probe
//! code, and the output of a crashed release. Whether a running release was started
//! with the argv, env and user its group gives now comes from the record of starts
//! beside the cluster file (see [`HostStatus::argv_env`]). A row of a halted group carries
//! the halt ([`HostStatus::halted`]). Exit 0 only when every host is
//! reachable and runs the desired version of each of its groups (for a group marked
//! `state = "stopped"`: does not run its release).

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use crate::error::ResultExt as _;
use clap::Args;
use erel_proto::{Ping, Pong, ReleaseState, ReleaseStatus, Request};
use serde::Serialize;

use super::deploy::{indent, table};
use super::Context;
use crate::client::{Connector, HostSession};
use crate::cluster::{ArchiveLookup, GroupState, Plan};
use crate::rollout::halt::{self, Halt};
use crate::rollout::{probe_all, ProbeAnswer, DEFAULT_PROBE_TIMEOUT};

/// `erel status`.
#[derive(Debug, Args)]
pub(super) struct StatusArgs {
    /// Print everything as JSON (with `--amqp`, `{"hosts": [..], "holders": [..]}`).
    #[arg(long)]
    json: bool,
    /// Seconds each phase of opening a connection to an agent may take: the TCP
    /// connection, then the TLS handshake with `Hello` (each phase gets the full time).
    #[arg(long, default_value_t = crate::client::DEFAULT_CONNECT_TIMEOUT.as_secs(), value_name = "SECS")]
    connect_timeout: u64,
    /// `--amqp URL --amqp-prefix PREFIX`: also show which master holds each group.
    #[command(flatten)]
    amqp: super::amqp::OptionalBrokerArgs,
}

/// One host × group as `status` shows it; a waiting host (in no group) has one row
/// with no group, release or desired version.
#[derive(Debug, Clone, Serialize)]
pub(super) struct HostStatus {
    /// Host id.
    pub host: String,
    /// The group of this row; `None` for a waiting host.
    pub group: Option<String>,
    /// Its agent's address.
    pub addr: String,
    /// Whether the agent answered.
    pub reachable: bool,
    /// Why not, when it did not.
    pub error: Option<String>,
    /// The group's release.
    pub release: Option<String>,
    /// The group's desired version; `None` for a waiting host and for a stopped group.
    pub desired_version: Option<String>,
    /// The group's `state`: `running` or `stopped`; `-` for a waiting host.
    pub desired_state: String,
    /// The version the agent runs, or ran last when [`Self::state`] is not `running`
    /// (the table then shows it as `- (last VERSION)`).
    pub running_version: Option<String>,
    /// Its state, in words.
    pub state: String,
    /// Its process id while it runs.
    pub pid: Option<u32>,
    /// Seconds up, while it runs.
    pub up_secs: Option<u64>,
    /// Restarts since its last start.
    pub restarts: u32,
    /// Versions unpacked on the host.
    pub versions: Vec<String>,
    /// The release's last output, after a crash.
    pub output_tail: String,
    /// Runs the desired version now; for a stopped group, does not run the release (a
    /// waiting host: answers).
    pub converged: bool,
    /// The group's health probes in a few words: `ok` when every one passed, else
    /// each failed one as `failed: <probe>: <answer>` (for example `failed: http GET
    /// 127.0.0.1:8080/health: HTTP 500 Internal Server Error`), joined by `; `; `-`
    /// when the group has no probe (or the row has no group); `- (not probed: STATE)`
    /// when the release does not run there (stopped, not installed, exited,
    /// unreachable), which is not probed.
    pub probe: String,
    /// Each configured probe's answer at the one look `status` took (TCP first, then
    /// HTTP), each within [`DEFAULT_PROBE_TIMEOUT`], as a rollout's verification
    /// looks; empty when the group has no probe.
    pub probes: Vec<ProbeAnswer>,
    /// Whether the release runs with the argv, env and user the group gives now:
    /// `match`, `differs`, `unknown`, or `-` when it does not run (and for a waiting
    /// host). An agent's answer to `Ping` carries no argv or env, so this compares the
    /// record of what a command with this cluster file started
    /// ([`crate::started`]), when its pid and version are the running ones, with what
    /// the group would start now.
    pub argv_env: String,
    /// Why `argv_env` says `differs` or `unknown` (for example `no record of its
    /// start`, `started by another master or by hand (..)`); `null` otherwise.
    pub argv_env_why: Option<String>,
    /// The halt that keeps the row's group from being rolled out at the file's revision
    /// (see [`crate::rollout::halt`]): `group`, `revision`, `release`, `version`,
    /// `host` (the first that failed), `reason`, `since_ms` (milliseconds since the
    /// Unix epoch); `null` when the group is not halted, and for a waiting host. Read
    /// from the file daemon's state beside the cluster file and, with `--amqp`, from
    /// the broker.
    pub halted: Option<Halt>,
}

/// Runs `erel status`.
pub(super) async fn status(
    ctx: &Context,
    cluster: &Path,
    args: StatusArgs,
) -> crate::Result<ExitCode> {
    let plan = Plan::load_with(cluster, &ArchiveLookup::Unchecked)?;
    let connector = Connector::new(ctx.tls()?, ctx.master_name())
        .with_connect_timeout(Duration::from_secs(args.connect_timeout.max(1)));
    let mut hosts = collect(&plan, &connector).await;
    judge_argv_env(&plan, cluster, &mut hosts);
    if args.json {
        let mut halts: Vec<Halt> = match halt::load(cluster) {
            Ok(halts) => halts.iter().cloned().collect(),
            Err(e) => {
                eprintln!("halted groups unknown: {e}");
                Vec::new()
            }
        };
        // With --amqp: {"hosts": [...], "holders": [...]}; else the hosts alone.
        let amqp = args.amqp.url_list();
        let json = match &amqp {
            Some(url) => {
                let groups: Vec<String> = plan.groups.keys().cloned().collect();
                let (holders, broker_halts) =
                    super::config::holders_json(url, &args.amqp.prefix, &groups, plan.revision)
                        .await?;
                halts.extend(broker_halts);
                mark_halted(&mut hosts, &halts, plan.revision);
                serde_json::to_string_pretty(&serde_json::json!({
                    "hosts": hosts,
                    "holders": holders,
                }))
            }
            None => {
                mark_halted(&mut hosts, &halts, plan.revision);
                serde_json::to_string_pretty(&hosts)
            }
        };
        println!("{}", json.context("encoding the status")?);
    } else {
        print!("{}", status_table(&plan, &hosts));
        print!("{}", super::daemon::halted_text(cluster, plan.revision));
        if let Some(url) = &args.amqp.url_list() {
            let groups: Vec<String> = plan.groups.keys().cloned().collect();
            print!(
                "\n{}",
                super::config::holders_text(url, &args.amqp.prefix, &groups, plan.revision).await?
            );
        }
    }
    Ok(if hosts.iter().all(|h| h.converged) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Sets [`HostStatus::halted`] on each row of a group that one of `halts` keeps from
/// being rolled out at `revision` (halted at it or later); the first such halt wins.
fn mark_halted(hosts: &mut [HostStatus], halts: &[Halt], revision: u64) {
    for row in hosts {
        row.halted = row.group.as_ref().and_then(|group| {
            halts
                .iter()
                .find(|h| &h.group == group && h.revision >= revision)
                .cloned()
        });
    }
}

/// Pings every host of `plan` at once.
pub(super) async fn collect(plan: &Plan, connector: &Connector) -> Vec<HostStatus> {
    let mut tasks = tokio::task::JoinSet::new();
    for (index, host) in plan.hosts.iter().enumerate() {
        let connector = connector.clone();
        let addr = host.host_addr();
        tasks.spawn(async move {
            let mut session = HostSession::new(addr, connector);
            let answer = session.command::<Pong>(Request::Ping(Ping {})).await;
            (index, answer)
        });
    }
    let mut answers = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        if let Ok(pair) = joined {
            answers.push(pair);
        }
    }
    answers.sort_by_key(|(index, _)| *index);
    let mut out = Vec::new();
    let mut probes = tokio::task::JoinSet::new();
    for (index, answer) in answers {
        let host = &plan.hosts[index];
        let groups = plan.groups_of(host);
        let base = HostStatus {
            host: host.id.clone(),
            group: None,
            addr: host.addr.clone(),
            reachable: false,
            error: None,
            release: None,
            desired_version: None,
            desired_state: "-".to_string(),
            running_version: None,
            state: "unreachable".to_string(),
            pid: None,
            up_secs: None,
            restarts: 0,
            versions: Vec::new(),
            output_tail: String::new(),
            converged: false,
            probe: "-".to_string(),
            probes: Vec::new(),
            argv_env: "-".to_string(),
            argv_env_why: None,
            halted: None,
        };
        if groups.is_empty() {
            let mut row = base;
            match answer {
                Err(e) => row.error = Some(e.to_string()),
                Ok(_) => {
                    row.reachable = true;
                    row.state = "waiting".to_string();
                    row.converged = true;
                }
            }
            out.push(row);
            continue;
        }
        for group in groups {
            let stopped = group.state == GroupState::Stopped;
            let mut row = HostStatus {
                group: Some(group.name.clone()),
                release: Some(group.release.clone()),
                desired_version: (!stopped).then(|| group.version.clone()),
                desired_state: if stopped { "stopped" } else { "running" }.to_string(),
                ..base.clone()
            };
            let mut runs = false;
            match &answer {
                Err(e) => row.error = Some(e.to_string()),
                Ok(pong) => {
                    row.reachable = true;
                    match pong.releases.iter().find(|r| r.name == group.release) {
                        None => {
                            row.state = "not installed".to_string();
                            row.converged = stopped;
                        }
                        Some(release) => {
                            runs = release.state == erel_proto::ReleaseState::Running;
                            fill(&mut row, release);
                        }
                    }
                }
            }
            let has_probe = group.probe_port(host).is_some() || group.http_port(host).is_some();
            // Only a release that runs is probed: a stopped group's, a stopped or
            // absent release, or an unreachable host's is not meant to answer.
            if has_probe && !stopped && runs {
                let (group, host, row) = (group.clone(), host.clone(), out.len());
                probes.spawn(async move {
                    let answers = probe_all(&group, &host, DEFAULT_PROBE_TIMEOUT).await;
                    (row, answers)
                });
            } else if has_probe {
                row.probe = format!("- (not probed: {})", row.state);
            }
            out.push(row);
        }
    }
    while let Some(joined) = probes.join_next().await {
        if let Ok((row, answers)) = joined {
            out[row].probe = probe_words(&answers);
            out[row].probes = answers;
        }
    }
    out
}

/// Sets [`HostStatus::argv_env`] on each row whose release runs, from the record of
/// starts beside `cluster` (an unreadable record: `unknown`, naming the file).
fn judge_argv_env(plan: &Plan, cluster: &Path, hosts: &mut [HostStatus]) {
    let records = crate::started::load(cluster);
    for row in hosts.iter_mut() {
        let (Some(group), Some(pid), Some(version)) = (
            row.group.as_ref().and_then(|g| plan.groups.get(g)),
            row.pid,
            row.running_version.clone(),
        ) else {
            continue;
        };
        let Some(host) = plan.host(&row.host).filter(|_| row.state == "running") else {
            continue;
        };
        let running = ReleaseStatus {
            name: group.release.clone(),
            versions: Vec::new(),
            version: Some(version.clone()),
            desired_running: true,
            pid: Some(pid),
            state: ReleaseState::Running,
            restarts: row.restarts,
            up_secs: row.up_secs,
            output_tail: String::new(),
        };
        let judged = match &records {
            Ok(records) => crate::started::compare(
                records.get(&row.host).and_then(|r| r.get(&group.release)),
                &running,
                &group.start_request(host, &version),
            ),
            Err(e) => crate::started::ArgvEnv {
                word: crate::started::UNKNOWN,
                why: Some(e.to_string()),
            },
        };
        row.argv_env = judged.word.to_string();
        row.argv_env_why = judged.why;
    }
}

/// [`HostStatus::probe`] from the answers: `-`, `ok`, or every failure with its probe.
fn probe_words(answers: &[ProbeAnswer]) -> String {
    if answers.is_empty() {
        return "-".to_string();
    }
    let failed: Vec<String> = answers
        .iter()
        .filter(|a| !a.passed)
        .map(|a| format!("failed: {}: {}", a.probe, a.answer))
        .collect();
    if failed.is_empty() {
        "ok".to_string()
    } else {
        failed.join("; ")
    }
}

fn fill(row: &mut HostStatus, release: &ReleaseStatus) {
    row.running_version = release.version.clone();
    row.pid = release.pid;
    row.up_secs = release.up_secs;
    row.restarts = release.restarts;
    row.versions = release.versions.clone();
    row.output_tail = release.output_tail.clone();
    row.state = super::state_words(release);
    row.converged = if row.desired_state == "stopped" {
        release.state != ReleaseState::Running && !release.desired_running
    } else {
        release.state == ReleaseState::Running
            && release.version.is_some()
            && release.version == row.desired_version
    };
}

/// The status as a table, with crash output below it.
pub(super) fn status_table(plan: &Plan, hosts: &[HostStatus]) -> String {
    let mut rows = vec![[
        "HOST",
        "GROUP",
        "ADDRESS",
        "REACHABLE",
        "DESIRED",
        "RUNNING",
        "STATE",
        "UP",
        "RESTARTS",
        "PROBE",
    ]
    .map(String::from)];
    for h in hosts {
        rows.push([
            h.host.clone(),
            h.group.clone().unwrap_or_else(|| "-".to_string()),
            h.addr.clone(),
            if h.reachable { "yes" } else { "NO" }.to_string(),
            match (&h.release, &h.desired_version) {
                (Some(release), Some(version)) => format!("{release} {version}"),
                (Some(release), None) if h.desired_state == "stopped" => {
                    format!("{release} stopped")
                }
                _ => "-".to_string(),
            },
            running_words(h),
            match (h.reachable && !h.converged, h.state.as_str()) {
                (true, "running") if h.desired_state == "stopped" => {
                    "running (to stop)".to_string()
                }
                (true, "running") => "running (old)".to_string(),
                _ => h.state.clone(),
            },
            h.up_secs
                .map(human_duration)
                .unwrap_or_else(|| "-".to_string()),
            h.restarts.to_string(),
            h.probe.clone(),
        ]);
    }
    let mut out = format!("{} (revision {})\n", plan.origin, plan.revision);
    out.push_str(&table(&rows));
    let mut named_errors: Vec<&str> = Vec::new();
    for h in hosts {
        if let Some(error) = &h.error {
            if !named_errors.contains(&h.host.as_str()) {
                named_errors.push(&h.host);
                out.push_str(&format!("{}: {error}\n", h.host));
            }
        }
        if !h.output_tail.trim().is_empty() && h.state != "running" {
            out.push_str(&format!("{}: the release's last output:\n", h.host));
            out.push_str(&indent(h.output_tail.trim_end(), "  "));
            out.push('\n');
        }
    }
    out.push_str(&argv_env_text(hosts));
    let groups: Vec<&HostStatus> = hosts.iter().filter(|h| h.group.is_some()).collect();
    let converged = groups.iter().filter(|h| h.converged).count();
    let stopped = if groups.iter().any(|h| h.desired_state == "stopped") {
        " (or, in a stopped group, do not run it)"
    } else {
        ""
    };
    out.push_str(&format!(
        "{converged} of {} host/group pair(s) run their desired version{stopped}\n",
        groups.len()
    ));
    let waiting = hosts.iter().filter(|h| h.group.is_none()).count();
    if waiting > 0 {
        out.push_str(&format!("{waiting} host(s) waiting in no group\n"));
    }
    out
}

/// The argv/env lines below the table: one per running release that does not match,
/// with why, then how many match.
fn argv_env_text(hosts: &[HostStatus]) -> String {
    let mut out = String::new();
    let running: Vec<&HostStatus> = hosts.iter().filter(|h| h.argv_env != "-").collect();
    for h in &running {
        if h.argv_env != crate::started::MATCH {
            let group = h.group.as_deref().unwrap_or("-");
            let why = h.argv_env_why.as_deref().unwrap_or("");
            out.push_str(&format!(
                "{}/{group}: argv/env {}: {why}\n",
                h.host, h.argv_env
            ));
        }
    }
    if !running.is_empty() {
        let matching = running
            .iter()
            .filter(|h| h.argv_env == crate::started::MATCH)
            .count();
        out.push_str(&format!(
            "argv/env: {matching} of {} running release(s) started with what their group gives now\n",
            running.len()
        ));
    }
    out
}

/// The RUNNING column: the version while the release runs; when it does not, the
/// version it ran last as `- (last 1.1.0)`, so a stopped release is never shown with a
/// version as if it ran; `-` when it never ran.
fn running_words(h: &HostStatus) -> String {
    match &h.running_version {
        Some(version) if h.state == "running" => version.clone(),
        Some(version) => format!("- (last {version})"),
        None => "-".to_string(),
    }
}

fn human_duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        let text = "revision = 4\n\
            [[host]]\nid = \"a-1\"\naddr = \"127.0.0.1:1\"\ngroups = [\"web\", \"metrics\"]\n\
            [[host]]\nid = \"b-1\"\naddr = \"127.0.0.1:2\"\n\
            [group.web]\nrelease = \"pong\"\nversion = \"2\"\narchive = \"p.tar.gz\"\n\
            health = { tcp = 1 }\n\
            [group.metrics]\nrelease = \"probe\"\nversion = \"1\"\narchive = \"q.tar.gz\"\n";
        Plan::parse(text, "cluster.toml", &ArchiveLookup::Unchecked).expect("valid")
    }

    fn row(host: &str, group: Option<&str>) -> HostStatus {
        HostStatus {
            host: host.to_string(),
            group: group.map(str::to_string),
            addr: "127.0.0.1:1".to_string(),
            reachable: true,
            error: None,
            release: group.map(|_| "pong".to_string()),
            desired_version: group.map(|_| "2".to_string()),
            desired_state: group.map_or("-", |_| "running").to_string(),
            running_version: None,
            state: "waiting".to_string(),
            pid: None,
            up_secs: None,
            restarts: 0,
            versions: Vec::new(),
            output_tail: String::new(),
            converged: true,
            probe: "-".to_string(),
            probes: Vec::new(),
            argv_env: "-".to_string(),
            argv_env_why: None,
            halted: None,
        }
    }

    #[test]
    fn the_table_has_a_row_per_host_and_group_and_counts_waiting_hosts_apart() {
        let mut web = row("a-1", Some("web"));
        web.state = "running".to_string();
        web.running_version = Some("2".to_string());
        web.probe = "ok".to_string();
        web.argv_env = "differs".to_string();
        web.argv_env_why = Some("started with other argv/env/user".to_string());
        let mut metrics = row("a-1", Some("metrics"));
        metrics.state = "not installed".to_string();
        metrics.converged = false;
        metrics.probe = "failed: 127.0.0.1:1: refused".to_string();
        let waiting = row("b-1", None);
        let table = status_table(&plan(), &[web, metrics, waiting]);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("cluster.toml (revision 4)"), "{table}");
        assert!(lines[1].contains("PROBE"), "{table}");
        let words = |line: &str| {
            line.split_whitespace()
                .map(String::from)
                .collect::<Vec<_>>()
        };
        assert_eq!(words(lines[2])[..2], ["a-1", "web"], "{table}");
        assert!(lines[2].ends_with("ok"), "{table}");
        assert_eq!(words(lines[3])[..2], ["a-1", "metrics"], "{table}");
        assert!(
            lines[3].ends_with("failed: 127.0.0.1:1: refused"),
            "{table}"
        );
        assert_eq!(words(lines[4])[..2], ["b-1", "-"], "{table}");
        assert!(lines[4].contains("waiting"), "{table}");
        assert!(
            table.contains("a-1/web: argv/env differs: started with other argv/env/user\n"),
            "{table}"
        );
        assert!(
            table.contains("argv/env: 0 of 1 running release(s)"),
            "{table}"
        );
        assert!(table.contains("1 of 2 host/group pair(s)"), "{table}");
        assert!(table.contains("1 host(s) waiting in no group"), "{table}");
    }

    fn release(state: ReleaseState, desired_running: bool) -> ReleaseStatus {
        crate::fixtures::release_status("pong", "2", state, desired_running, 5)
    }

    fn answer(probe: &str, passed: bool, answer: &str) -> ProbeAnswer {
        ProbeAnswer {
            probe: probe.to_string(),
            passed,
            answer: answer.to_string(),
            took_ms: 3,
        }
    }

    #[test]
    fn a_stopped_groups_row_is_converged_when_its_release_does_not_run() {
        let stopped = |state, desired_running| {
            let mut row = row("a-1", Some("web"));
            row.desired_version = None;
            row.desired_state = "stopped".to_string();
            fill(&mut row, &release(state, desired_running));
            row
        };
        assert!(stopped(ReleaseState::Stopped, false).converged);
        let running = stopped(ReleaseState::Running, true);
        assert!(!running.converged);
        let pending = ReleaseState::Exited {
            code: Some(1),
            signal: None,
        };
        assert!(!stopped(pending, true).converged, "a restart is pending");
        // A running group wants its version running.
        let mut web = row("a-1", Some("web"));
        fill(&mut web, &release(ReleaseState::Stopped, false));
        assert!(!web.converged);

        let table = status_table(&plan(), &[running]);
        let line = table.lines().nth(2).expect("the row");
        assert!(line.contains("pong stopped"), "{table}");
        assert!(line.contains("running (to stop)"), "{table}");
        assert!(
            table.contains("0 of 1 host/group pair(s) run their desired version (or, in a stopped group, do not run it)"),
            "{table}"
        );
    }

    fn halt(group: &str, revision: u64) -> Halt {
        Halt {
            group: group.to_string(),
            revision,
            release: "pong".to_string(),
            version: "3".to_string(),
            host: "a-1".to_string(),
            reason: "exited with code 3, rolled back".to_string(),
            since_ms: 1_000,
        }
    }

    #[test]
    fn rows_of_a_halted_group_carry_the_halt_and_others_null() {
        let mut hosts = vec![
            row("a-1", Some("web")),
            row("a-1", Some("metrics")),
            row("b-1", None),
        ];
        let halts = [halt("web", 4), halt("metrics", 3)];
        mark_halted(&mut hosts, &halts, 4);
        assert_eq!(hosts[0].halted, Some(halt("web", 4)));
        assert_eq!(hosts[1].halted, None, "halted at an older revision: over");
        assert_eq!(hosts[2].halted, None, "a waiting host has no group");

        let json = serde_json::to_value(&hosts).expect("json");
        assert_eq!(json[0]["halted"]["revision"], 4);
        assert_eq!(
            json[0]["halted"]["reason"],
            "exited with code 3, rolled back"
        );
        assert_eq!(json[0]["halted"]["since_ms"], 1_000);
        assert!(json[1]["halted"].is_null(), "{json}");
        assert!(json[2]["halted"].is_null(), "{json}");
    }

    #[test]
    fn the_probe_words_name_each_failed_probe_and_its_answer() {
        assert_eq!(probe_words(&[]), "-");
        let tcp_ok = answer("tcp 127.0.0.1:80", true, "connected");
        let http_500 = answer(
            "http GET 127.0.0.1:80/health",
            false,
            "HTTP 500 Internal Server Error",
        );
        assert_eq!(probe_words(std::slice::from_ref(&tcp_ok)), "ok");
        assert_eq!(
            probe_words(&[tcp_ok, http_500.clone()]),
            "failed: http GET 127.0.0.1:80/health: HTTP 500 Internal Server Error"
        );
        let tcp_refused = answer(
            "tcp 127.0.0.1:81",
            false,
            "Connection refused (os error 111)",
        );
        assert_eq!(
            probe_words(&[tcp_refused, http_500]),
            "failed: tcp 127.0.0.1:81: Connection refused (os error 111); \
             failed: http GET 127.0.0.1:80/health: HTTP 500 Internal Server Error"
        );
    }

    #[test]
    fn a_release_that_does_not_run_shows_its_last_version_as_such() {
        let mut stopped = row("a-1", Some("web"));
        stopped.state = "stopped".to_string();
        stopped.running_version = Some("1.1.0".to_string());
        stopped.converged = false;
        let mut running = row("a-1", Some("metrics"));
        running.state = "running".to_string();
        running.running_version = Some("2".to_string());
        let never = row("b-1", Some("web"));
        assert_eq!(running_words(&stopped), "- (last 1.1.0)");
        assert_eq!(running_words(&running), "2");
        assert_eq!(running_words(&never), "-");
        let table = status_table(&plan(), &[stopped, running]);
        let line = table
            .lines()
            .find(|l| l.contains(" stopped"))
            .expect("the stopped row");
        assert!(line.contains("- (last 1.1.0)"), "{table}");
        assert!(!line.contains(" 1.1.0 "), "{table}");
    }
}
