//! Adoption: at agent start, what the previous agent left running is adopted when it is
//! what should run, and stopped otherwise (a release that should run and does not is
//! started); while running, the members a daemonizing start command left behind become
//! the release.

use std::sync::Arc;
use std::time::{Duration, Instant};

use erel_proto::ReleaseState;
use tracing::{info, warn};

use crate::error::Result;

use super::cgroup::Containment;
use super::process;
use super::record::{self, Desired, RunRecord};
use super::{log_failure, Exit, Inner, Release, Run, Step, Waiter};
use super::{DAEMONIZE_WINDOW, SWITCH_GRACE};

impl Inner {
    /// Reads every desired-state file and recovers each release (see [`Inner::recover`]).
    pub(super) async fn recover_all(self: &Arc<Self>) -> Result<()> {
        let (all, damaged) = record::load_all_desired(&self.root)?;
        for error in damaged {
            warn!("ignoring a damaged desired-state file: {error}");
        }
        for desired in all {
            let name = desired.name.clone();
            if let Err(error) = self.recover(desired).await {
                warn!(release = %name, "recovery failed: {error}");
            }
        }
        Ok(())
    }

    /// Brings one release recorded on disk back under supervision at agent start.
    pub(super) async fn recover(self: &Arc<Self>, desired: Desired) -> Result<()> {
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

        let wanted = desired.should_run && !desired.crash_looping;
        let keep = what_runs(&name, recorded.as_ref(), &members)
            .filter(|run| wanted && run.version == desired.version);
        if keep.is_none() && !members.is_empty() {
            info!(release = %name, members = members.len(), "stopping what runs of a release that must not run in this form");
            self.stop_release(&name, anchor, SWITCH_GRACE).await?;
        }

        let (generation, token) = self.take_over(&mut release.live());
        if !wanted {
            {
                let mut live = release.live();
                live.task = None;
                live.state = match desired.should_run {
                    true => ReleaseState::CrashLooping,
                    false => ReleaseState::Stopped,
                };
            }
            if recorded.is_some() {
                record::remove_run(&self.root, &name)?;
            }
            return Ok(());
        }
        if let Some(run) = keep {
            if recorded.as_ref() != Some(&run) {
                let saved = record::save_run(&self.root, &name, &run);
                log_failure(&name, "cannot write the run record", saved);
            }
            let step = self.adopt(&release, run, &members);
            self.spawn_task(&release, generation, token, step);
        } else if let Some(step) =
            self.relaunch(&release, generation, &desired, "start at agent start")
        {
            if let Step::Wait(..) = step {
                info!(release = %name, version = %desired.version, pid = step.pid(), "started at agent start");
            }
            self.spawn_task(&release, generation, token, step);
        }
        Ok(())
    }

    /// Makes `run` the release's current process, and says how to wait for its end.
    fn adopt(&self, release: &Release, record: RunRecord, members: &[u32]) -> Step {
        let age = process::age(record.start_time).unwrap_or_default();
        let run = Run {
            anchor: record.anchor(),
            started: Instant::now().checked_sub(age).unwrap_or_else(Instant::now),
            writer: record.writer(),
        };
        let (shown, waiter) = match record.daemonized {
            true => (oldest(members).unwrap_or(record.pid), Waiter::Members),
            false => (record.pid, Waiter::Adopted),
        };
        let (name, version, daemonized) = (&release.name, &record.version, record.daemonized);
        info!(release = %name, version = %version, pid = shown, daemonized, "adopted a running release");
        release.live().run(shown, version, run, None);
        Step::Wait(run, waiter)
    }

    /// The main process of a release ended after running `ran` and `left` members
    /// remain: with status 0 within [`DAEMONIZE_WINDOW`] the start command daemonized,
    /// and the members become the release (recorded, so that an agent restart adopts
    /// them). True when it did.
    pub(super) fn daemonized(
        &self,
        release: &Release,
        generation: u64,
        exit: Exit,
        ran: Duration,
        left: &[u32],
    ) -> bool {
        if exit.code != Some(0) || ran > DAEMONIZE_WINDOW {
            return false;
        }
        let Some(shown) = oldest(left) else {
            return false;
        };
        let run = {
            let live = release.live();
            let current = live
                .process
                .as_ref()
                .filter(|_| live.generation == generation);
            let Some(current) = current else {
                return false;
            };
            RunRecord::new(
                current.run.anchor,
                &current.version,
                true,
                current.run.writer,
            )
        };
        // Recorded before it shows: whoever sees the new pid may restart the agent.
        let saved = record::save_run(&self.root, &release.name, &run);
        log_failure(
            &release.name,
            "cannot record that the release daemonized",
            saved,
        );
        {
            let mut live = release.live();
            if live.generation != generation {
                return false;
            }
            let Some(current) = live.process.as_mut() else {
                return false;
            };
            current.pid = shown;
            live.last_pid = Some(shown);
        }
        info!(release = %release.name, pid = shown, members = left.len(), "the start command returned 0 and left processes: supervising them as the release");
        true
    }

    /// For a daemonized release: true while members are left; the pid shown moves to the
    /// oldest of them when the one shown is gone.
    pub(super) fn follow_members(&self, release: &Release, anchor: (u32, u64)) -> bool {
        let left = self.members(&release.name, Some(anchor));
        let Some(shown) = oldest(&left) else {
            return false;
        };
        let mut live = release.live();
        if let Some(current) = live.process.as_mut().filter(|c| c.run.anchor == anchor) {
            if !left.contains(&current.pid) {
                current.pid = shown;
                live.last_pid = Some(shown);
            }
        }
        true
    }

    /// With cgroups, processes carrying the release's markers outside its cgroup (left by
    /// an agent that ran without cgroups, or under another cgroup parent) are not the
    /// release: they are stopped, so that they never run beside it.
    async fn stop_strays(&self, name: &str, members: &[u32]) {
        if !matches!(self.containment, Containment::Cgroup(_)) {
            return;
        }
        let mut strays = process::marked(self.root.path(), name);
        strays.retain(|(pid, _)| !members.contains(pid));
        if strays.is_empty() {
            return;
        }
        let alive = || {
            let alive = strays
                .iter()
                .filter(|&&(pid, start)| process::is_alive(pid, start));
            alive.map(|&(pid, _)| pid).collect::<Vec<_>>()
        };
        warn!(release = %name, pids = %super::comma_separated(strays.iter().map(|s| s.0)), "stopping processes of the release outside its cgroup");
        let what = format!("processes of release {name} outside its cgroup");
        let listing = process::Listing::Exact;
        let stopped =
            process::stop_members(&what, alive, listing, process::kill_each, SWITCH_GRACE);
        log_failure(name, "cannot stop them", stopped.await);
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

/// What runs of release `name`, as the run record to keep, when anything of it runs
/// (`members`): the recorded main process while it lives; the members of a release whose
/// start command daemonized; without a record (an agent killed between spawn and
/// record), the oldest member. The writer is the recorded one, when the record names it
/// (not found otherwise: it is no member of the release, and it ends on its own with its
/// output).
fn what_runs(name: &str, recorded: Option<&RunRecord>, members: &[u32]) -> Option<RunRecord> {
    match recorded {
        _ if members.is_empty() => None,
        Some(run) if process::is_alive(run.pid, run.start_time) && members.contains(&run.pid) => {
            let (anchor, writer) = (run.anchor(), run.writer());
            Some(RunRecord::new(anchor, &run.version, false, writer))
        }
        Some(run) if run.daemonized => Some(run.clone()),
        Some(run) => {
            info!(release = %name, pid = run.pid, "the main process died while the agent was away; stopping what is left of it");
            None
        }
        None => oldest(members).and_then(|pid| {
            let stat = process::proc_stat(pid)?;
            let env = process::environ(pid)?;
            let version = env.into_iter().find(|(k, _)| k == "EREL_VERSION")?.1;
            Some(RunRecord::new(
                (pid, stat.start_time),
                &version,
                false,
                None,
            ))
        }),
    }
}
