//! What `Ping` reports of each release: its versions on disk and its live state.

use std::collections::BTreeSet;

use erel_proto::{ReleaseState, ReleaseStatus};

use super::{log, Inner, Supervisor};

impl Supervisor {
    /// Every known release, from live state: those with a desired state and those with a
    /// directory under `releases/`.
    pub(crate) async fn statuses(&self) -> Vec<ReleaseStatus> {
        let inner = &self.inner;
        let mut names: BTreeSet<String> = inner.root.release_names().into_iter().collect();
        // A name only tried with a refused Start is not a release.
        names.extend(inner.registered().into_iter().filter_map(|r| {
            let live = r.live();
            (live.desired.is_some() || live.process.is_some()).then(|| r.name.clone())
        }));
        names.into_iter().map(|name| inner.status(&name)).collect()
    }
}

impl Inner {
    fn status(&self, name: &str) -> ReleaseStatus {
        let release = self.find(name);
        let guard = release.as_ref().map(|r| r.live());
        let live = guard.as_deref();
        let current = live.and_then(|l| l.process.as_ref());
        let desired = live.and_then(|l| l.desired.as_ref());
        let mut status = ReleaseStatus {
            name: name.to_string(),
            versions: self.root.versions(name),
            version: current
                .map(|p| &p.version)
                .or(desired.map(|d| &d.version))
                .cloned(),
            desired_running: desired.is_some_and(|d| d.should_run),
            pid: current.map(|p| p.pid),
            state: live.map_or(ReleaseState::Stopped, |l| l.state.clone()),
            restarts: live.map_or(0, |l| l.restarts),
            up_secs: current.map(|p| p.run.started.elapsed().as_secs()),
            output_tail: String::new(),
        };
        drop(guard);
        // Every state: a running release's recent output (what `erel logs` shows), an
        // ended one's last words.
        status.output_tail = log::output_tail(&log::log_path(&self.root, name));
        status
    }
}
