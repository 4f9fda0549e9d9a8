//! Halted groups: a daemon whose rollout of a revision failed on a host (the new
//! version was started and did not prove healthy, and the host was rolled back, or
//! could not be) leaves that group **halted at that revision**. It does not try the
//! revision again on its next pass, so a broken release costs one canary's downtime,
//! not one per convergence interval. The halt ends when a newer revision arrives, or
//! when an operator asks for a retry (`erel config retry --group G` in AMQP mode;
//! writing a newer revision into the cluster file in file mode).
//!
//! A failure before anything was switched (an agent unreachable, a push that failed)
//! does not halt: trying it again costs no downtime, and it is what repairs a host
//! that was away.
//!
//! In file mode the halts are kept in `.erel-state/halted.json` beside the cluster
//! file, written durably ([`crate::durable`]), so a restarted daemon stays halted and
//! `erel status` can show them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{HostOutcome, HostPhase, RolloutReport};
use crate::durable;
use crate::error::{Error, Result};

/// The directory beside a cluster file where the file-mode daemon keeps its state.
pub const STATE_DIR: &str = ".erel-state";
/// The halted groups of a file-mode daemon, in [`STATE_DIR`].
pub const HALTED_FILE: &str = "halted.json";

/// A group left halted by a failed rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Halt {
    /// The group.
    pub group: String,
    /// The revision whose rollout failed; nothing of it is tried again.
    pub revision: u64,
    /// The release and version that failed.
    pub release: String,
    /// The version that failed.
    pub version: String,
    /// The first host that failed.
    pub host: String,
    /// Why it failed, with whether it was rolled back.
    pub reason: String,
    /// When, in milliseconds since the Unix epoch.
    pub since_ms: u64,
}

impl std::fmt::Display for Halt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "group {} halted at revision {} ({} {}): {}: {}",
            self.group, self.revision, self.release, self.version, self.host, self.reason
        )
    }
}

/// Whether a host that failed in `phase` had its release switched (so that trying
/// again would cost downtime again).
fn switched_in(phase: HostPhase) -> bool {
    !matches!(
        phase,
        HostPhase::Pinging | HostPhase::Staging | HostPhase::Staged
    )
}

/// The halts a rollout report calls for: one per group where a host failed after its
/// release was switched. `now_ms` is the time they carry.
pub fn halts_of(report: &RolloutReport, now_ms: u64) -> Vec<Halt> {
    report
        .groups
        .iter()
        .filter_map(|group| {
            group.hosts.iter().find_map(|host| match &host.outcome {
                HostOutcome::Failed(failure) if switched_in(failure.phase) => Some(Halt {
                    group: group.group.clone(),
                    revision: report.revision,
                    release: group.release.clone(),
                    version: group.version.clone(),
                    host: host.host.clone(),
                    reason: format!("{}, {}", failure.reason, failure.rollback_words()),
                    since_ms: now_ms,
                }),
                _ => None,
            })
        })
        .collect()
}

/// The groups of `report` whose pass stopped short without halting (`halts`, from
/// [`halts_of`], being the halts of the same report): nothing was switched when it
/// stopped (an agent unreachable, a push that failed), so a daemon's next pass tries
/// again. Pairs of group name and why it stopped.
pub fn waiting_of<'a>(report: &'a RolloutReport, halts: &[Halt]) -> Vec<(&'a str, &'a str)> {
    report
        .groups
        .iter()
        .filter(|group| !halts.iter().any(|h| h.group == group.group))
        .filter_map(|group| Some((group.group.as_str(), group.halted.as_deref()?)))
        .collect()
}

/// The groups a daemon holds halted, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Halts {
    by_group: BTreeMap<String, Halt>,
}

impl Halts {
    /// The halt that keeps `group` from being rolled out at `revision`: one at that
    /// revision or a newer one.
    pub fn blocking(&self, group: &str, revision: u64) -> Option<&Halt> {
        self.by_group
            .get(group)
            .filter(|halt| halt.revision >= revision)
    }

    /// Records a halt (replacing the group's previous one).
    pub fn insert(&mut self, halt: Halt) {
        self.by_group.insert(halt.group.clone(), halt);
    }

    /// Ends the halt of `group`; the one ended, if any.
    pub fn remove(&mut self, group: &str) -> Option<Halt> {
        self.by_group.remove(group)
    }

    /// Ends every halt older than `revision` (a newer revision arrived); the ones ended.
    pub fn end_older_than(&mut self, revision: u64) -> Vec<Halt> {
        let ended: Vec<String> = self
            .by_group
            .values()
            .filter(|halt| halt.revision < revision)
            .map(|halt| halt.group.clone())
            .collect();
        ended
            .iter()
            .filter_map(|group| self.by_group.remove(group))
            .collect()
    }

    /// Every halt, by group name.
    pub fn iter(&self) -> impl Iterator<Item = &Halt> {
        self.by_group.values()
    }

    /// Whether nothing is halted.
    pub fn is_empty(&self) -> bool {
        self.by_group.is_empty()
    }
}

/// The file-mode state directory beside `cluster`.
pub fn state_dir(cluster: &Path) -> PathBuf {
    let parent = cluster
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    parent.join(STATE_DIR)
}

/// The halts kept beside `cluster`; none when the file does not exist.
///
/// # Errors
///
/// [`Error::Local`] naming the file when it cannot be read or is not the JSON this
/// module writes.
pub fn load(cluster: &Path) -> Result<Halts> {
    load_state(cluster, HALTED_FILE, "a list of halted groups")
}

/// Writes the halts beside `cluster`, durably (a crash leaves the old list or the new).
///
/// # Errors
///
/// [`Error::Local`] naming the directory or file that could not be written.
pub fn store(cluster: &Path, halts: &Halts) -> Result<()> {
    store_state(cluster, HALTED_FILE, halts)
}

/// The JSON file `file` of the state directory beside `cluster` ([`state_dir`]);
/// `T::default()` when it does not exist.
///
/// # Errors
///
/// [`Error::Local`] naming the file when it cannot be read, or is not JSON of `T`
/// ("not {what}: ..").
pub(crate) fn load_state<T: DeserializeOwned + Default>(
    cluster: &Path,
    file: &str,
    what: &str,
) -> Result<T> {
    let path = state_dir(cluster).join(file);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(T::default()),
        Err(e) => return Err(Error::local(&path, format!("cannot read: {e}"))),
    };
    serde_json::from_str(&text).map_err(|e| Error::local(&path, format!("not {what}: {e}")))
}

/// Writes `value` as the JSON file `file` of the state directory beside `cluster`,
/// durably (a crash leaves the old file or the new).
///
/// # Errors
///
/// [`Error::Local`] naming the directory or file that could not be written.
pub(crate) fn store_state(cluster: &Path, file: &str, value: &impl Serialize) -> Result<()> {
    let dir = state_dir(cluster);
    let json = serde_json::to_vec_pretty(value)
        .map_err(|e| Error::local(dir.join(file), format!("cannot encode: {e}")))?;
    durable::write(&dir, file, &json)
}

/// A cluster file's path in a fresh temporary directory (not written), for tests of
/// what is kept beside it.
#[cfg(test)]
pub(crate) fn temp_cluster() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = dir.path().join("cluster.toml");
    (dir, cluster)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::{GroupReport, HostFailure, HostReport};

    fn report(phase: HostPhase) -> RolloutReport {
        RolloutReport {
            revision: 4,
            unanswered: Vec::new(),
            groups: vec![GroupReport {
                group: "web".into(),
                release: "beat".into(),
                version: "0.2.0".into(),
                halted: Some("1 host failed".into()),
                hosts: vec![
                    HostReport {
                        host: "web-1".into(),
                        addr: "127.0.0.1:1".into(),
                        outcome: HostOutcome::Failed(HostFailure {
                            phase,
                            reason: "0.2.0: exited with code 3".into(),
                            output_tail: String::new(),
                            rolled_back: true,
                        }),
                    },
                    HostReport {
                        host: "web-2".into(),
                        addr: "127.0.0.1:2".into(),
                        outcome: HostOutcome::Untouched,
                    },
                ],
            }],
        }
    }

    #[test]
    fn a_host_failed_after_its_switch_halts_its_group_at_the_revision() {
        let halts = halts_of(&report(HostPhase::Verifying), 7);
        assert_eq!(halts.len(), 1);
        let halt = &halts[0];
        assert_eq!((halt.group.as_str(), halt.revision), ("web", 4));
        assert_eq!(halt.host, "web-1");
        assert_eq!(halt.reason, "0.2.0: exited with code 3, rolled back");
        let mut all = Halts::default();
        all.insert(halt.clone());
        assert!(all.blocking("web", 4).is_some());
        assert!(
            all.blocking("web", 5).is_none(),
            "a newer revision is tried"
        );
        assert!(all.blocking("db", 4).is_none());
        assert!(all.end_older_than(4).is_empty());
        assert_eq!(all.end_older_than(5).len(), 1);
        assert!(all.is_empty());
    }

    #[test]
    fn a_host_that_failed_before_its_switch_does_not_halt() {
        for phase in [HostPhase::Pinging, HostPhase::Staging, HostPhase::Staged] {
            let report = report(phase);
            let halts = halts_of(&report, 7);
            assert!(halts.is_empty(), "{phase}");
            // The group waits for the next pass instead.
            assert_eq!(
                waiting_of(&report, &halts),
                [("web", "1 host failed")],
                "{phase}"
            );
        }
        let report = report(HostPhase::Verifying);
        let halts = halts_of(&report, 7);
        assert!(
            waiting_of(&report, &halts).is_empty(),
            "a halt is not waiting"
        );
        let mut converged = report.clone();
        converged.groups[0].halted = None;
        assert!(waiting_of(&converged, &[]).is_empty(), "nothing stopped");
    }

    #[test]
    fn halts_survive_a_restart_in_the_state_directory() {
        let (dir, cluster) = temp_cluster();
        assert!(load(&cluster).expect("nothing yet").is_empty());
        let mut halts = Halts::default();
        for halt in halts_of(&report(HostPhase::Starting), 0) {
            halts.insert(halt);
        }
        store(&cluster, &halts).expect("store");
        assert_eq!(load(&cluster).expect("load"), halts);
        let text = halts.iter().map(ToString::to_string).collect::<String>();
        assert!(text.contains("group web halted at revision 4"), "{text}");
        assert!(text.contains("exited with code 3, rolled back"), "{text}");
        std::fs::write(dir.path().join(STATE_DIR).join(HALTED_FILE), "[").expect("write");
        let err = load(&cluster).expect_err("garbage");
        assert!(err.to_string().contains(HALTED_FILE), "{err}");
    }
}
