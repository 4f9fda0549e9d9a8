//! Supervision of release processes: start, stop, restart with backoff, crash-loop
//! detection, output logs, and adoption of running releases after an agent restart.
//!
//! This file holds the desired state of each release and the supervision task that
//! restarts it with backoff and finds it crash-looping. Beside it:
//!
//! - [`start`] and [`stop`]: the two commands;
//! - [`adopt`]: what an earlier agent left running, and what a daemonizing start
//!   command left behind, taken over as the release;
//! - [`status`]: what `Ping` reports of each release;
//! - [`spawn`]: the checks a start passes and the spawn as the release's user;
//! - [`cgroup`]: one cgroup v2 per running release (the containment);
//! - [`process`]: `/proc` inspection, signals, and membership without cgroups;
//! - [`log`]: the pipe from each release to its output writer, the writer, which keeps
//!   the log under its cap at every instant, and the log's tail;
//! - [`record`]: the desired state and run record persisted per release.
//!
//! # How one release is kept
//!
//! Each release has an operation lock (a tokio mutex) held by `Start`, `Stop`, a
//! restart and the recovery at [`Supervisor::open`], so these never interleave, and a
//! small state (a std mutex, never held across an await) that [`Supervisor::statuses`]
//! reads. The state carries a *generation*: whoever takes a release over (`Start`,
//! `Stop`, recovery) bumps it, and a supervision task only acts (records an exit,
//! restarts) while the generation it was spawned for is still current. So a task can
//! never restart what is being stopped or replaced.
//!
//! # What a release is
//!
//! Everything the release's process starts belongs to the release: with cgroup v2, the
//! members of its cgroup (see [`cgroup`]); without (the fallback, said so in the
//! start-up log and in `Ping`), its session, process group, their descendants and
//! whatever carries its environment markers (see [`process::scan_members`]). Stop,
//! restart, adoption and "never two copies" are about all of them: a stop succeeds only
//! when none is left, and nothing is spawned while one is.
//!
//! A supervision task per release waits for its process: `wait()` for a child of this
//! agent (which also reaps it), a poll of `/proc` (pid and start time) for a process
//! adopted after an agent restart. When the main process returns status 0 soon after
//! its start (within `DAEMONIZE_WINDOW`) and leaves members behind, the start command
//! daemonized (a relx `daemon`, a double fork): the members are the release, supervised
//! until none is left. When it ends otherwise while the release should run, what is
//! left of it is stopped, and it is restarted after a backoff that doubles
//! from `restart_backoff` up to `restart_backoff_max`, and resets after a run of at least
//! `stable_after`. After `crash_loop_after` short runs in a row the release is
//! crash-looping: left stopped, with `crash_looping` recorded next to `should_run` (which
//! stays true) so that an agent restart does not hammer it either; the next `Start`
//! clears it.
//!
//! # Agent restarts
//!
//! Releases run in their own session (and cgroup), with their output piped to an output
//! writer rather than to the agent (see [`log`]), so they outlive the agent. The writer
//! is not part of the release: it runs outside its session and cgroup, is never counted
//! as a member nor signalled by a stop, and ends once the release's output is closed.
//! [`Supervisor::open`] reads every desired-state
//! file; for a release that should run it adopts what runs of it: the recorded process
//! when it is alive with the recorded start time, the members of a daemonized release,
//! or (no run record: an agent killed between spawn and record) the oldest member. It
//! starts the release only when nothing of it runs. What runs of another version than
//! the desired one, what is left of a main process that died while the agent was away,
//! processes with the release's markers outside its cgroup, and anything of a release
//! that should not run are stopped: an agent restart never leaves two copies running.

mod adopt;
mod cgroup;
mod log;
mod process;
mod record;
mod spawn;
mod start;
mod status;
mod stop;
#[cfg(test)]
mod tests;

pub(crate) use log::{run_output_writer, OUTPUT_WRITER_COMMAND};

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use erel_proto::ReleaseState;
use spawn::ReleaseChild;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::error::Result;
use crate::fs::Root;
use crate::settings::Supervision;

use cgroup::Containment;
use record::Desired;
use stop::wait_writer;

/// Grace between SIGTERM and SIGKILL when the agent itself stops a copy: the running
/// version when another is started, or a copy found at recovery that must not run.
pub(crate) const SWITCH_GRACE: Duration = Duration::from_secs(10);
/// How often an adopted process (not a child of this agent) is checked in `/proc`.
const ADOPTED_POLL: Duration = Duration::from_millis(250);
/// How long the output writer of a release that ended may take to drain the release's
/// last output and end, before the end of the run is recorded (and after a stop).
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);
/// Grace for what is left of a release after its main process ended on its own.
const LEFTOVER_GRACE: Duration = Duration::from_secs(5);
/// A main process that returns status 0 within this time of its start and leaves
/// processes behind has daemonized (a relx `daemon` waits for its node to boot, which
/// may take a while); one that ran longer simply ended, and what it left is stopped.
const DAEMONIZE_WINDOW: Duration = Duration::from_secs(120);
/// How long a stop waits for the supervision task to reap the stopped child.
const REAP_WAIT: Duration = Duration::from_secs(2);

/// The supervisor of every release on this host. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Supervisor {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: Root,
    host_id: String,
    settings: Supervision,
    /// How releases are contained: cgroup v2, or the fallback.
    containment: Containment,
    releases: Mutex<BTreeMap<String, Arc<Release>>>,
    /// Cancelled by [`Supervisor::detach`]: every task ends, no process is signalled.
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

/// One release name.
#[derive(Debug)]
struct Release {
    name: String,
    /// Held by whatever changes the release: Start, Stop, a restart, recovery.
    op: tokio::sync::Mutex<()>,
    live: Mutex<Live>,
}

/// The live state of a release; the std mutex guarding it is never held across an await.
#[derive(Debug)]
struct Live {
    desired: Option<Desired>,
    /// The process that runs now, if any.
    process: Option<Current>,
    state: ReleaseState,
    /// Restarts since the last Start.
    restarts: u32,
    /// Consecutive runs shorter than `stable_after`.
    short_runs: u32,
    /// Bumped by every take-over; a task acts only for its own generation.
    generation: u64,
    /// Cancels the current supervision task's backoff or poll.
    task: Option<CancellationToken>,
    /// The pid of the last process, for `Started` during a backoff.
    last_pid: Option<u32>,
}

/// The process of a release that runs now.
#[derive(Debug, Clone)]
struct Current {
    /// The pid reported: the main process, or the oldest member once it daemonized.
    pid: u32,
    version: String,
    run: Run,
    /// Becomes true once the supervision task reaped it; `None` for an adopted process.
    reaped: Option<watch::Receiver<bool>>,
}

/// How a supervision task learns that its process ended.
#[derive(Debug)]
enum Waiter {
    /// A child of this agent: waited for, and so reaped (said on the channel).
    Own(Box<ReleaseChild>, watch::Sender<bool>),
    /// A process adopted after an agent restart: polled in `/proc`.
    Adopted,
    /// A release whose start command daemonized: polled until no member is left.
    Members,
}

/// One run of a release.
#[derive(Debug, Clone, Copy)]
struct Run {
    /// The main process (pid, start time): the session and group its members share
    /// without cgroups.
    anchor: (u32, u64),
    started: Instant,
    /// The run's output writer (pid, start time), when known; not part of the release.
    /// Waited for before the end of the run is recorded.
    writer: Option<(u32, u64)>,
}

/// What a supervision task does next.
#[derive(Debug)]
enum Step {
    /// Wait for the process (the anchor) to end, or for the members of a daemonized
    /// release to be gone.
    Wait(Run, Waiter),
    /// Restart after this delay.
    Backoff(Duration),
}

/// How a process ended.
#[derive(Debug, Clone, Copy, Default)]
struct Exit {
    code: Option<i32>,
    signal: Option<i32>,
}

impl Release {
    fn live(&self) -> MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn owned_by(&self, generation: u64) -> bool {
        self.live().generation == generation
    }
}

impl Supervisor {
    /// Loads desired state, adopts releases that still run, and starts those that
    /// should run but do not.
    ///
    /// Containment is settled here: cgroup v2 under `settings.cgroup_parent` when it is
    /// usable, the fallback otherwise, logged either way (a warning for the fallback).
    pub(crate) async fn open(root: Root, host_id: String, settings: Supervision) -> Result<Self> {
        let containment = Containment::detect(&settings.cgroup_parent, root.path());
        match &containment {
            Containment::Cgroup(_) => info!("containment: {}", containment.describe()),
            Containment::Fallback(_) => warn!(
                "containment: {}; a release that leaves its session and environment can escape stop and restart",
                containment.describe()
            ),
        }
        let inner = Arc::new(Inner {
            root,
            host_id,
            settings,
            containment,
            releases: Mutex::new(BTreeMap::new()),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        inner.recover_all().await?;
        Ok(Supervisor { inner })
    }

    /// How releases are contained, in one line: `cgroup v2 <dir>` or
    /// `fallback to process groups (<why>)`. Reported in `Ping`.
    pub(crate) fn containment(&self) -> String {
        self.inner.containment.describe()
    }

    /// Runs `work` while no start or stop of release `name` runs: they wait for it, and
    /// it for them (the release's operation lock, which `Start` and `Stop` hold).
    pub(crate) async fn exclusively<T>(
        &self,
        name: &str,
        work: impl std::future::Future<Output = T>,
    ) -> T {
        let release = self.inner.release(name);
        let _op = release.op.lock().await;
        work.await
    }

    /// How many versions of a release beyond the running one retention keeps.
    pub(crate) fn keep_versions(&self) -> usize {
        self.inner.settings.keep_versions
    }

    /// Removes the agent's cgroup directory when nothing runs in it any more (a release
    /// still running keeps it, and its own cgroup). For an agent that goes away for good,
    /// such as the demo's; a host's agent keeps its directory for its whole life.
    pub(crate) fn remove_empty_cgroups(&self) {
        if let Containment::Cgroup(tree) = &self.inner.containment {
            tree.remove_if_empty();
        }
    }

    /// Stops supervising (tasks end) without touching the release processes. The
    /// supervisor refuses `Start` afterwards.
    pub(crate) async fn detach(&self) {
        self.inner.shutdown.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }
}

impl Inner {
    fn registry(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Release>>> {
        self.releases.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn registered(&self) -> Vec<Arc<Release>> {
        self.registry().values().cloned().collect()
    }

    fn find(&self, name: &str) -> Option<Arc<Release>> {
        self.registry().get(name).cloned()
    }

    fn release(&self, name: &str) -> Arc<Release> {
        let new = || {
            Arc::new(Release {
                name: name.to_string(),
                op: tokio::sync::Mutex::new(()),
                live: Mutex::new(Live {
                    desired: None,
                    process: None,
                    state: ReleaseState::Stopped,
                    restarts: 0,
                    short_runs: 0,
                    generation: 0,
                    task: None,
                    last_pid: None,
                }),
            })
        };
        self.registry()
            .entry(name.to_string())
            .or_insert_with(new)
            .clone()
    }

    /// Takes a release over: the current supervision task no longer acts. Returns the
    /// new generation and a token for the task that will own it.
    fn take_over(&self, live: &mut Live) -> (u64, CancellationToken) {
        if let Some(task) = live.task.take() {
            task.cancel();
        }
        live.generation += 1;
        let token = self.shutdown.child_token();
        live.task = Some(token.clone());
        (live.generation, token)
    }

    /// Live members of release `name`: its cgroup's, or without cgroups what
    /// [`process::scan_members`] finds from `anchor` (the main process, pid and start
    /// time) and the release's markers.
    fn members(&self, name: &str, anchor: Option<(u32, u64)>) -> Vec<u32> {
        match &self.containment {
            Containment::Cgroup(tree) => tree.members(name),
            Containment::Fallback(_) => process::scan_members(anchor, self.root.path(), name),
        }
    }

    fn spawn_task(
        self: &Arc<Self>,
        release: &Arc<Release>,
        generation: u64,
        token: CancellationToken,
        step: Step,
    ) {
        let (inner, release) = (Arc::clone(self), Arc::clone(release));
        self.tasks
            .spawn(async move { inner.supervise(release, generation, token, step).await });
    }

    /// The supervision task of one generation of a release.
    async fn supervise(
        self: Arc<Self>,
        release: Arc<Release>,
        generation: u64,
        token: CancellationToken,
        mut step: Step,
    ) {
        loop {
            step = match step {
                Step::Wait(run, waiter) => {
                    let Run {
                        anchor, started, ..
                    } = run;
                    let was_members = matches!(waiter, Waiter::Members);
                    let Some(exit) = self.wait_exit(&release, anchor, waiter, &token).await else {
                        return;
                    };
                    if !release.owned_by(generation) {
                        return;
                    }
                    let left = if was_members {
                        Vec::new()
                    } else {
                        self.members(&release.name, Some(anchor))
                    };
                    if self.daemonized(&release, generation, exit, started.elapsed(), &left) {
                        step = Step::Wait(run, Waiter::Members);
                        continue;
                    }
                    if !left.is_empty() {
                        warn!(release = %release.name, pid = anchor.0, members = left.len(), "the main process ended; stopping what is left of the release");
                        let stopped =
                            self.stop_release(&release.name, Some(anchor), LEFTOVER_GRACE);
                        log_failure(&release.name, "cannot stop what is left", stopped.await);
                    }
                    // Nothing of the release holds its output any more: the writer ends
                    // once it wrote the last of it. Waited for, so the tail holds the
                    // release's last words.
                    wait_writer(&release.name, run.writer).await;
                    let _op = release.op.lock().await;
                    match self.record_end(&release, generation, started.elapsed(), exit) {
                        Some(delay) => Step::Backoff(delay),
                        None => return,
                    }
                }
                Step::Backoff(delay) => {
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = token.cancelled() => return,
                    }
                    let _op = release.op.lock().await;
                    // Under the operation lock: neither the desired state nor the
                    // generation changes until the relaunch is done.
                    let desired = release.live().desired.clone();
                    let wanted = desired.filter(|d| d.should_run && !d.crash_looping);
                    let Some(desired) = wanted.filter(|_| release.owned_by(generation)) else {
                        return;
                    };
                    let Some(next) = self.relaunch(&release, generation, &desired, "restart")
                    else {
                        return;
                    };
                    if let Step::Wait(..) = &next {
                        let mut live = release.live();
                        live.restarts += 1;
                        info!(release = %release.name, version = %desired.version, pid = next.pid(), restarts = live.restarts, "restarted");
                    }
                    next
                }
            };
        }
    }

    /// Launches the desired version once more (a restart, or the start at agent start,
    /// which `what` names); a launch that fails counts as a run that ended at once.
    /// `None` when the release is left stopped.
    fn relaunch(
        &self,
        release: &Release,
        generation: u64,
        desired: &Desired,
        what: &str,
    ) -> Option<Step> {
        match self.launch(release, desired) {
            Ok(step) => Some(step),
            Err(error) => {
                warn!(release = %release.name, version = %desired.version, "{what} failed: {error}");
                let delay =
                    self.record_end(release, generation, Duration::ZERO, Exit::default())?;
                Some(Step::Backoff(delay))
            }
        }
    }

    /// Waits for the process to end; `None` when the task is to end first (detach, or a
    /// take-over while polling an adopted process).
    async fn wait_exit(
        &self,
        release: &Release,
        anchor: (u32, u64),
        waiter: Waiter,
        token: &CancellationToken,
    ) -> Option<Exit> {
        let members = match waiter {
            Waiter::Own(mut child, reaped) => {
                return tokio::select! {
                    status = child.wait() => {
                        let _ = reaped.send(true);
                        Some(match status {
                            Ok(status) => Exit { code: status.code(), signal: status.signal() },
                            Err(e) => {
                                warn!(release = %release.name, pid = anchor.0, "cannot wait for the process: {e}");
                                Exit::default()
                            }
                        })
                    }
                    // Detach: the child is left running; dropping it does not kill it.
                    () = self.shutdown.cancelled() => None,
                };
            }
            Waiter::Members => true,
            Waiter::Adopted => false,
        };
        let mut poll = tokio::time::interval(ADOPTED_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = poll.tick() => {
                    let gone = if members {
                        !self.follow_members(release, anchor)
                    } else {
                        !process::is_alive(anchor.0, anchor.1)
                    };
                    if gone {
                        return Some(Exit::default());
                    }
                }
                () = token.cancelled() => return None,
            }
        }
    }

    /// Records the end of a run (the caller holds the operation lock) and decides: the
    /// delay before a restart, or `None` when the release is left stopped.
    fn record_end(
        &self,
        release: &Release,
        generation: u64,
        ran: Duration,
        exit: Exit,
    ) -> Option<Duration> {
        let settings = &self.settings;
        let (crashed, delay, pid) = {
            let mut live = release.live();
            if live.generation != generation {
                return None;
            }
            let pid = live.process.take().map(|p| p.pid);
            live.short_runs = if ran >= settings.stable_after {
                0
            } else {
                live.short_runs + 1
            };
            if !live.desired.as_ref().is_some_and(|d| d.should_run) {
                live.state = ReleaseState::Stopped;
                return None;
            }
            if live.short_runs >= settings.crash_loop_after {
                live.state = ReleaseState::CrashLooping;
                live.task = None;
                if let Some(desired) = live.desired.as_mut() {
                    desired.crash_looping = true;
                }
                (live.desired.clone(), Duration::ZERO, pid)
            } else {
                live.state = ReleaseState::Exited {
                    code: exit.code,
                    signal: exit.signal,
                };
                (None, backoff(settings, live.short_runs), pid)
            }
        };
        if pid.is_some() {
            let removed = record::remove_run(&self.root, &release.name);
            log_failure(&release.name, "cannot remove the run record", removed);
        }
        if let Some(desired) = crashed {
            let saved = record::save_desired(&self.root, &desired);
            log_failure(&release.name, "cannot record the crash loop", saved);
            warn!(release = %release.name, pid, code = exit.code, signal = exit.signal, runs = settings.crash_loop_after, "crash-looping: left stopped until the next start");
            return None;
        }
        info!(release = %release.name, pid, code = exit.code, signal = exit.signal, delay_ms = delay.as_millis() as u64, "exited; restarting after backoff");
        Some(delay)
    }
}

impl Step {
    /// The pid of the process waited for; 0 during a backoff.
    fn pid(&self) -> u32 {
        match self {
            Step::Wait(run, _) => run.anchor.0,
            Step::Backoff(_) => 0,
        }
    }
}

impl Live {
    /// Makes `run` of `version`, shown as `pid`, what runs now.
    fn run(&mut self, pid: u32, version: &str, run: Run, reaped: Option<watch::Receiver<bool>>) {
        let version = version.to_string();
        self.last_pid = Some(pid);
        self.process = Some(Current {
            pid,
            version,
            run,
            reaped,
        });
        self.state = ReleaseState::Running;
    }
}

/// Logs the failure of something a supervisor carries on without, such as a record that
/// could not be written.
fn log_failure<T>(release: &str, what: &str, result: Result<T>) {
    if let Err(e) = result {
        warn!(release = %release, "{what}: {e}");
    }
}

/// `items` as one plain log or message value: `18439,18440`.
pub(crate) fn comma_separated<T: std::fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    let items: Vec<String> = items.into_iter().map(|item| item.to_string()).collect();
    items.join(",")
}

/// The delay before the restart that follows `short_runs` short runs in a row.
fn backoff(settings: &Supervision, short_runs: u32) -> Duration {
    let doublings = short_runs.saturating_sub(1).min(20);
    settings
        .restart_backoff
        .saturating_mul(1u32 << doublings)
        .min(settings.restart_backoff_max)
}
