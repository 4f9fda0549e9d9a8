//! What the supervisor persists under `.erel/releases/`, one pair of files per release:
//!
//! - `<name>.json`: the desired state ([`Desired`]), written atomically *before* a
//!   process is spawned or signalled, so that an agent restart knows what should run;
//! - `<name>.run`: the run record ([`RunRecord`]) of the process last spawned, written
//!   right after the spawn, so that an agent restart can adopt it instead of starting a
//!   second copy. It describes a process of this boot, which a crash of the machine
//!   ends, so it is replaced atomically but not synced to the disk (a start spends no
//!   fsync on it); one found damaged is ignored, and an agent restart finds the release's
//!   processes by their cgroup or environment without it.
//!
//! The two suffixes differ, so no release name can make one file collide with another.

use std::fs;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::fs::{check_name, remove_if_present, write_atomic, write_replacing, Root, State};

/// Suffix of a desired-state file.
const DESIRED_SUFFIX: &str = ".json";
/// Suffix of a run-record file.
const RUN_SUFFIX: &str = ".run";
/// Permission bits of both files: they may hold secrets passed in the environment.
const RECORD_MODE: u32 = 0o600;

/// What the master asked for a release, as last recorded.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Desired {
    /// Release name.
    pub(crate) name: String,
    /// Version to run.
    pub(crate) version: String,
    /// Program (relative to the version directory) and arguments; never empty here.
    pub(crate) argv: Vec<String>,
    /// Extra environment from the `Start` request.
    pub(crate) env: Vec<(String, String)>,
    /// User to run as, when one was named.
    pub(crate) user: Option<String>,
    /// Whether the release should run.
    pub(crate) should_run: bool,
    /// Set when the release crash-looped: it stays stopped, even across an agent restart,
    /// until the next `Start`. `should_run` stays true so the intent is not lost.
    #[serde(default)]
    pub(crate) crash_looping: bool,
}

/// Environment values may be secrets: `Debug` shows their names only.
impl std::fmt::Debug for Desired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let env_names: Vec<&str> = self.env.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("Desired")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("argv", &self.argv)
            .field("env_names", &env_names)
            .field("user", &self.user)
            .field("should_run", &self.should_run)
            .field("crash_looping", &self.crash_looping)
            .finish()
    }
}

/// The process last spawned for a release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RunRecord {
    /// Process id of the group leader.
    pub(crate) pid: u32,
    /// Its process group (equal to `pid`: the leader made its own group).
    pub(crate) pgid: i32,
    /// Its start time in clock ticks after boot (`/proc/<pid>/stat` field 22), so that a
    /// recycled pid is not mistaken for it.
    pub(crate) start_time: u64,
    /// The version it runs.
    pub(crate) version: String,
    /// The start command returned with status 0 and left processes behind (a daemon):
    /// the release is what is left, supervised until nothing of it is left.
    #[serde(default)]
    pub(crate) daemonized: bool,
    /// The output writer of the run (pid and start time; 0 for none known), which is not
    /// part of the release: an agent that adopts the release waits for it, bounded, after
    /// the release ended, so the tail holds the last output.
    #[serde(default)]
    pub(crate) writer_pid: u32,
    /// The writer's start time in clock ticks after boot.
    #[serde(default)]
    pub(crate) writer_start_time: u64,
}

impl RunRecord {
    /// The record of a run whose main process is `anchor` (pid, start time).
    pub(crate) fn new(
        anchor: (u32, u64),
        version: &str,
        daemonized: bool,
        writer: Option<(u32, u64)>,
    ) -> RunRecord {
        let (writer_pid, writer_start_time) = writer.unwrap_or((0, 0));
        RunRecord {
            pid: anchor.0,
            pgid: i32::try_from(anchor.0).unwrap_or(0),
            start_time: anchor.1,
            version: version.to_string(),
            daemonized,
            writer_pid,
            writer_start_time,
        }
    }

    /// The main process: (pid, start time).
    pub(crate) fn anchor(&self) -> (u32, u64) {
        (self.pid, self.start_time)
    }

    /// The output writer (pid, start time), when one is known.
    pub(crate) fn writer(&self) -> Option<(u32, u64)> {
        (self.writer_pid != 0).then_some((self.writer_pid, self.writer_start_time))
    }
}

/// The record of release `name` with `suffix`: one of the two suffixes above.
fn path(root: &Root, name: &str, suffix: &str) -> PathBuf {
    root.state(State::Releases).join(format!("{name}{suffix}"))
}

fn encode<T: Serialize>(path: &std::path::Path, value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(value)
        .map_err(|e| Error::Internal(format!("encode {}: {e}", path.display())))
}

fn load<T: for<'de> Deserialize<'de>>(path: &std::path::Path) -> Result<Option<T>> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).io("decode", path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("read", path, e)),
    }
}

/// Records the desired state of `desired.name`, atomically.
pub(crate) fn save_desired(root: &Root, desired: &Desired) -> Result<()> {
    let path = path(root, &desired.name, DESIRED_SUFFIX);
    write_atomic(&path, &encode(&path, desired)?, RECORD_MODE)
}

/// Records the process just spawned for `name`, atomically but not durably (see the
/// module's documentation).
pub(crate) fn save_run(root: &Root, name: &str, run: &RunRecord) -> Result<()> {
    let path = path(root, name, RUN_SUFFIX);
    write_replacing(&path, &encode(&path, run)?, RECORD_MODE)
}

/// The run record of `name`, if any.
pub(crate) fn load_run(root: &Root, name: &str) -> Result<Option<RunRecord>> {
    load(&path(root, name, RUN_SUFFIX))
}

/// Removes the run record of `name`; a missing record is fine.
pub(crate) fn remove_run(root: &Root, name: &str) -> Result<()> {
    remove_if_present(&path(root, name, RUN_SUFFIX))
}

/// Every desired-state file under the root. A file that cannot be read is reported in
/// the second list (path and error) and otherwise skipped, so one damaged file does not
/// stop the agent from supervising the others.
pub(crate) fn load_all_desired(root: &Root) -> Result<(Vec<Desired>, Vec<Error>)> {
    let dir = root.state(State::Releases);
    let entries = fs::read_dir(&dir).io("list", &dir)?;
    let mut found = Vec::new();
    let mut damaged = Vec::new();
    for entry in entries {
        let entry = entry.io("list", &dir)?;
        let file_name = entry.file_name();
        let name = file_name
            .to_str()
            .and_then(|n| n.strip_suffix(DESIRED_SUFFIX));
        // Temporary files of write_atomic start with '.': no release name.
        let Some(name) = name.filter(|name| check_name("release name", name).is_ok()) else {
            continue;
        };
        let path = entry.path();
        match load::<Desired>(&path) {
            Ok(Some(desired)) if desired.name == name => found.push(desired),
            Ok(Some(desired)) => damaged.push(Error::Internal(format!(
                "{} names the release '{}'",
                path.display(),
                desired.name
            ))),
            Ok(None) => {}
            Err(e) => damaged.push(e),
        }
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((found, damaged))
}

#[cfg(test)]
mod tests {
    use super::super::tests::test_root_and_desired;
    use super::*;

    #[test]
    fn desired_and_run_records_round_trip() {
        let (_dir, root, mut desired) = test_root_and_desired("beat", "1.0");
        desired.env = vec![("A".into(), "b".into())];
        save_desired(&root, &desired).expect("save");
        // A release whose name ends like a suffix does not collide.
        let other = Desired {
            name: "beat.run".into(),
            ..desired.clone()
        };
        save_desired(&root, &other).expect("save");
        let run = RunRecord {
            pid: 42,
            pgid: 42,
            start_time: 7,
            version: "1.0".into(),
            daemonized: false,
            writer_pid: 43,
            writer_start_time: 8,
        };
        save_run(&root, "beat", &run).expect("save run");
        let (all, damaged) = load_all_desired(&root).expect("load");
        assert!(damaged.is_empty());
        let shown = format!("{desired:?}");
        assert!(
            shown.contains("\"A\"") && !shown.contains("\"b\""),
            "{shown}"
        );
        assert_eq!(all, vec![desired, other]);
        assert_eq!(load_run(&root, "beat").expect("load run"), Some(run));
        remove_run(&root, "beat").expect("remove");
        remove_run(&root, "beat").expect("remove twice");
        assert_eq!(load_run(&root, "beat").expect("load run"), None);
    }
}
