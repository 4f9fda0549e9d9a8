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
//! such record (it has no cluster file), so its starts show as `unknown`. A rollout
//! records through a [`Recorder`]: its starts are written on a thread of their own,
//! those that arrive during a write together in the next one, so a rollout never waits
//! for an `fsync` and 1,000 hosts do not cost 1,000 rewrites of the file.
//!
//! [`compare`] judges a running release against the record: the same pid and version
//! prove that the recorded request is the one it runs with.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use erel_proto::{ReleaseState, ReleaseStatus, Start};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cluster::Plan;
use crate::error::{Error, Result};
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
    record_all(cluster, vec![Pending::new(host, start, pid)])
}

/// One start not written yet: host id, release name and its record.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pending {
    host: String,
    release: String,
    record: StartRecord,
}

impl Pending {
    /// The record of `start` sent to `host`, answered with `pid`, now.
    fn new(host: &str, start: &Start, pid: u32) -> Pending {
        Pending {
            host: host.to_string(),
            release: start.name.clone(),
            record: StartRecord {
                version: start.version.clone(),
                pid,
                fingerprint: fingerprint(start),
                started_ms: crate::amqp::now_ms(),
            },
        }
    }
}

/// Writes `starts` beside `cluster` in one durable write, in order (a later start of
/// the same release on the same host replaces an earlier one). An unreadable old
/// record is replaced.
fn record_all(cluster: &Path, starts: Vec<Pending>) -> Result<()> {
    let mut records = load(cluster).unwrap_or_default();
    for start in starts {
        records
            .entry(start.host)
            .or_default()
            .insert(start.release, start.record);
    }
    halt::store_state(cluster, STARTED_FILE, &records)
}

/// The start a rollout's [`RolloutEvent::HostDone`] reports: the request is the one the
/// rollout sent, built from `plan`'s group for that host and version. `None` for any
/// other event (and for a group or host `plan` does not have).
fn done_start(plan: &Plan, event: &RolloutEvent) -> Option<Pending> {
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
    Some(Pending::new(host, &start, *pid))
}

/// Starts waiting for the writer, and whether the recorder is finishing.
#[derive(Default)]
struct Queue {
    pending: Vec<Pending>,
    closed: bool,
}

/// The queue and the condition the writer waits on.
type Shared = (Mutex<Queue>, Condvar);

/// Records the starts of a rollout's [`RolloutEvent::HostDone`] events beside a cluster
/// file without holding the rollout up: [`Recorder::done`] only queues; a thread of its
/// own writes what is queued, all of it in one durable write (load, replace the
/// queued hosts' records, [`crate::durable`]), then waits for more. A start is thus
/// written within [`WRITE_EVERY`] and one write after it is queued, and the file is
/// rewritten at most once per [`WRITE_EVERY`], not once per host. A failed write is
/// handed to `warn` and its starts are not tried again (as with [`record`], never a
/// failed command).
/// [`Recorder::finish`] (or dropping it) writes what is left and waits for it.
pub struct Recorder {
    shared: Arc<Shared>,
    writer: Option<JoinHandle<usize>>,
    /// Where to write when no thread could be started: then `done` writes at once.
    cluster: PathBuf,
    warn: Arc<dyn Fn(&Error) + Send + Sync>,
}

impl Recorder {
    /// A recorder of starts beside `cluster`; `warn` gets each failed write's error.
    pub fn new(cluster: &Path, warn: impl Fn(&Error) + Send + Sync + 'static) -> Recorder {
        let shared: Arc<Shared> = Arc::default();
        let warn: Arc<dyn Fn(&Error) + Send + Sync> = Arc::new(warn);
        let writer = {
            let (shared, cluster, warn) = (shared.clone(), cluster.to_path_buf(), warn.clone());
            std::thread::Builder::new()
                .name("erel-started".to_string())
                .spawn(move || write_queued(&shared, &cluster, &*warn))
                .ok()
        };
        Recorder {
            shared,
            writer,
            cluster: cluster.to_path_buf(),
            warn,
        }
    }

    /// Queues the start `event` reports when it is a [`RolloutEvent::HostDone`] of a
    /// group and host of `plan`, with the request the rollout sent; any other event is
    /// ignored. Never waits for a write, unless no writer thread could be started.
    pub fn done(&self, plan: &Plan, event: &RolloutEvent) {
        let Some(start) = done_start(plan, event) else {
            return;
        };
        if self.writer.is_none() {
            if let Err(e) = record_all(&self.cluster, vec![start]) {
                (self.warn)(&e);
            }
            return;
        }
        let (queue, ready) = &*self.shared;
        queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pending
            .push(start);
        ready.notify_one();
    }

    /// Writes what is still queued and waits for it; the number of writes made in all
    /// (each one durable write of the file, whatever the number of starts in it).
    pub fn finish(mut self) -> usize {
        self.close()
    }

    fn close(&mut self) -> usize {
        let Some(writer) = self.writer.take() else {
            return 0;
        };
        let (queue, ready) = &*self.shared;
        queue.lock().unwrap_or_else(PoisonError::into_inner).closed = true;
        ready.notify_one();
        writer.join().unwrap_or(0)
    }
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("cluster", &self.cluster)
            .field("writer_thread", &self.writer.is_some())
            .finish_non_exhaustive()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.close();
    }
}

/// The least time from the start of one write of a [`Recorder`] to the start of the
/// next, unless the recorder is finishing: the starts queued meanwhile go in the next
/// write together. Each write loads, merges and rewrites the whole file (about 200 bytes
/// per host and release), so back-to-back writes during a 1,000-host rollout, whose
/// hosts finish a few at a time, cost the master as much CPU as its pings.
const WRITE_EVERY: Duration = Duration::from_millis(250);

/// The writer thread of a [`Recorder`]: writes what is queued, all at once, at most once
/// per [`WRITE_EVERY`] until the recorder is closed, then what is left; the number of
/// writes.
fn write_queued(shared: &Shared, cluster: &Path, warn: &(dyn Fn(&Error) + Send + Sync)) -> usize {
    let (queue, ready) = shared;
    let mut writes = 0;
    loop {
        let starts = {
            let mut queue = queue.lock().unwrap_or_else(PoisonError::into_inner);
            while queue.pending.is_empty() && !queue.closed {
                queue = ready.wait(queue).unwrap_or_else(PoisonError::into_inner);
            }
            if queue.pending.is_empty() {
                return writes;
            }
            std::mem::take(&mut queue.pending)
        };
        let began = Instant::now();
        if let Err(e) = record_all(cluster, starts) {
            warn(&e);
        }
        writes += 1;
        let mut queue = queue.lock().unwrap_or_else(PoisonError::into_inner);
        while !queue.closed {
            let Some(left) = WRITE_EVERY.checked_sub(began.elapsed()) else {
                break;
            };
            queue = ready
                .wait_timeout(queue, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
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
    fn a_recorder_writes_every_start_a_rollout_reports_and_ignores_other_events() {
        use crate::cluster::ArchiveLookup;
        use crate::fixtures::{groups_text, HOSTS_IN_SEVERAL_GROUPS};
        let text = groups_text(HOSTS_IN_SEVERAL_GROUPS);
        let plan = Plan::parse(&text, "cluster.toml", &ArchiveLookup::Unchecked).expect("valid");
        let (_dir, cluster) = crate::rollout::halt::temp_cluster();
        let warnings = Arc::new(Mutex::new(Vec::new()));
        let warned = warnings.clone();
        let starts = Recorder::new(&cluster, move |e| {
            warned.lock().expect("lock").push(e.to_string());
        });
        let done = |group: &str, host: &str, version: &str, pid| RolloutEvent::HostDone {
            group: group.into(),
            host: host.into(),
            version: version.into(),
            pid,
        };
        // Many starts at once, one host's release twice: the last one stays.
        for pid in 1..=200 {
            starts.done(&plan, &done("web", "web-1", "0.2.0", pid));
        }
        starts.done(&plan, &done("metrics", "both-1", "1.0.0", 7));
        starts.done(&plan, &done("web", "both-1", "0.2.0", 8));
        // Not a start, or a group or host the file does not have: nothing.
        starts.done(&plan, &done("gone", "web-1", "1", 9));
        starts.done(&plan, &done("web", "gone-1", "1", 9));
        starts.done(
            &plan,
            &RolloutEvent::HostPhase {
                group: "web".into(),
                host: "spare-1".into(),
                phase: crate::rollout::HostPhase::Starting,
            },
        );
        let writes = starts.finish();
        assert!(
            (1..=202).contains(&writes),
            "{writes} writes for 202 starts"
        );
        assert!(warnings.lock().expect("lock").is_empty());
        let records = load(&cluster).expect("load");
        assert_eq!(
            records.keys().collect::<Vec<_>>(),
            ["both-1", "web-1"],
            "only the starts of the file's groups and hosts"
        );
        let web = &records["web-1"]["beat"];
        assert_eq!((web.pid, web.version.as_str()), (200, "0.2.0"));
        let member = plan.host("web-1").expect("host");
        let sent = plan.groups["web"].start_request(member, "0.2.0");
        assert_eq!(web.fingerprint, fingerprint(&sent), "the request sent");
        assert_eq!(records["both-1"]["probe"].pid, 7);
        assert_eq!(records["both-1"]["beat"].pid, 8);
    }

    #[test]
    fn a_recorder_writes_at_most_once_per_interval_while_starts_trickle_in() {
        use crate::cluster::ArchiveLookup;
        use crate::fixtures::{groups_text, HOSTS_IN_SEVERAL_GROUPS};
        let text = groups_text(HOSTS_IN_SEVERAL_GROUPS);
        let plan = Plan::parse(&text, "cluster.toml", &ArchiveLookup::Unchecked).expect("valid");
        let (_dir, cluster) = crate::rollout::halt::temp_cluster();
        let starts = Recorder::new(&cluster, |e| panic!("{e}"));
        // A start every 10 ms for at least 0.4 s: 40 writes if each start were written
        // on its own.
        let began = Instant::now();
        for pid in 1..=40 {
            let event = RolloutEvent::HostDone {
                group: "web".into(),
                host: "web-1".into(),
                version: "0.2.0".into(),
                pid,
            };
            starts.done(&plan, &event);
            std::thread::sleep(Duration::from_millis(10));
        }
        let writes = starts.finish();
        let intervals = began.elapsed().as_millis() / WRITE_EVERY.as_millis();
        let most = usize::try_from(intervals).expect("small") + 2;
        assert!(
            (1..=most).contains(&writes),
            "{writes} writes in {} intervals",
            intervals + 1
        );
        assert_eq!(load(&cluster).expect("load")["web-1"]["beat"].pid, 40);
    }

    #[test]
    fn a_recorder_that_cannot_write_warns_and_the_rollout_goes_on() {
        use crate::cluster::ArchiveLookup;
        use crate::fixtures::{groups_text, HOSTS_IN_SEVERAL_GROUPS};
        let text = groups_text(HOSTS_IN_SEVERAL_GROUPS);
        let plan = Plan::parse(&text, "cluster.toml", &ArchiveLookup::Unchecked).expect("valid");
        let (dir, cluster) = crate::rollout::halt::temp_cluster();
        // The state directory's place is taken by a file: no write can succeed.
        std::fs::write(dir.path().join(halt::STATE_DIR), "").expect("write");
        let warnings = Arc::new(Mutex::new(Vec::new()));
        let warned = warnings.clone();
        let starts = Recorder::new(&cluster, move |e| {
            warned.lock().expect("lock").push(e.to_string());
        });
        starts.done(
            &plan,
            &RolloutEvent::HostDone {
                group: "web".into(),
                host: "web-1".into(),
                version: "0.2.0".into(),
                pid: 1,
            },
        );
        drop(starts);
        let warnings = warnings.lock().expect("lock");
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains(halt::STATE_DIR), "{warnings:?}");
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
