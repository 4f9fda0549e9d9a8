//! A group's lifecycle against real agents: a failure budget that lets a group go on
//! past a dead host, host selection, releases stopped when they leave the config, and
//! `erel restart`, `erel stop` and `erel rollback` on a group, beside their one-host
//! forms.

use std::path::PathBuf;
use std::time::Duration;

use erel_proto::ReleaseState;

use crate::helper::fleet::Fleet;
use crate::helper::install::{install_and_start, release_status};
use crate::helper::release::{beat_release, failing_beat_release};
use crate::helper::{free_port, output_text, wait_until, Followed, PATIENCE};

const RELEASE: &str = "beat";
/// A gate quick enough for tests: up one second, the release's own port answering.
const GATE: &str = "health = { tcp = \"$BEAT_PORT\", min_up_secs = 1, deadline_secs = 15 }";

/// A fleet of `hosts` agents `<name>-<i>` in group `web`, with beat 0.1.0 and 0.2.0
/// built beside its cluster file.
fn fleet(name: &str, hosts: usize) -> Fleet {
    let fleet = Fleet::new(name, &vec!["web"; hosts]);
    let releases = fleet.dir.path().join("releases");
    std::fs::create_dir_all(&releases).expect("mkdir");
    beat_release(&releases, RELEASE, "0.1.0");
    beat_release(&releases, RELEASE, "0.2.0");
    fleet
}

fn cluster_path(fleet: &Fleet) -> PathBuf {
    fleet.dir.path().join("cluster.toml")
}

/// Writes the cluster file: the fleet's hosts (each in the group the fleet gives it),
/// `extra` verbatim (more hosts, more groups), and group `web` running `version` with
/// `lines` added.
fn write_cluster(fleet: &Fleet, revision: u64, version: &str, lines: &str, extra: &str) {
    let text = format!(
        "revision = {revision}\n{}{extra}\n[group.web]\nrelease = \"{RELEASE}\"\nversion = \"{version}\"\n\
         archive = \"releases/{RELEASE}-{version}.tar.gz\"\nstop_grace_secs = 5\n{GATE}\n{lines}\n",
        fleet.hosts_toml("BEAT_PORT")
    );
    std::fs::write(cluster_path(fleet), text).expect("write cluster file");
}

/// Runs `erel <words> --cluster <the fleet's file>`; (success, stdout + stderr).
fn erel(fleet: &Fleet, words: &[&str]) -> (bool, String) {
    let out = fleet
        .pki
        .erel()
        .args(words)
        .arg("--cluster")
        .arg(cluster_path(fleet))
        .output()
        .expect("run erel");
    (out.status.success(), output_text(&out))
}

/// What each host's beat answers: `beat <version> <id>`, or "" when it is down.
fn answers(fleet: &Fleet) -> Vec<String> {
    fleet.beats()
}

fn runs(fleet: &Fleet, host: usize, version: &str) -> String {
    format!("beat {version} {}", fleet.agents[host].id)
}

/// Runs `erel <words> --cluster <the fleet's file>`, which must succeed; its stdout +
/// stderr.
fn erel_ok(fleet: &Fleet, words: &[&str]) -> String {
    let (ok, out) = erel(fleet, words);
    assert!(ok, "{out}\n{}", fleet.agent_logs());
    out
}

/// Deploys `version` to every host and checks it is answered everywhere.
fn deploy_all(fleet: &Fleet, revision: u64, version: &str) {
    write_cluster(fleet, revision, version, "", "");
    erel_ok(fleet, &["deploy"]);
    fleet.expect_beats(version);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_dead_host_within_max_failed_does_not_block_its_group() {
    let fleet = fleet("budget", 3);
    let dead = format!("127.0.0.1:{}", free_port());
    let dead_host = format!(
        "[[host]]\nid = \"budget-9\"\naddr = \"{dead}\"\ngroup = \"web\"\nenv = {{ BEAT_PORT = \"{}\" }}\n",
        free_port()
    );

    // Without a budget, the dead host halts the group before any host is touched.
    write_cluster(&fleet, 1, "0.1.0", "", &dead_host);
    let (ok, out) = erel(&fleet, &["deploy", "--connect-timeout", "2"]);
    assert!(!ok, "{out}");
    assert!(out.contains("HALTED") && out.contains("budget-9"), "{out}");
    assert_eq!(answers(&fleet), vec![""; 3], "nothing started");

    // With max_failed = 1 the others are deployed and the dead host reported failed.
    write_cluster(&fleet, 2, "0.1.0", "max_failed = 1", &dead_host);
    let (ok, out) = erel(&fleet, &["deploy", "--connect-timeout", "2"]);
    assert!(!ok, "not every host runs its version: {out}");
    assert!(!out.contains("HALTED"), "{out}");
    assert!(
        out.contains("budget-9") && out.contains(&dead) && out.contains("unreachable"),
        "{out}"
    );
    fleet.expect_beats("0.1.0");

    // The budget is spent by dead hosts too: two of them with max_failed = 1 halt.
    let second = format!(
        "[[host]]\nid = \"budget-8\"\naddr = \"127.0.0.1:{}\"\ngroup = \"web\"\nenv = {{ BEAT_PORT = \"{}\" }}\n",
        free_port(),
        free_port()
    );
    write_cluster(
        &fleet,
        3,
        "0.2.0",
        "max_failed = 1",
        &format!("{dead_host}{second}"),
    );
    let (ok, out) = erel(&fleet, &["deploy", "--connect-timeout", "2"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("HALTED") && out.contains("max_failed = 1"),
        "{out}"
    );
    fleet.expect_beats("0.1.0");

    // Leaving the dead hosts out, the group converges.
    erel_ok(
        &fleet,
        &[
            "deploy",
            "--exclude",
            "budget-9,budget-8",
            "--connect-timeout",
            "2",
        ],
    );
    fleet.expect_beats("0.2.0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_and_exclude_select_hosts_and_unknown_ids_are_refused() {
    let fleet = fleet("pick", 3);
    write_cluster(&fleet, 1, "0.1.0", "canaries = 0", "");
    let out = erel_ok(&fleet, &["deploy", "--hosts", "pick-1,pick-3"]);
    fleet.expect_beats_per_host(&["0.1.0", "", "0.1.0"]);
    assert!(
        !out.contains("pick-2"),
        "pick-2 is not even looked at: {out}"
    );

    let (ok, out) = erel(&fleet, &["deploy", "--exclude", "pick-1"]);
    assert!(ok, "{out}");
    fleet.expect_beats("0.1.0");

    for words in [
        &["deploy", "--hosts", "pick-1,pick-7"][..],
        &["restart", "--group", "web", "--exclude", "pick-7"],
        &["stop", "--group", "web", "--hosts", "pick-7"],
        &["rollback", "--group", "web", "--hosts", "pick-7"],
    ] {
        let (ok, out) = erel(&fleet, words);
        assert!(!ok, "{words:?}: {out}");
        assert!(
            out.contains("pick-7") && out.contains("no host"),
            "{words:?}: {out}"
        );
    }
    fleet.expect_beats("0.1.0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_that_leave_the_config_are_stopped_and_others_are_never_touched() {
    let fleet = fleet("leave", 3);
    deploy_all(&fleet, 1, "0.1.0");

    // A release no group names, started by hand on leave-1: never touched.
    let stray = fleet.dir.path().join("stray");
    std::fs::create_dir_all(&stray).expect("mkdir");
    let stray_archive = beat_release(&stray, "stray", "1.0.0");
    let stray_port = free_port();
    let mut client = fleet.pki.connect(&fleet.agents[0]).await;
    install_and_start(
        &mut client,
        &stray_archive,
        "stray",
        "1.0.0",
        vec![("BEAT_PORT".into(), stray_port.to_string())],
    )
    .await;

    // leave-3 moves to group spare, which is stopped: its beat from web is stopped.
    let hosts = fleet.hosts_toml("BEAT_PORT");
    let moved = hosts.replacen(
        &format!(
            "id = \"leave-3\"\naddr = \"{}\"\ngroup = \"web\"",
            fleet.agents[2].addr
        ),
        &format!(
            "id = \"leave-3\"\naddr = \"{}\"\ngroup = \"spare\"",
            fleet.agents[2].addr
        ),
        1,
    );
    assert_ne!(hosts, moved, "leave-3 moved");
    let spare = "[group.spare]\nrelease = \"other\"\nversion = \"0.1.0\"\n\
                 archive = \"releases/beat-0.1.0.tar.gz\"\nstate = \"stopped\"\n";
    let text = format!(
        "revision = 2\n{moved}\n{spare}\n[group.web]\nrelease = \"{RELEASE}\"\nversion = \"0.1.0\"\n\
         archive = \"releases/beat-0.1.0.tar.gz\"\n{GATE}\n"
    );
    std::fs::write(cluster_path(&fleet), &text).expect("write");

    let (ok, out) = erel(&fleet, &["deploy", "--dry-run"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("stop      beat on leave-3: the host left the group"),
        "the plan shows the stop: {out}"
    );
    let stop_at = out.find("stop      beat on leave-3").expect("stop line");
    let hosts_at = out.find("1. leave-1").expect("host list");
    assert!(stop_at < hosts_at, "the stop comes first: {out}");
    assert!(!out.contains("stray"), "{out}");
    assert_eq!(answers(&fleet)[2], runs(&fleet, 2, "0.1.0"), "dry run");

    let out = erel_ok(&fleet, &["deploy"]);
    assert!(
        out.contains("leave-3: stopped beat (the host left the group)"),
        "{out}"
    );
    let status = release_status(&fleet.pki, &fleet.agents[2], RELEASE)
        .await
        .expect("known");
    assert_eq!(status.state, ReleaseState::Stopped, "{status:?}");
    assert!(!status.desired_running);
    assert_eq!(
        answers(&fleet)[..2],
        [runs(&fleet, 0, "0.1.0"), runs(&fleet, 1, "0.1.0")]
    );

    // The whole group marked stopped: every host of it stops its release.
    std::fs::write(
        cluster_path(&fleet),
        text.replace("revision = 2", "revision = 3")
            .replace("[group.web]\n", "[group.web]\nstate = \"stopped\"\n"),
    )
    .expect("write");
    let (ok, out) = erel(&fleet, &["deploy", "--dry-run"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("stop      beat on leave-1: the group is stopped"),
        "{out}"
    );
    let out = erel_ok(&fleet, &["deploy"]);
    assert!(out.contains("2 stopped"), "{out}");
    assert_eq!(answers(&fleet), vec![""; 3]);
    // Status counts a stopped group's host as it should be once its release is stopped.
    let (ok, out) = erel(&fleet, &["status"]);
    assert!(ok, "every host is as its group asks: {out}");
    assert!(
        out.contains("beat stopped") && out.contains("other stopped"),
        "{out}"
    );
    for command in ["restart", "rollback"] {
        let (ok, out) = erel(&fleet, &[command, "--group", "web"]);
        assert!(!ok, "{out}");
        assert!(out.contains("group web is stopped"), "{command}: {out}");
    }
    assert_eq!(answers(&fleet), vec![""; 3], "nothing started");

    let stray_status = release_status(&fleet.pki, &fleet.agents[0], "stray")
        .await
        .expect("known");
    assert_eq!(
        stray_status.state,
        ReleaseState::Running,
        "a release no group names is never touched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_is_restarted_rolled_back_and_stopped() {
    let fleet = fleet("life", 3);
    deploy_all(&fleet, 1, "0.1.0");

    // Nothing to roll back to yet: refused per host, naming why, nothing touched.
    let (ok, out) = erel(&fleet, &["rollback", "--group", "web"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("no version of beat was unpacked before 0.1.0"),
        "{out}"
    );
    fleet.expect_beats("0.1.0");

    deploy_all(&fleet, 2, "0.2.0");
    let before = fleet.release_pids(RELEASE);

    let out = erel_ok(&fleet, &["restart", "--group", "web"]);
    assert!(out.contains("restarted (pid"), "{out}");
    fleet.expect_beats("0.2.0");
    let after = fleet.release_pids(RELEASE);
    for (old, new) in before.iter().zip(&after) {
        assert!(
            old.iter().all(|pid| !new.contains(pid)),
            "every host restarted: {before:?} -> {after:?}"
        );
    }

    let out = erel_ok(
        &fleet,
        &["rollback", "--group", "web", "--exclude", "life-3"],
    );
    assert!(out.contains("switched from 0.2.0"), "{out}");
    // The summary does not claim the file's version: the next deploy goes back to it.
    assert_eq!(
        out.lines().last(),
        Some("revision 2: group web: life-1, life-2 run 0.1.0; the cluster file still asks for 0.2.0"),
        "{out}"
    );
    fleet.expect_beats_per_host(&["0.1.0", "0.1.0", "0.2.0"]);

    erel_ok(
        &fleet,
        &["stop", "--group", "web", "--hosts", "life-1,life-3"],
    );
    fleet.expect_beats_per_host(&["", "0.1.0", ""]);
    let stopped = wait_until(PATIENCE, || async {
        fleet.agents[0].release_pids(RELEASE).is_empty()
            && fleet.agents[2].release_pids(RELEASE).is_empty()
    })
    .await;
    assert!(stopped, "no process of the release is left");

    // A stop that finds the release stopped already succeeds and changes nothing.
    let (ok, out) = erel(&fleet, &["stop", "--group", "web", "--hosts", "life-1"]);
    assert!(ok, "{out}");
    assert_eq!(answers(&fleet)[1], runs(&fleet, 1, "0.1.0"));
}

/// After a deploy of a broken 0.3.0 halted at its canary, 0.3.0 is unpacked (at least
/// on the canary) and is the newest version there; every host runs 0.2.0. Neither
/// `rollback` nor `restart` on the group may go to 0.3.0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_halted_deploy_rollback_and_restart_never_go_forward() {
    let fleet = fleet("halted", 3);
    let releases = fleet.dir.path().join("releases");
    failing_beat_release(&releases, RELEASE, "0.3.0", "exit");
    deploy_all(&fleet, 1, "0.1.0");
    deploy_all(&fleet, 2, "0.2.0");
    write_cluster(&fleet, 3, "0.3.0", "canaries = 1", "");
    let (ok, out) = erel(&fleet, &["deploy"]);
    assert!(!ok && out.contains("HALTED"), "{out}");
    fleet.expect_beats("0.2.0");
    let canary = release_status(&fleet.pki, &fleet.agents[0], RELEASE)
        .await
        .expect("the canary knows beat");
    assert_eq!(
        canary.versions.last().map(String::as_str),
        Some("0.3.0"),
        "the failed version is the newest unpacked on the canary"
    );
    let before = fleet.release_pids(RELEASE);

    // --dry-run says what each host would get and touches nothing.
    let (ok, out) = erel(&fleet, &["rollback", "--group", "web", "--dry-run"]);
    assert!(ok, "{out}");
    for host in ["halted-1", "halted-2", "halted-3"] {
        assert!(
            out.contains(&format!("web/{host} (127.0.0.1:"))
                && out.contains("left as it is: runs beat 0.2.0, not the group's 0.3.0"),
            "{out}"
        );
    }
    let (ok, out) = erel(&fleet, &["restart", "--group", "web", "--dry-run"]);
    assert!(ok && out.matches("): restart 0.2.0").count() == 3, "{out}");
    let (ok, out) = erel(
        &fleet,
        &["stop", "--group", "web", "--dry-run", "--hosts", "halted-1"],
    );
    assert!(
        ok && out.contains("web/halted-1 (") && out.contains("stop (runs 0.2.0)"),
        "{out}"
    );
    assert!(!out.contains("halted-2"), "{out}");
    let out = fleet
        .pki
        .erel()
        .args([
            "rollback",
            "--group",
            "web",
            "--to",
            "0.1.0",
            "--dry-run",
            "--json",
        ])
        .arg("--cluster")
        .arg(cluster_path(&fleet))
        .output()
        .expect("run erel");
    assert!(out.status.success(), "{}", output_text(&out));
    let planned: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(planned.as_array().map(Vec::len), Some(3), "{planned}");
    for host in planned.as_array().into_iter().flatten() {
        assert_eq!(host["action"], "rollback", "{planned}");
        assert_eq!(host["from"], "0.2.0", "{planned}");
        assert_eq!(host["to"], "0.1.0", "{planned}");
    }
    fleet.expect_beats("0.2.0");
    assert_eq!(
        fleet.release_pids(RELEASE),
        before,
        "a dry run touches nothing"
    );

    // No host runs the group's 0.3.0: each is left as it is, and the report says so.
    let out = erel_ok(&fleet, &["rollback", "--group", "web"]);
    assert!(
        out.contains("left as it is: runs beat 0.2.0, not the group's 0.3.0"),
        "{out}"
    );
    let rows: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("halted-") && l.contains("left as it is"))
        .collect();
    assert_eq!(rows.len(), 3, "{out}");
    assert!(
        rows.iter()
            .all(|row| row.contains("beat 0.2.0") && !row.contains("beat 0.3.0")),
        "the VERSION column shows what runs: {out}"
    );
    fleet.expect_beats("0.2.0");
    assert_eq!(fleet.release_pids(RELEASE), before, "nothing was restarted");

    // A group restart restarts what runs (0.2.0), never the group's 0.3.0.
    let out = erel_ok(
        &fleet,
        &["restart", "--group", "web", "--hosts", "halted-2"],
    );
    assert!(out.contains("restarted (pid"), "{out}");
    assert!(
        out.contains("group web: restarting beat on 1 host(s), each with the version it runs"),
        "the header says restart, not a deploy of 0.3.0: {out}"
    );
    assert!(!out.contains("0.3.0 ("), "{out}");
    fleet.expect_beats("0.2.0");
    let after = fleet.release_pids(RELEASE);
    assert_eq!(after[0], before[0], "halted-1 not selected");
    assert!(
        before[1].iter().all(|pid| !after[1].contains(pid)),
        "halted-2 restarted: {before:?} -> {after:?}"
    );

    // --to a version some host lacks: refused naming the hosts, nothing touched.
    let (ok, out) = erel(&fleet, &["rollback", "--group", "web", "--to", "0.0.9"]);
    assert!(!ok, "{out}");
    for host in ["halted-1", "halted-2", "halted-3"] {
        assert!(
            out.contains(&format!("{host} (")) && out.contains("beat 0.0.9 is not present here"),
            "{out}"
        );
    }
    assert!(
        out.contains("--to 0.0.9 refused, no host rolled back"),
        "{out}"
    );
    fleet.expect_beats("0.2.0");
    assert_eq!(fleet.release_pids(RELEASE), after, "nothing was restarted");

    // --to a version present: taken on the selected host, whatever it runs.
    let out = erel_ok(
        &fleet,
        &[
            "rollback", "--group", "web", "--to", "0.1.0", "--hosts", "halted-3",
        ],
    );
    assert!(out.contains("switched from 0.2.0"), "{out}");
    fleet.expect_beats_per_host(&["0.2.0", "0.2.0", "0.1.0"]);
}

/// A file daemon (`erel master --cluster`), killed when dropped if a test panics first.
struct Daemon(Followed);

impl Drop for Daemon {
    fn drop(&mut self) {
        self.0.kill9();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_stops_what_leaves_the_config() {
    let fleet = fleet("dstop", 2);
    write_cluster(&fleet, 1, "0.1.0", "", "");
    let mut daemon = Daemon(Followed::spawn(
        fleet
            .pki
            .erel()
            .args(["master", "--interval", "1", "--cluster"])
            .arg(cluster_path(&fleet))
            .stdout(std::process::Stdio::null()),
        "erel master",
    ));
    let all_run = wait_until(PATIENCE, || async { fleet.all_run("0.1.0") }).await;
    assert!(all_run, "{:?}\n{}", answers(&fleet), daemon.0.log());

    // dstop-2 leaves every group (it waits): the daemon stops its beat, and keeps
    // dstop-1's.
    let hosts = fleet.hosts_toml("BEAT_PORT");
    let waiting = hosts.replacen(
        &format!(
            "id = \"dstop-2\"\naddr = \"{}\"\ngroup = \"web\"\n",
            fleet.agents[1].addr
        ),
        &format!("id = \"dstop-2\"\naddr = \"{}\"\n", fleet.agents[1].addr),
        1,
    );
    assert_ne!(hosts, waiting, "dstop-2 waits");
    let text = format!(
        "revision = 2\n{waiting}\n[group.web]\nrelease = \"{RELEASE}\"\nversion = \"0.1.0\"\n\
         archive = \"releases/beat-0.1.0.tar.gz\"\n{GATE}\n"
    );
    std::fs::write(cluster_path(&fleet), &text).expect("write");
    let left_stopped = wait_until(PATIENCE, || async {
        answers(&fleet) == vec![runs(&fleet, 0, "0.1.0"), String::new()]
    })
    .await;
    assert!(left_stopped, "{:?}\n{}", answers(&fleet), daemon.0.log());
    // The port closes before the agent answers the stop: wait for the daemon's line.
    daemon
        .0
        .log_showing("dstop-2: stopped beat (the host left the group)", PATIENCE)
        .await;

    // The group marked stopped: its last host stops too.
    std::fs::write(
        cluster_path(&fleet),
        text.replace("revision = 2", "revision = 3")
            .replace("[group.web]\n", "[group.web]\nstate = \"stopped\"\n"),
    )
    .expect("write");
    let all_stopped = wait_until(PATIENCE, || async {
        answers(&fleet).iter().all(String::is_empty)
    })
    .await;
    assert!(all_stopped, "{:?}\n{}", answers(&fleet), daemon.0.log());
    assert!(
        daemon.0.terminate_within(Duration::from_secs(30)),
        "{}",
        daemon.0.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_that_fails_on_the_canary_halts_and_touches_no_other_host() {
    let fleet = fleet("rfail", 3);
    deploy_all(&fleet, 1, "0.1.0");
    let before = fleet.release_pids(RELEASE);

    // The group's environment now makes the release exit at once: the canary's restart
    // fails, and so does starting the same version once more.
    write_cluster(&fleet, 2, "0.1.0", "env = { BEAT_FAIL = \"exit\" }", "");
    let (ok, out) = erel(&fleet, &["restart", "--group", "web"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("rfail-1") && out.contains("failing on purpose"),
        "{out}"
    );
    assert!(
        out.contains("the old version 0.1.0 is not healthy either"),
        "the report says the same version was started once more: {out}"
    );
    assert!(
        out.contains("HALTED") && out.contains("not touched"),
        "{out}"
    );
    assert_eq!(
        answers(&fleet)[1..],
        [runs(&fleet, 1, "0.1.0"), runs(&fleet, 2, "0.1.0")]
    );
    assert_eq!(fleet.release_pids(RELEASE)[1..], before[1..], "untouched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_host_and_group_forms_both_act_and_a_mix_of_them_is_refused() {
    let fleet = fleet("forms", 2);
    deploy_all(&fleet, 1, "0.1.0");
    deploy_all(&fleet, 2, "0.2.0");
    let before = fleet.release_pids(RELEASE);

    // Mixing the forms, or giving neither, is refused before any host is touched.
    let refusals: &[(&[&str], &[&str])] = &[
        (
            &["restart", "forms-1", RELEASE, "--group", "web"],
            &[
                "erel restart",
                "not both",
                "'forms-1' 'beat'",
                "--group web",
            ],
        ),
        (
            &["restart", "--group", "web", "--env", "A=B"],
            &["not both", "--env A=B", "--group web"],
        ),
        (
            &["stop", "forms-1", RELEASE, "--exclude", "forms-2"],
            &["erel stop", "not both", "--exclude forms-2"],
        ),
        (
            &["stop", "--group", "web", "--grace", "3"],
            &["not both", "--grace 3", "--group web"],
        ),
        (&["stop"], &["erel stop HOST NAME", "erel stop --group G"]),
        (&["restart", "forms-1"], &["NAME is missing"]),
    ];
    for (words, parts) in refusals {
        let (ok, out) = erel(&fleet, words);
        assert!(!ok, "{words:?}: {out}");
        for part in *parts {
            assert!(out.contains(part), "{words:?}: {out:?} lacks {part:?}");
        }
    }
    assert_eq!(fleet.release_pids(RELEASE), before, "nothing was touched");

    // One host, with its group's settings: only that host's release restarts.
    let out = erel_ok(&fleet, &["restart", "forms-1", RELEASE]);
    assert!(
        out.contains("group 'web'") && out.contains("forms-1: beat stopped"),
        "{out}"
    );
    assert!(out.contains("beat 0.2.0 started"), "{out}");
    let answered = wait_until(PATIENCE, || async { fleet.all_run("0.2.0") }).await;
    assert!(answered, "{:?}\n{}", answers(&fleet), fleet.agent_logs());
    let after_host = fleet.release_pids(RELEASE);
    assert!(
        before[0].iter().all(|pid| !after_host[0].contains(pid)),
        "forms-1 restarted: {before:?} -> {after_host:?}"
    );
    assert_eq!(after_host[1], before[1], "forms-2 untouched");

    // The group form, narrowed to the other host: a rolling restart gated on health.
    let out = erel_ok(&fleet, &["restart", "--group", "web", "--hosts", "forms-2"]);
    assert!(out.contains("restarted (pid"), "{out}");
    fleet.expect_beats("0.2.0");
    let after_group = fleet.release_pids(RELEASE);
    assert_eq!(after_group[0], after_host[0], "forms-1 untouched");
    assert!(
        after_host[1]
            .iter()
            .all(|pid| !after_group[1].contains(pid)),
        "forms-2 restarted: {after_host:?} -> {after_group:?}"
    );

    // A one-host rollback: the older version, still unpacked there, with the group's
    // settings.
    let out = erel_ok(&fleet, &["restart", "forms-1", RELEASE, "0.1.0"]);
    assert!(out.contains("beat 0.1.0 started"), "{out}");
    let rolled_back = wait_until(PATIENCE, || async {
        answers(&fleet) == vec![runs(&fleet, 0, "0.1.0"), runs(&fleet, 1, "0.2.0")]
    })
    .await;
    assert!(rolled_back, "{:?}\n{}", answers(&fleet), fleet.agent_logs());

    // One host's stop takes the group's stop_grace_secs.
    let (ok, out) = erel(&fleet, &["stop", "forms-2", RELEASE]);
    assert!(ok, "{out}");
    assert!(
        out.contains("stop_grace_secs 5"),
        "the group's grace: {out}"
    );
    fleet.expect_beats_per_host(&["0.1.0", ""]);
}

/// The line index of each host's first `web/<id>: stopping` and of the first host that
/// is done, in a rollout's printed events.
fn stop_and_done_lines(out: &str) -> (Vec<usize>, Option<usize>) {
    // Each event line is `[  1.52s] web/<id>: ...`: the time is left out.
    let lines: Vec<&str> = out
        .lines()
        .map(|l| l.split_once("] ").map_or(l, |(_, rest)| rest))
        .collect();
    let stopping = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.starts_with("web/") && l.ends_with(": stopping"))
        .map(|(i, _)| i)
        .collect();
    let done = lines
        .iter()
        .position(|l| l.starts_with("web/") && l.contains(": done, runs "));
    (stopping, done)
}

/// `rollback --group` has no canary phase: with `canaries = 1` and `max_in_flight = 3`,
/// all three hosts are stopping before the first is done, where the deploy before it
/// finished its canary before it stopped another host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_rollback_skips_the_canary_phase_and_takes_max_in_flight_at_once() {
    let fleet = fleet("nocanary", 3);
    let lines = "canaries = 1\nmax_in_flight = 3";
    write_cluster(&fleet, 1, "0.1.0", lines, "");
    erel_ok(&fleet, &["deploy"]);
    write_cluster(&fleet, 2, "0.2.0", lines, "");
    let out = erel_ok(&fleet, &["deploy"]);
    fleet.expect_beats("0.2.0");
    let (stopping, done) = stop_and_done_lines(&out);
    assert_eq!(stopping.len(), 3, "{out}");
    let done = done.unwrap_or_else(|| panic!("a host done:\n{out}"));
    assert!(
        stopping[0] < done && done < stopping[1],
        "the deploy's canary is done before another host stops:\n{out}"
    );

    let out = erel_ok(&fleet, &["rollback", "--group", "web"]);
    fleet.expect_beats("0.1.0");
    let (stopping, done) = stop_and_done_lines(&out);
    assert_eq!(stopping.len(), 3, "{out}");
    let done = done.unwrap_or_else(|| panic!("a host done:\n{out}"));
    assert!(
        stopping.iter().all(|&s| s < done),
        "no canary phase: every host stops before the first is done \
         (each is verified for min_up_secs = 1 first):\n{out}"
    );
}
