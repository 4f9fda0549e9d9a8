//! Supervision of release processes: start, stop, restart with backoff, crash-loop
//! detection, output logs, and adoption of running releases after an agent restart.
//!
//! - [`record`]: the desired state and run record persisted per release;
//! - [`process`]: `/proc` inspection, process groups, spawning;
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
//! A supervision task per release waits for its process: `wait()` for a child of this
//! agent (which also reaps it), a poll of `/proc` (pid and start time) for a process
//! adopted after an agent restart. When the process ends while the release should run,
//! what is left of its group is stopped, and it is restarted after a backoff that doubles
//! from `restart_backoff` up to `restart_backoff_max`, and resets after a run of at least
//! `stable_after`. After `crash_loop_after` short runs in a row the release is
//! crash-looping: left stopped, with `crash_looping` recorded next to `should_run` (which
//! stays true) so that an agent restart does not hammer it either; the next `Start`
//! clears it.
//!
//! # Agent restarts
//!
//! Releases run in their own process group, with their output piped to an output writer
//! in that same group rather than to the agent (see [`log`]), so they outlive the agent.
//! [`Supervisor::open`] reads every desired-state
//! file; for a release that should run it adopts the recorded process when it is alive
//! with the recorded start time, or else a process-group leader whose environment names
//! this root and release (which covers an agent killed between spawn and run record),
//! and starts it only when neither exists. Any further copy it finds is stopped, as is a
//! copy of another version than the desired one, and anything found running for a
//! release that should not run: an agent restart never leaves two copies running.

mod log;
mod process;

pub use log::{run_output_writer, OUTPUT_WRITER_COMMAND};
mod record;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
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
use crate::root::{check_name, Root};
use crate::settings::Supervision;

use process::{Found, GroupStop};
use record::{Desired, RunRecord};

/// Grace between SIGTERM and SIGKILL when the agent itself stops a copy: the running
/// version when another is started, or a copy found at recovery that must not run.
pub const SWITCH_GRACE: Duration = Duration::from_secs(10);
/// How often an adopted process (not a child of this agent) is checked in `/proc`.
const ADOPTED_POLL: Duration = Duration::from_millis(250);
/// How long the group of a release whose leader ended may take to empty on its own: the
/// output writer drains the release's last output and ends then.
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);
/// Grace for what is left of a group after its leader ended on its own.
const LEFTOVER_GRACE: Duration = Duration::from_secs(5);
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
    pid: u32,
    start_time: u64,
    version: String,
    started: Instant,
    /// Becomes true once the supervision task reaped it; `None` for an adopted process.
    reaped: Option<watch::Receiver<bool>>,
}

impl Current {
    fn pgid(&self) -> i32 {
        i32::try_from(self.pid).unwrap_or(0)
    }
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
}

/// What a supervision task does next.
#[derive(Debug)]
enum Step {
    /// Wait for the process to end.
    Wait {
        pid: u32,
        start_time: u64,
        started: Instant,
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
    pub async fn open(root: Root, host_id: String, settings: Supervision) -> Result<Self> {
        let inner = Arc::new(Inner {
            root,
            host_id,
            settings,
            releases: Mutex::new(BTreeMap::new()),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        let (all, damaged) = record::load_all_desired(&inner.root)?;
        for error in damaged {
            warn!("ignoring a damaged desired-state file: {error}");
        }
        let found = process::find_releases(inner.root.path());
        for desired in all {
            let name = desired.name.clone();
            if let Err(error) = inner.recover(desired, &found).await {
                warn!(release = %name, "recovery failed: {error}");
            }
        }
        Ok(Supervisor { inner })
    }

    /// Starts a release version (see the protocol's `Start`).
    pub async fn start(&self, request: &Start) -> Result<Started> {
        self.inner.start(request).await
    }

    /// Stops a release: SIGTERM to its group, SIGKILL after `grace`.
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
            vec![format!("bin/{}", request.name), "foreground".to_string()]
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
        if let Some(old) = old {
            info!(release = %release.name, from = %old.version, to = %desired.version, pid = old.pid, "stopping the running version to start another");
            if let Err(error) = self.end_process(&release, &old, SWITCH_GRACE).await {
                release.live().task = None;
                return Err(error);
            }
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
            None => GroupStop {
                was_running: false,
                killed: false,
            },
        };
        release.live().state = ReleaseState::Stopped;
        info!(release = %name, was_running = outcome.was_running, killed = outcome.killed, "stopped");
        Ok(Stopped {
            was_running: outcome.was_running,
            killed: outcome.killed,
        })
    }

    /// Stops the process group of `current` (the caller holds the operation lock and has
    /// taken the release over), waits for the child to be reaped, and forgets it.
    async fn end_process(
        &self,
        release: &Release,
        current: &Current,
        grace: Duration,
    ) -> Result<GroupStop> {
        let pgid = current.pgid();
        let recycled = !process::is_alive(current.pid, current.start_time)
            && process::proc_stat(current.pid).is_some_and(|s| {
                !s.is_gone() && s.pgrp == pgid && s.start_time != current.start_time
            });
        let outcome = if recycled || pgid <= 1 {
            GroupStop {
                was_running: false,
                killed: false,
            }
        } else {
            process::stop_group(pgid, grace).await?
        };
        if let Some(mut reaped) = current.reaped.clone() {
            // Err: the task is gone (detached); the runtime reaps the orphan.
            let _ = tokio::time::timeout(REAP_WAIT, reaped.wait_for(|r| *r)).await;
        }
        if let Err(e) = record::remove_run(&self.root, &release.name) {
            warn!(release = %release.name, "cannot remove the run record: {e}");
        }
        let mut live = release.live();
        if live.process.as_ref().is_some_and(|p| p.pid == current.pid) {
            live.process = None;
            live.last_pid = Some(current.pid);
        }
        Ok(outcome)
    }

    /// Spawns the desired version and records it as the current process. The caller holds
    /// the operation lock and owns the generation.
    fn launch(&self, release: &Release, desired: &Desired) -> Result<Step> {
        let spawned = process::spawn(&self.root, &self.host_id, desired, &self.settings)?;
        let run = RunRecord {
            pid: spawned.pid,
            pgid: i32::try_from(spawned.pid).unwrap_or(0),
            start_time: spawned.start_time,
            version: desired.version.clone(),
        };
        if let Err(e) = record::save_run(&self.root, &desired.name, &run) {
            warn!(release = %desired.name, "cannot write the run record (an agent restart finds the process by its environment): {e}");
        }
        let (reaped_tx, reaped_rx) = watch::channel(false);
        let started = Instant::now();
        let mut live = release.live();
        live.process = Some(Current {
            pid: spawned.pid,
            start_time: spawned.start_time,
            version: desired.version.clone(),
            started,
            reaped: Some(reaped_rx),
        });
        live.last_pid = Some(spawned.pid);
        live.state = ReleaseState::Running;
        Ok(Step::Wait {
            pid: spawned.pid,
            start_time: spawned.start_time,
            started,
            waiter: Waiter::Own {
                child: Box::new(spawned.child),
                reaped: reaped_tx,
            },
        })
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
                    waiter,
                } => {
                    let Some(exit) = self
                        .wait_exit(&release, pid, start_time, waiter, &token)
                        .await
                    else {
                        return;
                    };
                    if !release.owned_by(generation) {
                        return;
                    }
                    let pgid = i32::try_from(pid).unwrap_or(0);
                    // The output writer ends once it wrote the last output: wait for it,
                    // so the tail holds the release's last words.
                    if pgid > 1 && !process::wait_group_empty(pgid, OUTPUT_DRAIN).await {
                        warn!(release = %release.name, pid, "the group leader ended; stopping what is left of its group");
                        if let Err(e) = process::stop_group(pgid, LEFTOVER_GRACE).await {
                            warn!(release = %release.name, "{e}");
                        }
                    }
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
    async fn recover(self: &Arc<Self>, desired: Desired, found: &[Found]) -> Result<()> {
        let release = self.release(&desired.name);
        let _op = release.op.lock().await;
        release.live().desired = Some(desired.clone());

        let mut copies: Vec<Found> = found
            .iter()
            .filter(|f| f.release == desired.name)
            .cloned()
            .collect();
        let recorded = record::load_run(&self.root, &desired.name).unwrap_or_else(|e| {
            warn!(release = %desired.name, "ignoring the run record: {e}");
            None
        });
        if let Some(run) = recorded.as_ref() {
            let leader = process::proc_stat(run.pid)
                .is_some_and(|s| i32::try_from(run.pid).is_ok_and(|pid| s.pgrp == pid));
            if leader
                && process::is_alive(run.pid, run.start_time)
                && !copies.iter().any(|c| c.pid == run.pid)
            {
                copies.push(Found {
                    release: desired.name.clone(),
                    version: run.version.clone(),
                    pid: run.pid,
                    start_time: run.start_time,
                });
            }
        }
        // The copy to keep: the recorded one first, of the desired version.
        copies.sort_by_key(|c| recorded.as_ref().is_none_or(|r| r.pid != c.pid));
        let wanted = desired.should_run && !desired.crash_looping;
        let keep = if wanted {
            copies.iter().position(|c| c.version == desired.version)
        } else {
            None
        };
        let keep = keep.map(|i| copies.remove(i));
        for extra in &copies {
            info!(release = %desired.name, version = %extra.version, pid = extra.pid, "stopping a copy that must not run");
            let pgid = i32::try_from(extra.pid).unwrap_or(0);
            if pgid > 1 {
                process::stop_group(pgid, SWITCH_GRACE).await?;
            }
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
                record::remove_run(&self.root, &desired.name)?;
            }
            return Ok(());
        }
        if let Some(copy) = keep {
            let age = process::age(copy.start_time).unwrap_or_default();
            let started = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
            let run = RunRecord {
                pid: copy.pid,
                pgid: i32::try_from(copy.pid).unwrap_or(0),
                start_time: copy.start_time,
                version: copy.version.clone(),
            };
            if recorded.as_ref() != Some(&run) {
                if let Err(e) = record::save_run(&self.root, &desired.name, &run) {
                    warn!(release = %desired.name, "cannot write the run record: {e}");
                }
            }
            {
                let mut live = release.live();
                live.process = Some(Current {
                    pid: copy.pid,
                    start_time: copy.start_time,
                    version: copy.version.clone(),
                    started,
                    reaped: None,
                });
                live.last_pid = Some(copy.pid);
                live.state = ReleaseState::Running;
            }
            info!(release = %desired.name, version = %copy.version, pid = copy.pid, "adopted a running release");
            let step = Step::Wait {
                pid: copy.pid,
                start_time: copy.start_time,
                started,
                waiter: Waiter::Adopted,
            };
            self.spawn_task(&release, generation, token, step);
            return Ok(());
        }
        let step = match self.launch(&release, &desired) {
            Ok(step) => {
                info!(release = %desired.name, version = %desired.version, pid = step_pid(&step), "started at agent start");
                step
            }
            Err(error) => {
                warn!(release = %desired.name, version = %desired.version, "start at agent start failed: {error}");
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

    fn statuses(&self) -> Vec<ReleaseStatus> {
        let mut names: BTreeSet<String> = list_release_names(&self.root).into_iter().collect();
        // A name only tried with a refused Start is not a release.
        names.extend(self.registered().into_iter().filter_map(|r| {
            let live = r.live();
            (live.desired.is_some() || live.process.is_some()).then(|| r.name.clone())
        }));
        names.into_iter().map(|name| self.status(&name)).collect()
    }

    fn status(&self, name: &str) -> ReleaseStatus {
        let versions = list_versions(&self.root, name);
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

/// Release names with a directory under `root/releases/`.
fn list_release_names(root: &Root) -> Vec<String> {
    let dir = root.path().join("releases");
    let Ok(entries) = fs::read_dir(&dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| check_name("release name", name).is_ok())
        .collect()
}

/// Versions unpacked under `root/releases/<name>/`, oldest first by modification time.
fn list_versions(root: &Root, name: &str) -> Vec<String> {
    let Ok(dir) = root.release_dir(name) else {
        return Vec::new();
    };
    let Ok(entries) = fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut versions: Vec<(std::time::SystemTime, String)> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            check_name("release version", &name).ok()?;
            let mtime = e.metadata().and_then(|m| m.modified()).ok()?;
            Some((mtime, name))
        })
        .collect();
    versions.sort();
    versions.into_iter().map(|(_, name)| name).collect()
}
