//! Recovery at agent start: what the previous agent left running is adopted when it is
//! what should run, and stopped otherwise; a release that should run and does not is
//! started.

use std::sync::Arc;
use std::time::{Duration, Instant};

use erel_proto::ReleaseState;
use tracing::{info, warn};

use crate::error::Result;

use super::cgroup::Containment;
use super::process;
use super::record::{self, Desired, RunRecord};
use super::{oldest, step_pid, Current, Exit, Inner, Step, Waiter, SWITCH_GRACE};

impl Inner {
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
}

