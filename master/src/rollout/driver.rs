//! The rollout's I/O, with `health` for verification. It observes, asks
//! [`super::decide`] what to do, and does it. Groups roll out concurrently; within a
//! group, hosts are pinged and staged in parallel, and switched as the
//! [`GroupSchedule`] allows.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use erel_proto::ErrorKind;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinSet;

use super::decide::{
    assess, phase_budget, wants_probe, Action, Assessment, GroupSchedule, HostSwitch, Observed,
    StageAction, Staging,
};
use super::health::{drain_before_stop, probe_all, release_status, watch_health};
use super::{
    count, emit, EventSink, GroupReport, HostFailure, HostOutcome, HostPhase, HostReport,
    RolloutEvent, RolloutOptions, RolloutReport, Shared, SharedRef,
};
use crate::client::{Connector, HostSession};
use crate::cluster::{Archive, GroupPlan, HostPlan, Plan};
use crate::error::{Error, Result};

/// Brings the hosts of `plan` to their desired versions; see [`super::run`].
pub(crate) async fn rollout(
    plan: &Plan,
    connector: &Connector,
    options: &RolloutOptions,
    events: &EventSink,
) -> Result<RolloutReport> {
    let selected = select_groups(plan, &options.groups)?;
    let shared: SharedRef = Arc::new(Shared {
        connector: connector.clone(),
        options: options.clone(),
        events: events.clone(),
    });
    let mut tasks = JoinSet::new();
    for (index, group) in selected.into_iter().enumerate() {
        let archive = group.archive.clone().ok_or_else(|| Error::Cluster {
            file: plan.origin.clone(),
            field: format!("group.{}.archive", group.name),
            message: "the archive was not checked (internal: plan loaded without archives)"
                .to_string(),
        })?;
        let hosts: Vec<HostPlan> = plan.hosts_in(&group.name).into_iter().cloned().collect();
        let group = group.clone();
        let shared = shared.clone();
        tasks.spawn(async move { (index, run_group(shared, group, archive, hosts).await) });
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
    })
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

/// What one group's tasks share.
struct GroupCtx {
    shared: SharedRef,
    group: GroupPlan,
    archive: Archive,
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

async fn run_group(
    shared: SharedRef,
    group: GroupPlan,
    archive: Archive,
    hosts: Vec<HostPlan>,
) -> GroupReport {
    let ctx = Arc::new(GroupCtx {
        shared,
        group,
        archive,
    });
    let events = &ctx.shared.events;
    let name = ctx.group.name.clone();
    emit(
        events,
        RolloutEvent::GroupStarted {
            group: name.clone(),
            release: ctx.group.release.clone(),
            version: ctx.group.version.clone(),
            hosts: hosts.len(),
        },
    );
    let by_id: HashMap<String, HostPlan> =
        hosts.iter().map(|h| (h.id.clone(), h.clone())).collect();
    let mut outcomes: HashMap<String, HostOutcome> = HashMap::new();
    let mut halted: Option<String> = None;

    // 1. Ping every host.
    let mut pings = JoinSet::new();
    let mut ping_tasks = HashMap::new();
    for host in &hosts {
        let ctx = ctx.clone();
        let host = host.clone();
        let id = host.id.clone();
        let task = pings.spawn(async move {
            let outcome = inspect(&ctx, &host).await;
            (host.id.clone(), outcome)
        });
        ping_tasks.insert(task.id(), id);
    }
    let mut inspected: HashMap<String, (HostSession, Assessment)> = HashMap::new();
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
            Ok((_, Assessment::UpToDate)) => {
                emit(
                    events,
                    RolloutEvent::HostSkipped {
                        group: name.clone(),
                        host: id.clone(),
                        version: ctx.group.version.clone(),
                    },
                );
                outcomes.insert(id, HostOutcome::UpToDate);
            }
            Ok((session, assessment)) => {
                inspected.insert(id, (session, assessment));
            }
            Err(failure) => {
                halted.get_or_insert_with(|| format!("{id} ({}): {}", host.addr, failure.reason));
                let outcome = ctx.failed(host, &failure);
                outcomes.insert(id.clone(), outcome);
                unreachable.push(id);
            }
        }
    }

    // 2. and 3. Stage and switch, as the schedule allows.
    let order: Vec<String> = hosts
        .iter()
        .filter(|h| inspected.contains_key(&h.id))
        .map(|h| h.id.clone())
        .collect();
    let mut schedule =
        GroupSchedule::new(order.clone(), ctx.group.canaries, ctx.group.max_in_flight);
    for id in &unreachable {
        schedule.fail(id);
    }
    if !schedule.is_finished() {
        halted = switch_group(&ctx, &hosts, order, inspected, schedule, &mut outcomes).await;
    }

    let mut untouched = Vec::new();
    let reports: Vec<HostReport> = hosts
        .iter()
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

/// Stages every host needing it (ahead, bounded), then switches them as the schedule
/// allows. Returns why the group halted, if it did.
async fn switch_group(
    ctx: &Arc<GroupCtx>,
    hosts: &[HostPlan],
    order: Vec<String>,
    mut inspected: HashMap<String, (HostSession, Assessment)>,
    mut schedule: GroupSchedule,
    outcomes: &mut HashMap<String, HostOutcome>,
) -> Option<String> {
    let by_id: HashMap<&str, &HostPlan> = hosts.iter().map(|h| (h.id.as_str(), h)).collect();

    // 2. Stage ahead on every host, a bounded number at once.
    let permits = Arc::new(Semaphore::new(ctx.shared.options.staging_parallel.max(1)));
    let (failed_tx, mut staging_failures) = mpsc::unbounded_channel::<(String, HostFailure)>();
    let mut staging = JoinSet::new();
    let mut waiting: HashMap<String, (oneshot::Receiver<Staged>, Assessment)> = HashMap::new();
    for id in &order {
        let Some((session, assessment)) = inspected.remove(id) else {
            continue;
        };
        let (tx, rx) = oneshot::channel();
        match &assessment {
            Assessment::Switch { staged, .. } => {
                let staged = *staged;
                let ctx = ctx.clone();
                let permits = permits.clone();
                let failed_tx = failed_tx.clone();
                let id = id.clone();
                staging.spawn(async move {
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
        waiting.insert(id.clone(), (rx, assessment));
    }
    drop(failed_tx);

    // 3. Switch, canaries first, at most max_in_flight at once.
    let mut tasks: HashMap<tokio::task::Id, String> = HashMap::new();
    let mut begun: HashSet<String> = HashSet::new();
    let mut switching = JoinSet::new();
    let mut halted: Option<String> = None;
    loop {
        for id in schedule.begin_next() {
            let Some((rx, assessment)) = waiting.remove(&id) else {
                continue;
            };
            let Some(host) = by_id.get(id.as_str()).map(|h| (*h).clone()) else {
                continue;
            };
            begun.insert(id.clone());
            let ctx = ctx.clone();
            let task = switching.spawn(async move {
                let outcome = switch_host(&ctx, &host, assessment, rx).await;
                (host, outcome)
            });
            tasks.insert(task.id(), id);
        }
        if schedule.is_finished() {
            break;
        }
        tokio::select! {
            Some(joined) = switching.join_next(), if !switching.is_empty() => {
                let (host, outcome) = match joined {
                    Ok(done) => done,
                    Err(e) => {
                        // A task that panicked: its host failed, so the group halts.
                        if let Some(id) = tasks.get(&e.id()) {
                            schedule.fail(id);
                        }
                        halted.get_or_insert_with(|| "a switch task failed".to_string());
                        continue;
                    }
                };
                let result = match outcome {
                    Ok(pid) => {
                        emit(&ctx.shared.events, RolloutEvent::HostDone {
                            group: ctx.group.name.clone(),
                            host: host.id.clone(),
                            version: ctx.group.version.clone(),
                            pid: pid.0,
                        });
                        outcomes.insert(host.id.clone(), HostOutcome::Switched { from: pid.1, pid: pid.0 });
                        true
                    }
                    Err(failure) => {
                        halted.get_or_insert_with(|| format!("{} failed: {}", host.id, failure.reason));
                        let outcome = ctx.failed(&host, &failure);
                        outcomes.insert(host.id.clone(), outcome);
                        false
                    }
                };
                schedule.finish(&host.id, result);
            }
            Some((id, failure)) = staging_failures.recv() => {
                if begun.contains(&id) {
                    continue; // its switch task reports it
                }
                if let Some(host) = by_id.get(id.as_str()) {
                    halted.get_or_insert_with(|| format!("{id} failed: {}", failure.reason));
                    let outcome = ctx.failed(host, &failure);
                    outcomes.insert(id.clone(), outcome);
                    waiting.remove(&id);
                    schedule.fail(&id);
                }
            }
            else => break,
        }
    }
    staging.abort_all();
    halted
}

/// Pings a host and decides what it needs.
async fn inspect(
    ctx: &GroupCtx,
    host: &HostPlan,
) -> std::result::Result<(HostSession, Assessment), HostFailure> {
    ctx.phase(&host.id, HostPhase::Pinging);
    let mut session = HostSession::new(host.host_addr(), ctx.shared.connector.clone());
    let pong = session
        .ping(phase_budget(HostPhase::Pinging, &ctx.group))
        .await
        .map_err(|e| HostFailure::new(HostPhase::Pinging, unreachable(host, &e)))?;
    let status = release_status(&pong.releases, &ctx.group.release);
    let probe_ok = if wants_probe(status, &ctx.group.version) {
        let answers = probe_all(&ctx.group, host, ctx.shared.options.probe_timeout).await;
        (!answers.is_empty()).then(|| answers.iter().all(|a| a.passed))
    } else {
        None
    };
    let assessment = assess(status, &ctx.group.version, &ctx.group.health, probe_ok);
    Ok((session, assessment))
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
    let archive = &ctx.archive;
    let dest = GroupPlan::archive_dest(archive);
    let dir = ctx.group.version_dir();
    let limit = phase_budget(HostPhase::Staging, &ctx.group);
    let (mut staging, mut action) = Staging::begin(staged);
    loop {
        let observed = match action {
            StageAction::Staged => break,
            StageAction::Fail(failure) => return Err(failure),
            StageAction::Push => {
                let pushed = session.push(&archive.path, archive.sha256, &dest).await;
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
    let (mut machine, mut action) = HostSwitch::begin(assessment, &group.version);
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
