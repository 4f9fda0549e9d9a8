//! The daemons against real agents (and the real broker in AMQP mode): a revision whose
//! release crashes at boot is tried once, the group stays halted at it (shown by
//! `erel status`, published as an event), and a newer revision or a retry ends the
//! halt; a manual `erel deploy` on groups a daemon holds is refused naming it, and runs
//! with `--take-over`, after which the daemon acts again. A revision with `restarted_at`
//! restarts each host once, by both daemons and by `erel deploy` alike.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use crate::helper::amqp::{
    erel, logs, one_host_under_masters, BrokerLock, TestBroker, Watcher, MASTER_INTERVAL,
};
use crate::helper::fleet::Fleet;
use crate::helper::release::{failing_beat_release, names_the_exit_failure};
use crate::helper::AgentCommands;
use crate::helper::{metrics_addr, output_text, scrape_metrics, wait_until_blocking, Followed};

/// The file daemon's `--interval`.
const FILE_INTERVAL: Duration = Duration::from_secs(1);
/// Bound for a rollout of a few hosts, on a busy machine.
const CONVERGE: Duration = Duration::from_secs(90);
/// Bound for a master to notice something (a file revision, a broker record).
const NOTICE: Duration = Duration::from_secs(30);
/// One canary, one host at a time: a failure touches one host only.
const ONE_AT_A_TIME: &str = "max_in_flight = 1\ncanaries = 1";

/// Sleeps `passes` (a bound its caller derives from the pass interval) to show that
/// nothing starts beat `version` again meanwhile: the agents of `fleet` logged
/// `expected` starts of it. `what` and `log` (the master's, taken after the sleep)
/// explain a failure.
fn still_started_over(
    fleet: &Fleet,
    passes: Duration,
    (version, expected): (&str, usize),
    what: &str,
    log: impl Fn() -> String,
) {
    std::thread::sleep(passes);
    assert_eq!(
        starts_of(fleet, version),
        expected,
        "{what} over {passes:?}\n{}\n{}",
        log(),
        fleet.agent_logs()
    );
}

/// Asserts that the agents of `fleet` logged `expected` starts of beat `version`. An
/// agent logs a start once it has answered it, so a release may already serve before
/// its start is in the log: the count is awaited (within [`NOTICE`]), then checked
/// exactly.
fn assert_starts(fleet: &Fleet, version: &str, expected: usize) {
    wait_until_blocking(NOTICE, || starts_of(fleet, version) >= expected);
    assert_eq!(
        starts_of(fleet, version),
        expected,
        "{}",
        fleet.agent_logs()
    );
}

/// The starts of beat `version` after a fleet's first deploy of it (one per host), once
/// every agent has logged its own (see [`assert_starts`]).
fn first_starts(fleet: &Fleet, version: &str) -> usize {
    assert_starts(fleet, version, fleet.agents.len());
    fleet.agents.len()
}

/// How many times any agent of `fleet` was asked to start `beat <version>`, from
/// the one line each agent logs per command.
fn starts_of(fleet: &Fleet, version: &str) -> usize {
    let subject = format!("beat {version}");
    fleet
        .agents
        .iter()
        .map(|agent| {
            agent
                .log()
                .lines()
                .filter(|line| line.contains("command=start") && line.contains(&subject))
                .count()
        })
        .sum()
}

/// The file daemon: `erel master --cluster FILE --interval 1`, killed when dropped.
struct FileDaemon(Followed);

impl FileDaemon {
    fn start(fleet: &Fleet, cluster: &Path) -> Self {
        let mut command = fleet.pki.erel();
        command
            .arg("--cluster")
            .arg(cluster)
            .arg("master")
            .arg("--interval")
            .arg(FILE_INTERVAL.as_secs().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        FileDaemon(Followed::spawn(&mut command, "erel master --cluster"))
    }

    /// Starts a daemon on a revision-1 file of 1.0.0 and waits until every host runs
    /// 1.0.0.
    fn start_running(fleet: &Fleet, cluster: &Path) -> Self {
        let daemon = FileDaemon::start(fleet, cluster);
        fleet.wait_all_run("1.0.0", CONVERGE, "every host runs 1.0.0", || {
            daemon.0.log()
        });
        daemon
    }

    /// Starts a daemon on a revision-1 file of 1.0.0 and waits until its first
    /// rollout has ended (verification included), so that a release stopped afterwards
    /// is drift, not a failure of that rollout.
    fn start_converged(fleet: &Fleet, cluster: &Path) -> Self {
        let daemon = FileDaemon::start(fleet, cluster);
        assert!(
            wait_until_blocking(CONVERGE, || daemon
                .0
                .log()
                .contains(" converged revision=1")),
            "{}",
            daemon.0.log()
        );
        fleet.expect_beats("1.0.0");
        daemon
    }
}

impl Drop for FileDaemon {
    fn drop(&mut self) {
        self.0.kill9();
    }
}

/// `erel --cluster FILE <words>`.
fn erel_on(fleet: &Fleet, cluster: &Path, words: &[&str]) -> Output {
    fleet
        .pki
        .erel()
        .arg("--cluster")
        .arg(cluster)
        .args(words)
        .output()
        .expect("run erel")
}

/// Stops the beat release on agent `index`, as an operator would by hand.
fn stop_by_hand(fleet: &Fleet, index: usize) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async {
            let mut client = fleet.pki.connect(&fleet.agents[index]).await;
            client
                .stop("beat", Duration::from_secs(5))
                .await
                .expect("stop by hand");
        });
    assert!(fleet.beats()[index].is_empty(), "stopped");
}

/// A fleet of two `web` hosts with beat 1.0.0, 2.0.0, 3.0.0 and a broken 2.5.0 (its
/// start script exits with code 3 at once) in its directory.
fn fleet_with_a_broken_release(name: &str) -> Fleet {
    let fleet = Fleet::with_beat_releases(name, &["web", "web"]);
    failing_beat_release(fleet.dir.path(), "beat", "2.5.0", "exit");
    fleet
}

/// Writes the cluster file `cluster.toml` at `revision` running `version`.
fn write_cluster(fleet: &Fleet, revision: u64, version: &str) -> PathBuf {
    fleet.write(
        "cluster.toml",
        &fleet.config(revision, version, ONE_AT_A_TIME),
    )
}

/// `EREL_AMQP` exported (as the README's AMQP section does) does not turn an explicit
/// `erel master --cluster FILE` into an AMQP master; without `--cluster`, a refusal
/// names `EREL_AMQP` as where `--amqp` came from; both flags given are refused.
#[test]
fn an_explicit_cluster_file_wins_over_erel_amqp_from_the_environment() {
    let fleet = Fleet::with_beat_releases("envamqp", &["web"]);
    let cluster = write_cluster(&fleet, 1, "1.0.0");
    // Nothing listens on port 1: a master that took this URL could not run.
    let url = "amqp://guest:guest@127.0.0.1:1/%2f";
    let mut command = fleet.pki.erel();
    command
        .env("EREL_AMQP", url)
        .arg("master")
        .arg("--cluster")
        .arg(&cluster)
        .arg("--interval")
        .arg(FILE_INTERVAL.as_secs().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let daemon = FileDaemon(Followed::spawn(&mut command, "erel master --cluster"));
    fleet.wait_all_run("1.0.0", CONVERGE, "the file daemon runs 1.0.0", || {
        daemon.0.log()
    });
    drop(daemon);

    let out = fleet
        .pki
        .erel()
        .env("EREL_AMQP", url)
        .arg("master")
        .output()
        .expect("run erel");
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains(
            "--state-dir DIR is required with --amqp (from EREL_AMQP in the environment)"
        ),
        "{text}"
    );

    let out = fleet
        .pki
        .erel()
        .env_remove("EREL_AMQP")
        .args(["master", "--amqp", url, "--cluster"])
        .arg(&cluster)
        .output()
        .expect("run erel");
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains(&format!("--cluster FILE and --amqp {url} are two modes")),
        "{text}"
    );
}

#[test]
fn daemon_tries_a_broken_revision_once_halts_the_group_and_applies_a_newer_one() {
    let fleet = fleet_with_a_broken_release("halt");
    let cluster = write_cluster(&fleet, 1, "1.0.0");
    let daemon = FileDaemon::start_running(&fleet, &cluster);

    write_cluster(&fleet, 2, "2.5.0");
    assert!(
        wait_until_blocking(CONVERGE, || daemon.0.log().contains("halted at revision 2")),
        "the failed rollout halts the group\n{}",
        daemon.0.log()
    );
    assert_starts(&fleet, "2.5.0", 1);
    // Passes keep coming every interval; none of them tries 2.5.0 again. Four
    // intervals, plus the time one pass takes to ping the hosts on a busy machine.
    let passes = FILE_INTERVAL * 4 + Duration::from_secs(2);
    still_started_over(&fleet, passes, ("2.5.0", 1), "tried once", || {
        daemon.0.log()
    });
    assert!(fleet.all_run("1.0.0"), "rolled back: {:?}", fleet.beats());

    // `erel status` shows the halt with its reason; so does the state file.
    let out = erel_on(&fleet, &cluster, &["status"]);
    let text = output_text(&out);
    assert!(
        text.contains("HALTED: group web halted at revision 2 (beat 2.5.0)"),
        "{text}"
    );
    assert!(names_the_exit_failure(&text), "the reason: {text}");
    assert!(
        text.contains("rolled back"),
        "whether it was rolled back: {text}"
    );
    // `erel status --json` gives each row of the group the halt record.
    let out = erel_on(&fleet, &cluster, &["status", "--json"]);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", output_text(&out)));
    let rows = rows.as_array().expect("an array of hosts");
    assert_eq!(rows.len(), 2, "{rows:?}");
    for row in rows {
        let halted = &row["halted"];
        assert_eq!(halted["revision"], 2, "{row}");
        assert_eq!(halted["version"], "2.5.0", "{row}");
        assert!(
            halted["reason"]
                .as_str()
                .is_some_and(|r| r.contains("rolled back")),
            "{row}"
        );
        assert!(
            halted["since_ms"].as_u64().is_some_and(|ms| ms > 0),
            "{row}"
        );
    }
    let state = std::fs::read_to_string(fleet.dir.path().join(".erel-state/halted.json"))
        .expect("the halt is kept beside the cluster file");
    assert!(state.contains("\"revision\": 2"), "{state}");

    // A newer revision ends the halt and is rolled out.
    write_cluster(&fleet, 3, "3.0.0");
    fleet.wait_all_run("3.0.0", CONVERGE, "revision 3 is rolled out", || {
        daemon.0.log()
    });
    assert!(
        daemon
            .0
            .log()
            .contains("newer than the halted revision 2; the group is rolled out again"),
        "{}",
        daemon.0.log()
    );
    let text = output_text(&erel_on(&fleet, &cluster, &["status"]));
    assert!(!text.contains("HALTED"), "{text}");
    let out = erel_on(&fleet, &cluster, &["status", "--json"]);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(
        rows.as_array()
            .is_some_and(|rows| rows.iter().all(|row| row["halted"].is_null())),
        "{rows}"
    );
    assert_starts(&fleet, "2.5.0", 1);
}

/// How long every host's release must have run before `restarted_at` is written: the
/// master takes a release's start as its clock less the agent's up time in whole
/// seconds, up to a second late, so a release started within a second of the instant
/// could count as started after it.
const UP_BEFORE_RESTART: u64 = 2;

/// The beat release's up time on each host, in seconds, as its agent reports it.
fn up_secs(fleet: &Fleet) -> Vec<Option<u64>> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async {
            let mut up = Vec::new();
            for agent in &fleet.agents {
                let mut client = fleet.pki.connect(agent).await;
                let pong = client.ping().await.expect("ping");
                up.push(
                    pong.releases
                        .into_iter()
                        .find(|r| r.name == "beat")
                        .and_then(|r| r.up_secs),
                );
            }
            up
        })
}

/// Waits until every host's release has run [`UP_BEFORE_RESTART`] seconds; its pids.
fn pids_of_settled_releases(fleet: &Fleet) -> Vec<Vec<i32>> {
    assert!(
        wait_until_blocking(NOTICE, || up_secs(fleet)
            .iter()
            .all(|up| up.is_some_and(|up| up >= UP_BEFORE_RESTART))),
        "every release runs: {:?}",
        up_secs(fleet)
    );
    let pids = fleet.release_pids("beat");
    assert!(pids.iter().all(|p| !p.is_empty()), "{pids:?}");
    pids
}

/// A cluster text at `revision` running 1.0.0, with `restarted_at` = now (UTC).
fn restarted_now(fleet: &Fleet, revision: u64) -> String {
    let now = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .expect("format now");
    let extra = format!("{ONE_AT_A_TIME}\nrestarted_at = \"{now}\"");
    fleet.config(revision, "1.0.0", &extra)
}

/// The cluster file at `revision` running 1.0.0, with `restarted_at` = now (UTC).
fn write_restarted_now(fleet: &Fleet, revision: u64) -> PathBuf {
    fleet.write("cluster.toml", &restarted_now(fleet, revision))
}

/// True when every host runs a release whose pids all differ from `before`'s.
fn all_restarted(fleet: &Fleet, before: &[Vec<i32>]) -> bool {
    let now = fleet.release_pids("beat");
    fleet.all_run("1.0.0")
        && now.len() == before.len()
        && now
            .iter()
            .zip(before)
            .all(|(now, before)| !now.is_empty() && now.iter().all(|p| !before.contains(p)))
}

/// Waits until every host of `fleet` has restarted its release 1.0.0 (no pid of
/// `before` left, two starts more than `starts`) and `switched` holds; then shows that
/// passes every `interval` restart nothing again. `log` is the master's, for messages.
fn restarted_once(
    fleet: &Fleet,
    (before, starts): (&[Vec<i32>], usize),
    interval: Duration,
    switched: impl Fn() -> bool,
    log: impl Fn() -> String,
) {
    assert!(
        wait_until_blocking(CONVERGE, || all_restarted(fleet, before) && switched()),
        "every host is restarted: {before:?} -> {:?}\n{}\n{}",
        fleet.release_pids("beat"),
        log(),
        fleet.agent_logs()
    );
    let after = fleet.release_pids("beat");
    assert_starts(fleet, "1.0.0", starts + 2);

    // Passes keep coming every interval; each finds the releases started after the
    // instant. Four intervals, plus the time one pass takes on a busy machine.
    let passes = interval * 4 + Duration::from_secs(2);
    std::thread::sleep(passes);
    assert_eq!(
        fleet.release_pids("beat"),
        after,
        "restarted once over {passes:?}\n{}",
        log()
    );
    assert_starts(fleet, "1.0.0", starts + 2);
}

#[test]
fn daemon_restarts_each_host_once_for_a_revision_with_restarted_at() {
    let fleet = Fleet::with_beat_releases("restarted-at", &["web", "web"]);
    let cluster = write_cluster(&fleet, 1, "1.0.0");
    let daemon = FileDaemon::start_running(&fleet, &cluster);
    let before = pids_of_settled_releases(&fleet);
    let starts = first_starts(&fleet, "1.0.0");

    write_restarted_now(&fleet, 2);
    restarted_once(
        &fleet,
        (&before, starts),
        FILE_INTERVAL,
        || daemon.0.log().contains(" converged revision=2"),
        || daemon.0.log(),
    );
    assert_eq!(
        daemon.0.log().matches(" converged revision=2").count(),
        1,
        "one pass switched hosts at revision 2\n{}",
        daemon.0.log()
    );
}

#[test]
fn amqp_daemon_restarts_each_host_once_for_a_revision_with_restarted_at() {
    let _lock = BrokerLock::shared();
    let fleet = Fleet::with_beat_releases("amqp-restarted-at", &["web", "web"]);
    let broker = TestBroker::new("restarted-at", &["web"]);
    let master = fleet.master(&broker, "m1");
    fleet.published(&broker, &fleet.config(1, "1.0.0", ONE_AT_A_TIME));
    fleet.wait_all_run("1.0.0", CONVERGE, "every host runs 1.0.0", || master.log());
    let before = pids_of_settled_releases(&fleet);
    let starts = first_starts(&fleet, "1.0.0");

    fleet.published(&broker, &restarted_now(&fleet, 2));
    let applied = |log: &str| {
        log.lines()
            .filter(|line| line.contains("revision applied") && line.contains("revision=2"))
            .count()
    };
    restarted_once(
        &fleet,
        (&before, starts),
        MASTER_INTERVAL,
        || applied(&master.log()) > 0,
        || master.log(),
    );
    assert_eq!(applied(&master.log()), 1, "{}", master.log());
}

#[test]
fn deploy_restarts_each_host_once_for_restarted_at() {
    let fleet = Fleet::with_beat_releases("deploy-restarted-at", &["web", "web"]);
    let cluster = write_cluster(&fleet, 1, "1.0.0");
    let out = erel_on(&fleet, &cluster, &["deploy"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let before = pids_of_settled_releases(&fleet);
    let starts = first_starts(&fleet, "1.0.0");

    write_restarted_now(&fleet, 2);
    let out = erel_on(&fleet, &cluster, &["deploy"]);
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        all_restarted(&fleet, &before),
        "{before:?} -> {:?}\n{text}",
        fleet.release_pids("beat")
    );
    assert_starts(&fleet, "1.0.0", starts + 2);

    // Deployed again, the same file restarts nothing: each release started after it.
    let after = fleet.release_pids("beat");
    let out = erel_on(&fleet, &cluster, &["deploy"]);
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("group web: 0 switched, 2 already up to date"),
        "{text}"
    );
    assert_eq!(fleet.release_pids("beat"), after, "{text}");
    assert_starts(&fleet, "1.0.0", starts + 2);
}

#[test]
fn daemon_holds_its_cluster_file_and_a_deploy_runs_only_with_take_over() {
    let fleet = Fleet::with_beat_releases("hold", &["web", "web"]);
    let cluster = write_cluster(&fleet, 1, "1.0.0");
    let mut daemon = FileDaemon::start_converged(&fleet, &cluster);
    let pid = daemon.0.pid().expect("running");

    // A second daemon on the same file refuses to start, naming the first.
    let second = erel_on(&fleet, &cluster, &["master", "--interval", "1"]);
    let text = output_text(&second);
    assert!(!second.status.success(), "{text}");
    assert!(
        text.contains("another daemon already keeps this cluster")
            && text.contains(&format!("pid {pid}")),
        "{text}"
    );

    // A deploy is refused, naming the daemon (its master name and pid).
    let out = erel_on(&fleet, &cluster, &["deploy"]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{}", output_text(&out));
    assert!(
        stderr.contains("are held by the daemon erel@") && stderr.contains(&format!("pid {pid}")),
        "{stderr}"
    );
    assert!(stderr.contains(") since 20"), "since when: {stderr}");
    assert!(stderr.contains("--take-over"), "{stderr}");

    // With --take-over it runs (here: a host stopped by hand is started again) and
    // says whom it took the cluster from.
    stop_by_hand(&fleet, 0);
    let out = erel_on(&fleet, &cluster, &["deploy", "--take-over"]);
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("took over group(s) web from the daemon erel@")
            && text.contains(&format!("pid {pid}")),
        "{text}"
    );
    assert!(fleet.all_run("1.0.0"), "{:?}", fleet.beats());

    // The one-host forms are refused like the group forms: the daemon would undo them.
    let first = fleet.agents[0].id.clone();
    for words in [
        vec!["stop", first.as_str(), "beat"],
        vec!["restart", first.as_str(), "beat"],
        vec!["start", first.as_str(), "beat", "1.0.0"],
    ] {
        let out = erel_on(&fleet, &cluster, &words);
        let text = output_text(&out);
        assert!(!out.status.success(), "{words:?}: {text}");
        let command = format!("`erel {}` of beat at its next pass", words[0]);
        assert!(
            text.contains(&format!("{first}: "))
                && text.contains("held by the daemon erel@")
                && text.contains(&format!("pid {pid}"))
                && text.contains(&command),
            "{words:?}: {text}"
        );
    }
    assert!(
        fleet.all_run("1.0.0"),
        "nothing touched: {:?}",
        fleet.beats()
    );

    // With --take-over the one-host stop runs, warning that it lasts until the
    // daemon's next pass; the daemon acts again afterwards: drift is repaired.
    let second = fleet.agents[1].id.clone();
    let out = erel_on(&fleet, &cluster, &["stop", &second, "beat", "--take-over"]);
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!("{second}: beat stopped"))
            && text.contains("lasts until the next pass of the daemon"),
        "{text}"
    );
    fleet.wait_all_run("1.0.0", CONVERGE, "the daemon repairs drift again", || {
        daemon.0.log()
    });
    assert!(daemon.0.running(), "{}", daemon.0.log());
}

#[test]
fn amqp_daemon_tries_a_broken_revision_once_even_after_a_take_over_and_again_on_retry() {
    let _lock = BrokerLock::shared();
    let fleet = fleet_with_a_broken_release("amqp-halt");
    let broker = TestBroker::new("halt", &["web"]);
    let master = fleet.master(&broker, "m1");

    let watcher = Watcher::start(&fleet.pki, &broker, NOTICE);

    fleet.published(&broker, &fleet.config(1, "1.0.0", ONE_AT_A_TIME));
    fleet.wait_all_run("1.0.0", CONVERGE, "every host runs 1.0.0", || master.log());

    fleet.published(&broker, &fleet.config(2, "2.5.0", ONE_AT_A_TIME));
    assert!(
        wait_until_blocking(CONVERGE, || master.log().contains("halted at revision 2")),
        "the failed rollout halts the group\n{}",
        master.log()
    );
    let passes = MASTER_INTERVAL * 4 + Duration::from_secs(2);
    still_started_over(&fleet, passes, ("2.5.0", 1), "tried once", || master.log());
    assert!(
        wait_until_blocking(NOTICE, || watcher
            .events()
            .contains("web: HALTED at revision 2")),
        "the halt is an event:\n{}",
        watcher.events()
    );

    // `erel status --amqp` shows it, with the reason and how to retry.
    let cluster = fleet.dir.path().join("cluster-2.toml");
    let out = erel(
        &fleet.pki,
        &["--cluster", cluster.to_str().expect("utf-8"), "status"],
        &broker,
        &[],
    );
    let text = output_text(&out);
    assert!(
        text.contains("HALTED: group web halted at revision 2 (beat 2.5.0)")
            && text.contains("erel config retry --group web"),
        "{text}"
    );
    // With --json, each host row of the group carries the halt the broker keeps.
    let out = fleet
        .pki
        .erel()
        .arg("--cluster")
        .arg(&cluster)
        .args(["status", "--json"])
        .args(broker.flags())
        .output()
        .expect("run erel status --json");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", output_text(&out)));
    assert!(
        status["hosts"].as_array().is_some_and(
            |rows| rows.len() == 2 && rows.iter().all(|row| row["halted"]["revision"] == 2)
        ),
        "{status}"
    );

    // The halt outlives its master: the next holder reads it and does not try the
    // revision again either.
    let mut first = master;
    first.kill9();
    let master = fleet.master(&broker, "m2");
    assert!(
        wait_until_blocking(NOTICE, || master.log().contains("holding the group")),
        "m2 takes the group over\n{}",
        master.log()
    );
    let what = "the new holder kept the halt";
    still_started_over(&fleet, passes, ("2.5.0", 1), what, || master.log());

    // A retry tries it once more, and it halts again.
    let out = erel(
        &fleet.pki,
        &["config", "retry", "--group", "web"],
        &broker,
        &[],
    );
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("tries revision 2 again"), "{text}");
    assert!(
        wait_until_blocking(CONVERGE, || master.log().contains("halted at revision 2")),
        "retried and halted again\n{}",
        master.log()
    );
    assert_starts(&fleet, "2.5.0", 2);
    assert!(master.log().contains("retry asked for"), "{}", master.log());

    // A newer revision is rolled out.
    fleet.published(&broker, &fleet.config(3, "3.0.0", ONE_AT_A_TIME));
    fleet.wait_all_run("3.0.0", CONVERGE, "revision 3 is rolled out", || {
        master.log()
    });

    // The halt at revision 2 is over: shown nowhere, not even by a status read with
    // the revision-2 file (its record was cleared when revision 3 was applied).
    let out = erel(&fleet.pki, &["config", "holders"], &broker, &[]);
    let text = output_text(&out);
    assert!(out.status.success() && !text.contains("HALTED"), "{text}");
    let out = erel(&fleet.pki, &["config", "holders", "--json"], &broker, &[]);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(rows[0]["group"], "web", "{rows}");
    assert!(rows[0]["halted"].is_null(), "{rows}");
    let out = fleet
        .pki
        .erel()
        .arg("--cluster")
        .arg(&cluster)
        .arg("status")
        .args(broker.flags())
        .output()
        .expect("run erel status");
    let text = output_text(&out);
    assert!(!text.contains("HALTED"), "{text}");
}

#[test]
fn amqp_deploy_is_refused_naming_the_holder_unless_it_takes_the_group_over() {
    let _lock = BrokerLock::shared();
    // Two masters: the holder hands the lease over, the one waiting in line passes it
    // on while the request is live.
    let (fleet, broker, [m1, m2]) =
        one_host_under_masters("amqp-hold", "hold", ["m1", "m2"], ONE_AT_A_TIME);
    fleet.wait_all_run("1.0.0", CONVERGE, "the host runs 1.0.0", || {
        logs(&[&m1, &m2])
    });
    // The holder's rollout has ended (its verification is over), so that stopping the
    // release below is drift, not a failure of that rollout.
    let holder = crate::helper::poll_until_blocking(CONVERGE, || {
        [&m1, &m2]
            .into_iter()
            .find(|m| m.log().contains("revision applied"))
            .map(|m| m.name.clone())
    })
    .unwrap_or_else(|| panic!("a master holds web\n{}", logs(&[&m1, &m2])));
    let cluster = fleet.dir.path().join("cluster-1.toml");

    let deploy = |extra: &[&str]| {
        fleet
            .pki
            .erel()
            .arg("--cluster")
            .arg(&cluster)
            .arg("deploy")
            .args(broker.flags())
            .args(extra)
            .output()
            .expect("run erel deploy")
    };
    let out = deploy(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{}", output_text(&out));
    assert!(
        stderr.contains(&format!("group web is held by master {holder} since")),
        "{stderr}"
    );
    assert!(stderr.contains("--take-over"), "{stderr}");

    // Drift the deploy repairs: it really acts while it holds the group.
    stop_by_hand(&fleet, 0);
    let out = deploy(&["--take-over", "--take-over-wait", "60"]);
    let text = output_text(&out);
    assert!(out.status.success(), "{text}\n{}", logs(&[&m1, &m2]));
    assert!(
        text.contains(&format!("took over group web from master {holder}")),
        "{text}"
    );
    assert!(fleet.all_run("1.0.0"), "{:?}", fleet.beats());
    let handed =
        |m: &crate::helper::amqp::MasterProc| m.log().contains("group handed over on request");
    assert!(handed(&m1) || handed(&m2), "{}", logs(&[&m1, &m2]));
    // A master holds the group again once the deploy has ended, and repairs drift.
    assert!(
        wait_until_blocking(NOTICE, || {
            m1.log().matches("holding the group").count()
                + m2.log().matches("holding the group").count()
                >= 2
        }),
        "{}",
        logs(&[&m1, &m2])
    );
    stop_by_hand(&fleet, 0);
    fleet.wait_all_run("1.0.0", CONVERGE, "a master repairs drift again", || {
        logs(&[&m1, &m2])
    });
}

/// `GET /metrics` from `addr`: the body, or `None` when nothing answers.
fn scrape(addr: &str) -> Option<String> {
    scrape_metrics(addr, NOTICE)
}

/// The file daemon with `--metrics`: its group is `erel_group_halted 0` while it
/// converges, `1` once a broken revision halted it, `0` again when a newer revision is
/// rolled out. Its log gives the failed host's release output once, on lines of its
/// own below the failure, and its `not converged` line names the group.
#[test]
fn the_file_daemon_shows_a_halt_in_its_metrics_and_the_output_once_in_its_log() {
    let fleet = fleet_with_a_broken_release("haltmetr");
    let cluster = write_cluster(&fleet, 1, "1.0.0");
    let mut command = fleet.pki.erel();
    command
        .arg("--cluster")
        .arg(&cluster)
        .args(["master", "--metrics", "127.0.0.1:0", "--interval"])
        .arg(FILE_INTERVAL.as_secs().to_string())
        .env_remove("EREL_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let daemon = FileDaemon(Followed::spawn(&mut command, "erel master --metrics"));
    assert!(
        wait_until_blocking(NOTICE, || daemon.0.log().contains("metrics on ")),
        "{}",
        daemon.0.log()
    );
    let addr = daemon_addr(&daemon);
    fleet.wait_all_run("1.0.0", CONVERGE, "every host runs 1.0.0", || {
        daemon.0.log()
    });
    let halted = |value: u8| {
        let (addr, line) = (
            addr.clone(),
            format!("erel_group_halted{{group=\"web\"}} {value}\n"),
        );
        move || scrape(&addr).is_some_and(|body| body.contains(&line))
    };
    assert!(
        wait_until_blocking(NOTICE, halted(0)),
        "not halted while converged: {:?}\n{}",
        scrape(&daemon_addr(&daemon)),
        daemon.0.log()
    );

    write_cluster(&fleet, 2, "2.5.0");
    assert!(
        wait_until_blocking(CONVERGE, halted(1)),
        "halted after the failed rollout: {:?}\n{}",
        scrape(&daemon_addr(&daemon)),
        daemon.0.log()
    );
    let log = daemon.0.log();
    let lines: Vec<&str> = log.lines().collect();
    let failed = lines
        .iter()
        .position(|l| l.contains("web/") && l.contains("FAILED while"))
        .unwrap_or_else(|| panic!("a failure line:\n{log}"));
    assert!(
        !lines[failed].contains("failing on purpose"),
        "the output is not on the failure's own line:\n{log}"
    );
    let below: Vec<&str> = lines[failed + 1..]
        .iter()
        .take_while(|l| l.starts_with("  "))
        .copied()
        .collect();
    let crashes = below
        .iter()
        .filter(|l| l.trim() == "beat 2.5.0: failing on purpose")
        .count();
    assert!(
        crashes >= 1,
        "the output follows the failure line, indented:\n{log}"
    );
    assert_eq!(
        log.matches("beat 2.5.0: failing on purpose").count(),
        crashes,
        "the release output is logged once, below the failure:\n{log}"
    );
    assert!(
        !below.iter().any(|l| l.contains("beat 1.0.0")),
        "only the failed version's output, not what 1.0.0 printed before it:\n{log}"
    );
    let not_converged = log
        .lines()
        .find(|l| l.contains("not converged"))
        .unwrap_or_else(|| panic!("a `not converged` line:\n{log}"));
    assert!(not_converged.contains("groups=web"), "{not_converged}");

    write_cluster(&fleet, 3, "3.0.0");
    fleet.wait_all_run("3.0.0", CONVERGE, "revision 3 is rolled out", || {
        daemon.0.log()
    });
    assert!(
        wait_until_blocking(NOTICE, halted(0)),
        "the halt ends with the newer revision: {:?}\n{}",
        scrape(&daemon_addr(&daemon)),
        daemon.0.log()
    );
}

/// The metrics address a daemon said it serves on.
fn daemon_addr(daemon: &FileDaemon) -> String {
    metrics_addr(&daemon.0.log()).unwrap_or_default()
}

/// The group forms of `restart`, `stop` and `rollback` are refused like a deploy while
/// the file daemon holds the group, naming it (master name and pid) and `--take-over`,
/// and nothing on the hosts changes; `stop --group --take-over` then acts.
#[test]
fn group_restart_stop_and_rollback_are_refused_while_the_daemon_holds_the_group() {
    let fleet = Fleet::with_beat_releases("holdgrp", &["web", "web"]);
    let cluster = write_cluster(&fleet, 1, "1.0.0");
    let daemon = FileDaemon::start_converged(&fleet, &cluster);
    let pid = daemon.0.pid().expect("running");
    let starts = first_starts(&fleet, "1.0.0");
    for words in [
        ["restart", "--group", "web"],
        ["stop", "--group", "web"],
        ["rollback", "--group", "web"],
    ] {
        let out = erel_on(&fleet, &cluster, &words);
        let text = output_text(&out);
        assert!(!out.status.success(), "{words:?}: {text}");
        assert!(
            text.contains("held by the daemon erel@")
                && text.contains(&format!("pid {pid}"))
                && text.contains("--take-over"),
            "{words:?}: {text}"
        );
    }
    assert_eq!(
        starts_of(&fleet, "1.0.0"),
        starts,
        "no host was restarted\n{}",
        fleet.agent_logs()
    );
    assert!(
        fleet.all_run("1.0.0"),
        "nothing stopped: {:?}",
        fleet.beats()
    );

    let out = erel_on(&fleet, &cluster, &["stop", "--group", "web", "--take-over"]);
    let text = output_text(&out);
    assert!(out.status.success(), "{text}\n{}", daemon.0.log());
    assert!(
        text.contains("took over group(s) web from the daemon erel@"),
        "{text}"
    );
}

/// Rollback through the daemon: a revision naming the old version again takes every
/// host back to it (from the archive still unpacked there), one host at a time, and
/// each host's agent starts it once more.
#[test]
fn a_revision_naming_the_old_version_rolls_the_daemons_group_back() {
    let fleet = Fleet::with_beat_releases("daemonback", &["web", "web"]);
    let cluster = write_cluster(&fleet, 1, "1.0.0");
    let daemon = FileDaemon::start_running(&fleet, &cluster);
    write_cluster(&fleet, 2, "2.0.0");
    fleet.wait_all_run("2.0.0", CONVERGE, "every host runs 2.0.0", || {
        daemon.0.log()
    });
    assert_eq!(starts_of(&fleet, "1.0.0"), 2, "{}", fleet.agent_logs());

    write_cluster(&fleet, 3, "1.0.0");
    fleet.wait_all_run("1.0.0", CONVERGE, "revision 3 takes 1.0.0 back", || {
        daemon.0.log()
    });
    // Each host started 1.0.0 once more.
    assert_starts(&fleet, "1.0.0", 4);
    // The beats answer before the verification that follows them ends: wait for it.
    let switched_back = || {
        daemon
            .0
            .log()
            .split_once("revision=3")
            .is_some_and(|(_, after)| after.matches(": done, runs 1.0.0").count() == 2)
    };
    assert!(
        wait_until_blocking(CONVERGE, switched_back),
        "both hosts switched back, verified:\n{}",
        daemon.0.log()
    );
    let log = daemon.0.log();
    assert!(!log.contains("FAILED"), "{log}");
}

#[test]
fn amqp_daemon_says_a_group_with_an_unreachable_host_waits_and_halts_nothing() {
    let _lock = BrokerLock::shared();
    let fleet = Fleet::with_beat_releases("unreach", &["web"]);
    let broker = TestBroker::new("unreachable", &["web"]);
    let master = fleet.master(&broker, "solo");
    // A second host no agent listens for: every pass stops at it, before any switch.
    let text = format!(
        "{}\n[[host]]\nid = \"gone\"\naddr = \"127.0.0.1:1\"\ngroup = \"web\"\nenv = {{ BEAT_PORT = \"1\" }}\n",
        fleet.config(1, "1.0.0", "")
    );
    fleet.published(&broker, &text);
    let waiting = |log: &str| {
        log.lines()
            .filter(|l| l.contains("group waiting") && l.contains("gone"))
            .count()
    };
    assert!(
        wait_until_blocking(CONVERGE + MASTER_INTERVAL * 2, || waiting(&master.log())
            >= 2),
        "each pass says the group waits for the unreachable host\n{}",
        master.log()
    );
    let log = master.log();
    assert!(
        !log.contains("group halted") && !log.contains("halted at revision"),
        "nothing is halted\n{log}"
    );
    let out = erel(&fleet.pki, &["config", "holders"], &broker, &[]);
    let shown = output_text(&out);
    assert!(out.status.success() && !shown.contains("HALTED"), "{shown}");
}
