//! `erel master --amqp`: the daemon fed by the config log.
//!
//! On start it loads the config held in its state directory, then connects and reads
//! the log from where it is ([`log`]). Each batch of deliveries is sorted newest
//! revision first; revisions not newer than the one held are logged and ignored; the
//! newest one that validates (archives found in the artifact directory, checked by
//! sha256) is written atomically to the state directory, and only then is it the
//! revision held, announced, and handed to the groups. A config that fails validation
//! for good (or, for a master given a trusted key, is not signed with it) is logged
//! with its reason and never applied. One that cannot be applied *yet* (the state
//! directory cannot be written, say it is full; an archive not in the artifact
//! directory yet) is retried with backoff until it applies or a newer revision
//! does, and the master's position in the log never moves past it ([`Position`]), so
//! neither a reconnection nor a full disk loses a revision. Only the newest such
//! revision is tried: older ones wait behind it, untried, in case it is refused for
//! good. While one waits, the master competes for no group (it hands their leases
//! back): the revision it holds is older than one that may already be on the hosts,
//! and rolling it out would roll them back; a master that has the newer revision can
//! take the groups meanwhile. What is wrong with a revision for good (its text, its
//! signature) is checked before what can pass (its archives).
//!
//! A revision more than [`crate::cluster::MAX_REVISION_STEP`] above the newest one
//! before it in the log (counted as [`log::newest`] counts for `publish`) is refused
//! for good, so that no single message can wedge the log at the largest revision.
//!
//! Once the log is read to its end (nothing more for [`log::SETTLE`]), the daemon
//! competes for each group of its plan ([`leadership`]) and converges the groups it
//! holds with the rollout engine: at once, every `interval` (drift), and at once again
//! when a newer revision arrives. Waiting for the end of the log first keeps a master
//! that starts behind from acting on an old revision.
//!
//! A group whose rollout failed after a switch is halted at that revision
//! ([`crate::rollout::halt`]): the holder records the halt in the group's halt record
//! ([`control`]), publishes a `group_halted` event, and neither rolls the revision out
//! again nor repairs the group's drift until a newer revision arrives or a retry
//! record (`erel config retry --group G`) is read, before each pass. A master that
//! takes the group over reads the same record, so the halt outlives its maker.
//!
//! Faults: when the connection fails (broker restarted, connection cut, broker down at
//! start) the daemon stops acting on every group (its leases are gone with the
//! connection), leaves the hosts as they are, reconnects with backoff (starting at the
//! next node of the list when it was given a cluster's nodes: the node it was on may be
//! gone), resumes the log after the last offset it saw, and competes again. Cancelling the token ends it
//! cleanly: rollouts in progress are abandoned (every agent command is idempotent, so
//! the next holder completes them) and the leases are handed back at once.

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_lite::future::poll_once;
use futures_lite::StreamExt;
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use lapin::Connection;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::control::{self, HaltRecord};
use super::events::{self, MasterEvent};
use super::log::{self, LogEntry};
use super::state::StateDir;
use super::{
    amqp_error, best_effort_close, leadership, lost_error, lost_for, open_channel, unless_lost,
    Backoff, Broker, CLOSE_WAIT, LOST_GRACE, STATUS_POLL,
};
use crate::client::Connector;
use crate::cluster::{ArchiveLookup, Plan};
use crate::error::{Error, Result};
use crate::rollout::converge::converge_pass;
use crate::rollout::halt::{self, Halt};
use crate::rollout::{keep_converged, HostFailure, HostPhase, RolloutEvent, RolloutOptions};

/// What the daemon needs.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// The broker and the names of this cluster on it.
    pub broker: Broker,
    /// Where the newest accepted config is kept.
    pub state_dir: PathBuf,
    /// This master's name, as events and holder records show it.
    pub name: String,
    /// Where the archives configs name are found.
    pub artifacts: PathBuf,
    /// How agents are reached.
    pub connector: Connector,
    /// How rollouts run (its `groups` is set per group here).
    pub rollout: RolloutOptions,
    /// Time between two convergence passes of a held group (drift repair).
    pub interval: Duration,
    /// Reconnection pacing.
    pub backoff: Backoff,
    /// Told the revision held and every rollout event (`erel master --metrics`).
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
    /// When set, only revisions signed with this key are applied
    /// ([`crate::bundle::check_signed_revision`]); others are rejected as invalid ones.
    pub trusted_key: Option<crate::bundle::TrustedKey>,
}

/// The plan every group task follows.
type Plans = watch::Receiver<Option<Arc<Plan>>>;

/// Where the daemon is in the log.
///
/// The position never runs ahead of the state directory: a message is behind it only
/// once it is written there, refused for good, or not newer than the revision held.
/// A revision that could not be applied for a reason that can pass (the state
/// directory cannot be written, an archive is not in the artifact directory yet) is
/// kept in `pending` and retried with backoff; a reconnection resumes the log at the
/// oldest such message, so a lost connection cannot skip it either.
#[derive(Debug, Default)]
struct Position {
    /// The revision held (the one in the state directory).
    held: Option<u64>,
    /// The offset after the last message seen, where a new consumer resumes when
    /// nothing is pending.
    next_offset: Option<u64>,
    /// Revisions newer than `held` not applied yet, newest first (at most
    /// [`MAX_PENDING`]).
    pending: Vec<LogEntry>,
    /// The offset of the oldest message still pending (or dropped from `pending` for
    /// room), where a new consumer resumes.
    unresolved_from: Option<u64>,
    /// The newest revision dropped from `pending` for room, if any: while it is newer
    /// than the one held, it must be read from the log again.
    dropped: Option<u64>,
    /// The revision held has no plan for a reason that can pass (an archive missing
    /// from the artifact directory when the master started): validated again with the
    /// pending revisions until it has one or a newer revision applies.
    unplanned: bool,
    /// The newest revision in the log as far as read, in log order, as `publish`
    /// counts it ([`log::newest`]): a revision more than
    /// [`crate::cluster::MAX_REVISION_STEP`] above it is refused for good.
    newest_seen: Option<u64>,
    /// Offsets of messages refused for being too far ahead that a new consumer may
    /// read again (from `unresolved_from` on): refused again without measuring them
    /// against a `newest_seen` that later messages raised.
    too_far: std::collections::BTreeSet<u64>,
    /// The offset after the last message measured against `newest_seen`.
    measured_to: Option<u64>,
    /// The newest pending revision and why it is not applied yet, while there is one:
    /// the groups are not rolled out (the hosts stay as they are) until it applies or
    /// a newer one does, so that an older revision is never rolled out over it.
    waiting: Option<(Option<u64>, String)>,
    /// The newest pending revision and how many older ones wait behind it, as last
    /// logged (logged once).
    behind_logged: Option<(Option<u64>, usize)>,
}

impl Position {
    /// Keeps `pending` (newest first, as tried) as the revisions still to apply, minus
    /// those the revision held supersedes; at most [`MAX_PENDING`] stay in memory. True
    /// when revisions dropped for room must be read from the log again.
    fn keep_pending(&mut self, mut pending: Vec<LogEntry>) -> bool {
        let held = self.held;
        let superseded = |revision: u64| held.is_some_and(|held| revision <= held);
        pending.retain(|e| !e.revision().is_some_and(superseded));
        if self.dropped.is_some_and(superseded) {
            self.dropped = None;
        }
        if pending.is_empty() {
            self.pending = pending;
            self.waiting = None;
            self.behind_logged = None;
            if self.dropped.is_some() {
                return true;
            }
            self.unresolved_from = None;
            self.too_far.clear();
            return false;
        }
        let oldest = pending.iter().filter_map(|e| e.offset).min();
        self.unresolved_from = match (self.unresolved_from, oldest) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if pending.len() > MAX_PENDING {
            // Read again from the log later (`unresolved_from`).
            let newest_dropped = pending[MAX_PENDING..]
                .iter()
                .filter_map(LogEntry::revision)
                .max();
            self.dropped = self.dropped.max(newest_dropped);
            pending.truncate(MAX_PENDING);
        }
        self.pending = pending;
        if let Some(from) = self.unresolved_from {
            self.too_far.retain(|&offset| offset >= from);
        }
        false
    }

    /// Where a new consumer starts.
    fn resume(&self) -> log::From {
        match self.unresolved_from.or(self.next_offset) {
            Some(offset) => log::From::Offset(offset),
            None => log::From::First,
        }
    }
}

/// Revisions a master keeps in memory while they wait to be applied; older ones are
/// read again from the log after a reconnection.
const MAX_PENDING: usize = 16;

/// Why a revision was not applied.
enum NotApplied {
    /// For good: it is logged and skipped.
    Refused(String),
    /// For now: it is retried until it applies or a newer one supersedes it.
    NotYet(String),
}

/// Runs the daemon until `cancel` fires. Errors only when the state directory cannot be
/// read at start; everything the broker does is retried.
pub async fn run(options: DaemonOptions, cancel: CancellationToken) -> Result<()> {
    let state = StateDir::new(&options.state_dir);
    let lookup = ArchiveLookup::Artifacts(options.artifacts.clone());
    let loaded = {
        let (state, lookup) = (state.clone(), lookup.clone());
        tokio::task::spawn_blocking(move || state.load(&lookup))
            .await
            .map_err(|e| Error::local(&options.state_dir, format!("loading failed: {e}")))??
    };
    let mut position = Position::default();
    let initial = match loaded {
        Some((held, problem)) => {
            position.held = Some(held.revision);
            if let Some(metrics) = &options.metrics {
                metrics.set_revision(held.revision);
            }
            match problem {
                None => info!(
                    revision = held.revision,
                    dir = %options.state_dir.display(),
                    "config loaded from the state directory"
                ),
                Some(problem @ Error::ArchiveUnavailable { .. }) => {
                    position.unplanned = true;
                    warn!(
                        revision = held.revision,
                        "the config in the state directory is not usable yet; nothing is \
                         converged until it is (tried again) or a newer revision arrives: {problem}"
                    )
                }
                Some(problem) => error!(
                    revision = held.revision,
                    "the config in the state directory does not validate any more; \
                     nothing is converged until a newer revision arrives: {problem}"
                ),
            }
            held.plan.map(Arc::new)
        }
        None => {
            info!(dir = %options.state_dir.display(), "no config held yet");
            None
        }
    };
    let (plans_tx, plans) = watch::channel(initial);
    let (events_tx, mut events_rx) = mpsc::unbounded_channel();
    let daemon = Daemon {
        options,
        state,
        lookup,
        plans_tx,
        plans,
        events: events_tx,
    };
    let mut backoff = daemon.options.backoff.clone();
    let broker_url = daemon.options.broker.display_url();
    loop {
        if cancel.is_cancelled() {
            break;
        }
        let outcome = daemon
            .session(&mut position, &mut events_rx, &mut backoff, &cancel)
            .await;
        match outcome {
            Ok(()) => break,
            Err(e) => {
                // The node this session was on may be gone: start at the next one.
                daemon.options.broker.fail_over();
                let delay = backoff.next_delay();
                warn!(
                    "{e}; the hosts stay as they are; reconnecting to {broker_url} in {} ms",
                    delay.as_millis()
                );
                let sleep = tokio::time::sleep(delay);
                tokio::pin!(sleep);
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = &mut sleep => break,
                        // Events of a master that is not connected are dropped.
                        Some(event) = events_rx.recv() => debug!(?event, "event dropped (not connected)"),
                    }
                }
            }
        }
    }
    info!("daemon stopped");
    Ok(())
}

struct Daemon {
    options: DaemonOptions,
    state: StateDir,
    lookup: ArchiveLookup,
    plans_tx: watch::Sender<Option<Arc<Plan>>>,
    plans: Plans,
    events: mpsc::UnboundedSender<MasterEvent>,
}

/// A group this master competes for.
struct GroupHandle {
    cancel: CancellationToken,
}

impl Daemon {
    /// One connection's life. `Ok` only when cancelled.
    async fn session(
        &self,
        position: &mut Position,
        events_rx: &mut mpsc::UnboundedReceiver<MasterEvent>,
        backoff: &mut Backoff,
        cancel: &CancellationToken,
    ) -> Result<()> {
        let broker = &self.options.broker;
        let names = broker.names();
        let role = format!("master {}", self.options.name);
        let connection = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            connection = broker.connect(&role) => Arc::new(connection?),
        };
        let log_queue = names.configs();
        let from = position.resume();
        if position.unresolved_from.is_some() {
            // Read again from the log, from the oldest of them.
            position.pending.clear();
            position.dropped = None;
        }
        let tag = format!("{}-{}", self.options.name, std::process::id());
        let opening = async {
            let log_channel = open_channel(&connection, &log_queue).await?;
            let event_channel = open_channel(&connection, &names.events()).await?;
            log::declare(&log_channel, names).await?;
            events::declare(&event_channel, names).await?;
            let consumer = log::consume(&log_channel, names, &tag, from).await?;
            Ok((log_channel, event_channel, consumer))
        };
        let (log_channel, event_channel, mut consumer) =
            unless_lost(&connection, &log_queue, "opening the config log", opening).await?;
        info!(log = %log_queue, ?from, "connected; reading the config log");
        backoff.reset();

        let mut groups: HashMap<String, GroupHandle> = HashMap::new();
        let mut tasks: JoinSet<(String, Result<()>)> = JoinSet::new();
        let mut plans = self.plans.clone();
        let mut caught_up = false;
        let mut settle: Pin<Box<Sleep>> = Box::pin(tokio::time::sleep(log::SETTLE));
        // Retrying the revisions pending, paced by the daemon's backoff.
        let mut retry_backoff = self.options.backoff.clone();
        let mut retry: Pin<Box<Sleep>> = Box::pin(tokio::time::sleep(Duration::ZERO));
        let mut retrying = arm_retry(position, &mut retry, &mut retry_backoff, false);
        // The connection's state, watched across the whole loop: a future of the client
        // library that a lost node left waiting cannot hold the session forever. Looked at
        // between branches only, so that a batch being applied is never cut short; the
        // broker waits inside a branch are bounded each on their own.
        let lost = lost_for(|| connection.status().connected(), LOST_GRACE, STATUS_POLL);
        tokio::pin!(lost);
        let outcome: Result<()> = loop {
            tokio::select! {
                _ = cancel.cancelled() => break Ok(()),
                () = &mut lost => {
                    break Err(lost_error(&connection, &log_queue, "reading the config log"));
                }
                next = consumer.next() => {
                    let first = match next {
                        Some(Ok(delivery)) => delivery,
                        Some(Err(e)) => break Err(amqp_error(&log_queue, "reading the config log", e)),
                        None => break Err(Error::Amqp {
                            target: log_queue.clone(),
                            action: "reading the config log".to_string(),
                            message: "the broker ended the consumer".to_string(),
                        }),
                    };
                    let mut batch = vec![first];
                    let mut ended = None;
                    while batch.len() < usize::from(log::PREFETCH) {
                        match poll_once(consumer.next()).await {
                            Some(Some(Ok(delivery))) => batch.push(delivery),
                            Some(Some(Err(e))) => {
                                ended = Some(amqp_error(&log_queue, "reading the config log", e));
                                break;
                            }
                            Some(None) => {
                                ended = Some(Error::Amqp {
                                    target: log_queue.clone(),
                                    action: "reading the config log".to_string(),
                                    message: "the broker ended the consumer".to_string(),
                                });
                                break;
                            }
                            None => break,
                        }
                    }
                    let reread = self.apply_batch(&batch, position).await;
                    if let Some(last) = batch.last() {
                        // On a stream an acknowledgement only grants the consumer more
                        // credit; where the master is in the log is `position`.
                        let ack = async {
                            let acked = last.ack(BasicAckOptions { multiple: true }).await;
                            acked.map_err(|e| amqp_error(&log_queue, "acknowledging", e))
                        };
                        let acked = unless_lost(&connection, &log_queue, "acknowledging", ack);
                        if let Err(e) = acked.await {
                            break Err(e);
                        }
                    }
                    retrying = arm_retry(position, &mut retry, &mut retry_backoff, retrying);
                    if caught_up {
                        self.sync_groups(&connection, &mut groups, &mut tasks, position.waiting.as_ref());
                    }
                    if let Some(e) = ended.or_else(|| reread.then(|| reread_error(&log_queue))) {
                        break Err(e);
                    }
                    settle.as_mut().reset(Instant::now() + log::SETTLE);
                }
                _ = &mut retry, if retrying => {
                    retrying = false;
                    if position.unplanned {
                        self.plan_held(position).await;
                    }
                    let pending = std::mem::take(&mut position.pending);
                    if self.apply(pending, position).await {
                        break Err(reread_error(&log_queue));
                    }
                    retrying = arm_retry(position, &mut retry, &mut retry_backoff, retrying);
                    if caught_up {
                        self.sync_groups(&connection, &mut groups, &mut tasks, position.waiting.as_ref());
                    }
                }
                _ = &mut settle, if !caught_up => {
                    caught_up = true;
                    info!(revision = ?position.held, "config log read to its end");
                    self.sync_groups(&connection, &mut groups, &mut tasks, position.waiting.as_ref());
                }
                changed = plans.changed() => {
                    if changed.is_err() {
                        break Ok(());
                    }
                    if caught_up {
                        self.sync_groups(&connection, &mut groups, &mut tasks, position.waiting.as_ref());
                    }
                }
                Some(event) = events_rx.recv() => {
                    let envelope = events::envelope(&self.options.name, event);
                    let publish = events::publish(&event_channel, names, &envelope);
                    let exchange = names.events();
                    let published = unless_lost(&connection, &exchange, "publishing an event", publish);
                    if let Err(e) = published.await {
                        break Err(e);
                    }
                }
                Some(joined) = tasks.join_next() => match joined {
                    Ok((group, Ok(()))) => {
                        debug!(group, "stopped competing for the group");
                    }
                    Ok((group, Err(e))) => break Err(Error::Amqp {
                        target: names.lease(&group).unwrap_or_default(),
                        action: format!("competing for group {group}"),
                        message: e.to_string(),
                    }),
                    Err(e) => break Err(Error::Amqp {
                        target: log_queue.clone(),
                        action: "running a group".to_string(),
                        message: e.to_string(),
                    }),
                },
            }
        };
        for handle in groups.values() {
            handle.cancel.cancel();
        }
        while tasks.join_next().await.is_some() {}
        // Events the groups sent while stopping.
        while let Ok(event) = events_rx.try_recv() {
            let envelope = events::envelope(&self.options.name, event);
            let publish = events::publish(&event_channel, names, &envelope);
            if !matches!(tokio::time::timeout(CLOSE_WAIT, publish).await, Ok(Ok(()))) {
                break;
            }
        }
        drop(consumer);
        best_effort_close(log_channel.close(200, "master stopping".into())).await;
        best_effort_close(event_channel.close(200, "master stopping".into())).await;
        best_effort_close(connection.close(200, "master stopping".into())).await;
        outcome
    }

    /// Applies one batch of log messages (see the module docs and [`Position`]). True
    /// when revisions dropped from memory must be read from the log again.
    async fn apply_batch(&self, batch: &[Delivery], position: &mut Position) -> bool {
        let mut entries: Vec<LogEntry> = batch.iter().map(LogEntry::from_delivery).collect();
        // Messages before it were measured when first read.
        let read_to = position.measured_to;
        if let Some(offset) = entries.iter().filter_map(|e| e.offset).max() {
            position.next_offset = Some(offset + 1);
            position.measured_to = position.measured_to.max(Some(offset + 1));
        }
        entries.sort_by_key(|e| e.offset);
        entries.retain(|entry| {
            let Some(revision) = entry.revision() else {
                return true;
            };
            let read_before = entry
                .offset
                .is_some_and(|offset| read_to.is_some_and(|to| offset < to));
            if read_before {
                return !entry.offset.is_some_and(|o| position.too_far.contains(&o));
            }
            if log::counts_after(position.newest_seen, revision) {
                position.newest_seen = position.newest_seen.max(Some(revision));
                return true;
            }
            let reason = format!(
                "revision {revision} is more than {} (2^32) above the newest revision \
                 before it in the log, {}; a revision may be at most that much newer \
                 (and at most {})",
                crate::cluster::MAX_REVISION_STEP,
                position.newest_seen.unwrap_or(0),
                crate::cluster::MAX_REVISION
            );
            warn!(revision, offset = ?entry.offset, "config rejected, nothing of it applied: {reason}");
            if let Some(offset) = entry.offset {
                position.too_far.insert(offset);
            }
            let _ = self.events.send(MasterEvent::RevisionRejected {
                revision: Some(revision),
                reason,
            });
            false
        });
        let (newer, older) = log::newer_than(position.held, &entries);
        for entry in &older {
            debug!(
                revision = ?entry.revision(),
                offset = ?entry.offset,
                held = ?position.held,
                "revision not newer than the one held; ignored"
            );
        }
        if !older.is_empty() {
            info!(
                count = older.len(),
                held = ?position.held,
                "ignored {} revision(s) not newer than the one held (revisions {})",
                older.len(),
                summarize(older.iter().filter_map(|e| e.revision()))
            );
        }
        let mut candidates: Vec<LogEntry> = newer.into_iter().cloned().collect();
        candidates.append(&mut position.pending);
        self.apply(candidates, position).await
    }

    /// Tries `candidates` (revisions newer than the one held), newest first: the first
    /// that validates and is written to the state directory becomes the revision held
    /// and supersedes the older ones; one refused for good is logged and skipped; one
    /// that cannot be applied yet stays in `position.pending`. True when revisions
    /// dropped from memory must be read from the log again.
    async fn apply(&self, mut candidates: Vec<LogEntry>, position: &mut Position) -> bool {
        candidates.sort_by_key(|e| std::cmp::Reverse((e.revision(), e.offset)));
        candidates.dedup_by_key(|e| e.offset);
        let mut pending = Vec::new();
        let mut candidates = candidates.into_iter();
        while let Some(entry) = candidates.next() {
            match self.try_apply(&entry, position).await {
                Ok(()) => break,
                Err(NotApplied::Refused(reason)) => {
                    warn!(
                        revision = ?entry.revision(),
                        offset = ?entry.offset,
                        "config rejected, nothing of it applied: {reason}"
                    );
                    let _ = self.events.send(MasterEvent::RevisionRejected {
                        revision: entry.revision(),
                        reason,
                    });
                }
                Err(NotApplied::NotYet(reason)) => {
                    warn!(
                        revision = ?entry.revision(),
                        offset = ?entry.offset,
                        held = ?position.held,
                        "waiting for revision {}: {reason}; no group is rolled out until it \
                         applies or a newer revision does (the hosts stay as they are)",
                        display_revision(entry.revision())
                    );
                    position.waiting = Some((entry.revision(), reason));
                    pending.push(entry);
                    // Older revisions wait behind it, untried: applying one would roll
                    // the hosts back from a revision that may already be out.
                    let behind: Vec<LogEntry> = candidates.by_ref().collect();
                    let logged = (pending[0].revision(), behind.len());
                    if !behind.is_empty() && position.behind_logged != Some(logged) {
                        info!(
                            "{} older revision(s) wait behind revision {}, not tried while \
                             it waits (revisions {})",
                            behind.len(),
                            display_revision(pending[0].revision()),
                            summarize(behind.iter().filter_map(|e| e.revision()))
                        );
                    }
                    position.behind_logged = Some(logged);
                    pending.extend(behind);
                }
            }
        }
        for entry in candidates {
            debug!(
                revision = ?entry.revision(),
                held = ?position.held,
                "superseded by a newer revision"
            );
        }
        position.keep_pending(pending)
    }

    /// Validates the revision held again, for a master that started while one of its
    /// archives was missing: once it validates, the groups follow it.
    async fn plan_held(&self, position: &mut Position) {
        let loaded = {
            let (state, lookup) = (self.state.clone(), self.lookup.clone());
            tokio::task::spawn_blocking(move || state.load(&lookup)).await
        };
        match loaded {
            Ok(Ok(Some((held, None)))) if Some(held.revision) == position.held => {
                info!(
                    revision = held.revision,
                    "the config in the state directory validates now"
                );
                position.unplanned = false;
                self.plans_tx.send_replace(held.plan.map(Arc::new));
            }
            Ok(Ok(Some((_, Some(problem @ Error::ArchiveUnavailable { .. }))))) => {
                warn!(revision = ?position.held, "the config in the state directory is not usable yet: {problem}");
            }
            Ok(Ok(Some((_, Some(problem))))) => {
                position.unplanned = false;
                error!(
                    revision = ?position.held,
                    "the config in the state directory does not validate; nothing is \
                     converged until a newer revision arrives: {problem}"
                );
            }
            Ok(Ok(_)) => position.unplanned = false,
            Ok(Err(e)) => warn!("reading the state directory again: {e}"),
            Err(e) => warn!("reading the state directory again: {e}"),
        }
    }

    /// Validates `entry` and writes it to the state directory; only then is it the
    /// revision held, told to the metrics, the events and the groups.
    async fn try_apply(
        &self,
        entry: &LogEntry,
        position: &mut Position,
    ) -> std::result::Result<(), NotApplied> {
        let log_queue = self.options.broker.names().configs();
        let checked = {
            let (entry, lookup) = (entry.clone(), self.lookup.clone());
            let trusted = self.options.trusted_key.clone();
            tokio::task::spawn_blocking(move || {
                let plan = match entry.validate(&log_queue, &lookup) {
                    Err(missing @ Error::ArchiveUnavailable { .. }) => {
                        // What is wrong for good is told before what can pass: the
                        // rest of the config and its signature, then the archives.
                        let unchecked = entry.validate(&log_queue, &ArchiveLookup::Unchecked)?;
                        if let Some(key) = &trusted {
                            crate::bundle::check_signed_revision(key, &entry, &unchecked)
                                .map_err(Error::ConfigRefused)?;
                        }
                        return Err(missing);
                    }
                    validated => validated?,
                };
                match &trusted {
                    Some(key) => crate::bundle::check_signed_revision(key, &entry, &plan)
                        .map(|()| plan)
                        .map_err(Error::ConfigRefused),
                    None => Ok(plan),
                }
            })
            .await
        };
        let plan = match checked {
            Ok(Ok(plan)) => plan,
            Ok(Err(e @ Error::ArchiveUnavailable { .. })) => {
                return Err(NotApplied::NotYet(e.to_string()))
            }
            Ok(Err(e)) => return Err(NotApplied::Refused(e.to_string())),
            Err(e) => return Err(NotApplied::NotYet(format!("validation failed: {e}"))),
        };
        let revision = plan.revision;
        let text = entry.text().unwrap_or_default().to_string();
        let state = self.state.clone();
        match tokio::task::spawn_blocking(move || state.store(&text)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(NotApplied::NotYet(format!(
                    "the state directory cannot be written: {e}"
                )))
            }
            Err(e) => {
                return Err(NotApplied::NotYet(format!(
                    "{}: writing failed: {e}",
                    self.state.config_path().display()
                )))
            }
        }
        info!(
            revision,
            previous = ?position.held,
            publisher = entry.publisher.as_deref().unwrap_or("?"),
            "revision accepted and written to the state directory"
        );
        position.held = Some(revision);
        position.unplanned = false;
        if let Some(metrics) = &self.options.metrics {
            metrics.set_revision(revision);
        }
        let _ = self.events.send(MasterEvent::RevisionAccepted {
            revision,
            publisher: entry.publisher.clone(),
        });
        self.plans_tx.send_replace(Some(Arc::new(plan)));
        Ok(())
    }

    /// Competes for exactly the groups of the current plan.
    ///
    /// While a newer revision than the one held waits to be applied (`waiting`), it
    /// competes for none: the leases are handed back so that a master holding the newer
    /// revision can act, and this one does not roll its older revision out. The
    /// metrics are told which revision it waits for, if any.
    fn sync_groups(
        &self,
        connection: &Arc<Connection>,
        groups: &mut HashMap<String, GroupHandle>,
        tasks: &mut JoinSet<(String, Result<()>)>,
        waiting: Option<&(Option<u64>, String)>,
    ) {
        if let Some(metrics) = &self.options.metrics {
            // An entry whose revision cannot be read shows as 0.
            metrics.set_waiting(waiting.map(|(revision, _)| revision.unwrap_or(0)));
        }
        let wanted: Vec<String> = match waiting {
            Some(_) => Vec::new(),
            None => self
                .plans
                .borrow()
                .as_ref()
                .map(|plan| plan.groups.keys().cloned().collect())
                .unwrap_or_default(),
        };
        groups.retain(|group, handle| {
            let keep = wanted.contains(group);
            if !keep {
                match waiting {
                    Some((revision, reason)) => info!(
                        group,
                        "waiting for revision {}: {reason}; handing the group back",
                        display_revision(*revision)
                    ),
                    None => info!(group, "the group left the config; handing it back"),
                }
                handle.cancel.cancel();
            }
            keep
        });
        for group in wanted {
            if groups.contains_key(&group) {
                continue;
            }
            let cancel = CancellationToken::new();
            let task = GroupTask {
                connection: connection.clone(),
                options: self.options.clone(),
                group: group.clone(),
                plans: self.plans.clone(),
                events: self.events.clone(),
            };
            let token = cancel.clone();
            tasks.spawn(async move {
                let group = task.group.clone();
                (group, task.run(token).await)
            });
            groups.insert(group, GroupHandle { cancel });
        }
    }
}

/// Competes for one group and converges it while held.
struct GroupTask {
    connection: Arc<Connection>,
    options: DaemonOptions,
    group: String,
    plans: Plans,
    events: mpsc::UnboundedSender<MasterEvent>,
}

impl GroupTask {
    async fn run(self, cancel: CancellationToken) -> Result<()> {
        let (holding_tx, mut holding) = watch::channel(false);
        // A deploy's hand-over request is followed between passes only.
        let (busy_tx, busy) = watch::channel(false);
        let lease = tokio::spawn(leadership::hold(
            self.connection.clone(),
            self.options.broker.names().clone(),
            self.group.clone(),
            self.options.name.clone(),
            holding_tx,
            Some(busy),
            cancel.clone(),
        ));
        loop {
            if *holding.borrow_and_update() {
                let _ = self.events.send(MasterEvent::GroupAcquired {
                    group: self.group.clone(),
                });
                self.converge_while_held(&mut holding, &busy_tx, &cancel)
                    .await;
                let _ = self.events.send(MasterEvent::GroupReleased {
                    group: self.group.clone(),
                });
                info!(group = %self.group, "no longer acting on the group");
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                changed = holding.changed() => if changed.is_err() { break },
            }
        }
        lease.await.map_err(|e| Error::Amqp {
            target: self.group.clone(),
            action: "holding the lease".to_string(),
            message: e.to_string(),
        })?
    }

    /// Converges the group until the lease is lost or `cancel` fires.
    async fn converge_while_held(
        &self,
        holding: &mut watch::Receiver<bool>,
        busy: &watch::Sender<bool>,
        cancel: &CancellationToken,
    ) {
        let stop = async {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = lost(holding) => {}
            }
        };
        let applied = &Mutex::new(None);
        let halted = &Mutex::new(None);
        keep_converged(
            self.plans.clone(),
            self.options.interval,
            stop,
            move |plan| async move {
                busy.send_replace(true);
                if plan.groups.contains_key(&self.group) && !self.halted(&plan, halted).await {
                    self.pass(&plan, applied, halted).await;
                }
                busy.send_replace(false);
            },
        )
        .await;
        busy.send_replace(false);
    }

    /// Whether the group is halted at `plan`'s revision: the halt this master knows,
    /// brought up to date with the group's halt record (a halt made by an earlier
    /// holder, a retry asked for). A record that cannot be read leaves what is known.
    async fn halted(&self, plan: &Plan, halted: &Mutex<Option<Halt>>) -> bool {
        let names = self.options.broker.names();
        let record = match self.halt_channel().await {
            Ok(channel) => {
                let record = control::read_halt(&channel, names, &self.group).await;
                best_effort_close(channel.close(200, "done".into())).await;
                record
            }
            Err(e) => Err(e),
        };
        // A halt recorded at an older revision is over: its record is cleared below.
        let mut stale = matches!(
            &record,
            Ok(Some(HaltRecord::Halted(recorded))) if recorded.revision < plan.revision
        );
        let is_halted = {
            let mut halted = halted.lock().unwrap_or_else(|e| e.into_inner());
            match record {
                // A halt at an older revision is over: a newer one is being applied.
                Ok(Some(HaltRecord::Halted(recorded))) if recorded.revision >= plan.revision => {
                    if halted
                        .as_ref()
                        .is_none_or(|known| known.since_ms < recorded.since_ms)
                    {
                        *halted = Some(recorded);
                    }
                }
                Ok(Some(HaltRecord::Retry { by, at_ms, .. })) => {
                    if let Some(known) = halted.take_if(|known| known.since_ms <= at_ms) {
                        info!(group = %self.group, revision = known.revision, by, "retry asked for; the halted revision is tried again");
                        let _ = self.events.send(MasterEvent::GroupRetried {
                            group: self.group.clone(),
                            revision: known.revision,
                            by,
                        });
                    }
                }
                Ok(Some(HaltRecord::Halted(_) | HaltRecord::Cleared { .. }) | None) => {}
                Err(e) => warn!(group = %self.group, "cannot read the halt record: {e}"),
            }
            if let Some(known) = halted.take_if(|known| known.revision < plan.revision) {
                stale = true;
                info!(
                    group = %self.group,
                    "revision {} is newer than the halted revision {}; the group is rolled out again",
                    plan.revision,
                    known.revision
                );
            }
            match halted.as_ref() {
                Some(known) => {
                    debug!(group = %self.group, "not rolled out: {known}");
                    true
                }
                None => false,
            }
        };
        if stale {
            self.clear_halt(plan.revision).await;
        }
        if let Some(metrics) = &self.options.metrics {
            metrics.set_halted(&self.group, is_halted);
        }
        is_halted
    }

    /// Writes that the group's halt is over, `revision` being newer than the halted
    /// one, so that no reader shows it any more.
    async fn clear_halt(&self, revision: u64) {
        let record = HaltRecord::Cleared {
            group: self.group.clone(),
            revision,
            at_ms: super::now_ms(),
        };
        if let Err(e) = self.write_halt(&record).await {
            warn!(group = %self.group, "the halt record still shows the older halt: {e}");
        }
    }

    async fn halt_channel(&self) -> Result<lapin::Channel> {
        open_channel(
            &self.connection,
            &self.options.broker.names().halt(&self.group)?,
        )
        .await
    }

    /// Writes the group's halt record on a channel of its own.
    async fn write_halt(&self, record: &HaltRecord) -> Result<()> {
        let channel = self.halt_channel().await?;
        let written = control::write_halt(&channel, self.options.broker.names(), record).await;
        best_effort_close(channel.close(200, "done".into())).await;
        written
    }

    /// Halts the group: remembered, written to the halt record, published, logged.
    async fn halt(&self, recorded: Halt, halted: &Mutex<Option<Halt>>) {
        error!(
            group = %self.group,
            revision = recorded.revision,
            "{recorded}; not tried again until a newer revision or `erel config retry --group {}`",
            self.group
        );
        let _ = self.events.send(MasterEvent::GroupHalted {
            group: self.group.clone(),
            revision: recorded.revision,
            host: recorded.host.clone(),
            reason: recorded.reason.clone(),
        });
        *halted.lock().unwrap_or_else(|e| e.into_inner()) = Some(recorded.clone());
        if let Some(metrics) = &self.options.metrics {
            metrics.set_halted(&self.group, true);
        }
        if let Err(e) = self.write_halt(&HaltRecord::Halted(recorded)).await {
            warn!(group = %self.group, "the halt is known to this master only: {e}");
        }
    }

    /// One rollout pass of the group; events logged and forwarded. `applied` is the
    /// revision last seen converged; a failure after a switch halts the group.
    async fn pass(&self, plan: &Plan, applied: &Mutex<Option<u64>>, halted: &Mutex<Option<Halt>>) {
        let options = RolloutOptions {
            groups: vec![self.group.clone()],
            ..self.options.rollout.clone()
        };
        let mut started = false;
        let forward = |event: &RolloutEvent| self.forward(plan, event, &mut started);
        let connector = &self.options.connector;
        let Some(report) =
            converge_pass(plan, connector, &options, self.options.interval, forward).await
        else {
            return;
        };
        let found = halt::halts_of(&report, super::now_ms());
        for (group, reason) in halt::waiting_of(&report, &found) {
            warn!(
                group,
                "group waiting: {reason}; not halted, the next pass tries again"
            );
        }
        if let Some(recorded) = found.into_iter().find(|h| h.group == self.group) {
            self.halt(recorded, halted).await;
            return;
        }
        if !report.converged() {
            return;
        }
        let mut applied = applied.lock().unwrap_or_else(|e| e.into_inner());
        if *applied != Some(plan.revision) || report.switched() > 0 {
            info!(
                group = %self.group,
                revision = plan.revision,
                switched = report.switched(),
                "revision applied"
            );
            let _ = self.events.send(MasterEvent::RevisionApplied {
                group: self.group.clone(),
                revision: plan.revision,
                switched: report.switched(),
            });
        }
        *applied = Some(plan.revision);
    }

    fn forward(&self, plan: &Plan, event: &RolloutEvent, started: &mut bool) {
        if let Some(metrics) = &self.options.metrics {
            metrics.record(event);
        }
        match event {
            RolloutEvent::HostPhase { host, phase, .. } => {
                if !*started
                    && matches!(
                        phase,
                        HostPhase::Staging | HostPhase::Stopping | HostPhase::Starting
                    )
                {
                    *started = true;
                    if let Some(group) = plan.groups.get(&self.group) {
                        info!(group = %self.group, release = %group.release, version = %group.version, "rollout started");
                        let _ = self.events.send(MasterEvent::RolloutStarted {
                            group: self.group.clone(),
                            revision: plan.revision,
                            release: group.release.clone(),
                            version: group.version.clone(),
                        });
                    }
                }
                debug!(group = %self.group, host, %phase, "host phase");
            }
            RolloutEvent::HostDone {
                host, version, pid, ..
            } => {
                info!(group = %self.group, host, version, pid, "host done")
            }
            RolloutEvent::HostFailed {
                host,
                addr,
                failure,
                ..
            } => {
                let HostFailure {
                    phase,
                    reason,
                    rolled_back,
                    ..
                } = failure;
                error!(group = %self.group, host, addr, %phase, rolled_back, "host failed: {reason}")
            }
            RolloutEvent::GroupHalted {
                reason, untouched, ..
            } => {
                // Logged once the pass is over, as the halt it is or as waiting.
                debug!(group = %self.group, ?untouched, "pass stopped: {reason}")
            }
            RolloutEvent::HostStopped {
                host, release, why, ..
            } => {
                info!(group = %self.group, host, release, %why, "release stopped ({why})")
            }
            RolloutEvent::HostVerdict {
                host,
                version,
                verdict,
                evidence,
                ..
            } => {
                info!(group = %self.group, host, version, %verdict, "{version} {verdict}: {evidence}")
            }
            RolloutEvent::HostDrain { host, outcome, .. } => {
                info!(group = %self.group, host, drained = outcome.drained, "{outcome}")
            }
            _ => debug!(group = %self.group, ?event, "rollout"),
        }
        if let Some(event) = MasterEvent::from_rollout(event) {
            let _ = self.events.send(event);
        }
    }
}

/// A revision as logs show it (`?` for a message without one).
fn display_revision(revision: Option<u64>) -> String {
    revision.map_or_else(|| "?".to_string(), |r| r.to_string())
}

/// Ends a session so that the next one reads the log again from the oldest revision
/// not applied yet.
fn reread_error(log_queue: &str) -> Error {
    Error::Amqp {
        target: log_queue.to_string(),
        action: "reading the config log".to_string(),
        message: format!(
            "more than {MAX_PENDING} revisions waited to be applied; reading the log again \
             from the oldest"
        ),
    }
}

/// Sets `retry` to fire after the next backoff delay when revisions are pending (or the
/// revision held waits for its plan) and no retry is set yet; resets the backoff when
/// nothing waits. Returns whether a retry is set.
fn arm_retry(
    position: &Position,
    retry: &mut Pin<Box<Sleep>>,
    backoff: &mut Backoff,
    retrying: bool,
) -> bool {
    if position.pending.is_empty() && !position.unplanned {
        backoff.reset();
        return false;
    }
    if !retrying {
        retry.as_mut().reset(Instant::now() + backoff.next_delay());
    }
    true
}

/// Resolves once the lease is no longer held.
async fn lost(holding: &mut watch::Receiver<bool>) {
    loop {
        if !*holding.borrow_and_update() {
            return;
        }
        if holding.changed().await.is_err() {
            return;
        }
    }
}

/// `1-3, 7` for a list of revisions.
fn summarize(revisions: impl Iterator<Item = u64>) -> String {
    let mut sorted: Vec<u64> = revisions.collect();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts = Vec::new();
    let mut iter = sorted.into_iter().peekable();
    while let Some(start) = iter.next() {
        let mut end = start;
        while iter.peek() == Some(&(end + 1)) {
            end += 1;
            iter.next();
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::{log, summarize, LogEntry, Position, MAX_PENDING};

    /// A log entry of `revision` at `offset`.
    fn entry(offset: u64, revision: u64) -> LogEntry {
        LogEntry {
            offset: Some(offset),
            revision: Some(revision),
            publisher: None,
            published_at_ms: None,
            message_id: None,
            body: Vec::new(),
            signed: None,
        }
    }

    #[test]
    fn a_pending_revision_holds_the_position_until_it_is_superseded() {
        let mut position = Position {
            held: Some(1),
            next_offset: Some(10),
            ..Position::default()
        };
        assert_eq!(position.resume(), log::From::Offset(10));
        // Revisions 3 (offset 8) and 2 (offset 5) wait; a reconnection resumes at 5.
        assert!(!position.keep_pending(vec![entry(8, 3), entry(5, 2)]));
        assert_eq!(position.resume(), log::From::Offset(5));
        assert_eq!(position.pending.len(), 2);
        // Revision 2 applied: only 3 waits, still from offset 5 (conservative).
        position.held = Some(2);
        let pending = std::mem::take(&mut position.pending);
        assert!(!position.keep_pending(pending));
        assert_eq!(position.pending.len(), 1);
        assert_eq!(position.resume(), log::From::Offset(5));
        // Revision 4 applied: nothing waits, the position is the log's.
        position.held = Some(4);
        let pending = std::mem::take(&mut position.pending);
        assert!(!position.keep_pending(pending));
        assert!(position.pending.is_empty());
        assert_eq!(position.resume(), log::From::Offset(10));
    }

    #[test]
    fn revisions_dropped_for_room_are_read_again_unless_superseded() {
        let count = MAX_PENDING as u64 + 4;
        let many: Vec<LogEntry> = (0..count).rev().map(|i| entry(i, 100 + i)).collect();
        let mut position = Position {
            held: Some(1),
            next_offset: Some(count),
            ..Position::default()
        };
        assert!(!position.keep_pending(many.clone()));
        assert_eq!(position.pending.len(), MAX_PENDING);
        assert_eq!(position.resume(), log::From::Offset(0));
        // Those kept all refused for good: the dropped ones must be read again.
        assert!(position.keep_pending(Vec::new()));
        assert_eq!(position.resume(), log::From::Offset(0));

        let mut position = Position {
            held: Some(1),
            next_offset: Some(count),
            ..Position::default()
        };
        assert!(!position.keep_pending(many));
        // A revision newer than every dropped one applied: nothing to read again.
        position.held = Some(100 + count);
        assert!(!position.keep_pending(Vec::new()));
        assert_eq!(position.resume(), log::From::Offset(count));
    }

    #[test]
    fn revision_lists_are_summarized_as_ranges() {
        assert_eq!(
            summarize([3, 1, 2, 7, 7, 9, 10].into_iter()),
            "1-3, 7, 9-10"
        );
        assert_eq!(summarize(std::iter::empty()), "");
    }
}
