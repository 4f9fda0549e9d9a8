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
use crate::rollout::{
    self, HostFailure, HostOutcome, HostPhase, RolloutEvent, RolloutOptions, RolloutReport,
};
use serde::Serialize;
use std::collections::BTreeMap;

/// `erel deploy`.
#[derive(Debug, Args)]
pub(super) struct DeployArgs {
    /// Only this group (repeatable; default: every group).
    #[arg(long = "group", value_name = "G")]
    groups: Vec<String>,
    #[command(flatten)]
    selection: HostSelection,
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
    /// `--take-over`, and where the daemons' leases are (`--amqp`).
    #[command(flatten)]
    hold: super::daemon::HoldArgs,
}

/// `--hosts ID,ID` and `--exclude ID,ID`: which hosts of the selected groups a group
/// command touches.
#[derive(Debug, Args, Default)]
pub(super) struct HostSelection {
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
pub(super) async fn deploy(
    ctx: &Context,
    cluster: &Path,
    args: DeployArgs,
) -> crate::Result<ExitCode> {
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
        if args.json {
            let json = plan_json(&plan, &args.groups);
            println!(
                "{}",
                serde_json::to_string_pretty(&json).context("encoding the plan")?
            );
        } else {
            print!("{}", describe_plan(&plan, &options, &stops));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let command = Command {
        cluster,
        name: "erel deploy",
        hold: &args.hold,
        json: args.json,
    };
    run_and_report(&plan, &connector(ctx)?, &options, command).await
}

/// The command a rollout runs for: where its cluster file is, how it is named to a
/// daemon that holds the groups, whether it may take them over, how it prints.
pub(super) struct Command<'a> {
    /// The cluster file (a file-mode daemon's lock lies beside it).
    pub(super) cluster: &'a Path,
    /// `erel deploy`, `erel restart`, …, as a holder's refusal names it.
    pub(super) name: &'a str,
    /// `--take-over` and the daemons' broker.
    pub(super) hold: &'a super::daemon::HoldArgs,
    /// Events and the summary as JSON.
    pub(super) json: bool,
}

/// Runs one rollout of `plan` as `options` say, showing its progress and its summary;
/// the exit status `erel deploy`, `restart`, `stop` and `rollback` give.
pub(super) async fn run_and_report(
    plan: &Plan,
    connector: &Connector,
    options: &RolloutOptions,
    command: Command<'_>,
) -> crate::Result<ExitCode> {
    let json = command.json;
    let mut view = if json {
        View::Json
    } else if std::io::stderr().is_terminal() {
        View::Bars(Bars::new())
    } else {
        View::Lines(Instant::now())
    };
    let groups: Vec<String> = if options.groups.is_empty() {
        plan.groups.keys().cloned().collect()
    } else {
        options.groups.clone()
    };
    let hold = super::daemon::ensure_not_held(command.cluster, &groups, command.name, command.hold)
        .await?;
    let mut interrupt = Interrupt::install()?;
    let mut progress = Progress::default();
    let starts = crate::started::Recorder::new(command.cluster, |e| {
        eprintln!("warning: a start is not recorded, status will say argv/env unknown: {e}");
    });
    let rollout = Box::pin(rollout::run(plan, connector, options, |event| {
        progress.record(event);
        starts.done(plan, event);
        view.show(event)
    }));
    let outcome = tokio::select! {
        report = rollout => Some(report),
        signal = interrupt.received() => {
            // Dropping the rollout aborts its tasks at their next await point; a
            // request an agent already received still completes there, so what each
            // host was left running is asked below rather than guessed.
            tracing::debug!(signal, "rollout interrupted");
            None
        }
    };
    // The starts still queued are written before anything is said.
    let _ = tokio::task::spawn_blocking(move || starts.finish()).await;
    hold.release().await;
    view.finish();
    let Some(report) = outcome else {
        let summary = interrupted(plan, &options.groups, &progress, connector).await;
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(&summary).context("encoding the summary")?
            );
        } else {
            print!("{}", summary.text());
        }
        return Ok(ExitCode::from(INTERRUPTED_EXIT));
    };
    let report = report?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).context("encoding the report")?
        );
    } else {
        // Printed lines already showed each failed release's output with its failure.
        let tails_shown = matches!(view, View::Lines(_));
        print!("{}", summary_table(&report, tails_shown));
    }
    Ok(if report.complete() {
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
        if let RolloutEvent::GroupHalted {
            group,
            reason,
            untouched,
        } = event
        {
            for host in untouched {
                let bar = self.bar(group, host);
                bar.finish_with_message(format!("not touched: group halted ({reason})"));
            }
            return;
        }
        let Some((group, host)) = event.group_and_host() else {
            return;
        };
        let last = match event {
            RolloutEvent::HostPhase { phase, .. } => {
                self.bar(group, host).set_message(phase.to_string());
                return;
            }
            RolloutEvent::HostDrain { outcome, .. } => {
                self.bar(group, host).set_message(outcome.to_string());
                return;
            }
            RolloutEvent::HostVerdict { .. } => {
                // The evidence stays on screen, above the bars.
                if let Some(line) = event_line(event) {
                    let _ = self.multi.println(line);
                }
                self.bar(group, host);
                return;
            }
            RolloutEvent::HostDone { version, pid, .. } => {
                format!("done: runs {version} (pid {pid})")
            }
            RolloutEvent::HostSkipped { version, why, .. } => match why {
                Some(why) => format!("left as it is: {why}"),
                None => format!("up to date: runs {version}"),
            },
            RolloutEvent::HostStopped { release, why, .. } => format!("stopped {release}: {why}"),
            RolloutEvent::HostFailed { failure, .. } => {
                let rolled = failure.rollback_words();
                let reason = &failure.reason;
                format!("FAILED, {rolled}: {reason}")
            }
            RolloutEvent::GroupStarted { .. }
            | RolloutEvent::GroupHalted { .. }
            | RolloutEvent::GroupDone { .. } => return,
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
pub(super) fn event_line(event: &RolloutEvent) -> Option<String> {
    Some(match event {
        RolloutEvent::GroupStarted {
            group,
            release,
            version,
            hosts,
            operation,
        } => match operation {
            crate::rollout::Operation::Deploy => {
                format!("group {group}: rolling {release} {version} to {hosts} host(s)")
            }
            crate::rollout::Operation::Restart => format!(
                "group {group}: restarting {release} on {hosts} host(s), each with the version it runs"
            ),
            crate::rollout::Operation::Stop => format!("group {group}: stopping {release} on {hosts} host(s)"),
            crate::rollout::Operation::Rollback => format!(
                "group {group}: rolling {release} back on {hosts} host(s), from {version} where it runs"
            ),
        },
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
            why,
        } => match why {
            Some(why) => format!("{group}/{host}: left as it is: {why}"),
            None => format!("{group}/{host}: up to date, runs {version}"),
        },
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
pub(super) fn indent(text: &str, prefix: &str) -> String {
    text.lines()
        .map(|l| format!("{prefix}{l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The final table: one row per host, then each failed release's output unless
/// `tails_shown` (the printed event lines showed it).
fn summary_table(report: &RolloutReport, tails_shown: bool) -> String {
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
                HostOutcome::Left { why, version: runs } => {
                    version = match runs.is_empty() {
                        true => format!("{} (none)", group.release),
                        false => format!("{} {runs}", group.release),
                    };
                    format!("left as it is: {why}")
                }
                HostOutcome::Failed(failure) => {
                    let HostFailure {
                        phase,
                        reason,
                        output_tail,
                        ..
                    } = failure;
                    if !tails_shown && !output_tail.trim().is_empty() {
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
                version,
                result,
            ]);
        }
    }
    for host in &report.unanswered {
        let result = match &host.outcome {
            HostOutcome::Failed(failure) => format!(
                "FAILED while {}: {}; what it runs is unknown",
                failure.phase, failure.reason
            ),
            other => format!("{other:?}"),
        };
        rows.push([
            host.host.clone(),
            "(waiting)".to_string(),
            host.addr.clone(),
            "?".to_string(),
            result,
        ]);
    }
    let mut out = table(&rows);
    for (host, tail) in tails {
        out.push_str(&format!("\n{host}: the release's last output:\n"));
        out.push_str(&indent(tail.trim_end(), "  "));
        out.push('\n');
    }
    let elsewhere = off_the_file(report);
    let verdict = if !report.unanswered.is_empty() {
        let ids: Vec<&str> = report.unanswered.iter().map(|h| h.host.as_str()).collect();
        format!(
            "revision {}: NOT converged ({} failed): waiting host(s) {} did not answer, what they run is unknown\n",
            report.revision,
            report.failed(),
            ids.join(", ")
        )
    } else if report.converged() && !elsewhere.is_empty() {
        format!("revision {}: {}\n", report.revision, elsewhere.join("; "))
    } else if report.converged() && report.stopped() > 0 {
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

/// For each group, the hosts that ended on a version other than the cluster file's (a
/// rollback, or a host a rollback left on an older one): "group web: h1, h2 run 1.0.0;
/// the cluster file still asks for 2.0.0". Empty when every host ended on the file's
/// version or stopped.
fn off_the_file(report: &RolloutReport) -> Vec<String> {
    let mut lines = Vec::new();
    for group in &report.groups {
        let mut by_version: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
        for host in &group.hosts {
            let now = match &host.outcome {
                HostOutcome::Switched { version, .. } => version.as_str(),
                HostOutcome::Left { version, .. } => version.as_str(),
                _ => continue,
            };
            if now != group.version {
                by_version.entry(now).or_default().push(&host.host);
            }
        }
        for (version, hosts) in by_version {
            let runs = match version {
                "" => "run no version".to_string(),
                v => format!("run {v}"),
            };
            lines.push(format!(
                "group {}: {} {runs}; the cluster file still asks for {}",
                group.group,
                hosts.join(", "),
                group.version
            ));
        }
    }
    lines
}

/// Left-aligned columns; the last column is not padded.
pub(super) fn table<const N: usize>(rows: &[[String; N]]) -> String {
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
        // Stops come first, as the rollout does them first.
        let left = match stops {
            Ok(stops) => stops
                .get(&group.name)
                .into_iter()
                .flatten()
                .map(|host| {
                    format!(
                        "  stop      {} on {host}: the host left the group\n",
                        group.release
                    )
                })
                .collect(),
            Err(why) => format!(
                "  (hosts that left the group, whose {} is stopped, not checked: {why})\n",
                group.release
            ),
        };
        out.push_str(&describe_group(plan, group, options, &left));
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

/// One group of the plan in words; `left` are its stop lines for hosts that left it,
/// put first (after the header), as the rollout stops those first.
fn describe_group(plan: &Plan, group: &GroupPlan, options: &RolloutOptions, left: &str) -> String {
    let hosts: Vec<_> = plan
        .hosts_in(&group.name)
        .into_iter()
        .filter(|h| options.hosts.is_empty() || options.hosts.contains(&h.id))
        .filter(|h| !options.exclude.contains(&h.id))
        .collect();
    if group.state == GroupState::Stopped {
        let mut out = format!(
            "\ngroup {}: {} stopped (state = \"stopped\"), at most {} host(s) at once, \
             stop_grace_secs {}\n{left}",
            group.name,
            group.release,
            group.max_in_flight,
            group.stop_grace.as_secs()
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
        "\ngroup {}: {} {}\n{left}",
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
    let user = group.user.as_deref().unwrap_or("the agent's own");
    out.push_str(&format!(
        "  runs as   {user} user; stop_grace_secs {}\n",
        group.stop_grace.as_secs()
    ));
    let mut probes = Vec::new();
    if let Some(port) = &group.health.tcp {
        probes.push(format!("TCP port {port} answers"));
    }
    if let Some(http) = &group.health.http {
        probes.push(format!(
            "HTTP GET port {}{} answers 2xx",
            http.port, http.path
        ));
    }
    let probe = match probes.is_empty() {
        true => String::new(),
        false => format!(
            "{}, {} consecutive pass(es); ",
            probes.join(" and "),
            group.health.passes
        ),
    };
    out.push_str(&format!(
        "  health    {probe}up {}s without a restart, within {}s\n",
        group.health.min_up.as_secs(),
        group.health.deadline.as_secs()
    ));
    if let Some(drain) = &group.drain {
        out.push_str(&format!(
            "  drain     POST port {}{} before each stop of a running release, answer within {}s\n",
            drain.port,
            drain.path,
            drain.timeout.as_secs()
        ));
    }
    let budget = match group.max_failed {
        0 => "the first failure halts the group".to_string(),
        n => format!("up to {n} host(s) may fail or be unreachable before the group halts"),
    };
    out.push_str(&format!(
        "  rollout   {} canary host(s) first, then at most {} at once; {budget}\n",
        group.canaries, group.max_in_flight
    ));
    if let Some(at) = group.restarted_at.as_ref().map(rfc3339) {
        out.push_str(&format!(
            "  restart   hosts whose release has run since before {at} (restarted_at)\n"
        ));
    }
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

/// An instant as RFC 3339 text.
fn rfc3339(at: &time::OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| at.to_string())
}

/// What `--dry-run --json` prints: the plan `describe_plan` puts in words.
#[derive(Debug, Serialize)]
struct PlanJson {
    /// The cluster file.
    cluster: String,
    revision: u64,
    groups: Vec<GroupJson>,
    /// Hosts in no group: pinged, nothing deployed.
    waiting: Vec<String>,
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
    /// `running` or `stopped` (the release is stopped on every host).
    state: &'static str,
    /// The user the release runs as, if the group names one.
    user: Option<String>,
    /// Seconds between SIGTERM and SIGKILL when the release is stopped.
    stop_grace_secs: u64,
    canaries: usize,
    max_in_flight: usize,
    /// Hosts that may fail or be unreachable before the group halts.
    max_failed: usize,
    health: HealthJson,
    /// The drain request sent before a running release is stopped, if any.
    drain: Option<DrainJson>,
    /// `restarted_at` (RFC 3339, UTC): hosts whose release has run since before it are
    /// restarted; `null` when the group does not say.
    restarted_at: Option<String>,
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
    /// The HTTP probe's port (or `$VARIABLE`), if any.
    http: Option<String>,
    /// The HTTP probe's request path, if there is an HTTP probe.
    path: Option<String>,
    /// Consecutive passes of every probe needed.
    passes: u32,
    min_up_secs: u64,
    deadline_secs: u64,
}

#[derive(Debug, Serialize)]
struct DrainJson {
    /// The drain request's port, or `$VARIABLE` naming it.
    http: String,
    path: String,
    timeout_secs: u64,
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
            state: match group.state {
                GroupState::Running => "running",
                GroupState::Stopped => "stopped",
            },
            user: group.user.clone(),
            stop_grace_secs: group.stop_grace.as_secs(),
            max_failed: group.max_failed,
            drain: group.drain.as_ref().map(|d| DrainJson {
                http: d.port.to_string(),
                path: d.path.clone(),
                timeout_secs: d.timeout.as_secs(),
            }),
            restarted_at: group.restarted_at.as_ref().map(rfc3339),
            canaries: group.canaries,
            max_in_flight: group.max_in_flight,
            health: HealthJson {
                tcp: group.health.tcp.as_ref().map(ToString::to_string),
                http: group.health.http.as_ref().map(|h| h.port.to_string()),
                path: group.health.http.as_ref().map(|h| h.path.clone()),
                passes: group.health.passes,
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
        waiting: plan
            .hosts
            .iter()
            .filter(|h| h.groups.is_empty())
            .map(|h| h.id.clone())
            .collect(),
    }
}

/// The exit status of a deploy stopped by SIGINT or SIGTERM: 128 + SIGINT, as shells
/// report a command ended by Ctrl-C.
const INTERRUPTED_EXIT: u8 = 130;

/// How long a host in flight at an interruption gets to say what it runs now.
const INTERRUPTED_PING: Duration = Duration::from_secs(5);

/// SIGINT (Ctrl-C) and SIGTERM, caught for the duration of a deploy.
struct Interrupt {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Interrupt {
    fn install() -> crate::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        let what = "installing the SIGINT and SIGTERM handlers";
        Ok(Interrupt {
            int: signal(SignalKind::interrupt()).context(what)?,
            term: signal(SignalKind::terminate()).context(what)?,
        })
    }

    /// The name of the first signal received.
    async fn received(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
        }
    }
}

/// What the deploy has seen of each host, from its events, keyed by (group, host).
#[derive(Default)]
struct Progress {
    /// The last phase of each host not finished yet.
    phases: HashMap<(String, String), HostPhase>,
    /// Hosts finished: what happened, in the summary's words.
    finished: HashMap<(String, String), Finished>,
}

/// How a host finished.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
enum Finished {
    /// Switched to the desired version, healthy.
    Switched {
        /// The version it runs.
        version: String,
    },
    /// Already ran the desired version.
    UpToDate {
        /// The version it runs.
        version: String,
    },
    /// Failed.
    Failed {
        /// The failure in words: phase, rollback, reason.
        reason: String,
    },
    /// Its release was stopped.
    Stopped {
        /// Why, in words.
        why: String,
    },
}

impl Progress {
    fn record(&mut self, event: &RolloutEvent) {
        let key = |group: &str, host: &str| (group.to_string(), host.to_string());
        match event {
            RolloutEvent::HostPhase { group, host, phase } => {
                self.phases.insert(key(group, host), *phase);
            }
            RolloutEvent::HostDone {
                group,
                host,
                version,
                ..
            } => self.finish(
                key(group, host),
                Finished::Switched {
                    version: version.clone(),
                },
            ),
            RolloutEvent::HostSkipped {
                group,
                host,
                version,
                ..
            } => self.finish(
                key(group, host),
                Finished::UpToDate {
                    version: version.clone(),
                },
            ),
            RolloutEvent::HostStopped {
                group, host, why, ..
            } => self.finish(
                key(group, host),
                Finished::Stopped {
                    why: why.to_string(),
                },
            ),
            RolloutEvent::HostFailed {
                group,
                host,
                failure,
                ..
            } => self.finish(
                key(group, host),
                Finished::Failed {
                    reason: format!(
                        "FAILED while {}, {}: {}",
                        failure.phase,
                        failure.rollback_words(),
                        failure.reason
                    ),
                },
            ),
            RolloutEvent::GroupStarted { .. }
            | RolloutEvent::GroupHalted { .. }
            | RolloutEvent::GroupDone { .. }
            | RolloutEvent::HostVerdict { .. }
            | RolloutEvent::HostDrain { .. } => {}
        }
    }

    fn finish(&mut self, key: (String, String), finished: Finished) {
        self.phases.remove(&key);
        self.finished.insert(key, finished);
    }
}

/// What an interrupted deploy did and did not do, as it prints it.
#[derive(Debug, Serialize)]
struct InterruptedSummary {
    /// Always true: tells this object from a finished deploy's report.
    interrupted: bool,
    /// The cluster file's revision.
    revision: u64,
    /// Hosts that finished: switched, up to date or failed.
    done: Vec<DoneHost>,
    /// Hosts whose switch had begun (their old version possibly stopped), with what
    /// they run now.
    in_flight: Vec<InFlightHost>,
    /// Hosts whose running release was not touched (some may have the new version
    /// staged beside it).
    untouched: Vec<UntouchedHost>,
}

#[derive(Debug, Serialize)]
struct DoneHost {
    group: String,
    host: String,
    #[serde(flatten)]
    finished: Finished,
}

#[derive(Debug, Serialize)]
struct InFlightHost {
    group: String,
    host: String,
    /// The phase it was in when the deploy stopped.
    phase: HostPhase,
    /// The desired version.
    desired_version: String,
    /// The version of the group's release the agent reports now (running or last run).
    now_version: Option<String>,
    /// Its state now, in the words `status` uses; `unknown` when the agent did not answer.
    now_state: String,
    /// Why the agent could not be asked, when it could not.
    error: Option<String>,
}

#[derive(Debug, Serialize)]
struct UntouchedHost {
    group: String,
    host: String,
    /// The last phase reached (pinging, staging, staged), if any.
    phase: Option<HostPhase>,
}

/// Sorts the hosts of the groups rolled out by what `progress` says of them, and asks
/// each host in flight what it runs now.
async fn interrupted(
    plan: &Plan,
    only: &[String],
    progress: &Progress,
    connector: &Connector,
) -> InterruptedSummary {
    let mut summary = InterruptedSummary {
        interrupted: true,
        revision: plan.revision,
        done: Vec::new(),
        in_flight: Vec::new(),
        untouched: Vec::new(),
    };
    // Hosts in flight are asked at once, each within INTERRUPTED_PING.
    let mut asking = tokio::task::JoinSet::new();
    for group in plan.groups.values() {
        if !only.is_empty() && !only.contains(&group.name) {
            continue;
        }
        for host in plan.hosts_in(&group.name) {
            let key = (group.name.clone(), host.id.clone());
            if let Some(finished) = progress.finished.get(&key) {
                summary.done.push(DoneHost {
                    group: group.name.clone(),
                    host: host.id.clone(),
                    finished: finished.clone(),
                });
                continue;
            }
            let phase = progress.phases.get(&key).copied();
            match phase {
                Some(phase) if phase.changes_host() => {
                    let (connector, addr) = (connector.clone(), host.host_addr());
                    let (index, release) = (summary.in_flight.len(), group.release.clone());
                    asking.spawn(
                        async move { (index, now_running(&connector, addr, &release).await) },
                    );
                    summary.in_flight.push(InFlightHost {
                        group: group.name.clone(),
                        host: host.id.clone(),
                        phase,
                        desired_version: group.version.clone(),
                        now_version: None,
                        now_state: "unknown".to_string(),
                        error: None,
                    });
                }
                _ => summary.untouched.push(UntouchedHost {
                    group: group.name.clone(),
                    host: host.id.clone(),
                    phase,
                }),
            }
        }
    }
    while let Some(answered) = asking.join_next().await {
        let Ok((index, (now_version, now_state, error))) = answered else {
            continue;
        };
        if let Some(host) = summary.in_flight.get_mut(index) {
            (host.now_version, host.now_state, host.error) = (now_version, now_state, error);
        }
    }
    summary
}

/// The version and state of `release` on `host` now: (version, state words, error).
async fn now_running(
    connector: &Connector,
    host: crate::client::HostAddr,
    release: &str,
) -> (Option<String>, String, Option<String>) {
    let asked = tokio::time::timeout(INTERRUPTED_PING, async {
        let mut client = connector.connect(&host).await?;
        client
            .command::<erel_proto::Pong>(erel_proto::Request::Ping(erel_proto::Ping {}))
            .await
    })
    .await;
    match asked {
        Ok(Ok(pong)) => match pong.releases.iter().find(|r| r.name == release) {
            Some(status) => (status.version.clone(), super::state_words(status), None),
            None => (None, "not installed".to_string(), None),
        },
        Ok(Err(e)) => (None, "unknown".to_string(), Some(e.to_string())),
        Err(_) => (
            None,
            "unknown".to_string(),
            Some(format!("no answer within {}s", INTERRUPTED_PING.as_secs())),
        ),
    }
}

impl InterruptedSummary {
    fn text(&self) -> String {
        let mut out = format!(
            "INTERRUPTED: the deploy of revision {} stopped before it finished\n",
            self.revision
        );
        for host in &self.done {
            let what = match &host.finished {
                Finished::Switched { version } => format!("done, runs {version}"),
                Finished::UpToDate { version } => format!("up to date, runs {version}"),
                Finished::Failed { reason } => reason.clone(),
                Finished::Stopped { why } => format!("stopped: {why}"),
            };
            out.push_str(&format!(
                "  done       {}/{}: {what}\n",
                host.group, host.host
            ));
        }
        for host in &self.in_flight {
            let now = match (&host.now_version, &host.error) {
                (_, Some(error)) => format!("what it runs now is unknown ({error})"),
                (Some(version), None) => format!("now {version} {}", host.now_state),
                (None, None) => format!("now {}", host.now_state),
            };
            let verdict = if host.now_version.as_deref() == Some(host.desired_version.as_str())
                && host.now_state.starts_with("running")
            {
                "switched, but its health was NOT verified"
            } else {
                "left HALF-SWITCHED: deploy again, or roll it back"
            };
            out.push_str(&format!(
                "  IN FLIGHT  {}/{}: was {} when interrupted; {now}: {verdict}\n",
                host.group, host.host, host.phase
            ));
        }
        for host in &self.untouched {
            let staged = match host.phase {
                Some(HostPhase::Staged) => " (the new version is staged beside it)",
                _ => "",
            };
            out.push_str(&format!(
                "  untouched  {}/{}: its running release was not touched{staged}\n",
                host.group, host.host
            ));
        }
        out.push_str(&format!(
            "{} done, {} in flight, {} untouched\n",
            self.done.len(),
            self.in_flight.len(),
            self.untouched.len()
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::{GroupReport, HostPhase, HostReport};

    fn host(id: &str, outcome: HostOutcome) -> HostReport {
        HostReport {
            host: id.into(),
            addr: "127.0.0.1:1".into(),
            outcome,
        }
    }

    fn web(version: &str, hosts: Vec<HostReport>) -> GroupReport {
        GroupReport {
            group: "web".into(),
            release: "beat".into(),
            version: version.into(),
            halted: None,
            hosts,
        }
    }

    /// The summary's last line.
    fn verdict(report: &RolloutReport) -> String {
        let table = summary_table(report, true);
        table.lines().last().expect("a verdict").to_string()
    }

    #[test]
    fn the_verdict_says_which_hosts_run_another_version_than_the_file() {
        let back = |id: &str| {
            host(
                id,
                HostOutcome::Switched {
                    from: Some("2.0.0".into()),
                    version: "1.0.0".into(),
                    pid: 7,
                },
            )
        };
        let left = host(
            "h3",
            HostOutcome::Left {
                why: "does not run 2.0.0".into(),
                version: "1.0.0".into(),
            },
        );
        let report = RolloutReport {
            revision: 2,
            unanswered: Vec::new(),
            groups: vec![web("2.0.0", vec![back("h1"), back("h2"), left])],
        };
        assert_eq!(
            verdict(&report),
            "revision 2: group web: h1, h2, h3 run 1.0.0; the cluster file still asks for 2.0.0"
        );
        let on_file = RolloutReport {
            revision: 2,
            unanswered: Vec::new(),
            groups: vec![web("2.0.0", vec![host("h1", HostOutcome::UpToDate)])],
        };
        assert_eq!(
            verdict(&on_file),
            "revision 2: every host runs its desired version"
        );
    }

    #[test]
    fn an_unanswered_waiting_host_is_a_failure_the_verdict_names() {
        let lost = host(
            "h2",
            HostOutcome::Failed(HostFailure::new(
                HostPhase::Pinging,
                "unreachable at 127.0.0.1:1: connection refused",
            )),
        );
        let report = RolloutReport {
            revision: 3,
            unanswered: vec![lost],
            groups: Vec::new(),
        };
        assert!(!report.complete());
        assert_eq!(report.failed(), 1);
        let table = summary_table(&report, true);
        assert!(
            table.contains("h2")
                && table.contains("(waiting)")
                && table.contains("unreachable at 127.0.0.1:1"),
            "{table}"
        );
        assert_eq!(
            verdict(&report),
            "revision 3: NOT converged (1 failed): waiting host(s) h2 did not answer, what they run is unknown"
        );
    }

    #[test]
    fn a_failed_release_output_is_shown_once() {
        let failure = HostFailure {
            output_tail: "config missing\n".into(),
            ..HostFailure::new(HostPhase::Verifying, "exited with code 3")
        };
        let report = RolloutReport {
            revision: 1,
            unanswered: Vec::new(),
            groups: vec![GroupReport {
                group: "web".into(),
                release: "beat".into(),
                version: "0.2.0".into(),
                halted: None,
                hosts: vec![HostReport {
                    host: "web-1".into(),
                    addr: "127.0.0.1:1".into(),
                    outcome: HostOutcome::Failed(failure.clone()),
                }],
            }],
        };
        let event = RolloutEvent::HostFailed {
            group: "web".into(),
            host: "web-1".into(),
            addr: "127.0.0.1:1".into(),
            failure,
        };
        let line = event_line(&event).expect("a line");
        // Printed event lines, then the table: the output once, with the failure.
        let printed = format!("{line}\n{}", summary_table(&report, true));
        assert_eq!(printed.matches("config missing").count(), 1, "{printed}");
        // Live bars show no event lines: the table shows the output.
        let table = summary_table(&report, false);
        assert_eq!(table.matches("config missing").count(), 1, "{table}");
    }

    #[test]
    fn the_dry_run_names_restarted_at_in_words_and_json() {
        let text =
            "revision = 2\n[[host]]\nid = \"a-1\"\naddr = \"127.0.0.1:1\"\ngroup = \"web\"\n\
            [group.web]\nrelease = \"pong\"\nversion = \"2\"\narchive = \"p.tar.gz\"\n\
            restarted_at = \"2026-11-29T13:00:00+01:00\"\n";
        let plan = Plan::parse(
            text,
            "cluster.toml",
            &crate::cluster::ArchiveLookup::Unchecked,
        )
        .expect("valid");
        let words = describe_group(&plan, &plan.groups["web"], &RolloutOptions::default(), "");
        assert!(
            words.contains(
                "restart   hosts whose release has run since before 2026-11-29T12:00:00Z"
            ),
            "{words}"
        );
        let json = serde_json::to_value(plan_json(&plan, &[])).expect("json");
        assert_eq!(json["groups"][0]["restarted_at"], "2026-11-29T12:00:00Z");

        let plain = text.replace("restarted_at = \"2026-11-29T13:00:00+01:00\"\n", "");
        let plan = Plan::parse(
            &plain,
            "cluster.toml",
            &crate::cluster::ArchiveLookup::Unchecked,
        )
        .expect("valid");
        let words = describe_group(&plan, &plan.groups["web"], &RolloutOptions::default(), "");
        assert!(!words.contains("restart "), "{words}");
        let json = serde_json::to_value(plan_json(&plan, &[])).expect("json");
        assert!(json["groups"][0]["restarted_at"].is_null(), "{json}");
    }
}
