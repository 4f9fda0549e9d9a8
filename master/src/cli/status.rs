//! `erel status [--cluster FILE] [--json]`: every host of the cluster with its group,
//! address, reachability, desired and running release, state, uptime, restarts, and
//! the output of a crashed release. Exit 0 only when every host is reachable and runs
//! its desired version.

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
use crate::cluster::{ArchiveLookup, Plan};

/// `erel status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print everything as JSON.
    #[arg(long)]
    json: bool,
    /// Seconds each phase of opening a connection to an agent may take: the TCP
    /// connection, then the TLS handshake with `Hello` (each phase gets the full time).
    #[arg(long, default_value_t = crate::client::DEFAULT_CONNECT_TIMEOUT.as_secs(), value_name = "SECS")]
    connect_timeout: u64,
    /// Also show which master holds each group, from this RabbitMQ broker (table only).
    #[arg(long = "amqp", value_name = "URL")]
    amqp: Option<String>,
    /// Prefix of the queue names on the broker.
    #[arg(long = "amqp-prefix", env = "EREL_AMQP_PREFIX", default_value = crate::amqp::DEFAULT_PREFIX, value_name = "PREFIX")]
    amqp_prefix: String,
}

/// One host as `status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct HostStatus {
    /// Host id.
    pub host: String,
    /// Its group.
    pub group: String,
    /// Its agent's address.
    pub addr: String,
    /// Whether the agent answered.
    pub reachable: bool,
    /// Why not, when it did not.
    pub error: Option<String>,
    /// The group's release.
    pub release: String,
    /// The group's desired version.
    pub desired_version: String,
    /// The version the agent runs or last ran.
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
    /// Runs the desired version now.
    pub converged: bool,
}

/// Runs `erel status`.
pub async fn status(ctx: &Context, cluster: &Path, args: StatusArgs) -> crate::Result<ExitCode> {
    let plan = Plan::load_with(cluster, &ArchiveLookup::Unchecked)?;
    let connector = Connector::new(ctx.tls()?, ctx.master_name())
        .with_connect_timeout(Duration::from_secs(args.connect_timeout.max(1)));
    let hosts = collect(&plan, &connector).await;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&hosts).context("encoding the status")?
        );
    } else {
        print!("{}", status_table(&plan, &hosts));
        print!("{}", super::daemon::halted_text(cluster, plan.revision));
        if let Some(url) = &args.amqp {
            let groups: Vec<String> = plan.groups.keys().cloned().collect();
            print!(
                "\n{}",
                super::config::holders_text(url, &args.amqp_prefix, &groups, plan.revision).await?
            );
        }
    }
    Ok(if hosts.iter().all(|h| h.converged) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Pings every host of `plan` at once.
pub async fn collect(plan: &Plan, connector: &Connector) -> Vec<HostStatus> {
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
    for (index, answer) in answers {
        let host = &plan.hosts[index];
        let Some(group) = plan.group_of(host) else {
            continue;
        };
        let mut row = HostStatus {
            host: host.id.clone(),
            group: host.group.clone(),
            addr: host.addr.clone(),
            reachable: false,
            error: None,
            release: group.release.clone(),
            desired_version: group.version.clone(),
            running_version: None,
            state: "unreachable".to_string(),
            pid: None,
            up_secs: None,
            restarts: 0,
            versions: Vec::new(),
            output_tail: String::new(),
            converged: false,
        };
        match answer {
            Err(e) => row.error = Some(e.to_string()),
            Ok(pong) => {
                row.reachable = true;
                match pong.releases.iter().find(|r| r.name == group.release) {
                    None => row.state = "not installed".to_string(),
                    Some(release) => fill(&mut row, release),
                }
            }
        }
        out.push(row);
    }
    out
}

fn fill(row: &mut HostStatus, release: &ReleaseStatus) {
    row.running_version = release.version.clone();
    row.pid = release.pid;
    row.up_secs = release.up_secs;
    row.restarts = release.restarts;
    row.versions = release.versions.clone();
    row.output_tail = release.output_tail.clone();
    row.state = match &release.state {
        ReleaseState::Running => "running".to_string(),
        ReleaseState::Stopped => "stopped".to_string(),
        ReleaseState::Exited {
            code: Some(code), ..
        } => format!("exited ({code})"),
        ReleaseState::Exited {
            signal: Some(signal),
            ..
        } => format!("killed (signal {signal})"),
        ReleaseState::Exited { .. } => "exited".to_string(),
        ReleaseState::CrashLooping => "crash-looping".to_string(),
    };
    row.converged = release.state == ReleaseState::Running
        && release.version.as_deref() == Some(row.desired_version.as_str());
}

/// The status as a table, with crash output below it.
pub fn status_table(plan: &Plan, hosts: &[HostStatus]) -> String {
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
    ]
    .map(String::from)];
    for h in hosts {
        rows.push([
            h.host.clone(),
            h.group.clone(),
            h.addr.clone(),
            if h.reachable { "yes" } else { "NO" }.to_string(),
            format!("{} {}", h.release, h.desired_version),
            h.running_version.clone().unwrap_or_else(|| "-".to_string()),
            if h.reachable && !h.converged && h.state == "running" {
                "running (old)".to_string()
            } else {
                h.state.clone()
            },
            h.up_secs
                .map(human_duration)
                .unwrap_or_else(|| "-".to_string()),
            h.restarts.to_string(),
        ]);
    }
    let mut out = format!("{} (revision {})\n", plan.origin, plan.revision);
    out.push_str(&table(&rows));
    for h in hosts {
        if let Some(error) = &h.error {
            out.push_str(&format!("{}: {error}\n", h.host));
        }
        if !h.output_tail.trim().is_empty() && h.state != "running" {
            out.push_str(&format!("{}: the release's last output:\n", h.host));
            out.push_str(&indent(h.output_tail.trim_end(), "  "));
            out.push('\n');
        }
    }
    let converged = hosts.iter().filter(|h| h.converged).count();
    out.push_str(&format!(
        "{converged} of {} host(s) run their desired version\n",
        hosts.len()
    ));
    out
}

fn human_duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}
