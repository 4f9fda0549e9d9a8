//! Everything a release starts is the release's: real agents, real release tarballs
//! whose start scripts leave helpers behind (`setsid`, double forks, relx-style
//! `daemon`), real cgroups, and a real unprivileged user.
//!
//! These tests need root and a writable cgroup v2 (the agent's default containment);
//! where the agent reports that it fell back, a cgroup test fails rather than passing
//! without having run. The fallback itself is tested by forcing it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use erel_master::AgentClient;
use erel_proto::{ReleaseState, ReleaseStatus, Started, Stopped};

use crate::helper::install::{release_status, start_request, unpack_shell_release};
use crate::helper::AgentCommands;
use crate::helper::{outlast_any_restart, pki_and_agent, wait_until, AgentProc, Pki, PATIENCE};

/// The input: a helper in its own session, then the main process.
const SETSID_HELPER: &str =
    "#!/bin/sh\nsetsid sh -c 'exec sleep 100000' &\necho helper-started\nexec sleep 100000\n";
/// A double fork: the start command returns 0 at once, its grandchild lives on.
const DOUBLE_FORK: &str = "#!/bin/sh\n(setsid sh -c 'exec sleep 100000' &)\nexit 0\n";
/// A relx-style start script: `daemon` detaches the node and returns, `foreground` runs it.
const RELX_STYLE: &str = "#!/bin/sh
case \"$1\" in
    daemon)
        setsid sh -c 'exec sleep 100000' </dev/null >/dev/null 2>&1 &
        echo daemon started
        exit 0 ;;
    foreground) exec sleep 100000 ;;
    *) echo \"usage: $0 daemon|foreground\"; exit 1 ;;
esac
";

/// A [`cgroup_agent`] `id` running version 1 of `app` whose `bin/app` is `script`,
/// and the client that started it.
async fn cgroup_app(id: &str, script: &str) -> (Pki, AgentProc, AgentClient, Started) {
    let (pki, agent) = cgroup_agent(id);
    install(&pki, &agent, "1", script).await;
    let mut client = pki.connect(&agent).await;
    let started = start_app(&mut client, "1", &[]).await;
    (pki, agent, client, started)
}

/// Pushes and unpacks a shell release `app` `version` whose `bin/app` is `script`.
async fn install(pki: &Pki, agent: &AgentProc, version: &str, script: &str) {
    let work = tempfile::tempdir().expect("tempdir");
    unpack_shell_release(pki, agent, work.path(), "app", version, script).await;
}

/// Starts version `version` of `app` with `argv`, which must succeed.
async fn start_app(client: &mut AgentClient, version: &str, argv: &[&str]) -> Started {
    let request = start_request("app", version, argv);
    let started = client.start(request).await;
    started.unwrap_or_else(|e| panic!("start app {version}: {e}"))
}

/// Stops `app` with a grace of ten seconds, which must succeed.
async fn stop_app(client: &mut AgentClient) -> Stopped {
    let stopped = client.stop("app", Duration::from_secs(10)).await;
    stopped.unwrap_or_else(|e| panic!("stop app: {e}"))
}

/// Waits until `app` is in `state`; panics with the agent's log when it is not.
async fn assert_reaches(pki: &Pki, agent: &AgentProc, state: ReleaseState) {
    let reached = wait_until(PATIENCE, || async {
        status(pki, agent).await.state == state
    });
    assert!(reached.await, "{state:?} not reached:\n{}", agent.log());
}

/// Waits until no output writer of `app` is left; panics, saying `when`, when one is.
async fn assert_no_writers_left(agent: &AgentProc, when: &str) {
    let gone = wait_until(PATIENCE, || async { app_writers(agent) == 0 }).await;
    assert!(gone, "{} writers left {when}", app_writers(agent));
}

async fn status(pki: &Pki, agent: &AgentProc) -> ReleaseStatus {
    release_status(pki, agent, "app")
        .await
        .expect("app is known")
}

/// Every live process of `app` under this agent: the members of its cgroup when the
/// agent has cgroups (environment or not), else those with its environment.
fn members(agent: &AgentProc) -> Vec<i32> {
    match agent.cgroup_dir() {
        Some(dir) => live_pids(&dir.join("release.app")),
        None => agent.release_pids("app"),
    }
}

/// Live (non-zombie) pids in a cgroup; none when it does not exist.
fn live_pids(cgroup: &Path) -> Vec<i32> {
    let text = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
    let mut pids: Vec<i32> = text
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s.rsplit_once(')').map(|(_, r)| r.trim_start().to_string()))
                .is_some_and(|r| !r.starts_with('Z'))
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// True for the `sleep 100000` the test releases leave running (not the start command
/// that is about to leave it).
fn is_sleeper(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == b"sleep\x00100000\x00")
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, r)| r.trim_start().to_string()))
        .is_some_and(|r| !r.starts_with('Z'))
}

/// An agent with cgroup containment; fails (never skips) when it fell back.
fn cgroup_agent(id: &str) -> (Pki, AgentProc) {
    let (pki, agent) = pki_and_agent(id, &[]);
    assert!(
        agent.cgroup_dir().is_some(),
        "this test needs root and a writable cgroup v2; the agent said:\n{}",
        agent.log()
    );
    (pki, agent)
}

/// Runs `erel` with `args` (the host is inserted after the subcommand); returns
/// (success, stdout, stderr).
fn erel(pki: &Pki, agent: &AgentProc, command: &str, args: &[&str]) -> (bool, String, String) {
    let out = pki
        .erel_at(command, agent)
        .args(args)
        .output()
        .expect("run erel");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_reaches_a_helper_in_its_own_session() {
    let (pki, agent) = cgroup_agent("cg-setsid");
    install(&pki, &agent, "1", SETSID_HELPER).await;
    let mut client = pki.connect(&agent).await;
    let started = start_app(&mut client, "1", &[]).await;
    // Found inside the wait, as a process in the middle of an exec can be missed by a
    // scan that follows it.
    let helper = std::sync::Mutex::new(None);
    assert!(
        wait_until(PATIENCE, || async {
            let found = members(&agent)
                .into_iter()
                .find(|&p| p != started.pid as i32);
            *helper.lock().expect("helper") = found;
            found.is_some()
        })
        .await,
        "the helper\n{}",
        agent.log()
    );
    let helper = helper.into_inner().expect("helper").expect("helper");

    let (ok, ping, _) = erel(&pki, &agent, "ping", &[]);
    assert!(ok && ping.contains("containment: cgroup v2"), "{ping}");

    let (ok, out, err) = erel(&pki, &agent, "stop", &["app", "--grace", "10"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("app stopped"), "{out}");
    assert!(!alive(helper), "the setsid helper survived `erel stop`");
    assert!(members(&agent).is_empty());
    assert!(agent.release_pids("app").is_empty());

    // Started again: one main process and one helper, never two copies.
    start_app(&mut client, "1", &[]).await;
    assert!(wait_until(PATIENCE, || async { members(&agent).len() >= 2 }).await);
    // A second copy would come from a restart, within one restart delay.
    outlast_any_restart().await;
    assert_eq!(members(&agent).len(), 2);
    stop_app(&mut client).await;
    assert!(members(&agent).is_empty());
}

/// Starts `argv` of a daemonizing release and checks it runs as one copy: the daemon is
/// the release, reported as running, never restarted while it lives, restarted once
/// when it dies, and stopped entirely.
async fn daemonizing_release_runs_once(agent: &AgentProc, pki: &Pki, script: &str, argv: &[&str]) {
    install(pki, agent, "1", script).await;
    let mut client = pki.connect(agent).await;
    let started = start_app(&mut client, "1", argv).await;
    assert!(
        wait_until(PATIENCE, || async {
            let s = status(pki, agent).await;
            s.state == ReleaseState::Running
                && s.pid
                    .is_some_and(|p| p != started.pid && is_sleeper(p as i32))
        })
        .await,
        "the daemon is the release\n{}",
        agent.log()
    );
    let daemon = status(pki, agent).await.pid.expect("pid") as i32;
    outlast_any_restart().await;
    let now = status(pki, agent).await;
    assert_eq!(now.state, ReleaseState::Running);
    assert_eq!(now.restarts, 0, "a daemonizing start was restarted");
    assert_eq!(members(agent), vec![daemon]);

    // The daemon dies: one restart, one daemon again.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the daemon");
    assert!(
        wait_until(PATIENCE, || async {
            let s = status(pki, agent).await;
            s.restarts == 1
                && s.state == ReleaseState::Running
                && s.pid.is_some_and(|p| {
                    let p = p as i32;
                    p != daemon && is_sleeper(p) && members(agent) == vec![p]
                })
        })
        .await,
        "restarted once\n{}",
        agent.log()
    );
    outlast_any_restart().await;
    assert_eq!(members(agent).len(), 1);
    let stopped = stop_app(&mut client).await;
    assert!(stopped.was_running);
    assert!(members(agent).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_double_forked_daemon_is_the_release() {
    let (pki, agent) = cgroup_agent("cg-fork");
    daemonizing_release_runs_once(&agent, &pki, DOUBLE_FORK, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relx_style_daemon_command_is_the_release() {
    let (pki, agent) = cgroup_agent("cg-relx");
    daemonizing_release_runs_once(&agent, &pki, RELX_STYLE, &["bin/app", "daemon"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_agent_then_adoption_never_makes_two_copies() {
    let (pki, mut agent) = cgroup_agent("cg-adopt");
    install(&pki, &agent, "1", SETSID_HELPER).await;
    install(&pki, &agent, "2", RELX_STYLE).await;
    let mut client = pki.connect(&agent).await;
    let started = start_app(&mut client, "1", &[]).await;
    assert!(wait_until(PATIENCE, || async { members(&agent).len() >= 2 }).await);
    let before = members(&agent);

    for round in 0..2 {
        agent.restart();
        outlast_any_restart().await;
        assert_eq!(members(&agent), before, "round {round}\n{}", agent.log());
        let now = status(&pki, &agent).await;
        assert_eq!(now.state, ReleaseState::Running);
        assert_eq!(now.pid, Some(started.pid));
    }

    // A daemonized version survives an agent kill -9 the same way.
    let mut client = pki.connect(&agent).await;
    start_app(&mut client, "2", &["bin/app", "daemon"]).await;
    assert!(before.iter().all(|&p| !alive(p)), "version 1 is gone");
    assert!(
        wait_until(PATIENCE, || async {
            let s = status(&pki, &agent).await;
            let now = members(&agent);
            // The pid reported changes once the agent recorded the daemonization.
            s.version.as_deref() == Some("2")
                && now.len() == 1
                && is_sleeper(now[0])
                && s.pid == Some(now[0] as u32)
        })
        .await
    );
    let daemon = members(&agent);
    agent.restart();
    outlast_any_restart().await;
    assert_eq!(members(&agent), daemon, "{}", agent.log());
    let now = status(&pki, &agent).await;
    assert_eq!(now.state, ReleaseState::Running);
    assert_eq!(now.pid, Some(daemon[0] as u32));
    assert!(agent.log().contains("adopted a running release"));
    let mut client = pki.connect(&agent).await;
    stop_app(&mut client).await;
    assert!(members(&agent).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_is_not_a_running_process() {
    // The child exits at once, and `sleep`, which replaces the shell, never reaps it.
    let script = "#!/bin/sh\nsleep 0 &\nexec sleep 100000\n";
    let (pki, agent, mut client, started) = cgroup_app("cg-zombie", script).await;
    let cgroup = agent.cgroup_dir().expect("cgroup").join("release.app");
    let zombie_seen = wait_until(PATIENCE, || async {
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .any(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
                    let fields: Vec<&str> = rest.split_whitespace().collect();
                    fields.first() == Some(&"Z")
                        && fields.get(1) == Some(&&*started.pid.to_string())
                })
            })
    })
    .await;
    assert!(zombie_seen, "the release has a zombie child");
    assert_eq!(live_pids(&cgroup), vec![started.pid as i32]);
    let status = status(&pki, &agent).await;
    assert_eq!(status.pid, Some(started.pid));
    // SIGTERM ends the release: nothing waits for the zombie or kills after the grace.
    let begun = std::time::Instant::now();
    let stopped = client
        .stop("app", Duration::from_secs(60))
        .await
        .expect("stop");
    assert!(stopped.was_running && !stopped.killed);
    assert!(begun.elapsed() < Duration::from_secs(60));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_usable_cgroup_the_agent_falls_back_and_still_stops_helpers() {
    let pki = Pki::new();
    // A cgroup parent below an interface file can never be created.
    let agent = AgentProc::start(&pki, "fallback", &["--cgroup-parent", "/cgroup.procs/erel"]);
    assert!(agent.cgroup_dir().is_none());
    assert!(
        agent.log().contains("fallback to process groups"),
        "the start-up log says so:\n{}",
        agent.log()
    );
    let (ok, ping, _) = erel(&pki, &agent, "ping", &[]);
    assert!(
        ok && ping.contains("containment: fallback to process groups"),
        "{ping}"
    );

    install(&pki, &agent, "1", SETSID_HELPER).await;
    install(&pki, &agent, "2", DOUBLE_FORK).await;
    let mut client = pki.connect(&agent).await;
    start_app(&mut client, "1", &[]).await;
    assert!(wait_until(PATIENCE, || async { agent.release_pids("app").len() >= 2 }).await);
    let (ok, out, err) = erel(&pki, &agent, "stop", &["app"]);
    assert!(ok && out.contains("app stopped"), "{out}{err}");
    assert!(
        agent.release_pids("app").is_empty(),
        "found by session and environment"
    );

    // A double-forked daemon is found by its environment and runs once.
    start_app(&mut client, "2", &[]).await;
    assert!(
        wait_until(PATIENCE, || async {
            status(&pki, &agent).await.state == ReleaseState::Running
                && agent.release_pids("app").len() == 1
        })
        .await
    );
    outlast_any_restart().await;
    assert_eq!(agent.release_pids("app").len(), 1);
    assert_eq!(status(&pki, &agent).await.restarts, 0);
    stop_app(&mut client).await;
    assert!(agent.release_pids("app").is_empty());
}

/// Another user's process that copies a release's markers into its environment is not
/// the release: without cgroups it neither keeps the release from starting, nor shows
/// as its pid, nor is signalled when the release stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_users_process_with_the_markers_is_not_the_release() {
    use std::os::unix::process::CommandExt;
    let user = TestAccount::user();
    let (pki, agent) = pki_and_agent("forged", &["--cgroup-parent", "/cgroup.procs/erel"]);
    assert!(agent.cgroup_dir().is_none());
    install(&pki, &agent, "1", "#!/bin/sh\nexec sleep 100000\n").await;
    let root = std::fs::canonicalize(&agent.root).expect("root");
    let mut forged = std::process::Command::new("sleep")
        .arg("100001")
        .env("EREL_ROOT", &root)
        .env("EREL_RELEASE", "app")
        .env("EREL_VERSION", "1")
        .uid(user.uid())
        .process_group(0)
        .spawn()
        .expect("spawn the other user's process");
    let forged_pid = forged.id() as i32;
    let outcome = async {
        let mut client = pki.connect(&agent).await;
        let started = client
            .start(start_request("app", "1", &[]))
            .await
            .map_err(|e| format!("start refused: {e}\n{}", agent.log()))?;
        // A release taken for dead would be restarted within one restart delay.
        outlast_any_restart().await;
        let now = status(&pki, &agent).await;
        if now.state != ReleaseState::Running || now.pid != Some(started.pid) {
            return Err(format!("status {now:?}, started {}", started.pid));
        }
        let stopped = client
            .stop("app", Duration::from_secs(10))
            .await
            .map_err(|e| format!("stop: {e}"))?;
        if !stopped.was_running || alive(started.pid as i32) {
            return Err(format!("the release did not stop: {stopped:?}"));
        }
        if !alive(forged_pid) {
            return Err("the agent stopped another user's process".to_string());
        }
        Ok(())
    }
    .await;
    let _ = forged.kill();
    let _ = forged.wait();
    outcome.unwrap_or_else(|e| panic!("{e}"));
}

/// A system user or group created for one test and removed when dropped.
struct TestAccount {
    name: String,
    /// `userdel` or `groupdel`.
    remove_with: &'static str,
}

impl TestAccount {
    /// A system user without a home, named after this process and a counter.
    fn user() -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let serial = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("erelt{}x{serial}", std::process::id());
        let args = ["--system", "--no-create-home", "--shell", "/bin/sh"];
        Self::add("useradd", &args, name)
    }

    /// A system group named after this process and `tag`.
    fn group(tag: &str) -> Self {
        let name = format!("erelg{}{tag}", std::process::id());
        Self::add("groupadd", &["--system"], name)
    }

    /// Runs `program` (`useradd`, `groupadd`; the test needs root) with `args` and
    /// `name`; the account is removed when dropped.
    fn add(program: &'static str, args: &[&str], name: String) -> Self {
        let status = std::process::Command::new(program)
            .args(args)
            .arg(&name)
            .status()
            .unwrap_or_else(|e| panic!("run {program} (this test needs root): {e}"));
        assert!(status.success(), "{program} {name}");
        let remove_with = if program == "groupadd" {
            "groupdel"
        } else {
            "userdel"
        };
        TestAccount { name, remove_with }
    }

    /// The user's uid.
    fn uid(&self) -> u32 {
        let user = nix::unistd::User::from_name(&self.name).expect("lookup");
        user.expect("user exists").uid.as_raw()
    }

    /// The group's gid.
    fn gid(&self) -> u32 {
        let group = nix::unistd::Group::from_name(&self.name).expect("lookup");
        group.expect("group exists").gid.as_raw()
    }
}

impl Drop for TestAccount {
    fn drop(&mut self) {
        let _ = std::process::Command::new(self.remove_with)
            .arg(&self.name)
            .status();
    }
}

fn owner_of(path: &Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("metadata").uid()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_runs_as_its_user_and_writes_only_where_allowed() {
    let user = TestAccount::user();
    let (pki, agent) = cgroup_agent("as-user");
    let script = "#!/bin/sh
id -u > \"$EREL_DATA/uid\"
if touch \"$(pwd)/written\" 2>/dev/null; then echo yes; else echo no; fi > \"$EREL_DATA/version-dir-writable\"
if touch bin/app 2>/dev/null; then echo yes; else echo no; fi > \"$EREL_DATA/program-writable\"
mkdir -p \"$RUNNER_LOG_DIR\" && echo ok > \"$RUNNER_LOG_DIR/run.log\"
exec sleep 100000
";
    install(&pki, &agent, "1", script).await;
    let mut request = start_request("app", "1", &[]);
    request.user = Some(user.name.clone());
    let mut client = pki.connect(&agent).await;

    // A root inside a 0700 directory: the user cannot reach the release, and the
    // refusal names the directory at fault rather than "Permission denied".
    use std::os::unix::fs::PermissionsExt;
    let chmod = |mode: u32| {
        std::fs::set_permissions(agent.root_dir.path(), std::fs::Permissions::from_mode(mode))
            .expect("chmod")
    };
    chmod(0o700);
    let refused = client.start(request.clone()).await.unwrap_err().to_string();
    assert!(
        refused.contains(&format!("user '{}'", user.name)) && refused.contains("cannot enter"),
        "{refused}"
    );
    assert_eq!(status(&pki, &agent).await.state, ReleaseState::Stopped);

    assert!(
        refused.contains(&agent.root_dir.path().display().to_string()),
        "{refused}"
    );
    chmod(0o755);
    let started = client.start(request).await.expect("start as the user");
    let data: PathBuf = agent.root.join("data/app");
    assert!(
        wait_until(PATIENCE, || async { data.join("log/run.log").exists() }).await,
        "{}",
        agent.log()
    );
    let read = |name: &str| {
        std::fs::read_to_string(data.join(name))
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    assert_eq!(read("uid"), user.uid().to_string());
    assert_eq!(read("version-dir-writable"), "no");
    assert_eq!(read("program-writable"), "no");
    assert!(!agent.root.join("releases/app/1/written").exists());
    assert_eq!(owner_of(&data), user.uid());
    assert_eq!(owner_of(&data.join("uid")), user.uid());
    let status_text =
        std::fs::read_to_string(format!("/proc/{}/status", started.pid)).expect("status");
    let uid_line = status_text
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .expect("Uid line");
    assert!(
        uid_line
            .split_whitespace()
            .skip(1)
            .all(|u| u == user.uid().to_string()),
        "{uid_line}"
    );
    stop_app(&mut client).await;
    assert!(members(&agent).is_empty());
}

/// Live output writers of release `app` under `agent` (each names its log).
fn app_writers(agent: &AgentProc) -> usize {
    let log = std::fs::canonicalize(&agent.root)
        .expect("root")
        .join(".erel/logs/app.log");
    let needle = log.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .expect("proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| alive(pid))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(|arg| arg == needle.as_bytes()))
        })
        .count()
}

/// A start command that fails and leaves helpers behind: the helpers are stopped before
/// each restart, a crash loop leaves nothing running, and no output writer is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_start_command_leaves_nothing_behind_across_a_crash_loop() {
    let script = "#!/bin/sh\nsetsid sh -c 'exec sleep 100000' &\nnohup sleep 100000 >/dev/null 2>&1 &\necho failing\nexit 3\n";
    let (pki, agent, _client, _) = cgroup_app("cg-fail", script).await;
    assert_reaches(&pki, &agent, ReleaseState::CrashLooping).await;
    assert!(members(&agent).is_empty(), "{:?}", members(&agent));
    assert_no_writers_left(&agent, "after a crash loop").await;
}

/// `start-stop-daemon --background` and a child that ends later: daemonized, the child's
/// end is the release's end. (The pid file keeps start-stop-daemon from taking another
/// test's `sleep` for this daemon.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_stop_daemon_background_is_the_release_and_a_short_child_ends_it() {
    let (pki, agent) = cgroup_agent("cg-ssd");
    let script =
        "#!/bin/sh\nstart-stop-daemon --start --background --make-pidfile --pidfile \"$EREL_DATA/pid\" --exec /bin/sleep -- 100000\nexit 0\n";
    install(&pki, &agent, "1", script).await;
    let script = "#!/bin/sh\n(sleep 1; echo child-done) &\nexit 0\n";
    install(&pki, &agent, "2", script).await;
    let mut client = pki.connect(&agent).await;
    start_app(&mut client, "1", &[]).await;
    assert!(
        wait_until(PATIENCE, || async {
            let s = status(&pki, &agent).await;
            s.state == ReleaseState::Running
                && s.pid.is_some_and(|p| {
                    std::fs::read(format!("/proc/{p}/cmdline"))
                        .is_ok_and(|c| c == b"/bin/sleep\x00100000\x00")
                })
        })
        .await,
        "{}",
        agent.log()
    );
    outlast_any_restart().await;
    assert_eq!(members(&agent).len(), 1);
    assert_eq!(status(&pki, &agent).await.restarts, 0);
    // A switch of version stops the daemon and leaves one writer at most.
    start_app(&mut client, "2", &[]).await;
    assert_reaches(&pki, &agent, ReleaseState::CrashLooping).await;
    assert!(members(&agent).is_empty());
    assert_no_writers_left(&agent, "").await;
}

/// A release that ignores SIGTERM and forks short processes without end while it is
/// stopped (bounded: about a hundred at a time) is killed whole, with cgroups and in the
/// fallback.
async fn fork_storm_is_stopped_whole(agent: &AgentProc, pki: &Pki) {
    let script = "#!/bin/sh\ntrap '' TERM\necho storming\nwhile :; do\n  for i in 1 2 3 4 5 6 7 8 9 10; do sh -c \"trap '' TERM; sleep 0.3\" & done\n  sleep 0.03\ndone\n";
    install(pki, agent, "1", script).await;
    let mut client = pki.connect(agent).await;
    start_app(&mut client, "1", &[]).await;
    assert!(wait_until(PATIENCE, || async { members(agent).len() > 20 }).await);
    let begun = std::time::Instant::now();
    let stopped = client
        .stop("app", Duration::from_secs(1))
        .await
        .expect("stop");
    assert!(stopped.was_running && stopped.killed);
    assert!(begun.elapsed() < Duration::from_secs(15));
    assert!(members(agent).is_empty());
    assert!(agent.release_pids("app").is_empty());
    assert!(
        wait_until(PATIENCE, || async { app_writers(agent) == 0 }).await,
        "writers left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_storm_that_ignores_sigterm_is_stopped_whole() {
    let (pki, agent) = cgroup_agent("cg-storm");
    fork_storm_is_stopped_whole(&agent, &pki).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_storm_that_ignores_sigterm_is_stopped_whole_without_cgroups() {
    let (pki, agent) = pki_and_agent("storm-fb", &["--cgroup-parent", "/cgroup.procs/erel"]);
    assert!(agent.cgroup_dir().is_none());
    fork_storm_is_stopped_whole(&agent, &pki).await;
}

/// A release running as root may make a cgroup below its own and move a helper there:
/// the helper is still the release, stopped with it, and no second copy starts beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_helper_moved_into_a_cgroup_below_the_release_is_the_release() {
    let (pki, agent) = cgroup_agent("cg-nested");
    let own = agent.cgroup_dir().expect("cgroup").join("release.app");
    let script = format!(
        "#!/bin/sh\nmkdir -p '{dir}/worker'\nsh -c 'echo $$ > \"$0/worker/cgroup.procs\" && exec sleep 100000' '{dir}' &\nexec sleep 100000\n",
        dir = own.display()
    );
    install(&pki, &agent, "1", &script).await;
    let mut client = pki.connect(&agent).await;
    let started = start_app(&mut client, "1", &[]).await;
    let worker = own.join("worker");
    assert!(
        wait_until(PATIENCE, || async { live_pids(&worker).len() == 1 }).await,
        "the helper moved\n{}",
        agent.log()
    );
    let helper = live_pids(&worker)[0];
    assert_ne!(helper, started.pid as i32);
    let stopped = stop_app(&mut client).await;
    assert!(stopped.was_running);
    let gone = !alive(helper);
    if !gone {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(helper),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    assert!(gone, "the helper in the nested cgroup survived the stop");
    assert!(
        !own.exists(),
        "the release's cgroups are removed once empty"
    );
}

/// A user whose primary group is not named after it, with a supplementary group and no
/// home directory, named by its numeric uid: the release runs with exactly those
/// groups, its data directory belongs to that user and primary group, and it cannot
/// write into another release's data directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_with_other_groups_and_no_home_named_by_uid() {
    let primary = TestAccount::group("p");
    let extra = TestAccount::group("s");
    let name = format!("erelu{}", std::process::id());
    let system_user = [
        "--system",
        "--no-create-home",
        "--home-dir",
        "/nonexistent/erel",
    ];
    let groups = ["--gid", &primary.name, "--groups", &extra.name];
    let user = TestAccount::add("useradd", &[&system_user[..], &groups[..]].concat(), name);
    let (pki, agent) = cgroup_agent("as-uid");
    let other = agent.root.join("data/other");
    std::fs::create_dir_all(&other).expect("other data");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o750)).expect("chmod");
    let script = format!(
        "#!/bin/sh\nid -G | tr ' ' '\\n' | sort -n | tr '\\n' ' ' > \"$EREL_DATA/groups\"\necho \"$HOME\" > \"$EREL_DATA/home\"\nif touch '{}/x' 2>/dev/null; then echo yes; else echo no; fi > \"$EREL_DATA/other-writable\"\nexec sleep 100000\n",
        other.display()
    );
    install(&pki, &agent, "1", &script).await;
    let mut request = start_request("app", "1", &[]);
    request.user = Some(user.uid().to_string());
    let mut client = pki.connect(&agent).await;
    client.start(request).await.expect("start by uid");
    let data = agent.root.join("data/app");
    assert!(
        wait_until(PATIENCE, || async {
            data.join("other-writable")
                .metadata()
                .is_ok_and(|m| m.len() > 0)
        })
        .await,
        "{}",
        agent.log()
    );
    let read = |file: &str| std::fs::read_to_string(data.join(file)).unwrap_or_default();
    let mut want = [primary.gid(), extra.gid()];
    want.sort_unstable();
    let want: String = want.iter().map(|g| format!("{g} ")).collect();
    assert_eq!(read("groups"), want);
    assert_eq!(read("home").trim(), "/nonexistent/erel");
    assert_eq!(read("other-writable").trim(), "no");
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&data).expect("data");
    assert_eq!((meta.uid(), meta.gid()), (user.uid(), primary.gid()));
    stop_app(&mut client).await;
    drop(user);
}

/// Output writers never outlive their run: after a kill -9 of the agent and adoption, a
/// switch of version leaves only the new run's writer, and a stop after a second
/// adoption leaves none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_end_with_their_runs_across_adoption_and_a_switch() {
    let (pki, mut agent) = cgroup_agent("cg-writers");
    let ticking = "#!/bin/sh\nsetsid sh -c 'while :; do echo helper; sleep 0.2; done' &\nwhile :; do echo tick; sleep 0.2; done\n";
    install(&pki, &agent, "1", ticking).await;
    install(&pki, &agent, "2", RELX_STYLE).await;
    let mut client = pki.connect(&agent).await;
    start_app(&mut client, "1", &[]).await;
    assert!(wait_until(PATIENCE, || async { members(&agent).len() >= 2 }).await);
    assert_eq!(app_writers(&agent), 1);
    agent.restart();
    assert!(
        wait_until(PATIENCE, || async {
            status(&pki, &agent).await.state == ReleaseState::Running
        })
        .await
    );
    let mut client = pki.connect(&agent).await;
    start_app(&mut client, "2", &["bin/app", "daemon"]).await;
    assert!(
        wait_until(PATIENCE, || async {
            let now = members(&agent);
            now.len() == 1 && is_sleeper(now[0])
        })
        .await,
        "{}",
        agent.log()
    );
    // The daemon's output goes to /dev/null: its writer ended with the start command.
    assert_no_writers_left(&agent, "after a switch: {}").await;
    start_app(&mut client, "1", &[]).await;
    assert!(wait_until(PATIENCE, || async { members(&agent).len() >= 2 }).await);
    agent.restart();
    outlast_any_restart().await;
    assert_eq!(app_writers(&agent), 1);
    let mut client = pki.connect(&agent).await;
    stop_app(&mut client).await;
    assert!(members(&agent).is_empty());
    assert_no_writers_left(&agent, "after stop").await;
}

/// A release started as another user, then as none: its data directory and what the
/// previous user left in it are the new user's to write, and with no user the agent's,
/// so the previous user keeps no hold on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_of_user_hands_the_data_directory_over() {
    let first = TestAccount::user();
    let second = TestAccount::user();
    let (pki, agent) = cgroup_agent("handover");
    let script = "#!/bin/sh
mkdir -p \"$EREL_DATA/sub\"
if echo \"$(id -u)\" >> \"$RUNNER_LOG_DIR/node.log\" && echo \"$(id -u)\" >> \"$EREL_DATA/sub/state\"; then
  echo ok > \"$EREL_DATA/done-$(id -u)\"
else
  echo failed > \"$EREL_DATA/done-$(id -u)\"
fi
exec sleep 100000
";
    install(&pki, &agent, "1", script).await;
    let data: PathBuf = agent.root.join("data/app");
    let mut client = pki.connect(&agent).await;
    for user in [&first, &second] {
        let mut request = start_request("app", "1", &[]);
        request.user = Some(user.name.clone());
        client.start(request).await.expect("start as a user");
        let done = data.join(format!("done-{}", user.uid()));
        assert!(
            wait_until(PATIENCE, || async {
                std::fs::metadata(&done).is_ok_and(|m| m.len() > 0)
            })
            .await,
            "{}",
            agent.log()
        );
        assert_eq!(
            std::fs::read_to_string(&done).expect("done").trim(),
            "ok",
            "user {} could not write what the previous user left",
            user.name
        );
        stop_app(&mut client).await;
    }
    for path in ["", "log", "log/node.log", "sub", "sub/state"] {
        assert_eq!(owner_of(&data.join(path)), second.uid(), "{path}");
    }
    start_app(&mut client, "1", &[]).await;
    assert!(
        wait_until(PATIENCE, || async { data.join("done-0").exists() }).await,
        "{}",
        agent.log()
    );
    stop_app(&mut client).await;
    for path in ["", "log", "sub/state"] {
        assert_eq!(owner_of(&data.join(path)), 0, "{path}");
    }
}
