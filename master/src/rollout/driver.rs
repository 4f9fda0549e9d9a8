//! The rollout's I/O, with `health` for verification. It observes, asks
//! [`super::decide`] what to do, and does it. Groups roll out concurrently; within a
//! group, hosts are pinged and staged in parallel, and switched as the
//! [`GroupSchedule`] allows.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use erel_proto::ErrorKind;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::task::JoinSet;

use super::decide::{
    assess, assess_restart, phase_budget, restart_due, rollback_target, staging_width, wants_probe,
    Action, Assessment, GroupSchedule, HostFault, HostSwitch, Observed, StageAction, Staging,
};
use super::health::{drain_before_stop, probe_all, release_status, watch_health};
use super::{
    count, emit, EventSink, GroupReport, HostFailure, HostOutcome, HostPhase, HostReport,
    Operation, RolloutEvent, RolloutOptions, RolloutReport, Shared, SharedRef, StopReason,
};
use crate::client::{Connector, HostSession, SharedFile};
use crate::cluster::{Archive, GroupPlan, GroupState, HostPlan, Plan};
use crate::error::{Error, Result};

/// Brings the hosts of `plan` to their desired versions; see [`super::run`].
pub(crate) async fn rollout(
    plan: &Plan,
    connector: &Connector,
    options: &RolloutOptions,
    events: &EventSink,
) -> Result<RolloutReport> {
    let selected = select_groups(plan, &options.groups)?;
    let chosen = select_hosts(plan, &selected, options)?;
    let shared: SharedRef = Arc::new(Shared {
        connector: connector.clone(),
        options: options.clone(),
        events: events.clone(),
    });
    refuse_starting_stopped(plan, &selected, options.operation)?;
    let (mut left, unanswered) = match options.operation {
        Operation::Deploy => left_hosts(&shared, plan, &selected, &chosen).await,
        _ => (HashMap::new(), Vec::new()),
    };
    let mut tasks = JoinSet::new();
    for (index, group) in selected.into_iter().enumerate() {
        let needs_archive =
            group.state == GroupState::Running && options.operation == Operation::Deploy;
        if needs_archive && group.archive.is_none() {
            return Err(Error::Cluster {
                file: plan.origin.clone(),
                field: format!("group.{}.archive", group.name),
                message: "the archive was not checked (internal: plan loaded without archives)"
                    .to_string(),
            });
        }
        let archive = group.archive.clone();
        let hosts: Vec<HostPlan> = plan
            .hosts_in(&group.name)
            .into_iter()
            .filter(|h| chosen.contains(&h.id))
            .cloned()
            .collect();
        let left = left.remove(&group.name).unwrap_or_default();
        let group = group.clone();
        let shared = shared.clone();
        tasks.spawn(async move { (index, run_group(shared, group, archive, hosts, left).await) });
    }
    let mut groups = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let (index, report) = joined.map_err(|e| Error::Protocol {
            host: "-".to_string(),
            message: format!("a rollout task failed: {e}"),
        })?;
        groups.push((index, report));
    }
    groups.sort_by_key(|(index, _)| *index);
    Ok(RolloutReport {
        revision: plan.revision,
        groups: groups.into_iter().map(|(_, g)| g).collect(),
        unanswered,
    })
}

/// What a deploy of `plan` would stop on hosts that left a group, touching nothing:
/// group name → host ids, in file order. Pings the hosts as [`rollout`] does.
pub(crate) async fn planned_stops(
    plan: &Plan,
    connector: &Connector,
    options: &RolloutOptions,
) -> Result<HashMap<String, Vec<String>>> {
    let selected = select_groups(plan, &options.groups)?;
    let chosen = select_hosts(plan, &selected, options)?;
    let (events, _) = mpsc::unbounded_channel();
    let shared: SharedRef = Arc::new(Shared {
        connector: connector.clone(),
        options: options.clone(),
        events,
    });
    let (left, _) = left_hosts(&shared, plan, &selected, &chosen).await;
    Ok(left
        .into_iter()
        .map(|(group, hosts)| (group, hosts.into_iter().map(|h| h.id).collect()))
        .collect())
}

/// What `erel restart|stop|rollback --group G --dry-run` says one host would get.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PlannedHost {
    /// Group name.
    pub group: String,
    /// Host id.
    pub host: String,
    /// Its agent's address.
    pub addr: String,
    /// `restart`, `rollback`, `stop`, `leave` (nothing done, `why` says why) or `fail`
    /// (the command would fail on it, `why` says why: unreachable, nothing to go to).
    pub action: &'static str,
    /// The version it runs (or ran last), when the agent said.
    pub from: Option<String>,
    /// The version it would run afterwards (`restart`, `rollback`).
    pub to: Option<String>,
    /// Why it is left or would fail.
    pub why: Option<String>,
}

impl std::fmt::Display for PlannedHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{} ({}): ", self.group, self.host, self.addr)?;
        let from = self.from.as_deref().unwrap_or("nothing");
        match (self.action, &self.to, &self.why) {
            ("restart", Some(to), _) => write!(f, "restart {to}"),
            ("rollback", Some(to), _) => write!(f, "rollback {from} -> {to}"),
            ("stop", _, _) => write!(f, "stop (runs {from})"),
            ("leave", _, Some(why)) => write!(f, "left as it is: {why}"),
            (_, _, Some(why)) => write!(f, "would FAIL: {why}"),
            (action, _, None) => write!(f, "{action}"),
        }
    }
}

/// What a group operation (`restart`, `stop`, `rollback`) would do to each selected
/// host, touching nothing: each host is pinged and the same decisions as the
/// operation's are made ([`assess_restart`], [`rollback_target`]; a stop stops a
/// release that runs or is meant to). Hosts in file order, groups as selected.
///
/// # Errors
/// The selection is refused ([`check_selection`]), or a group with `state =
/// "stopped"` would be started (`restart`, `rollback`).
pub(crate) async fn planned_operation(
    plan: &Plan,
    connector: &Connector,
    options: &RolloutOptions,
) -> Result<Vec<PlannedHost>> {
    let selected = select_groups(plan, &options.groups)?;
    let chosen = select_hosts(plan, &selected, options)?;
    refuse_starting_stopped(plan, &selected, options.operation)?;
    let mut looks = JoinSet::new();
    let mut order = Vec::new();
    for group in &selected {
        for host in plan.hosts_in(&group.name) {
            if !chosen.contains(&host.id) {
                continue;
            }
            order.push((group.name.clone(), host.id.clone()));
            let (group, host) = ((*group).clone(), host.clone());
            let connector = connector.clone();
            let options = options.clone();
            looks.spawn(async move {
                let planned = plan_host(&group, &host, connector, &options).await;
                ((group.name.clone(), host.id.clone()), planned)
            });
        }
    }
    let mut planned = HashMap::new();
    while let Some(joined) = looks.join_next().await {
        if let Ok((key, host)) = joined {
            planned.insert(key, host);
        }
    }
    Ok(order
        .into_iter()
        .filter_map(|key| planned.remove(&key))
        .collect())
}

async fn plan_host(
    group: &GroupPlan,
    host: &HostPlan,
    connector: Connector,
    options: &RolloutOptions,
) -> PlannedHost {
    let mut planned = PlannedHost {
        group: group.name.clone(),
        host: host.id.clone(),
        addr: host.addr.clone(),
        action: "fail",
        from: None,
        to: None,
        why: None,
    };
    let mut session = HostSession::new(host.host_addr(), connector);
    let pong = match session.ping(phase_budget(HostPhase::Pinging, group)).await {
        Ok(pong) => pong,
        Err(e) => {
            planned.why = Some(unreachable(host, &e));
            return planned;
        }
    };
    let status = release_status(&pong.releases, &group.release);
    planned.from = status.and_then(|s| s.version.clone());
    let decided = match options.operation {
        Operation::Restart => Ok(assess_restart(status, &group.release)),
        Operation::Rollback => rollback_target(
            status,
            &group.release,
            &group.version,
            options.rollback_to.as_deref(),
        ),
        Operation::Stop | Operation::Deploy => {
            let runs = status
                .is_some_and(|s| s.desired_running || s.state == erel_proto::ReleaseState::Running);
            if runs {
                planned.action = "stop";
            } else {
                planned.action = "leave";
                planned.why = Some(format!("{} is stopped already", group.release));
            }
            return planned;
        }
    };
    match decided {
        Ok((Assessment::Leave { why }, _)) => {
            planned.action = "leave";
            planned.why = Some(why);
        }
        Ok((_, to)) => {
            planned.action = match options.operation {
                Operation::Restart => "restart",
                _ => "rollback",
            };
            planned.to = Some(to);
        }
        Err(why) => planned.why = Some(why),
    }
    planned
}

/// A `restart` or `rollback` would start a group marked `state = "stopped"`: refused.
fn refuse_starting_stopped(
    plan: &Plan,
    selected: &[&GroupPlan],
    operation: Operation,
) -> Result<()> {
    let starts = matches!(operation, Operation::Restart | Operation::Rollback);
    for group in selected {
        if starts && group.state == GroupState::Stopped {
            return Err(Error::Usage(format!(
                "{}: group {} is stopped (state = \"stopped\"): a {} would start it; \
                 set state = \"running\" and deploy instead",
                plan.origin,
                group.name,
                operation_name(operation)
            )));
        }
    }
    Ok(())
}

/// Checks `--group`, `--hosts` and `--exclude` against `plan` without touching a host.
pub(crate) fn check_selection(plan: &Plan, options: &RolloutOptions) -> Result<()> {
    let selected = select_groups(plan, &options.groups)?;
    select_hosts(plan, &selected, options).map(|_| ())
}

fn select_groups<'a>(plan: &'a Plan, wanted: &[String]) -> Result<Vec<&'a GroupPlan>> {
    if wanted.is_empty() {
        return Ok(plan.groups.values().collect());
    }
    wanted
        .iter()
        .map(|name| {
            plan.groups.get(name).ok_or_else(|| Error::Cluster {
                file: plan.origin.clone(),
                field: format!("group.{name}"),
                message: format!(
                    "no such group (groups: {})",
                    plan.groups.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            })
        })
        .collect()
}

/// The hosts a rollout may touch: `--hosts` (default all) minus `--exclude`. Every id
/// named must be a host of the cluster file, and of a selected group.
fn select_hosts(
    plan: &Plan,
    groups: &[&GroupPlan],
    options: &RolloutOptions,
) -> Result<HashSet<String>> {
    let members: BTreeSet<&str> = groups
        .iter()
        .flat_map(|g| plan.hosts_in(&g.name))
        .map(|h| h.id.as_str())
        .collect();
    let group_names: Vec<&str> = groups.iter().map(|g| g.name.as_str()).collect();
    for (flag, ids) in [("--hosts", &options.hosts), ("--exclude", &options.exclude)] {
        let unknown = ids_where(ids, |id| plan.host(id).is_none());
        if !unknown.is_empty() {
            return Err(Error::Usage(format!(
                "{}: {flag}: no host {} in the cluster file (hosts: {})",
                plan.origin,
                unknown.join(", "),
                plan.hosts
                    .iter()
                    .map(|h| h.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let outside = ids_where(ids, |id| !members.contains(id));
        if !outside.is_empty() {
            return Err(Error::Usage(format!(
                "{}: {flag}: {} not in group(s) {}",
                plan.origin,
                outside.join(", "),
                group_names.join(", ")
            )));
        }
    }
    Ok(plan
        .hosts
        .iter()
        .filter(|h| options.hosts.is_empty() || options.hosts.contains(&h.id))
        .filter(|h| !options.exclude.contains(&h.id))
        .map(|h| h.id.clone())
        .collect())
}

/// The `ids` for which `refused` holds, in their order.
fn ids_where(ids: &[String], refused: impl Fn(&str) -> bool) -> Vec<&str> {
    ids.iter()
        .map(String::as_str)
        .filter(|id| refused(id))
        .collect()
}

/// The releases the groups of `host` run.
fn releases_of<'a>(plan: &'a Plan, host: &HostPlan) -> BTreeSet<&'a str> {
    plan.groups_of(host)
        .into_iter()
        .map(|g| g.release.as_str())
        .collect()
}

/// Hosts that run (or are meant to run) a release a selected group names, while no
/// group of the host names that release any more: they left the group. Found by
/// pinging every host of the cluster that may run such a release (all of them unless
/// `--hosts` narrows it, minus `--exclude`); by group, in file order. Only releases
/// some group of the plan names are considered: a release no group names was not put
/// there by erel's config (or was taken out of it with its group), so it is never
/// touched. A host that does not answer is left alone here: its own group reports it;
/// a waiting host (in no group) has none, so it is pinged even when no group is
/// selected and, unanswered, is returned second, as failed while pinging.
async fn left_hosts(
    shared: &SharedRef,
    plan: &Plan,
    groups: &[&GroupPlan],
    chosen: &HashSet<String>,
) -> (HashMap<String, Vec<HostPlan>>, Vec<HostReport>) {
    let options = &shared.options;
    let candidates: Vec<HostPlan> = plan
        .hosts
        .iter()
        .filter(|h| options.hosts.is_empty() || chosen.contains(&h.id))
        .filter(|h| !options.exclude.contains(&h.id))
        .filter(|h| {
            let own = releases_of(plan, h);
            h.groups.is_empty() || groups.iter().any(|g| !own.contains(g.release.as_str()))
        })
        .cloned()
        .collect();
    let mut pings = JoinSet::new();
    for host in candidates {
        let connector = shared.connector.clone();
        pings.spawn(async move {
            let mut session = HostSession::new(host.host_addr(), connector);
            let pong = session.ping(crate::client::budget::PING_BUDGET).await;
            (host, pong)
        });
    }
    let mut found: HashMap<String, BTreeSet<String>> = HashMap::new();
    let mut unanswered: HashMap<String, HostReport> = HashMap::new();
    while let Some(joined) = pings.join_next().await {
        let (host, pong) = match joined {
            Ok((host, Ok(pong))) => (host, pong),
            Ok((host, Err(e))) if host.groups.is_empty() => {
                let failure = HostFailure::new(HostPhase::Pinging, unreachable(&host, &e));
                unanswered.insert(
                    host.id.clone(),
                    HostReport {
                        host: host.id.clone(),
                        addr: host.addr.clone(),
                        outcome: HostOutcome::Failed(failure),
                    },
                );
                continue;
            }
            _ => continue,
        };
        for group in left_groups(plan, &host, groups, &pong.releases) {
            found
                .entry(group.name.clone())
                .or_default()
                .insert(host.id.clone());
        }
    }
    let left = found
        .into_iter()
        .map(|(group, ids)| {
            let hosts = plan
                .hosts
                .iter()
                .filter(|h| ids.contains(&h.id))
                .cloned()
                .collect();
            (group, hosts)
        })
        .collect();
    let unanswered = plan
        .hosts
        .iter()
        .filter_map(|h| unanswered.remove(&h.id))
        .collect();
    (left, unanswered)
}

/// The selected groups whose release `host` runs (or is meant to run, per `releases`,
/// its agent's answer) while none of the host's own groups names that release: the
/// host left them. A waiting host (in no group) has left every group whose release it
/// runs. For a release several selected groups name, the first in `groups` answers
/// (its `stop_grace_secs` and drain apply to the stop).
fn left_groups<'a>(
    plan: &Plan,
    host: &HostPlan,
    groups: &[&'a GroupPlan],
    releases: &[erel_proto::ReleaseStatus],
) -> Vec<&'a GroupPlan> {
    let own = releases_of(plan, host);
    releases
        .iter()
        .filter(|s| s.desired_running || s.state == erel_proto::ReleaseState::Running)
        .filter(|s| !own.contains(s.name.as_str()))
        .filter_map(|s| groups.iter().copied().find(|g| g.release == s.name))
        .collect()
}

/// The operation as commands name it.
fn operation_name(operation: Operation) -> &'static str {
    match operation {
        Operation::Deploy => "deploy",
        Operation::Restart => "restart",
        Operation::Stop => "stop",
        Operation::Rollback => "rollback",
    }
}

/// What one group's tasks share.
struct GroupCtx {
    shared: SharedRef,
    group: GroupPlan,
    /// The group's archive; `None` when the operation stages nothing.
    archive: Option<Archive>,
    /// The archive as the group's pushes read it: once for all of them.
    push_source: Option<SharedFile>,
}

impl GroupCtx {
    fn phase(&self, host: &str, phase: HostPhase) {
        emit(
            &self.shared.events,
            RolloutEvent::HostPhase {
                group: self.group.name.clone(),
                host: host.to_string(),
                phase,
            },
        );
    }

    fn failed(&self, host: &HostPlan, failure: &HostFailure) -> HostOutcome {
        emit(
            &self.shared.events,
            RolloutEvent::HostFailed {
                group: self.group.name.clone(),
                host: host.id.clone(),
                addr: host.addr.clone(),
                failure: failure.clone(),
            },
        );
        HostOutcome::Failed(failure.clone())
    }
}

type Staged = std::result::Result<HostSession, HostFailure>;

/// What a host was found to need: its session, the assessment, the version to go to.
type Inspected = (HostSession, Assessment, String);

async fn run_group(
    shared: SharedRef,
    group: GroupPlan,
    archive: Option<Archive>,
    hosts: Vec<HostPlan>,
    left: Vec<HostPlan>,
) -> GroupReport {
    let push_source = archive
        .as_ref()
        .map(|archive| SharedFile::new(&archive.path, archive.sha256));
    let ctx = Arc::new(GroupCtx {
        shared,
        group,
        archive,
        push_source,
    });
    let events = &ctx.shared.events;
    let name = ctx.group.name.clone();
    let operation = ctx.shared.options.operation;
    emit(
        events,
        RolloutEvent::GroupStarted {
            group: name.clone(),
            release: ctx.group.release.clone(),
            version: ctx.group.version.clone(),
            hosts: hosts.len(),
            operation,
        },
    );
    let mut outcomes: HashMap<String, HostOutcome> = HashMap::new();
    let mut halted: Option<String> = None;
    let group_stop = match operation {
        Operation::Stop => Some(StopReason::Asked),
        Operation::Deploy if ctx.group.state == GroupState::Stopped => {
            Some(StopReason::GroupStopped)
        }
        _ => None,
    };

    // Releases of hosts that left the group are stopped first; with the whole group
    // being stopped, every host is.
    let mut to_stop: Vec<(HostPlan, StopReason)> = left
        .iter()
        .map(|h| (h.clone(), StopReason::LeftGroup))
        .collect();
    if let Some(why) = group_stop {
        to_stop.extend(hosts.iter().map(|h| (h.clone(), why)));
    }
    let mut stop_failures = Vec::new();
    if !to_stop.is_empty() {
        let (reason, failed) = stop_hosts(&ctx, to_stop, &mut outcomes).await;
        halted = reason;
        stop_failures = failed;
    }

    if group_stop.is_none() && halted.is_none() {
        halted = roll_hosts(&ctx, &hosts, stop_failures, &mut outcomes).await;
    }

    let mut untouched = Vec::new();
    let reports: Vec<HostReport> = left
        .iter()
        .chain(hosts.iter().filter(|h| !left.iter().any(|l| l.id == h.id)))
        .map(|host| {
            let outcome = outcomes.remove(&host.id).unwrap_or_else(|| {
                untouched.push(host.id.clone());
                HostOutcome::Untouched
            });
            HostReport {
                host: host.id.clone(),
                addr: host.addr.clone(),
                outcome,
            }
        })
        .collect();
    if let Some(reason) = &halted {
        emit(
            events,
            RolloutEvent::GroupHalted {
                group: name.clone(),
                reason: reason.clone(),
                untouched,
            },
        );
    }
    emit(
        events,
        RolloutEvent::GroupDone {
            group: name.clone(),
            switched: count(&reports, HostOutcome::is_switched),
            skipped: count(&reports, |o| *o == HostOutcome::UpToDate),
            failed: count(&reports, HostOutcome::is_failed),
            stopped: count(&reports, HostOutcome::is_stopped),
        },
    );
    GroupReport {
        group: name,
        release: ctx.group.release.clone(),
        version: ctx.group.version.clone(),
        halted,
        hosts: reports,
    }
}

/// Pings the group's hosts, then stages and switches those that need it as the
/// schedule allows; `failed_before` are hosts whose failures (stopping what they ran
/// after leaving the group) already spent the budget. Returns why the group halted.
async fn roll_hosts(
    ctx: &Arc<GroupCtx>,
    hosts: &[HostPlan],
    failed_before: Vec<String>,
    outcomes: &mut HashMap<String, HostOutcome>,
) -> Option<String> {
    let events = &ctx.shared.events;
    let name = &ctx.group.name;
    let by_id: HashMap<String, HostPlan> =
        hosts.iter().map(|h| (h.id.clone(), h.clone())).collect();

    // 1. Ping every host.
    let mut pings = JoinSet::new();
    let mut ping_tasks = HashMap::new();
    for host in hosts {
        let ctx = ctx.clone();
        let host = host.clone();
        let id = host.id.clone();
        let task = pings.spawn(async move {
            let outcome = inspect(&ctx, &host).await;
            (host.id.clone(), outcome)
        });
        ping_tasks.insert(task.id(), id);
    }
    let mut inspected: HashMap<String, Inspected> = HashMap::new();
    let mut unreachable = Vec::new();
    while let Some(joined) = pings.join_next().await {
        let (id, outcome) = match joined {
            Ok(done) => done,
            // A task that panicked: its host failed in its first phase, like one that
            // did not answer.
            Err(e) => {
                let Some(id) = ping_tasks.get(&e.id()) else {
                    continue;
                };
                let failure =
                    HostFailure::new(HostPhase::Pinging, format!("inspection failed: {e}"));
                (id.clone(), Err(failure))
            }
        };
        let Some(host) = by_id.get(&id) else { continue };
        match outcome {
            Ok((_, Assessment::UpToDate, version)) => {
                emit(
                    events,
                    RolloutEvent::HostSkipped {
                        group: name.clone(),
                        host: id.clone(),
                        version,
                        why: None,
                    },
                );
                outcomes.insert(id, HostOutcome::UpToDate);
            }
            Ok((_, Assessment::Leave { why }, version)) => {
                emit(
                    events,
                    RolloutEvent::HostSkipped {
                        group: name.clone(),
                        host: id.clone(),
                        version: version.clone(),
                        why: Some(why.clone()),
                    },
                );
                outcomes.insert(id, HostOutcome::Left { why, version });
            }
            Ok(found) => {
                inspected.insert(id, found);
            }
            Err(failure) => {
                let outcome = ctx.failed(host, &failure);
                outcomes.insert(id.clone(), outcome);
                unreachable.push((id, host.addr.clone(), failure.reason));
            }
        }
    }

    // A rollback to a named version is all or nothing: a host that lacks it (or did
    // not answer) refuses it for every host, before any switch.
    if let (Operation::Rollback, Some(to)) = (
        ctx.shared.options.operation,
        ctx.shared.options.rollback_to.as_deref(),
    ) {
        if !unreachable.is_empty() {
            let why: Vec<&str> = unreachable.iter().map(|(_, _, why)| why.as_str()).collect();
            return Some(format!(
                "--to {to} refused, no host rolled back: {}",
                why.join("; ")
            ));
        }
    }

    // 2. and 3. Stage and switch, as the schedule allows.
    let order: Vec<String> = hosts
        .iter()
        .filter(|h| inspected.contains_key(&h.id))
        .map(|h| h.id.clone())
        .collect();
    let canaries = match ctx.shared.options.operation {
        Operation::Rollback => 0,
        _ => ctx.group.canaries,
    };
    let mut schedule = GroupSchedule::new(order.clone(), canaries, ctx.group.max_in_flight)
        .with_max_failed(ctx.group.max_failed);
    for id in failed_before {
        schedule.fail(&id, HostFault::StopBeforeRollout);
    }
    for (id, addr, reason) in unreachable {
        schedule.fail(
            &id,
            HostFault::Inspection {
                addr: &addr,
                reason: &reason,
            },
        );
    }
    if !schedule.is_finished() {
        schedule = switch_group(ctx, hosts, order, inspected, schedule, outcomes).await;
    }
    schedule.halt_reason().map(str::to_owned)
}

/// Stops the group's release on `hosts`, at most `max_in_flight` at once, halting
/// once more than `max_failed` of them failed. Returns why it halted, if it did, and
/// the hosts that failed.
async fn stop_hosts(
    ctx: &Arc<GroupCtx>,
    hosts: Vec<(HostPlan, StopReason)>,
    outcomes: &mut HashMap<String, HostOutcome>,
) -> (Option<String>, Vec<String>) {
    let order: Vec<String> = hosts.iter().map(|(h, _)| h.id.clone()).collect();
    let by_id: HashMap<String, (HostPlan, StopReason)> = hosts
        .into_iter()
        .map(|(h, why)| (h.id.clone(), (h, why)))
        .collect();
    let mut schedule =
        GroupSchedule::new(order, 0, ctx.group.max_in_flight).with_max_failed(ctx.group.max_failed);
    let mut stopping = JoinSet::new();
    let mut tasks: HashMap<tokio::task::Id, String> = HashMap::new();
    let mut failed = Vec::new();
    loop {
        for id in schedule.begin_next() {
            let Some((host, why)) = by_id.get(&id).cloned() else {
                continue;
            };
            let ctx = ctx.clone();
            let task = stopping.spawn(async move {
                let outcome = stop_host(&ctx, &host, why).await;
                (host, why, outcome)
            });
            tasks.insert(task.id(), id);
        }
        if schedule.is_finished() {
            break;
        }
        let Some(joined) = stopping.join_next().await else {
            break;
        };
        let (host, why, outcome) = match joined {
            Ok(done) => done,
            Err(e) => {
                let Some(id) = tasks.get(&e.id()).cloned() else {
                    continue;
                };
                let Some((host, why)) = by_id.get(&id).cloned() else {
                    continue;
                };
                let failure =
                    HostFailure::new(HostPhase::Stopping, format!("the stop failed: {e}"));
                (host, why, Err(failure))
            }
        };
        match outcome {
            Ok(()) => {
                outcomes.insert(host.id.clone(), HostOutcome::Stopped { why });
                schedule.finish(&host.id, Ok(()));
            }
            Err(failure) => {
                outcomes.insert(host.id.clone(), ctx.failed(&host, &failure));
                failed.push(host.id.clone());
                let fault = HostFault::Stop {
                    addr: &host.addr,
                    reason: &failure.reason,
                };
                schedule.finish(&host.id, Err(fault));
            }
        }
    }
    (schedule.halt_reason().map(str::to_owned), failed)
}

/// Stops the group's release on one host, unless it is stopped already (the agent
/// neither runs it nor means to).
async fn stop_host(
    ctx: &GroupCtx,
    host: &HostPlan,
    why: StopReason,
) -> std::result::Result<(), HostFailure> {
    let group = &ctx.group;
    ctx.phase(&host.id, HostPhase::Pinging);
    let mut session = HostSession::new(host.host_addr(), ctx.shared.connector.clone());
    let pong = session
        .ping(phase_budget(HostPhase::Pinging, group))
        .await
        .map_err(|e| HostFailure::new(HostPhase::Pinging, unreachable(host, &e)))?;
    let runs = release_status(&pong.releases, &group.release)
        .is_some_and(|s| s.desired_running || s.state == erel_proto::ReleaseState::Running);
    if !runs {
        return Ok(());
    }
    ctx.phase(&host.id, HostPhase::Stopping);
    drain_before_stop(group, &ctx.shared.events, host, &mut session).await;
    let limit = phase_budget(HostPhase::Stopping, group);
    session
        .stop(&group.release, group.stop_grace, limit)
        .await
        .map_err(|e| HostFailure::new(HostPhase::Stopping, e.to_string()))?;
    emit(
        &ctx.shared.events,
        RolloutEvent::HostStopped {
            group: group.name.clone(),
            host: host.id.clone(),
            release: group.release.clone(),
            why,
        },
    );
    Ok(())
}

/// Stages every host needing it (ahead, bounded), then switches them as the schedule
/// allows. Returns the schedule, which knows why the group halted, if it did.
async fn switch_group(
    ctx: &Arc<GroupCtx>,
    hosts: &[HostPlan],
    order: Vec<String>,
    mut inspected: HashMap<String, Inspected>,
    mut schedule: GroupSchedule,
    outcomes: &mut HashMap<String, HostOutcome>,
) -> GroupSchedule {
    let by_id: HashMap<&str, &HostPlan> = hosts.iter().map(|h| (h.id.as_str(), h)).collect();

    // 2. Stage ahead on every host, a bounded number at once.
    let per_push = ctx.archive.as_ref().map_or(0, |archive| {
        let size = std::fs::metadata(&archive.path).map_or(u64::MAX, |m| m.len());
        crate::client::push_buffer_bytes(size)
    });
    let width = staging_width(
        ctx.shared.options.staging_parallel,
        ctx.group.max_in_flight,
        per_push,
    );
    let permits = Arc::new(Semaphore::new(width));
    let (failed_tx, mut staging_failures) = mpsc::unbounded_channel::<(String, HostFailure)>();
    let mut staging = JoinSet::new();
    let mut waiting: HashMap<String, (oneshot::Receiver<Staged>, Assessment, String)> =
        HashMap::new();
    // A rollback goes to a version already on the host, a restart starts again the one
    // the host runs: nothing to stage.
    let stages = ctx.shared.options.operation == Operation::Deploy;
    // The canaries are staged first and alone: the first switch waits on them, while
    // every other host has at least the canaries' `min_up_secs` to be staged in. Each
    // canary's staging holds a sender of `canaries_staging`; the others start once the
    // last one is gone.
    let (canaries_staging, gate) = watch::channel(());
    for id in &order {
        let Some((session, assessment, version)) = inspected.remove(id) else {
            continue;
        };
        let (tx, rx) = oneshot::channel();
        match &assessment {
            Assessment::Switch { staged, .. } if stages => {
                let staged = *staged;
                let ctx = ctx.clone();
                let permits = permits.clone();
                let failed_tx = failed_tx.clone();
                let id = id.clone();
                let (holds, waits) = match schedule.is_canary(&id) {
                    true => (Some(canaries_staging.clone()), None),
                    false => (None, Some(gate.clone())),
                };
                staging.spawn(async move {
                    let _holds = holds;
                    if let Some(gate) = waits {
                        canaries_staged(gate).await;
                    }
                    let Ok(_permit) = permits.acquire_owned().await else {
                        return;
                    };
                    let result = stage(&ctx, session, staged).await;
                    if let Err(failure) = &result {
                        let _ = failed_tx.send((id, failure.clone()));
                    }
                    let _ = tx.send(result);
                });
            }
            _ => {
                let _ = tx.send(Ok(session));
            }
        }
        waiting.insert(id.clone(), (rx, assessment, version));
    }
    drop((failed_tx, canaries_staging));

    // 3. Switch, canaries first, at most max_in_flight at once.
    let mut tasks: HashMap<tokio::task::Id, String> = HashMap::new();
    let mut begun: HashSet<String> = HashSet::new();
    let mut switching = JoinSet::new();
    loop {
        for id in schedule.begin_next() {
            let Some((rx, assessment, version)) = waiting.remove(&id) else {
                continue;
            };
            let Some(host) = by_id.get(id.as_str()).map(|h| (*h).clone()) else {
                continue;
            };
            begun.insert(id.clone());
            let ctx = ctx.clone();
            let task = switching.spawn(async move {
                let outcome = switch_host(&ctx, &host, assessment, &version, rx).await;
                (host, version, outcome)
            });
            tasks.insert(task.id(), id);
        }
        if schedule.is_finished() {
            break;
        }
        tokio::select! {
            Some(joined) = switching.join_next(), if !switching.is_empty() => {
                let (host, version, outcome) = match joined {
                    Ok(done) => done,
                    Err(e) => {
                        // A task that panicked: its host failed.
                        if let Some(id) = tasks.get(&e.id()) {
                            schedule.finish(id, Err(HostFault::SwitchTask));
                        }
                        continue;
                    }
                };
                match outcome {
                    Ok((pid, from)) => {
                        emit(&ctx.shared.events, RolloutEvent::HostDone {
                            group: ctx.group.name.clone(),
                            host: host.id.clone(),
                            version: version.clone(),
                            pid,
                        });
                        outcomes.insert(host.id.clone(), HostOutcome::Switched { from, version, pid });
                        schedule.finish(&host.id, Ok(()));
                    }
                    Err(failure) => {
                        let outcome = ctx.failed(&host, &failure);
                        outcomes.insert(host.id.clone(), outcome);
                        schedule.finish(&host.id, Err(HostFault::Switch { reason: &failure.reason }));
                    }
                }
            }
            Some((id, failure)) = staging_failures.recv() => {
                if begun.contains(&id) {
                    continue; // its switch task reports it
                }
                if let Some(host) = by_id.get(id.as_str()) {
                    let outcome = ctx.failed(host, &failure);
                    outcomes.insert(id.clone(), outcome);
                    waiting.remove(&id);
                    schedule.fail(&id, HostFault::Switch { reason: &failure.reason });
                }
            }
            else => break,
        }
    }
    staging.abort_all();
    schedule
}

/// Waits until every sender of `gate` is gone (no value is ever sent on it): the
/// canaries' staging ended, however it ended.
async fn canaries_staged(mut gate: watch::Receiver<()>) {
    while gate.changed().await.is_ok() {}
}

/// Pings a host and decides what it needs.
async fn inspect(ctx: &GroupCtx, host: &HostPlan) -> std::result::Result<Inspected, HostFailure> {
    ctx.phase(&host.id, HostPhase::Pinging);
    let mut session = HostSession::new(host.host_addr(), ctx.shared.connector.clone());
    let pong = session
        .ping(phase_budget(HostPhase::Pinging, &ctx.group))
        .await
        .map_err(|e| HostFailure::new(HostPhase::Pinging, unreachable(host, &e)))?;
    let answered_at = time::OffsetDateTime::now_utc();
    let status = release_status(&pong.releases, &ctx.group.release);
    let version = ctx.group.version.clone();
    match ctx.shared.options.operation {
        Operation::Restart => {
            let (assessment, current) = assess_restart(status, &ctx.group.release);
            return Ok((session, assessment, current));
        }
        Operation::Rollback => {
            let to = ctx.shared.options.rollback_to.as_deref();
            return match rollback_target(status, &ctx.group.release, &version, to) {
                Ok((assessment, target)) => Ok((session, assessment, target)),
                Err(why) => Err(HostFailure::new(HostPhase::Pinging, why)),
            };
        }
        Operation::Deploy | Operation::Stop => {}
    }
    let probe_ok = if wants_probe(status, &ctx.group.version) {
        let answers = probe_all(&ctx.group, host, ctx.shared.options.probe_timeout).await;
        (!answers.is_empty()).then(|| answers.iter().all(|a| a.passed))
    } else {
        None
    };
    let assessment = assess(status, &version, &ctx.group.health, probe_ok);
    let restart = assessment == Assessment::UpToDate
        && ctx
            .group
            .restarted_at
            .is_some_and(|at| restart_due(status, &version, at, answered_at));
    if restart {
        // restart_due holds only while the group's version runs: that is what restarts.
        let (assessment, current) = assess_restart(status, &ctx.group.release);
        return Ok((session, assessment, current));
    }
    Ok((session, assessment, version))
}

fn unreachable(host: &HostPlan, error: &Error) -> String {
    let text = error.to_string();
    if text.contains(&host.addr) {
        format!("unreachable: {text}")
    } else {
        format!("unreachable at {}: {text}", host.addr)
    }
}

/// Pushes (skipped when present) and unpacks the archive, as [`Staging`] decides.
async fn stage(ctx: &GroupCtx, mut session: HostSession, staged: bool) -> Staged {
    let id = session.host().id.clone();
    ctx.phase(&id, HostPhase::Staging);
    let (Some(archive), Some(push_source)) = (&ctx.archive, &ctx.push_source) else {
        return Err(HostFailure::new(
            HostPhase::Staging,
            "the group's archive was not loaded",
        ));
    };
    let dest = GroupPlan::archive_dest(archive);
    let dir = ctx.group.version_dir();
    let limit = phase_budget(HostPhase::Staging, &ctx.group);
    let (mut staging, mut action) = Staging::begin(staged);
    loop {
        let observed = match action {
            StageAction::Staged => break,
            StageAction::Fail(failure) => return Err(failure),
            StageAction::Push => {
                let pushed = session.push(push_source, &dest).await;
                observe(pushed)
            }
            StageAction::Unpack => {
                observe(session.unpack(&dest, &dir, archive.sha256, limit).await)
            }
        };
        action = staging.next(observed);
    }
    ctx.phase(&id, HostPhase::Staged);
    Ok(session)
}

/// What a staging command's outcome is to [`Staging`].
fn observe<T>(outcome: Result<T>) -> Observed {
    match outcome {
        Ok(_) => Observed::Ok,
        Err(e) if e.agent_kind() == Some(ErrorKind::NotFound) => Observed::Missing(e.to_string()),
        Err(e) => Observed::failed(e),
    }
}

/// The switch, as [`HostSwitch`] decides it: stop old, start new, verify; roll back on
/// failure. `Ok((pid, from))`.
async fn switch_host(
    ctx: &GroupCtx,
    host: &HostPlan,
    assessment: Assessment,
    version: &str,
    staged: oneshot::Receiver<Staged>,
) -> std::result::Result<(u32, Option<String>), HostFailure> {
    let mut session = match staged.await {
        Ok(Ok(session)) => session,
        Ok(Err(failure)) => return Err(failure),
        Err(_) => {
            return Err(HostFailure::new(
                HostPhase::Staging,
                "staging was abandoned",
            ))
        }
    };
    let group = &ctx.group;
    let restart =
        ctx.shared.options.operation == Operation::Restart || assessment.restarts_in_place(version);
    let (mut machine, mut action) = if restart {
        HostSwitch::begin_restart(assessment, version)
    } else {
        HostSwitch::begin(assessment, version)
    };
    let mut reported = None;
    loop {
        if !matches!(action, Action::Done { .. } | Action::Fail(_))
            && reported != Some(machine.phase())
        {
            reported = Some(machine.phase());
            ctx.phase(&host.id, machine.phase());
        }
        let observed = match action {
            Action::Done { pid, from } => return Ok((pid, from)),
            Action::Fail(failure) => return Err(failure),
            Action::Stop => {
                if machine.phase() == HostPhase::Stopping {
                    drain_before_stop(group, &ctx.shared.events, host, &mut session).await;
                }
                let limit = phase_budget(HostPhase::Stopping, group);
                match session.stop(&group.release, group.stop_grace, limit).await {
                    Ok(_) => Observed::Ok,
                    Err(e) => Observed::failed(e),
                }
            }
            Action::Start(version) => {
                let start = group.start_request(host, &version);
                match session
                    .start(&start, phase_budget(HostPhase::Starting, group))
                    .await
                {
                    Ok(started) => Observed::Started(started.pid),
                    Err(e) => Observed::failed(e),
                }
            }
            Action::Verify { version, pid, up } => {
                watch_health(
                    &ctx.group,
                    &ctx.shared.options,
                    &ctx.shared.events,
                    host,
                    &mut session,
                    &version,
                    pid,
                    up,
                )
                .await
            }
        };
        action = machine.next(observed);
    }
}

#[cfg(test)]
mod tests {
    use erel_proto::{ReleaseState, ReleaseStatus};

    use super::*;
    use crate::cluster::ArchiveLookup;
    use crate::fixtures::{groups_text, HOSTS_IN_SEVERAL_GROUPS};

    /// A group no host belongs to, stopped, for [`groups_text`]'s file.
    const OLD_GROUP: &str = r#"
[group.old]
release = "legacy"
version = "1"
archive = "legacy.tar.gz"
state = "stopped"
"#;

    fn status(name: &str, state: ReleaseState, desired_running: bool) -> ReleaseStatus {
        crate::fixtures::release_status(name, "1", state, desired_running, 1)
    }

    fn running(name: &str) -> ReleaseStatus {
        status(name, ReleaseState::Running, true)
    }

    fn left(plan: &Plan, host: &str, releases: &[ReleaseStatus]) -> Vec<String> {
        let groups: Vec<&GroupPlan> = plan.groups.values().collect();
        let host = plan.host(host).expect("host");
        left_groups(plan, host, &groups, releases)
            .into_iter()
            .map(|g| g.name.clone())
            .collect()
    }

    #[test]
    fn a_host_left_a_group_when_none_of_its_groups_names_the_release_it_runs() {
        let text = groups_text(HOSTS_IN_SEVERAL_GROUPS) + OLD_GROUP;
        let plan = Plan::parse(&text, "cluster.toml", &ArchiveLookup::Unchecked).expect("valid");
        // Its own groups' releases stay, whatever else runs beside them.
        assert!(left(&plan, "both-1", &[running("beat"), running("probe")]).is_empty());
        // web-1 is not in metrics: the probe it runs left that group.
        assert_eq!(
            left(&plan, "web-1", &[running("beat"), running("probe")]),
            ["metrics"]
        );
        // A release meant to run (restart pending) counts; one stopped already does not.
        let exited = ReleaseState::Exited {
            code: Some(1),
            signal: None,
        };
        assert_eq!(
            left(&plan, "web-1", &[status("probe", exited, true)]),
            ["metrics"]
        );
        assert!(left(
            &plan,
            "web-1",
            &[status("probe", ReleaseState::Stopped, false)]
        )
        .is_empty());
        // A waiting host has left every group whose release it runs, a stopped group's too.
        assert_eq!(
            left(
                &plan,
                "spare-1",
                &[running("beat"), running("probe"), running("legacy")]
            ),
            ["web", "metrics", "old"]
        );
        // A release no group names was not put there by the file: never touched.
        assert!(left(&plan, "spare-1", &[running("by-hand")]).is_empty());
    }
}
