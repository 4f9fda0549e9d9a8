//! The cluster file's shape against real agents: a host in two groups runs both
//! releases, a host in no group waits until a later revision names it, the host
//! commands (`start`, `stop`, `restart`) take a group's settings, and `status` shows
//! one row per host and group with the group's probe run now.

use std::path::PathBuf;

use erel_proto::ReleaseState;

use crate::helper::release::{beat_release, shell_release};
use crate::helper::AgentCommands;
use crate::helper::{free_port, output_text, wait_until_blocking, AgentProc, Pki, PATIENCE};

/// The release that writes its environment to `$ENV_DIR/<release>-<host>.env`, then
/// sleeps.
const ENV_RELEASE: &str = "envdump";
const ENV_VERSION: &str = "1.0.0";
const BEAT_VERSION: &str = "0.1.0";

/// Agents, a directory holding the cluster file and its archives, and the directory the
/// env release writes to.
struct Site {
    pki: Pki,
    agents: Vec<AgentProc>,
    /// The port of the beat release on each agent.
    ports: Vec<u16>,
    dir: tempfile::TempDir,
    env_dir: tempfile::TempDir,
}

impl Site {
    /// One agent per id; the env release and the beat release are built beside the
    /// cluster file.
    fn new(ids: &[&str]) -> Site {
        let pki = Pki::new();
        let agents = ids
            .iter()
            .map(|id| AgentProc::start(&pki, id, &[]))
            .collect();
        let dir = tempfile::tempdir().expect("tempdir");
        let script = "#!/bin/sh\nout=\"$ENV_DIR/$EREL_RELEASE-$EREL_HOST_ID.env\"\n\
                      env > \"$out.tmp\" && mv \"$out.tmp\" \"$out\"\nexec sleep 1000\n";
        shell_release(dir.path(), ENV_RELEASE, ENV_VERSION, script);
        beat_release(dir.path(), "beat", BEAT_VERSION);
        Site {
            pki,
            agents,
            ports: ids.iter().map(|_| free_port()).collect(),
            dir,
            env_dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// One agent `id` in group `env`, deployed at revision 1; returns once the env
    /// release there has written its environment.
    fn env_group_deployed_on(id: &str) -> Site {
        let site = Site::new(&[id]);
        site.write(1, &["group = \"env\""]);
        site.deploy();
        site.env_of(id);
        site
    }

    fn cluster(&self) -> PathBuf {
        self.dir.path().join("cluster.toml")
    }

    /// Writes the cluster file: agent `i` with `memberships[i]` (a `group`/`groups`
    /// line, or "" for none) and its beat port in `BEAT_PORT`, then the groups `web`
    /// (beat, probed on `$BEAT_PORT`) and `env` (the env release) when some host
    /// names them.
    fn write(&self, revision: u64, memberships: &[&str]) {
        let mut text = format!("revision = {revision}\n");
        for ((agent, port), member) in self.agents.iter().zip(&self.ports).zip(memberships) {
            text.push_str(&format!(
                "[[host]]\nid = \"{}\"\naddr = \"{}\"\n{member}\nenv = {{ BEAT_PORT = \"{port}\", FROM_HOST = \"host {}\" }}\n",
                agent.id, agent.addr, agent.id
            ));
        }
        let named = |group: &str| {
            memberships
                .iter()
                .any(|m| m.contains(&format!("\"{group}\"")))
        };
        if named("web") {
            text.push_str(&format!(
                "[group.web]\nrelease = \"beat\"\nversion = \"{BEAT_VERSION}\"\narchive = \"beat-{BEAT_VERSION}.tar.gz\"\n\
                 stop_grace_secs = 2\nhealth = {{ tcp = \"$BEAT_PORT\", min_up_secs = 1, deadline_secs = 30 }}\n"
            ));
        }
        if named("env") {
            text.push_str(&format!(
                "[group.env]\nrelease = \"{ENV_RELEASE}\"\nversion = \"{ENV_VERSION}\"\narchive = \"{ENV_RELEASE}-{ENV_VERSION}.tar.gz\"\n\
                 stop_grace_secs = 7\nenv = {{ ENV_DIR = \"{}\", FROM_GROUP = \"group env\" }}\n\
                 health = {{ min_up_secs = 1, deadline_secs = 30 }}\n",
                self.env_dir.path().display()
            ));
        }
        std::fs::write(self.cluster(), text).expect("write the cluster file");
    }

    /// `erel --cluster <file> <words>`; (success, stdout + stderr).
    fn erel(&self, words: &[&str]) -> (bool, String) {
        let out = self
            .pki
            .erel()
            .arg("--cluster")
            .arg(self.cluster())
            .args(words)
            .output()
            .expect("run erel");
        (out.status.success(), output_text(&out))
    }

    fn deploy(&self) -> String {
        let (ok, out) = self.erel(&["deploy"]);
        assert!(ok, "erel deploy failed:\n{out}\n{}", self.logs());
        out
    }

    /// `erel status --json`: (success, rows).
    fn status(&self) -> (bool, Vec<serde_json::Value>) {
        let out = self
            .pki
            .erel()
            .arg("--cluster")
            .arg(self.cluster())
            .args(["status", "--json"])
            .output()
            .expect("run erel status");
        let rows: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("status --json: {e}\n{}", output_text(&out)));
        let rows = rows.as_array().expect("an array").clone();
        (out.status.success(), rows)
    }

    /// What the env release on `host` wrote, once it has.
    fn env_of(&self, host: &str) -> String {
        let path = self.env_file(host);
        assert!(
            wait_until_blocking(PATIENCE, || path.exists()),
            "{} was never written\n{}",
            path.display(),
            self.logs()
        );
        std::fs::read_to_string(&path).expect("read the env file")
    }

    fn env_file(&self, host: &str) -> PathBuf {
        self.env_dir
            .path()
            .join(format!("{ENV_RELEASE}-{host}.env"))
    }

    /// (release name, version, state) of every release `agent` reports.
    async fn releases(&self, agent: usize) -> Vec<(String, Option<String>, ReleaseState)> {
        let mut client = self.pki.connect(&self.agents[agent]).await;
        let pong = client.ping().await.expect("ping");
        let mut out: Vec<_> = pong
            .releases
            .into_iter()
            .map(|r| (r.name, r.version, r.state))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn logs(&self) -> String {
        self.agents
            .iter()
            .map(|a| format!("--- agent {}\n{}", a.id, a.log()))
            .collect()
    }
}

fn running(name: &str, version: &str) -> (String, Option<String>, ReleaseState) {
    (
        name.to_string(),
        Some(version.to_string()),
        ReleaseState::Running,
    )
}

/// The status row of `host` and `group` (`None`: the waiting row).
fn row<'a>(
    rows: &'a [serde_json::Value],
    host: &str,
    group: Option<&str>,
) -> &'a serde_json::Value {
    rows.iter()
        .find(|r| r["host"] == host && r["group"].as_str() == group)
        .unwrap_or_else(|| panic!("no row for {host} {group:?} in {rows:#?}"))
}

fn has_line(env: &str, line: &str) -> bool {
    env.lines().any(|l| l == line)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_host_in_two_groups_runs_both_releases() {
    let site = Site::new(&["multi-1", "multi-2"]);
    site.write(1, &["groups = [\"web\", \"env\"]", "group = \"web\""]);
    site.deploy();

    assert_eq!(
        site.releases(0).await,
        [
            running("beat", BEAT_VERSION),
            running(ENV_RELEASE, ENV_VERSION)
        ],
        "the host in two groups runs both releases"
    );
    assert_eq!(site.releases(1).await, [running("beat", BEAT_VERSION)]);
    let env = site.env_of("multi-1");
    assert!(has_line(&env, "FROM_GROUP=group env"), "{env}");
    assert!(has_line(&env, "FROM_HOST=host multi-1"), "{env}");
    assert!(
        !site.env_file("multi-2").exists(),
        "multi-2 is not in group env"
    );

    let (ok, rows) = site.status();
    assert!(ok, "{rows:#?}");
    assert_eq!(rows.len(), 3, "one row per host and group: {rows:#?}");
    for (host, group, probe) in [
        ("multi-1", "web", "ok"),
        ("multi-1", "env", "-"),
        ("multi-2", "web", "ok"),
    ] {
        let r = row(&rows, host, Some(group));
        assert_eq!(r["state"], "running", "{r:#}");
        assert_eq!(r["converged"], true, "{r:#}");
        assert_eq!(r["probe"], probe, "{r:#}");
        assert_eq!(r["argv_env"], "match", "started by this deploy: {r:#}");
    }

    // A stopped beat is not probed (it is not meant to answer): the probe says why.
    let (ok, out) = site.erel(&["stop", "multi-2", "beat"]);
    assert!(ok, "{out}");
    let (ok, rows) = site.status();
    assert!(!ok, "a stopped release is not converged");
    let r = row(&rows, "multi-2", Some("web"));
    assert_eq!(r["probe"], "- (not probed: stopped)", "{r:#}");
    assert_eq!(r["probes"], serde_json::json!([]), "{r:#}");
    assert_eq!(r["state"], "stopped");
    assert_eq!(row(&rows, "multi-1", Some("web"))["probe"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_host_is_left_alone_until_a_revision_names_it() {
    let site = Site::new(&["wait-1", "wait-2"]);
    site.write(1, &["group = \"env\"", ""]);
    let (ok, out) = site.erel(&["deploy", "--dry-run"]);
    assert!(
        ok && out.contains("waiting (in no group, nothing deployed): wait-2"),
        "{out}"
    );
    site.deploy();
    site.env_of("wait-1");
    assert_eq!(
        site.releases(1).await,
        [],
        "nothing deployed to the waiting host"
    );

    let (ok, rows) = site.status();
    assert!(ok, "a waiting host that answers is fine: {rows:#?}");
    let waiting = row(&rows, "wait-2", None);
    assert_eq!(waiting["state"], "waiting", "{waiting:#}");
    assert_eq!(waiting["reachable"], true);
    assert_eq!(waiting["desired_version"], serde_json::Value::Null);
    let (_, table) = site.erel(&["status"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("wait-2") && l.contains("waiting")),
        "{table}"
    );

    site.write(2, &["group = \"env\"", "groups = [\"env\"]"]);
    site.deploy();
    assert_eq!(site.releases(1).await, [running(ENV_RELEASE, ENV_VERSION)]);
    let env = site.env_of("wait-2");
    assert!(has_line(&env, "FROM_HOST=host wait-2"), "{env}");
    let (ok, rows) = site.status();
    assert!(ok, "{rows:#?}");
    assert_eq!(row(&rows, "wait-2", Some("env"))["converged"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_commands_take_the_groups_settings() {
    let site = Site::env_group_deployed_on("cmd-1");

    let (ok, out) = site.erel(&["stop", "cmd-1", ENV_RELEASE]);
    assert!(ok, "{out}");
    assert!(
        out.contains("group 'env'") && out.contains("stop_grace_secs 7"),
        "the group's grace: {out}"
    );
    assert!(out.contains("cmd-1: envdump stopped"), "{out}");
    // Delete on one host is this stop: what the README lists stays on disk (the
    // unpacked version, its data directory, its output log, its run record).
    let root = &site.agents[0].root;
    for kept in [
        root.join("releases").join(ENV_RELEASE).join(ENV_VERSION),
        root.join("data").join(ENV_RELEASE),
        root.join(".erel/logs").join(format!("{ENV_RELEASE}.log")),
        root.join(".erel/releases"),
        root.join("archives"),
    ] {
        assert!(kept.exists(), "{} stays after a stop", kept.display());
    }
    std::fs::remove_file(site.env_file("cmd-1")).expect("remove");

    // The group's env, with the host's merged over it, reaches the release.
    let (ok, out) = site.erel(&["start", "cmd-1", ENV_RELEASE, ENV_VERSION]);
    assert!(ok, "{out}");
    let env = site.env_of("cmd-1");
    assert!(has_line(&env, "FROM_GROUP=group env"), "{env}");
    assert!(has_line(&env, "FROM_HOST=host cmd-1"), "{env}");
    let path = format!("ENV_DIR={}", site.env_dir.path().display());
    assert!(has_line(&env, &path), "{env}");
    std::fs::remove_file(site.env_file("cmd-1")).expect("remove");

    // restart: the running version, the group's settings, a flag overriding one and
    // saying so.
    let (ok, out) = site.erel(&["restart", "cmd-1", ENV_RELEASE, "--env", "FROM_GROUP=flag"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("overrides FROM_GROUP of group 'env'"),
        "the override is said: {out}"
    );
    assert!(out.contains("cmd-1: envdump stopped"), "{out}");
    assert!(
        out.contains(&format!("envdump {ENV_VERSION} started")),
        "{out}"
    );
    let env = site.env_of("cmd-1");
    assert!(has_line(&env, "FROM_GROUP=flag"), "{env}");
    assert!(has_line(&env, "FROM_HOST=host cmd-1"), "{env}");

    // A restart whose Start could never fit in a frame is refused before the stop.
    let pids = site.agents[0].release_pids(ENV_RELEASE);
    assert!(!pids.is_empty(), "envdump runs");
    let big = format!("BIG={}", "x".repeat(70_000));
    let (ok, out) = site.erel(&["restart", "cmd-1", ENV_RELEASE, "--env", &big]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("cmd-1: the Start request would be")
            && out.contains("65536-byte frame limit (env.BIG is 70003 bytes); refused before anything was changed"),
        "{out}"
    );
    assert!(!out.contains("stopped"), "{out}");
    assert_eq!(site.agents[0].release_pids(ENV_RELEASE), pids);

    // A release no group of the host runs: said, then the agent's refusal.
    let (ok, out) = site.erel(&["start", "cmd-1", "nosuch", "1"]);
    assert!(!ok, "{out}");
    assert!(out.contains("no group of this host runs 'nosuch'"), "{out}");

    // ID@ADDR:PORT names no group: the command line alone, as before.
    let direct = site.agents[0].host().to_string();
    let (ok, out) = site.erel(&["stop", &direct, ENV_RELEASE]);
    assert!(ok && !out.contains("group"), "{out}");
    std::fs::remove_file(site.env_file("cmd-1")).expect("remove");
    let (ok, out) = site.erel(&["restart", &direct, ENV_RELEASE, "--env", &path]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!(
            "no cluster group: envdump {ENV_VERSION} is started with the command line's"
        )) && out.contains("envdump was not running"),
        "the version last run, and a warning: {out}"
    );
    let env = site.env_of("cmd-1");
    assert!(!env.contains("FROM_GROUP"), "no group settings: {env}");
}

/// `argv_env` of the status row of `host` in `group`: (word, why).
fn argv_env(site: &Site, host: &str, group: &str) -> (String, String) {
    let (_, rows) = site.status();
    let r = row(&rows, host, Some(group));
    (
        r["argv_env"].as_str().unwrap_or_default().to_string(),
        r["argv_env_why"].as_str().unwrap_or_default().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_says_whether_a_release_runs_with_its_groups_argv_and_env() {
    let site = Site::env_group_deployed_on("argv-1");
    assert_eq!(
        argv_env(&site, "argv-1", "env"),
        ("match".to_string(), String::new()),
        "the deploy recorded what it started"
    );

    // The group's env changes in the file, the version does not: what runs differs.
    let text = std::fs::read_to_string(site.cluster()).expect("read the cluster file");
    let changed = text.replace("revision = 1", "revision = 2").replace(
        "FROM_GROUP = \"group env\"",
        "FROM_GROUP = \"group env, changed\"",
    );
    assert_ne!(text, changed);
    std::fs::write(site.cluster(), &changed).expect("write the cluster file");
    let (word, why) = argv_env(&site, "argv-1", "env");
    assert_eq!(word, "differs", "{why}");
    assert!(why.contains("restart to apply"), "{why}");
    let (_, table) = site.erel(&["status"]);
    assert!(
        table.contains("argv-1/env: argv/env differs: started with other argv/env/user")
            && table.contains("argv/env: 0 of 1 running release(s)"),
        "{table}"
    );

    // A group restart applies the file's settings: they match again.
    let (ok, out) = site.erel(&["restart", "--group", "env"]);
    assert!(ok, "{out}");
    assert_eq!(argv_env(&site, "argv-1", "env").0, "match", "{out}");

    // Started by hand with an env of its own (the command line overrides the group).
    let (ok, out) = site.erel(&["stop", "argv-1", ENV_RELEASE]);
    assert!(ok, "{out}");
    let (ok, out) = site.erel(&["start", "argv-1", ENV_RELEASE, ENV_VERSION, "--env", "X=1"]);
    assert!(ok, "{out}");
    let (word, why) = argv_env(&site, "argv-1", "env");
    assert_eq!(word, "differs", "{why}");

    // Started through the agent's address, which names no group and keeps no record:
    // the pid is not the recorded one.
    let direct = site.agents[0].host().to_string();
    let (ok, out) = site.erel(&["restart", &direct, ENV_RELEASE]);
    assert!(ok, "{out}");
    let (word, why) = argv_env(&site, "argv-1", "env");
    assert_eq!(word, "unknown", "{why}");
    assert!(
        why.contains("started by another master or by hand"),
        "{why}"
    );

    // Not running: nothing to compare.
    let (ok, out) = site.erel(&["stop", "argv-1", ENV_RELEASE]);
    assert!(ok, "{out}");
    assert_eq!(
        argv_env(&site, "argv-1", "env"),
        ("-".to_string(), String::new())
    );
}

#[test]
fn a_release_the_file_daemon_started_shows_argv_env_match() {
    let site = Site::new(&["argvd-1"]);
    site.write(1, &["group = \"env\""]);
    let mut command = site.pki.erel();
    command
        .arg("--cluster")
        .arg(site.cluster())
        .arg("master")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    /// Killed when the test ends, however it ends.
    struct Daemon(crate::helper::Followed);
    impl Drop for Daemon {
        fn drop(&mut self) {
            self.0.kill9();
        }
    }
    let daemon = Daemon(crate::helper::Followed::spawn(
        &mut command,
        "erel master --cluster",
    ));
    let mut last = (String::new(), String::new());
    let matched = wait_until_blocking(PATIENCE, || {
        last = argv_env(&site, "argvd-1", "env");
        last.0 == "match"
    });
    assert!(
        matched,
        "the daemon's start is recorded: last {last:?}\n{}\n{}",
        daemon.0.log(),
        site.logs()
    );
}

/// A cluster file that validation refuses reaches no agent: an empty group, and a
/// `version` its archive does not hold (today's archives carry `releases/<version>/`),
/// each refused by `erel deploy` naming the file, the field and the value, with the
/// agent's releases unchanged. Before validation knew them, the first went unnoticed and
/// the second was caught only at staging, on a host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_file_that_validation_refuses_touches_no_agent() {
    let site = Site::new(&["val-1"]);
    let cluster = site.cluster();
    let file = cluster.display().to_string();

    // An empty group: `web` is defined, but no host names it.
    site.write(1, &["group = \"env\""]);
    let text = std::fs::read_to_string(&cluster).expect("read");
    let web = format!(
        "[group.web]\nrelease = \"beat\"\nversion = \"{BEAT_VERSION}\"\narchive = \"beat-{BEAT_VERSION}.tar.gz\"\n"
    );
    std::fs::write(&cluster, format!("{text}{web}")).expect("write");
    let (ok, out) = site.erel(&["deploy"]);
    assert!(!ok, "an empty group is refused: {out}");
    for part in [file.as_str(), "group.web", "no host names group 'web'"] {
        assert!(out.contains(part), "names {part:?}: {out}");
    }

    // A version the archive does not hold.
    site.write(2, &["group = \"env\""]);
    let text = std::fs::read_to_string(&cluster).expect("read");
    let wrong = text.replacen(
        &format!("version = \"{ENV_VERSION}\""),
        "version = \"9.9.9\"",
        1,
    );
    assert_ne!(wrong, text, "the group's version was replaced");
    std::fs::write(&cluster, wrong).expect("write");
    let (ok, out) = site.erel(&["deploy"]);
    assert!(!ok, "a version the archive does not hold is refused: {out}");
    for part in [
        file.as_str(),
        "group.env.version",
        "'9.9.9'",
        &format!("version(s) found: {ENV_VERSION}"),
    ] {
        assert!(out.contains(part), "names {part:?}: {out}");
    }
    assert_eq!(site.releases(0).await, [], "no agent was touched");

    // The same file with the right version deploys.
    site.write(3, &["group = \"env\""]);
    site.deploy();
    assert_eq!(site.releases(0).await, [running(ENV_RELEASE, ENV_VERSION)]);
}
