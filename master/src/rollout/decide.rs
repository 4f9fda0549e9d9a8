//! The rollout's decisions, as pure functions of what the agents reported: what a host
//! needs ([`assess`]; for a restart [`assess_restart`], for a rollback
//! [`rollback_target`]), staging as a small state machine ([`Staging`]: unpack what is
//! there, push what is missing), the per-host switch as a state machine ([`HostSwitch`]:
//! each observation gives the next action, rollback included), whether a freshly started
//! release is healthy yet ([`verify`]), how long each phase may take ([`phase_budget`],
//! [`Health::deadline`] for verification), and which hosts of a group may switch now,
//! halting once the failures spend the group's budget, `max_failed`
//! ([`GroupSchedule`]). No I/O here: the driver observes, these decide, the driver acts.
//! When a failed command is tried again is the client's
//! ([`crate::client::retry::RetryPolicy`]).

use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

use erel_proto::{ReleaseState, ReleaseStatus};
use serde::Serialize;
use time::OffsetDateTime;

use super::{HostFailure, HostPhase};
use crate::client::budget::{stop_budget, PING_BUDGET, START_BUDGET, UNPACK_BUDGET};
use crate::cluster::{GroupPlan, Health};

/// How long a failed release's output is waited for when it restarted unseen.
const OUTPUT_TAIL_WAIT: Duration = Duration::from_secs(2);

/// How long the agent may take to answer the command a host's `phase` sends, once sent:
/// one bound per phase, none wrapped around another. The bound is per attempt: a command
/// whose connection broke is sent once more on a new one ([`crate::client::retry::RetryPolicy`]), so a phase
/// may take up to twice its bound. Staging's bound is `Unpack`'s; its
/// `WriteFile` is bounded per step by the transfer's stall timeout instead. The rollback
/// sends `Stop` and `Start`, so the driver asks for [`HostPhase::Stopping`] and
/// [`HostPhase::Starting`] as it sends them; verification as a whole is bounded by
/// [`Health::deadline`] (see [`verify`]), each look in it by `Ping`'s bound.
pub(crate) fn phase_budget(phase: HostPhase, group: &GroupPlan) -> Duration {
    match phase {
        HostPhase::Pinging | HostPhase::Verifying | HostPhase::VerifyingOld => PING_BUDGET,
        HostPhase::Staging | HostPhase::Staged => UNPACK_BUDGET,
        HostPhase::Starting => START_BUDGET,
        HostPhase::Stopping | HostPhase::RollingBack => stop_budget(group.stop_grace),
    }
}

/// The version a host ran before the switch, to return to if the new one fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Previous {
    /// The version.
    pub version: String,
    /// Whether it ran (or was meant to run): only then does a rollback start it again.
    pub was_running: bool,
}

/// What a host needs to reach the desired version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Assessment {
    /// It runs the desired version, healthy: nothing to do.
    UpToDate,
    /// It runs the desired version, started moments ago (a deploy interrupted between
    /// start and verification): verify it, without switching again.
    Verify {
        /// The running process.
        pid: u32,
        /// How long it has been up.
        up: Duration,
        /// Where to return if it fails.
        previous: Option<Previous>,
    },
    /// Nothing is done to it, for the reason given (a rollback or a restart that does
    /// not concern what the host runs): reported, and it counts as settled.
    Leave {
        /// Why, in words: what it runs and why that is left as it is.
        why: String,
    },
    /// Stage (unless present), stop, start, verify.
    Switch {
        /// Where to return if the new version fails.
        previous: Option<Previous>,
        /// The desired version is already unpacked on the host.
        staged: bool,
        /// The release runs, or is meant to (a crash loop): it is stopped first. When
        /// nothing runs (a first install, or a release stopped on purpose) the switch
        /// starts at once and no `stopping` phase is reported.
        stop_first: bool,
    },
}

/// Decides what a host needs, from its `Ping` status for the release (`None` when the
/// agent does not know the release) and, when it runs the desired version and the group
/// has a TCP probe, whether the probe answered.
pub(crate) fn assess(
    status: Option<&ReleaseStatus>,
    version: &str,
    health: &Health,
    probe_ok: Option<bool>,
) -> Assessment {
    let Some(status) = status else {
        return Assessment::Switch {
            previous: None,
            staged: false,
            stop_first: false,
        };
    };
    let staged = status.versions.iter().any(|v| v == version);
    let current = status.version.as_deref();
    let runs_desired =
        current == Some(version) && status.state == ReleaseState::Running && status.desired_running;
    if runs_desired {
        let up = Duration::from_secs(status.up_secs.unwrap_or(0));
        if up >= health.min_up && probe_ok != Some(false) {
            return Assessment::UpToDate;
        }
        if up < health.min_up {
            if let Some(pid) = status.pid {
                return Assessment::Verify {
                    pid,
                    up,
                    previous: unpacked_before(status, version, true),
                };
            }
        }
        // Up long enough but the probe fails: restart it; nothing older to return to
        // unless an older version is present.
        return Assessment::Switch {
            previous: unpacked_before(status, version, true),
            staged,
            stop_first: true,
        };
    }
    let previous = match current {
        Some(old) if old != version => Some(Previous {
            version: old.to_string(),
            was_running: status.desired_running || status.state == ReleaseState::Running,
        }),
        // The desired version is known but not running (crashed, or stopped by hand):
        // if it fails again, the version unpacked before it is where to go (not a
        // newer one only staged, which never ran), and only when the release was
        // meant to run.
        _ => unpacked_before(status, version, status.desired_running),
    };
    let stop_first = status.desired_running || status.state != ReleaseState::Stopped;
    Assessment::Switch {
        previous,
        staged,
        stop_first,
    }
}

/// What a host needs for a rolling restart: the version it runs, stopped and started
/// again (never the group's configured version, which may be one a deploy halted).
/// A failed restart returns by starting that version once more. A host where the
/// release is not running (unknown, never started, or stopped) is left as it is: a
/// restart does not start what was stopped (`erel restart HOST NAME` does). Returns
/// the assessment and the version restarted.
pub(crate) fn assess_restart(
    status: Option<&ReleaseStatus>,
    release: &str,
) -> (Assessment, String) {
    let running = status.and_then(|s| {
        let runs = s.state == ReleaseState::Running || s.desired_running;
        s.version.as_deref().filter(|_| runs)
    });
    let Some(current) = running else {
        let what = match status.and_then(|s| s.version.as_deref()) {
            None => format!("{release} never ran here"),
            Some(v) => format!("{release} {v} is not running here"),
        };
        let version = status.and_then(|s| s.version.clone()).unwrap_or_default();
        return (
            Assessment::Leave {
                why: format!("{what}: left as it is (`erel restart HOST {release}` starts it)"),
            },
            version,
        );
    };
    (
        Assessment::Switch {
            previous: Some(Previous {
                version: current.to_string(),
                was_running: true,
            }),
            staged: true,
            stop_first: true,
        },
        current.to_string(),
    )
}

/// Whether the group's `restarted_at` asks for a restart of the release whose `Ping`
/// status is `status` (see [`assess_restart`] for the restart itself): it runs `version`,
/// the agent reports how long it has been up (`up_secs`), and it started before
/// `restarted_at`, its start being the master's `now` (when the agent answered) less
/// that up time, so host clocks play no part. Nothing is due before `now` reaches
/// `restarted_at`: a host restarted before that instant would otherwise be restarted
/// again at every pass until then. Modelled on `kubectl rollout restart`, which sets a
/// `restartedAt` annotation; here the start of each release is compared with it, so no
/// state is kept and every master decides alike.
pub(crate) fn restart_due(
    status: Option<&ReleaseStatus>,
    version: &str,
    restarted_at: OffsetDateTime,
    now: OffsetDateTime,
) -> bool {
    let Some(status) = status else {
        return false;
    };
    let runs_desired = status.version.as_deref() == Some(version)
        && status.state == ReleaseState::Running
        && status.desired_running;
    let Some(up_secs) = status.up_secs.filter(|_| runs_desired) else {
        return false;
    };
    if now < restarted_at {
        return false;
    }
    let up = time::Duration::seconds(i64::try_from(up_secs).unwrap_or(i64::MAX));
    now.checked_sub(up)
        .is_none_or(|started| started < restarted_at)
}

impl Assessment {
    /// Whether this switch starts `version` again on a host that ran it (a restart in
    /// place, [`assess_restart`]): a failed one returns by starting `version` once more
    /// ([`HostSwitch::begin_restart`]).
    pub(crate) fn restarts_in_place(&self, version: &str) -> bool {
        matches!(
            self,
            Assessment::Switch { previous: Some(p), .. } if p.version == version && p.was_running
        )
    }
}

/// Where `erel rollback` takes a host, from its `Ping` status (versions are listed
/// oldest first, in the order they were unpacked: see PROTOCOL.md, `Ping`):
///
/// - with `to` (`--to VERSION`): that version, which must be present;
/// - else a host that runs (or ran last) the group's `version` goes to the newest
///   version unpacked before it: a version staged after it (say by a deploy that
///   halted) never ran, and is not gone back to;
/// - else the host is left as it is ([`Assessment::Leave`]): it never switched to the
///   group's version, or was rolled back already.
///
/// Returns the assessment (a switch with the current version as the way back, or
/// `Leave`) and the version gone to (for `Leave`, the one it runs). `Err` says why
/// there is nothing to go back to, naming the versions present.
pub(crate) fn rollback_target(
    status: Option<&ReleaseStatus>,
    release: &str,
    version: &str,
    to: Option<&str>,
) -> Result<(Assessment, String), String> {
    let Some(status) = status else {
        return Err(format!("the agent knows no release {release}"));
    };
    let present = || status.versions.join(", ");
    let Some(current) = status.version.as_deref() else {
        return Err(format!(
            "{release} never ran here: nothing to roll back from"
        ));
    };
    let runs = status.desired_running || status.state == ReleaseState::Running;
    let target = match to {
        Some(to) => {
            if !status.versions.iter().any(|v| v == to) {
                return Err(format!(
                    "{release} {to} is not present here (present, oldest first: {})",
                    present()
                ));
            }
            if current == to && runs {
                return Ok((
                    Assessment::Leave {
                        why: format!("runs {release} {to} already"),
                    },
                    to.to_string(),
                ));
            }
            to
        }
        None => {
            if current != version {
                return Ok((
                    Assessment::Leave {
                        why: format!(
                            "runs {release} {current}, not the group's {version}: left as it \
                             is (it never switched, or was rolled back already)"
                        ),
                    },
                    current.to_string(),
                ));
            }
            let listed = status.versions.iter().any(|v| v == current);
            match unpacked_before(status, current, runs).filter(|_| listed) {
                Some(before) => return Ok((switch_from(current, runs), before.version)),
                None => {
                    return Err(format!(
                        "no version of {release} was unpacked before {current} (present, \
                         oldest first: {}); name one with --to VERSION",
                        present()
                    ))
                }
            }
        }
    };
    Ok((switch_from(current, runs), target.to_string()))
}

/// A switch whose way back is `current`, already present.
fn switch_from(current: &str, was_running: bool) -> Assessment {
    Assessment::Switch {
        previous: Some(Previous {
            version: current.to_string(),
            was_running,
        }),
        staged: true,
        stop_first: true,
    }
}

/// The newest version unpacked before `version` (versions are listed oldest first),
/// or, when `version` is not present, the newest one.
fn unpacked_before(status: &ReleaseStatus, version: &str, was_running: bool) -> Option<Previous> {
    let before = status
        .versions
        .iter()
        .position(|v| v == version)
        .unwrap_or(status.versions.len());
    status.versions[..before].last().map(|v| Previous {
        version: v.clone(),
        was_running,
    })
}

/// What one probe answered at one look.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProbeAnswer {
    /// What was probed: `tcp HOST:PORT`, or `http GET HOST:PORT/PATH`.
    pub probe: String,
    /// Whether it passed: a connection accepted (TCP), a 2xx status (HTTP).
    pub passed: bool,
    /// What it answered: `connected`, `HTTP 200 OK`, or why there was no answer
    /// (`connection refused`, `no answer within 1s`).
    pub answer: String,
    /// How long it took, in milliseconds.
    pub took_ms: u64,
}

impl std::fmt::Display for ProbeAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let passed = if self.passed { "pass" } else { "FAIL" };
        write!(
            f,
            "{} {passed}: {} in {}ms",
            self.probe, self.answer, self.took_ms
        )
    }
}

/// What a verdict rests on, so that a false pass or a false failure can be seen
/// afterwards: the probes' last answers, the consecutive passes counted, and the
/// agent's own figures.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Evidence {
    /// The last answer of each configured probe (empty when none was due yet).
    pub probes: Vec<ProbeAnswer>,
    /// Consecutive looks at which every configured probe passed.
    pub passes: u32,
    /// Consecutive passes needed (`health.passes`; 0 without a probe).
    pub passes_needed: u32,
    /// Seconds the process has been up, as the agent reports it.
    pub up_secs: Option<u64>,
    /// Restarts the agent counted since the start.
    pub restarts: u32,
    /// The process the agent reports.
    pub pid: Option<u32>,
    /// Milliseconds since verification began.
    pub elapsed_ms: u64,
}

impl std::fmt::Display for Evidence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for answer in &self.probes {
            write!(f, "{answer}; ")?;
        }
        if self.passes_needed > 0 {
            write!(
                f,
                "{}/{} consecutive passes; ",
                self.passes, self.passes_needed
            )?;
        }
        match self.up_secs {
            Some(up) => write!(f, "agent: up {up}s")?,
            None => write!(f, "agent: not up")?,
        }
        write!(f, ", {} restart(s)", self.restarts)?;
        if let Some(pid) = self.pid {
            write!(f, ", pid {pid}")?;
        }
        write!(f, "; after {:.1}s", self.elapsed_ms as f64 / 1000.0)
    }
}

/// Which verdict verification reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VerdictKind {
    /// Up long enough, unrestarted, every probe passed often enough.
    Healthy,
    /// It failed before the deadline (exited, restarted, another version runs).
    Unhealthy,
    /// It was not healthy when the deadline came.
    Deadline,
}

impl std::fmt::Display for VerdictKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VerdictKind::Healthy => "healthy",
            VerdictKind::Unhealthy => "UNHEALTHY",
            VerdictKind::Deadline => "NOT HEALTHY BY THE DEADLINE",
        })
    }
}

/// What one look at a freshly started release says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Up long enough, unrestarted, and every probe (if any) passed `passes` times in a
    /// row; on what evidence.
    Healthy(Evidence),
    /// Not yet; look again.
    Wait,
    /// It failed before the deadline: why, on what evidence.
    Unhealthy {
        /// Why.
        reason: String,
        /// What the verdict rests on.
        evidence: Evidence,
    },
    /// It was not healthy within `health.deadline_secs`: why, on what evidence.
    Deadline {
        /// Why (the failing probe's answer, the passes short, or the time not up).
        reason: String,
        /// What the verdict rests on.
        evidence: Evidence,
    },
    /// The agent could not be asked (why): the host fails at once, with no output to
    /// wait for.
    Lost(String),
}

impl Verdict {
    /// The verdict reached, with its evidence; `None` for [`Verdict::Wait`] and
    /// [`Verdict::Lost`] (no verdict on the release itself).
    pub(crate) fn evidence(&self) -> Option<(VerdictKind, &Evidence)> {
        match self {
            Verdict::Healthy(evidence) => Some((VerdictKind::Healthy, evidence)),
            Verdict::Unhealthy { evidence, .. } => Some((VerdictKind::Unhealthy, evidence)),
            Verdict::Deadline { evidence, .. } => Some((VerdictKind::Deadline, evidence)),
            Verdict::Wait | Verdict::Lost(_) => None,
        }
    }
}

/// Consecutive looks at which every configured probe passed: a look with a failing
/// probe resets the count to 0; a look at which no probe was due leaves it as it is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct PassCount(u32);

impl PassCount {
    /// Counts one look's probe answers; the count after it.
    pub(crate) fn record(&mut self, answers: &[ProbeAnswer]) -> u32 {
        if answers.is_empty() {
            return self.0;
        }
        if answers.iter().all(|a| a.passed) {
            self.0 = self.0.saturating_add(1);
        } else {
            self.0 = 0;
        }
        self.0
    }
}

/// One observation of a release being verified.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Observation<'a> {
    /// Why the agent could not be asked, when `Ping` failed.
    pub lost: Option<&'a str>,
    /// The release's status from `Ping`; `None` when the agent no longer reports it.
    pub status: Option<&'a ReleaseStatus>,
    /// What each configured probe answered at this look (empty when none was due).
    pub probes: &'a [ProbeAnswer],
    /// Consecutive passes so far, this look included ([`PassCount`]).
    pub passes: u32,
    /// How long the process has been up (the longer of the agent's figure and the
    /// master's clock since `Start` answered).
    pub up: Duration,
    /// Time since verification began; the deadline counts from there.
    pub elapsed: Duration,
}

impl Observation<'_> {
    /// The evidence this look gives, against `health`.
    pub(crate) fn evidence(&self, health: &Health) -> Evidence {
        Evidence {
            probes: self.probes.to_vec(),
            passes: self.passes,
            passes_needed: if health.has_probe() { health.passes } else { 0 },
            up_secs: self.status.and_then(|s| s.up_secs),
            restarts: self.status.map_or(0, |s| s.restarts),
            pid: self.status.and_then(|s| s.pid),
            elapsed_ms: u64::try_from(self.elapsed.as_millis()).unwrap_or(u64::MAX),
        }
    }
}

/// Judges a release started as `version` with process `pid` against `health`: it
/// fails at once when it exits, restarts or another version runs; it is healthy once
/// up `min_up` and (with a probe) every probe passed `passes` looks in a row; it fails
/// when the deadline comes first. Every verdict carries its [`Evidence`].
pub(crate) fn verify(
    observation: &Observation<'_>,
    version: &str,
    pid: u32,
    health: &Health,
) -> Verdict {
    if let Some(why) = observation.lost {
        return Verdict::Lost(format!("lost the agent while verifying: {why}"));
    }
    let evidence = observation.evidence(health);
    let unhealthy = |reason: String| Verdict::Unhealthy {
        reason,
        evidence: evidence.clone(),
    };
    let Some(status) = observation.status else {
        return unhealthy("the agent no longer reports the release".to_string());
    };
    if status.version.as_deref() != Some(version) {
        return unhealthy(format!(
            "the agent runs version {} instead of {version}",
            status.version.as_deref().unwrap_or("none")
        ));
    }
    match &status.state {
        ReleaseState::Running => {}
        ReleaseState::Stopped => {
            return unhealthy("it was stopped".to_string());
        }
        ReleaseState::Exited { code, signal } => {
            let how = match (code, signal) {
                (Some(code), _) => format!("exited with code {code}"),
                (None, Some(signal)) => format!("was killed by signal {signal}"),
                (None, None) => "exited".to_string(),
            };
            return unhealthy(how);
        }
        ReleaseState::CrashLooping => {
            return unhealthy("it is crash-looping".to_string());
        }
    }
    if status.restarts > 0 {
        return unhealthy(format!(
            "it restarted {} time(s) within min_up_secs",
            status.restarts
        ));
    }
    if let Some(now) = status.pid {
        if now != pid {
            return unhealthy(format!(
                "its pid changed from {pid} to {now} (it restarted)"
            ));
        }
    }
    let passed = !health.has_probe() || observation.passes >= health.passes;
    if observation.up >= health.min_up && passed {
        return Verdict::Healthy(evidence);
    }
    if observation.elapsed >= health.deadline {
        let within = health.deadline.as_secs();
        let reason = match observation.probes.iter().find(|a| !a.passed) {
            Some(failing) => format!(
                "not healthy within {within}s: {} answered {}",
                failing.probe, failing.answer
            ),
            None if observation.up >= health.min_up => format!(
                "not healthy within {within}s: {} of {} consecutive passes",
                observation.passes, health.passes
            ),
            None => format!("not up for {}s within {within}s", health.min_up.as_secs()),
        };
        return Verdict::Deadline { reason, evidence };
    }
    Verdict::Wait
}

/// Which hosts of a group may switch now: the canaries first, then the rest, never more
/// than `max_in_flight` at once, and nothing new once more hosts failed than the
/// group's failure budget (`max_failed`) allows.
///
/// The canaries are the first `canaries` hosts that need a switch (a host already up to
/// date has nothing to prove). The rest start only once every canary succeeded: a
/// canary proves the version, so its failure halts the group whatever the budget says.
/// Any other host that fails, in any phase (its ping, its staging ahead of its turn, its
/// switch), spends one unit of the budget; the group goes on with the others while the
/// failures are at most `max_failed`, and halts at the one beyond. Hosts are taken in
/// order as slots free up, so the bound holds at every instant and the group never
/// waits for the slowest host of a batch.
///
/// The schedule also words why the group halted ([`Self::halt_reason`]): the failure
/// that spent the budget, as [`HostFault`] words it, with the count against
/// `max_failed` when the group had a budget.
#[derive(Debug, Clone)]
pub(crate) struct GroupSchedule {
    canaries: VecDeque<String>,
    rest: VecDeque<String>,
    canaries_in_flight: BTreeSet<String>,
    in_flight: BTreeSet<String>,
    max_in_flight: usize,
    max_failed: usize,
    failed: usize,
    halt_reason: Option<String>,
}

impl GroupSchedule {
    /// A schedule for `hosts` (in order) needing a switch, halting at the first failure.
    pub(crate) fn new(hosts: Vec<String>, canaries: usize, max_in_flight: usize) -> Self {
        let mut rest: VecDeque<String> = hosts.into();
        let canaries: VecDeque<String> = rest.drain(..canaries.min(rest.len())).collect();
        GroupSchedule {
            canaries,
            rest,
            canaries_in_flight: BTreeSet::new(),
            in_flight: BTreeSet::new(),
            max_in_flight: max_in_flight.max(1),
            max_failed: 0,
            failed: 0,
            halt_reason: None,
        }
    }

    /// The same schedule, halting only once more than `max_failed` hosts failed.
    pub(crate) fn with_max_failed(mut self, max_failed: usize) -> Self {
        self.max_failed = max_failed;
        self
    }

    /// Whether `host` is one of the canaries, begun or not.
    pub(crate) fn is_canary(&self, host: &str) -> bool {
        self.canaries.iter().any(|h| h == host) || self.canaries_in_flight.contains(host)
    }

    /// The hosts to begin now; they count as in flight until [`Self::finish`].
    pub(crate) fn begin_next(&mut self) -> Vec<String> {
        let mut begin = Vec::new();
        while self.halt_reason.is_none() && self.in_flight.len() < self.max_in_flight {
            let host = if let Some(host) = self.canaries.pop_front() {
                self.canaries_in_flight.insert(host.clone());
                host
            } else if self.canaries_in_flight.is_empty() {
                match self.rest.pop_front() {
                    Some(host) => host,
                    None => break,
                }
            } else {
                break;
            };
            self.in_flight.insert(host.clone());
            begin.push(host);
        }
        begin
    }

    /// Records how a host in flight ended: `Ok` when it succeeded, else how it failed.
    /// A failed canary halts the group; another failed host spends the failure budget.
    /// True when the group halted just now.
    pub(crate) fn finish(&mut self, host: &str, outcome: Result<(), HostFault<'_>>) -> bool {
        let canary = self.canaries_in_flight.remove(host);
        self.in_flight.remove(host);
        let Err(fault) = outcome else {
            return false;
        };
        if canary && self.halt_reason.is_none() {
            self.failed += 1;
            self.halt(host, fault);
            return true;
        }
        self.fail(host, fault)
    }

    /// Records that `host` failed outside a canary's switch (its ping, its staging
    /// ahead of its turn, a switch after the canaries): the host is never begun again,
    /// and the group halts once the failures exceed the budget. True when the group
    /// halted just now.
    pub(crate) fn fail(&mut self, host: &str, fault: HostFault<'_>) -> bool {
        self.in_flight.remove(host);
        self.canaries_in_flight.remove(host);
        self.canaries.retain(|h| h != host);
        self.rest.retain(|h| h != host);
        self.failed += 1;
        if self.halt_reason.is_none() && self.failed > self.max_failed {
            self.halt(host, fault);
            return true;
        }
        false
    }

    /// Halts the group because of `host`'s `fault`, the failure that spent the budget.
    fn halt(&mut self, host: &str, fault: HostFault<'_>) {
        let failure = fault.words(host);
        self.halt_reason = Some(if self.max_failed == 0 {
            failure
        } else {
            format!(
                "{failure} ({} host(s) failed, max_failed = {})",
                self.failed, self.max_failed
            )
        });
    }

    /// Why the group halted, in the words of reports, or `None` while it has not.
    pub(crate) fn halt_reason(&self) -> Option<&str> {
        self.halt_reason.as_deref()
    }

    /// Hosts failed so far.
    #[cfg(test)]
    pub(crate) fn failed(&self) -> usize {
        self.failed
    }

    /// Whether failures halted the group.
    #[cfg(test)]
    pub(crate) fn is_halted(&self) -> bool {
        self.halt_reason.is_some()
    }

    /// Hosts in flight now.
    #[cfg(test)]
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// True once nothing is in flight and nothing more will begin.
    pub(crate) fn is_finished(&self) -> bool {
        self.in_flight.is_empty()
            && (self.halt_reason.is_some() || (self.canaries.is_empty() && self.rest.is_empty()))
    }

    /// Hosts that never began (after a halt), in order.
    #[cfg(test)]
    pub(crate) fn untouched(&self) -> Vec<String> {
        self.canaries
            .iter()
            .chain(self.rest.iter())
            .cloned()
            .collect()
    }
}

/// How a host failed, as a [`GroupSchedule`] records it; the schedule words the one
/// that halts the group with the host's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HostFault<'a> {
    /// Its ping failed, asked at `addr`: `web-1 (ADDR): REASON`.
    Inspection {
        /// The host's address, `host:port`.
        addr: &'a str,
        /// What went wrong.
        reason: &'a str,
    },
    /// Stopping the group's release on it failed (a stop of the group, or of a host
    /// that left it), asked at `addr`: `web-1 (ADDR): REASON`.
    Stop {
        /// The host's address, `host:port`.
        addr: &'a str,
        /// What went wrong.
        reason: &'a str,
    },
    /// Stopping the release it ran before it left the group failed, which spends the
    /// budget of the rollout that follows: `stopping the release on web-1 failed`.
    StopBeforeRollout,
    /// The task switching it ended without an outcome (it panicked):
    /// `the switch task of web-1 failed`.
    SwitchTask,
    /// Its staging or its switch failed: `web-1 failed: REASON`.
    Switch {
        /// What went wrong.
        reason: &'a str,
    },
}

impl HostFault<'_> {
    /// The failure of `host`, in the words of reports.
    fn words(&self, host: &str) -> String {
        match self {
            HostFault::Inspection { addr, reason } | HostFault::Stop { addr, reason } => {
                format!("{host} ({addr}): {reason}")
            }
            HostFault::StopBeforeRollout => format!("stopping the release on {host} failed"),
            HostFault::SwitchTask => format!("the switch task of {host} failed"),
            HostFault::Switch { reason } => format!("{host} failed: {reason}"),
        }
    }
}

/// How long to look again for the output of a release found unhealthy, when the look
/// that failed it showed none: a release that has not written anything yet.
pub(crate) fn output_tail_wait(observation: &Observation<'_>) -> Option<Duration> {
    let tail = observation.status.map(|s| s.output_tail.as_str());
    tail.unwrap_or_default()
        .trim()
        .is_empty()
        .then_some(OUTPUT_TAIL_WAIT)
}

/// Whether a host's release must answer its TCP probe before it counts as up to date:
/// only a release that runs the desired version is probed.
pub(crate) fn wants_probe(status: Option<&ReleaseStatus>, version: &str) -> bool {
    status
        .is_some_and(|s| s.version.as_deref() == Some(version) && s.state == ReleaseState::Running)
}

/// Whether a release up for `up` is probed now: not before `min_up`, when a verdict
/// could not be reached anyway.
pub(crate) fn probe_due(up: Duration, health: &Health) -> bool {
    up >= health.min_up
}

/// How long to wait before the next look at a release up for `up` that is not healthy
/// yet: the poll interval, but never past the moment it has been up `min_up`, so that
/// the look that can pass it comes when it can, not up to a whole interval later (with
/// `min_up_secs` 1 and a 200 ms interval, every batch of a rollout waited up to 20 %
/// longer than its gate).
pub(crate) fn next_look(up: Duration, health: &Health, poll_interval: Duration) -> Duration {
    match health.min_up.checked_sub(up) {
        Some(left) if !left.is_zero() => poll_interval.min(left),
        _ => poll_interval,
    }
}

/// The most memory the read buffers of one group's pushes may hold at once while its
/// hosts are staged ahead.
pub(crate) const STAGING_BUFFERS: usize = 32 * 1024 * 1024;

/// How many hosts of a group are staged at once: at least `configured` (the rollout's
/// `staging_parallel`), and as many as switch at once (`max_in_flight`) while their
/// pushes' buffers (`per_push` bytes each) fit in [`STAGING_BUFFERS`]. Staging a host
/// waits on the agent's syncs far more than on the master, so a group that switches 100
/// hosts a second must stage about as many at once, or its switches wait for staging.
pub(crate) fn staging_width(configured: usize, max_in_flight: usize, per_push: usize) -> usize {
    let fits = STAGING_BUFFERS / per_push.max(1);
    configured.max(max_in_flight.min(fits)).max(1)
}

/// What the driver is to do next for a host being staged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StageAction {
    /// Send the archive (`WriteFile`; nothing is sent when the agent has it).
    Push,
    /// Unpack the archive into the version's directory.
    Unpack,
    /// The version is unpacked on the host.
    Staged,
    /// Staging failed.
    Fail(HostFailure),
}

/// Staging one host: a version already unpacked is confirmed by `Unpack` alone (the
/// agent answers from its marker, without the archive); one the agent lacks the archive
/// for ([`Observed::Missing`]) is pushed, then unpacked.
#[derive(Debug, Clone)]
pub(crate) struct Staging {
    pushed: bool,
    last: StageAction,
}

impl Staging {
    /// Staging for a host whose assessment says whether the version is `staged`, and
    /// its first action.
    pub(crate) fn begin(staged: bool) -> (Self, StageAction) {
        let first = if staged {
            StageAction::Unpack
        } else {
            StageAction::Push
        };
        let machine = Staging {
            pushed: !staged,
            last: first.clone(),
        };
        (machine, first)
    }

    /// The next action, given what the last one gave.
    pub(crate) fn next(&mut self, observed: Observed) -> StageAction {
        let next = match (&self.last, observed) {
            (StageAction::Push, Observed::Ok) => StageAction::Unpack,
            (StageAction::Unpack, Observed::Ok) => StageAction::Staged,
            (StageAction::Unpack, Observed::Missing(_)) if !self.pushed => {
                self.pushed = true;
                StageAction::Push
            }
            (_, Observed::Missing(reason) | Observed::Failed { reason, .. }) => {
                StageAction::Fail(HostFailure::new(HostPhase::Staging, reason))
            }
            (last, observed) => StageAction::Fail(HostFailure::new(
                HostPhase::Staging,
                format!("unexpected {observed:?} after {last:?}"),
            )),
        };
        self.last = next.clone();
        next
    }
}

/// What the driver is to do next for a host being switched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Stop the release (the old version, or the failed new one in a rollback).
    Stop,
    /// Start `version`.
    Start(String),
    /// Watch `version` (process `pid`, already up for `up`) until it proves healthy or
    /// fails; the deadline is [`Health::deadline`], see [`verify`].
    Verify {
        /// The version.
        version: String,
        /// Its process.
        pid: u32,
        /// How long it has been up already.
        up: Duration,
    },
    /// The host runs the desired version, healthy.
    Done {
        /// The new process.
        pid: u32,
        /// The version it ran before.
        from: Option<String>,
    },
    /// The host failed, rolled back or not; the machine is finished.
    Fail(HostFailure),
}

/// The part of a release's output tail that `version` wrote: from the first of the
/// agent's start headers (`--- erel: starting RELEASE VERSION at TIME ---`) for
/// `version` that follows every header of another version, so a failure shows the
/// failed version's own runs and not what the version before it printed. The whole
/// tail when it holds no header for `version` (it was cut above it).
pub(crate) fn output_of_version(tail: &str, release: &str, version: &str) -> String {
    let ours = format!("--- erel: starting {release} {version} at ");
    let mut from = None;
    let mut offset = 0;
    for line in tail.split_inclusive('\n') {
        if line.starts_with("--- erel: starting ") {
            if line.starts_with(&ours) {
                from.get_or_insert(offset);
            } else {
                from = None;
            }
        }
        offset += line.len();
    }
    tail[from.unwrap_or(0)..].to_string()
}

/// What performing the last [`Action`] gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Observed {
    /// It succeeded (stopped, pushed, unpacked, or proved healthy).
    Ok,
    /// The agent lacks what the command needs (the archive to unpack): why.
    Missing(String),
    /// The release started as this process.
    Started(u32),
    /// It failed: why, and the release's own output when there is some.
    Failed {
        /// Why.
        reason: String,
        /// The release's output tail.
        output_tail: String,
    },
}

impl Observed {
    /// A failure without output.
    pub(crate) fn failed(reason: impl std::fmt::Display) -> Self {
        Observed::Failed {
            reason: reason.to_string(),
            output_tail: String::new(),
        }
    }
}

/// Where a switching host is; finer than [`HostPhase`], which a rollback spans twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    StopOld,
    StartNew,
    VerifyNew,
    StopNew,
    StartOld,
    VerifyOld,
    Finished,
}

/// One host's switch as a state machine: stop old → start new → verify, and on a
/// failure stop new → start old → verify old. Each [`Observed`] gives the next
/// [`Action`]; no I/O here, the driver performs the actions.
#[derive(Debug, Clone)]
pub(crate) struct HostSwitch {
    step: Step,
    desired: String,
    previous: Option<Previous>,
    pid: u32,
    failure: Option<HostFailure>,
    restart: bool,
}

impl HostSwitch {
    /// The machine for a host assessed as `assessment`, and its first action.
    pub(crate) fn begin(assessment: Assessment, desired: &str) -> (Self, Action) {
        let mut machine = HostSwitch {
            step: Step::StopOld,
            desired: desired.to_string(),
            previous: None,
            pid: 0,
            failure: None,
            restart: false,
        };
        let action = match assessment {
            Assessment::UpToDate => {
                machine.step = Step::Finished;
                Action::Fail(HostFailure::new(HostPhase::Pinging, "nothing to switch"))
            }
            Assessment::Leave { why } => {
                machine.step = Step::Finished;
                Action::Fail(HostFailure::new(HostPhase::Pinging, why))
            }
            Assessment::Verify { pid, up, previous } => {
                machine.previous = previous;
                machine.pid = pid;
                machine.step = Step::VerifyNew;
                Action::Verify {
                    version: machine.desired.clone(),
                    pid,
                    up,
                }
            }
            Assessment::Switch {
                previous,
                stop_first,
                ..
            } => {
                machine.previous = previous;
                if stop_first {
                    Action::Stop
                } else {
                    machine.step = Step::StartNew;
                    Action::Start(machine.desired.clone())
                }
            }
        };
        (machine, action)
    }

    /// The machine for a rolling restart of `version` (see [`assess_restart`]): like
    /// [`Self::begin`], but a failed restart of a host that ran `version` is rolled back
    /// by starting `version` once more, and its failure says so.
    pub(crate) fn begin_restart(assessment: Assessment, version: &str) -> (Self, Action) {
        let (mut machine, action) = HostSwitch::begin(assessment, version);
        machine.restart = true;
        (machine, action)
    }

    /// The phase the host is in, as events report it.
    pub(crate) fn phase(&self) -> HostPhase {
        match self.step {
            Step::StopOld => HostPhase::Stopping,
            Step::StartNew => HostPhase::Starting,
            Step::VerifyNew | Step::Finished => HostPhase::Verifying,
            Step::StopNew | Step::StartOld => HostPhase::RollingBack,
            Step::VerifyOld => HostPhase::VerifyingOld,
        }
    }

    /// The next action, given what the last one gave.
    pub(crate) fn next(&mut self, observed: Observed) -> Action {
        let step = self.step;
        match (step, observed) {
            (Step::StopOld, Observed::Ok) => {
                self.step = Step::StartNew;
                Action::Start(self.desired.clone())
            }
            (Step::StartNew, Observed::Started(pid)) => {
                self.pid = pid;
                self.step = Step::VerifyNew;
                Action::Verify {
                    version: self.desired.clone(),
                    pid,
                    up: Duration::ZERO,
                }
            }
            (Step::VerifyNew, Observed::Ok) => {
                self.step = Step::Finished;
                Action::Done {
                    pid: self.pid,
                    from: self.previous.as_ref().map(|p| p.version.clone()),
                }
            }
            (
                Step::StartNew | Step::VerifyNew,
                Observed::Failed {
                    reason,
                    output_tail,
                },
            ) => {
                let phase = self.phase();
                self.failure = Some(HostFailure {
                    output_tail,
                    ..HostFailure::new(phase, reason)
                });
                self.step = Step::StopNew;
                Action::Stop
            }
            (Step::StopNew, Observed::Ok) => match self.to_restart() {
                Some(version) => {
                    self.step = Step::StartOld;
                    Action::Start(version)
                }
                // Nothing ran before (or it was stopped): stopped is the previous state.
                None => self.finish(|failure| failure.rolled_back = true),
            },
            (Step::StopNew, Observed::Failed { reason, .. }) => {
                self.rollback_failed(|_| "stopping it for the rollback failed".into(), reason)
            }
            (Step::StartOld, Observed::Started(pid)) => {
                self.step = Step::VerifyOld;
                Action::Verify {
                    version: self.to_restart().unwrap_or_default(),
                    pid,
                    up: Duration::ZERO,
                }
            }
            (Step::StartOld, Observed::Failed { reason, .. }) => {
                self.rollback_failed(|old| format!("starting {old} again failed"), reason)
            }
            (Step::VerifyOld, Observed::Ok) => {
                let same = self.to_restart().filter(|old| *old == self.desired);
                self.finish(|failure| {
                    failure.rolled_back = true;
                    if let Some(version) = same {
                        failure.reason = format!(
                            "{}; rolled back by restarting {version} once more",
                            failure.reason
                        );
                    }
                })
            }
            (Step::VerifyOld, Observed::Failed { reason, .. }) => self.rollback_failed(
                |old| format!("the old version {old} is not healthy either"),
                reason,
            ),
            (Step::StopOld, Observed::Failed { reason, .. }) => {
                self.step = Step::Finished;
                Action::Fail(HostFailure::new(HostPhase::Stopping, reason))
            }
            (_, observed) => {
                let phase = self.phase();
                self.step = Step::Finished;
                Action::Fail(HostFailure::new(
                    phase,
                    format!("unexpected {observed:?} while {phase}"),
                ))
            }
        }
    }

    /// The version a rollback starts again: the previous one, when it ran.
    fn to_restart(&self) -> Option<String> {
        self.previous
            .as_ref()
            .filter(|p| p.was_running && (self.restart || p.version != self.desired))
            .map(|p| p.version.clone())
    }

    /// The rollback itself failed: `what` (given the version to return to) and why,
    /// after the original failure.
    fn rollback_failed(&mut self, what: impl FnOnce(&str) -> String, reason: String) -> Action {
        let what = what(&self.to_restart().unwrap_or_default());
        self.finish(|failure| failure.reason = format!("{}; {what}: {reason}", failure.reason))
    }

    fn finish(&mut self, change: impl FnOnce(&mut HostFailure)) -> Action {
        self.step = Step::Finished;
        let mut failure = self
            .failure
            .take()
            .unwrap_or_else(|| HostFailure::new(HostPhase::RollingBack, "rollback"));
        change(&mut failure);
        Action::Fail(failure)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(tcp: Option<u16>) -> Health {
        Health {
            tcp: tcp.map(crate::cluster::TcpProbe::Port),
            http: None,
            passes: 1,
            min_up: Duration::from_secs(5),
            deadline: Duration::from_secs(30),
        }
    }

    fn status(version: &str, state: ReleaseState, up: u64) -> ReleaseStatus {
        ReleaseStatus {
            name: "beat".into(),
            versions: vec!["0.1.0".into(), "0.2.0".into()],
            version: Some(version.into()),
            desired_running: state == ReleaseState::Running,
            pid: (state == ReleaseState::Running).then_some(42),
            state,
            restarts: 0,
            up_secs: Some(up),
            output_tail: String::new(),
        }
    }

    #[test]
    fn a_host_running_the_desired_version_healthy_is_skipped() {
        let s = status("0.2.0", ReleaseState::Running, 60);
        assert_eq!(
            assess(Some(&s), "0.2.0", &health(None), None),
            Assessment::UpToDate
        );
        assert_eq!(
            assess(Some(&s), "0.2.0", &health(Some(80)), Some(true)),
            Assessment::UpToDate
        );
    }

    #[test]
    fn a_running_desired_version_whose_probe_fails_is_restarted() {
        let s = status("0.2.0", ReleaseState::Running, 60);
        match assess(Some(&s), "0.2.0", &health(Some(80)), Some(false)) {
            Assessment::Switch {
                staged: true,
                previous,
                ..
            } => {
                assert_eq!(previous.map(|p| p.version), Some("0.1.0".into()));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_desired_version_started_moments_ago_is_only_verified() {
        let s = status("0.2.0", ReleaseState::Running, 1);
        assert_eq!(
            assess(Some(&s), "0.2.0", &health(None), None),
            Assessment::Verify {
                pid: 42,
                up: Duration::from_secs(1),
                previous: Some(Previous {
                    version: "0.1.0".into(),
                    was_running: true
                }),
            }
        );
    }

    #[test]
    fn an_old_version_is_switched_and_remembered() {
        let mut s = status("0.1.0", ReleaseState::Running, 600);
        s.versions = vec!["0.1.0".into()];
        assert_eq!(
            assess(Some(&s), "0.2.0", &health(None), None),
            Assessment::Switch {
                previous: Some(Previous {
                    version: "0.1.0".into(),
                    was_running: true
                }),
                staged: false,
                stop_first: true,
            }
        );
        assert_eq!(
            assess(None, "0.2.0", &health(None), None),
            Assessment::Switch {
                previous: None,
                staged: false,
                stop_first: false,
            }
        );
    }

    #[test]
    fn a_release_stopped_by_hand_is_started_again() {
        let mut s = status("0.2.0", ReleaseState::Stopped, 0);
        s.desired_running = false;
        match assess(Some(&s), "0.2.0", &health(None), None) {
            Assessment::Switch {
                staged: true,
                previous: Some(previous),
                stop_first,
            } => {
                assert!(!previous.was_running, "a rollback would only stop it");
                assert!(!stop_first, "nothing runs: nothing to stop first");
            }
            other => panic!("{other:?}"),
        }
    }

    /// One look; its passes are this look's alone (1 when every probe passed).
    fn observe<'a>(
        s: Option<&'a ReleaseStatus>,
        probes: &'a [ProbeAnswer],
        up: u64,
        elapsed: u64,
    ) -> Observation<'a> {
        Observation {
            lost: None,
            status: s,
            probes,
            passes: PassCount::default().record(probes),
            up: Duration::from_secs(up),
            elapsed: Duration::from_secs(elapsed),
        }
    }

    fn answer(probe: &str, passed: bool, answer: &str) -> ProbeAnswer {
        ProbeAnswer {
            probe: probe.into(),
            passed,
            answer: answer.into(),
            took_ms: 3,
        }
    }

    #[test]
    fn verification_waits_for_min_up_and_the_probe() {
        let s = status("0.2.0", ReleaseState::Running, 1);
        let h = health(Some(80));
        let ok = [answer("tcp 127.0.0.1:80", true, "connected")];
        let refused = [answer("tcp 127.0.0.1:80", false, "connection refused")];
        assert_eq!(
            verify(&observe(Some(&s), &ok, 1, 1), "0.2.0", 42, &h),
            Verdict::Wait
        );
        assert_eq!(
            verify(&observe(Some(&s), &refused, 6, 6), "0.2.0", 42, &h),
            Verdict::Wait
        );
        match verify(&observe(Some(&s), &ok, 6, 6), "0.2.0", 42, &h) {
            Verdict::Healthy(evidence) => {
                assert_eq!(evidence.probes.to_vec(), ok.to_vec());
                assert_eq!((evidence.passes, evidence.passes_needed), (1, 1));
                assert_eq!(evidence.up_secs, Some(1), "the agent's own figure");
            }
            other => panic!("{other:?}"),
        }
        match verify(&observe(Some(&s), &refused, 30, 30), "0.2.0", 42, &h) {
            Verdict::Deadline { reason, evidence } => {
                assert!(
                    reason.contains("tcp 127.0.0.1:80 answered connection refused"),
                    "{reason}"
                );
                assert_eq!(evidence.probes.to_vec(), refused.to_vec());
                assert_eq!(evidence.passes, 0);
                assert_eq!(evidence.elapsed_ms, 30_000);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn passes_count_consecutive_looks_and_a_failure_resets_them() {
        let tcp_ok = answer("tcp 127.0.0.1:80", true, "connected");
        let http_ok = answer("http GET 127.0.0.1:80/health", true, "HTTP 200 OK");
        let http_500 = answer(
            "http GET 127.0.0.1:80/health",
            false,
            "HTTP 500 Internal Server Error",
        );
        let mut count = PassCount::default();
        assert_eq!(count.record(&[tcp_ok.clone(), http_ok.clone()]), 1);
        assert_eq!(count.record(&[]), 1, "a look without probes leaves it");
        assert_eq!(count.record(&[tcp_ok.clone(), http_ok.clone()]), 2);
        assert_eq!(
            count.record(&[tcp_ok.clone(), http_500.clone()]),
            0,
            "one failing probe of two resets it"
        );
        assert_eq!(count.record(&[tcp_ok.clone(), http_ok.clone()]), 1);
    }

    #[test]
    fn three_passes_are_needed_when_the_group_says_three() {
        let s = status("0.2.0", ReleaseState::Running, 9);
        let mut h = health(None);
        h.http = Some(crate::cluster::HttpProbe {
            port: crate::cluster::TcpProbe::Port(80),
            path: "/health".into(),
        });
        h.passes = 3;
        let ok = [answer("http GET 127.0.0.1:80/health", true, "HTTP 200 OK")];
        let failing = [answer(
            "http GET 127.0.0.1:80/health",
            false,
            "HTTP 500 Internal Server Error",
        )];
        // Each look counts passes from zero again.
        let (status, health) = (&s, &h);
        let counting_look = || {
            let mut count = PassCount::default();
            move |answers: &[ProbeAnswer], elapsed: u64| {
                let observation = Observation {
                    passes: count.record(answers),
                    ..observe(Some(status), answers, 9, elapsed)
                };
                verify(&observation, "0.2.0", 42, health)
            }
        };
        let mut look = counting_look();
        assert_eq!(look(&ok, 5), Verdict::Wait, "1 of 3");
        assert_eq!(look(&ok, 6), Verdict::Wait, "2 of 3");
        assert_eq!(
            look(&failing, 7),
            Verdict::Wait,
            "reset, before the deadline"
        );
        assert_eq!(look(&ok, 8), Verdict::Wait, "1 of 3 again");
        assert_eq!(look(&ok, 9), Verdict::Wait, "2 of 3 again");
        match look(&ok, 10) {
            Verdict::Healthy(evidence) => {
                assert_eq!((evidence.passes, evidence.passes_needed), (3, 3));
                let text = evidence.to_string();
                assert!(
                    text.contains("http GET 127.0.0.1:80/health pass: HTTP 200 OK in 3ms")
                        && text.contains("3/3 consecutive passes")
                        && text.contains("up 9s, 0 restart(s), pid 42"),
                    "{text}"
                );
            }
            other => panic!("{other:?}"),
        }

        let mut look = counting_look();
        assert_eq!(look(&ok, 28), Verdict::Wait);
        match look(&failing, 30) {
            Verdict::Deadline { reason, evidence } => {
                assert!(reason.contains("answered HTTP 500"), "{reason}");
                assert_eq!(evidence.passes, 0);
            }
            other => panic!("{other:?}"),
        }
        let mut count = PassCount::default();
        count.record(&ok);
        let observation = Observation {
            passes: count.record(&ok),
            ..observe(Some(&s), &ok, 9, 30)
        };
        match verify(&observation, "0.2.0", 42, &h) {
            Verdict::Deadline { reason, .. } => {
                assert!(reason.contains("2 of 3 consecutive passes"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_lost_agent_fails_verification_at_once_without_waiting_for_output() {
        let h = health(None);
        let mut lost = observe(None, &[], 0, 0);
        lost.lost = Some("connection refused");
        assert_eq!(
            verify(&lost, "0.2.0", 42, &h),
            Verdict::Lost("lost the agent while verifying: connection refused".into())
        );
        let mut s = status("0.2.0", ReleaseState::CrashLooping, 0);
        assert_eq!(
            output_tail_wait(&observe(Some(&s), &[], 0, 0)),
            Some(OUTPUT_TAIL_WAIT)
        );
        s.output_tail = "boom".into();
        assert_eq!(output_tail_wait(&observe(Some(&s), &[], 0, 0)), None);
    }

    #[test]
    fn staging_unpacks_what_is_there_and_pushes_what_is_missing() {
        let (mut m, first) = Staging::begin(true);
        assert_eq!(first, StageAction::Unpack);
        assert_eq!(m.next(Observed::Ok), StageAction::Staged);

        let (mut m, _) = Staging::begin(true);
        assert_eq!(m.next(Observed::Missing("gone".into())), StageAction::Push);
        assert_eq!(m.next(Observed::Ok), StageAction::Unpack);
        assert_eq!(
            m.next(Observed::Missing("gone again".into())),
            StageAction::Fail(HostFailure::new(HostPhase::Staging, "gone again")),
            "a pushed archive that is missing fails"
        );

        let (mut m, first) = Staging::begin(false);
        assert_eq!(first, StageAction::Push);
        assert_eq!(
            m.next(Observed::failed("disk full")),
            StageAction::Fail(HostFailure::new(HostPhase::Staging, "disk full"))
        );
    }

    #[test]
    fn a_host_failing_before_its_turn_halts_the_group_and_never_begins() {
        let mut s = GroupSchedule::new(hosts(3), 1, 2);
        s.fail("h-2", BOOM);
        assert!(s.begin_next().is_empty(), "the group halted");
        assert!(s.is_finished());
        assert_eq!(s.untouched(), vec!["h-1", "h-3"]);
    }

    #[test]
    fn the_next_look_comes_when_min_up_is_reached_never_later() {
        let health = health(Some(8080));
        let interval = Duration::from_millis(200);
        assert_eq!(health.min_up, Duration::from_secs(5), "the fixture's gate");
        let at = |ms| next_look(Duration::from_millis(ms), &health, interval);
        assert_eq!(at(0), interval);
        assert_eq!(at(4850), Duration::from_millis(150));
        assert_eq!(at(4999), Duration::from_millis(1));
        // Up long enough (waiting for probe passes): the interval.
        assert_eq!(at(5000), interval);
        assert_eq!(at(9000), interval);
    }

    #[test]
    fn staging_keeps_up_with_the_switches_within_its_memory() {
        let small = 1024 * 5; // a small archive's push buffers
        assert_eq!(staging_width(8, 100, small), 100);
        assert_eq!(
            staging_width(8, 1, small),
            8,
            "never below the configured width"
        );
        // A large archive (1.25 MiB of buffers per push): as many as fit in 32 MiB.
        assert_eq!(staging_width(8, 100, 1280 * 1024), 25);
        assert_eq!(staging_width(8, 100, usize::MAX), 8);
        assert_eq!(staging_width(0, 0, 0), 1);
    }

    #[test]
    fn the_probe_waits_for_min_up() {
        let h = health(Some(80));
        assert!(!probe_due(Duration::from_secs(4), &h));
        assert!(probe_due(Duration::from_secs(5), &h));
    }

    #[test]
    fn verification_fails_at_once_on_exit_restart_or_new_pid() {
        let h = health(None);
        let exited = status(
            "0.2.0",
            ReleaseState::Exited {
                code: Some(3),
                signal: None,
            },
            0,
        );
        match verify(&observe(Some(&exited), &[], 0, 0), "0.2.0", 42, &h) {
            Verdict::Unhealthy { reason, evidence } => {
                assert!(reason.contains("code 3"), "{reason}");
                assert_eq!(evidence.passes_needed, 0, "no probe");
            }
            other => panic!("{other:?}"),
        }
        let mut restarted = status("0.2.0", ReleaseState::Running, 1);
        restarted.restarts = 1;
        assert!(matches!(
            verify(&observe(Some(&restarted), &[], 1, 1), "0.2.0", 42, &h),
            Verdict::Unhealthy { .. }
        ));
        let moved = status("0.2.0", ReleaseState::Running, 1);
        assert!(matches!(
            verify(&observe(Some(&moved), &[], 1, 1), "0.2.0", 7, &h),
            Verdict::Unhealthy { .. }
        ));
        let crash = status("0.2.0", ReleaseState::CrashLooping, 0);
        assert!(matches!(
            verify(&observe(Some(&crash), &[], 0, 0), "0.2.0", 42, &h),
            Verdict::Unhealthy { .. }
        ));
        assert!(matches!(
            verify(&observe(None, &[], 0, 0), "0.2.0", 42, &h),
            Verdict::Unhealthy { .. }
        ));
    }

    /// A host's switch failing, for schedules.
    const BOOM: HostFault<'static> = HostFault::Switch { reason: "boom" };

    fn hosts(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("h-{i}")).collect()
    }

    #[track_caller]
    fn assert_halt_reason(s: &GroupSchedule, reason: &str) {
        assert_eq!(s.halt_reason(), Some(reason));
    }

    #[test]
    fn canaries_go_first_and_alone() {
        let mut s = GroupSchedule::new(hosts(5), 1, 3);
        assert_eq!(s.begin_next(), vec!["h-1"], "the canary goes alone");
        assert!(
            s.begin_next().is_empty(),
            "nobody else while the canary is in flight"
        );
        s.finish("h-1", Ok(()));
        assert_eq!(s.begin_next(), vec!["h-2", "h-3", "h-4"]);
    }

    #[test]
    fn several_canaries_respect_max_in_flight_too() {
        let mut s = GroupSchedule::new(hosts(5), 3, 2);
        let canaries = |s: &GroupSchedule| {
            let all = ["h-1", "h-2", "h-3", "h-4", "h-5"];
            all.into_iter()
                .filter(|h| s.is_canary(h))
                .collect::<Vec<_>>()
        };
        assert_eq!(canaries(&s), ["h-1", "h-2", "h-3"]);
        assert_eq!(s.begin_next(), vec!["h-1", "h-2"]);
        assert_eq!(canaries(&s), ["h-1", "h-2", "h-3"], "begun or not");
        s.finish("h-1", Ok(()));
        assert_eq!(s.begin_next(), vec!["h-3"]);
        s.finish("h-2", Ok(()));
        assert!(
            s.begin_next().is_empty(),
            "h-3, a canary, is still in flight"
        );
        s.finish("h-3", Ok(()));
        assert_eq!(s.begin_next(), vec!["h-4", "h-5"]);
    }

    #[test]
    fn never_more_than_max_in_flight_and_every_host_once() {
        for max in 1..=4 {
            for canaries in 0..=2 {
                let mut s = GroupSchedule::new(hosts(7), canaries, max);
                let mut seen = Vec::new();
                let mut in_flight: Vec<String> = Vec::new();
                while !s.is_finished() {
                    let begun = s.begin_next();
                    in_flight.extend(begun.iter().cloned());
                    seen.extend(begun);
                    assert!(in_flight.len() <= max, "max {max}: {in_flight:?}");
                    assert_eq!(s.in_flight(), in_flight.len());
                    let done = in_flight.remove(0);
                    s.finish(&done, Ok(()));
                }
                assert_eq!(seen, hosts(7), "max {max} canaries {canaries}");
            }
        }
    }

    #[test]
    fn the_first_failure_halts_the_group() {
        let mut s = GroupSchedule::new(hosts(5), 1, 2);
        assert_eq!(s.begin_next(), vec!["h-1"]);
        s.finish("h-1", Err(BOOM));
        assert!(s.is_halted());
        assert!(s.begin_next().is_empty(), "no further host is touched");
        assert!(s.is_finished());
        assert_eq!(s.untouched(), vec!["h-2", "h-3", "h-4", "h-5"]);

        let mut s = GroupSchedule::new(hosts(5), 1, 2);
        s.begin_next();
        s.finish("h-1", Ok(()));
        assert_eq!(s.begin_next(), vec!["h-2", "h-3"]);
        s.finish("h-2", Err(BOOM));
        assert!(s.begin_next().is_empty());
        assert!(!s.is_finished(), "h-3 is still in flight");
        s.finish("h-3", Ok(()));
        assert!(s.is_finished());
        assert_eq!(s.untouched(), vec!["h-4", "h-5"]);
    }

    #[test]
    fn with_budget_left_the_group_goes_on_and_halts_at_the_failure_beyond_it() {
        // Two hosts unreachable before any switch, max_failed 2: the rest go on.
        let mut s = GroupSchedule::new(hosts(6), 1, 2).with_max_failed(2);
        assert!(!s.fail("h-5", BOOM), "one failure, budget 2");
        assert!(!s.fail("h-6", BOOM), "two failures, budget 2");
        assert_eq!(s.begin_next(), vec!["h-1"]);
        assert!(!s.finish("h-1", Ok(())));
        assert_eq!(s.begin_next(), vec!["h-2", "h-3"]);
        // A third failure is one beyond the budget: halt, h-4 is never begun.
        assert!(s.finish("h-2", Err(BOOM)), "halted now");
        assert!(s.is_halted());
        assert!(s.begin_next().is_empty());
        assert!(!s.finish("h-3", Ok(())));
        assert!(s.is_finished());
        assert_eq!(s.untouched(), vec!["h-4"]);
        assert_eq!(s.failed(), 3);
        assert_halt_reason(&s, "h-2 failed: boom (3 host(s) failed, max_failed = 2)");
    }

    #[test]
    fn a_failed_host_within_the_budget_is_reported_and_the_rest_switch() {
        let mut s = GroupSchedule::new(hosts(3), 0, 1).with_max_failed(1);
        assert_eq!(s.begin_next(), vec!["h-1"]);
        assert!(!s.finish("h-1", Err(BOOM)), "within the budget");
        assert_eq!(s.begin_next(), vec!["h-2"]);
        s.finish("h-2", Ok(()));
        assert_eq!(s.begin_next(), vec!["h-3"]);
        s.finish("h-3", Ok(()));
        assert!(s.is_finished() && !s.is_halted());
    }

    #[test]
    fn the_schedule_words_the_failure_that_halts_the_group() {
        let faults = [
            (
                HostFault::Inspection {
                    addr: "127.0.0.1:7070",
                    reason: "connection refused",
                },
                "h-1 (127.0.0.1:7070): connection refused",
            ),
            (
                HostFault::Stop {
                    addr: "127.0.0.1:7070",
                    reason: "timed out",
                },
                "h-1 (127.0.0.1:7070): timed out",
            ),
            (
                HostFault::StopBeforeRollout,
                "stopping the release on h-1 failed",
            ),
            (HostFault::SwitchTask, "the switch task of h-1 failed"),
            (BOOM, "h-1 failed: boom"),
        ];
        for (fault, words) in faults {
            // Without a budget, the first failure halts, in its own words.
            let mut s = GroupSchedule::new(hosts(3), 0, 1);
            assert_eq!(s.halt_reason(), None);
            assert!(s.fail("h-1", fault), "{words}");
            assert_eq!(s.halt_reason(), Some(words));
            // A later failure does not change why the group halted.
            assert!(!s.fail("h-2", BOOM));
            assert_eq!(s.halt_reason(), Some(words));
        }
        // A failure within the budget halts nothing and has no words.
        let mut s = GroupSchedule::new(hosts(3), 0, 1).with_max_failed(1);
        assert!(!s.fail("h-1", HostFault::SwitchTask));
        assert_eq!(s.halt_reason(), None);
        assert!(s.fail("h-2", HostFault::StopBeforeRollout));
        assert_halt_reason(
            &s,
            "stopping the release on h-2 failed (2 host(s) failed, max_failed = 1)",
        );
    }

    #[test]
    fn a_failed_canary_halts_whatever_the_budget() {
        let mut s = GroupSchedule::new(hosts(4), 1, 2).with_max_failed(3);
        assert_eq!(s.begin_next(), vec!["h-1"]);
        assert!(s.finish("h-1", Err(BOOM)), "the canary proves the version");
        assert!(s.begin_next().is_empty());
        assert_eq!(s.untouched(), vec!["h-2", "h-3", "h-4"]);
        assert_halt_reason(&s, "h-1 failed: boom (1 host(s) failed, max_failed = 3)");
    }

    #[test]
    fn a_restart_returns_to_what_ran_which_may_be_the_same_version() {
        let s = status("0.2.0", ReleaseState::Running, 600);
        let (assessment, version) = assess_restart(Some(&s), "beat");
        assert_eq!(version, "0.2.0");
        assert_eq!(
            assessment,
            Assessment::Switch {
                previous: Some(Previous {
                    version: "0.2.0".into(),
                    was_running: true
                }),
                staged: true,
                stop_first: true,
            }
        );
        let (mut m, first) = HostSwitch::begin_restart(assessment, "0.2.0");
        assert_eq!(first, Action::Stop, "cold: stopped first");
        assert_eq!(m.next(Observed::Ok), Action::Start("0.2.0".into()));
        m.next(Observed::Started(7));
        assert_eq!(m.next(Observed::failed("not up")), Action::Stop);
        assert_eq!(
            m.next(Observed::Ok),
            Action::Start("0.2.0".into()),
            "rolled back = started once more"
        );
        m.next(Observed::Started(8));
        match m.next(Observed::Ok) {
            Action::Fail(failure) => {
                assert!(failure.rolled_back);
                assert_eq!(
                    failure.reason,
                    "not up; rolled back by restarting 0.2.0 once more"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_restart_restarts_what_runs_never_the_groups_version() {
        // The group wants 0.3.0 (a deploy of it halted); the host runs 0.2.0.
        let s = after_a_halted_deploy("0.2.0");
        let (assessment, version) = assess_restart(Some(&s), "beat");
        assert_eq!(version, "0.2.0", "what runs, not 0.3.0");
        assert!(matches!(
            assessment,
            Assessment::Switch { staged: true, .. }
        ));

        let mut stopped = s.clone();
        stopped.state = ReleaseState::Stopped;
        stopped.desired_running = false;
        stopped.pid = None;
        assert_eq!(
            assess_restart(Some(&stopped), "beat").0,
            Assessment::Leave {
                why: "beat 0.2.0 is not running here: left as it is (`erel restart HOST beat` \
                      starts it)"
                    .into()
            }
        );
        assert_eq!(
            assess_restart(None, "beat").0,
            Assessment::Leave {
                why: "beat never ran here: left as it is (`erel restart HOST beat` starts it)"
                    .into()
            }
        );
    }

    /// A deploy of 0.3.0 that halted at its canary: 0.3.0 is staged everywhere (the
    /// newest unpacked), every host runs 0.2.0 again or never left it.
    fn after_a_halted_deploy(running: &str) -> ReleaseStatus {
        let mut s = status(running, ReleaseState::Running, 600);
        s.versions = vec!["0.1.0".into(), "0.2.0".into(), "0.3.0".into()];
        s
    }

    #[test]
    fn a_rollback_after_a_halted_deploy_leaves_hosts_that_never_switched() {
        let s = after_a_halted_deploy("0.2.0");
        let (assessment, version) =
            rollback_target(Some(&s), "beat", "0.3.0", None).expect("decided");
        assert_eq!(version, "0.2.0", "reported with what it runs");
        match assessment {
            Assessment::Leave { why } => assert_eq!(
                why,
                "runs beat 0.2.0, not the group's 0.3.0: left as it is (it never switched, \
                 or was rolled back already)"
            ),
            other => panic!("a staged 0.3.0 is not gone forward to: {other:?}"),
        }
    }

    #[test]
    fn a_rollback_goes_to_the_version_unpacked_before_the_groups() {
        let s = after_a_halted_deploy("0.3.0");
        let (assessment, target) =
            rollback_target(Some(&s), "beat", "0.3.0", None).expect("a target");
        assert_eq!(target, "0.2.0");
        let (mut m, first) = HostSwitch::begin(assessment, &target);
        assert_eq!(first, Action::Stop);
        assert_eq!(m.next(Observed::Ok), Action::Start("0.2.0".into()));

        // An older version deployed on purpose: nothing was unpacked before it.
        let mut older = after_a_halted_deploy("0.1.0");
        older.versions = vec!["0.1.0".into(), "0.2.0".into()];
        let why = rollback_target(Some(&older), "beat", "0.1.0", None).expect_err("nothing");
        assert_eq!(
            why,
            "no version of beat was unpacked before 0.1.0 (present, oldest first: 0.1.0, \
             0.2.0); name one with --to VERSION"
        );
        let why = rollback_target(None, "beat", "0.1.0", None).expect_err("unknown");
        assert!(why.contains("no release beat"), "{why}");
    }

    #[test]
    fn a_rollback_to_a_named_version_needs_it_present() {
        let s = after_a_halted_deploy("0.2.0");
        let (assessment, target) =
            rollback_target(Some(&s), "beat", "0.3.0", Some("0.1.0")).expect("a target");
        assert_eq!(target, "0.1.0", "whatever the host runs");
        assert!(
            matches!(&assessment, Assessment::Switch { previous: Some(p), staged: true, .. } if p.version == "0.2.0"),
            "{assessment:?}"
        );
        let why = rollback_target(Some(&s), "beat", "0.3.0", Some("0.0.9")).expect_err("absent");
        assert_eq!(
            why,
            "beat 0.0.9 is not present here (present, oldest first: 0.1.0, 0.2.0, 0.3.0)"
        );
        let (assessment, _) =
            rollback_target(Some(&s), "beat", "0.3.0", Some("0.2.0")).expect("decided");
        assert_eq!(
            assessment,
            Assessment::Leave {
                why: "runs beat 0.2.0 already".into()
            }
        );
    }

    /// An instant `secs` seconds after a fixed one (2026-11-29T12:00:00Z).
    fn at(secs: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_795_953_600 + secs).expect("an instant")
    }

    #[test]
    fn restarted_at_restarts_a_release_started_before_it_and_nothing_else() {
        let restarted_at = at(0);
        // Up 600s at +60s: started at -540s, before the instant: due.
        let before = status("0.2.0", ReleaseState::Running, 600);
        assert!(restart_due(Some(&before), "0.2.0", restarted_at, at(60)));
        // Up 30s at +60s: started at +30s, after it: up to date.
        let after = status("0.2.0", ReleaseState::Running, 30);
        assert!(!restart_due(Some(&after), "0.2.0", restarted_at, at(60)));
        // Started exactly at the instant: up to date (restarted at it, not before).
        let exactly = status("0.2.0", ReleaseState::Running, 60);
        assert!(!restart_due(Some(&exactly), "0.2.0", restarted_at, at(60)));
        // No up time reported: nothing runs to be restarted.
        let mut no_up = status("0.2.0", ReleaseState::Running, 0);
        no_up.up_secs = None;
        assert!(!restart_due(Some(&no_up), "0.2.0", restarted_at, at(60)));
        // Not the group's version, not running, not known: a deploy starts it anyway.
        assert!(!restart_due(Some(&before), "0.3.0", restarted_at, at(60)));
        let exited = status(
            "0.2.0",
            ReleaseState::Exited {
                code: Some(1),
                signal: None,
            },
            600,
        );
        assert!(!restart_due(Some(&exited), "0.2.0", restarted_at, at(60)));
        assert!(!restart_due(None, "0.2.0", restarted_at, at(60)));
        // The instant has not come on this master's clock: not yet, or a host restarted
        // now would be due again at every pass until then.
        assert!(!restart_due(Some(&before), "0.2.0", restarted_at, at(-1)));
        // An up time beyond any clock still counts as started before.
        let ancient = status("0.2.0", ReleaseState::Running, u64::MAX);
        assert!(restart_due(Some(&ancient), "0.2.0", restarted_at, at(60)));
    }

    #[test]
    fn only_a_switch_back_to_the_same_version_is_a_restart_in_place() {
        let s = status("0.2.0", ReleaseState::Running, 600);
        assert!(assess_restart(Some(&s), "beat")
            .0
            .restarts_in_place("0.2.0"));
        let older = status("0.1.0", ReleaseState::Running, 600);
        assert!(!assess(Some(&older), "0.2.0", &health(None), None).restarts_in_place("0.2.0"));
        assert!(!assess_restart(None, "beat").0.restarts_in_place("0.2.0"));
        assert!(!Assessment::UpToDate.restarts_in_place("0.2.0"));
    }

    #[test]
    fn a_deploy_falls_back_to_the_version_unpacked_before_not_a_staged_newer_one() {
        // 0.2.0 is desired and present but crashed; 0.3.0 was staged later, never ran.
        let mut s = after_a_halted_deploy("0.2.0");
        s.state = ReleaseState::Exited {
            code: Some(7),
            signal: None,
        };
        s.pid = None;
        match assess(Some(&s), "0.2.0", &health(None), None) {
            Assessment::Switch {
                previous: Some(previous),
                ..
            } => assert_eq!(previous.version, "0.1.0"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_empty_schedule_is_finished() {
        let mut s = GroupSchedule::new(Vec::new(), 1, 1);
        assert!(s.begin_next().is_empty());
        assert!(s.is_finished());
    }

    /// What follows a start of 0.2.0 as `pid`: verifying it, up from zero.
    fn verify_fresh(pid: u32) -> Action {
        Action::Verify {
            version: "0.2.0".into(),
            pid,
            up: Duration::ZERO,
        }
    }

    fn switch(previous: Option<(&str, bool)>) -> (HostSwitch, Action) {
        let previous = previous.map(|(version, was_running)| Previous {
            version: version.into(),
            was_running,
        });
        HostSwitch::begin(
            Assessment::Switch {
                previous,
                staged: true,
                stop_first: true,
            },
            "0.2.0",
        )
    }

    #[test]
    fn the_output_of_a_version_starts_at_its_first_header_after_another_versions() {
        let tail = "old line\n\
            --- erel: starting beat 1.0.0 at 2026-01-01T00:00:00Z ---\n\
            beat 1.0.0 listening\n\
            --- erel: starting beat 2.5.0 at 2026-01-01T00:01:00Z ---\n\
            failing\n\
            --- erel: starting beat 2.5.0 at 2026-01-01T00:01:01Z ---\n\
            failing\n";
        assert_eq!(
            output_of_version(tail, "beat", "2.5.0"),
            "--- erel: starting beat 2.5.0 at 2026-01-01T00:01:00Z ---\n\
             failing\n\
             --- erel: starting beat 2.5.0 at 2026-01-01T00:01:01Z ---\n\
             failing\n"
        );
        // No header of the version (cut above it): the whole tail.
        assert_eq!(output_of_version("failing\n", "beat", "2.5.0"), "failing\n");
        // Another version started last: its output is not the failed version's.
        assert_eq!(output_of_version(tail, "beat", "1.0.0"), tail);
        // A release named like a prefix of another is not taken for it.
        let other = "--- erel: starting beat2 2.5.0 at T ---\nx\n";
        assert_eq!(output_of_version(other, "beat", "2.5.0"), other);
    }

    #[test]
    fn a_first_install_starts_at_once_and_a_failure_only_stops_it() {
        let (assessment, desired) = (assess(None, "0.2.0", &health(None), None), "0.2.0");
        let (mut m, first) = HostSwitch::begin(assessment, desired);
        assert_eq!(
            first,
            Action::Start("0.2.0".into()),
            "nothing runs to be stopped"
        );
        assert_eq!(m.phase(), HostPhase::Starting);
        assert_eq!(m.next(Observed::Started(7)), verify_fresh(7));
    }

    #[test]
    fn a_switch_stops_starts_verifies_and_is_done() {
        let (mut m, first) = switch(Some(("0.1.0", true)));
        assert_eq!(first, Action::Stop);
        assert_eq!(m.phase(), HostPhase::Stopping);
        assert_eq!(m.next(Observed::Ok), Action::Start("0.2.0".into()));
        assert_eq!(m.phase(), HostPhase::Starting);
        assert_eq!(m.next(Observed::Started(7)), verify_fresh(7));
        assert_eq!(m.phase(), HostPhase::Verifying);
        assert_eq!(
            m.next(Observed::Ok),
            Action::Done {
                pid: 7,
                from: Some("0.1.0".into())
            }
        );
    }

    #[test]
    fn an_unhealthy_new_version_is_rolled_back_to_the_old_one() {
        let (mut m, _) = switch(Some(("0.1.0", true)));
        m.next(Observed::Ok);
        m.next(Observed::Started(7));
        let unhealthy = Observed::Failed {
            reason: "0.2.0: exited with code 3".into(),
            output_tail: "boom".into(),
        };
        assert_eq!(m.next(unhealthy), Action::Stop);
        assert_eq!(m.phase(), HostPhase::RollingBack);
        assert_eq!(m.next(Observed::Ok), Action::Start("0.1.0".into()));
        assert_eq!(m.phase(), HostPhase::RollingBack);
        assert!(matches!(
            m.next(Observed::Started(8)),
            Action::Verify { pid: 8, .. }
        ));
        assert_eq!(m.phase(), HostPhase::VerifyingOld);
        match m.next(Observed::Ok) {
            Action::Fail(failure) => {
                assert_eq!(failure.phase, HostPhase::Verifying);
                assert!(failure.rolled_back);
                assert_eq!(failure.output_tail, "boom");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_rollback_starts_nothing_that_did_not_run_and_says_what_failed() {
        let (mut m, _) = switch(Some(("0.1.0", false)));
        m.next(Observed::Ok);
        assert_eq!(m.next(Observed::failed("refused")), Action::Stop);
        match m.next(Observed::Ok) {
            Action::Fail(failure) => {
                assert_eq!(failure.phase, HostPhase::Starting);
                assert!(failure.rolled_back, "stopped is the previous state");
            }
            other => panic!("{other:?}"),
        }

        let (mut m, _) = switch(Some(("0.1.0", true)));
        m.next(Observed::Ok);
        m.next(Observed::failed("refused"));
        m.next(Observed::Ok);
        match m.next(Observed::failed("disk full")) {
            Action::Fail(failure) => {
                assert!(!failure.rolled_back);
                assert_eq!(
                    failure.reason,
                    "refused; starting 0.1.0 again failed: disk full"
                );
            }
            other => panic!("{other:?}"),
        }

        let (mut m, _) = switch(None);
        match m.next(Observed::failed("gone")) {
            Action::Fail(failure) => {
                assert_eq!(failure.phase, HostPhase::Stopping);
                assert!(!failure.rolled_back, "a failed stop is not rolled back");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_host_started_moments_ago_is_only_verified() {
        let (mut m, first) = HostSwitch::begin(
            Assessment::Verify {
                pid: 42,
                up: Duration::from_secs(1),
                previous: None,
            },
            "0.2.0",
        );
        assert_eq!(
            first,
            Action::Verify {
                version: "0.2.0".into(),
                pid: 42,
                up: Duration::from_secs(1)
            }
        );
        assert_eq!(
            m.next(Observed::Ok),
            Action::Done {
                pid: 42,
                from: None
            }
        );
    }
}
