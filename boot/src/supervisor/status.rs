//! What `Ping` reports of each release: its versions on disk and its live state.

use std::collections::BTreeSet;
use std::fs;

use erel_proto::{ReleaseState, ReleaseStatus};

use crate::root::{check_name, Root};

use super::{log, Inner};

impl Inner {
    /// Each release with the version that runs or should run.
    pub(super) fn running_versions(&self) -> Vec<(String, String)> {
        let releases = self.registered();
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
