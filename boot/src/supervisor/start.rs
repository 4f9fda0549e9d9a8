//! `Start`: run a version of a release, replacing the version that runs, and the
//! launch that every start and restart goes through.

use std::time::Instant;

use erel_proto::rules::default_argv;
use erel_proto::{ReleaseState, Start, Started};
use tokio::sync::watch;
use tracing::info;

use crate::error::{Error, Result};
use crate::fs::check_name;

use super::cgroup::Containment;
use super::record::{self, Desired, RunRecord};
use super::SWITCH_GRACE;
use super::{log_failure, spawn, Inner, Live, Release, Run, Step, Supervisor, Waiter};

impl Supervisor {
    /// Starts a release version (see the protocol's `Start`).
    pub(crate) async fn start(&self, request: &Start) -> Result<Started> {
        let inner = &self.inner;
        if inner.shutdown.is_cancelled() {
            return Err(Error::Busy("the agent is shutting down".into()));
        }
        check_name("release name", &request.name)?;
        check_name("release version", &request.version)?;
        let argv = match request.argv.is_empty() {
            true => default_argv(&request.name),
            false => request.argv.clone(),
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
        let release = inner.release(&request.name);
        let _op = release.op.lock().await;

        if let Some(pid) = already_running(&release.live(), &request.version) {
            return Ok(Started {
                pid,
                already_running: true,
            });
        }
        spawn::preflight(&inner.root, &inner.host_id, &desired)?;
        record::save_desired(&inner.root, &desired)?;
        let (generation, token, old) = {
            let mut live = release.live();
            let (generation, token) = inner.take_over(&mut live);
            live.desired = Some(desired.clone());
            (generation, token, live.process.clone())
        };
        let ended = match old {
            Some(old) => {
                info!(release = %release.name, from = %old.version, to = %desired.version, pid = old.pid, "stopping the running version to start another");
                inner.end_process(&release, &old, SWITCH_GRACE).await
            }
            // No process is known, yet something of the release may still be ending
            // (what a crashed main process left): one copy at a time.
            None => inner.stop_release(&release.name, None, SWITCH_GRACE).await,
        };
        if let Err(error) = ended {
            release.live().task = None;
            return Err(error);
        }
        match inner.launch(&release, &desired) {
            Ok(step) => {
                let pid = step.pid();
                {
                    let mut live = release.live();
                    live.restarts = 0;
                    live.short_runs = 0;
                }
                inner.spawn_task(&release, generation, token, step);
                Ok(Started {
                    pid,
                    already_running: false,
                })
            }
            Err(error) => {
                let mut stopped = desired.clone();
                stopped.should_run = false;
                let saved = record::save_desired(&inner.root, &stopped);
                log_failure(&release.name, "cannot record that it should not run", saved);
                let mut live = release.live();
                live.desired = Some(stopped);
                live.state = ReleaseState::Stopped;
                live.task = None;
                Err(error)
            }
        }
    }
}

impl Inner {
    /// Spawns the desired version and records it as the current process. The caller holds
    /// the operation lock and owns the generation. Refused while anything of the release
    /// still runs: never two copies.
    pub(super) fn launch(&self, release: &Release, desired: &Desired) -> Result<Step> {
        let left = self.members(&desired.name, None);
        if !left.is_empty() {
            let n = left.len();
            let pids = super::comma_separated(&left);
            let why = format!("{n} processes of the release still run (pids {pids}); a second copy is never started");
            return Err(spawn::spawn_failed(desired, why));
        }
        let cgroup = match &self.containment {
            Containment::Cgroup(tree) => Some(tree.prepare(&desired.name)?),
            Containment::Fallback(_) => None,
        };
        let spawned = spawn::spawn(&self.root, &self.host_id, desired, &self.settings, cgroup)?;
        let run = Run {
            anchor: spawned.anchor,
            started: Instant::now(),
            writer: Some(spawned.writer),
        };
        let record = RunRecord::new(run.anchor, &desired.version, false, run.writer);
        let saved = record::save_run(&self.root, &desired.name, &record);
        let what = "cannot write the run record (an agent restart finds the process by its cgroup or environment)";
        log_failure(&desired.name, what, saved);
        let (reaped_tx, reaped_rx) = watch::channel(false);
        release
            .live()
            .run(run.anchor.0, &desired.version, run, Some(reaped_rx));
        let waiter = Waiter::Own(Box::new(spawned.child), reaped_tx);
        Ok(Step::Wait(run, waiter))
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
