//! Health probes with evidence, and the drain before a cold stop, against real agents
//! running a release that serves HTTP: a 2xx makes it healthy and the deploy output
//! shows on what evidence; a 500 is rolled back and the evidence names the status;
//! `passes = 3` needs three passes in a row; a running release is asked to drain before
//! its stop; a drain that never answers is given up after its timeout. `erel status`
//! looks at the same HTTP probe once and shows its answer, a 500 included.

use std::path::{Path, PathBuf};
use std::time::Duration;

use erel_master::client::Connector;
use erel_master::cluster::Plan;
use erel_master::release::{write_tarball, ReleaseFile};
use erel_master::rollout::{self, RolloutEvent, RolloutOptions, RolloutReport, VerdictKind};

use crate::helper::fleet::Fleet;
use crate::helper::{output_text, poll_until_blocking, PATIENCE};

const RELEASE: &str = "web";

/// How the HTTP release behaves, fixed when its tarball is built (a rollback restarts
/// the old version with the group's env, so behaviour cannot come from the env).
#[derive(Clone, Copy)]
struct Behaviour {
    /// The status `GET /health` answers.
    health_status: u16,
    /// The first this many `GET /health` answer 500 instead.
    fail_first: u32,
    /// `POST /drain` never answers.
    drain_hangs: bool,
}

const SERVES: Behaviour = Behaviour {
    health_status: 200,
    fail_first: 0,
    drain_hangs: false,
};

impl Behaviour {
    /// This behaviour, with `GET /health` answering `status`.
    const fn answering(self, status: u16) -> Self {
        Behaviour {
            health_status: status,
            ..self
        }
    }

    /// This behaviour, with the first `count` `GET /health` answering 500.
    const fn failing_first(self, count: u32) -> Self {
        Behaviour {
            fail_first: count,
            ..self
        }
    }

    /// This behaviour, with `POST /drain` never answering.
    const fn hanging_on_drain(self) -> Self {
        Behaviour {
            drain_hangs: true,
            ..self
        }
    }
}

/// A release whose `bin/web foreground` is a Python HTTP server on `$HTTP_PORT`:
/// `GET /health` answers as `behaviour` says, `POST /drain` answers 200 (or never);
/// it appends `health <version> <host> <status>`, `drain <version> <host>` and, on
/// SIGTERM, `term <version> <host>` to the file `$RECORD`.
fn http_release(dir: &Path, version: &str, behaviour: Behaviour) -> PathBuf {
    let Behaviour {
        health_status,
        fail_first,
        drain_hangs,
    } = behaviour;
    let hangs = if drain_hangs { "True" } else { "False" };
    let script = format!(
        r#"#!/usr/bin/env python3
import os, signal, threading, time
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler

VERSION = "{version}"
HOST = os.environ.get("EREL_HOST_ID", "?")
RECORD = os.environ["RECORD"]
lock = threading.Lock()
seen = [0]

def note(line):
    with lock:
        with open(RECORD, "a") as f:
            f.write(line + "\n")

class Handler(BaseHTTPRequestHandler):
    def answer(self, code):
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):
        if self.path != "/health":
            return self.answer(404)
        with lock:
            seen[0] += 1
            n = seen[0]
        code = 500 if n <= {fail_first} else {health_status}
        note("health %s %s %d" % (VERSION, HOST, code))
        self.answer(code)

    def do_POST(self):
        if self.path != "/drain":
            return self.answer(404)
        note("drain %s %s" % (VERSION, HOST))
        if {hangs}:
            time.sleep(3600)
        self.answer(200)

    def log_message(self, *args):
        pass

def term(*_):
    note("term %s %s" % (VERSION, HOST))
    os._exit(0)

signal.signal(signal.SIGTERM, term)
ThreadingHTTPServer(("127.0.0.1", int(os.environ["HTTP_PORT"])), Handler).serve_forever()
"#
    );
    let files = [
        ReleaseFile::start_script(RELEASE, &script),
        ReleaseFile::marker(RELEASE, version),
    ];
    let dir = dir.join("releases");
    std::fs::create_dir_all(&dir).expect("mkdir");
    write_tarball(&dir, RELEASE, version, &files).expect("write tarball")
}

/// One agent in group `web`, its release serving on `HTTP_PORT`, recording to `record`.
struct Site {
    fleet: Fleet,
    record: PathBuf,
}

impl Site {
    fn new(prefix: &str) -> Self {
        let fleet = Fleet::new(prefix, &["web"]);
        let record = fleet.dir.path().join("record.txt");
        Site { fleet, record }
    }

    fn cluster(&self) -> PathBuf {
        self.fleet.dir.path().join("cluster.toml")
    }

    fn port(&self) -> u16 {
        self.fleet.ports[0]
    }

    /// Writes the cluster file: `version` from `archive`, with `lines` in the group.
    fn write(&self, revision: u64, version: &str, archive: &Path, lines: &str) {
        let name = archive.file_name().expect("name").to_string_lossy();
        let text = format!(
            "revision = {revision}\n{}[group.web]\nrelease = \"{RELEASE}\"\nversion = \"{version}\"\n\
             archive = \"releases/{name}\"\nstop_grace_secs = 5\n\
             env = {{ RECORD = \"{}\" }}\n{lines}\n",
            self.fleet.hosts_toml("HTTP_PORT"),
            self.record.display()
        );
        std::fs::write(self.cluster(), text).expect("write cluster file");
    }

    /// Writes the cluster file ([`Site::write`]) and deploys it; returns the output,
    /// or panics with it and the agents' logs unless the deploy succeeds.
    fn deployed(&self, revision: u64, version: &str, archive: &Path, lines: &str) -> String {
        let (ok, out) = self.deploy_revision(revision, version, archive, lines);
        assert!(ok, "{out}\n{}", self.logs());
        out
    }

    /// Builds 0.1.0 behaving as `old` and 0.2.0 behaving as `new`, deploys 0.1.0 at
    /// revision 1 ([`Site::deployed`]), then 0.2.0 at revision 2, both with `lines`;
    /// the second deploy's (success, stdout + stderr).
    fn upgrade(&self, old: Behaviour, new: Behaviour, lines: &str) -> (bool, String) {
        let v1 = http_release(self.fleet.dir.path(), "0.1.0", old);
        let v2 = http_release(self.fleet.dir.path(), "0.2.0", new);
        self.deployed(1, "0.1.0", &v1, lines);
        self.deploy_revision(2, "0.2.0", &v2, lines)
    }

    /// Writes the cluster file ([`Site::write`]) and runs [`Site::deploy`].
    fn deploy_revision(
        &self,
        revision: u64,
        version: &str,
        archive: &Path,
        lines: &str,
    ) -> (bool, String) {
        self.write(revision, version, archive, lines);
        self.deploy()
    }

    /// Runs the real `erel deploy`; (success, stdout + stderr).
    fn deploy(&self) -> (bool, String) {
        let out = self
            .fleet
            .pki
            .erel()
            .arg("deploy")
            .arg("--cluster")
            .arg(self.cluster())
            .output()
            .expect("run erel deploy");
        (out.status.success(), output_text(&out))
    }

    /// Runs the real `erel <words> --cluster <file>`; (success, stdout + stderr).
    fn erel(&self, words: &[&str]) -> (bool, String) {
        let out = self
            .fleet
            .pki
            .erel()
            .args(words)
            .arg("--cluster")
            .arg(self.cluster())
            .output()
            .expect("run erel");
        (out.status.success(), output_text(&out))
    }

    /// `erel status --json`: the row of the one host.
    fn status_row(&self) -> serde_json::Value {
        let out = self
            .fleet
            .pki
            .erel()
            .args(["status", "--json", "--cluster"])
            .arg(self.cluster())
            .output()
            .expect("run erel status");
        let rows: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("status --json: {e}\n{}", output_text(&out)));
        rows[0].clone()
    }

    /// Runs a rollout in this process; its report and every event.
    async fn rollout(&self) -> (RolloutReport, Vec<RolloutEvent>) {
        let plan = Plan::load(&self.cluster()).expect("valid cluster file");
        let connector = Connector::new(self.fleet.pki.client_config(), "test-master");
        let options = RolloutOptions {
            poll_interval: Duration::from_millis(100),
            ..RolloutOptions::default()
        };
        let mut events = Vec::new();
        let report = rollout::run(&plan, &connector, &options, |e| events.push(e.clone()))
            .await
            .expect("rollout runs");
        (report, events)
    }

    /// The lines the release recorded so far.
    fn recorded(&self) -> Vec<String> {
        std::fs::read_to_string(&self.record)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn logs(&self) -> String {
        format!(
            "record:\n{}\n{}",
            self.recorded().join("\n"),
            self.fleet.agent_logs()
        )
    }
}

const HTTP_HEALTH: &str =
    "health = { http = \"$HTTP_PORT\", path = \"/health\", min_up_secs = 1, deadline_secs = 30 }";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_2xx_is_healthy_and_the_deploy_output_shows_the_evidence() {
    let site = Site::new("hok");
    let v1 = http_release(site.fleet.dir.path(), "0.1.0", SERVES);
    let out = site.deployed(1, "0.1.0", &v1, HTTP_HEALTH);
    let probe = format!("http GET 127.0.0.1:{}/health", site.port());
    let verdict = out
        .lines()
        .find(|l| l.contains("0.1.0 healthy:"))
        .unwrap_or_else(|| panic!("no verdict line in:\n{out}"));
    assert!(
        verdict.contains(&format!("{probe} pass: HTTP 200 OK in "))
            && verdict.contains("1/1 consecutive passes")
            && verdict.contains("0 restart(s)"),
        "{verdict}"
    );
    assert!(
        site.recorded()
            .contains(&"health 0.1.0 hok-1 200".to_string()),
        "the release saw the probe: {}",
        site.logs()
    );

    // `erel status` looks at the same probe once, and carries its answer.
    let row = site.status_row();
    assert_eq!(row["probe"], "ok", "{row:#}");
    assert_eq!(row["probes"].as_array().map(Vec::len), Some(1), "{row:#}");
    assert_eq!(row["probes"][0]["probe"], probe, "{row:#}");
    assert_eq!(row["probes"][0]["passed"], true, "{row:#}");
    assert_eq!(row["probes"][0]["answer"], "HTTP 200 OK", "{row:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_500_is_rolled_back_and_the_evidence_names_the_status() {
    let site = Site::new("h500");
    let broken = SERVES.answering(500);
    // A short deadline, as 0.2.0 answers 500 for as long as it runs; it also bounds
    // the old version's verification after the rollback, so it leaves that room.
    const DEADLINE_SECS: u64 = 6;
    let health = format!(
        "health = {{ http = \"$HTTP_PORT\", path = \"/health\", min_up_secs = 1, deadline_secs = {DEADLINE_SECS} }}"
    );
    let (ok, out) = site.upgrade(SERVES, broken, &health);
    assert!(!ok, "0.2.0 must fail:\n{out}");
    let probe = format!("http GET 127.0.0.1:{}/health", site.port());
    assert!(
        out.contains(&format!(
            "0.2.0 NOT HEALTHY BY THE DEADLINE: {probe} FAIL: HTTP 500 Internal Server Error"
        )),
        "the verdict line names the status:\n{out}"
    );
    assert!(
        out.contains(&format!(
            "not healthy within {DEADLINE_SECS}s: {probe} answered HTTP 500 Internal Server Error"
        )) && out.contains("rolled back"),
        "the failure names the status:\n{out}"
    );
    assert!(
        out.contains("0.1.0 healthy:"),
        "the old version is verified again:\n{out}"
    );
    let running = site.fleet.running(RELEASE).await;
    assert_eq!(running[0].0.as_deref(), Some("0.1.0"), "{}", site.logs());

    // Started by hand, 0.2.0 runs and answers 500: `erel status` shows the probe's
    // failure with its answer, once the server listens (before, the answer is a
    // refused connection).
    let (ok, out) = site.erel(&["stop", "h500-1", RELEASE]);
    assert!(ok, "{out}");
    let (ok, out) = site.erel(&["start", "h500-1", RELEASE, "0.2.0"]);
    assert!(ok, "{out}\n{}", site.logs());
    let row = poll_until_blocking(PATIENCE, || {
        let row = site.status_row();
        let answered = row["probes"][0]["answer"]
            .as_str()
            .is_some_and(|a| a.starts_with("HTTP "));
        answered.then_some(row)
    })
    .unwrap_or_else(|| panic!("status never saw 0.2.0 answer\n{}", site.logs()));
    let failed = format!("failed: {probe}: HTTP 500 Internal Server Error");
    assert_eq!(row["probe"], failed.as_str(), "{row:#}");
    assert_eq!(row["probes"][0]["passed"], false, "{row:#}");
    assert_eq!(row["running_version"], "0.2.0", "{row:#}");
    let (_, table) = site.erel(&["status"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("h500-1") && l.ends_with(&failed)),
        "the table shows the failure:\n{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_passes_are_needed_and_a_failure_resets_the_count() {
    let site = Site::new("hpass");
    let flaky = SERVES.failing_first(2);
    let v1 = http_release(site.fleet.dir.path(), "0.1.0", flaky);
    site.write(
        1,
        "0.1.0",
        &v1,
        "health = { http = \"$HTTP_PORT\", passes = 3, min_up_secs = 1, deadline_secs = 30 }",
    );
    let (report, events) = site.rollout().await;
    assert!(report.converged(), "{report:?}\n{}", site.logs());
    let evidence = events
        .iter()
        .find_map(|e| match e {
            RolloutEvent::HostVerdict {
                verdict: VerdictKind::Healthy,
                evidence,
                ..
            } => Some(evidence.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no healthy verdict: {events:?}"));
    assert_eq!((evidence.passes, evidence.passes_needed), (3, 3));
    assert_eq!(evidence.probes.len(), 1);
    assert!(evidence.probes[0].passed, "{evidence:?}");
    assert_eq!(evidence.probes[0].answer, "HTTP 200 OK");

    // What the release saw: two 500s, then (a probe cut short on a busy machine may
    // add more) at least three 200s in a row, the last answers before the verdict.
    let probes: Vec<String> = site
        .recorded()
        .into_iter()
        .filter(|l| l.starts_with("health "))
        .collect();
    assert!(
        probes.len() >= 5,
        "two failures and three passes: {probes:?}"
    );
    assert_eq!(
        probes[..2],
        ["health 0.1.0 hpass-1 500", "health 0.1.0 hpass-1 500"]
    );
    assert!(
        probes[probes.len() - 3..]
            .iter()
            .all(|l| l == "health 0.1.0 hpass-1 200"),
        "{probes:?}"
    );
}

/// The drain outcomes among `events`.
fn drains(events: &[RolloutEvent]) -> Vec<rollout::DrainOutcome> {
    events
        .iter()
        .filter_map(|e| match e {
            RolloutEvent::HostDrain { outcome, .. } => Some(outcome.clone()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_running_release_is_drained_before_its_stop() {
    let site = Site::new("hdrain");
    let v1 = http_release(site.fleet.dir.path(), "0.1.0", SERVES);
    let v2 = http_release(site.fleet.dir.path(), "0.2.0", SERVES);
    let lines = format!(
        "{HTTP_HEALTH}\ndrain = {{ http = \"$HTTP_PORT\", path = \"/drain\", timeout_secs = 10 }}"
    );
    site.write(1, "0.1.0", &v1, &lines);
    let (report, events) = site.rollout().await;
    assert!(report.converged(), "{report:?}\n{}", site.logs());
    assert!(
        drains(&events).is_empty(),
        "nothing ran, nothing to drain: {events:?}"
    );

    site.write(2, "0.2.0", &v2, &lines);
    let (report, events) = site.rollout().await;
    assert!(report.converged(), "{report:?}\n{}", site.logs());
    let drained = drains(&events);
    assert_eq!(drained.len(), 1, "{events:?}");
    let outcome = &drained[0];
    assert!(outcome.drained, "{outcome:?}");
    assert_eq!(outcome.version.as_deref(), Some("0.1.0"));
    assert_eq!(outcome.answer, "HTTP 200 OK");
    assert_eq!(
        outcome.request,
        format!("POST http://127.0.0.1:{}/drain", site.port())
    );

    // The old release recorded the drain, then its stop, in that order.
    let record = site.recorded();
    let at = |line: &str| record.iter().position(|l| l == line);
    let drain = at("drain 0.1.0 hdrain-1").unwrap_or_else(|| panic!("{}", site.logs()));
    let term = at("term 0.1.0 hdrain-1").unwrap_or_else(|| panic!("{}", site.logs()));
    assert!(drain < term, "drained before the stop: {record:?}");
    assert_eq!(
        record.iter().filter(|l| l.starts_with("drain")).count(),
        1,
        "drained once: {record:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_that_never_answers_is_given_up_after_its_timeout() {
    let site = Site::new("hhang");
    let stuck = SERVES.hanging_on_drain();
    const DRAIN_TIMEOUT_SECS: u64 = 1;
    let lines = format!(
        "{HTTP_HEALTH}\ndrain = {{ http = \"$HTTP_PORT\", timeout_secs = {DRAIN_TIMEOUT_SECS} }}"
    );
    let (ok, out) = site.upgrade(stuck, SERVES, &lines);
    assert!(
        ok,
        "the stop proceeds after the drain timeout:\n{out}\n{}",
        site.logs()
    );
    assert!(
        out.contains(&format!(
            "NOT drained: POST http://127.0.0.1:{}/drain got no answer: no answer within {DRAIN_TIMEOUT_SECS}s",
            site.port()
        )) && out.contains("stopping it anyway"),
        "the deploy output says it gave up:\n{out}"
    );
    let record = site.recorded();
    let at = |line: &str| record.iter().position(|l| l == line);
    let drain = at("drain 0.1.0 hhang-1").unwrap_or_else(|| panic!("{}", site.logs()));
    let term = at("term 0.1.0 hhang-1").unwrap_or_else(|| panic!("{}", site.logs()));
    assert!(drain < term, "asked to drain, then stopped: {record:?}");
    let running = site.fleet.running(RELEASE).await;
    assert_eq!(running[0].0.as_deref(), Some("0.2.0"));
}
