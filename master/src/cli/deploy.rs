//! `erel deploy [--cluster FILE] [--group G].. [--dry-run] [--json]`: the rolling cold
//! deploy, with a live line per host and a summary table. Exit 0 only when every host
//! runs its desired version, healthy.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::error::ResultExt as _;
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::Context;
use crate::client::Connector;
use crate::cluster::{GroupPlan, Plan};
use crate::error::Error;
use crate::rollout::{self, HostFailure, HostOutcome, RolloutEvent, RolloutOptions, RolloutReport};
use serde::Serialize;
use std::collections::BTreeMap;

/// `erel deploy`.
#[derive(Debug, Args)]
pub struct DeployArgs {
    /// Only this group (repeatable; default: every group).
    #[arg(long = "group", value_name = "G")]
    groups: Vec<String>,
    /// Print the plan and touch nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print events as JSON lines, then the summary as JSON; with `--dry-run`, the plan
    /// as one JSON object.
    #[arg(long)]
    json: bool,
    /// Seconds each phase of opening a connection to an agent may take before the host
    /// counts as unreachable: the TCP connection, then the TLS handshake with `Hello`
    /// (each phase gets the full time).
    #[arg(long, default_value_t = crate::client::DEFAULT_CONNECT_TIMEOUT.as_secs(), value_name = "SECS")]
    connect_timeout: u64,
}

/// Runs `erel deploy`.
pub async fn deploy(ctx: &Context, cluster: &Path, args: DeployArgs) -> crate::Result<ExitCode> {
    let plan = Plan::load(cluster)?;
    for group in &args.groups {
        if !plan.groups.contains_key(group) {
            return Err(Error::Usage(format!(
                "{}: no group '{group}' (groups: {})",
                cluster.display(),
                plan.groups.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
    }
    if args.dry_run {
        if args.json {
            let json = plan_json(&plan, &args.groups);
            println!(
                "{}",
                serde_json::to_string_pretty(&json).context("encoding the plan")?
            );
        } else {
            print!("{}", describe_plan(&plan, &args.groups));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let connector = Connector::new(ctx.tls()?, ctx.master_name())
        .with_connect_timeout(Duration::from_secs(args.connect_timeout.max(1)));
    let options = RolloutOptions {
        groups: args.groups.clone(),
        ..RolloutOptions::default()
    };
    let mut view = if args.json {
        View::Json
    } else if std::io::stderr().is_terminal() {
        View::Bars(Bars::new())
    } else {
        View::Lines(Instant::now())
    };
    let report = rollout::run(&plan, &connector, &options, |event| view.show(event)).await?;
    view.finish();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).context("encoding the report")?
        );
    } else {
        print!("{}", summary_table(&report));
    }
    Ok(if report.converged() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// How progress is shown.
enum View {
    /// One live line per host (a terminal).
    Bars(Bars),
    /// One printed line per event, with the time since the start (logs, pipes).
    Lines(Instant),
    /// One JSON object per event.
    Json,
}

impl View {
    fn show(&mut self, event: &RolloutEvent) {
        match self {
            View::Bars(bars) => bars.show(event),
            View::Lines(start) => {
                if let Some(line) = event_line(event) {
                    println!("[{:>6.2}s] {line}", start.elapsed().as_secs_f64());
                }
            }
            View::Json => {
                if let Ok(line) = serde_json::to_string(event) {
                    println!("{line}");
                }
            }
        }
    }

    fn finish(&mut self) {
        if let View::Bars(bars) = self {
            bars.finish();
        }
    }
}

/// A live spinner per host.
struct Bars {
    multi: MultiProgress,
    hosts: HashMap<String, ProgressBar>,
}

impl Bars {
    fn new() -> Self {
        Bars {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
            hosts: HashMap::new(),
        }
    }

    fn bar(&mut self, group: &str, host: &str) -> &ProgressBar {
        let multi = &self.multi;
        self.hosts.entry(host.to_string()).or_insert_with(|| {
            let bar = multi.add(ProgressBar::new_spinner());
            bar.set_style(
                ProgressStyle::with_template("{spinner} {prefix:<24} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.set_prefix(format!("{group}/{host}"));
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        })
    }

    fn show(&mut self, event: &RolloutEvent) {
        let (group, host, last) = match event {
            RolloutEvent::HostPhase { group, host, phase } => {
                self.bar(group, host).set_message(phase.to_string());
                return;
            }
            RolloutEvent::HostDone {
                group,
                host,
                version,
                pid,
            } => (group, host, format!("done: runs {version} (pid {pid})")),
            RolloutEvent::HostSkipped {
                group,
                host,
                version,
            } => (group, host, format!("up to date: runs {version}")),
            RolloutEvent::HostFailed {
                group,
                host,
                failure,
                ..
            } => {
                let rolled = failure.rollback_words();
                let reason = &failure.reason;
                (group, host, format!("FAILED, {rolled}: {reason}"))
            }
            RolloutEvent::GroupHalted {
                group,
                reason,
                untouched,
            } => {
                for host in untouched {
                    let bar = self.bar(group, host);
                    bar.finish_with_message(format!("not touched: group halted ({reason})"));
                }
                return;
            }
            RolloutEvent::GroupStarted { .. } | RolloutEvent::GroupDone { .. } => return,
        };
        self.bar(group, host).finish_with_message(last);
    }

    fn finish(&mut self) {
        for bar in self.hosts.values() {
            if !bar.is_finished() {
                bar.finish();
            }
        }
    }
}

/// One event as a line of text, for logs and plain output; `None` for events not
/// worth a line of their own.
pub fn event_line(event: &RolloutEvent) -> Option<String> {
    Some(match event {
        RolloutEvent::GroupStarted {
            group,
            release,
            version,
            hosts,
        } => format!("group {group}: rolling {release} {version} to {hosts} host(s)"),
        RolloutEvent::HostPhase { group, host, phase } => format!("{group}/{host}: {phase}"),
        RolloutEvent::HostDone {
            group,
            host,
            version,
            pid,
        } => format!("{group}/{host}: done, runs {version} (pid {pid})"),
        RolloutEvent::HostSkipped {
            group,
            host,
            version,
        } => format!("{group}/{host}: up to date, runs {version}"),
        RolloutEvent::HostFailed {
            group,
            host,
            addr,
            failure,
        } => {
            let rolled = failure.rollback_words();
            let HostFailure {
                phase,
                reason,
                output_tail,
                ..
            } = failure;
            let mut line =
                format!("{group}/{host} ({addr}): FAILED while {phase}, {rolled}: {reason}");
            if !output_tail.trim().is_empty() {
                line.push_str("\n  release output:\n");
                line.push_str(&indent(output_tail.trim_end(), "    "));
            }
            line
        }
        RolloutEvent::GroupHalted {
            group,
            reason,
            untouched,
        } => {
            let left = if untouched.is_empty() {
                String::new()
            } else {
                format!("; not touched: {}", untouched.join(", "))
            };
            format!("group {group}: HALTED: {reason}{left}")
        }
        RolloutEvent::GroupDone {
            group,
            switched,
            skipped,
            failed,
        } => format!(
            "group {group}: {switched} switched, {skipped} already up to date, {failed} failed"
        ),
    })
}

/// `text` with `prefix` before each line.
pub fn indent(text: &str, prefix: &str) -> String {
    text.lines()
        .map(|l| format!("{prefix}{l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The final table: one row per host.
fn summary_table(report: &RolloutReport) -> String {
    let mut rows = vec![[
        "HOST".to_string(),
        "GROUP".to_string(),
        "ADDRESS".to_string(),
        "VERSION".to_string(),
        "RESULT".to_string(),
    ]];
    let mut tails = Vec::new();
    for group in &report.groups {
        for host in &group.hosts {
            let result = match &host.outcome {
                HostOutcome::Switched { from, pid } => format!(
                    "switched from {} (pid {pid})",
                    from.as_deref().unwrap_or("nothing")
                ),
                HostOutcome::UpToDate => "up to date".to_string(),
                HostOutcome::Failed(failure) => {
                    let HostFailure {
                        phase,
                        reason,
                        output_tail,
                        ..
                    } = failure;
                    if !output_tail.trim().is_empty() {
                        tails.push((host.host.clone(), output_tail.clone()));
                    }
                    let rolled = failure.rollback_words();
                    format!("FAILED while {phase} ({rolled}): {reason}")
                }
                HostOutcome::Untouched => "not touched (group halted)".to_string(),
            };
            rows.push([
                host.host.clone(),
                group.group.clone(),
                host.addr.clone(),
                format!("{} {}", group.release, group.version),
                result,
            ]);
        }
    }
    let mut out = table(&rows);
    for (host, tail) in tails {
        out.push_str(&format!("\n{host}: the release's last output:\n"));
        out.push_str(&indent(tail.trim_end(), "  "));
        out.push('\n');
    }
    let verdict = if report.converged() {
        format!(
            "revision {}: every host runs its desired version\n",
            report.revision
        )
    } else {
        format!(
            "revision {}: NOT converged ({} failed)\n",
            report.revision,
            report.failed()
        )
    };
    out.push_str(&verdict);
    out
}

/// Left-aligned columns; the last column is not padded.
pub fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == N {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// What `--dry-run` prints: per group, what goes where and in which order.
fn describe_plan(plan: &Plan, only: &[String]) -> String {
    let mut out = format!("{} (revision {})\n", plan.origin, plan.revision);
    for group in plan.groups.values() {
        if !only.is_empty() && !only.contains(&group.name) {
            continue;
        }
        out.push_str(&describe_group(plan, group));
    }
    out
}

fn describe_group(plan: &Plan, group: &GroupPlan) -> String {
    let hosts = plan.hosts_in(&group.name);
    let mut out = format!(
        "\ngroup {}: {} {}\n",
        group.name, group.release, group.version
    );
    if let Some(archive) = &group.archive {
        out.push_str(&format!(
            "  archive   {} (sha256 {})\n            -> {}, unpacked into {}\n",
            archive.path.display(),
            archive.sha256,
            GroupPlan::archive_dest(archive),
            group.version_dir()
        ));
    }
    let argv = if group.argv.is_empty() {
        erel_proto::rules::default_argv(&group.release).join(" ")
    } else {
        group.argv.join(" ")
    };
    out.push_str(&format!("  command   {argv}\n"));
    let probe = group
        .health
        .tcp
        .as_ref()
        .map(|port| format!("TCP port {port} answers, "))
        .unwrap_or_default();
    out.push_str(&format!(
        "  health    {probe}up {}s without a restart, within {}s\n",
        group.health.min_up.as_secs(),
        group.health.deadline.as_secs()
    ));
    out.push_str(&format!(
        "  rollout   {} canary host(s) first, then at most {} at once; the first failure halts the group\n",
        group.canaries, group.max_in_flight
    ));
    for (index, host) in hosts.iter().enumerate() {
        let role = if index < group.canaries { "canary" } else { "" };
        let env: Vec<String> = host.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        out.push_str(&format!(
            "  {:>3}. {:<20} {:<22} {:<6} {}\n",
            index + 1,
            host.id,
            host.addr,
            role,
            env.join(" ")
        ));
    }
    if hosts.is_empty() {
        out.push_str("  (no hosts)\n");
    }
    out
}

/// What `--dry-run --json` prints: the plan `describe_plan` puts in words.
#[derive(Debug, Serialize)]
struct PlanJson {
    /// The cluster file.
    cluster: String,
    revision: u64,
    groups: Vec<GroupJson>,
}

#[derive(Debug, Serialize)]
struct GroupJson {
    group: String,
    release: String,
    version: String,
    /// `None` when the archive is not checked.
    archive: Option<ArchiveJson>,
    /// The command, relative to the version directory (the default filled in).
    argv: Vec<String>,
    /// `releases/<name>/<version>` on each host.
    version_dir: String,
    canaries: usize,
    max_in_flight: usize,
    health: HealthJson,
    /// In the order they switch: canaries first.
    hosts: Vec<PlannedHostJson>,
}

#[derive(Debug, Serialize)]
struct ArchiveJson {
    /// The local file.
    path: String,
    sha256: String,
    /// Where it is pushed on each host, relative to the agent's root.
    dest: String,
}

#[derive(Debug, Serialize)]
struct HealthJson {
    /// The TCP probe's port, or `$VARIABLE` naming it in each host's environment.
    tcp: Option<String>,
    min_up_secs: u64,
    deadline_secs: u64,
}

#[derive(Debug, Serialize)]
struct PlannedHostJson {
    /// 1 for the first host to switch.
    order: usize,
    host: String,
    addr: String,
    canary: bool,
    /// The host's own environment (merged over the group's when it starts).
    env: BTreeMap<String, String>,
}

fn plan_json(plan: &Plan, only: &[String]) -> PlanJson {
    let groups = plan
        .groups
        .values()
        .filter(|group| only.is_empty() || only.contains(&group.name))
        .map(|group| GroupJson {
            group: group.name.clone(),
            release: group.release.clone(),
            version: group.version.clone(),
            archive: group.archive.as_ref().map(|archive| ArchiveJson {
                path: archive.path.display().to_string(),
                sha256: archive.sha256.to_string(),
                dest: GroupPlan::archive_dest(archive),
            }),
            argv: if group.argv.is_empty() {
                erel_proto::rules::default_argv(&group.release)
            } else {
                group.argv.clone()
            },
            version_dir: group.version_dir(),
            canaries: group.canaries,
            max_in_flight: group.max_in_flight,
            health: HealthJson {
                tcp: group.health.tcp.as_ref().map(ToString::to_string),
                min_up_secs: group.health.min_up.as_secs(),
                deadline_secs: group.health.deadline.as_secs(),
            },
            hosts: plan
                .hosts_in(&group.name)
                .iter()
                .enumerate()
                .map(|(index, host)| PlannedHostJson {
                    order: index + 1,
                    host: host.id.clone(),
                    addr: host.addr.clone(),
                    canary: index < group.canaries,
                    env: host.env.clone(),
                })
                .collect(),
        })
        .collect();
    PlanJson {
        cluster: plan.origin.clone(),
        revision: plan.revision,
        groups,
    }
}
