//! `Stop`: end everything of a release, SIGTERM first and the kill after a grace, and
//! succeed only when nothing of it is left.

use std::time::Duration;

use erel_proto::{ReleaseState, Stopped};
use tracing::warn;

use crate::error::Result;
use crate::fs::check_name;

use super::cgroup::Containment;
use super::process::{self, Listing};
use super::record;
use super::{log_failure, Current, Inner, Release, Supervisor, OUTPUT_DRAIN, REAP_WAIT};

impl Supervisor {
    /// Stops a release: SIGTERM to every member, SIGKILL (`cgroup.kill`) after `grace`;
    /// succeeds only when nothing of it is left.
    pub(crate) async fn stop(&self, name: &str, grace: Duration) -> Result<Stopped> {
        let inner = &self.inner;
        check_name("release name", name)?;
        let Some(release) = inner.find(name) else {
            return Ok(process::NOTHING_RAN);
        };
        let _op = release.op.lock().await;
        let desired = release.live().desired.clone();
        if let Some(mut desired) = desired.filter(|d| d.should_run || d.crash_looping) {
            desired.should_run = false;
            desired.crash_looping = false;
            record::save_desired(&inner.root, &desired)?;
            release.live().desired = Some(desired);
        }
        let current = {
            let mut live = release.live();
            inner.take_over(&mut live);
            live.task = None;
            live.process.clone()
        };
        let outcome = match &current {
            Some(current) => inner.end_process(&release, current, grace).await?,
            // Between runs: nothing may be left either (a crash's leftovers being
            // stopped by the supervision task, a daemon found by its markers).
            None => inner.stop_release(name, None, grace).await?,
        };
        release.live().state = ReleaseState::Stopped;
        Ok(outcome)
    }
}

impl Inner {
    /// Stops everything of `current` (the caller holds the operation lock and has taken
    /// the release over), waits for the child to be reaped, and forgets it.
    pub(super) async fn end_process(
        &self,
        release: &Release,
        current: &Current,
        grace: Duration,
    ) -> Result<Stopped> {
        let outcome = self
            .stop_release(&release.name, Some(current.run.anchor), grace)
            .await?;
        if let Some(mut reaped) = current.reaped.clone() {
            // Err: the task is gone (detached); the runtime reaps the orphan.
            let _ = tokio::time::timeout(REAP_WAIT, reaped.wait_for(|r| *r)).await;
        }
        // Nothing of the release is left: its writer ends with the last output, and a
        // stopped release leaves no writer behind.
        wait_writer(&release.name, current.run.writer).await;
        let removed = record::remove_run(&self.root, &release.name);
        log_failure(&release.name, "cannot remove the run record", removed);
        let mut live = release.live();
        if live
            .process
            .as_ref()
            .is_some_and(|p| p.run.anchor == current.run.anchor)
        {
            live.process = None;
            live.last_pid = Some(current.pid);
        }
        Ok(outcome)
    }

    /// Stops every member of release `name`: SIGTERM to each, then after `grace` the
    /// cgroup's kill (or SIGKILL to each member); an emptied cgroup is removed.
    pub(super) async fn stop_release(
        &self,
        name: &str,
        anchor: Option<(u32, u64)>,
        grace: Duration,
    ) -> Result<Stopped> {
        let what = format!("release {name}");
        match &self.containment {
            Containment::Cgroup(tree) => {
                let members = || tree.members(name);
                let kill = |_: &[u32]| tree.kill(name);
                let outcome =
                    process::stop_members(&what, members, Listing::Exact, kill, grace).await?;
                tree.remove(name);
                Ok(outcome)
            }
            Containment::Fallback(_) => {
                let members = || process::scan_members(anchor, self.root.path(), name);
                let listing = Listing::Scanned;
                process::stop_members(&what, members, listing, process::kill_each, grace).await
            }
        }
    }
}

/// Waits (up to [`OUTPUT_DRAIN`]) for the output writer of a run to write the last output
/// and end, once nothing of the release holds its output. A writer still running then
/// (something outside the release still holds the output, or a disk too slow) is left to
/// end on its own, and said so.
pub(super) async fn wait_writer(name: &str, writer: Option<(u32, u64)>) {
    let Some((pid, start_time)) = writer else {
        return;
    };
    let running = || Vec::from_iter(Some(pid).filter(|_| process::is_alive(pid, start_time)));
    if !process::wait_empty(&running, Listing::Exact, OUTPUT_DRAIN).await {
        warn!(release = %name, writer = pid, "the output writer has not ended {}s after the release; it ends once whatever still holds the release's output closes it", OUTPUT_DRAIN.as_secs());
    }
}
