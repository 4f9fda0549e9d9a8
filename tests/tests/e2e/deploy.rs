//! The rolling cold deploy against real agents: v1 then v2, a repeated deploy that does
//! nothing, a broken release rolled back on the canary while the other hosts keep
//! their processes, `max_in_flight` held, a master killed mid-rollout and run again,
//! an unreachable host reported with its address, and a real OTP release.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use erel_master::client::Connector;
use erel_master::cluster::Plan;
use erel_master::rollout::{
    self, HostFailure, HostOutcome, HostPhase, RolloutEvent, RolloutOptions, RolloutReport,
};
use erel_proto::ReleaseState;

use crate::helper::fleet::Fleet;
use crate::helper::otp::build_release_version;
use crate::helper::release::{beat_release, failing_beat_release, names_the_exit_failure};
use crate::helper::AgentCommands;
use crate::helper::{follow_lines, free_port, output_text, poll_until};

pub(crate) const RELEASE: &str = "beat";

/// What the deploy tests do with a fleet: a cluster file at `cluster.toml` naming archives
/// under `releases/`, and rollouts run in this process.
impl Fleet {
    /// Where the archives go (made on first use).
    pub(crate) fn releases(&self) -> PathBuf {
        let releases = self.dir.path().join("releases");
        std::fs::create_dir_all(&releases).expect("mkdir");
        releases
    }

    pub(crate) fn path(&self) -> PathBuf {
        self.dir.path().join("cluster.toml")
    }

    /// `erel <words> --cluster <this fleet's cluster file>`.
    pub(crate) fn erel(&self, words: &[&str]) -> Command {
        let mut erel = self.pki.erel();
        erel.args(words).arg("--cluster").arg(self.path());
        erel
    }

    /// Writes the cluster file: every agent in group `web` running `version` from
    /// `releases/<archive file name>`, with `group` lines added to the group.
    pub(crate) fn write_cluster(
        &self,
        revision: u64,
        version: &str,
        archive: &Path,
        group: &str,
    ) -> PathBuf {
        self.write_cluster_with(revision, version, archive, group, &[])
    }

    fn write_cluster_with(
        &self,
        revision: u64,
        version: &str,
        archive: &Path,
        group: &str,
        extra_hosts: &[(&str, String)],
    ) -> PathBuf {
        let mut text = format!("revision = {revision}\n");
        text.push_str(&self.hosts_toml("BEAT_PORT"));
        for (id, addr) in extra_hosts {
            text.push_str(&format!(
                "[[host]]\nid = \"{id}\"\naddr = \"{addr}\"\ngroup = \"web\"\nenv = {{ BEAT_PORT = \"{}\" }}\n",
                free_port()
            ));
        }
        let name = archive.file_name().expect("file name").to_string_lossy();
        text.push_str(&format!(
            "[group.web]\nrelease = \"{RELEASE}\"\nversion = \"{version}\"\narchive = \"releases/{name}\"\n\
             stop_grace_secs = 5\n{group}\n"
        ));
        let path = self.path();
        std::fs::write(&path, text).expect("write cluster file");
        path
    }

    fn connector(&self) -> Connector {
        Connector::new(self.pki.client_config(), "test-master")
    }

    /// Runs a rollout in this process, recording every event with its time.
    async fn rollout(&self) -> (RolloutReport, Vec<(Instant, RolloutEvent)>) {
        let plan = Plan::load(&self.path()).expect("valid cluster file");
        let options = RolloutOptions {
            poll_interval: Duration::from_millis(100),
            ..RolloutOptions::default()
        };
        let mut events = Vec::new();
        let report = rollout::run(&plan, &self.connector(), &options, |event| {
            events.push((Instant::now(), event.clone()))
        })
        .await
        .expect("rollout runs");
        (report, events)
    }
}

const FAST_HEALTH: &str = "health = { tcp = \"$BEAT_PORT\", min_up_secs = 1, deadline_secs = 15 }";

pub(crate) fn group(max_in_flight: usize, canaries: usize) -> String {
    format!("max_in_flight = {max_in_flight}\ncanaries = {canaries}\n{FAST_HEALTH}")
}

/// Runs the real `erel deploy`; (success, stdout + stderr).
fn erel_deploy(fleet: &Fleet, extra: &[&str]) -> (bool, String) {
    let out = fleet
        .erel(&["deploy"])
        .args(extra)
        .output()
        .expect("run erel deploy");
    let text = output_text(&out);
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploys_v1_then_v2_and_a_repeat_does_nothing() {
    let (fleet, v2) = fleet_with_v1_v2("roll", 3, &group(1, 1));
    let (ok, out) = erel_deploy(&fleet, &["--dry-run"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("canary") && out.contains("releases/beat/0.1.0"),
        "{out}"
    );
    assert!(
        fleet
            .running(RELEASE)
            .await
            .iter()
            .all(|(v, _)| v.is_none()),
        "dry run touches nothing"
    );

    let (ok, out) = erel_deploy(&fleet, &[]);
    assert!(ok, "deploy v1 failed:\n{out}\n{}", fleet.agent_logs());
    assert!(out.contains("every host runs its desired version"), "{out}");
    assert!(
        !out.lines().any(|l| l.ends_with(": stopping")),
        "a first install has nothing to stop:\n{out}"
    );
    assert_eq!(
        out.lines().filter(|l| l.ends_with(": starting")).count(),
        3,
        "each host starts the release:\n{out}"
    );
    fleet.expect_beats("0.1.0");

    fleet.write_cluster(2, "0.2.0", &v2, &group(1, 1));
    let (ok, out) = erel_deploy(&fleet, &[]);
    assert!(ok, "deploy v2 failed:\n{out}\n{}", fleet.agent_logs());
    assert_eq!(out.matches("switched from 0.1.0").count(), 3, "{out}");
    assert_eq!(
        out.lines().filter(|l| l.ends_with(": stopping")).count(),
        3,
        "each switch stops the old version:\n{out}"
    );
    fleet.expect_beats("0.2.0");
    for (version, state) in fleet.running(RELEASE).await {
        assert_eq!(version.as_deref(), Some("0.2.0"));
        assert_eq!(state, ReleaseState::Running);
    }

    let pids: Vec<Vec<i32>> = fleet.release_pids(RELEASE);
    let (ok, out) = erel_deploy(&fleet, &[]);
    assert!(ok, "{out}");
    assert_eq!(out.matches(": up to date, runs 0.2.0").count(), 3, "{out}");
    assert!(out.contains("0 switched, 3 already up to date"), "{out}");
    assert!(
        !out.lines().any(|l| l.ends_with(": stopping")),
        "a repeated deploy stops nothing:\n{out}"
    );
    let again: Vec<Vec<i32>> = fleet.release_pids(RELEASE);
    assert_eq!(pids, again, "no process was replaced");

    let status = fleet.erel(&["status", "--json"]).output().expect("status");
    assert!(status.status.success());
    let rows: serde_json::Value = serde_json::from_slice(&status.stdout).expect("json");
    let rows = rows.as_array().expect("array");
    assert_eq!(rows.len(), 3);
    for row in rows {
        assert_eq!(row["running_version"], "0.2.0");
        assert_eq!(row["state"], "running");
        assert_eq!(row["converged"], true);
    }

    // A HOST argument may be an id from the cluster file.
    let ping = fleet.erel(&["ping", "roll-2"]).output().expect("ping");
    let text = String::from_utf8_lossy(&ping.stdout);
    assert!(
        ping.status.success() && text.contains("beat 0.2.0 running"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_release_is_rolled_back_on_the_canary_and_nothing_else_is_touched() {
    let fleet = Fleet::new("canary", &["web"; 3]);
    let v1 = beat_release(&fleet.releases(), RELEASE, "0.1.0");
    let broken = failing_beat_release(&fleet.releases(), RELEASE, "0.2.0", "exit");
    fleet.write_cluster(1, "0.1.0", &v1, &group(2, 1));
    let (report, _) = fleet.rollout().await;
    assert!(report.converged(), "{report:?}\n{}", fleet.agent_logs());
    let before: Vec<Vec<i32>> = fleet.release_pids(RELEASE);
    assert!(before.iter().all(|p| !p.is_empty()));

    fleet.write_cluster(2, "0.2.0", &broken, &group(2, 1));
    let (report, events) = fleet.rollout().await;
    assert!(!report.converged());
    let group = &report.groups[0];
    assert!(group.halted.is_some(), "{group:?}");
    match &group.hosts[0].outcome {
        HostOutcome::Failed(HostFailure {
            reason,
            output_tail,
            rolled_back,
            ..
        }) => {
            assert!(rolled_back, "{reason}");
            assert!(names_the_exit_failure(reason), "{reason}");
            assert!(
                output_tail.contains("failing on purpose"),
                "the release's own output: {output_tail:?}"
            );
        }
        other => panic!("the canary should fail: {other:?}"),
    }
    for host in &group.hosts[1..] {
        assert_eq!(host.outcome, HostOutcome::Untouched, "{}", host.host);
    }
    // Only the canary was ever stopped.
    let stopped: BTreeSet<&str> = events
        .iter()
        .filter_map(|(_, e)| match e {
            RolloutEvent::HostPhase {
                host,
                phase: HostPhase::Stopping,
                ..
            } => Some(host.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(stopped, BTreeSet::from(["canary-1"]));
    assert!(events.iter().any(|(_, e)| matches!(
        e,
        RolloutEvent::HostFailed {
            failure: HostFailure {
                rolled_back: true,
                ..
            },
            ..
        }
    )));

    let after: Vec<Vec<i32>> = fleet.release_pids(RELEASE);
    assert_eq!(
        after[1..],
        before[1..],
        "the other hosts kept their processes"
    );
    assert_ne!(
        after[0], before[0],
        "the canary runs a restarted old version"
    );
    fleet.expect_beats("0.1.0");
    for (version, state) in fleet.running(RELEASE).await {
        assert_eq!(version.as_deref(), Some("0.1.0"));
        assert_eq!(state, ReleaseState::Running);
    }

    // The CLI says the same, with the release's output, and fails.
    let (ok, out) = erel_deploy(&fleet, &[]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("rolled back") && out.contains("failing on purpose"),
        "{out}"
    );
    assert!(out.contains("not touched"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_env_too_large_for_a_frame_is_refused_before_anything_is_stopped() {
    let (fleet, v2) = fleet_with_v1_v2("frame", 1, &group(1, 1));
    let (ok, out) = erel_deploy(&fleet, &[]);
    assert!(ok, "deploy v1 failed:\n{out}\n{}", fleet.agent_logs());
    let pids = fleet.release_pids(RELEASE);

    let big = "x".repeat(70_000);
    let gate = format!("{}\nenv = {{ BIG = \"{big}\" }}", group(1, 1));
    fleet.write_cluster(2, "0.2.0", &v2, &gate);
    let (ok, out) = erel_deploy(&fleet, &[]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("cluster.toml")
            && out.contains("group.web.env.BIG")
            && out.contains("on host 'frame-1'")
            && out.contains("65536-byte frame limit"),
        "the refusal names the file, field, host and limit:\n{out}"
    );
    assert!(!out.contains(": stopping"), "{out}");
    assert_eq!(fleet.release_pids(RELEASE), pids, "nothing was replaced");
    for (version, state) in fleet.running(RELEASE).await {
        assert_eq!(version.as_deref(), Some("0.1.0"));
        assert_eq!(state, ReleaseState::Running);
    }
}

/// A fleet `name` of `hosts` web hosts with the beat release 0.1.0 and 0.2.0 in
/// its directory and a cluster file (revision 1) that runs 0.1.0 under `gate`; and
/// the 0.2.0 archive.
/// How many times `erel deploy`'s log (at `debug` for the digest cache's module) says
/// it read the archive `name`: (in all, hashing it, to send it).
fn archive_reads(log: &str, name: &str) -> (usize, usize, usize) {
    let reads: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("local file read") && l.contains(name))
        .collect();
    (
        reads.len(),
        reads.iter().filter(|l| l.contains("hashed=true")).count(),
        reads
            .iter()
            .filter(|l| l.contains("why=\"to send\""))
            .count(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_hashes_its_archive_once_whatever_the_number_of_hosts() {
    const HOSTS: usize = 4;
    let (fleet, _) = fleet_with_v1_v2("hashonce", HOSTS, &group(HOSTS, 1));
    let name = "beat-0.1.0.tar.gz";
    let deploy = || {
        let out = fleet
            .erel(&["deploy"])
            .env(
                "EREL_LOG",
                "erel_master=warn,erel_master::digest_cache=debug",
            )
            .output()
            .expect("run erel deploy");
        let text = output_text(&out);
        assert!(
            out.status.success(),
            "deploy failed:\n{text}\n{}",
            fleet.agent_logs()
        );
        text
    };
    let out = deploy();
    fleet.expect_beats("0.1.0");
    assert_eq!(
        archive_reads(&out, name),
        (2, 1, 1),
        "the archive is read and hashed once when the cluster file is loaded (its \
         versions listed on the way), then read once more for the {HOSTS} hosts' pushes \
         together, never hashed again:\n{out}"
    );
    // That one read took the archive from disk once, not once per host.
    let size = std::fs::metadata(fleet.releases().join(name))
        .expect("the archive")
        .len();
    assert!(
        out.lines().any(|l| l.contains("local file read")
            && l.contains(name)
            && l.contains("why=\"to send\"")
            && l.contains(&format!("bytes={size} "))),
        "the pushes read {size} bytes in all:\n{out}"
    );
    // Every host holds it: nothing is sent again, and it is still hashed only once.
    let out = deploy();
    assert_eq!(archive_reads(&out, name), (1, 1, 0), "{out}");
}

fn fleet_with_v1_v2(name: &str, hosts: usize, gate: &str) -> (Fleet, PathBuf) {
    let fleet = Fleet::new(name, &vec!["web"; hosts]);
    let v1 = beat_release(&fleet.releases(), RELEASE, "0.1.0");
    let v2 = beat_release(&fleet.releases(), RELEASE, "0.2.0");
    fleet.write_cluster(1, "0.1.0", &v1, gate);
    (fleet, v2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_in_flight_bounds_the_hosts_down_at_once() {
    let (fleet, v2) = fleet_with_v1_v2("flight", 5, &group(2, 1));
    let (report, _) = fleet.rollout().await;
    assert!(report.converged(), "{report:?}");

    // Sample, besides the events: hosts whose release is not answering. A sample, not a
    // wait: the events are the check, and the sampler can only under-count, so its
    // period sets how likely it is to catch a third host down, not whether the test
    // passes. A connect on loopback is answered or refused at once; the probe's bound
    // only covers a port that does neither.
    const SAMPLE_EVERY: Duration = Duration::from_millis(10);
    const PROBE_TIMEOUT: Duration = Duration::from_millis(200);
    let ports = fleet.ports.clone();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let most_down = Arc::new(Mutex::new(0usize));
    let sampler = {
        let done = done.clone();
        let most_down = most_down.clone();
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let down = ports
                    .iter()
                    .filter(|p| {
                        std::net::TcpStream::connect_timeout(
                            &std::net::SocketAddr::from(([127, 0, 0, 1], **p)),
                            PROBE_TIMEOUT,
                        )
                        .is_err()
                    })
                    .count();
                let mut most = most_down.lock().expect("lock");
                *most = (*most).max(down);
                drop(most);
                std::thread::sleep(SAMPLE_EVERY);
            }
        })
    };
    fleet.write_cluster(2, "0.2.0", &v2, &group(2, 1));
    let (report, events) = fleet.rollout().await;
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    sampler.join().expect("sampler");
    assert!(report.converged(), "{report:?}\n{}", fleet.agent_logs());
    assert_eq!(report.switched(), 5);

    // From the events: a host is down from Stopping until HostDone.
    let mut down: BTreeSet<String> = BTreeSet::new();
    let mut most = 0;
    let mut first_done: Option<String> = None;
    let mut stopped_before_canary_done = 0;
    let mut staging_before_canary_staged = BTreeSet::new();
    let mut canary_staged = false;
    for (_, event) in &events {
        match event {
            RolloutEvent::HostPhase {
                host,
                phase: HostPhase::Staging,
                ..
            } if !canary_staged => {
                staging_before_canary_staged.insert(host.clone());
            }
            RolloutEvent::HostPhase {
                host,
                phase: HostPhase::Staged,
                ..
            } if host == "flight-1" => canary_staged = true,
            RolloutEvent::HostPhase {
                host,
                phase: HostPhase::Stopping,
                ..
            } => {
                down.insert(host.clone());
                if first_done.is_none() {
                    stopped_before_canary_done += 1;
                }
            }
            RolloutEvent::HostDone { host, .. } => {
                down.remove(host);
                first_done.get_or_insert_with(|| host.clone());
            }
            _ => {}
        }
        most = most.max(down.len());
    }
    assert_eq!(most, 2, "max_in_flight 2 is used and never exceeded");
    assert_eq!(stopped_before_canary_done, 1, "the canary goes alone");
    assert_eq!(
        staging_before_canary_staged,
        BTreeSet::from(["flight-1".to_string()]),
        "the canary is staged first and alone"
    );
    assert_eq!(first_done.as_deref(), Some("flight-1"));
    let sampled = *most_down.lock().expect("lock");
    assert!(sampled <= 2, "sampled {sampled} hosts down at once");
    fleet.expect_beats("0.2.0");
}

/// The canary's staging fails (its agent cannot take the archive: a directory stands
/// where it goes): the group halts with the reason, before any host is stopped, and the
/// other hosts, whose staging waited for the canary's, are not touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_that_cannot_be_staged_halts_the_group_before_anything_is_stopped() {
    let (fleet, v2) = fleet_with_v1_v2("unstaged", 4, &group(2, 1));
    let (report, _) = fleet.rollout().await;
    assert!(report.converged(), "{report:?}\n{}", fleet.agent_logs());
    let before: Vec<Vec<i32>> = fleet.release_pids(RELEASE);
    let name = v2.file_name().expect("archive name");
    std::fs::create_dir_all(fleet.agents[0].root.join("archives").join(name))
        .expect("a directory where the canary's archive goes");

    fleet.write_cluster(2, "0.2.0", &v2, &group(2, 1));
    let (report, events) = fleet.rollout().await;
    assert!(!report.converged(), "{report:?}");
    let group = &report.groups[0];
    assert!(group.halted.is_some(), "{group:?}");
    match &group.hosts[0].outcome {
        HostOutcome::Failed(HostFailure { reason, .. }) => {
            assert!(reason.contains("is a directory"), "{reason}");
        }
        other => panic!("the canary should fail: {other:?}"),
    }
    for host in &group.hosts[1..] {
        assert_eq!(host.outcome, HostOutcome::Untouched, "{}", host.host);
    }
    let stopped = events.iter().any(|(_, e)| {
        matches!(
            e,
            RolloutEvent::HostPhase {
                phase: HostPhase::Stopping,
                ..
            }
        )
    });
    assert!(!stopped, "no host is stopped: {events:?}");
    assert_eq!(
        fleet.release_pids(RELEASE),
        before,
        "every host kept its process"
    );
    fleet.expect_beats("0.1.0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_mid_rollout_finishes_when_run_again() {
    let (fleet, v2) = fleet_with_v1_v2("killed", 3, &group(1, 1));
    let (report, _) = fleet.rollout().await;
    assert!(report.converged(), "{report:?}");

    fleet.write_cluster(2, "0.2.0", &v2, &group(1, 1));
    let mut child = fleet
        .erel(&["deploy"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn erel deploy");
    let stdout = child.stdout.take().expect("stdout");
    let mut seen = String::new();
    let mut killed = false;
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("done, runs 0.2.0") {
            child.kill().expect("kill the master");
            killed = true;
            break;
        }
    }
    let _ = child.wait();
    assert!(killed, "the first host never switched:\n{seen}");
    let running = fleet.running(RELEASE).await;
    assert_eq!(running[0].0.as_deref(), Some("0.2.0"), "{running:?}");
    assert!(
        running[1..]
            .iter()
            .any(|(v, _)| v.as_deref() != Some("0.2.0")),
        "killed before the end: {running:?}"
    );

    let (ok, out) = erel_deploy(&fleet, &[]);
    assert!(
        ok,
        "the second run finishes:\n{out}\n{}",
        fleet.agent_logs()
    );
    assert!(out.contains("killed-1: up to date"), "{out}");
    fleet.expect_beats("0.2.0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_host_is_reported_with_its_address() {
    let fleet = Fleet::new("reach", &["web"; 2]);
    let v1 = beat_release(&fleet.releases(), RELEASE, "0.1.0");
    let dead = format!("127.0.0.1:{}", free_port());
    fleet.write_cluster_with(1, "0.1.0", &v1, &group(1, 1), &[("reach-9", dead.clone())]);
    let started = Instant::now();
    let (ok, out) = erel_deploy(&fleet, &["--connect-timeout", "2"]);
    assert!(!ok, "{out}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "not waited on forever"
    );
    assert!(out.contains("reach-9") && out.contains(&dead), "{out}");
    assert!(out.contains("unreachable"), "{out}");
    // The group halted before any host was switched.
    assert!(!out.lines().any(|l| l.ends_with(": stopping")), "{out}");
    assert!(fleet
        .agents
        .iter()
        .all(|a| a.release_pids(RELEASE).is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_host_that_does_not_answer_fails_the_deploy() {
    let fleet = Fleet::new("idle", &["web"]);
    let v1 = beat_release(&fleet.releases(), RELEASE, "0.1.0");
    fleet.write_cluster(1, "0.1.0", &v1, &group(1, 1));
    let (ok, out) = erel_deploy(&fleet, &[]);
    assert!(ok, "deploy v1 failed:\n{out}\n{}", fleet.agent_logs());
    let pids = fleet.release_pids(RELEASE);

    // The group is removed; every host is waiting, and idle-9 does not answer.
    let dead = format!("127.0.0.1:{}", free_port());
    let agent = &fleet.agents[0];
    let text = format!(
        "revision = 2\n[[host]]\nid = \"{}\"\naddr = \"{}\"\n[[host]]\nid = \"idle-9\"\naddr = \"{dead}\"\n",
        agent.id, agent.addr
    );
    std::fs::write(fleet.path(), text).expect("write cluster file");
    let (ok, out) = erel_deploy(&fleet, &["--connect-timeout", "2"]);
    assert!(!ok, "an unanswered host is a failure:\n{out}");
    assert!(
        out.contains("idle-9") && out.contains(&dead) && out.contains("unreachable"),
        "{out}"
    );
    assert!(
        !out.contains("every host runs its desired version"),
        "{out}"
    );
    assert!(
        out.lines()
            .last()
            .is_some_and(|l| l.contains("NOT converged") && l.contains("idle-9")),
        "{out}"
    );
    // A release no group names is never touched.
    assert_eq!(fleet.release_pids(RELEASE), pids);

    // Once the dead host leaves the file, the same deploy is a success.
    let text = format!(
        "revision = 3\n[[host]]\nid = \"{}\"\naddr = \"{}\"\n",
        agent.id, agent.addr
    );
    std::fs::write(fleet.path(), text).expect("write cluster file");
    let (ok, out) = erel_deploy(&fleet, &[]);
    assert!(ok, "{out}");
}

/// The OTP app's start/2 also serves TCP on `$HEALTH_PORT`, for the health probe.
fn otp_app(name: &str) -> String {
    format!(
        r#"-module({name}_app).
-behaviour(application).
-export([start/2, stop/1]).

start(_StartType, _StartArgs) ->
    Port = list_to_integer(os:getenv("HEALTH_PORT", "0")),
    Self = self(),
    spawn(fun() ->
        {{ok, Listen}} = gen_tcp:listen(Port, [binary, {{reuseaddr, true}}, {{ip, {{127,0,0,1}}}}, {{active, false}}]),
        Self ! listening,
        accept(Listen)
    end),
    receive listening -> ok after 5000 -> ok end,
    {name}_sup:start_link().

accept(Listen) ->
    {{ok, Socket}} = gen_tcp:accept(Listen),
    gen_tcp:send(Socket, atom_to_list(node())),
    gen_tcp:close(Socket),
    accept(Listen).

stop(_State) ->
    ok.
"#
    )
}

/// Builds the OTP release `name` `version` (node `<name>_<host id>`, cookie `cookie`)
/// into the fleet's `releases/<name>-<version>.tar.gz`.
async fn build_otp_archive(fleet: &Fleet, name: &'static str, version: &str, cookie: &str) {
    let build_dir = fleet.dir.path().join(format!("build-{version}"));
    std::fs::create_dir(&build_dir).expect("mkdir");
    let files = vec![(format!("apps/{name}/src/{name}_app.erl"), otp_app(name))];
    let vm_args = format!("-sname {name}_${{EREL_HOST_ID}}\n-setcookie {cookie}\n");
    let owned = version.to_string();
    let tarball = tokio::task::spawn_blocking(move || {
        build_release_version(&build_dir, name, &owned, Some(&vm_args), &files)
    })
    .await
    .expect("build");
    let archive = fleet.releases().join(format!("{name}-{version}.tar.gz"));
    std::fs::copy(&tarball, &archive).expect("copy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_otp_release_rolls_out_with_a_tcp_health_check() {
    let name = "ereldeploy";
    let fleet = Fleet::new("otp", &["otp"; 3]);
    build_otp_archive(&fleet, name, "0.1.0", "erel_e2e").await;

    let mut text = "revision = 1\n".to_string();
    text.push_str(&fleet.hosts_toml("HEALTH_PORT"));
    text.push_str(&format!(
        "[group.otp]\nrelease = \"{name}\"\nversion = \"0.1.0\"\narchive = \"releases/{name}-0.1.0.tar.gz\"\n\
         argv = [\"bin/{name}\", \"foreground\"]\nmax_in_flight = 1\ncanaries = 1\nstop_grace_secs = 30\n\
         health = {{ tcp = \"$HEALTH_PORT\", min_up_secs = 2, deadline_secs = 60 }}\n"
    ));
    std::fs::write(fleet.path(), text).expect("write cluster");

    let (ok, out) = erel_deploy(&fleet, &[]);
    assert!(ok, "OTP deploy failed:\n{out}\n{}", fleet.agent_logs());
    assert_eq!(out.matches("switched from nothing").count(), 3, "{out}");

    // Each node answers its health port with its own, distinct node name.
    let names: Vec<String> = fleet.beats();
    for (agent, node) in fleet.agents.iter().zip(&names) {
        assert!(
            node.starts_with(&format!("ereldeploy_{}@", agent.id)),
            "{}: {node:?}",
            agent.id
        );
    }
    let distinct: BTreeSet<&String> = names.iter().collect();
    assert_eq!(distinct.len(), 3);

    let (ok, out) = erel_deploy(&fleet, &[]);
    assert!(
        ok && out.matches(": up to date, runs 0.1.0").count() == 3,
        "{out}"
    );

    for agent in &fleet.agents {
        let mut client = fleet.pki.connect(agent).await;
        let stopped = client
            .stop(name, Duration::from_secs(30))
            .await
            .expect("stop");
        assert!(stopped.was_running);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_converges_repairs_drift_follows_revisions_and_stops_on_sigterm() {
    let (fleet, v2) = fleet_with_v1_v2("daemon", 2, &group(1, 1));
    let log = Arc::new(Mutex::new(String::new()));
    let mut child = fleet
        .erel(&["master", "--interval", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn erel master");
    let stderr = child.stderr.take().expect("stderr");
    let reader = follow_lines(stderr, log.clone(), |_| {});
    let beats_are = |version: &'static str| {
        let expected = fleet.beats_of(version);
        let fleet = &fleet;
        move || {
            let ok = fleet.beats() == expected;
            async move { ok }
        }
    };
    let log_text = || log.lock().expect("lock").clone();

    assert!(
        crate::helper::wait_until(Duration::from_secs(30), beats_are("0.1.0")).await,
        "never converged to 0.1.0:\n{}",
        log_text()
    );

    // Drift: a release stopped by hand comes back.
    let mut client = fleet.pki.connect(&fleet.agents[0]).await;
    client
        .stop(RELEASE, Duration::from_secs(5))
        .await
        .expect("stop by hand");
    assert!(fleet.beats()[0].is_empty(), "stopped");
    assert!(
        crate::helper::wait_until(Duration::from_secs(30), beats_are("0.1.0")).await,
        "drift not repaired:\n{}",
        log_text()
    );

    // A newer revision is picked up.
    fleet.write_cluster(2, "0.2.0", &v2, &group(1, 1));
    assert!(
        crate::helper::wait_until(Duration::from_secs(30), beats_are("0.2.0")).await,
        "revision 2 not applied:\n{}",
        log_text()
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let status = poll_until(Duration::from_secs(20), || {
        std::future::ready(child.try_wait().expect("wait"))
    })
    .await
    .expect("the daemon ignored SIGTERM");
    let _ = reader.join();
    let text = log_text();
    assert!(status.success(), "{status:?}\n{text}");
    let names_the_revision = text.contains("revision=2") || text.contains("revision 2");
    assert!(names_the_revision, "{text}");
    let done = text.contains("done, runs 0.2.0");
    assert!(done, "logs what it does:\n{text}");
    fleet.expect_beats("0.2.0");
}

/// Runs a rollout of the current cluster file, timestamping events as they happen.
async fn timed_rollout(fleet: &Fleet) -> (RolloutReport, Vec<(Instant, RolloutEvent)>, Duration) {
    let plan = Plan::load(&fleet.path()).expect("valid cluster file");
    let mut events = Vec::new();
    let options = RolloutOptions {
        poll_interval: Duration::from_millis(50),
        ..RolloutOptions::default()
    };
    let started = Instant::now();
    let report = rollout::run(&plan, &fleet.connector(), &options, |event| {
        events.push((Instant::now(), event.clone()))
    })
    .await
    .expect("rollout");
    let took = started.elapsed();
    (report, events, took)
}

/// Per host: time from `Stopping` to `HostDone`.
fn downtimes(events: &[(Instant, RolloutEvent)]) -> Vec<Duration> {
    let mut stopped = std::collections::HashMap::new();
    let mut out = Vec::new();
    for (at, event) in events {
        match event {
            RolloutEvent::HostPhase {
                host,
                phase: HostPhase::Stopping,
                ..
            } => {
                stopped.insert(host.clone(), *at);
            }
            RolloutEvent::HostDone { host, .. } => {
                if let Some(from) = stopped.get(host) {
                    out.push(*at - *from);
                }
            }
            _ => {}
        }
    }
    out
}

fn millis(d: &[Duration]) -> String {
    let ms: Vec<String> = d.iter().map(|d| format!("{}", d.as_millis())).collect();
    let mean = d.iter().map(Duration::as_secs_f64).sum::<f64>() / d.len().max(1) as f64;
    format!("mean {:.0} ms ({} ms)", mean * 1000.0, ms.join(", "))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: cargo test --release -p erel-tests --test e2e bench_ -- --ignored --nocapture"]
async fn bench_cold_replacement_and_rolling_deploys() {
    // Cold replacement of one host, beat release (min_up_secs = 0: healthy as soon as it
    // runs and its TCP port answers).
    let fleet = Fleet::new("bench", &["web"; 1]);
    let gate = "max_in_flight = 1\ncanaries = 1\nhealth = { tcp = \"$BEAT_PORT\", min_up_secs = 0, deadline_secs = 30 }";
    let mut samples = Vec::new();
    for round in 0..6u64 {
        let version = format!("1.0.{round}");
        let archive = beat_release(&fleet.releases(), RELEASE, &version);
        fleet.write_cluster(round + 1, &version, &archive, gate);
        let (report, events, _) = timed_rollout(&fleet).await;
        assert!(report.converged(), "{report:?}");
        if round > 0 {
            samples.extend(downtimes(&events));
        }
    }
    println!(
        "BENCH cold replacement, beat release (stop -> healthy): {}",
        millis(&samples)
    );
    drop(fleet);

    // Cold replacement of one host, a real OTP release (one rebar3 release per
    // version, each built before the rounds; healthy when its TCP listener answers).
    let name = "erelbench";
    let fleet = Fleet::new("benchotp", &["otp"; 1]);
    let versions: Vec<String> = (0..4u64).map(|round| format!("0.1.{round}")).collect();
    for version in &versions {
        build_otp_archive(&fleet, name, version, "erel_bench").await;
    }
    let mut samples = Vec::new();
    for (round, version) in (0u64..).zip(&versions) {
        let mut text = format!("revision = {}\n", round + 1);
        text.push_str(&fleet.hosts_toml("HEALTH_PORT"));
        text.push_str(&format!(
            "[group.otp]\nrelease = \"{name}\"\nversion = \"{version}\"\narchive = \"releases/{name}-{version}.tar.gz\"\n\
             argv = [\"bin/{name}\", \"foreground\"]\nstop_grace_secs = 30\n\
             health = {{ tcp = \"$HEALTH_PORT\", min_up_secs = 0, deadline_secs = 60 }}\n"
        ));
        std::fs::write(fleet.path(), text).expect("write");
        let (report, events, _) = timed_rollout(&fleet).await;
        assert!(report.converged(), "{report:?}\n{}", fleet.agent_logs());
        if round > 0 {
            samples.extend(downtimes(&events));
        }
    }
    println!(
        "BENCH cold replacement, OTP release (stop -> healthy): {}",
        millis(&samples)
    );
    let mut client = fleet.pki.connect(&fleet.agents[0]).await;
    let _ = client.stop(name, Duration::from_secs(30)).await;
    drop(fleet);

    // Rolling deploys across 20 agents.
    let fleet = Fleet::new("fleet", &["web"; 20]);
    let v0 = beat_release(&fleet.releases(), RELEASE, "2.0.0");
    fleet.write_cluster(1, "2.0.0", &v0, &group(20, 1));
    let (report, _, took) = timed_rollout(&fleet).await;
    assert!(report.converged(), "{report:?}");
    println!(
        "BENCH first deploy to 20 agents (push + unpack + start, max_in_flight 20): {:.2} s",
        took.as_secs_f64()
    );
    for (round, max) in [1usize, 5, 20].into_iter().enumerate() {
        let version = format!("2.0.{}", round + 1);
        let archive = beat_release(&fleet.releases(), RELEASE, &version);
        fleet.write_cluster(round as u64 + 2, &version, &archive, &group(max, 1));
        let (report, events, took) = timed_rollout(&fleet).await;
        assert!(report.converged(), "{report:?}");
        assert_eq!(report.switched(), 20);
        let down = downtimes(&events);
        let most = down.iter().max().copied().unwrap_or_default();
        println!(
            "BENCH rolling deploy, 20 agents, max_in_flight {max:>2}, 1 canary, min_up_secs 1: {:.2} s total; per-host downtime max {} ms",
            took.as_secs_f64(),
            most.as_millis()
        );
    }
}
