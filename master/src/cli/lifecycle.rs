//! The group lifecycle: `erel restart --group G`, `erel stop --group G` and
//! `erel rollback --group G`, each taking `--hosts ID,..` and `--exclude ID,..`. All run
//! through the one rollout ([`crate::rollout::run`]) with an [`Operation`], so they
//! share its bounds, its failure budget (`max_failed`), its events and its report:
//!
//! | command | what each selected host of the group gets |
//! | --- | --- |
//! | `restart` | a rolling cold restart of the version the host runs (never the group's configured version): canaries first, then at most `max_in_flight` at once, gated on health; a host that fails is started once more with the same version, and the report says so; a host where the release is not running is left as it is, and the report says so |
//! | `stop` | its release stopped, at most `max_in_flight` hosts at once, each with the group's `stop_grace_secs` |
//! | `rollback` | a host that runs the group's version goes to the newest version unpacked before it (or to `--to VERSION`, which every selected host must have), at once (no canary phase), at most `max_in_flight` at once, gated on health; a host on another version is left as it is, and the report says so |
//!
//! Each command also has a one-host form, `erel stop HOST NAME [--grace S]` and
//! `erel restart HOST NAME [VERSION] [--grace S] [--env K=V].. [--user U] [-- ARGV..]`
//! (the agent's own `Stop`, then `Start`, with the settings of the host's group that runs
//! NAME: see [`agent::stop`], [`agent::restart`]). An invocation uses exactly one form;
//! a mix, or neither, is refused naming what was given.
//!
//! There is no `erel delete`: a release leaves a group for good by `state = "stopped"`
//! (or by taking the host out of the group) and a deploy, or by `erel stop --group`;
//! what stays on the host's disk is described in the README (Lifecycle).

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use super::deploy::{check_groups, run_and_report, HostSelection};
use super::{agent, Context};
use crate::client::Connector;
use crate::cluster::{ArchiveLookup, Plan};
use crate::error::{Error, ResultExt as _};
use crate::rollout::{Operation, RolloutOptions};

/// What every group form takes.
#[derive(Debug, Args)]
pub(super) struct GroupArgs {
    /// The group (repeatable).
    #[arg(long = "group", value_name = "G")]
    groups: Vec<String>,
    #[command(flatten)]
    selection: HostSelection,
    /// Print events as JSON lines, then the summary as JSON (with `--dry-run`, the
    /// plan as a JSON array).
    #[arg(long)]
    json: bool,
    /// Print what each selected host would get (the version it would restart or roll
    /// back to, a stop, or why it is left as it is or would fail), touching nothing:
    /// each host is only pinged.
    #[arg(long)]
    dry_run: bool,
    /// Seconds each phase of opening a connection to an agent may take before the host
    /// counts as unreachable [default: 5].
    #[arg(long, value_name = "SECS")]
    connect_timeout: Option<u64>,
    /// `--take-over`, and where the daemons' leases are (`--amqp`).
    #[command(flatten)]
    hold: super::daemon::HoldArgs,
}

impl GroupArgs {
    /// The group form's arguments given, as the command line spells them.
    fn given(&self) -> Vec<String> {
        let mut given: Vec<String> = self.groups.iter().map(|g| format!("--group {g}")).collect();
        if !self.selection.hosts.is_empty() {
            given.push(format!("--hosts {}", self.selection.hosts.join(",")));
        }
        if !self.selection.exclude.is_empty() {
            given.push(format!("--exclude {}", self.selection.exclude.join(",")));
        }
        if self.json {
            given.push("--json".into());
        }
        if self.dry_run {
            given.push("--dry-run".into());
        }
        if let Some(secs) = self.connect_timeout {
            given.push(format!("--connect-timeout {secs}"));
        }
        given
    }
}

/// `erel restart HOST NAME [VERSION] [--grace SECS] [--env K=V].. [--user U] [-- ARGV..]`,
/// or `erel restart --group G [--hosts ID,..] [--exclude ID,..]`.
#[derive(Debug, Args)]
pub(super) struct RestartArgs {
    /// The agent, as ID@ADDR:PORT or a host id from the cluster file (one-host form).
    host: Option<String>,
    /// Release name (one-host form).
    name: Option<String>,
    /// Version to start (one-host form) [default: the version the agent runs or last
    /// ran, else the group's].
    version: Option<String>,
    /// Seconds between SIGTERM and SIGKILL (one-host form; at most the agent's limit,
    /// 600) [default: the group's stop_grace_secs, else 10].
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=erel_proto::rules::MAX_STOP_GRACE.as_secs()))]
    grace: Option<u64>,
    #[command(flatten)]
    settings: agent::StartSettings,
    #[command(flatten)]
    group: GroupArgs,
}

/// `erel rollback --group G [--to VERSION] [--hosts ID,..] [--exclude ID,..]`.
#[derive(Debug, Args)]
pub(super) struct RollbackArgs {
    /// The version every selected host goes to; it must be present on each (refused
    /// otherwise, naming the hosts that lack it) [default: on a host that runs the
    /// group's version, the newest version unpacked before it; other hosts are left
    /// as they are].
    #[arg(long, value_name = "VERSION")]
    to: Option<String>,
    #[command(flatten)]
    group: GroupArgs,
}

/// `erel stop HOST NAME [--grace SECS]`, or `erel stop --group G [--hosts ..]
/// [--exclude ..]`.
#[derive(Debug, Args)]
pub(super) struct StopArgs {
    /// The agent, as ID@ADDR:PORT or a host id from the cluster file (one-host form).
    host: Option<String>,
    /// Release name (one-host form).
    name: Option<String>,
    /// Seconds between SIGTERM and SIGKILL (one-host form; at most the agent's limit,
    /// 600) [default: the group's stop_grace_secs, else 10]; a group uses its
    /// `stop_grace_secs`.
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=erel_proto::rules::MAX_STOP_GRACE.as_secs()))]
    grace: Option<u64>,
    #[command(flatten)]
    group: GroupArgs,
}

/// The form an invocation uses.
#[derive(Debug, PartialEq, Eq)]
enum Form {
    /// `HOST NAME ..`: one agent's release.
    Host { host: String, name: String },
    /// `--group G ..`: the selected hosts of groups.
    Group,
}

/// Picks the one form an invocation uses from what it gave: `host` are the one-host
/// form's positionals, `single` its flags, `group` the group form's arguments.
///
/// # Errors
/// [`Error::Usage`] when both forms are mixed, when neither is given, or when the
/// one-host form lacks NAME; the message quotes what was given.
fn pick_form(
    command: &str,
    host: [Option<&String>; 2],
    single: Vec<String>,
    group: Vec<String>,
) -> crate::Result<Form> {
    let usage = format!("`erel {command} HOST NAME ..` (one agent) or `erel {command} --group G ..` (a group's hosts)");
    let mut one: Vec<String> = host.iter().flatten().map(|a| format!("'{a}'")).collect();
    one.extend(single);
    match (one.is_empty(), group.is_empty()) {
        (false, false) => Err(Error::Usage(format!(
            "erel {command}: use {usage}, not both: {} is the one-host form, {} the group form",
            one.join(" "),
            group.join(" ")
        ))),
        (true, true) => Err(Error::Usage(format!("erel {command}: use {usage}"))),
        (true, false) => Ok(Form::Group),
        (false, true) => match host {
            [Some(host), Some(name)] => Ok(Form::Host {
                host: host.clone(),
                name: name.clone(),
            }),
            [Some(host), None] => Err(Error::Usage(format!(
                "erel {command} {host}: the release NAME is missing after the host; use {usage}"
            ))),
            _ => Err(Error::Usage(format!(
                "erel {command}: {} given without HOST NAME; use {usage}",
                one.join(" ")
            ))),
        },
    }
}

impl StopArgs {
    fn form(&self) -> crate::Result<Form> {
        let single = self.grace.iter().map(|s| format!("--grace {s}")).collect();
        pick_form(
            "stop",
            [self.host.as_ref(), self.name.as_ref()],
            single,
            self.group.given(),
        )
    }
}

impl RestartArgs {
    fn form(&self) -> crate::Result<Form> {
        let mut single: Vec<String> = self.version.iter().map(|v| format!("'{v}'")).collect();
        single.extend(self.grace.iter().map(|s| format!("--grace {s}")));
        single.extend(self.settings.given());
        pick_form(
            "restart",
            [self.host.as_ref(), self.name.as_ref()],
            single,
            self.group.given(),
        )
    }
}

/// Runs `erel restart`: one host's release (stop, then start with its group's
/// settings), or a rolling cold restart of the selected hosts of groups.
pub(super) async fn restart(
    ctx: &Context,
    cluster: Option<&Path>,
    args: RestartArgs,
) -> crate::Result<ExitCode> {
    match args.form()? {
        Form::Host { host, name } => {
            let one = agent::RestartArgs {
                host,
                name,
                version: args.version,
                grace: args.grace,
                settings: args.settings,
            };
            agent::restart(ctx, cluster, one, &args.group.hold).await
        }
        Form::Group => {
            let file = super::cluster_file(cluster);
            run(ctx, &file, args.group, Operation::Restart, None).await
        }
    }
}

/// Runs `erel rollback --group`.
pub(super) async fn rollback(
    ctx: &Context,
    cluster: &Path,
    args: RollbackArgs,
) -> crate::Result<ExitCode> {
    run(ctx, cluster, args.group, Operation::Rollback, args.to).await
}

/// Runs `erel stop`: one host's release, or every selected host of groups.
pub(super) async fn stop(
    ctx: &Context,
    cluster: Option<&Path>,
    args: StopArgs,
) -> crate::Result<ExitCode> {
    match args.form()? {
        Form::Host { host, name } => {
            let one = agent::StopArgs {
                host,
                name,
                grace: args.grace,
            };
            agent::stop(ctx, cluster, one, &args.group.hold).await
        }
        Form::Group => {
            let file = super::cluster_file(cluster);
            run(ctx, &file, args.group, Operation::Stop, None).await
        }
    }
}

/// Runs a group `operation` (a restart, a stop, a rollback) on the selected hosts of
/// the groups `args` names in the cluster file.
async fn run(
    ctx: &Context,
    cluster: &Path,
    args: GroupArgs,
    operation: Operation,
    rollback_to: Option<String>,
) -> crate::Result<ExitCode> {
    // These work on what the hosts hold already (a restart starts again what each
    // host runs, a rollback goes to a version on the host): archives are not opened.
    let plan = &Plan::load_with(cluster, &ArchiveLookup::Unchecked)?;
    if args.groups.is_empty() {
        return Err(Error::Usage(format!(
            "name the group with --group G (groups in {}: {})",
            cluster.display(),
            plan.groups.keys().cloned().collect::<Vec<_>>().join(", ")
        )));
    }
    check_groups(plan, cluster, &args.groups)?;
    let options = RolloutOptions {
        groups: args.groups,
        hosts: args.selection.hosts,
        exclude: args.selection.exclude,
        operation,
        rollback_to,
        ..RolloutOptions::default()
    };
    crate::rollout::check_selection(plan, &options)?;
    let connector = Connector::new(ctx.tls()?, ctx.master_name()).with_connect_timeout(
        args.connect_timeout
            .map_or(crate::client::DEFAULT_CONNECT_TIMEOUT, |secs| {
                Duration::from_secs(secs.max(1))
            }),
    );
    if args.dry_run {
        let planned = crate::rollout::planned_operation(plan, &connector, &options).await?;
        if args.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&planned).context("encoding the plan")?
            );
        } else {
            println!(
                "dry run of revision {} from {}: nothing is touched",
                plan.revision,
                cluster.display()
            );
            for host in &planned {
                println!("{host}");
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    // A group a daemon holds is refused, naming the holder, unless `--take-over`.
    let command = super::deploy::Command {
        cluster,
        name: match operation {
            Operation::Deploy => "erel deploy",
            Operation::Restart => "erel restart",
            Operation::Stop => "erel stop",
            Operation::Rollback => "erel rollback",
        },
        hold: &args.hold,
        json: args.json,
    };
    run_and_report(plan, &connector, &options, command).await
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Stop {
        #[command(flatten)]
        args: StopArgs,
    }

    #[derive(Debug, Parser)]
    struct Restart {
        #[command(flatten)]
        args: RestartArgs,
    }

    fn stop(line: &str) -> crate::Result<Form> {
        let words = std::iter::once("stop").chain(line.split_whitespace());
        Stop::try_parse_from(words).expect("parses").args.form()
    }

    fn restart(line: &str) -> crate::Result<Form> {
        let words = std::iter::once("restart").chain(line.split_whitespace());
        Restart::try_parse_from(words).expect("parses").args.form()
    }

    fn host(host: &str, name: &str) -> Form {
        Form::Host {
            host: host.into(),
            name: name.into(),
        }
    }

    fn refusal(form: crate::Result<Form>) -> String {
        form.expect_err("refused").to_string()
    }

    fn assert_mentions(text: &str, parts: &[&str]) {
        for part in parts {
            assert!(text.contains(part), "{text:?} lacks {part:?}");
        }
    }

    #[test]
    fn stop_takes_a_host_and_a_release_or_a_group() {
        assert_eq!(stop("web-1 app").expect("host form"), host("web-1", "app"));
        assert_eq!(
            stop("web-1 app --grace 3").expect("host form"),
            host("web-1", "app")
        );
        assert_eq!(
            stop("--group web --hosts a,b --exclude c").expect("group form"),
            Form::Group
        );
    }

    #[test]
    fn stop_refuses_a_mix_of_forms_or_neither_naming_what_was_given() {
        let mixed = refusal(stop("web-1 app --group web"));
        assert_mentions(
            &mixed,
            &["erel stop", "not both", "'web-1' 'app'", "--group web"],
        );
        let grace = refusal(stop("--group web --grace 3"));
        assert_mentions(&grace, &["not both", "--grace 3", "--group web"]);
        let selection = refusal(stop("web-1 app --hosts web-1"));
        assert_mentions(&selection, &["not both", "--hosts web-1"]);
        let neither = refusal(stop(""));
        assert_mentions(&neither, &["erel stop HOST NAME", "--group G"]);
        let no_name = refusal(stop("web-1"));
        assert_mentions(&no_name, &["erel stop web-1", "NAME is missing"]);
        let flag_only = refusal(stop("--grace 3"));
        assert_mentions(&flag_only, &["--grace 3 given without HOST NAME"]);
    }

    #[test]
    fn restart_takes_a_host_a_release_and_settings_or_a_group() {
        assert_eq!(
            restart("web-1 app 0.2.0 --grace 3 --env A=B --user app -- bin/app fg")
                .expect("host form"),
            host("web-1", "app")
        );
        assert_eq!(
            restart("--group web --json").expect("group form"),
            Form::Group
        );
        let mixed = refusal(restart("web-1 app 0.2.0 --group web"));
        assert_mentions(
            &mixed,
            &[
                "erel restart",
                "not both",
                "'web-1' 'app' '0.2.0'",
                "--group web",
            ],
        );
        let settings = refusal(restart("--group web --env A=B --user app"));
        assert_mentions(
            &settings,
            &["not both", "--env A=B --user app", "--group web"],
        );
        let timeout = refusal(restart("web-1 app --connect-timeout 2"));
        assert_mentions(&timeout, &["not both", "--connect-timeout 2"]);
        let neither = refusal(restart(""));
        assert_mentions(
            &neither,
            &["erel restart HOST NAME", "erel restart --group G"],
        );
    }
}
