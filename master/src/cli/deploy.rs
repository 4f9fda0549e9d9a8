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

/// `erel deploy`.
#[derive(Debug, Args)]
pub struct DeployArgs {
    /// Only this group (repeatable; default: every group).
    #[arg(long = "group", value_name = "G")]
    groups: Vec<String>,
    /// Print the plan and touch nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print events as JSON lines, then the summary as JSON.
    #[arg(long)]
    json: bool,
    /// Seconds each phase of opening a connection to an agent may take before the host
    /// counts as unreachable: the TCP connection, then the TLS handshake with `Hello`
    /// (each phase gets the full time).
    #[arg(long, default_value_t = crate::client::DEFAULT_CONNECT_TIMEOUT.as_secs(), value_name = "SECS")]
    connect_timeout: u64,
    /// `--take-over`, and where the daemons' leases are (`--amqp`).
    #[command(flatten)]
    hold: super::daemon::HoldArgs,
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
        print!("{}", describe_plan(&plan, &args.groups));
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
    let groups: Vec<String> = if args.groups.is_empty() {
        plan.groups.keys().cloned().collect()
    } else {
        args.groups.clone()
    };
    let hold = super::daemon::ensure_not_held(cluster, &groups, "erel deploy", &args.hold).await?;
    let report = rollout::run(&plan, &connector, &options, |event| view.show(event)).await;
    hold.release().await;
    let report = report?;
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
                failure:
                    HostFailure {
                        reason,
                        rolled_back,
                        ..
                    },
                ..
            } => {
                let rolled = if *rolled_back { ", rolled back" } else { "" };
                (group, host, format!("FAILED{rolled}: {reason}"))
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
            failure:
                HostFailure {
                    phase,
                    reason,
                    output_tail,
                    rolled_back,
                },
        } => {
            let rolled = rollout::rollback_words(*rolled_back);
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
                HostOutcome::Failed(HostFailure {
                    phase,
                    reason,
                    output_tail,
                    rolled_back,
                }) => {
                    if !output_tail.trim().is_empty() {
                        tails.push((host.host.clone(), output_tail.clone()));
                    }
                    let rolled = if *rolled_back {
                        "rolled back"
                    } else {
                        "not rolled back"
                    };
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
