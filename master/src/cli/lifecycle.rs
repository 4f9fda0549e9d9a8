//! The group lifecycle: `erel restart --group G`, `erel stop --group G` and
//! `erel rollback --group G`, each taking `--hosts ID,..` and `--exclude ID,..`. All run
//! through the one rollout ([`crate::rollout::run`]) with an [`Operation`], so they
//! share its bounds, its failure budget (`max_failed`), its events and its report:
//!
//! | command | what each selected host of the group gets |
//! | --- | --- |
//! | `restart` | a rolling cold restart of the group's version: canaries first, then at most `max_in_flight` at once, gated on health; a host that fails is started once more with the same version, and the report says so |
//! | `stop` | its release stopped, at most `max_in_flight` hosts at once, each with the group's `stop_grace_secs` |
//! | `rollback` | the newest other version present on the host, at once (no canary phase), at most `max_in_flight` at once, gated on health |
//!
//! `erel stop HOST NAME` (without `--group`) is the agent's own `Stop` on one host.
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
use crate::error::Error;
use crate::rollout::{Operation, RolloutOptions};

/// What every group form takes.
#[derive(Debug, Args)]
pub struct GroupArgs {
    /// The group (repeatable).
    #[arg(long = "group", value_name = "G")]
    groups: Vec<String>,
    #[command(flatten)]
    selection: HostSelection,
    /// Print events as JSON lines, then the summary as JSON.
    #[arg(long)]
    json: bool,
    /// Seconds each phase of opening a connection to an agent may take before the host
    /// counts as unreachable.
    #[arg(long, default_value_t = crate::client::DEFAULT_CONNECT_TIMEOUT.as_secs(), value_name = "SECS")]
    connect_timeout: u64,
}

/// `erel restart --group G [--hosts ID,..] [--exclude ID,..]`.
#[derive(Debug, Args)]
pub struct RestartArgs {
    #[command(flatten)]
    group: GroupArgs,
}

/// `erel rollback --group G [--hosts ID,..] [--exclude ID,..]`.
#[derive(Debug, Args)]
pub struct RollbackArgs {
    #[command(flatten)]
    group: GroupArgs,
}

/// `erel stop HOST NAME [--grace SECS]`, or `erel stop --group G [--hosts ..]
/// [--exclude ..]`.
#[derive(Debug, Args)]
pub struct StopArgs {
    /// The agent, as ID@ADDR:PORT or a host id from the cluster file (without --group).
    #[arg(required_unless_present = "groups", conflicts_with = "groups")]
    host: Option<String>,
    /// Release name (without --group).
    #[arg(required_unless_present = "groups")]
    name: Option<String>,
    /// Seconds between SIGTERM and SIGKILL (at most the agent's limit, 600), for one
    /// host; a group uses its `stop_grace_secs`.
    #[arg(long, default_value_t = crate::cluster::DEFAULT_STOP_GRACE_SECS, conflicts_with = "groups",
          value_parser = clap::value_parser!(u64).range(0..=erel_proto::rules::MAX_STOP_GRACE.as_secs()))]
    grace: u64,
    #[command(flatten)]
    group: GroupArgs,
}

/// Runs `erel restart --group`.
pub async fn restart(ctx: &Context, cluster: &Path, args: RestartArgs) -> crate::Result<ExitCode> {
    // A restart may have to stage the version on a host that lost it: archives needed.
    let plan = Plan::load(cluster)?;
    run(ctx, cluster, &plan, args.group, Operation::Restart).await
}

/// Runs `erel rollback --group`.
pub async fn rollback(
    ctx: &Context,
    cluster: &Path,
    args: RollbackArgs,
) -> crate::Result<ExitCode> {
    // The versions rolled back to are on the hosts already: archives are not opened.
    let plan = Plan::load_with(cluster, &ArchiveLookup::Unchecked)?;
    run(ctx, cluster, &plan, args.group, Operation::Rollback).await
}

/// Runs `erel stop`: one host's release, or every selected host of groups.
pub async fn stop(
    ctx: &Context,
    cluster: Option<&Path>,
    args: StopArgs,
) -> crate::Result<ExitCode> {
    match (args.host, args.name) {
        (Some(host), Some(name)) if args.group.groups.is_empty() => {
            let one = agent::StopArgs {
                host,
                name,
                grace: args.grace,
            };
            agent::stop(ctx, cluster, one).await
        }
        _ => {
            let file = super::cluster_file(cluster);
            let plan = Plan::load_with(&file, &ArchiveLookup::Unchecked)?;
            run(ctx, &file, &plan, args.group, Operation::Stop).await
        }
    }
}

async fn run(
    ctx: &Context,
    cluster: &Path,
    plan: &Plan,
    args: GroupArgs,
    operation: Operation,
) -> crate::Result<ExitCode> {
    if args.groups.is_empty() {
        return Err(Error::Usage(format!(
            "name the group with --group G (groups in {}: {})",
            cluster.display(),
            plan.groups.keys().cloned().collect::<Vec<_>>().join(", ")
        )));
    }
    check_groups(plan, cluster, &args.groups)?;
    // Manual commands on a group a daemon holds are refused, naming the holder: the
    // check (`ensure_not_held`) belongs here, once the daemons' leases provide it.
    let options = RolloutOptions {
        groups: args.groups,
        hosts: args.selection.hosts,
        exclude: args.selection.exclude,
        operation,
        ..RolloutOptions::default()
    };
    crate::rollout::check_selection(plan, &options)?;
    let connector = Connector::new(ctx.tls()?, ctx.master_name())
        .with_connect_timeout(Duration::from_secs(args.connect_timeout.max(1)));
    run_and_report(plan, &connector, &options, args.json).await
}
