//! The rolling cold deploy: brings every host of a cluster to its group's desired
//! release version, a bounded number of hosts at a time, gated on health, rolled back
//! when the new version is not healthy.
//!
//! - [`decide`]: the pure decisions (what a host needs, the per-host switch as a state
//!   machine, whether a release is healthy yet, which hosts may switch now), tested
//!   without a network.
//! - `driver`: performs what decide asks: ping, stage, stop, start, roll back; it
//!   respects `max_in_flight` through [`decide::GroupSchedule`].
//! - `health`: the I/O of verification: watching a started release (pings, the TCP
//!   and HTTP probes) until decide gives a verdict, with its evidence; the drain
//!   request before a stop.
//! - [`run`] (`runner`): one rollout, its events handed to a callback as they happen;
//!   `deploy`, `demo` and both daemons run rollouts through it.
//! - [`converge`]: the daemons' one loop: converge again every few seconds, so drift is
//!   repaired, and at once when a newer plan arrives (from the cluster file, or from the
//!   AMQP config log).
//!
//! Per host: ping → stage (push, skipped when present; unpack into
//! `releases/<name>/<version>`) → drain old (if the group says) → stop old → start
//! new → verify (up `min_up_secs` without a restart, every TCP/HTTP probe passing
//! `passes` looks in a row, within `deadline_secs`; each verdict sent as a
//! [`RolloutEvent::HostVerdict`] with its [`Evidence`]) → done. On failure:
//! stop new, start old (with the group's argv and env, see
//! [`crate::cluster::GroupPlan::start_request`]), verify old, report the host failed
//! with the release's own output. Staging runs ahead on every host of the group, so a
//! host is down only between stop and start. Progress goes out as [`RolloutEvent`]s.
//!
//! The same rollout restarts, stops or rolls back a group ([`Operation`]), on the hosts
//! `--hosts`/`--exclude` select. A deploy also stops the release of a group marked
//! `state = "stopped"`, and the release a host still runs after it left a group (found
//! by pinging the cluster's hosts; releases no group names are never touched). Hosts
//! that fail or do not answer spend the group's `max_failed` before it halts.

pub(crate) mod converge;
pub(crate) mod decide;
mod driver;
pub mod halt;
mod health;
pub mod hold;
mod runner;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

pub(crate) use converge::{converge_file, keep_converged, ConvergeOptions};
pub use decide::{Evidence, ProbeAnswer, VerdictKind};
pub use driver::PlannedHost;
pub(crate) use driver::{check_selection, planned_operation, planned_stops};
pub(crate) use health::probe_all;
pub use runner::run;

use crate::client::Connector;

/// Where the driver's events go; [`run`] hands them to its caller's callback.
pub(crate) type EventSink = tokio::sync::mpsc::UnboundedSender<RolloutEvent>;

/// What a rollout does to each selected host of a group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// Bring it to the group's desired state: its version running, healthy (or its
    /// release stopped, for a group with `state = "stopped"`); and stop the release on
    /// hosts that left the group (see [`run`]).
    #[default]
    Deploy,
    /// A rolling cold restart of the version each host runs (never the group's
    /// configured version): canaries, `max_in_flight`, the health gate; a host that
    /// fails is started once more with the same version; a host where the release is
    /// not running is left as it is.
    Restart,
    /// Stop the group's release, at most `max_in_flight` hosts at once, each with the
    /// group's `stop_grace_secs`.
    Stop,
    /// Back to the previous version at once: a host on the group's version goes to the
    /// newest version unpacked before it (or to [`RolloutOptions::rollback_to`]), a
    /// host on another version is left as it is; at most `max_in_flight` hosts at once,
    /// no canary phase, the health gate.
    Rollback,
}

/// How a rollout runs, beyond what the cluster file says.
#[derive(Debug, Clone)]
pub struct RolloutOptions {
    /// Only these groups (empty: every group).
    pub groups: Vec<String>,
    /// Only these hosts of the selected groups (empty: every host). An id the cluster
    /// file does not name, or that no selected group holds, is refused.
    pub hosts: Vec<String>,
    /// Never these hosts (checked like `hosts`).
    pub exclude: Vec<String>,
    /// What is done to each host.
    pub operation: Operation,
    /// For [`Operation::Rollback`]: the version every selected host goes to
    /// (`--to VERSION`); `None`, the version unpacked before the group's.
    pub rollback_to: Option<String>,
    /// How often a starting release is looked at.
    pub poll_interval: Duration,
    /// Hosts staged at once in each group, at least: a group whose `max_in_flight` is larger
    /// stages as many at once while the pushes' buffers stay within 32 MiB.
    pub staging_parallel: usize,
    /// Time allowed for one health probe (a TCP connect, or an HTTP `GET` up to its
    /// status line).
    pub probe_timeout: Duration,
}

impl Default for RolloutOptions {
    fn default() -> Self {
        RolloutOptions {
            groups: Vec::new(),
            hosts: Vec::new(),
            exclude: Vec::new(),
            operation: Operation::Deploy,
            rollback_to: None,
            poll_interval: Duration::from_millis(200),
            staging_parallel: 8,
            probe_timeout: DEFAULT_PROBE_TIMEOUT,
        }
    }
}

/// Time one health probe may take unless [`RolloutOptions::probe_timeout`] says
/// otherwise; `erel status` gives its one look at each probe the same time.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Where a host is in its rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HostPhase {
    /// Asking the agent for its state.
    Pinging,
    /// Pushing and unpacking the archive.
    Staging,
    /// Staged; waiting for its turn to switch.
    Staged,
    /// Stopping the old version (the host is down from here).
    Stopping,
    /// Starting the new version.
    Starting,
    /// Waiting for the new version to prove healthy.
    Verifying,
    /// Stopping the failed new version.
    RollingBack,
    /// Waiting for the restarted old version to prove healthy.
    VerifyingOld,
}

/// The phase as its JSON spells it (`stopping`, `rolling_back`), so that a deploy's
/// text and its `--json` name a phase the same way.
impl fmt::Display for HostPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HostPhase::Pinging => "pinging",
            HostPhase::Staging => "staging",
            HostPhase::Staged => "staged",
            HostPhase::Stopping => "stopping",
            HostPhase::Starting => "starting",
            HostPhase::Verifying => "verifying",
            HostPhase::RollingBack => "rolling_back",
            HostPhase::VerifyingOld => "verifying_old",
        })
    }
}

/// What happens during a rollout, as it happens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum RolloutEvent {
    /// A group's rollout begins.
    GroupStarted {
        /// Group name.
        group: String,
        /// Release name.
        release: String,
        /// Desired version.
        version: String,
        /// Hosts in the group.
        hosts: usize,
        /// What is done to them: a deploy, or a group `restart`, `stop`, `rollback`
        /// (which do not go to `version`).
        operation: Operation,
    },
    /// A host entered a phase.
    HostPhase {
        /// Group name.
        group: String,
        /// Host id.
        host: String,
        /// The phase.
        phase: HostPhase,
    },
    /// Verification reached a verdict on a started release (the new version, or the
    /// old one restarted by a rollback), on this evidence.
    HostVerdict {
        /// Group name.
        group: String,
        /// Host id.
        host: String,
        /// The version judged.
        version: String,
        /// Healthy, unhealthy, or not healthy by the deadline.
        verdict: VerdictKind,
        /// What the verdict rests on.
        evidence: Evidence,
    },
    /// A running release was asked to drain before its stop; the stop follows
    /// whatever the answer.
    HostDrain {
        /// Group name.
        group: String,
        /// Host id.
        host: String,
        /// What was asked and answered.
        #[serde(flatten)]
        outcome: DrainOutcome,
    },
    /// A host runs the desired version, healthy, after a switch.
    HostDone {
        /// Group name.
        group: String,
        /// Host id.
        host: String,
        /// The version it runs now.
        version: String,
        /// The release's process id.
        pid: u32,
    },
    /// The release was stopped on a host: its group is stopped (`state = "stopped"` or
    /// `erel stop`), or the host left the group.
    HostStopped {
        /// Group name.
        group: String,
        /// Host id.
        host: String,
        /// Release name.
        release: String,
        /// Why it was stopped.
        why: StopReason,
    },
    /// A host already ran the desired version, healthy, or the operation left it as it
    /// is (`why` says why): nothing was done.
    HostSkipped {
        /// Group name.
        group: String,
        /// Host id.
        host: String,
        /// The version it runs.
        version: String,
        /// Why it was left as it is, when it is not simply up to date.
        #[serde(skip_serializing_if = "Option::is_none")]
        why: Option<String>,
    },
    /// A host failed; the group halts when its failure budget (`max_failed`) is spent.
    HostFailed {
        /// Group name.
        group: String,
        /// Host id.
        host: String,
        /// Its agent's address.
        addr: String,
        /// How it failed.
        #[serde(flatten)]
        failure: HostFailure,
    },
    /// A group stopped after a failure; the listed hosts were not touched.
    GroupHalted {
        /// Group name.
        group: String,
        /// Why.
        reason: String,
        /// Hosts never switched.
        untouched: Vec<String>,
    },
    /// A group finished (halted or not).
    GroupDone {
        /// Group name.
        group: String,
        /// Hosts switched to the desired version.
        switched: usize,
        /// Hosts already on it.
        skipped: usize,
        /// Hosts that failed.
        failed: usize,
        /// Hosts whose release was stopped (a stopped group, a host that left it).
        stopped: usize,
    },
}

impl RolloutEvent {
    /// The group and host an event is about; `None` for the group-wide events
    /// (`GroupStarted`, `GroupHalted`, `GroupDone`).
    pub fn group_and_host(&self) -> Option<(&str, &str)> {
        match self {
            RolloutEvent::HostPhase { group, host, .. }
            | RolloutEvent::HostVerdict { group, host, .. }
            | RolloutEvent::HostDrain { group, host, .. }
            | RolloutEvent::HostDone { group, host, .. }
            | RolloutEvent::HostStopped { group, host, .. }
            | RolloutEvent::HostSkipped { group, host, .. }
            | RolloutEvent::HostFailed { group, host, .. } => Some((group, host)),
            RolloutEvent::GroupStarted { .. }
            | RolloutEvent::GroupHalted { .. }
            | RolloutEvent::GroupDone { .. } => None,
        }
    }
}

/// Whether a failed host was returned to its previous state, in the words reports use:
/// "NOT rolled back" only when the failure came after the host's running release was
/// touched (`host_changed`, see [`HostPhase::changes_host`]).
pub(crate) fn rollback_words(rolled_back: bool, host_changed: bool) -> &'static str {
    if rolled_back {
        "rolled back"
    } else if host_changed {
        "NOT rolled back"
    } else {
        "its running release was not touched"
    }
}

impl HostPhase {
    /// Whether a failure in this phase may have changed what runs on the host: from
    /// stopping the old version on. Pinging and staging leave the running release
    /// as it was (staging only adds files beside it).
    pub fn changes_host(self) -> bool {
        !matches!(
            self,
            HostPhase::Pinging | HostPhase::Staging | HostPhase::Staged
        )
    }
}

/// How a host failed: the one failure type of a host's rollout, in its event and in
/// its outcome alike.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostFailure {
    /// The phase that failed.
    pub phase: HostPhase,
    /// What went wrong.
    pub reason: String,
    /// The failed release's own last output, from `Ping`.
    pub output_tail: String,
    /// Whether the host was returned to its previous state.
    pub rolled_back: bool,
}

impl HostFailure {
    /// Whether the host was returned to its previous state, in the words reports use
    /// (see [`HostPhase::changes_host`]).
    pub fn rollback_words(&self) -> &'static str {
        rollback_words(self.rolled_back, self.phase.changes_host())
    }

    /// A failure in `phase`, without output, not rolled back.
    pub fn new(phase: HostPhase, reason: impl Into<String>) -> Self {
        HostFailure {
            phase,
            reason: reason.into(),
            output_tail: String::new(),
            rolled_back: false,
        }
    }
}

/// Why a release was stopped on a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The group is marked `state = "stopped"`.
    GroupStopped,
    /// An operator asked for it (`erel stop --group`).
    Asked,
    /// The host runs a release some group names, but no group of the host does any more.
    LeftGroup,
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StopReason::GroupStopped => "the group is stopped",
            StopReason::Asked => "stop asked",
            StopReason::LeftGroup => "the host left the group",
        })
    }
}

/// The drain request sent before a running release's stop, and its answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DrainOutcome {
    /// The version that was running, when the agent said.
    pub version: Option<String>,
    /// The request: `POST http://HOST:PORT/PATH`.
    pub request: String,
    /// Whether it answered with a 2xx status (drained) within the timeout.
    pub drained: bool,
    /// The HTTP status it answered, if it answered.
    pub status: Option<u16>,
    /// What it answered: `HTTP 200 OK`, or why there was no answer (`connection
    /// refused`, `no answer within 10s`).
    pub answer: String,
    /// How long it took, in milliseconds.
    pub took_ms: u64,
    /// The drain timeout, in seconds.
    pub timeout_secs: u64,
}

impl fmt::Display for DrainOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = if self.drained {
            "drained"
        } else {
            "NOT drained"
        };
        let verb = if self.status.is_some() {
            "answered"
        } else {
            "got no answer:"
        };
        write!(
            f,
            "{what}: {} {verb} {} in {}ms",
            self.request, self.answer, self.took_ms
        )?;
        if !self.drained {
            write!(f, " (timeout {}s); stopping it anyway", self.timeout_secs)?;
        }
        Ok(())
    }
}

/// How one host ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum HostOutcome {
    /// Switched to a version (the desired one; for a rollback, the previous one),
    /// healthy.
    Switched {
        /// The version it ran before.
        from: Option<String>,
        /// The version it runs now.
        version: String,
        /// The new process id.
        pid: u32,
    },
    /// The release was stopped, as asked.
    Stopped {
        /// Why.
        why: StopReason,
    },
    /// It already ran the desired version, healthy.
    UpToDate,
    /// The operation left it as it is (a rollback of a host not on the group's version,
    /// a restart of a host where the release is not running).
    Left {
        /// Why, in words.
        why: String,
        /// The version it runs (or ran last); empty when it never ran the release.
        version: String,
    },
    /// It failed.
    Failed(HostFailure),
    /// The group halted before this host's turn.
    Untouched,
}

/// One host's line in the summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostReport {
    /// Host id.
    pub host: String,
    /// Its agent's address.
    pub addr: String,
    /// How it ended.
    #[serde(flatten)]
    pub outcome: HostOutcome,
}

/// One group's summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupReport {
    /// Group name.
    pub group: String,
    /// Release name.
    pub release: String,
    /// Desired version.
    pub version: String,
    /// Why the group halted, if it did.
    pub halted: Option<String>,
    /// Every host of the group, in file order.
    pub hosts: Vec<HostReport>,
}

impl GroupReport {
    /// True when every host of the group runs its desired version, healthy, was left
    /// as it is, or was stopped as asked.
    pub fn converged(&self) -> bool {
        self.hosts.iter().all(|h| {
            h.outcome.is_switched()
                || matches!(h.outcome, HostOutcome::UpToDate | HostOutcome::Left { .. })
                || h.outcome.is_stopped()
        })
    }
}

/// The summary of a rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RolloutReport {
    /// The cluster file's revision.
    pub revision: u64,
    /// Every group rolled out.
    pub groups: Vec<GroupReport>,
    /// Waiting hosts (in no group) that did not answer the deploy's ping for releases
    /// they left: what they run is unknown, so the rollout cannot have converged. Each
    /// is [`HostOutcome::Failed`] while pinging.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unanswered: Vec<HostReport>,
}

impl RolloutReport {
    /// True when every host of the groups rolled out runs its desired version, healthy.
    /// Says nothing of [`RolloutReport::unanswered`] waiting hosts: a daemon's pass for
    /// one group is not held back by a spare host that is down; see
    /// [`RolloutReport::complete`].
    pub fn converged(&self) -> bool {
        self.groups.iter().all(GroupReport::converged)
    }

    /// [`RolloutReport::converged`], and every waiting host answered: what `erel deploy`
    /// exits 0 for.
    pub fn complete(&self) -> bool {
        self.converged() && self.unanswered.is_empty()
    }

    /// The names of the groups that did not converge, in report order.
    pub fn unconverged_groups(&self) -> Vec<&str> {
        self.groups
            .iter()
            .filter(|g| !g.converged())
            .map(|g| g.group.as_str())
            .collect()
    }

    /// Hosts switched in this rollout.
    pub fn switched(&self) -> usize {
        self.hosts().filter(|h| h.outcome.is_switched()).count()
    }

    /// Hosts whose release was stopped.
    pub fn stopped(&self) -> usize {
        self.hosts().filter(|h| h.outcome.is_stopped()).count()
    }

    /// Hosts that failed.
    pub fn failed(&self) -> usize {
        self.hosts().filter(|h| h.outcome.is_failed()).count()
    }

    fn hosts(&self) -> impl Iterator<Item = &HostReport> {
        self.groups
            .iter()
            .flat_map(|g| g.hosts.iter())
            .chain(&self.unanswered)
    }
}

impl HostOutcome {
    /// Switched to the desired version.
    pub fn is_switched(&self) -> bool {
        matches!(self, HostOutcome::Switched { .. })
    }

    /// Its release was stopped.
    pub fn is_stopped(&self) -> bool {
        matches!(self, HostOutcome::Stopped { .. })
    }

    /// Failed.
    pub fn is_failed(&self) -> bool {
        matches!(self, HostOutcome::Failed(_))
    }
}

/// How many of `reports` ended as `which` says.
pub(crate) fn count(reports: &[HostReport], which: impl Fn(&HostOutcome) -> bool) -> usize {
    reports.iter().filter(|r| which(&r.outcome)).count()
}

/// Sends an event; a sink nobody listens to any more is not an error.
pub(crate) fn emit(events: &EventSink, event: RolloutEvent) {
    let _ = events.send(event);
}

/// Shared by the tasks of one rollout.
#[derive(Debug)]
pub(crate) struct Shared {
    pub connector: Connector,
    pub options: RolloutOptions,
    pub events: EventSink,
}

pub(crate) type SharedRef = Arc<Shared>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_phase_reads_the_same_as_text_and_as_json() {
        let phases = [
            HostPhase::Pinging,
            HostPhase::Staging,
            HostPhase::Staged,
            HostPhase::Stopping,
            HostPhase::Starting,
            HostPhase::Verifying,
            HostPhase::RollingBack,
            HostPhase::VerifyingOld,
        ];
        for phase in phases {
            let json = serde_json::to_value(phase).expect("encode");
            assert_eq!(json.as_str(), Some(phase.to_string().as_str()), "{phase:?}");
        }
        assert_eq!(HostPhase::RollingBack.to_string(), "rolling_back");
    }

    #[test]
    fn a_drain_says_whether_the_stop_proceeds_without_it() {
        let mut outcome = DrainOutcome {
            version: Some("0.1.0".into()),
            request: "POST http://10.0.0.11:8080/drain".into(),
            drained: true,
            status: Some(200),
            answer: "HTTP 200 OK".into(),
            took_ms: 12,
            timeout_secs: 10,
        };
        assert_eq!(
            outcome.to_string(),
            "drained: POST http://10.0.0.11:8080/drain answered HTTP 200 OK in 12ms"
        );
        outcome.drained = false;
        outcome.status = Some(503);
        outcome.answer = "HTTP 503 Service Unavailable".into();
        assert_eq!(
            outcome.to_string(),
            "NOT drained: POST http://10.0.0.11:8080/drain answered HTTP 503 Service Unavailable \
             in 12ms (timeout 10s); stopping it anyway"
        );
        outcome.status = None;
        outcome.answer = "Connection refused (os error 111)".into();
        let text = outcome.to_string();
        assert!(
            text.contains("got no answer: Connection refused")
                && text.ends_with("stopping it anyway"),
            "{text}"
        );
        let event = RolloutEvent::HostDrain {
            group: "web".into(),
            host: "web-1".into(),
            outcome,
        };
        let json = serde_json::to_string(&event).unwrap();
        assert!(
            json.starts_with(
                r#"{"event":"host_drain","group":"web","host":"web-1","version":"0.1.0","#
            ),
            "{json}"
        );
    }

    #[test]
    fn a_failure_reads_the_same_in_its_event_and_its_outcome() {
        let failure = HostFailure {
            phase: HostPhase::Verifying,
            reason: "0.2.0: exited with code 3".into(),
            output_tail: "boom".into(),
            rolled_back: true,
        };
        let event = RolloutEvent::HostFailed {
            group: "web".into(),
            host: "web-1".into(),
            addr: "127.0.0.1:1".into(),
            failure: failure.clone(),
        };
        assert_eq!(
            serde_json::to_string(&event).unwrap(),
            r#"{"event":"host_failed","group":"web","host":"web-1","addr":"127.0.0.1:1","phase":"verifying","reason":"0.2.0: exited with code 3","output_tail":"boom","rolled_back":true}"#
        );
        let report = HostReport {
            host: "web-1".into(),
            addr: "127.0.0.1:1".into(),
            outcome: HostOutcome::Failed(failure),
        };
        assert_eq!(
            serde_json::to_string(&report).unwrap(),
            r#"{"host":"web-1","addr":"127.0.0.1:1","outcome":"failed","phase":"verifying","reason":"0.2.0: exited with code 3","output_tail":"boom","rolled_back":true}"#
        );
    }
}
