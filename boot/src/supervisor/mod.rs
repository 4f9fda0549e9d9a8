//! Supervision of release processes: start, stop, restart with backoff, crash-loop
//! detection, output logs, and adoption of running releases after an agent restart.
//!
//! - [`record`]: the desired state and run record persisted per release;
//! - [`cgroup`]: one cgroup v2 per running release (the containment);
//! - [`process`]: `/proc` inspection, spawning, and membership without cgroups;
//! - [`log`]: the pipe from each release to its output writer, the writer, which keeps
//!   the log under its cap at every instant, and the log's tail.
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

pub(crate) mod cgroup;
mod log;
mod process;

pub use log::{run_output_writer, OUTPUT_WRITER_COMMAND};
mod record;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use erel_proto::{ReleaseState, ReleaseStatus, Start, Started, Stopped};
use tokio::process::Child;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::fs::{check_name, Root};
use crate::settings::Supervision;

use cgroup::Containment;
use process::GroupStop;
use record::{Desired, RunRecord};

/// Grace between SIGTERM and SIGKILL when the agent itself stops a copy: the running
/// version when another is started, or a copy found at recovery that must not run.
pub const SWITCH_GRACE: Duration = Duration::from_secs(10);
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
pub struct Supervisor {
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
    /// The main process (pid, start time): the session and group its members share
    /// without cgroups.
    anchor: (u32, u64),
    version: String,
    started: Instant,
    /// Becomes true once the supervision task reaped it; `None` for an adopted process.
    reaped: Option<watch::Receiver<bool>>,
    /// Its output writer (pid, start time), when known; not part of the release.
    writer: Option<(u32, u64)>,
}

/// How a supervision task learns that its process ended.
#[derive(Debug)]
enum Waiter {
    /// A child of this agent: waited for, and so reaped.
    Own {
        child: Box<Child>,
        reaped: watch::Sender<bool>,
    },
    /// A process adopted after an agent restart: polled in `/proc`.
    Adopted,
    /// A release whose start command daemonized: polled until no member is left.
    Members,
}

/// What a supervision task does next.
#[derive(Debug)]
enum Step {
    /// Wait for the process (the anchor) to end, or for the members of a daemonized
    /// release to be gone.
    Wait {
        pid: u32,
        start_time: u64,
        started: Instant,
        /// The run's output writer (pid, start time), waited for before the end of the
        /// run is recorded.
        writer: Option<(u32, u64)>,
        waiter: Waiter,
    },
    /// Restart after this delay.
    Backoff(Duration),
}

/// How a process ended.
#[derive(Debug, Clone, Copy)]
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
    pub async fn open(root: Root, host_id: String, settings: Supervision) -> Result<Self> {
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
        let (all, damaged) = record::load_all_desired(&inner.root)?;
        for error in damaged {
            warn!("ignoring a damaged desired-state file: {error}");
        }
        for desired in all {
            let name = desired.name.clone();
            if let Err(error) = inner.recover(desired).await {
                warn!(release = %name, "recovery failed: {error}");
            }
        }
        Ok(Supervisor { inner })
    }

    /// Starts a release version (see the protocol's `Start`).
    pub async fn start(&self, request: &Start) -> Result<Started> {
        self.inner.start(request).await
    }

    /// How releases are contained, in one line: `cgroup v2 <dir>` or
    /// `fallback to process groups (<why>)`. Reported in `Ping`.
    pub fn containment(&self) -> String {
        self.inner.containment.describe()
    }

    /// Stops a release: SIGTERM to every member, SIGKILL (`cgroup.kill`) after `grace`;
    /// succeeds only when nothing of it is left.
    pub async fn stop(&self, name: &str, grace: Duration) -> Result<Stopped> {
        self.inner.stop(name, grace).await
    }

    /// Every known release, from live state: those with a desired state and those with a
    /// directory under `releases/`.
    pub async fn statuses(&self) -> Vec<ReleaseStatus> {
        self.inner.statuses()
    }

    /// For retention: each release with the version that runs or should run (both while
    /// one version replaces another).
    #[cfg(test)]
    pub fn running_versions(&self) -> Vec<(String, String)> {
        let releases: Vec<Arc<Release>> = self.inner.registered();
        let mut out = Vec::new();
        for release in releases {
            let live = release.live();
            if let Some(desired) = live.desired.as_ref().filter(|d| d.should_run) {
                out.push((release.name.clone(), desired.version.clone()));
            }
            if let Some(current) = &live.process {
                let pair = (release.name.clone(), current.version.clone());
                if !out.contains(&pair) {
                    out.push(pair);
                }
            }
        }
        out
    }

    /// Removes the agent's cgroup directory when nothing runs in it any more (a release
    /// still running keeps it, and its own cgroup). For an agent that goes away for good,
    /// such as the demo's; a host's agent keeps its directory for its whole life.
    pub fn remove_empty_cgroups(&self) {
        if let Containment::Cgroup(tree) = &self.inner.containment {
            tree.remove_if_empty();
        }
    }

    /// Stops supervising (tasks end) without touching the release processes. The
    /// supervisor refuses `Start` afterwards.
    pub async fn detach(&self) {
        self.inner.shutdown.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }
}

impl Inner {
    fn registered(&self) -> Vec<Arc<Release>> {
        let releases = self.releases.lock().unwrap_or_else(PoisonError::into_inner);
        releases.values().cloned().collect()
    }

    fn find(&self, name: &str) -> Option<Arc<Release>> {
        let releases = self.releases.lock().unwrap_or_else(PoisonError::into_inner);
        releases.get(name).cloned()
    }

    fn release(&self, name: &str) -> Arc<Release> {
        let mut releases = self.releases.lock().unwrap_or_else(PoisonError::into_inner);
        releases
            .entry(name.to_string())
            .or_insert_with(|| {
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
            })
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

    async fn start(self: &Arc<Self>, request: &Start) -> Result<Started> {
        if self.shutdown.is_cancelled() {
            return Err(Error::Busy("the agent is shutting down".into()));
        }
        check_name("release name", &request.name)?;
        check_name("release version", &request.version)?;
        let argv = if request.argv.is_empty() {
            erel_proto::rules::default_argv(&request.name)
        } else {
            request.argv.clone()
        };
        let desired = Desired {
            name: request.name.clone(),
            version: request.version.clone(),
            argv,
            env: request.env.clone(),
            user: request.user.clone(),
            should_run: true,
            crash_looping: false,
        };
        let release = self.release(&request.name);
        let _op = release.op.lock().await;

        if let Some(pid) = already_running(&release.live(), &request.version) {
            return Ok(Started {
                pid,
                already_running: true,
            });
        }
        process::preflight(&self.root, &self.host_id, &desired)?;
        record::save_desired(&self.root, &desired)?;
        let (generation, token, old) = {
            let mut live = release.live();
            let (generation, token) = self.take_over(&mut live);
            live.desired = Some(desired.clone());
            (generation, token, live.process.clone())
        };
        let ended = match old {
            Some(old) => {
                info!(release = %release.name, from = %old.version, to = %desired.version, pid = old.pid, "stopping the running version to start another");
                self.end_process(&release, &old, SWITCH_GRACE).await
            }
            // No process is known, yet something of the release may still be ending
            // (what a crashed main process left): one copy at a time.
            None => self.stop_release(&release.name, None, SWITCH_GRACE).await,
        };
        if let Err(error) = ended {
            release.live().task = None;
            return Err(error);
        }
        match self.launch(&release, &desired) {
            Ok(step) => {
                let pid = step_pid(&step);
                {
                    let mut live = release.live();
                    live.restarts = 0;
                    live.short_runs = 0;
                }
                info!(release = %release.name, version = %desired.version, pid, "started");
                self.spawn_task(&release, generation, token, step);
                Ok(Started {
                    pid,
                    already_running: false,
                })
            }
            Err(error) => {
                let mut stopped = desired.clone();
                stopped.should_run = false;
                if let Err(e) = record::save_desired(&self.root, &stopped) {
                    warn!(release = %release.name, "cannot record that it should not run: {e}");
                }
                let mut live = release.live();
                live.desired = Some(stopped);
                live.state = ReleaseState::Stopped;
                live.task = None;
                Err(error)
            }
        }
    }

    async fn stop(self: &Arc<Self>, name: &str, grace: Duration) -> Result<Stopped> {
        check_name("release name", name)?;
        let Some(release) = self.find(name) else {
            return Ok(Stopped {
                was_running: false,
                killed: false,
            });
        };
        let _op = release.op.lock().await;
        let desired = release.live().desired.clone();
        if let Some(mut desired) = desired.filter(|d| d.should_run || d.crash_looping) {
            desired.should_run = false;
            desired.crash_looping = false;
            record::save_desired(&self.root, &desired)?;
            release.live().desired = Some(desired);
        }
        let current = {
            let mut live = release.live();
            self.take_over(&mut live);
            live.task = None;
            live.process.clone()
        };
        let outcome = match &current {
            Some(current) => self.end_process(&release, current, grace).await?,
            // Between runs: nothing may be left either (a crash's leftovers being
            // stopped by the supervision task, a daemon found by its markers).
            None => self.stop_release(name, None, grace).await?,
        };
        release.live().state = ReleaseState::Stopped;
        info!(release = %name, was_running = outcome.was_running, killed = outcome.killed, "stopped");
        Ok(Stopped {
            was_running: outcome.was_running,
            killed: outcome.killed,
        })
    }

    /// Stops everything of `current` (the caller holds the operation lock and has taken
    /// the release over), waits for the child to be reaped, and forgets it.
    async fn end_process(
        &self,
        release: &Release,
        current: &Current,
        grace: Duration,
    ) -> Result<GroupStop> {
        let outcome = self
            .stop_release(&release.name, Some(current.anchor), grace)
            .await?;
        if let Some(mut reaped) = current.reaped.clone() {
            // Err: the task is gone (detached); the runtime reaps the orphan.
            let _ = tokio::time::timeout(REAP_WAIT, reaped.wait_for(|r| *r)).await;
        }
        // Nothing of the release is left: its writer ends with the last output, and a
        // stopped release leaves no writer behind.
        wait_writer(&release.name, current.writer).await;
        if let Err(e) = record::remove_run(&self.root, &release.name) {
            warn!(release = %release.name, "cannot remove the run record: {e}");
        }
        let mut live = release.live();
        if live
            .process
            .as_ref()
            .is_some_and(|p| p.anchor == current.anchor)
        {
            live.process = None;
            live.last_pid = Some(current.pid);
        }
        Ok(outcome)
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

    /// Stops every member of release `name`: SIGTERM to each, then after `grace` the
    /// cgroup's kill (or SIGKILL to each member); an emptied cgroup is removed.
    async fn stop_release(
        &self,
        name: &str,
        anchor: Option<(u32, u64)>,
        grace: Duration,
    ) -> Result<GroupStop> {
        let what = format!("release {name}");
        match &self.containment {
            Containment::Cgroup(tree) => {
                let outcome =
                    process::stop_members(&what, || tree.members(name), || tree.kill(name), grace)
                        .await?;
                tree.remove(name);
                Ok(outcome)
            }
            Containment::Fallback(_) => {
                let members = || process::scan_members(anchor, self.root.path(), name);
                let kill_all = || {
                    process::signal_each(&members(), nix::sys::signal::Signal::SIGKILL);
                    Ok(())
                };
                process::stop_members(&what, members, kill_all, grace).await
            }
        }
    }

    /// Spawns the desired version and records it as the current process. The caller holds
    /// the operation lock and owns the generation. Refused while anything of the release
    /// still runs: never two copies.
    fn launch(&self, release: &Release, desired: &Desired) -> Result<Step> {
        let left = self.members(&desired.name, None);
        if !left.is_empty() {
            return Err(Error::SpawnFailed {
                name: desired.name.clone(),
                version: desired.version.clone(),
                reason: format!(
                    "{} processes of the release still run (pids {left:?}); a second copy is never started",
                    left.len()
                ),
            });
        }
        let cgroup = match &self.containment {
            Containment::Cgroup(tree) => Some(tree.prepare(&desired.name)?),
            Containment::Fallback(_) => None,
        };
        let spawned = process::spawn(&self.root, &self.host_id, desired, &self.settings, cgroup)?;
        let run = RunRecord {
            pid: spawned.pid,
            pgid: i32::try_from(spawned.pid).unwrap_or(0),
            start_time: spawned.start_time,
            version: desired.version.clone(),
            daemonized: false,
            writer_pid: spawned.writer.0,
            writer_start_time: spawned.writer.1,
        };
        if let Err(e) = record::save_run(&self.root, &desired.name, &run) {
            warn!(release = %desired.name, "cannot write the run record (an agent restart finds the process by its cgroup or environment): {e}");
        }
        let (reaped_tx, reaped_rx) = watch::channel(false);
        let started = Instant::now();
        let mut live = release.live();
        live.process = Some(Current {
            pid: spawned.pid,
            anchor: (spawned.pid, spawned.start_time),
            version: desired.version.clone(),
            started,
            reaped: Some(reaped_rx),
            writer: Some(spawned.writer),
        });
        live.last_pid = Some(spawned.pid);
        live.state = ReleaseState::Running;
        Ok(Step::Wait {
            pid: spawned.pid,
            start_time: spawned.start_time,
            started,
            writer: Some(spawned.writer),
            waiter: Waiter::Own {
                child: Box::new(spawned.child),
                reaped: reaped_tx,
            },
        })
    }

    /// The main process of a release ended after running `ran` and `left` members
    /// remain: with status 0 within [`DAEMONIZE_WINDOW`] the start command daemonized,
    /// and the members become the release (recorded, so that an agent restart adopts
    /// them); `None` otherwise.
    fn daemonized(
        &self,
        release: &Release,
        generation: u64,
        anchor: (u32, u64),
        (exit, ran): (Exit, Duration),
        left: &[u32],
    ) -> Option<u32> {
        if exit.code != Some(0) || ran > DAEMONIZE_WINDOW || left.is_empty() {
            return None;
        }
        let shown = oldest(left)?;
        let (version, writer) = {
            let live = release.live();
            if live.generation != generation {
                return None;
            }
            let current = live.process.as_ref()?;
            (current.version.clone(), current.writer.unwrap_or((0, 0)))
        };
        // Recorded before it shows: whoever sees the new pid may restart the agent.
        let run = RunRecord {
            pid: anchor.0,
            pgid: i32::try_from(anchor.0).unwrap_or(0),
            start_time: anchor.1,
            version,
            daemonized: true,
            writer_pid: writer.0,
            writer_start_time: writer.1,
        };
        if let Err(e) = record::save_run(&self.root, &release.name, &run) {
            warn!(release = %release.name, "cannot record that the release daemonized: {e}");
        }
        {
            let mut live = release.live();
            if live.generation != generation {
                return None;
            }
            live.process.as_mut()?.pid = shown;
            live.last_pid = Some(shown);
        }
        info!(release = %release.name, pid = shown, members = left.len(), "the start command returned 0 and left processes: supervising them as the release");
        Some(shown)
    }

    fn spawn_task(
        self: &Arc<Self>,
        release: &Arc<Release>,
        generation: u64,
        token: CancellationToken,
        step: Step,
    ) {
        let inner = Arc::clone(self);
        let release = Arc::clone(release);
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
                Step::Wait {
                    pid,
                    start_time,
                    started,
                    writer,
                    waiter,
                } => {
                    let was_members = matches!(waiter, Waiter::Members);
                    let Some(exit) = self
                        .wait_exit(&release, pid, start_time, waiter, &token)
                        .await
                    else {
                        return;
                    };
                    if !release.owned_by(generation) {
                        return;
                    }
                    let anchor = (pid, start_time);
                    let left = if was_members {
                        Vec::new()
                    } else {
                        self.members(&release.name, Some(anchor))
                    };
                    if self
                        .daemonized(
                            &release,
                            generation,
                            anchor,
                            (exit, started.elapsed()),
                            &left,
                        )
                        .is_some()
                    {
                        step = Step::Wait {
                            pid,
                            start_time,
                            started,
                            writer,
                            waiter: Waiter::Members,
                        };
                        continue;
                    }
                    if !left.is_empty() {
                        warn!(release = %release.name, pid, members = left.len(), "the main process ended; stopping what is left of the release");
                        if let Err(e) = self
                            .stop_release(&release.name, Some(anchor), LEFTOVER_GRACE)
                            .await
                        {
                            warn!(release = %release.name, "{e}");
                        }
                    }
                    // Nothing of the release holds its output any more: the writer ends
                    // once it wrote the last of it. Waited for, so the tail holds the
                    // release's last words.
                    wait_writer(&release.name, writer).await;
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
                    let desired = {
                        let live = release.live();
                        match &live.desired {
                            Some(d)
                                if live.generation == generation
                                    && d.should_run
                                    && !d.crash_looping =>
                            {
                                d.clone()
                            }
                            _ => return,
                        }
                    };
                    match self.launch(&release, &desired) {
                        Ok(next) => {
                            let restarts = {
                                let mut live = release.live();
                                live.restarts += 1;
                                live.restarts
                            };
                            info!(release = %release.name, version = %desired.version, pid = step_pid(&next), restarts, "restarted");
                            next
                        }
                        Err(error) => {
                            warn!(release = %release.name, version = %desired.version, "restart failed: {error}");
                            let exit = Exit {
                                code: None,
                                signal: None,
                            };
                            match self.record_end(&release, generation, Duration::ZERO, exit) {
                                Some(delay) => Step::Backoff(delay),
                                None => return,
                            }
                        }
                    }
                }
            };
        }
    }

    /// Waits for the process to end; `None` when the task is to end first (detach, or a
    /// take-over while polling an adopted process).
    async fn wait_exit(
        &self,
        release: &Release,
        pid: u32,
        start_time: u64,
        waiter: Waiter,
        token: &CancellationToken,
    ) -> Option<Exit> {
        match waiter {
            Waiter::Own { mut child, reaped } => {
                tokio::select! {
                    status = child.wait() => {
                        let _ = reaped.send(true);
                        Some(match status {
                            Ok(status) => Exit { code: status.code(), signal: status.signal() },
                            Err(e) => {
                                warn!(release = %release.name, pid, "cannot wait for the process: {e}");
                                Exit { code: None, signal: None }
                            }
                        })
                    }
                    // Detach: the child is left running; dropping it does not kill it.
                    () = self.shutdown.cancelled() => None,
                }
            }
            Waiter::Members => {
                let mut poll = tokio::time::interval(ADOPTED_POLL);
                poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = poll.tick() => {
                            let left = self.members(&release.name, Some((pid, start_time)));
                            let Some(shown) = oldest(&left) else {
                                return Some(Exit { code: None, signal: None });
                            };
                            let mut live = release.live();
                            if let Some(current) = live.process.as_mut().filter(|c| c.anchor == (pid, start_time)) {
                                if !left.contains(&current.pid) {
                                    current.pid = shown;
                                    live.last_pid = Some(shown);
                                }
                            }
                        }
                        () = token.cancelled() => return None,
                    }
                }
            }
            Waiter::Adopted => {
                let mut poll = tokio::time::interval(ADOPTED_POLL);
                poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = poll.tick() => {
                            if !process::is_alive(pid, start_time) {
                                return Some(Exit { code: None, signal: None });
                            }
                        }
                        () = token.cancelled() => return None,
                    }
                }
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
        let (crashed, desired, delay, pid) = {
            let mut live = release.live();
            if live.generation != generation {
                return None;
            }
            let pid = live.process.take().map(|p| p.pid);
            if ran >= settings.stable_after {
                live.short_runs = 0;
            } else {
                live.short_runs += 1;
            }
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
                (true, live.desired.clone(), Duration::ZERO, pid)
            } else {
                live.state = ReleaseState::Exited {
                    code: exit.code,
                    signal: exit.signal,
                };
                (false, None, backoff(settings, live.short_runs), pid)
            }
        };
        if pid.is_some() {
            if let Err(e) = record::remove_run(&self.root, &release.name) {
                warn!(release = %release.name, "cannot remove the run record: {e}");
            }
        }
        if crashed {
            if let Some(desired) = desired {
                if let Err(e) = record::save_desired(&self.root, &desired) {
                    warn!(release = %release.name, "cannot record the crash loop: {e}");
                }
            }
            warn!(release = %release.name, ?pid, code = ?exit.code, signal = ?exit.signal, runs = settings.crash_loop_after, "crash-looping: left stopped until the next start");
            return None;
        }
        info!(release = %release.name, ?pid, code = ?exit.code, signal = ?exit.signal, delay_ms = delay.as_millis() as u64, "exited; restarting after backoff");
        Some(delay)
    }

    /// Brings one release recorded on disk back under supervision at agent start.
    async fn recover(self: &Arc<Self>, desired: Desired) -> Result<()> {
        let release = self.release(&desired.name);
        let _op = release.op.lock().await;
        release.live().desired = Some(desired.clone());
        let name = desired.name.clone();

        let recorded = record::load_run(&self.root, &name).unwrap_or_else(|e| {
            warn!(release = %name, "ignoring the run record: {e}");
            None
        });
        let anchor = recorded.as_ref().map(|r| (r.pid, r.start_time));
        let members = self.members(&name, anchor);
        self.stop_strays(&name, &members).await;

        // What runs of the release, if anything: its main process (pid, start time), or
        // its members when the start command daemonized, and its version.
        let running = match recorded.as_ref() {
            _ if members.is_empty() => None,
            Some(run)
                if process::is_alive(run.pid, run.start_time) && members.contains(&run.pid) =>
            {
                Some((run.pid, run.start_time, run.version.clone(), false))
            }
            Some(run) if run.daemonized => {
                Some((run.pid, run.start_time, run.version.clone(), true))
            }
            Some(run) => {
                info!(release = %name, pid = run.pid, "the main process died while the agent was away; stopping what is left of it");
                None
            }
            None => oldest(&members).and_then(|pid| {
                let stat = process::proc_stat(pid)?;
                let version = process::environ(pid)?
                    .into_iter()
                    .find(|(k, _)| k == "EREL_VERSION")
                    .map(|(_, v)| v)?;
                Some((pid, stat.start_time, version, false))
            }),
        };
        let wanted = desired.should_run && !desired.crash_looping;
        let keep = running.filter(|(_, _, version, _)| wanted && *version == desired.version);
        if keep.is_none() && !members.is_empty() {
            info!(release = %name, members = members.len(), "stopping what runs of a release that must not run in this form");
            self.stop_release(&name, anchor, SWITCH_GRACE).await?;
        }

        let (generation, token) = {
            let mut live = release.live();
            self.take_over(&mut live)
        };
        if !wanted {
            let mut live = release.live();
            live.task = None;
            live.state = if desired.should_run {
                ReleaseState::CrashLooping
            } else {
                ReleaseState::Stopped
            };
            if recorded.is_some() {
                drop(live);
                record::remove_run(&self.root, &name)?;
            }
            return Ok(());
        }
        if let Some((pid, start_time, version, daemonized)) = keep {
            let age = process::age(start_time).unwrap_or_default();
            let started = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
            // The writer of the run, when the record names it (not found otherwise: it
            // is no member of the release, and it ends on its own with its output).
            let writer = recorded
                .as_ref()
                .filter(|r| r.pid == pid && r.start_time == start_time && r.writer_pid != 0)
                .map(|r| (r.writer_pid, r.writer_start_time));
            let run = RunRecord {
                pid,
                pgid: i32::try_from(pid).unwrap_or(0),
                start_time,
                version: version.clone(),
                daemonized,
                writer_pid: writer.map_or(0, |w| w.0),
                writer_start_time: writer.map_or(0, |w| w.1),
            };
            if recorded.as_ref() != Some(&run) {
                if let Err(e) = record::save_run(&self.root, &name, &run) {
                    warn!(release = %name, "cannot write the run record: {e}");
                }
            }
            let shown = if daemonized {
                oldest(&members).unwrap_or(pid)
            } else {
                pid
            };
            {
                let mut live = release.live();
                live.process = Some(Current {
                    pid: shown,
                    anchor: (pid, start_time),
                    version: version.clone(),
                    started,
                    reaped: None,
                    writer,
                });
                live.last_pid = Some(shown);
                live.state = ReleaseState::Running;
            }
            info!(release = %name, version = %version, pid = shown, daemonized, "adopted a running release");
            let step = Step::Wait {
                pid,
                start_time,
                started,
                writer,
                waiter: if daemonized {
                    Waiter::Members
                } else {
                    Waiter::Adopted
                },
            };
            self.spawn_task(&release, generation, token, step);
            return Ok(());
        }
        let step = match self.launch(&release, &desired) {
            Ok(step) => {
                info!(release = %name, version = %desired.version, pid = step_pid(&step), "started at agent start");
                step
            }
            Err(error) => {
                warn!(release = %name, version = %desired.version, "start at agent start failed: {error}");
                let exit = Exit {
                    code: None,
                    signal: None,
                };
                match self.record_end(&release, generation, Duration::ZERO, exit) {
                    Some(delay) => Step::Backoff(delay),
                    None => return Ok(()),
                }
            }
        };
        self.spawn_task(&release, generation, token, step);
        Ok(())
    }

    /// With cgroups, processes carrying the release's markers outside its cgroup (left by
    /// an agent that ran without cgroups, or under another cgroup parent) are not the
    /// release: they are stopped, so that they never run beside it.
    async fn stop_strays(&self, name: &str, members: &[u32]) {
        if !matches!(self.containment, Containment::Cgroup(_)) {
            return;
        }
        let strays: Vec<process::Marked> = process::marked(self.root.path(), name)
            .into_iter()
            .filter(|m| !members.contains(&m.pid))
            .collect();
        if strays.is_empty() {
            return;
        }
        warn!(release = %name, pids = ?strays.iter().map(|m| m.pid).collect::<Vec<_>>(), "stopping processes of the release outside its cgroup");
        let alive = || {
            strays
                .iter()
                .filter(|m| process::is_alive(m.pid, m.start_time))
                .map(|m| m.pid)
                .collect::<Vec<_>>()
        };
        let kill_all = || {
            process::signal_each(&alive(), nix::sys::signal::Signal::SIGKILL);
            Ok(())
        };
        let what = format!("processes of release {name} outside its cgroup");
        if let Err(e) = process::stop_members(&what, alive, kill_all, SWITCH_GRACE).await {
            warn!(release = %name, "{e}");
        }
    }

    fn statuses(&self) -> Vec<ReleaseStatus> {
        let mut names: BTreeSet<String> = self.root.release_names().into_iter().collect();
        // A name only tried with a refused Start is not a release.
        names.extend(self.registered().into_iter().filter_map(|r| {
            let live = r.live();
            (live.desired.is_some() || live.process.is_some()).then(|| r.name.clone())
        }));
        names.into_iter().map(|name| self.status(&name)).collect()
    }

    fn status(&self, name: &str) -> ReleaseStatus {
        let versions = self.root.versions(name);
        let mut status = ReleaseStatus {
            name: name.to_string(),
            versions,
            version: None,
            desired_running: false,
            pid: None,
            state: ReleaseState::Stopped,
            restarts: 0,
            up_secs: None,
            output_tail: String::new(),
        };
        let Some(release) = self.find(name) else {
            return status;
        };
        {
            let live = release.live();
            status.version = live
                .process
                .as_ref()
                .map(|p| p.version.clone())
                .or_else(|| live.desired.as_ref().map(|d| d.version.clone()));
            status.desired_running = live.desired.as_ref().is_some_and(|d| d.should_run);
            status.state = live.state.clone();
            status.restarts = live.restarts;
            if let Some(current) = &live.process {
                status.pid = Some(current.pid);
                status.up_secs = Some(current.started.elapsed().as_secs());
            }
        }
        let log_path = log::log_path(&self.root, name);
        if matches!(
            status.state,
            ReleaseState::Exited { .. } | ReleaseState::CrashLooping
        ) {
            status.output_tail = log::output_tail(&log_path);
        }
        status
    }
}

/// The pid to answer when `version` of the release already runs or waits for a restart.
fn already_running(live: &Live, version: &str) -> Option<u32> {
    let desired = live.desired.as_ref()?;
    if !desired.should_run || desired.crash_looping || desired.version != version {
        return None;
    }
    if let Some(current) = live.process.as_ref().filter(|p| p.version == version) {
        return Some(current.pid);
    }
    if matches!(live.state, ReleaseState::Exited { .. }) && live.task.is_some() {
        return Some(live.last_pid.unwrap_or(0));
    }
    None
}

/// Waits (up to [`OUTPUT_DRAIN`]) for the output writer of a run to write the last output
/// and end, once nothing of the release holds its output. A writer still running then
/// (something outside the release still holds the output, or a disk too slow) is left to
/// end on its own, and said so.
async fn wait_writer(name: &str, writer: Option<(u32, u64)>) {
    let Some((pid, start_time)) = writer else {
        return;
    };
    let running = || {
        if process::is_alive(pid, start_time) {
            vec![pid]
        } else {
            Vec::new()
        }
    };
    if !process::wait_empty(&running, OUTPUT_DRAIN).await {
        warn!(release = %name, writer = pid, "the output writer has not ended {}s after the release; it ends once whatever still holds the release's output closes it", OUTPUT_DRAIN.as_secs());
    }
}

/// The oldest of `pids` (earliest start time, then lowest pid): the one reported for a
/// release whose main process is gone.
fn oldest(pids: &[u32]) -> Option<u32> {
    pids.iter()
        .filter_map(|&pid| Some((process::proc_stat(pid)?.start_time, pid)))
        .min()
        .map(|(_, pid)| pid)
}

fn step_pid(step: &Step) -> u32 {
    match step {
        Step::Wait { pid, .. } => *pid,
        Step::Backoff(_) => 0,
    }
}

/// The delay before the restart that follows `short_runs` short runs in a row.
fn backoff(settings: &Supervision, short_runs: u32) -> Duration {
    let doublings = short_runs.saturating_sub(1).min(20);
    settings
        .restart_backoff
        .saturating_mul(1u32 << doublings)
        .min(settings.restart_backoff_max)
}
