//! Keeping a cluster converged: roll out the current plan, again every `interval` so
//! drift is repaired (an agent reinstalled blank, a release stopped by hand), and at
//! once when a newer plan arrives. [`keep_converged`] is the one loop of both daemons:
//! it takes plans from a watch channel, so any source can feed it; [`converge_file`]
//! feeds it from a cluster file whose revision it watches, the AMQP daemon from the
//! config log.
//!
//! A group whose rollout failed after a switch is halted at that revision
//! ([`super::halt`]): it is not rolled out again, drift repair included, until a newer
//! revision arrives or an operator asks for a retry. The file daemon holds its cluster
//! file ([`super::hold`]) and skips a pass while `erel deploy` rolls out.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::halt::{self, Halts};
use super::hold;
use super::{run, RolloutEvent, RolloutOptions, RolloutReport};
use crate::client::Connector;
use crate::cluster::Plan;
use crate::digest_cache::FileStamp;
use crate::error::Result;

/// How the daemon paces itself.
#[derive(Debug, Clone)]
pub(crate) struct ConvergeOptions {
    /// Time between two convergence passes when nothing changes.
    pub interval: Duration,
    /// How often the cluster file's stamp (size, times, inode) is looked at.
    pub file_poll: Duration,
    /// Told the revision of each pass (`erel master --metrics`).
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
    /// This master's name, as its lock beside the cluster file shows it.
    pub master: String,
}

impl Default for ConvergeOptions {
    fn default() -> Self {
        ConvergeOptions {
            interval: Duration::from_secs(10),
            file_poll: Duration::from_secs(1),
            metrics: None,
            master: "erel".to_string(),
        }
    }
}

/// The daemons' one loop: runs `pass` on the newest plan from `plans` until `stop`
/// resolves: at once, then every `interval` (drift), and at once again whenever a new
/// plan arrives. No plan yet: it waits for one. A pass in progress when `stop` resolves
/// is abandoned; every agent command is idempotent, so the next run completes it.
pub(crate) async fn keep_converged<F, Fut>(
    mut plans: watch::Receiver<Option<Arc<Plan>>>,
    interval: Duration,
    stop: impl Future<Output = ()>,
    mut pass: F,
) where
    F: FnMut(Arc<Plan>) -> Fut,
    Fut: Future<Output = ()>,
{
    tokio::pin!(stop);
    loop {
        let plan = plans.borrow_and_update().clone();
        if let Some(plan) = plan {
            tokio::select! {
                _ = &mut stop => return,
                _ = pass(plan) => {}
            }
        }
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(interval) => {}
            changed = plans.changed() => if changed.is_err() { return },
        }
    }
}

/// One convergence pass of a daemon: rolls `plan` out (the groups `options` names),
/// handing events to `on_event`, and logs a pass that did not converge. The report,
/// converged or not; `None` when the rollout could not run at all.
pub(crate) async fn converge_pass(
    plan: &Plan,
    connector: &Connector,
    options: &RolloutOptions,
    retry_in: Duration,
    on_event: impl FnMut(&RolloutEvent),
) -> Option<RolloutReport> {
    match run(plan, connector, options, on_event).await {
        Ok(report) if report.converged() => Some(report),
        Ok(report) => {
            warn!(
                groups = %report.unconverged_groups().join(","),
                revision = plan.revision,
                failed = report.failed(),
                "not converged; looking again in {}s",
                retry_in.as_secs()
            );
            Some(report)
        }
        Err(e) => {
            let groups: Vec<&str> = if options.groups.is_empty() {
                plan.groups.keys().map(String::as_str).collect()
            } else {
                options.groups.iter().map(String::as_str).collect()
            };
            warn!(groups = %groups.join(","), revision = plan.revision, "cannot roll out: {e}");
            None
        }
    }
}

/// The daemon on a cluster file: takes the file's daemon lock (a second daemon on the
/// same file is refused, naming the first), loads the file (an invalid file at start is
/// an error) and the halted groups kept beside it, converges, and reloads the file
/// whenever its revision grows. A newer revision that does not validate is logged and
/// the current plan kept. Events go to `on_event`; halts are logged as errors.
pub(crate) async fn converge_file(
    path: PathBuf,
    connector: Connector,
    options: ConvergeOptions,
    on_event: impl Fn(&RolloutEvent) + Send + Sync + 'static,
    cancel: CancellationToken,
) -> Result<()> {
    let _daemon_lock = hold::daemon_lock(&path, &options.master)?;
    let halts = Arc::new(Mutex::new(halt::load(&path)?));
    // Stamped before it is read, so a change made while it is read is seen later.
    let mut stamp = FileStamp::take(&path).ok();
    let plan = Plan::load(&path)?;
    info!(file = %path.display(), revision = plan.revision, "cluster file loaded");
    let mut revision = plan.revision;
    let (tx, rx) = watch::channel(Some(Arc::new(plan)));
    let interval = options.interval;
    let stop = cancel.clone().cancelled_owned();
    let on_event = Arc::new(on_event);
    let metrics = options.metrics.clone();
    let file = FilePass {
        path: path.clone(),
        master: options.master.clone(),
        connector,
        interval,
        halts,
        metrics: metrics.clone(),
    };
    let converging = tokio::spawn(keep_converged(rx, interval, stop, move |plan| {
        let (file, on_event) = (file.clone(), on_event.clone());
        if let Some(metrics) = &metrics {
            metrics.set_revision(plan.revision);
        }
        async move { file.pass(&plan, |e| on_event(e)).await }
    }));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(options.file_poll) => {}
        }
        if let Some(plan) = poll_plan(&path, &mut stamp, revision) {
            revision = plan.revision;
            info!(file = %path.display(), revision, "newer revision loaded; converging");
            let _ = tx.send(Some(Arc::new(plan)));
        }
    }
    let _ = converging.await;
    info!("daemon stopped");
    Ok(())
}

/// What one pass of the file daemon needs.
#[derive(Clone)]
struct FilePass {
    path: PathBuf,
    master: String,
    connector: Connector,
    interval: Duration,
    halts: Arc<Mutex<Halts>>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl FilePass {
    /// One pass: skipped while a deploy holds the rollout lock; halted groups left
    /// alone; a group that fails after a switch halted and the halt written beside the
    /// cluster file.
    async fn pass(&self, plan: &Plan, mut on_event: impl FnMut(&RolloutEvent)) {
        let (path, master) = (self.path.clone(), self.master.clone());
        let _lock =
            match tokio::task::spawn_blocking(move || hold::try_rollout_lock(&path, &master)).await
            {
                Ok(Ok(Ok(lock))) => lock,
                Ok(Ok(Err(busy))) => {
                    info!("a rollout by {busy} is in progress; this pass is skipped");
                    return;
                }
                Ok(Err(e)) => {
                    warn!("this pass is skipped: {e}");
                    return;
                }
                Err(e) => {
                    warn!("this pass is skipped: {e}");
                    return;
                }
            };
        let mut halts = self.halts.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let before = halts.clone();
        for ended in halts.end_older_than(plan.revision) {
            info!(
                group = %ended.group,
                revision = plan.revision,
                "revision {} is newer than the halted revision {}; the group is rolled out again",
                plan.revision,
                ended.revision
            );
        }
        let mut groups = Vec::new();
        for group in plan.groups.keys() {
            match halts.blocking(group, plan.revision) {
                Some(halted) => debug!(group, "not rolled out: {halted}"),
                None => groups.push(group.clone()),
            }
        }
        if !groups.is_empty() {
            let options = RolloutOptions {
                // Every group (the default) unless some are halted.
                groups: if groups.len() == plan.groups.len() {
                    Vec::new()
                } else {
                    groups
                },
                ..RolloutOptions::default()
            };
            let starts = crate::started::Recorder::new(&self.path, |e| {
                warn!("a start is not recorded, status will say argv/env unknown: {e}");
            });
            let on_event = |event: &RolloutEvent| {
                starts.done(plan, event);
                on_event(event)
            };
            let report =
                converge_pass(plan, &self.connector, &options, self.interval, on_event).await;
            let _ = tokio::task::spawn_blocking(move || starts.finish()).await;
            if let Some(report) = report {
                let found = halt::halts_of(&report, crate::amqp::now_ms());
                for (group, reason) in halt::waiting_of(&report, &found) {
                    warn!(
                        group,
                        "group waiting: {reason}; not halted, the next pass tries again"
                    );
                }
                for halted in found {
                    error!(
                        group = %halted.group,
                        revision = halted.revision,
                        "{halted}; not tried again until the cluster file has a newer revision"
                    );
                    halts.insert(halted);
                }
                if report.converged() && report.switched() > 0 {
                    info!(
                        revision = plan.revision,
                        switched = report.switched(),
                        "converged"
                    );
                }
            }
        }
        if halts != before {
            let (path, kept) = (self.path.clone(), halts.clone());
            match tokio::task::spawn_blocking(move || halt::store(&path, &kept)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => error!("the halted groups are kept in memory only: {e}"),
                Err(e) => error!("the halted groups are kept in memory only: {e}"),
            }
            *self.halts.lock().unwrap_or_else(|e| e.into_inner()) = halts.clone();
        }
        if let Some(metrics) = &self.metrics {
            for group in plan.groups.keys() {
                metrics.set_halted(group, halts.blocking(group, plan.revision).is_some());
            }
        }
    }
}

/// One look at the cluster file: a newer revision, read whole. `stamp` is the state the
/// file was last read in.
///
/// A file changed within [`crate::digest_cache::RACY_WINDOW`] may still be being
/// written (a generator writing it in chunks, `cat >` after its truncation): a prefix
/// of a cluster file can be a valid one that lacks hosts or groups, and applying it
/// would stop their releases. Such a file is read once it has been quiet that long,
/// and what was read counts only when the file did not change meanwhile.
fn poll_plan(path: &Path, stamp: &mut Option<FileStamp>, current: u64) -> Option<Plan> {
    let now = FileStamp::take(path).ok();
    if !may_have_changed(stamp.as_ref(), now.as_ref()) {
        return None;
    }
    if now.as_ref().is_some_and(|now| !now.is_settled()) {
        // Looked at again at the next poll, until it settles.
        return None;
    }
    let plan = newer_plan(path, current);
    let after = FileStamp::take(path).ok();
    match (&now, &after) {
        (Some(now), Some(after)) if now.same_state(after) => {}
        // Changed while it was read: read again once it settles.
        _ => return None,
    }
    *stamp = now;
    plan
}

fn newer_plan(path: &Path, current: u64) -> Option<Plan> {
    match Plan::read_revision(path) {
        Ok(revision) if revision > current => match Plan::load(path) {
            Ok(plan) => Some(plan),
            Err(e) => {
                warn!("revision {revision} is not valid, keeping revision {current}: {e}");
                None
            }
        },
        Ok(revision) => {
            if revision < current {
                warn!(
                    "{}: revision {revision} is older than {current}; ignored",
                    path.display()
                );
            }
            None
        }
        Err(e) => {
            warn!("keeping revision {current}: {e}");
            None
        }
    }
}

/// Whether the cluster file must be read again: its stamp (size, times with the
/// ctime, inode) moved, it appeared or vanished, or the previous stamp was taken so
/// soon after a change that a second change could have left it as it was.
fn may_have_changed(previous: Option<&FileStamp>, now: Option<&FileStamp>) -> bool {
    match (previous, now) {
        (Some(previous), Some(now)) => !previous.same_state(now) || !previous.is_settled(),
        (None, None) => false,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use std::fs::{FileTimes, OpenOptions};
    use std::os::unix::fs::FileExt;

    use super::*;

    #[test]
    fn a_cluster_file_still_being_written_is_read_once_it_is_quiet() {
        let (dir, path) = crate::rollout::halt::temp_cluster();
        std::fs::write(&path, "revision = 1\n").expect("write");
        let mut stamp = FileStamp::take(&path).ok();
        // The first part of revision 2 by a writer that has not finished: on its own
        // a valid cluster file, with no hosts.
        std::fs::write(&path, "revision = 2\n").expect("write");
        assert!(
            poll_plan(&path, &mut stamp, 1).is_none(),
            "a file changed a moment ago is not read yet"
        );
        std::fs::write(dir.path().join("beat.tar.gz"), b"archive").expect("write");
        let mut file = OpenOptions::new().append(true).open(&path).expect("open");
        std::io::Write::write_all(
            &mut file,
            b"[[host]]\nid = \"web-1\"\naddr = \"127.0.0.1:7070\"\ngroup = \"web\"\n\n\
              [group.web]\nrelease = \"beat\"\nversion = \"1\"\narchive = \"beat.tar.gz\"\n",
        )
        .expect("append");
        drop(file);
        let deadline = std::time::Instant::now() + crate::digest_cache::RACY_WINDOW * 4;
        let plan = loop {
            if let Some(plan) = poll_plan(&path, &mut stamp, 1) {
                break plan;
            }
            assert!(std::time::Instant::now() < deadline, "never read");
            std::thread::sleep(Duration::from_millis(200));
        };
        assert_eq!(plan.revision, 2);
        assert_eq!(plan.hosts.len(), 1, "the whole file, not its first part");
        assert!(poll_plan(&path, &mut stamp, 2).is_none(), "read once");
    }

    #[test]
    fn a_cluster_file_rewritten_with_its_size_and_mtime_kept_is_read_again() {
        let (_dir, path) = crate::rollout::halt::temp_cluster();
        std::fs::write(&path, "revision = 1\n").expect("write");
        let fresh = FileStamp::take(&path).ok();
        assert!(
            may_have_changed(fresh.as_ref(), FileStamp::take(&path).ok().as_ref()),
            "just written: read again until it has been quiet a while"
        );
        let deadline = std::time::Instant::now() + crate::digest_cache::RACY_WINDOW * 4;
        let settled = loop {
            let stamp = FileStamp::take(&path).expect("stamp");
            if stamp.is_settled() {
                break stamp;
            }
            assert!(std::time::Instant::now() < deadline, "never settled");
            std::thread::sleep(Duration::from_millis(200));
        };
        let again = FileStamp::take(&path).ok();
        assert!(!may_have_changed(Some(&settled), again.as_ref()));

        // `revision = 2`, same size, mtime set back (an editor or `cp -p`).
        let mtime = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .expect("mtime");
        let file = OpenOptions::new().write(true).open(&path).expect("open");
        file.write_all_at(b"2", 11).expect("write");
        file.set_times(FileTimes::new().set_modified(mtime))
            .expect("mtime");
        drop(file);
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            "revision = 2\n"
        );
        let after = FileStamp::take(&path).ok();
        assert!(may_have_changed(Some(&settled), after.as_ref()));

        std::fs::remove_file(&path).expect("remove");
        assert!(may_have_changed(after.as_ref(), None));
        assert!(!may_have_changed(None, None));
    }
}
