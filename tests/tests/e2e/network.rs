//! Network faults between the master and its hosts, each agent in a network namespace of
//! its own (see `helper::netns`):
//!
//! - a link cut in the middle of a `WriteFile`: the host is reported once the transfer
//!   stalls, nothing half-done is visible, and once the link is restored the next deploy,
//!   or the daemon's next pass by itself, resumes the push from what the agent holds;
//! - a host lost for good in the middle of a group's rollout (between two hosts, or while
//!   it is verified): reported within the master's phase bounds, never a hang, and the
//!   next host halted or switched as the failure budget says;
//! - a slow, lossy link: the deploy completes, the other hosts' links lose nothing;
//! - a fixed latency on one link (a proxy in the test, `helper::slow_link`): a rolling
//!   deploy through it completes, and its health gate neither fails the slow host's good
//!   release nor passes a release that dies before `min_up_secs`.
//!
//! Where namespaces cannot be made, each test prints "skipped: <why>" and returns.

use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use erel_master::client::{DEAD_PEER_TIMEOUT, TRANSFER_STALL_TIMEOUT};
use erel_master::release::ReleaseFile;

use crate::helper::netns::{NetFleet, BEAT_PORT};
use crate::helper::release::{beat_release, failing_beat_release, names_the_exit_failure};
use crate::helper::slow_link::{Delay, SlowLink};
use crate::helper::stepping::step_until;
use crate::helper::{exit_within, follow_lines, wait_until_blocking, PATIENCE};

/// `--connect-timeout` of every `erel deploy` here: how long each phase of opening a
/// connection (TCP; TLS and `Hello`) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// `stop_grace_secs` of the groups here.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// The master's margin over a group's stop grace for the answer to `Stop`
/// (`STOP_MARGIN` in the master's client budgets).
const STOP_MARGIN: Duration = Duration::from_secs(30);
/// How long the master waits for the answer to a `Ping` (`PING_BUDGET` there).
const PING_BUDGET: Duration = Duration::from_secs(15);

/// `deadline_secs` of the beat groups' health gate.
const HEALTH_DEADLINE: Duration = Duration::from_secs(30);
/// `min_up_secs` of the health gate in the tests that lose a host mid-rollout.
const LOSS_MIN_UP: u64 = 3;

/// The group lines of the beat groups: one host at a time after one canary, `max_failed`
/// hosts may fail before the group halts, healthy once the release's TCP port answers
/// on the host's address (over the host's link) and it stayed up `min_up_secs`.
fn rolling(max_failed: u32, min_up_secs: u64) -> String {
    format!(
        "max_in_flight = 1\ncanaries = 1\nmax_failed = {max_failed}\nstop_grace_secs = {}\n\
         health = {{ tcp = \"$BEAT_PORT\", min_up_secs = {min_up_secs}, deadline_secs = {} }}",
        STOP_GRACE.as_secs(),
        HEALTH_DEADLINE.as_secs()
    )
}

/// `--interval` of the daemons here: how often a pass converges the cluster.
const DAEMON_INTERVAL: Duration = Duration::from_secs(1);

/// The bound on a deploy that meets no fault: what a busy machine needs.
const PLAIN_DEPLOY: Duration = PATIENCE.saturating_mul(2);

/// `erel deploy --connect-timeout <CONNECT_TIMEOUT>` on `fleet`'s cluster file, started.
fn start_deploy(fleet: &NetFleet) -> Running {
    let flag = CONNECT_TIMEOUT.as_secs().to_string();
    Running::spawn(&mut fleet.deploy_command(&["--connect-timeout", &flag]))
}

/// A command running as a child, its stdout and stderr collected together as they come.
struct Running {
    child: Child,
    output: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Running {
    fn spawn(command: &mut Command) -> Running {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn erel");
        let output = Arc::new(Mutex::new(String::new()));
        let readers = vec![
            follow_lines(child.stdout.take().expect("stdout"), output.clone(), |_| {}),
            follow_lines(child.stderr.take().expect("stderr"), output.clone(), |_| {}),
        ];
        Running {
            child,
            output,
            readers,
        }
    }

    fn output(&self) -> String {
        self.output.lock().expect("output lock").clone()
    }

    /// Waits up to `limit` for the command to exit; (success, what it printed). Panics,
    /// after killing it, when it is still running then: the command hung.
    fn finish_within(mut self, limit: Duration, logs: impl FnOnce() -> String) -> (bool, String) {
        let Some(status) = exit_within(&mut self.child, limit) else {
            let _ = self.child.kill();
            let _ = self.child.wait();
            panic!(
                "still running after {limit:?}, it hangs:\n{}\n{}",
                self.output(),
                logs()
            );
        };
        // The readers end with the pipes, which close with the process.
        for reader in self.readers.drain(..) {
            reader.join().expect("output reader");
        }
        (status.success(), self.output())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The bytes held in the agent's staging files (`.erel/staging/*.part` under `root`).
fn staged_bytes(root: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(root.join(".erel/staging")) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".part"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// The offsets at which the agent began the `WriteFile`s of `path` that it completed,
/// in order, as its log records them (`command=write_file ... offset=N ... ok=true`).
fn completed_write_offsets(log: &str, path: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains("write_file") && l.contains(path) && l.contains("ok=true"))
        .filter_map(|l| {
            let rest = &l[l.find("offset=")? + "offset=".len()..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect()
}

/// The size of the payload of the bulk release: enough that a transfer at
/// [`SLOW_RATE_KBIT`] lasts long enough to be cut in its middle.
const PAYLOAD: usize = 64 << 20;
/// The rate of the slow link of the cut test (8 MB/s: the payload takes ~8 s).
const SLOW_RATE_KBIT: u32 = 64_000;
/// Bytes the agent must have staged before the link is cut.
const CUT_AFTER: u64 = 8 << 20;

/// A release `bulk` `version` that sleeps, carrying [`PAYLOAD`] bytes of random data,
/// written to `dir` as a plain `.tar` (random data does not compress, and gzip in a
/// debug build only costs time).
fn bulk_release(dir: &Path, version: &str) -> std::path::PathBuf {
    let mut payload = Vec::with_capacity(PAYLOAD);
    std::fs::File::open("/dev/urandom")
        .expect("open /dev/urandom")
        .take(PAYLOAD as u64)
        .read_to_end(&mut payload)
        .expect("read /dev/urandom");
    let files = [
        ReleaseFile::start_script("bulk", "#!/bin/sh\nexec sleep 100000\n"),
        ReleaseFile::marker("bulk", version),
        ReleaseFile {
            path: "lib/payload.bin".into(),
            data: payload,
            mode: 0o644,
        },
    ];
    write_plain_tar(dir, "bulk", version, &files)
}

/// Writes `dir/<name>-<version>.tar` holding `files` in order, uncompressed; its path.
fn write_plain_tar(
    dir: &Path,
    name: &str,
    version: &str,
    files: &[ReleaseFile],
) -> std::path::PathBuf {
    let path = dir.join(format!("{name}-{version}.tar"));
    let mut tar = tar::Builder::new(std::fs::File::create(&path).expect("create the tarball"));
    for file in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(file.data.len() as u64);
        header.set_mode(file.mode);
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut header, &file.path, file.data.as_slice())
            .expect("append to the tarball");
    }
    tar.into_inner()
        .and_then(|file| file.sync_all())
        .expect("finish the tarball");
    path
}

/// Where the bulk archive lands on the agent.
const BULK_DEST: &str = "archives/bulk-1.0.0.tar";

/// One host `<prefix>-1` on a slow link, a cluster file that installs the bulk release
/// 1.0.0 there, and the archive's size.
fn bulk_fleet(test: &str, prefix: &str) -> Option<(NetFleet, u64)> {
    let fleet = NetFleet::new(test, prefix, 1)?;
    let archive = bulk_release(&fleet.releases(), "1.0.0");
    let size = std::fs::metadata(&archive).expect("archive").len();
    fleet.write_cluster(
        1,
        "bulk",
        "1.0.0",
        &archive,
        "health = { min_up_secs = 1, deadline_secs = 30 }",
    );
    // A slow link, so that the cut lands in the middle of the transfer.
    fleet.net.shape(0, SLOW_RATE_KBIT, 256 << 10);
    Some((fleet, size))
}

/// Cuts the link of `fleet`'s host once its agent has staged [`CUT_AFTER`] bytes of the
/// push `master` (a running `erel deploy` or daemon) makes; the bytes staged then.
fn cut_mid_push(fleet: &NetFleet, master: &Running, size: u64) -> u64 {
    let root = &fleet.agents[0].root;
    // Stepped, and held stopped from the look that saw the bytes until the cut.
    let pid = fleet.agents[0].pid().expect("the agent runs");
    let (at_cut, held) = step_until(pid, PATIENCE, || {
        let staged = staged_bytes(root);
        (staged >= CUT_AFTER).then_some(staged)
    })
    .unwrap_or_else(|| {
        panic!(
            "nothing staged:\n{}\n{}",
            master.output(),
            fleet.agent_logs()
        )
    });
    fleet.net.cut(0);
    held.resume();
    assert!(at_cut < size, "cut before the end: {at_cut} of {size}");
    at_cut
}

/// The bound on a master's giving up a push whose link was cut: its connection is found
/// dead (or the transfer stalls, if that came first), one new connection is tried, which
/// the cut link cannot carry, and the host is reported.
const CUT_PUSH_REPORTED: Duration = min(DEAD_PEER_TIMEOUT, TRANSFER_STALL_TIMEOUT)
    .saturating_add(CONNECT_TIMEOUT.saturating_mul(2))
    .saturating_add(PATIENCE);

/// The shorter of two durations, in a constant.
const fn min(a: Duration, b: Duration) -> Duration {
    if a.as_nanos() < b.as_nanos() {
        a
    } else {
        b
    }
}

/// After a push to `fleet`'s host was cut and reported: nothing half-done is visible,
/// and what arrived is kept in staging. The bytes kept.
fn nothing_visible_after_the_cut(fleet: &NetFleet, at_cut: u64, size: u64) -> u64 {
    let root = &fleet.agents[0].root;
    assert!(
        !root.join(BULK_DEST).exists(),
        "no partial archive in place"
    );
    assert!(!root.join("releases/bulk").exists(), "nothing unpacked");
    let held = staged_bytes(root);
    assert!(held >= at_cut && held < size, "kept {held} of {size}");
    held
}

/// Once the push completed after the link came back: the agent offered the `held`
/// bytes, the master sent only the rest, and the archive is in place, whole.
fn resumed_from(fleet: &NetFleet, held: u64, size: u64) {
    let agent = &fleet.agents[0];
    let offsets = completed_write_offsets(&agent.log(), BULK_DEST);
    assert_eq!(
        offsets,
        vec![held],
        "one completed transfer, from {held}:\n{}",
        agent.log()
    );
    assert_eq!(staged_bytes(&agent.root), 0, "staging emptied");
    let placed = std::fs::metadata(agent.root.join(BULK_DEST)).expect("archive in place");
    assert_eq!(placed.len(), size);
}

#[test]
fn a_link_cut_mid_write_file_fails_the_host_then_the_next_deploy_resumes_the_push() {
    let test = "a_link_cut_mid_write_file_fails_the_host_then_the_next_deploy_resumes_the_push";
    let Some((fleet, size)) = bulk_fleet(test, "cut") else {
        return;
    };
    let deploy = start_deploy(&fleet);
    let at_cut = cut_mid_push(&fleet, &deploy, size);
    let (ok, out) = deploy.finish_within(CUT_PUSH_REPORTED, || fleet.agent_logs());
    assert!(!ok, "the cut host is not deployed:\n{out}");
    assert!(
        out.contains("cut-1") && out.contains("FAILED while staging"),
        "{out}"
    );
    let held = nothing_visible_after_the_cut(&fleet, at_cut, size);

    fleet.net.restore(0);
    let bound = TRANSFER_STALL_TIMEOUT + PATIENCE;
    let (ok, out) = start_deploy(&fleet).finish_within(bound, || fleet.agent_logs());
    assert!(
        ok,
        "the deploy completes once the link is back:\n{out}\n{}",
        fleet.agent_logs()
    );
    assert!(out.contains("cut-1: done, runs 1.0.0"), "{out}");
    resumed_from(&fleet, held, size);
}

#[test]
fn a_daemon_whose_push_is_cut_resumes_it_by_itself_once_the_link_is_back() {
    let test = "a_daemon_whose_push_is_cut_resumes_it_by_itself_once_the_link_is_back";
    let Some((fleet, size)) = bulk_fleet(test, "heal") else {
        return;
    };
    let mut daemon = fleet.pki.erel();
    daemon
        .arg("--cluster")
        .arg(fleet.cluster())
        .args([
            "master",
            "--interval",
            &DAEMON_INTERVAL.as_secs().to_string(),
        ])
        .args(["--connect-timeout", &CONNECT_TIMEOUT.as_secs().to_string()]);
    let daemon = Running::spawn(&mut daemon);
    let at_cut = cut_mid_push(&fleet, &daemon, size);
    let reported = wait_until_blocking(CUT_PUSH_REPORTED, || {
        daemon.output().contains("heal-1 (") && daemon.output().contains("FAILED while staging")
    });
    assert!(reported, "the cut push is reported:\n{}", daemon.output());
    let held = nothing_visible_after_the_cut(&fleet, at_cut, size);

    // A failure before anything was switched does not halt: a later pass tries again,
    // and once the link is back, resumes the push.
    fleet.net.restore(0);
    let bound = DAEMON_INTERVAL + TRANSFER_STALL_TIMEOUT + PATIENCE;
    let done = wait_until_blocking(bound, || {
        daemon.output().contains("heal-1: done, runs 1.0.0")
    });
    assert!(
        done,
        "converged once the link is back:\n{}\n{}",
        daemon.output(),
        fleet.agent_logs()
    );
    resumed_from(&fleet, held, size);
}

#[test]
fn a_host_lost_between_two_hosts_of_a_rollout_is_reported_and_the_group_halts() {
    let test = "a_host_lost_between_two_hosts_of_a_rollout_is_reported_and_the_group_halts";
    // Lost once the canary is done, before the master turns to it.
    lose_the_second_host_mid_rollout(test, "lostb", "lostb-1: done, runs 0.2.0", 0);
}

#[test]
fn a_host_lost_while_it_is_verified_is_reported_and_the_group_halts() {
    let test = "a_host_lost_while_it_is_verified_is_reported_and_the_group_halts";
    // Lost with the new version started, while the master watches it.
    lose_the_second_host_mid_rollout(test, "lostv", "lostv-2: verifying", 0);
}

#[test]
fn a_host_lost_within_the_failure_budget_is_reported_and_the_rollout_goes_on() {
    let test = "a_host_lost_within_the_failure_budget_is_reported_and_the_rollout_goes_on";
    lose_the_second_host_mid_rollout(test, "lostk", "lostk-1: done, runs 0.2.0", 1);
}

/// Three hosts `<prefix>-1..3` run beat 0.1.0; a rolling deploy of 0.2.0 (one canary,
/// one host at a time, `max_failed` failures allowed) loses host 2 for good once the
/// deploy prints `trigger`. The deploy reports host 2 failed within the bounds of the
/// master's phases and exits non-zero; the canary runs 0.2.0; host 3 is then as the
/// README's failure budget says: switched to 0.2.0 with budget left, untouched (its
/// 0.1.0 process the same) when the loss used up the budget and the group halted.
fn lose_the_second_host_mid_rollout(test: &str, prefix: &str, trigger: &str, max_failed: u32) {
    let Some(mut fleet) = NetFleet::new(test, prefix, 3) else {
        return;
    };
    let v1 = beat_release(&fleet.releases(), "beat", "0.1.0");
    let v2 = beat_release(&fleet.releases(), "beat", "0.2.0");
    // Each host stays in verification for a few seconds: time for the test to see the
    // trigger and act while the host is where the trigger says.
    let group = rolling(max_failed, LOSS_MIN_UP);
    fleet.write_cluster(1, "beat", "0.1.0", &v1, &group);
    let (ok, out) = start_deploy(&fleet).finish_within(PLAIN_DEPLOY, || fleet.agent_logs());
    assert!(ok, "{out}\n{}", fleet.agent_logs());
    let ids: Vec<String> = (1..=3).map(|i| format!("{prefix}-{i}")).collect();
    let beats: Vec<String> = (0..3).map(|i| fleet.beat(i)).collect();
    let v1_beats: Vec<String> = ids.iter().map(|id| format!("beat 0.1.0 {id}")).collect();
    assert_eq!(beats, v1_beats);
    let third_pids = fleet.agents[2].release_pids("beat");

    fleet.write_cluster(2, "beat", "0.2.0", &v2, &group);
    let deploy = start_deploy(&fleet);
    // The master stepped, and held stopped from the look that saw the trigger until the
    // host is lost: it is lost where the trigger says, however busy the machine.
    let seen = step_until(deploy.child.id(), PATIENCE * 2, || {
        deploy.output().contains(trigger).then_some(())
    });
    assert!(
        seen.is_some(),
        "{trigger:?} never printed:\n{}\n{}",
        deploy.output(),
        fleet.agent_logs()
    );
    fleet.lose(1);
    drop(seen);

    // Whatever the master was doing with the lost host (stopping it, starting it,
    // watching it), one phase's bound, tried twice, ends that phase; the rollback that
    // follows a failed verification tries the same again; the rest takes what a busy
    // machine needs. Past this bound the deploy hangs (`finish_within` fails).
    let phase = TRANSFER_STALL_TIMEOUT
        .max(STOP_GRACE + STOP_MARGIN)
        .max(PING_BUDGET)
        .max(HEALTH_DEADLINE);
    let limit = (phase + CONNECT_TIMEOUT) * 4 + PATIENCE;
    let (ok, out) = deploy.finish_within(limit, || fleet.agent_logs());
    assert!(!ok, "a lost host fails the deploy:\n{out}");
    let lost = format!("web/{} (", ids[1]);
    assert!(
        out.lines()
            .any(|l| l.contains(&lost) && l.contains("FAILED while")),
        "{} reported failed:\n{out}",
        ids[1]
    );
    assert_eq!(fleet.beat(0), format!("beat 0.2.0 {}", ids[0]));
    if max_failed == 0 {
        let halted = format!("not touched: {}", ids[2]);
        assert!(out.contains("HALTED") && out.contains(&halted), "{out}");
        assert_eq!(fleet.beat(2), format!("beat 0.1.0 {}", ids[2]));
        assert_eq!(fleet.agents[2].release_pids("beat"), third_pids);
    } else {
        assert!(!out.contains("HALTED"), "{out}");
        assert!(
            out.contains(&format!("{}: done, runs 0.2.0", ids[2])),
            "{out}"
        );
        assert_eq!(fleet.beat(2), format!("beat 0.2.0 {}", ids[2]));
    }
}

/// Files in the archive of [`many_files_release`]: enough that the agent spends seconds
/// unpacking it.
const MANY_FILES: usize = 20_000;

/// A release `many` `version` that sleeps, carrying [`MANY_FILES`] small files, written
/// to `dir` as a plain `.tar`.
fn many_files_release(dir: &Path, version: &str) -> std::path::PathBuf {
    let mut files = vec![
        ReleaseFile::start_script("many", "#!/bin/sh\nexec sleep 100000\n"),
        ReleaseFile::marker("many", version),
    ];
    files.extend((0..MANY_FILES).map(|i| ReleaseFile {
        path: format!("lib/{:03}/{i}.txt", i % 100),
        data: format!("file {i}\n").into_bytes(),
        mode: 0o644,
    }));
    write_plain_tar(dir, "many", version, &files)
}

#[test]
fn a_host_lost_while_it_unpacks_is_reported_once_its_connection_is_found_dead() {
    let test = "a_host_lost_while_it_unpacks_is_reported_once_its_connection_is_found_dead";
    let Some(mut fleet) = NetFleet::new(test, "unpk", 1) else {
        return;
    };
    let archive = many_files_release(&fleet.releases(), "1.0.0");
    fleet.write_cluster(
        1,
        "many",
        "1.0.0",
        &archive,
        "health = { min_up_secs = 1, deadline_secs = 30 }",
    );
    let deploy = start_deploy(&fleet);
    let unpacking = fleet.agents[0].root.join(".erel/unpack");
    // Stepped, and held stopped once seen unpacking: lost in the middle of the unpack.
    let pid = fleet.agents[0].pid().expect("the agent runs");
    let seen = step_until(pid, PLAIN_DEPLOY, || {
        std::fs::read_dir(&unpacking)
            .is_ok_and(|mut entries| entries.next().is_some())
            .then_some(())
    });
    assert!(
        seen.is_some(),
        "never unpacked:\n{}\n{}",
        deploy.output(),
        fleet.agent_logs()
    );
    fleet.lose(0);
    drop(seen);

    // The master waits for the answer to `Unpack` on a connection the host will never
    // answer on again. The unpack's own bound is for slow disks (minutes); a dead peer is
    // found by TCP well before it, then one new connection is tried.
    let limit = DEAD_PEER_TIMEOUT + CONNECT_TIMEOUT * 2 + PATIENCE;
    let (ok, out) = deploy.finish_within(limit, || fleet.agent_logs());
    assert!(!ok, "{out}");
    assert!(
        out.contains("web/unpk-1 (") && out.contains("FAILED while staging"),
        "{out}"
    );
}

/// The rate of the lossy link: 1 MB/s.
const LOSSY_RATE_KBIT: u32 = 8_000;
/// The queue of the lossy link: up to ~50 ms of queueing at [`LOSSY_RATE_KBIT`], and a
/// sender faster than that loses packets.
const LOSSY_QUEUE: u32 = 48 << 10;

#[test]
fn a_slow_lossy_link_still_deploys_and_the_other_hosts_see_nothing_of_it() {
    let test = "a_slow_lossy_link_still_deploys_and_the_other_hosts_see_nothing_of_it";
    let Some(fleet) = NetFleet::new(test, "lossy", 3) else {
        return;
    };
    let v1 = beat_release(&fleet.releases(), "beat", "0.1.0");
    let v2 = beat_release(&fleet.releases(), "beat", "0.2.0");
    fleet.write_cluster(1, "beat", "0.1.0", &v1, &rolling(0, 1));
    let (ok, out) = start_deploy(&fleet).finish_within(PLAIN_DEPLOY, || fleet.agent_logs());
    assert!(ok, "{out}\n{}", fleet.agent_logs());

    fleet.net.shape(0, LOSSY_RATE_KBIT, LOSSY_QUEUE);
    fleet.write_cluster(2, "beat", "0.2.0", &v2, &rolling(0, 1));
    let archive = std::fs::metadata(&v2).expect("archive").len();
    // The push at the shaped rate, several times over for the losses, and the rollout.
    let transfer = Duration::from_secs(archive / (u64::from(LOSSY_RATE_KBIT) * 1000 / 8) + 1);
    let deploy = start_deploy(&fleet);
    let (ok, out) = deploy.finish_within(transfer * 4 + PATIENCE, || fleet.agent_logs());
    assert!(
        ok,
        "the deploy completes over the lossy link:\n{out}\n{}",
        fleet.agent_logs()
    );
    let beats: Vec<String> = (0..3).map(|i| fleet.beat(i)).collect();
    assert_eq!(
        beats,
        [
            "beat 0.2.0 lossy-1",
            "beat 0.2.0 lossy-2",
            "beat 0.2.0 lossy-3"
        ]
    );
    assert!(fleet.net.dropped(0) > 0, "the shaped link lost packets");
    assert_eq!(
        (fleet.net.dropped(1), fleet.net.dropped(2)),
        (0, 0),
        "the other links lost none"
    );
}

/// The slow link: this much each way, every chunk, plus up to 20 ms of jitter.
const SLOW_LINK: Delay = Delay {
    fixed: Duration::from_millis(150),
    jitter: Duration::from_millis(20),
};
/// `min_up_secs` of the slow-link test's health gate.
const SLOW_MIN_UP: u64 = 3;
/// Round trips over the slow link that one host's deploy may take, rollback included:
/// far above what it needs (a connection's TCP, TLS and `Hello`, a ping, the push, the
/// unpack, a stop, a start, and a ping per look while it is verified, each a few).
const SLOW_ROUND_TRIPS: u32 = 200;

/// The bound on a rolling deploy of the slow-link test: a deploy that meets no fault,
/// its health gate's deadline, and [`SLOW_ROUND_TRIPS`] on the slow link.
fn slow_deploy_bound() -> Duration {
    PLAIN_DEPLOY + HEALTH_DEADLINE + SLOW_LINK.most() * 2 * SLOW_ROUND_TRIPS
}

#[test]
fn a_host_behind_a_slow_link_deploys_and_its_health_gate_judges_it_rightly() {
    let test = "a_host_behind_a_slow_link_deploys_and_its_health_gate_judges_it_rightly";
    let Some(mut fleet) = NetFleet::new(test, "slow", 2) else {
        return;
    };
    // The master reaches host 1 through the link: its agent's port and its release's
    // port, both on the bridge's address (the health probe goes where the agent is).
    let link = SlowLink::new(SLOW_LINK);
    let front = IpAddr::V4(fleet.net.bridge_ip());
    let host = IpAddr::V4(fleet.net.host(0).ip);
    let agent = link.route(SocketAddr::new(front, 0), fleet.agents[0].addr);
    let beat = link.route(
        SocketAddr::new(front, BEAT_PORT),
        SocketAddr::new(host, BEAT_PORT),
    );
    fleet.reach_through(0, agent);

    // No false failure: each deploy completes, the slow host verified like the other.
    let group = rolling(0, SLOW_MIN_UP);
    for (revision, version) in [(1, "0.1.0"), (2, "0.2.0")] {
        let archive = beat_release(&fleet.releases(), "beat", version);
        fleet.write_cluster(revision, "beat", version, &archive, &group);
        let deploy = start_deploy(&fleet);
        let (ok, out) = deploy.finish_within(slow_deploy_bound(), || fleet.agent_logs());
        assert!(ok, "{out}\n{}", fleet.agent_logs());
        for id in ["slow-1", "slow-2"] {
            assert!(
                out.contains(&format!("{id}: done, runs {version}")),
                "{out}"
            );
        }
        let beats: Vec<String> = (0..2).map(|i| fleet.beat(i)).collect();
        let expected = ["slow-1", "slow-2"].map(|id| format!("beat {version} {id}"));
        assert_eq!(beats, expected);
    }
    let pushed = link.traffic().upstream_bytes.load(Ordering::Relaxed);
    assert!(pushed > 0, "the deploys went through the link");
    // The link is as slow as it says: the release's answer through it comes after the
    // connection attempt crossed it and the answer crossed back.
    let asked = std::time::Instant::now();
    let answer = read_banner(beat);
    assert_eq!(answer, "beat 0.2.0 slow-1");
    assert!(
        asked.elapsed() >= SLOW_LINK.fixed * 2,
        "{:?}",
        asked.elapsed()
    );

    // No false pass: a release that dies a link's delay short of min_up_secs (its
    // process that old, however late its own start) is failed and rolled back, the
    // group halts, and the other host is not touched.
    let dies_at = Duration::from_secs(SLOW_MIN_UP) - SLOW_LINK.fixed;
    let mode = format!("exit-at-{}", dies_at.as_millis());
    let broken = failing_beat_release(&fleet.releases(), "beat", "0.3.0", &mode);
    fleet.write_cluster(3, "beat", "0.3.0", &broken, &group);
    let second_pids = fleet.agents[1].release_pids("beat");
    let deploy = start_deploy(&fleet);
    let (ok, out) = deploy.finish_within(slow_deploy_bound(), || fleet.agent_logs());
    assert!(!ok, "the release that dies is not passed:\n{out}");
    assert!(
        out.lines()
            .any(|l| l.contains("web/slow-1 (") && l.contains("FAILED while verifying")),
        "{out}"
    );
    assert!(names_the_exit_failure(&out), "{out}");
    assert!(
        out.contains("HALTED") && out.contains("not touched: slow-2"),
        "{out}"
    );
    assert_eq!(fleet.beat(0), "beat 0.2.0 slow-1", "rolled back");
    assert_eq!(fleet.beat(1), "beat 0.2.0 slow-2");
    assert_eq!(fleet.agents[1].release_pids("beat"), second_pids);
}

/// What the beat release at `addr` answers, read to its end (within [`PATIENCE`]).
fn read_banner(addr: SocketAddr) -> String {
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, PATIENCE).expect("connect to the beat");
    stream
        .set_read_timeout(Some(PATIENCE))
        .expect("read timeout");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("read the beat");
    text.trim().to_string()
}
