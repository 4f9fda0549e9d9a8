//! How `erel` speaks to its operator: one message per failure with nothing from the
//! libraries before it, words that say what happened to a host, JSON where a table or
//! plan is printed.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::helper::release::beat_release;
use crate::helper::{assert_holds_all, free_port, output_text, temp_path, Pki, MASTER_BIN};

/// `erel` with `args`, with no `EREL_LOG` from the environment: the defaults are
/// under test.
fn erel(args: &[&str]) -> Output {
    Command::new(MASTER_BIN)
        .args(args)
        .env_remove("EREL_LOG")
        .output()
        .expect("run erel")
}

fn stderr_lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

/// The command failed and said so once, on one line of stderr starting `erel: ` and
/// holding `needle`; no library's log line came before it.
fn failed_once(out: &Output, needle: &str) -> String {
    assert!(!out.status.success(), "{}", output_text(out));
    let lines = stderr_lines(out);
    assert_eq!(lines.len(), 1, "one message, said once: {lines:#?}");
    let line = &lines[0];
    assert!(line.starts_with("erel: "), "{line}");
    assert!(line.contains(needle), "{needle:?} missing: {line}");
    for noise in ["ERROR", "WARN", "lapin"] {
        assert!(!line.contains(noise), "{noise} in {line}");
    }
    line.clone()
}

#[test]
fn a_refused_amqp_login_prints_erels_message_alone() {
    let url = crate::helper::amqp::amqp_url().replacen("guest:guest@", "guest:WRONG@", 1);
    assert!(url.contains("WRONG"), "{url}");
    let out = erel(&["config", "show", "--amqp", &url]);
    let said = failed_once(&out, "ACCESS_REFUSED");
    assert!(!said.contains("WRONG"), "the password is hidden: {said}");

    // EREL_LOG still turns the libraries' logs on.
    let loud = Command::new(MASTER_BIN)
        .args(["config", "show", "--amqp", &url])
        .env("EREL_LOG", "lapin=error")
        .output()
        .expect("run erel");
    assert!(!loud.status.success());
    assert!(
        String::from_utf8_lossy(&loud.stderr).contains("lapin"),
        "{}",
        output_text(&loud)
    );
}

#[test]
fn start_up_errors_are_printed_once() {
    let (dir, missing_certs) = temp_path("no-certs");
    let missing_certs = missing_certs.to_str().expect("utf8");
    let out = erel(&["--certs", missing_certs, "ping", "web-1@127.0.0.1:1"]);
    failed_once(&out, "no-certs");

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "revision = [\n").expect("write");
    let bad = bad.to_str().expect("utf8");
    let pki = Pki::new();
    for command in [
        &["status"][..],
        &["deploy"],
        &["deploy", "--dry-run"],
        &["master"],
    ] {
        let out = erel_with(&pki, Path::new(bad), command);
        failed_once(&out, "bad.toml");
    }

    let out = erel(&["config", "show", "--amqp", "not a url"]);
    failed_once(&out, "not a url");

    // A refusal that names its command names the program once.
    let out = erel(&["stop", "--grace", "3"]);
    assert!(!out.status.success());
    let lines = stderr_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(lines[0].starts_with("erel stop: "), "{lines:#?}");

    // The agent says a start-up error once: one line, no log record repeating it.
    let agent = Command::new(crate::helper::AGENT_BIN)
        .args(["--listen", "127.0.0.1:0", "--certs"])
        .arg(dir.path().join("no-bundle"))
        .arg("--root")
        .arg(dir.path().join("root"))
        .env_remove("EREL_LOG")
        .output()
        .expect("run erel-boot");
    assert!(!agent.status.success());
    let lines = stderr_lines(&agent);
    assert_eq!(lines.len(), 1, "said once: {lines:#?}");
    assert!(
        lines[0].starts_with("erel-boot: --certs: ") && lines[0].contains("no-bundle"),
        "{lines:#?}"
    );
}

/// A PKI, a beat archive and a cluster file naming one host `id` at an address nobody
/// listens on; returns the PKI, the address and the file.
fn dead_host_cluster(id: &str) -> (Pki, String, PathBuf) {
    let pki = Pki::new();
    let addr = format!("127.0.0.1:{}", free_port());
    let dir = pki.dir.path();
    let releases = dir.join("releases");
    std::fs::create_dir_all(&releases).expect("mkdir");
    let archive = beat_release(&releases, "beat", "0.1.0");
    let name = archive.file_name().expect("name").to_string_lossy();
    let text = format!(
        "revision = 1\n[[host]]\nid = \"{id}\"\naddr = \"{addr}\"\ngroup = \"web\"\n\
         [group.web]\nrelease = \"beat\"\nversion = \"0.1.0\"\narchive = \"releases/{name}\"\n\
         health = {{ min_up_secs = 1, deadline_secs = 15 }}\n"
    );
    let path = dir.join("cluster.toml");
    std::fs::write(&path, text).expect("write cluster");
    (pki, addr, path)
}

fn erel_with(pki: &Pki, cluster: &Path, args: &[&str]) -> Output {
    pki.erel()
        .args(args)
        .arg("--cluster")
        .arg(cluster)
        .env_remove("EREL_LOG")
        .output()
        .expect("run erel")
}

#[test]
fn a_host_that_failed_before_its_switch_is_not_said_to_be_not_rolled_back() {
    let (pki, dead, cluster) = dead_host_cluster("gone-1");
    let out = erel_with(&pki, &cluster, &["deploy", "--connect-timeout", "2"]);
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("gone-1") && text.contains(&dead), "{text}");
    assert!(
        text.contains("its running release was not touched"),
        "{text}"
    );
    assert!(!text.to_lowercase().contains("not rolled back"), "{text}");
}

#[test]
fn deploy_dry_run_json_is_the_plan_and_touches_nothing() {
    let (pki, dead, cluster) = dead_host_cluster("plan-1");
    let out = erel_with(&pki, &cluster, &["deploy", "--dry-run", "--json"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", output_text(&out)));
    assert_eq!(plan["revision"], 1);
    let group = &plan["groups"][0];
    assert_eq!(group["group"], "web");
    assert_eq!(group["release"], "beat");
    assert_eq!(group["version"], "0.1.0");
    assert_eq!(group["version_dir"], "releases/beat/0.1.0");
    assert_eq!(group["argv"], serde_json::json!(["bin/beat", "foreground"]));
    assert_eq!(group["health"]["min_up_secs"], 1);
    assert_eq!(group["health"]["deadline_secs"], 15);
    let sha = group["archive"]["sha256"].as_str().expect("sha256");
    assert_eq!(sha.len(), 64, "{sha}");
    assert!(group["archive"]["dest"]
        .as_str()
        .is_some_and(|d| d.starts_with("archives/beat-0.1.0")));
    let host = &group["hosts"][0];
    assert_eq!(host["host"], "plan-1");
    assert_eq!(host["addr"], dead.as_str());
    assert_eq!(host["order"], 1);
    assert_eq!(host["canary"], true);
    // What the text states is in the JSON too.
    assert_eq!(group["max_failed"], 0);
    assert_eq!(group["state"], "running");
    assert_eq!(group["user"], serde_json::Value::Null);
    assert_eq!(group["stop_grace_secs"], 10);

    // The text names every probe, the passes and the drain, as the JSON does.
    let text = std::fs::read_to_string(&cluster).expect("read").replace(
        "health = { min_up_secs = 1, deadline_secs = 15 }",
        "health = { tcp = 7000, http = 8080, path = \"/ready\", passes = 2, min_up_secs = 1, \
         deadline_secs = 15 }\ndrain = { http = 8081, timeout_secs = 4 }\nmax_failed = 1",
    );
    std::fs::write(&cluster, text).expect("write");
    let out = erel_with(&pki, &cluster, &["deploy", "--dry-run"]);
    let said = output_text(&out);
    assert!(out.status.success(), "{said}");
    assert_holds_all(
        &said,
        &[
            "health    TCP port 7000 answers and HTTP GET port 8080/ready answers 2xx, 2 consecutive pass(es); up 1s",
            "drain     POST port 8081/drain before each stop of a running release, answer within 4s",
            "stop_grace_secs 10",
            "up to 1 host(s) may fail",
        ],
    );
    let out = erel_with(&pki, &cluster, &["deploy", "--dry-run", "--json"]);
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let group = &plan["groups"][0];
    assert_eq!(group["max_failed"], 1);
    assert_eq!(group["health"]["http"], "8080");
    assert_eq!(group["health"]["path"], "/ready");
    assert_eq!(group["health"]["passes"], 2);
    assert_eq!(group["drain"]["timeout_secs"], 4);
}

#[test]
fn status_json_with_amqp_includes_the_holders() {
    let (pki, _, cluster) = dead_host_cluster("held-1");
    let prefix = crate::helper::amqp::unique_prefix("manners-status");
    let url = crate::helper::amqp::amqp_url();
    let out = erel_with(
        &pki,
        &cluster,
        &[
            "status",
            "--json",
            "--connect-timeout",
            "2",
            "--amqp",
            &url,
            "--amqp-prefix",
            &prefix,
        ],
    );
    // The host is unreachable, so not converged: exit 1, with the JSON all the same.
    assert!(!out.status.success(), "{}", output_text(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", output_text(&out)));
    assert_eq!(status["hosts"][0]["host"], "held-1");
    assert_eq!(status["hosts"][0]["reachable"], false);
    let holders = status["holders"].as_array().expect("holders");
    assert_eq!(holders.len(), 1, "{holders:?}");
    assert_eq!(holders[0]["group"], "web");
    assert!(
        holders[0]["master"].is_null(),
        "no master holds it: {holders:?}"
    );
}

/// `erel deploy` of a beat release on a fleet of `hosts` agents whose health gate
/// holds each host in `verifying` for `min_up_secs`; the deploy runs with its stdout
/// followed into the returned log.
fn slow_deploy(
    fleet: &crate::helper::fleet::Fleet,
    min_up_secs: u64,
    json: bool,
) -> (
    std::process::Child,
    std::sync::Arc<std::sync::Mutex<String>>,
) {
    let text = beat_cluster_toml(
        fleet,
        1,
        (&fleet.dir.path().join("releases"), "releases/"),
        &format!(
            "max_in_flight = 1\ncanaries = 1\nstop_grace_secs = 5\n\
             health = {{ tcp = \"$BEAT_PORT\", min_up_secs = {min_up_secs}, deadline_secs = {} }}\n",
            min_up_secs * 2
        ),
    );
    let cluster = fleet.dir.path().join("cluster.toml");
    std::fs::write(&cluster, text).expect("write cluster");
    let mut command = fleet.pki.erel();
    command.arg("deploy").arg("--cluster").arg(&cluster);
    if json {
        command.arg("--json");
    }
    let mut child = command
        .env_remove("EREL_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn erel deploy");
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    crate::helper::follow_lines(child.stdout.take().expect("stdout"), log.clone(), |_| {});
    crate::helper::follow_lines(child.stderr.take().expect("stderr"), log.clone(), |_| {});
    (child, log)
}

/// Sends SIGINT to `child` once `needle` shows in `log`; returns its exit status and
/// everything it printed.
fn interrupt_when(
    child: &mut std::process::Child,
    log: &std::sync::Arc<std::sync::Mutex<String>>,
    needle: &str,
) -> (std::process::ExitStatus, String) {
    let text = || log.lock().expect("log").clone();
    let shown =
        crate::helper::wait_until_blocking(crate::helper::PATIENCE, || text().contains(needle));
    assert!(shown, "{needle:?} never printed:\n{}", text());
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    let status = crate::helper::exit_within(child, crate::helper::PATIENCE)
        .unwrap_or_else(|| panic!("erel deploy did not end after SIGINT:\n{}", text()));
    // The output threads end with the pipes; give them the same bound.
    crate::helper::wait_until_blocking(crate::helper::PATIENCE, || {
        let t = text();
        t.contains("untouched") || t.contains("\"untouched\"")
    });
    (status, text())
}

/// A cluster file of `revision` with every agent of `fleet` (health port `$BEAT_PORT`)
/// in group `web`, running the beat release 0.1.0 built into `dir` and named in the
/// file as `<archive_dir><archive file name>`, with `settings` lines in the group.
fn beat_cluster_toml(
    fleet: &crate::helper::fleet::Fleet,
    revision: u64,
    (dir, archive_dir): (&Path, &str),
    settings: &str,
) -> String {
    std::fs::create_dir_all(dir).expect("mkdir");
    let archive = beat_release(dir, "beat", "0.1.0");
    let name = archive.file_name().expect("name").to_string_lossy();
    let mut text = format!("revision = {revision}\n{}", fleet.hosts_toml("BEAT_PORT"));
    text.push_str(&format!(
        "[group.web]\nrelease = \"beat\"\nversion = \"0.1.0\"\n\
         archive = \"{archive_dir}{name}\"\n{settings}"
    ));
    text
}

/// Deploys to `fleet` with `min_up_secs = 30` (so the canary stays in `verifying`),
/// `--json` when `json`, and sends SIGINT once `needle` is printed; returns the exit
/// status and everything printed.
fn deploy_interrupted_at(
    fleet: &crate::helper::fleet::Fleet,
    json: bool,
    needle: &str,
) -> (std::process::ExitStatus, String) {
    let (mut child, log) = slow_deploy(fleet, 30, json);
    interrupt_when(&mut child, &log, needle)
}

#[test]
fn ctrl_c_during_a_deploy_says_what_was_done_in_flight_and_untouched() {
    // min_up_secs holds the canary in `verifying` long enough to be interrupted there.
    let fleet = crate::helper::fleet::Fleet::new("intr", &["web"; 2]);
    let (status, text) = deploy_interrupted_at(&fleet, false, "web/intr-1: verifying");

    assert_eq!(status.code(), Some(130), "exit status of Ctrl-C: {text}");
    assert!(
        text.contains("IN FLIGHT  web/intr-1: was verifying when interrupted; now 0.1.0 running"),
        "the canary's state, asked of its agent: {text}"
    );
    assert_holds_all(
        &text,
        &[
            "INTERRUPTED",
            "health was NOT verified",
            "untouched  web/intr-2: its running release was not touched",
            "0 done, 1 in flight, 1 untouched",
        ],
    );
    // The second host really was not touched.
    assert!(fleet.agents[1].release_pids("beat").is_empty(), "{text}");
}

#[test]
fn ctrl_c_during_a_json_deploy_prints_the_summary_as_json() {
    let fleet = crate::helper::fleet::Fleet::new("intj", &["web"; 2]);
    let (status, text) = deploy_interrupted_at(&fleet, true, "\"phase\":\"verifying\"");
    assert_eq!(status.code(), Some(130), "{text}");
    let start = text
        .find("{\n")
        .unwrap_or_else(|| panic!("no summary: {text}"));
    let summary: serde_json::Value =
        serde_json::from_str(&text[start..]).unwrap_or_else(|e| panic!("{e}: {}", &text[start..]));
    assert_eq!(summary["interrupted"], true);
    assert_eq!(summary["in_flight"][0]["host"], "intj-1");
    assert_eq!(summary["in_flight"][0]["phase"], "verifying");
    assert_eq!(summary["in_flight"][0]["now_version"], "0.1.0");
    assert_eq!(summary["in_flight"][0]["now_state"], "running");
    assert_eq!(summary["untouched"][0]["host"], "intj-2");
    assert!(summary["done"].as_array().is_some_and(Vec::is_empty));
}

/// `GET path` on `addr`: (status line, body), or `None` when nothing answers.
fn http_get(addr: &str, path: &str) -> Option<(String, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    Some((head.lines().next()?.to_string(), body.to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_serves_prometheus_metrics_of_its_fleet() {
    let fleet = crate::helper::fleet::Fleet::new("metr", &["web"; 2]);
    let text = beat_cluster_toml(
        &fleet,
        4,
        (&fleet.dir.path().join("releases"), "releases/"),
        "max_in_flight = 2\ncanaries = 0\n\
         health = { tcp = \"$BEAT_PORT\", min_up_secs = 1, deadline_secs = 30 }\n",
    );
    let cluster = fleet.dir.path().join("cluster.toml");
    std::fs::write(&cluster, text).expect("write cluster");

    let flags = ["--cluster".as_ref(), cluster.as_os_str()];
    let (mut master, addr) = master_with_metrics(&fleet.pki, &flags).await;
    let body = metrics_showing(&addr, &["erel_hosts{state=\"converged\"} 2\n"], || {
        master.log()
    })
    .await;
    for line in [
        "erel_revision 4\n",
        "erel_hosts{state=\"failed\"} 0\n",
        "erel_hosts{state=\"in_flight\"} 0\n",
        "erel_rollouts_total{group=\"web\"} 1\n",
        "erel_host_failures_total{group=\"web\"} 0\n",
        "# TYPE erel_config_age_seconds gauge\n",
    ] {
        assert!(body.contains(line), "{line:?} missing:\n{body}");
    }
    assert!(body.ends_with("# EOF\n"), "{body}");
    fleet.expect_beats("0.1.0");

    let (status, _) = http_get(&addr, "/other").expect("an answer");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    assert!(
        master.terminate_within(crate::helper::PATIENCE),
        "{}",
        master.log()
    );
}

/// Starts `erel master` with `args` and `--metrics 127.0.0.1:0`; returns it and the
/// address it serves metrics on.
async fn master_with_metrics(
    pki: &Pki,
    args: &[&std::ffi::OsStr],
) -> (crate::helper::Followed, String) {
    let mut command = pki.erel();
    command
        .args(["master", "--interval", "1", "--metrics", "127.0.0.1:0"])
        .args(args)
        .env_remove("EREL_LOG");
    let master = crate::helper::Followed::spawn(&mut command, "erel master");
    let log = master
        .log_showing("metrics on ", crate::helper::PATIENCE)
        .await;
    let addr = log
        .lines()
        .find_map(|l| l.strip_prefix("metrics on "))
        .expect("address")
        .trim()
        .to_string();
    (master, addr)
}

/// The metrics once they hold every one of `lines`; panics with them and `log` if
/// they never do.
async fn metrics_showing(addr: &str, lines: &[&str], log: impl Fn() -> String) -> String {
    let found = crate::helper::poll_until(crate::helper::PATIENCE, || async {
        let (status, body) = http_get(addr, "/metrics")?;
        (status == "HTTP/1.1 200 OK" && lines.iter().all(|l| body.contains(l))).then_some(body)
    })
    .await;
    found.unwrap_or_else(|| {
        panic!(
            "metrics never showed {lines:?}: {:?}\n{}",
            http_get(addr, "/metrics"),
            log()
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_amqp_daemon_serves_metrics_of_the_revision_it_holds() {
    let _lock = crate::helper::amqp::BrokerLock::shared();
    let broker = crate::helper::amqp::TestBroker::new("manners-metrics", &["web"]);
    let fleet = crate::helper::fleet::Fleet::new("amet", &["web"]);
    let artifacts = fleet.dir.path().join("artifacts");
    let text = beat_cluster_toml(
        &fleet,
        3,
        (&artifacts, ""),
        "health = { tcp = \"$BEAT_PORT\", min_up_secs = 1, deadline_secs = 30 }\n",
    );
    let config = artifacts.join("cluster.toml");
    std::fs::write(&config, text).expect("write config");
    let published = fleet
        .pki
        .erel()
        .args(["config", "publish"])
        .arg(&config)
        .args(broker.flags())
        .output()
        .expect("run erel config publish");
    assert!(published.status.success(), "{}", output_text(&published));

    let state = fleet.state_dir("m1");
    let flags: Vec<std::ffi::OsString> = broker
        .flags()
        .into_iter()
        .map(Into::into)
        .chain([
            "--state-dir".into(),
            state.into_os_string(),
            "--artifacts".into(),
            artifacts.into_os_string(),
            "--name".into(),
            "m1".into(),
        ])
        .collect();
    let flags: Vec<&std::ffi::OsStr> = flags.iter().map(|f| f.as_os_str()).collect();
    let (mut master, addr) = master_with_metrics(&fleet.pki, &flags).await;
    let body = metrics_showing(
        &addr,
        &[
            "erel_revision 3\n",
            "erel_hosts{state=\"converged\"} 1\n",
            "erel_rollouts_total{group=\"web\"} 1\n",
        ],
        || master.log(),
    )
    .await;
    assert!(
        body.contains("erel_host_failures_total{group=\"web\"} 0\n"),
        "{body}"
    );
    fleet.expect_beats("0.1.0");
    assert!(
        master.terminate_within(crate::helper::PATIENCE),
        "{}",
        master.log()
    );
}

#[test]
fn an_archive_entry_name_reaches_the_operator_escaped() {
    let (pki, agent) = crate::helper::pki_and_agent("esc-1", &[]);
    let work = tempfile::tempdir().expect("tempdir");
    // One regular file whose name leaves the root and carries a terminal escape
    // (set the window title) and a bell.
    let name = b"../\x1b]0;owned\x07evil";
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.as_gnu_mut().expect("gnu").name[..name.len()].copy_from_slice(name);
    header.set_size(1);
    header.set_mode(0o644);
    header.set_cksum();
    let mut bytes = header.as_bytes().to_vec();
    let mut body = b"x".to_vec();
    body.resize(512, 0);
    bytes.extend_from_slice(&body);
    bytes.extend_from_slice(&[0u8; 1024]);
    let archive = work.path().join("evil.tar");
    std::fs::write(&archive, &bytes).expect("write archive");

    let pushed = pki
        .erel_at("push", &agent)
        .arg(&archive)
        .arg("archives/evil.tar")
        .env_remove("EREL_LOG")
        .output()
        .expect("run erel push");
    assert!(pushed.status.success(), "{}", output_text(&pushed));
    let out = pki
        .erel_at("unpack", &agent)
        .args(["archives/evil.tar", "releases/evil/1"])
        .env_remove("EREL_LOG")
        .output()
        .expect("run erel unpack");
    let said = failed_once(&out, "esc-1");
    assert!(!said.chars().any(char::is_control), "{said:?}");
    assert!(said.contains("\\u{1b}]0;owned\\u{7}evil"), "{said}");
    assert!(!agent.root.join("releases/evil/1").exists());
}
