//! The config path under faults, against the real broker with real agents and real
//! `erel master --amqp` processes:
//! - a master whose state directory is full keeps the revision it holds, says why, and
//!   applies the new one once space is freed, without a new publish;
//! - a revision whose archive reaches a master's artifact directory late is applied
//!   once it arrives, without a new publish;
//! - in both, every master ends on the same revision;
//! - a master started while the archive of the revision it holds is missing converges
//!   once the archive is there;
//! - a master that waits for a newer revision's archive never rolls the hosts back to
//!   an older revision, not even once the master that rolled the newer one out is gone,
//!   and rolls the newer one out once its archive arrives;
//! - of two `erel config publish` of the same next revision at the same moment, one is
//!   confirmed and the other refused, naming the revision and the winner;
//! - every number a config carries reaches the masters exactly as published, or is
//!   refused at publish naming its field;
//! - a master that waits for a revision shows it in its metrics.
//!
//! Each test has its own name prefix on the broker and deletes it at the end.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::helper::amqp::{erel, logs, BrokerLock, MasterProc, TestBroker};
use crate::helper::fleet::Fleet;
use crate::helper::{
    metrics_addr, output_text, poll_until_blocking, scrape_metrics, wait_until_blocking,
};

/// How long a master may take to see a publish (or a freed cause) and store it: far
/// above its backoff cap (`--reconnect-max-ms 1000`) and the log's settle time, and
/// generous for a machine whose two cores are shared with a broker and other builds (a
/// master started at a load average of 20 to 50 took over 20 s to hold its first
/// revision). Every use polls a condition, so a pass costs no more than before.
const RECEIVE: Duration = Duration::from_secs(60);
/// How long a rollout of the beat release to one host may take.
const CONVERGE: Duration = Duration::from_secs(60);

/// A small tmpfs mounted on a temporary directory; unmounted when dropped.
struct SmallTmpfs {
    dir: tempfile::TempDir,
}

impl SmallTmpfs {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it); why not, when it cannot.
    fn mount(size: &str) -> Result<Self, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("mounting a tmpfs needs root".to_string());
        }
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .arg("erel-test-state")
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!("mount -t tmpfs failed: {}", output_text(&out)));
        }
        Ok(SmallTmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the file system with a file of its own, to its last page; its path.
    fn fill(&self) -> PathBuf {
        let path = self.path().join("filler");
        let mut file = std::fs::File::create(&path).expect("create the filler");
        let page = [0u8; 4096];
        loop {
            match file.write_all(&page).and_then(|()| file.sync_all()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
        path
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // Still busy: detach it now, the kernel frees it when the last user goes.
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

/// Lines of `master`'s log that say a revision waits and contain `why`.
fn waits_because(master: &MasterProc, why: &str) -> usize {
    master
        .log()
        .lines()
        .filter(|line| line.contains("waiting for revision") && line.contains(why))
        .count()
}

/// Waits until every one of `masters` holds exactly `text`.
fn wait_all_hold(masters: &[&MasterProc], text: &str, what: &str) {
    assert!(
        wait_until_blocking(RECEIVE, || masters
            .iter()
            .all(|m| m.held_text().as_deref() == Some(text))),
        "{what}\n{}",
        logs(masters)
    );
}

/// Two masters holding revision 1 (release 1.0.0), one of them behind on archives.
struct OneBehind {
    /// The master whose artifact directory is `late`.
    behind: MasterProc,
    /// The master with the fleet's artifact directory (every archive).
    ahead: MasterProc,
    /// The artifact directory of `behind`: only 1.0.0's archive.
    late: tempfile::TempDir,
    /// Revision 1's config text.
    v1: String,
}

/// Starts masters "behind" and "ahead" on `broker` (see `OneBehind`), publishes revision 1
/// and waits until both hold it.
fn one_behind_on_archives(fleet: &Fleet, broker: &TestBroker) -> OneBehind {
    let late = tempfile::tempdir().expect("tempdir");
    std::fs::copy(
        fleet.dir.path().join("beat-1.0.0.tar.gz"),
        late.path().join("beat-1.0.0.tar.gz"),
    )
    .expect("copy 1.0.0");
    let behind = fleet.master_with(broker, "behind", late.path(), &[]);
    let ahead = fleet.master(broker, "ahead");
    let v1 = fleet.config(1, "1.0.0", "");
    fleet.published(broker, &v1);
    wait_all_hold(&[&behind, &ahead], &v1, "both masters hold revision 1");
    OneBehind {
        behind,
        ahead,
        late,
        v1,
    }
}

/// The fleet's archive `<stem>.tar.gz` arrives in artifact directory `dir` as a copy
/// would land it: written beside as `<stem>.partial`, then renamed into place.
fn archive_arrives(fleet: &Fleet, stem: &str, dir: &Path) {
    let partial = dir.join(format!("{stem}.partial"));
    std::fs::copy(fleet.dir.path().join(format!("{stem}.tar.gz")), &partial)
        .unwrap_or_else(|e| panic!("copy {stem}: {e}"));
    std::fs::rename(&partial, dir.join(format!("{stem}.tar.gz"))).expect("rename");
}

/// The revisions in the config log, oldest first.
fn log_revisions(broker: &TestBroker) -> Vec<Option<u64>> {
    broker.config_log().iter().map(|e| e.revision).collect()
}

#[test]
fn amqp_a_full_state_directory_keeps_revision_1_and_applies_2_once_space_is_freed() {
    let _lock = BrokerLock::shared();
    let tmpfs = match SmallTmpfs::mount("256k") {
        Ok(tmpfs) => tmpfs,
        Err(why) => {
            println!("skipped: the full state directory test needs a small tmpfs: {why}");
            return;
        }
    };
    let fleet = Fleet::with_beat_releases("cfg-full", &["web"]);
    let broker = TestBroker::new("full-state", &["web"]);
    let full = MasterProc::start(&fleet.pki, &broker, "full", tmpfs.path(), fleet.dir.path());
    let roomy = fleet.master(&broker, "roomy");

    let v1 = fleet.config(1, "1.0.0", "");
    fleet.published(&broker, &v1);
    wait_all_hold(&[&full, &roomy], &v1, "both masters hold revision 1");
    fleet.wait_all_run("1.0.0", CONVERGE, "the host runs 1.0.0", || {
        logs(&[&full, &roomy])
    });

    let filler = tmpfs.fill();
    let v2 = fleet.config(2, "2.0.0", "");
    fleet.published(&broker, &v2);
    wait_all_hold(&[&roomy], &v2, "the master with room holds revision 2");
    // Tried again (with backoff), not given up after one try.
    assert!(
        wait_until_blocking(RECEIVE, || waits_because(&full, "No space left on device")
            >= 2),
        "the full master says why, more than once\n{}",
        full.log()
    );
    assert_eq!(
        full.held_text().as_deref(),
        Some(v1.as_str()),
        "the full master keeps revision 1 whole"
    );

    std::fs::remove_file(&filler).expect("free the space");
    wait_all_hold(
        &[&full, &roomy],
        &v2,
        "once space is freed, every master holds revision 2",
    );
    assert_eq!(
        log_revisions(&broker),
        vec![Some(1), Some(2)],
        "nothing was published again"
    );
    fleet.wait_all_run("2.0.0", CONVERGE, "the host runs 2.0.0", || {
        logs(&[&full, &roomy])
    });
    let names: Vec<String> = std::fs::read_dir(tmpfs.path())
        .expect("list the state directory")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["config.toml"], "no temporary file left behind");
    drop((full, roomy));
}

#[test]
fn amqp_a_revision_whose_archive_arrives_late_is_applied_without_a_new_publish() {
    let _lock = BrokerLock::shared();
    let fleet = Fleet::with_beat_releases("cfg-late", &["web"]);
    let broker = TestBroker::new("late-archive", &["web"]);
    // One master's artifact directory holds only 1.0.0 for now.
    let OneBehind {
        behind,
        ahead,
        late,
        v1,
    } = one_behind_on_archives(&fleet, &broker);

    // Revisions 2 and 3 both name 2.0.0: only the newest is tried again; 2 waits
    // behind it, said once.
    let v2 = fleet.config(2, "2.0.0", "");
    fleet.published(&broker, &v2);
    let v3 = fleet.config(3, "2.0.0", "max_in_flight = 1");
    fleet.published(&broker, &v3);
    wait_all_hold(
        &[&ahead],
        &v3,
        "the master with the archive holds revision 3",
    );
    let waits_for = |revision: &str| {
        behind
            .log()
            .lines()
            .filter(|l| l.contains(&format!("waiting for revision {revision}:")))
            .count()
    };
    assert!(
        wait_until_blocking(RECEIVE, || waits_for("3") >= 1),
        "the master without the archive waits for revision 3\n{}",
        behind.log()
    );
    let waited_for_2 = waits_for("2");
    assert!(
        wait_until_blocking(RECEIVE, || waits_because(&behind, "beat-2.0.0.tar.gz") >= 2
            && waits_for("3") >= 3),
        "the master without the archive says which one it waits for, more than once\n{}",
        behind.log()
    );
    let log = behind.log();
    assert_eq!(
        waits_for("2"),
        waited_for_2,
        "revision 2 is not tried again behind 3\n{log}"
    );
    assert_eq!(
        log.matches("wait behind revision 3").count(),
        1,
        "said once\n{log}"
    );
    assert_eq!(behind.held_text().as_deref(), Some(v1.as_str()));
    assert!(
        !behind.log().contains("config rejected"),
        "a missing archive is not a refusal\n{}",
        behind.log()
    );

    // The archive arrives (copied beside, then renamed into place).
    archive_arrives(&fleet, "beat-2.0.0", late.path());
    wait_all_hold(
        &[&behind, &ahead],
        &v3,
        "once the archive is there, every master holds revision 3",
    );
    assert_eq!(log_revisions(&broker), vec![Some(1), Some(2), Some(3)]);
    fleet.wait_all_run("2.0.0", CONVERGE, "the host runs 2.0.0", || {
        logs(&[&behind, &ahead])
    });
    drop((behind, ahead));
}

/// A master that waits for a revision says so where an operator looks, not only in its
/// log: its metrics give the revision it waits for and how long it has waited, beside
/// the revision it holds, and 0 for both once the revision is applied.
#[test]
fn amqp_a_master_waiting_for_a_revision_shows_it_in_its_metrics() {
    let _lock = BrokerLock::shared();
    let fleet = Fleet::with_beat_releases("cfg-waitm", &["web"]);
    let broker = TestBroker::new("wait-metrics", &["web"]);
    // Its artifact directory holds only 1.0.0 for now.
    let late = tempfile::tempdir().expect("tempdir");
    std::fs::copy(
        fleet.dir.path().join("beat-1.0.0.tar.gz"),
        late.path().join("beat-1.0.0.tar.gz"),
    )
    .expect("copy 1.0.0");
    let master = fleet.master_with(
        &broker,
        "behind",
        late.path(),
        &["--metrics", "127.0.0.1:0"],
    );
    let addr = poll_until_blocking(RECEIVE, || metrics_addr(&master.log()))
        .unwrap_or_else(|| panic!("no metrics address\n{}", master.log()));
    let metric = |name: &str| -> Option<f64> {
        scrape_metrics(&addr, RECEIVE)?
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))?
            .parse()
            .ok()
    };
    let shows =
        |name: &str, value: f64| wait_until_blocking(RECEIVE, || metric(name) == Some(value));

    fleet.published(&broker, &fleet.config(1, "1.0.0", ""));
    assert!(shows("erel_revision", 1.0), "{}", master.log());
    assert_eq!(metric("erel_waiting_revision"), Some(0.0));

    fleet.published(&broker, &fleet.config(2, "2.0.0", ""));
    assert!(
        shows("erel_waiting_revision", 2.0),
        "{:?}\n{}",
        scrape_metrics(&addr, RECEIVE),
        master.log()
    );
    assert!(
        wait_until_blocking(RECEIVE, || metric("erel_waiting_seconds")
            .is_some_and(|secs| secs >= 1.0)),
        "{:?}",
        scrape_metrics(&addr, RECEIVE)
    );
    assert_eq!(metric("erel_revision"), Some(1.0), "still holds revision 1");
    assert!(
        waits_because(&master, "beat-2.0.0.tar.gz") >= 1,
        "{}",
        master.log()
    );

    archive_arrives(&fleet, "beat-2.0.0", late.path());
    assert!(shows("erel_revision", 2.0), "{}", master.log());
    assert!(
        shows("erel_waiting_revision", 0.0),
        "{:?}",
        scrape_metrics(&addr, RECEIVE)
    );
    assert_eq!(metric("erel_waiting_seconds"), Some(0.0));
}

/// Whether `erel config holders` names `master` as the holder of some group.
fn listed_as_holder(fleet: &Fleet, broker: &TestBroker, master: &str) -> bool {
    let out = erel(&fleet.pki, &["config", "holders", "--json"], broker, &[]);
    let rows: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    rows.as_array()
        .is_none_or(|rows| rows.iter().any(|r| r["master"].as_str() == Some(master)))
}

#[test]
fn amqp_a_master_behind_on_archives_never_rolls_the_hosts_back() {
    let _lock = BrokerLock::shared();
    let fleet = Fleet::with_beat_releases("cfg-lag", &["web"]);
    let broker = TestBroker::new("lag-archive", &["web"]);
    // One master's artifact directory holds only 1.0.0.
    let OneBehind {
        behind,
        mut ahead,
        late,
        v1,
    } = one_behind_on_archives(&fleet, &broker);
    fleet.wait_all_run("1.0.0", CONVERGE, "the host runs 1.0.0", || {
        logs(&[&behind, &ahead])
    });

    // Revision 2 waits for its archive on one master (which hands the group back if
    // it held it); the other rolls it out.
    let v2 = fleet.config(2, "2.0.0", "");
    fleet.published(&broker, &v2);
    assert!(
        wait_until_blocking(RECEIVE, || waits_because(&behind, "beat-2.0.0.tar.gz") >= 1),
        "the master without the archive says it waits for revision 2\n{}",
        behind.log()
    );
    fleet.wait_all_run("2.0.0", CONVERGE, "the host runs 2.0.0", || {
        logs(&[&behind, &ahead])
    });
    assert_eq!(behind.held_text().as_deref(), Some(v1.as_str()));
    let rolled_before = behind.log().matches("rollout started").count();

    // The master that rolled 2.0.0 out dies. Its lease runs out (`config holders` no
    // longer names it) and the waiting master tries revision 2 again twice more: it
    // does not take the group to roll revision 1 out.
    ahead.kill9();
    assert!(
        wait_until_blocking(RECEIVE, || !listed_as_holder(&fleet, &broker, "ahead")),
        "the dead master's lease runs out"
    );
    let waited = waits_because(&behind, "beat-2.0.0.tar.gz");
    assert!(
        wait_until_blocking(RECEIVE, || waits_because(&behind, "beat-2.0.0.tar.gz")
            >= waited + 2),
        "the master keeps waiting for revision 2's archive\n{}",
        behind.log()
    );
    assert!(
        fleet.all_run("2.0.0"),
        "the host stays on 2.0.0: {:?}\n{}",
        fleet.beats(),
        behind.log()
    );
    let log = behind.log();
    assert_eq!(
        log.matches("rollout started").count(),
        rolled_before,
        "the waiting master rolled nothing out\n{log}"
    );
    assert!(!listed_as_holder(&fleet, &broker, "behind"), "{log}");
    assert_eq!(behind.held_revision(), Some(1));

    // 2.0.0's archive arrives: revision 2 applies, with no new publish, and the master
    // takes the group at revision 2 (the host is on it already).
    archive_arrives(&fleet, "beat-2.0.0", late.path());
    wait_all_hold(
        &[&behind],
        &v2,
        "once the archive is there, the master holds revision 2",
    );
    assert!(
        wait_until_blocking(CONVERGE, || behind
            .log()
            .lines()
            .any(|l| l.contains("revision applied") && l.contains("revision=2"))),
        "the master takes the group at revision 2\n{}",
        behind.log()
    );
    assert_eq!(
        log_revisions(&broker),
        vec![Some(1), Some(2)],
        "nothing published again"
    );
    assert!(fleet.all_run("2.0.0"), "{:?}", fleet.beats());
    assert_eq!(
        behind.log().matches("rollout started").count(),
        rolled_before,
        "nothing to roll: the host was on 2.0.0 throughout\n{}",
        behind.log()
    );
    drop((ahead, behind));
}

#[test]
fn amqp_a_master_started_while_its_held_revisions_archive_is_missing_converges_once_it_is_there() {
    let _lock = BrokerLock::shared();
    let fleet = Fleet::with_beat_releases("cfg-held", &["web"]);
    let broker = TestBroker::new("held-archive", &["web"]);
    // The state directory holds revision 1, as a master that ran before left it; the
    // artifact directory does not have its archive yet (not mounted, say).
    let v1 = fleet.config(1, "1.0.0", "");
    let state_dir = fleet.state_dir("held");
    std::fs::create_dir_all(&state_dir).expect("state dir");
    std::fs::write(state_dir.join("config.toml"), &v1).expect("write the held config");
    let empty = tempfile::tempdir().expect("tempdir");
    let master = MasterProc::start(&fleet.pki, &broker, "held", &state_dir, empty.path());
    assert!(
        wait_until_blocking(RECEIVE, || master
            .log()
            .lines()
            .filter(|l| l.contains("not usable yet") && l.contains("beat-1.0.0.tar.gz"))
            .count()
            >= 2),
        "the master says which archive it waits for, more than once\n{}",
        master.log()
    );
    assert!(
        !fleet.all_run("1.0.0"),
        "nothing converged yet: {:?}",
        fleet.beats()
    );

    archive_arrives(&fleet, "beat-1.0.0", empty.path());
    fleet.wait_all_run("1.0.0", CONVERGE, "the host runs 1.0.0", || master.log());
    assert_eq!(master.held_text().as_deref(), Some(v1.as_str()));
    assert!(log_revisions(&broker).is_empty(), "nothing was published");
}

#[test]
fn amqp_two_publishes_of_the_same_revision_never_both_succeed() {
    const ROUNDS: u64 = 20;
    let _lock = BrokerLock::shared();
    let fleet = Fleet::with_beat_releases("cfg-race", &["web"]);
    let broker = TestBroker::new("publish-race", &["web"]);
    for revision in 1..=ROUNDS {
        let publishers = ["alice", "bob"];
        let children: Vec<_> = publishers
            .iter()
            .zip(["1.0.0", "2.0.0"])
            .map(|(publisher, version)| {
                let path = fleet.write(
                    &format!("race-{revision}-{publisher}.toml"),
                    &fleet.config(revision, version, ""),
                );
                fleet
                    .pki
                    .erel()
                    .args(["config", "publish"])
                    .args(broker.flags())
                    .args(["--publisher", publisher])
                    .arg(&path)
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("spawn erel config publish")
            })
            .collect();
        let outs: Vec<_> = children
            .into_iter()
            .map(|child| child.wait_with_output().expect("wait for publish"))
            .collect();
        let confirmed: Vec<usize> = (0..2).filter(|&i| outs[i].status.success()).collect();
        let texts: Vec<String> = outs.iter().map(output_text).collect();
        assert_eq!(
            confirmed.len(),
            1,
            "round {revision}: exactly one publish is confirmed\n{texts:#?}"
        );
        let (winner, loser) = (confirmed[0], 1 - confirmed[0]);
        assert!(texts[winner].contains("confirmed"), "{}", texts[winner]);
        let expected = format!("revision {revision} is not newer than revision {revision}");
        let by = format!("published by {}", publishers[winner]);
        assert!(
            texts[loser].contains(&expected) && texts[loser].contains(&by),
            "round {revision}: the loser names the revision and the winner\n{}",
            texts[loser]
        );
    }
    let revisions = log_revisions(&broker);
    assert_eq!(
        revisions,
        (1..=ROUNDS).map(Some).collect::<Vec<_>>(),
        "the log holds each revision once"
    );
}

/// What publishing one edge value must do.
enum Expect {
    /// Refused at publish; the output names these.
    Refused(&'static [&'static str]),
    /// Confirmed, and held by every master exactly as published.
    Kept,
}

#[test]
fn amqp_every_number_reaches_the_masters_exactly_or_is_refused_at_publish() {
    let _lock = BrokerLock::shared();
    let fleet = Fleet::with_beat_releases("cfg-num", &["web"]);
    let broker = TestBroker::new("numbers", &["web"]);
    let masters = [fleet.master(&broker, "n1"), fleet.master(&broker, "n2")];
    let masters: Vec<&MasterProc> = masters.iter().collect();
    const HEALTH: &str = "min_up_secs = 1, deadline_secs = 15";
    const NONE: &[(&str, &str)] = &[];
    // (what the revision line says, or None for the next revision; lines added to the
    // group; replacements in the text; what must happen)
    type Row = (
        Option<&'static str>,
        &'static str,
        &'static [(&'static str, &'static str)],
        Expect,
    );
    let rows: Vec<Row> = vec![
        (None, "", NONE, Expect::Kept),
        (Some("-1"), "", NONE, Expect::Refused(&["revision"])),
        (Some("2.5"), "", NONE, Expect::Refused(&["revision"])),
        (
            Some("9007199254740992"),
            "",
            NONE,
            Expect::Refused(&["revision", "above the largest revision"]),
        ),
        (
            Some("9223372036854775807"),
            "",
            NONE,
            Expect::Refused(&["revision", "above the largest revision"]),
        ),
        (
            Some("18446744073709551615"),
            "",
            NONE,
            Expect::Refused(&["revision", "above the largest revision"]),
        ),
        (
            Some("18446744073709551616"),
            "",
            NONE,
            Expect::Refused(&["revision"]),
        ),
        (
            None,
            "max_in_flight = 0",
            NONE,
            Expect::Refused(&["group.web.max_in_flight", "at least 1"]),
        ),
        (
            None,
            "max_in_flight = -1",
            NONE,
            Expect::Refused(&["group.web.max_in_flight"]),
        ),
        (
            None,
            "max_in_flight = 4294967296",
            NONE,
            Expect::Refused(&["group.web.max_in_flight"]),
        ),
        (None, "max_in_flight = 4294967295", NONE, Expect::Kept),
        (None, "max_failed = 4294967295", NONE, Expect::Kept),
        (
            None,
            "max_failed = -1",
            NONE,
            Expect::Refused(&["group.web.max_failed"]),
        ),
        (
            None,
            "canaries = 2",
            NONE,
            Expect::Refused(&["group.web.canaries", "only 1 host"]),
        ),
        (
            None,
            "",
            &[("stop_grace_secs = 2", "stop_grace_secs = 601")],
            Expect::Refused(&["group.web.stop_grace_secs", "601"]),
        ),
        (
            None,
            "",
            &[(HEALTH, "min_up_secs = 1, deadline_secs = 86400")],
            Expect::Kept,
        ),
        (
            None,
            "",
            &[(HEALTH, "min_up_secs = 1, deadline_secs = 86401")],
            Expect::Refused(&["group.web.health.deadline_secs", "86401"]),
        ),
        (
            None,
            "",
            &[(
                HEALTH,
                "min_up_secs = 1, deadline_secs = 18446744073709551615",
            )],
            Expect::Refused(&["group.web.health.deadline_secs"]),
        ),
        (
            None,
            "",
            &[(HEALTH, "min_up_secs = 86401, deadline_secs = 86401")],
            Expect::Refused(&["group.web.health.min_up_secs", "86401"]),
        ),
        (
            None,
            "",
            &[(HEALTH, "min_up_secs = -1, deadline_secs = 15")],
            Expect::Refused(&["group.web.health.min_up_secs"]),
        ),
        (
            None,
            "",
            &[(HEALTH, "min_up_secs = 1, deadline_secs = 15, passes = 0")],
            Expect::Refused(&["group.web.health.passes"]),
        ),
        (
            None,
            "",
            &[(
                HEALTH,
                "min_up_secs = 1, deadline_secs = 15, passes = 4294967296",
            )],
            Expect::Refused(&["group.web.health.passes"]),
        ),
        (
            None,
            "drain = { http = 65536 }",
            NONE,
            Expect::Refused(&["group.web.drain.http", "65536"]),
        ),
        (
            None,
            "drain = { http = 8080, timeout_secs = 86401 }",
            NONE,
            Expect::Refused(&["group.web.drain.timeout_secs", "86401"]),
        ),
        (
            None,
            "drain = { http = 8080, timeout_secs = 0 }",
            NONE,
            Expect::Refused(&["group.web.drain.timeout_secs"]),
        ),
        // The largest revision is more than 2^32 above the newest in the log: it would
        // leave nothing to publish after it.
        (
            Some("9007199254740991"),
            "",
            NONE,
            Expect::Refused(&["revision 9007199254740991 is more than 4294967296 (2^32) above"]),
        ),
        // Exactly 2^32 above the newest in the log (`STEP`) is kept.
        (Some("STEP"), "", NONE, Expect::Kept),
    ];
    let mut held: Option<String> = None;
    let mut next = 1u64;
    for (revision, extra, replacements, expect) in rows {
        let mut text = fleet.config(next, "1.0.0", extra);
        for (from, to) in replacements {
            assert!(text.contains(from), "the config holds {from:?}");
            text = text.replace(from, to);
        }
        if let Some(revision) = revision {
            let revision = match revision {
                "STEP" => (next - 1 + (1 << 32)).to_string(),
                other => other.to_string(),
            };
            text = text.replacen(
                &format!("revision = {next}"),
                &format!("revision = {revision}"),
                1,
            );
        }
        let path = fleet.write("edge.toml", &text);
        let out = erel(
            &fleet.pki,
            &["config", "publish"],
            &broker,
            &[path.to_str().expect("utf-8")],
        );
        let said = output_text(&out);
        match expect {
            Expect::Refused(parts) => {
                assert!(!out.status.success(), "{text}\nwas confirmed: {said}");
                for part in parts {
                    assert!(
                        said.contains(part),
                        "{text}\nrefusal names {part:?}: {said}"
                    );
                }
            }
            Expect::Kept => {
                assert!(out.status.success(), "{text}\nwas refused: {said}");
                wait_all_hold(&masters, &text, "every master holds the text as published");
                held = Some(text);
                next += 1;
            }
        }
    }
    // Nothing refused reached the log or a master.
    let held = held.expect("some revision kept");
    for m in &masters {
        assert_eq!(m.held_text().as_deref(), Some(held.as_str()));
        assert_eq!(m.held_revision(), Some(4 + (1 << 32)));
    }
    let revisions = log_revisions(&broker);
    assert_eq!(
        revisions,
        vec![Some(1), Some(2), Some(3), Some(4), Some(4 + (1 << 32))],
        "the header of each record carries the revision exactly"
    );
    let out = erel(&fleet.pki, &["config", "show", "--json"], &broker, &[]);
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).expect("show --json");
    assert_eq!(shown["revision"].as_u64(), Some(4 + (1 << 32)));
    // And nothing above the largest revision is accepted.
    let (ok, said) = fleet.publish(&broker, &fleet.config(1 << 53, "1.0.0", ""));
    assert!(!ok && said.contains("above the largest revision"), "{said}");
}
