//! What this master started: a record, beside the cluster file, of each release a
//! command started on a host, so that `erel status` can say whether it runs with the
//! argv, env and user its group gives now. An agent's `Pong` carries no argv or env and
//! the wire format is frozen, so the master remembers what it sent instead.
//!
//! The record is `.erel-state/started.json` (in [`halt::state_dir`]), written durably
//! ([`crate::durable`]): per host and release, the version, the pid the agent answered,
//! a [`fingerprint`] of the `Start` request and the time. `erel deploy`, group
//! `restart`/`rollback`, the file daemon and the one-host `erel start`/`restart` write it;
//! a write that fails is a warning, never a failed command. The AMQP daemon keeps no
//! such record (it has no cluster file), so its starts show as `unknown`.
//!
//! [`compare`] judges a running release against the record: the same pid and version
//! prove that the recorded request is the one it runs with.

use std::collections::BTreeMap;
use std::path::Path;

use erel_proto::{ReleaseState, ReleaseStatus, Start};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cluster::Plan;
use crate::error::Result;
use crate::rollout::halt;
use crate::rollout::RolloutEvent;

/// The record of starts, in [`halt::STATE_DIR`].
pub const STARTED_FILE: &str = "started.json";

/// One start of a release on a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartRecord {
    /// The version started.
    pub version: String,
    /// The process id the agent answered.
    pub pid: u32,
    /// [`fingerprint`] of the request: argv, env and user.
    pub fingerprint: String,
    /// When, in milliseconds since the Unix epoch.
    pub started_ms: u64,
}

/// The starts kept beside a cluster file: host id → release name → the last start.
pub type StartRecords = BTreeMap<String, BTreeMap<String, StartRecord>>;

/// The sha256 (lowercase hex, 64 characters) of what a `Start` starts a release with:
/// its argv, its env sorted by name (a name given twice counts once, with its last
/// value, as the process environment gets it) and its user, encoded as the JSON object
/// `{"argv": [..], "env": {..}, "user": ..}`. The name and version are not part of it.
pub fn fingerprint(start: &Start) -> String {
    #[derive(Serialize)]
    struct Settings<'a> {
        argv: &'a [String],
        env: BTreeMap<&'a str, &'a str>,
        user: Option<&'a str>,
    }
    let settings = Settings {
        argv: &start.argv,
        env: start
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect(),
        user: start.user.as_deref(),
    };
    // A struct of strings always encodes.
    let json = serde_json::to_vec(&settings).unwrap_or_default();
    erel_proto::Sha256(Sha256::digest(&json).into()).to_hex()
}

/// The starts kept beside `cluster`; none when the file does not exist.
///
/// # Errors
///
/// [`crate::Error::Local`] naming the file when it cannot be read or is not this module's JSON.
pub fn load(cluster: &Path) -> Result<StartRecords> {
    halt::load_state(cluster, STARTED_FILE, "a record of started releases")
}

/// Records that `start` was started on `host` as process `pid`, replacing the host's
/// last record of that release; durable (a crash leaves the old record or the new).
/// An unreadable old record is replaced.
///
/// # Errors
///
/// [`crate::Error::Local`] naming the directory or file that could not be written.
pub fn record(cluster: &Path, host: &str, start: &Start, pid: u32) -> Result<()> {
    let mut records = load(cluster).unwrap_or_default();
    records.entry(host.to_string()).or_default().insert(
        start.name.clone(),
        StartRecord {
            version: start.version.clone(),
            pid,
            fingerprint: fingerprint(start),
            started_ms: crate::amqp::now_ms(),
        },
    );
    halt::store_state(cluster, STARTED_FILE, &records)
}

/// Records the start a rollout's [`RolloutEvent::HostDone`] reports: the request is the
/// one the rollout sent, built from `plan`'s group for that host and version. `None` for
/// any other event (and for a group or host `plan` does not have).
pub fn record_done(cluster: &Path, plan: &Plan, event: &RolloutEvent) -> Option<Result<()>> {
    let RolloutEvent::HostDone {
        group,
        host,
        version,
        pid,
    } = event
    else {
        return None;
    };
    let group = plan.groups.get(group)?;
    let member = plan.host(host)?;
    let start = group.start_request(member, version);
    Some(record(cluster, host, &start, *pid))
}

/// What [`compare`] says: `match`, `differs`, `unknown` or `-`, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgvEnv {
    /// [`MATCH`], [`DIFFERS`], [`UNKNOWN`] or `-` (the release does not run).
    pub word: &'static str,
    /// Why, for `differs` and `unknown`.
    pub why: Option<String>,
}

/// The running release was started with what its group gives now.
pub const MATCH: &str = "match";
/// The running release was started with other argv, env or user.
pub const DIFFERS: &str = "differs";
/// Not known what the running release was started with.
pub const UNKNOWN: &str = "unknown";

/// Whether `release` (as an agent reports it) runs with what `now` (the group's request
/// for the running version) would start: `-` when it does not run; `match` or `differs`
/// when `record` has its pid and version; else `unknown` with why (no record, started
/// by another master or by hand, by a rollout's rollback of a failed switch (whose
/// start the rollout's events do not report), or restarted by the agent after a crash:
/// the agent restarts with the request it was given, but a new pid cannot be told from
/// a start by someone else).
pub fn compare(record: Option<&StartRecord>, release: &ReleaseStatus, now: &Start) -> ArgvEnv {
    let unknown = |why: String| ArgvEnv {
        word: UNKNOWN,
        why: Some(why),
    };
    let (ReleaseState::Running, Some(pid), Some(version)) =
        (&release.state, release.pid, release.version.as_ref())
    else {
        return ArgvEnv {
            word: "-",
            why: None,
        };
    };
    let Some(record) = record else {
        return unknown("no record of its start".to_string());
    };
    if record.pid != pid || &record.version != version {
        let last = format!("last recorded start: {} pid {}", record.version, record.pid);
        return unknown(if release.restarts > 0 {
            format!(
                "pid {pid} is not the recorded one: restarted by the agent after a crash \
                 ({} restart(s)), or started by another master or by hand, or by the \
                 rollback of a failed switch ({last})",
                release.restarts
            )
        } else {
            format!(
                "started by another master or by hand, or by the rollback of a failed \
                 switch ({last})"
            )
        });
    }
    if record.fingerprint == fingerprint(now) {
        ArgvEnv {
            word: MATCH,
            why: None,
        }
    } else {
        ArgvEnv {
            word: DIFFERS,
            why: Some(
                "started with other argv/env/user than the group now says; restart to apply"
                    .to_string(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(env: &[(&str, &str)]) -> Start {
        Start {
            name: "pong".into(),
            version: "2".into(),
            argv: vec!["bin/pong".into(), "foreground".into()],
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            user: None,
        }
    }

    fn running(pid: u32, restarts: u32) -> ReleaseStatus {
        ReleaseStatus {
            name: "pong".into(),
            versions: vec!["2".into()],
            version: Some("2".into()),
            desired_running: true,
            pid: Some(pid),
            state: ReleaseState::Running,
            restarts,
            up_secs: Some(5),
            output_tail: String::new(),
        }
    }

    fn recorded(start: &Start, pid: u32) -> StartRecord {
        StartRecord {
            version: start.version.clone(),
            pid,
            fingerprint: fingerprint(start),
            started_ms: 1,
        }
    }

    #[test]
    fn the_fingerprint_sorts_env_and_covers_argv_env_and_user() {
        let a = start(&[("A", "1"), ("B", "2")]);
        assert_eq!(fingerprint(&a).len(), 64);
        assert_eq!(
            fingerprint(&a),
            fingerprint(&start(&[("B", "2"), ("A", "1")]))
        );
        assert_eq!(
            fingerprint(&a),
            fingerprint(&start(&[("A", "0"), ("B", "2"), ("A", "1")])),
            "the last value of a name given twice counts"
        );
        assert_ne!(fingerprint(&a), fingerprint(&start(&[("A", "1")])));
        let mut argv = a.clone();
        argv.argv.push("--verbose".into());
        assert_ne!(fingerprint(&a), fingerprint(&argv));
        let mut user = a.clone();
        user.user = Some("nobody".into());
        assert_ne!(fingerprint(&a), fingerprint(&user));
        let mut version = a.clone();
        version.version = "3".into();
        assert_eq!(fingerprint(&a), fingerprint(&version), "not the version");
    }

    #[test]
    fn a_recorded_start_with_the_same_pid_matches_or_differs() {
        let group = start(&[("PORT", "80")]);
        let same = compare(Some(&recorded(&group, 42)), &running(42, 0), &group);
        assert_eq!((same.word, same.why), (MATCH, None));
        let by_hand = start(&[("PORT", "80"), ("X", "1")]);
        let differs = compare(Some(&recorded(&by_hand, 42)), &running(42, 0), &group);
        assert_eq!(differs.word, DIFFERS);
        assert!(differs.why.expect("why").contains("restart to apply"));
    }

    #[test]
    fn another_pid_or_no_record_is_unknown_and_says_why() {
        let group = start(&[]);
        let none = compare(None, &running(42, 0), &group);
        assert_eq!(none.word, UNKNOWN);
        assert_eq!(none.why.as_deref(), Some("no record of its start"));
        let other = compare(Some(&recorded(&group, 7)), &running(42, 0), &group);
        assert_eq!(other.word, UNKNOWN);
        let why = other.why.expect("why");
        assert!(
            why.contains("started by another master or by hand"),
            "{why}"
        );
        assert!(why.contains("pid 7"), "{why}");
        let crashed = compare(Some(&recorded(&group, 7)), &running(42, 2), &group);
        assert!(crashed
            .why
            .expect("why")
            .contains("restarted by the agent after a crash (2"),);
        let mut old = recorded(&group, 42);
        old.version = "1".into();
        assert_eq!(compare(Some(&old), &running(42, 0), &group).word, UNKNOWN);
        let mut stopped = running(42, 0);
        stopped.state = ReleaseState::Stopped;
        stopped.pid = None;
        assert_eq!(compare(None, &stopped, &group).word, "-");
    }

    #[test]
    fn records_survive_in_the_state_directory_and_garbage_is_named() {
        let (dir, cluster) = crate::rollout::halt::temp_cluster();
        assert!(load(&cluster).expect("nothing yet").is_empty());
        record(&cluster, "a-1", &start(&[("X", "1")]), 42).expect("record");
        record(&cluster, "a-1", &start(&[]), 43).expect("record again");
        let records = load(&cluster).expect("load");
        let last = &records["a-1"]["pong"];
        assert_eq!((last.pid, last.version.as_str()), (43, "2"));
        assert_eq!(last.fingerprint, fingerprint(&start(&[])));
        let file = dir.path().join(halt::STATE_DIR).join(STARTED_FILE);
        std::fs::write(&file, "[").expect("write");
        let err = load(&cluster).expect_err("garbage");
        assert!(err.to_string().contains(STARTED_FILE), "{err}");
        record(&cluster, "b-1", &start(&[]), 44).expect("garbage is replaced");
        assert_eq!(load(&cluster).expect("load")["b-1"]["pong"].pid, 44);
    }
}
