//! `erel deploy [--cluster FILE] [--group G].. [--hosts ID,..] [--exclude ID,..]
//! [--dry-run] [--json]`: the rolling cold deploy, with a live line per host and a
//! summary table. Exit 0 only when every selected host runs its desired version,
//! healthy (or has its release stopped, where the config says so).

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
use crate::cluster::{GroupPlan, GroupState, Plan};
use crate::error::Error;
use crate::rollout::{self, HostFailure, HostOutcome, RolloutEvent, RolloutOptions, RolloutReport};

/// `erel deploy`.
#[derive(Debug, Args)]
pub struct DeployArgs {
    /// Only this group (repeatable; default: every group).
    #[arg(long = "group", value_name = "G")]
    groups: Vec<String>,
    #[command(flatten)]
    selection: HostSelection,
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
}

/// `--hosts ID,ID` and `--exclude ID,ID`: which hosts of the selected groups a group
/// command touches.
#[derive(Debug, Args, Default)]
pub struct HostSelection {
    /// Only these hosts of the selected groups (comma-separated ids; repeatable).
    #[arg(long, value_name = "ID,..", value_delimiter = ',')]
    pub hosts: Vec<String>,
    /// Never these hosts (comma-separated ids; repeatable).
    #[arg(long, value_name = "ID,..", value_delimiter = ',')]
    pub exclude: Vec<String>,
}

/// Refuses a `--group` the plan does not define, naming the groups it does.
pub(super) fn check_groups(plan: &Plan, cluster: &Path, groups: &[String]) -> crate::Result<()> {
    for group in groups {
        if !plan.groups.contains_key(group) {
            return Err(Error::Usage(format!(
                "{}: no group '{group}' (groups: {})",
                cluster.display(),
                plan.groups.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
    }
    Ok(())
}

/// Runs `erel deploy`.
pub async fn deploy(ctx: &Context, cluster: &Path, args: DeployArgs) -> crate::Result<ExitCode> {
    let plan = Plan::load(cluster)?;
    check_groups(&plan, cluster, &args.groups)?;
    let options = RolloutOptions {
        groups: args.groups.clone(),
        hosts: args.selection.hosts.clone(),
        exclude: args.selection.exclude.clone(),
        ..RolloutOptions::default()
    };
    rollout::check_selection(&plan, &options)?;
    let connector = |ctx: &Context| -> crate::Result<Connector> {
        Ok(Connector::new(ctx.tls()?, ctx.master_name())
            .with_connect_timeout(Duration::from_secs(args.connect_timeout.max(1))))
    };
    if args.dry_run {
        // Hosts that left a group are found by asking them; without certificates or
        // agents the plan is still printed, saying what could not be checked.
        let stops = match connector(ctx) {
            Ok(connector) => rollout::planned_stops(&plan, &connector, &options)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        print!("{}", describe_plan(&plan, &options, &stops));
        return Ok(ExitCode::SUCCESS);
    }
    run_and_report(&plan, &connector(ctx)?, &options, args.json).await
}

/// Runs one rollout of `plan` as `options` say, showing its progress and its summary;
/// the exit status `erel deploy`, `restart`, `stop` and `rollback` give.
pub(super) async fn run_and_report(
    plan: &Plan,
    connector: &Connector,
    options: &RolloutOptions,
    json: bool,
) -> crate::Result<ExitCode> {
    let mut view = if json {
        View::Json
    } else if std::io::stderr().is_terminal() {
        View::Bars(Bars::new())
    } else {
        View::Lines(Instant::now())
    };
    let report = rollout::run(plan, connector, options, |event| view.show(event)).await?;
    view.finish();
    if json {
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
            RolloutEvent::HostStopped {
                group,
                host,
                release,
                why,
            } => (group, host, format!("stopped {release}: {why}")),
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
            RolloutEvent::HostVerdict { group, host, .. } => {
                // The evidence stays on screen, above the bars.
                if let Some(line) = event_line(event) {
                    let _ = self.multi.println(line);
                }
                self.bar(group, host);
                return;
            }
            RolloutEvent::HostDrain {
                group,
                host,
                outcome,
            } => {
                self.bar(group, host).set_message(outcome.to_string());
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
        RolloutEvent::HostVerdict {
            group,
            host,
            version,
            verdict,
            evidence,
        } => format!("{group}/{host}: {version} {verdict}: {evidence}"),
        RolloutEvent::HostDrain {
            group,
            host,
            outcome,
        } => format!("{group}/{host}: {outcome}"),
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
        RolloutEvent::HostStopped {
            group,
            host,
            release,
            why,
        } => format!("{group}/{host}: stopped {release} ({why})"),
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
            stopped,
        } => {
            let stopped = match stopped {
                0 => String::new(),
                n => format!(", {n} stopped"),
            };
            format!(
                "group {group}: {switched} switched, {skipped} already up to date, {failed} failed{stopped}"
            )
        }
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
            let mut version = format!("{} {}", group.release, group.version);
            let result = match &host.outcome {
                HostOutcome::Switched {
                    from,
                    version: now,
                    pid,
                } => {
                    version = format!("{} {now}", group.release);
                    match from.as_deref() {
                        Some(from) if from == now => format!("restarted (pid {pid})"),
                        from => {
                            format!("switched from {} (pid {pid})", from.unwrap_or("nothing"))
                        }
                    }
                }
                HostOutcome::Stopped { why } => {
                    version = format!("{} (stopped)", group.release);
                    format!("stopped: {why}")
                }
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
                version,
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
    let verdict = if report.converged() && report.stopped() > 0 {
        format!(
            "revision {}: every host runs its desired version or has its release stopped ({} stopped)\n",
            report.revision,
            report.stopped()
        )
    } else if report.converged() {
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

/// What `--dry-run` prints: per group, what goes where and in which order, and what
/// is stopped (`stops`: hosts that left each group, or why they could not be found).
fn describe_plan(
    plan: &Plan,
    options: &RolloutOptions,
    stops: &Result<HashMap<String, Vec<String>>, String>,
) -> String {
    let mut out = format!("{} (revision {})\n", plan.origin, plan.revision);
    for group in plan.groups.values() {
        if !options.groups.is_empty() && !options.groups.contains(&group.name) {
            continue;
        }
        out.push_str(&describe_group(plan, group, options));
        match stops {
            Ok(stops) => {
                for host in stops.get(&group.name).into_iter().flatten() {
                    out.push_str(&format!(
                        "  stop      {} on {host}: the host left the group\n",
                        group.release
                    ));
                }
            }
            Err(why) => out.push_str(&format!(
                "  (hosts that left the group, whose {} is stopped, not checked: {why})\n",
                group.release
            )),
        }
    }
    let waiting: Vec<&str> = plan
        .hosts
        .iter()
        .filter(|h| h.groups.is_empty())
        .map(|h| h.id.as_str())
        .collect();
    if !waiting.is_empty() {
        out.push_str(&format!(
            "
waiting (in no group, nothing deployed): {}
",
            waiting.join(", ")
        ));
    }
    out
}

fn describe_group(plan: &Plan, group: &GroupPlan, options: &RolloutOptions) -> String {
    let hosts: Vec<_> = plan
        .hosts_in(&group.name)
        .into_iter()
        .filter(|h| options.hosts.is_empty() || options.hosts.contains(&h.id))
        .filter(|h| !options.exclude.contains(&h.id))
        .collect();
    if group.state == GroupState::Stopped {
        let mut out = format!(
            "\ngroup {}: {} stopped (state = \"stopped\"), at most {} host(s) at once\n",
            group.name, group.release, group.max_in_flight
        );
        for host in &hosts {
            out.push_str(&format!(
                "  stop      {} on {}: the group is stopped\n",
                group.release, host.id
            ));
        }
        return out;
    }
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
    let budget = match group.max_failed {
        0 => "the first failure halts the group".to_string(),
        n => format!("up to {n} host(s) may fail or be unreachable before the group halts"),
    };
    out.push_str(&format!(
        "  rollout   {} canary host(s) first, then at most {} at once; {budget}\n",
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
