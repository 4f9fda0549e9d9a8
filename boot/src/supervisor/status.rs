//! What `Ping` reports of each release: its versions on disk and its live state.

use std::collections::BTreeSet;
use std::fs;

use erel_proto::{ReleaseState, ReleaseStatus};

use crate::root::{check_name, Root};

use super::{log, Inner};

impl Inner {
    /// Each release with the version that runs or should run.
    pub(super) fn running_versions(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for release in self.registered() {
            let live = release.live();
            let desired = live
                .desired
                .as_ref()
                .filter(|d| d.should_run)
                .map(|d| &d.version);
            let running = live
                .process
                .as_ref()
                .map(|p| &p.version)
                .filter(|&v| Some(v) != desired);
            for version in desired.into_iter().chain(running) {
                out.push((release.name.clone(), version.clone()));
            }
        }
        out
    }

    pub(super) fn statuses(&self) -> Vec<ReleaseStatus> {
        let mut names: BTreeSet<String> = list_release_names(&self.root).into_iter().collect();
        // A name only tried with a refused Start is not a release.
        names.extend(self.registered().into_iter().filter_map(|r| {
            let live = r.live();
            (live.desired.is_some() || live.process.is_some()).then(|| r.name.clone())
        }));
        names.into_iter().map(|name| self.status(&name)).collect()
    }

    fn status(&self, name: &str) -> ReleaseStatus {
        let release = self.find(name);
        let guard = release.as_ref().map(|r| r.live());
        let live = guard.as_deref();
        let current = live.and_then(|l| l.process.as_ref());
        let desired = live.and_then(|l| l.desired.as_ref());
        let mut status = ReleaseStatus {
            name: name.to_string(),
            versions: list_versions(&self.root, name),
            version: current
                .map(|p| &p.version)
                .or(desired.map(|d| &d.version))
                .cloned(),
            desired_running: desired.is_some_and(|d| d.should_run),
            pid: current.map(|p| p.pid),
            state: live.map_or(ReleaseState::Stopped, |l| l.state.clone()),
            restarts: live.map_or(0, |l| l.restarts),
            up_secs: current.map(|p| p.started.elapsed().as_secs()),
            output_tail: String::new(),
        };
        drop(guard);
        if matches!(
            status.state,
            ReleaseState::Exited { .. } | ReleaseState::CrashLooping
        ) {
            status.output_tail = log::output_tail(&log::log_path(&self.root, name));
        }
        status
    }
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
