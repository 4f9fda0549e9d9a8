//! Supervisor tests with real processes: shell scripts in a temporary root stand in for
//! releases. Every test kills what it started when it ends, even on failure.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use erel_proto::{ReleaseState, ReleaseStatus, Start, Started, Stopped};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

use super::cgroup::Containment;
use super::process;
use super::record::Desired;
use super::Supervisor;
use crate::error::Error;
use crate::fs::{Root, State};
use crate::settings::{CgroupParent, OutputWriter, Supervision};
use crate::wait;

/// Longest a condition is waited for.
const PATIENCE: Duration = Duration::from_secs(15);
const HOST: &str = "host-test";

/// A temporary root whose release processes are all killed on drop.
struct Fixture {
    root: Root,
    // Dropped after `root` is no longer used: kills, then removes the directory.
    _cleanup: Cleanup,
    _dir: tempfile::TempDir,
}

struct Cleanup {
    root: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for pid in processes_in(&self.root, None, false) {
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        // The agent's cgroup directory: kill what is left (recursively) and remove it.
        if let Containment::Cgroup(tree) = Containment::detect(&CgroupParent::Auto, &self.root) {
            let dir = tree.dir().to_path_buf();
            let _ = fs::write(dir.join("cgroup.kill"), "1");
            for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    wait::until_blocking(PATIENCE, || fs::remove_dir(entry.path()).is_ok());
                }
            }
            let _ = fs::remove_dir(&dir);
        }
    }
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    // Readable by other users, for the test that drops privileges.
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let root = Root::open(dir.path()).expect("root");
    Fixture {
        _cleanup: Cleanup {
            root: root.path().to_path_buf(),
        },
        root,
        _dir: dir,
    }
}

/// A temporary root, and what a plain `Start` of `name` `version` asks for.
pub(super) fn test_root_and_desired(
    name: &str,
    version: &str,
) -> (tempfile::TempDir, Root, Desired) {
    let (dir, root) = crate::fs::temp_root();
    let desired = Desired {
        name: name.into(),
        version: version.into(),
        argv: vec![format!("bin/{name}"), "foreground".into()],
        env: Vec::new(),
        user: None,
        should_run: true,
        crash_looping: false,
    };
    (dir, root, desired)
}

fn settings() -> Supervision {
    Supervision {
        restart_backoff: Duration::from_millis(50),
        restart_backoff_max: Duration::from_millis(200),
        stable_after: Duration::from_secs(1),
        crash_loop_after: 3,
        log_max_bytes: 1 << 20,
        output_writer: test_writer(),
        keep_versions: 2,
        cgroup_parent: CgroupParent::Auto,
    }
}

/// The output writer for these tests. The real one is the agent's own program, which a
/// unit-test binary is not; `cat` under the same contract (blocks nothing but ignores the
/// stop signals, appends until end of input) stands in for it. The cap itself is tested in
/// `log`'s tests and end to end with the real program.
fn test_writer() -> OutputWriter {
    OutputWriter {
        program: "/bin/sh".into(),
        args: vec![
            "-c".into(),
            "trap '' TERM INT HUP; exec cat >> \"$1\"".into(),
            "output-writer".into(),
        ],
    }
}

/// Writes `releases/<name>/<version>/bin/<name>` as an executable shell script.
fn release(root: &Root, name: &str, version: &str, body: &str) {
    let bin = root
        .path()
        .join("releases")
        .join(name)
        .join(version)
        .join("bin");
    fs::create_dir_all(&bin).expect("mkdir");
    for dir in [
        root.path().join("releases"),
        root.path().join("releases").join(name),
        root.path().join("releases").join(name).join(version),
        bin.clone(),
    ] {
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let script = bin.join(name);
    fs::write(&script, format!("#!/bin/sh\n{body}\n")).expect("write script");
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).expect("chmod");
}

const SLEEPER: &str = "echo started $EREL_VERSION\nexec sleep 1000";

fn start_request(name: &str, version: &str) -> Start {
    Start {
        name: name.into(),
        version: version.into(),
        argv: Vec::new(),
        env: Vec::new(),
        user: None,
    }
}

impl Supervisor {
    /// Each release with the version that runs or should run.
    fn running_versions(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for release in self.inner.registered() {
            let live = release.live();
            let desired = live
                .desired
                .as_ref()
                .filter(|d| d.should_run)
                .map(|d| &d.version);
            let running = live
                .process
                .as_ref()
                .map(|p| &p.version)
                .filter(|&v| Some(v) != desired);
            for version in desired.into_iter().chain(running) {
                out.push((release.name.clone(), version.clone()));
            }
        }
        out
    }
}

/// A fixture with release `app` version 1 running `body`.
fn fixture_with(body: &str) -> Fixture {
    let fx = fixture();
    fx.version("1", body);
    fx
}

/// A [`SLEEPER`] left running by an agent that was restarted (see
/// [`Fixture::start_and_detach`]).
async fn left_running() -> (Fixture, Started) {
    let fx = fixture_with(SLEEPER);
    let started = fx.start_and_detach().await;
    (fx, started)
}

/// A fixture with versions 1 and 2 of release `app`, both [`SLEEPER`]s.
fn two_versions() -> Fixture {
    let fx = fixture_with(SLEEPER);
    fx.version("2", SLEEPER);
    fx
}

impl Fixture {
    /// Writes version `version` of release `app` running `body`.
    fn version(&self, version: &str, body: &str) {
        release(&self.root, "app", version, body);
    }

    async fn open(&self) -> Supervisor {
        self.open_with(settings()).await
    }

    async fn open_with(&self, settings: Supervision) -> Supervisor {
        Supervisor::open(self.root.clone(), HOST.into(), settings)
            .await
            .expect("open supervisor")
    }

    /// Opens a supervisor with `parent`; `None` (test skipped, and it says so) when
    /// cgroup containment was asked for but this machine has no writable cgroup v2.
    async fn contained(&self, parent: CgroupParent) -> Option<Supervisor> {
        let wants_cgroup = parent != CgroupParent::None;
        let sup = self.open_with(settings_with(parent)).await;
        let mode = sup.containment();
        if wants_cgroup && !mode.starts_with("cgroup v2") {
            skipped_without_cgroup(&mode);
            sup.detach().await;
            return None;
        }
        if !wants_cgroup {
            assert!(mode.starts_with("fallback"), "{mode}");
        }
        Some(sup)
    }
}

impl Fixture {
    /// Starts version 1 of `app` under a supervisor that then detaches, as an agent
    /// that is restarted leaves it.
    async fn start_and_detach(&self) -> Started {
        let sup = self.open().await;
        let started = start(&sup, "1").await;
        sup.detach().await;
        started
    }

    /// Changes the desired state on disk behind the supervisor's back.
    fn edit_desired(&self, from: &str, to: &str) {
        let path = self.root.state(State::Releases).join("app.json");
        let desired = fs::read_to_string(&path).expect("desired");
        fs::write(&path, desired.replace(from, to)).expect("write");
    }
}

/// Release `app` version 1 running `body`, started by a supervisor with the test settings.
async fn running(body: &str) -> (Fixture, Supervisor, Started) {
    let fx = fixture_with(body);
    let sup = fx.open().await;
    let started = start(&sup, "1").await;
    (fx, sup, started)
}

impl Fixture {
    /// Waits for `text` in the output log of `app`.
    async fn wait_output(&self, text: &str) {
        eventually(&format!("{text:?} in the log"), || {
            log_text(&self.root, "app").contains(text)
        })
        .await;
    }
}

/// The pid of `app`, asserted to run as the one copy there is.
async fn one_copy_running(fx: &Fixture, sup: &Supervisor) -> u32 {
    let status = status(sup, "app").await;
    assert_eq!(status.state, ReleaseState::Running);
    let pid = status.pid.expect("pid");
    assert_eq!(copies(&fx.root, "app"), vec![pid]);
    pid
}

/// Kills `pid` of `app` and waits for the restart: one copy again, under a new pid.
async fn kill_and_see_it_restarted(fx: &Fixture, sup: &Supervisor, pid: u32) {
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("kill");
    let status = wait_status(sup, "app", "a restart", |s| {
        s.state == ReleaseState::Running && s.pid.is_some_and(|p| p != pid)
    })
    .await;
    assert_eq!(status.restarts, 1);
    assert_eq!(copies(&fx.root, "app"), vec![status.pid.expect("pid")]);
}

async fn start(sup: &Supervisor, version: &str) -> Started {
    sup.start(&start_request("app", version))
        .await
        .expect("start")
}

async fn stop(sup: &Supervisor, grace: Duration) -> Stopped {
    sup.stop("app", grace).await.expect("stop")
}

/// Live (non-zombie) processes, or only group leaders, carrying `EREL_ROOT=<root>` (and
/// `EREL_RELEASE=<name>` when given).
fn processes_in(root: &Path, name: Option<&str>, leaders_only: bool) -> Vec<u32> {
    let root_text = root.to_string_lossy().into_owned();
    let mut out = Vec::new();
    for entry in fs::read_dir("/proc").expect("proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Some(stat) = process::proc_stat(pid) else {
            continue;
        };
        if stat.is_gone() || (leaders_only && stat.pgrp != pid as i32) {
            continue;
        }
        let Some(env) = process::environ(pid) else {
            continue;
        };
        let has = |k: &str, v: &str| env.iter().any(|(key, value)| key == k && value == v);
        if has("EREL_ROOT", &root_text) && name.is_none_or(|n| has("EREL_RELEASE", n)) {
            out.push(pid);
        }
    }
    out
}

/// The copies of a release that run: group leaders with its environment.
fn copies(root: &Root, name: &str) -> Vec<u32> {
    processes_in(root.path(), Some(name), true)
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let held = wait::poll(PATIENCE, || std::future::ready(check().then_some(()))).await;
    assert!(held.is_some(), "timed out waiting for {what}");
}

async fn status(sup: &Supervisor, name: &str) -> ReleaseStatus {
    sup.statuses()
        .await
        .into_iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no status for {name}"))
}

async fn wait_status(
    sup: &Supervisor,
    name: &str,
    what: &str,
    check: impl Fn(&ReleaseStatus) -> bool,
) -> ReleaseStatus {
    let check = &check;
    let reached = wait::poll(PATIENCE, || async move {
        Some(status(sup, name).await).filter(|current| check(current))
    })
    .await;
    let last = status(sup, name).await;
    reached.unwrap_or_else(|| panic!("timed out waiting for {what}; last status {last:?}"))
}

fn alive(pid: u32) -> bool {
    process::proc_stat(pid).is_some_and(|s| !s.is_gone())
}

/// Live (non-zombie) members of process group `pgid`.
fn group_members(pgid: i32) -> Vec<u32> {
    process::all_pids()
        .into_iter()
        .filter(|&pid| process::proc_stat(pid).is_some_and(|s| s.pgrp == pgid && !s.is_gone()))
        .collect()
}

fn log_text(root: &Root, name: &str) -> String {
    fs::read_to_string(root.state(State::Logs).join(format!("{name}.log"))).unwrap_or_default()
}

#[tokio::test]
async fn start_runs_in_its_own_group_with_env_and_log() {
    let fx = fixture_with("env > \"$EREL_ROOT/app.env\"\npwd > \"$EREL_ROOT/app.pwd\"\necho started $EREL_VERSION\nexec sleep 1000");
    let sup = fx.open().await;
    let mut request = start_request("app", "1");
    request.env = vec![
        ("FOO".into(), "bar".into()),
        ("PATH".into(), "/custom/bin:/usr/bin:/bin".into()),
        ("EREL_VERSION".into(), "forged".into()),
    ];
    let started = sup.start(&request).await.expect("start");
    assert!(!started.already_running);
    let status = status(&sup, "app").await;
    assert_eq!(status.state, ReleaseState::Running);
    assert_eq!(status.pid, Some(started.pid));
    assert_eq!(status.version.as_deref(), Some("1"));
    assert!(status.desired_running);
    assert_eq!(status.versions, vec!["1".to_string()]);
    let stat = process::proc_stat(started.pid).expect("stat");
    assert_eq!(stat.pgrp, started.pid as i32, "own process group");

    // The script echoes after writing both files.
    fx.wait_output("started 1").await;
    let env_file = fx.root.path().join("app.env");
    let env = fs::read_to_string(&env_file).expect("env");
    let root_text = fx.root.path().display().to_string();
    for line in [
        "EREL_HOST_ID=host-test".to_string(),
        "EREL_RELEASE=app".to_string(),
        "EREL_VERSION=1".to_string(),
        format!("EREL_ROOT={root_text}"),
        "FOO=bar".to_string(),
        "PATH=/custom/bin:/usr/bin:/bin".to_string(),
        "LANG=C.UTF-8".to_string(),
    ] {
        assert!(env.lines().any(|l| l == line), "{line} missing from\n{env}");
    }
    assert!(env.lines().any(|l| l.starts_with("HOME=")), "{env}");
    assert!(!env.contains("forged"));
    let pwd = fs::read_to_string(fx.root.path().join("app.pwd")).expect("pwd");
    assert_eq!(pwd.trim(), format!("{root_text}/releases/app/1"));

    assert!(log_text(&fx.root, "app").contains("--- erel: starting app 1 at "));

    let again = sup.start(&request).await.expect("start again");
    assert!(again.already_running);
    assert_eq!(again.pid, started.pid);
    assert_eq!(copies(&fx.root, "app"), vec![started.pid]);
    assert_eq!(
        sup.running_versions(),
        vec![("app".to_string(), "1".to_string())]
    );

    // Desired state and run record are on disk.
    let desired =
        fs::read_to_string(fx.root.state(State::Releases).join("app.json")).expect("desired");
    assert!(desired.contains("\"should_run\": true"), "{desired}");
    assert!(desired.contains("bin/app"), "{desired}");
    let run = fs::read_to_string(fx.root.state(State::Releases).join("app.run")).expect("run");
    assert!(run.contains(&format!("\"pid\": {}", started.pid)), "{run}");
    sup.detach().await;
}

#[tokio::test]
async fn a_killed_release_is_restarted() {
    let (fx, sup, first) = running(SLEEPER).await;
    kill_and_see_it_restarted(&fx, &sup, first.pid).await;
    stop(&sup, Duration::from_secs(5)).await;
    sup.detach().await;
}

#[tokio::test]
async fn a_release_that_keeps_dying_crash_loops() {
    let fx = fixture_with("echo boom $EREL_VERSION\nexit 3");
    let sup = fx.open().await;
    start(&sup, "1").await;
    let status = wait_status(&sup, "app", "crash-looping", |s| {
        s.state == ReleaseState::CrashLooping
    })
    .await;
    assert!(
        status.output_tail.contains("boom 1"),
        "{:?}",
        status.output_tail
    );
    assert_eq!(status.restarts, 2);
    assert!(status.desired_running);
    assert_eq!(status.pid, None);
    let runs = |root: &Root| log_text(root, "app").matches("boom 1").count();
    assert_eq!(runs(&fx.root), 3);
    // No further restarts, also not after an agent restart: a restart would come within
    // the longest backoff, so twice that shows none is coming.
    tokio::time::sleep(settings().restart_backoff_max * 2).await;
    assert_eq!(runs(&fx.root), 3);
    sup.detach().await;
    let sup = fx.open().await;
    tokio::time::sleep(settings().restart_backoff_max * 2).await;
    assert_eq!(status_state(&sup, "app").await, ReleaseState::CrashLooping);
    assert_eq!(runs(&fx.root), 3);

    // The next Start begins afresh.
    let started = start(&sup, "1").await;
    assert!(!started.already_running);
    wait_status(&sup, "app", "crash-looping again", |s| {
        s.state == ReleaseState::CrashLooping
    })
    .await;
    assert_eq!(runs(&fx.root), 6);
    sup.detach().await;
}

async fn status_state(sup: &Supervisor, name: &str) -> ReleaseState {
    status(sup, name).await.state
}

#[tokio::test]
async fn an_exited_release_reports_its_exit_while_waiting_to_restart() {
    let fx = fixture_with("echo bye\nexit 7");
    let mut slow = settings();
    slow.restart_backoff = Duration::from_secs(30);
    slow.restart_backoff_max = Duration::from_secs(30);
    let sup = fx.open_with(slow).await;
    let started = start(&sup, "1").await;
    let status = wait_status(&sup, "app", "exited", |s| {
        matches!(s.state, ReleaseState::Exited { .. })
    })
    .await;
    assert_eq!(
        status.state,
        ReleaseState::Exited {
            code: Some(7),
            signal: None
        }
    );
    assert!(status.output_tail.contains("bye"));
    // Starting it again during the backoff changes nothing.
    let again = start(&sup, "1").await;
    assert!(again.already_running);
    assert_eq!(again.pid, started.pid);
    // Stopping it ends the backoff: it is not running.
    let stopped = stop(&sup, Duration::from_secs(1)).await;
    assert!(!stopped.was_running);
    assert_eq!(status_state(&sup, "app").await, ReleaseState::Stopped);
    sup.detach().await;
}

#[tokio::test]
async fn stop_terminates_gracefully() {
    // The background child says `ready` itself, after its exec: a forked shell keeps the
    // parent's TERM trap until it execs (execve(2) resets caught signals), so a SIGTERM
    // landing between the fork and the exec only runs that inherited trap and is lost,
    // and the `sleep` it then becomes lives on (as under any supervisor, systemd's
    // included). The parent waits in short foreground sleeps rather than in `wait`: a
    // signal that lands just before dash blocks in `wait` runs its trap only once the
    // child ends.
    let (fx, sup, started) = running(
        "trap 'echo got term; exit 0' TERM\nsh -c 'echo ready; exec sleep 1000' &\nwhile :; do sleep 0.1; done",
    )
    .await;
    fx.wait_output("ready").await;
    let began = std::time::Instant::now();
    let stopped = stop(&sup, Duration::from_secs(10)).await;
    assert!(stopped.was_running);
    assert!(
        !stopped.killed,
        "killed after {:?}; log: {}",
        began.elapsed(),
        log_text(&fx.root, "app")
    );
    assert!(group_members(started.pid as i32).is_empty());
    assert!(log_text(&fx.root, "app").contains("got term"));
    let status = status(&sup, "app").await;
    assert_eq!(status.state, ReleaseState::Stopped);
    assert!(!status.desired_running);
    assert_eq!(status.pid, None);
    let desired =
        fs::read_to_string(fx.root.state(State::Releases).join("app.json")).expect("desired");
    assert!(desired.contains("\"should_run\": false"), "{desired}");
    assert!(!fx.root.state(State::Releases).join("app.run").exists());
    // Our child was reaped: no zombie left behind.
    assert!(process::proc_stat(started.pid).is_none());
    // Idempotent, also for a release never heard of.
    let again = sup
        .stop("app", Duration::from_secs(1))
        .await
        .expect("stop again");
    assert!(!again.was_running && !again.killed);
    let unknown = sup
        .stop("nothing", Duration::from_secs(1))
        .await
        .expect("stop unknown");
    assert!(!unknown.was_running && !unknown.killed);
    assert!(sup.running_versions().is_empty());
    sup.detach().await;
}

#[tokio::test]
async fn stop_kills_what_ignores_sigterm() {
    let (fx, sup, started) = running("trap '' TERM\necho ready\nsleep 1000 &\nwait").await;
    fx.wait_output("ready").await;
    let begun = Instant::now();
    let stopped = stop(&sup, Duration::from_millis(300)).await;
    assert!(begun.elapsed() >= Duration::from_millis(300));
    assert!(stopped.was_running);
    assert!(stopped.killed);
    assert!(group_members(started.pid as i32).is_empty());
    assert!(copies(&fx.root, "app").is_empty());
    sup.detach().await;
}

#[tokio::test]
async fn stop_leaves_nothing_of_the_group() {
    // A grandchild, reparented away from the release, still in its process group.
    let (_fx, sup, started) =
        running("(sh -c 'exec sleep 1001' &)\necho forked\nexec sleep 1000").await;
    let pgid = started.pid as i32;
    eventually("the grandchild", || group_members(pgid).len() >= 2).await;
    let stopped = stop(&sup, Duration::from_secs(5)).await;
    assert!(stopped.was_running);
    assert!(group_members(pgid).is_empty());
    sup.detach().await;
}

#[tokio::test]
async fn starting_another_version_replaces_the_running_one() {
    let fx = two_versions();
    let sup = fx.open().await;
    let one = start(&sup, "1").await;
    let two = start(&sup, "2").await;
    assert!(!two.already_running);
    assert_ne!(one.pid, two.pid);
    assert!(!alive(one.pid));
    assert_eq!(copies(&fx.root, "app"), vec![two.pid]);
    let status = status(&sup, "app").await;
    assert_eq!(status.version.as_deref(), Some("2"));
    assert_eq!(status.pid, Some(two.pid));
    assert_eq!(status.restarts, 0);
    assert_eq!(
        sup.running_versions(),
        vec![("app".to_string(), "2".to_string())]
    );
    sup.detach().await;
}

#[tokio::test]
async fn an_agent_restart_adopts_the_running_release() {
    let (fx, started) = left_running().await;
    assert!(alive(started.pid), "detach must not stop releases");

    let sup = fx.open().await;
    assert_eq!(one_copy_running(&fx, &sup).await, started.pid);
    let again = start(&sup, "1").await;
    assert!(again.already_running);
    assert_eq!(again.pid, started.pid);

    // An adopted process that dies is noticed and restarted.
    kill_and_see_it_restarted(&fx, &sup, started.pid).await;
    sup.detach().await;
}

/// How a machine crash can leave the run record, which is not synced (see `record`).
enum LostRecord {
    Missing,
    Empty,
    Torn,
}

#[tokio::test]
async fn an_agent_restart_without_run_record_finds_the_release_by_environment() {
    adopts_with_run_record(LostRecord::Missing).await;
}

#[tokio::test]
async fn an_agent_restart_with_an_empty_run_record_finds_the_release() {
    adopts_with_run_record(LostRecord::Empty).await;
}

#[tokio::test]
async fn an_agent_restart_with_a_torn_run_record_finds_the_release() {
    adopts_with_run_record(LostRecord::Torn).await;
}

/// An agent restarted over a release left running, its run record `lost` as given,
/// adopts the one copy that runs (no second copy), rewrites the record and can stop it.
async fn adopts_with_run_record(lost: LostRecord) {
    let (fx, started) = left_running().await;
    let record = fx.root.state(State::Releases).join("app.run");
    match lost {
        LostRecord::Missing => fs::remove_file(&record).expect("remove run record"),
        LostRecord::Empty => fs::write(&record, b"").expect("empty the run record"),
        LostRecord::Torn => {
            let text = fs::read(&record).expect("read the run record");
            fs::write(&record, &text[..text.len() / 2]).expect("tear the run record");
        }
    }

    let sup = fx.open().await;
    assert_eq!(one_copy_running(&fx, &sup).await, started.pid);
    let rewritten = super::record::load_run(&fx.root, "app").expect("a readable run record");
    assert_eq!(
        rewritten.map(|run| run.pid),
        Some(started.pid),
        "record rewritten"
    );

    // Stopping the adopted process works too.
    let stopped = stop(&sup, Duration::from_secs(5)).await;
    assert!(stopped.was_running);
    assert!(!stopped.killed);
    assert!(copies(&fx.root, "app").is_empty());
    assert!(group_members(started.pid as i32).is_empty());
    sup.detach().await;
}

#[tokio::test]
async fn an_agent_restart_starts_a_dead_release_once() {
    let (fx, started) = left_running().await;
    kill(Pid::from_raw(started.pid as i32), Signal::SIGKILL).expect("kill");
    eventually("the process to die", || !alive(started.pid)).await;

    let sup = fx.open().await;
    assert_ne!(one_copy_running(&fx, &sup).await, started.pid);
    assert_eq!(
        log_text(&fx.root, "app")
            .matches("--- erel: starting")
            .count(),
        2
    );
    sup.detach().await;
}

#[tokio::test]
async fn an_agent_restart_replaces_a_copy_of_the_wrong_version() {
    let fx = two_versions();
    let one = fx.start_and_detach().await;
    // As if the agent died right after recording that version 2 should run.
    fx.edit_desired("\"version\": \"1\"", "\"version\": \"2\"");

    let sup = fx.open().await;
    assert!(!alive(one.pid));
    let status = status(&sup, "app").await;
    assert_eq!(status.version.as_deref(), Some("2"));
    assert_eq!(copies(&fx.root, "app"), vec![status.pid.expect("pid")]);
    sup.detach().await;
}

#[tokio::test]
async fn an_agent_restart_stops_what_should_not_run() {
    let (fx, one) = left_running().await;
    // As if the agent died between recording the stop and signalling.
    fx.edit_desired("\"should_run\": true", "\"should_run\": false");
    let sup = fx.open().await;
    assert!(!alive(one.pid));
    assert_eq!(status_state(&sup, "app").await, ReleaseState::Stopped);
    sup.detach().await;
}

#[tokio::test]
async fn a_release_runs_as_the_named_user() {
    if !nix::unistd::geteuid().is_root() {
        return; // dropping privileges needs root
    }
    let Ok(Some(nobody)) = nix::unistd::User::from_name("nobody") else {
        return;
    };
    let fx = fixture_with(SLEEPER);
    let sup = fx.open().await;
    let mut request = start_request("app", "1");
    request.user = Some("nobody".into());
    let started = sup.start(&request).await.expect("start as nobody");
    let status = fs::read_to_string(format!("/proc/{}/status", started.pid)).expect("status");
    let uid_line = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .expect("Uid line");
    let uids: Vec<&str> = uid_line.split_whitespace().skip(1).collect();
    assert!(
        uids.iter().all(|u| *u == nobody.uid.to_string()),
        "{uid_line}"
    );
    let groups_line = status
        .lines()
        .find(|l| l.starts_with("Groups:"))
        .expect("Groups line");
    assert!(
        !groups_line.split_whitespace().skip(1).any(|g| g == "0"),
        "{groups_line}"
    );
    // The environment reads as empty for a moment while the release execs (its start
    // script execs `sleep`), so it is read once it is there.
    let mut env = Vec::new();
    eventually("the release's environment", || {
        env = process::environ(started.pid).unwrap_or_default();
        !env.is_empty()
    })
    .await;
    assert!(
        env.contains(&("USER".to_string(), "nobody".to_string())),
        "{env:?}"
    );
    assert!(env.contains(&("HOME".to_string(), nobody.dir.display().to_string())));
    sup.detach().await;
}

#[tokio::test]
async fn bad_start_requests_are_refused_without_recording_anything() {
    let fx = fixture_with(SLEEPER);
    let plain = fx.root.path().join("releases/app/1/bin/plain");
    fs::write(&plain, "#!/bin/sh\n").expect("write");
    let sup = fx.open().await;

    let err = sup.start(&start_request("app", "9")).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    assert!(err.to_string().contains("releases/app/9"), "{err}");

    let with_argv = |argv: &[&str]| {
        let mut request = start_request("app", "1");
        request.argv = argv.iter().map(|a| a.to_string()).collect();
        request
    };
    let err = sup.start(&with_argv(&["/bin/sh"])).await.unwrap_err();
    assert!(matches!(err, Error::InvalidPath { .. }), "{err}");
    let err = sup
        .start(&with_argv(&["../../../../bin/sh"]))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidPath { .. }), "{err}");
    let err = sup.start(&with_argv(&["bin/missing"])).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    let err = sup.start(&with_argv(&["bin/plain"])).await.unwrap_err();
    assert!(matches!(err, Error::SpawnFailed { .. }), "{err}");
    assert!(err.to_string().contains("not executable"), "{err}");
    let mut request = start_request("app", "1");
    request.user = Some("no-such-user-here".into());
    let err = sup.start(&request).await.unwrap_err();
    assert!(matches!(err, Error::SpawnFailed { .. }), "{err}");
    assert!(err.to_string().contains("no-such-user-here"), "{err}");
    let err = sup.start(&start_request("../x", "1")).await.unwrap_err();
    assert!(matches!(err, Error::InvalidPath { .. }), "{err}");

    assert!(!fx.root.state(State::Releases).join("app.json").exists());
    assert!(copies(&fx.root, "app").is_empty());
    let status = status(&sup, "app").await;
    assert_eq!(status.state, ReleaseState::Stopped);
    assert!(!status.desired_running);
    sup.detach().await;
}

#[tokio::test]
async fn statuses_list_versions_oldest_first() {
    let fx = fixture();
    fx.version("2", SLEEPER);
    let old = fs::File::open(fx.root.path().join("releases/app/2")).expect("open");
    old.set_modified(std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000))
        .expect("set mtime");
    fx.version("10", SLEEPER);
    release(&fx.root, "other", "1", SLEEPER);
    let sup = fx.open().await;
    let all = sup.statuses().await;
    let names: Vec<&str> = all.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, vec!["app", "other"]);
    assert_eq!(all[0].versions, vec!["2".to_string(), "10".to_string()]);
    assert_eq!(all[0].state, ReleaseState::Stopped);
    assert_eq!(all[0].version, None);
    sup.detach().await;
}

#[tokio::test]
async fn the_tail_holds_the_last_words_of_a_crash() {
    let fx = fixture_with("i=0\nwhile [ $i -lt 2000 ]; do echo line-$i-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx; i=$((i+1)); done\necho last-words >&2\nexit 7");
    let mut once = settings();
    once.crash_loop_after = 1;
    let sup = fx.open_with(once).await;
    start(&sup, "1").await;
    let status = wait_status(&sup, "app", "crash-looping", |s| {
        s.state == ReleaseState::CrashLooping
    })
    .await;
    // Recorded only after the writer drained the pipe: the last line is there at once.
    assert!(
        status
            .output_tail
            .ends_with("line-1999-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\nlast-words\n"),
        "{:?}",
        status.output_tail
    );
    sup.detach().await;
}

/// The output writer of the current run of `name`, from its run record.
fn writer_of(root: &Root, name: &str) -> (u32, u64) {
    let run = super::record::load_run(root, name)
        .expect("read the run record")
        .expect("a run record");
    assert_ne!(
        run.writer_pid, 0,
        "the run record names the writer: {run:?}"
    );
    (run.writer_pid, run.writer_start_time)
}

/// The writer is not the release: outside its session, group and cgroup, never counted
/// as a member nor reported as its pid, kept running through an agent restart, and gone
/// once a stop (before or after the restart) left nothing of the release.
async fn the_output_writer_is_no_member_and_leaves_with_the_release(parent: CgroupParent) {
    let fx = fixture_with(SLEEPER);
    let Some(sup) = fx.contained(parent.clone()).await else {
        return;
    };
    let started = start(&sup, "1").await;
    let (writer, writer_start) = writer_of(&fx.root, "app");
    assert!(process::is_alive(writer, writer_start), "the writer runs");
    let stat = process::proc_stat(writer).expect("writer stat");
    assert_ne!(
        stat.session, started.pid as i32,
        "the writer is outside the session"
    );
    assert_ne!(
        stat.pgrp, started.pid as i32,
        "the writer is outside the group"
    );
    let own_cgroup =
        |pid: u32| fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    if parent != CgroupParent::None {
        assert_ne!(
            own_cgroup(writer),
            own_cgroup(started.pid),
            "the writer is outside the cgroup"
        );
    }
    fx.wait_output("started 1").await;
    let anchor = (
        started.pid,
        process::proc_stat(started.pid).expect("stat").start_time,
    );
    let members = sup.inner.members("app", Some(anchor));
    assert!(members.contains(&started.pid), "{members:?}");
    assert!(
        !members.contains(&writer),
        "the writer is no member: {members:?}"
    );

    // Stopped by this agent: the writer drains and ends with the release.
    stop_leaves_no_writer(&fx, &sup, (writer, writer_start), "no writer left behind").await;

    // Adopted by the next agent: the writer is neither the release nor a second copy,
    // keeps running with it, and leaves with it.
    let started = start(&sup, "1").await;
    let (writer, writer_start) = writer_of(&fx.root, "app");
    sup.detach().await;
    let sup = fx.contained(parent).await.expect("reopen");
    let adopted = status(&sup, "app").await;
    assert_eq!(adopted.state, ReleaseState::Running, "{adopted:?}");
    assert_eq!(adopted.pid, Some(started.pid), "{adopted:?}");
    assert!(
        process::is_alive(writer, writer_start),
        "the adopted release's writer runs"
    );
    assert_eq!(writer_of(&fx.root, "app"), (writer, writer_start));
    stop_leaves_no_writer(
        &fx,
        &sup,
        (writer, writer_start),
        "no writer left behind after adoption",
    )
    .await;
    sup.detach().await;
}

/// Stops `app` gracefully and checks that nothing of it is left, nor its `writer`.
async fn stop_leaves_no_writer(fx: &Fixture, sup: &Supervisor, writer: (u32, u64), what: &str) {
    let stopped = stop(sup, Duration::from_secs(5)).await;
    assert!(stopped.was_running && !stopped.killed, "{stopped:?}");
    assert!(everything(&fx.root, "app").is_empty());
    assert!(!process::is_alive(writer.0, writer.1), "{what}");
}

#[tokio::test]
async fn a_writer_that_cannot_start_refuses_the_start() {
    let fx = fixture_with(SLEEPER);
    let mut broken = settings();
    broken.output_writer.program = fx.root.path().join("no-such-writer");
    let sup = fx.open_with(broken).await;
    let err = sup
        .start(&start_request("app", "1"))
        .await
        .expect_err("refused");
    let text = err.to_string();
    assert!(matches!(err, Error::SpawnFailed { .. }), "{text}");
    assert!(
        text.contains("output writer") && text.contains("no-such-writer"),
        "{text}"
    );
    eventually("no copy left running", || {
        copies(&fx.root, "app").is_empty()
    })
    .await;
    sup.detach().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stop_and_start_racing_restarts_never_leave_two_copies() {
    let fx = fixture_with("sleep 0.05\nexit 1");
    fx.version("2", SLEEPER);
    let mut patient = settings();
    patient.restart_backoff = Duration::from_millis(10);
    patient.restart_backoff_max = Duration::from_millis(20);
    patient.crash_loop_after = 1000;
    let longest_backoff = patient.restart_backoff_max;
    let sup = fx.open_with(patient).await;
    for round in 0..8u64 {
        start(&sup, "1").await;
        tokio::time::sleep(Duration::from_millis(15 * round)).await;
        stop(&sup, Duration::from_secs(2)).await;
        assert!(copies(&fx.root, "app").is_empty(), "round {round}");
    }
    // A restart would come within the longest backoff (20 ms): five times that shows none.
    tokio::time::sleep(longest_backoff * 5).await;
    assert!(copies(&fx.root, "app").is_empty(), "restarted after stop");
    assert_eq!(status_state(&sup, "app").await, ReleaseState::Stopped);

    // Concurrent starts of two versions: one wins, one copy runs.
    let (two, one) = (start_request("app", "2"), start_request("app", "1"));
    let (a, b) = tokio::join!(sup.start(&two), sup.start(&one));
    a.expect("start 2");
    b.expect("start 1");
    // The loser's copy, had it been left, would be running by the longest backoff.
    tokio::time::sleep(longest_backoff * 5).await;
    assert!(copies(&fx.root, "app").len() <= 1);
    let stopped = stop(&sup, Duration::from_secs(2)).await;
    assert!(!stopped.killed);
    assert!(copies(&fx.root, "app").is_empty());
    sup.detach().await;
}

// ---- Containment: everything a release starts is the release's. ----

/// The input: a helper in its own session, then the main process.
const SETSID_HELPER: &str =
    "setsid sh -c 'exec sleep 100000' &\necho helper-started\nexec sleep 100000";
/// A double fork: the helper's parent exits at once, so init adopts it; then the start
/// command returns 0.
const DOUBLE_FORK: &str = "(sh -c 'exec sleep 100000' &)\necho daemonized\nexit 0";

fn settings_with(parent: CgroupParent) -> Supervision {
    Supervision {
        cgroup_parent: parent,
        ..settings()
    }
}

/// Every live process of release `name` (group leaders or not).
fn everything(root: &Root, name: &str) -> Vec<u32> {
    processes_in(root.path(), Some(name), false)
}

async fn stop_reaches_a_setsid_helper(parent: CgroupParent) {
    let fx = fixture_with(SETSID_HELPER);
    let Some(sup) = fx.contained(parent).await else {
        return;
    };
    let started = start(&sup, "1").await;
    // Found inside the wait: a process is briefly invisible to the environment scan
    // while it execs (its new environment is not laid out yet), so a second scan right
    // after the wait may miss the helper. And found once it has left the session: it is
    // `setsid` in the release's session for a moment before it calls setsid(2).
    let mut helper = None;
    let outside =
        |pid: u32| process::proc_stat(pid).is_some_and(|s| s.session != started.pid as i32);
    eventually("the helper in its own session", || {
        helper = everything(&fx.root, "app")
            .into_iter()
            .find(|&pid| pid != started.pid && outside(pid));
        helper.is_some()
    })
    .await;
    let helper = helper.expect("helper");
    let stat = process::proc_stat(helper).expect("helper stat");
    assert_ne!(
        stat.session, started.pid as i32,
        "the helper left the session"
    );
    assert_ne!(stat.pgrp, started.pid as i32, "the helper left the group");

    let stopped = stop(&sup, Duration::from_secs(5)).await;
    assert!(stopped.was_running);
    assert!(!alive(helper), "the setsid helper survived the stop");
    assert!(everything(&fx.root, "app").is_empty());
    // Starting again gives one copy of each, not two.
    start(&sup, "1").await;
    eventually("the new helper", || everything(&fx.root, "app").len() >= 2).await;
    // A second copy would come from a restart, within the longest backoff.
    tokio::time::sleep(settings().restart_backoff_max * 3 / 2).await;
    // At most two: a copy in the middle of an exec may be missed by the scan, never added.
    let now = everything(&fx.root, "app");
    assert!(now.len() <= 2, "one copy of each: {now:?}");
    stop(&sup, Duration::from_secs(5)).await;
    assert!(everything(&fx.root, "app").is_empty());
    sup.detach().await;
}

#[tokio::test]
async fn a_release_runs_in_its_own_cgroup() {
    // The helper leaves the session and clears its environment: only the cgroup
    // still knows it is the release's.
    let fx = fixture_with("setsid env -i sleep 100001 &\nexec sleep 100000");
    let Some(sup) = fx.contained(CgroupParent::Auto).await else {
        return;
    };
    let started = start(&sup, "1").await;
    let Containment::Cgroup(tree) = &sup.inner.containment else {
        panic!("cgroup mode expected");
    };
    let dir = tree.release_dir("app");
    // Not the main process, whose environment also reads as empty while it execs.
    let bare = || {
        tree.members("app").into_iter().find(|&pid| {
            pid != started.pid && process::environ(pid).is_some_and(|env| env.is_empty())
        })
    };
    let mut helper = None;
    eventually("the helper without an environment", || {
        helper = bare();
        helper.is_some()
    })
    .await;
    let helper = helper.expect("helper");
    let members = tree.members("app");
    assert!(members.contains(&started.pid), "{members:?}");
    let own = fs::read_to_string(format!("/proc/{}/cgroup", started.pid)).expect("cgroup");
    assert!(
        own.contains("/erel@") && own.trim_end().ends_with("/release.app"),
        "{own}"
    );

    let stopped = stop(&sup, Duration::from_secs(5)).await;
    assert!(stopped.was_running);
    assert!(!alive(helper), "the helper without markers survived");
    assert!(!dir.exists(), "the emptied cgroup is removed");
    sup.detach().await;
}

async fn a_daemonizing_start_command_never_multiplies(parent: CgroupParent) {
    let fx = fixture_with(DOUBLE_FORK);
    let Some(sup) = fx.contained(parent.clone()).await else {
        return;
    };
    let started = start(&sup, "1").await;
    let status = wait_status(&sup, "app", "the daemon to be the release", |s| {
        s.state == ReleaseState::Running && s.pid.is_some_and(|p| p != started.pid && is_sleeper(p))
    })
    .await;
    let daemon = status.pid.expect("pid");
    assert!(alive(daemon));
    // Several backoffs later: still one daemon, never restarted.
    tokio::time::sleep(settings().restart_backoff_max * 3).await;
    let status = status_state_full(&sup).await;
    assert_eq!(status.state, ReleaseState::Running);
    assert_eq!(status.restarts, 0);
    assert_eq!(everything(&fx.root, "app"), vec![daemon]);
    // Starting it again changes nothing.
    let again = start(&sup, "1").await;
    assert!(again.already_running);
    assert_eq!(everything(&fx.root, "app"), vec![daemon]);

    // The daemon dies: the release is restarted once, and is one daemon again.
    kill(Pid::from_raw(daemon as i32), Signal::SIGKILL).expect("kill");
    let status = wait_status(&sup, "app", "a new daemon", |s| {
        s.state == ReleaseState::Running
            && s.restarts == 1
            && s.pid.is_some_and(|p| p != daemon && is_sleeper(p))
            && everything(&fx.root, "app") == vec![p_or_zero(s.pid)]
    })
    .await;
    let second = status.pid.expect("pid");

    // An agent restart adopts the daemon rather than starting another.
    sup.detach().await;
    let sup = fx.contained(parent).await.expect("reopen");
    let sup_mode = sup.containment();
    let status = status_state_full(&sup).await;
    assert_eq!(status.state, ReleaseState::Running, "{sup_mode}");
    assert_eq!(status.pid, Some(second));
    tokio::time::sleep(settings().restart_backoff_max * 3).await;
    assert_eq!(everything(&fx.root, "app"), vec![second]);

    let stopped = stop(&sup, Duration::from_secs(5)).await;
    assert!(stopped.was_running);
    assert!(everything(&fx.root, "app").is_empty());
    sup.detach().await;
}

/// True for the `sleep 100000` the test releases leave running (not the start command
/// that is about to leave it).
fn is_sleeper(pid: u32) -> bool {
    fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == b"sleep\x00100000\x00")
}

fn p_or_zero(pid: Option<u32>) -> u32 {
    pid.unwrap_or(0)
}

async fn status_state_full(sup: &Supervisor) -> ReleaseStatus {
    status(sup, "app").await
}

async fn a_crash_leaves_nothing_behind_before_the_restart(parent: CgroupParent) {
    // The main process fails (status 3) and leaves a helper: the helper is stopped, and
    // the restart brings exactly one helper back.
    let fx = fixture_with("setsid sh -c 'exec sleep 100000' &\nsleep 0.3\nexit 3");
    let Some(sup) = fx.contained(parent).await else {
        return;
    };
    start(&sup, "1").await;
    wait_status(&sup, "app", "a restart", |s| s.restarts >= 1).await;
    // At any instant at most one helper runs.
    let helpers = || {
        everything(&fx.root, "app")
            .into_iter()
            .filter(|pid| {
                fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == b"sleep\x00100000\x00")
            })
            .count()
    };
    for _ in 0..40 {
        let now = helpers();
        assert!(now <= 1, "{now} helpers run at once");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    stop(&sup, Duration::from_secs(5)).await;
    assert!(everything(&fx.root, "app").is_empty());
    sup.detach().await;
}

async fn a_zombie_is_not_running(parent: CgroupParent) {
    // The child exits at once, and `sleep`, which replaces the shell, never reaps it.
    let fx = fixture_with("sleep 0 &\nexec sleep 100000");
    let Some(sup) = fx.contained(parent).await else {
        return;
    };
    let started = start(&sup, "1").await;
    let zombie = || {
        fs::read_dir("/proc")
            .expect("proc")
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .find(|&pid| {
                process::proc_stat(pid).is_some_and(|s| s.ppid == started.pid as i32 && s.is_gone())
            })
    };
    eventually("a zombie child", || zombie().is_some()).await;
    let zombie = zombie().expect("zombie");
    let anchor = Some((
        started.pid,
        process::proc_stat(started.pid).expect("stat").start_time,
    ));
    let members = sup.inner.members("app", anchor);
    assert_eq!(members, vec![started.pid], "zombie {zombie} counted");
    // The stop ends at SIGTERM: nothing waits for the zombie, nothing is SIGKILLed.
    let begun = Instant::now();
    let stopped = stop(&sup, Duration::from_secs(20)).await;
    assert!(stopped.was_running);
    assert!(!stopped.killed);
    assert!(begun.elapsed() < Duration::from_secs(20));
    sup.detach().await;
}

#[tokio::test]
async fn an_unusable_cgroup_parent_falls_back_and_says_so() {
    let fx = fixture();
    // A cgroup path through an interface file can never be created.
    let sup = fx
        .open_with(settings_with(CgroupParent::Path(
            "/cgroup.procs/erel".into(),
        )))
        .await;
    let mode = sup.containment();
    assert!(mode.starts_with("fallback to process groups ("), "{mode}");
    fx.version("1", SETSID_HELPER);
    start(&sup, "1").await;
    eventually("the helper", || everything(&fx.root, "app").len() >= 2).await;
    stop(&sup, Duration::from_secs(5)).await;
    assert!(everything(&fx.root, "app").is_empty());
    sup.detach().await;
}

#[tokio::test]
async fn switching_to_cgroups_never_leaves_a_copy_outside() {
    let fx = fixture_with(SETSID_HELPER);
    // Started by an agent without cgroups...
    let Some(sup) = fx.contained(CgroupParent::None).await else {
        return;
    };
    start(&sup, "1").await;
    eventually("the helper", || everything(&fx.root, "app").len() >= 2).await;
    let outside = everything(&fx.root, "app");
    sup.detach().await;
    // ...then the agent restarts with cgroups: what runs outside the release's cgroup is
    // stopped, and one copy runs inside it.
    let Some(sup) = fx.contained(CgroupParent::Auto).await else {
        return;
    };
    assert!(
        outside.iter().all(|&pid| !alive(pid)),
        "{outside:?} still run"
    );
    let Containment::Cgroup(tree) = &sup.inner.containment else {
        panic!("cgroup mode expected");
    };
    eventually("the new copy with its helper", || {
        tree.members("app").len() == 2 && everything(&fx.root, "app").len() == 2
    })
    .await;
    assert_eq!(status_state(&sup, "app").await, ReleaseState::Running);
    stop(&sup, Duration::from_secs(5)).await;
    assert!(everything(&fx.root, "app").is_empty());
    sup.detach().await;

    // Back without cgroups: a copy started in a cgroup is found by its markers.
    let Some(sup) = fx.contained(CgroupParent::Auto).await else {
        return;
    };
    let started = start(&sup, "1").await;
    eventually("the helper", || everything(&fx.root, "app").len() >= 2).await;
    sup.detach().await;
    let sup = fx.contained(CgroupParent::None).await.expect("fallback");
    assert_eq!(status(&sup, "app").await.pid, Some(started.pid));
    stop(&sup, Duration::from_secs(5)).await;
    assert!(everything(&fx.root, "app").is_empty());
    sup.detach().await;
}

/// Each containment test runs twice, as `<test>::in_a_cgroup` and
/// `<test>::without_cgroups`.
macro_rules! with_and_without_cgroups {
    ($($test:ident),* $(,)?) => {$(
        mod $test {
            use super::CgroupParent;

            #[tokio::test]
            async fn in_a_cgroup() {
                super::$test(CgroupParent::Auto).await;
            }

            #[tokio::test]
            async fn without_cgroups() {
                super::$test(CgroupParent::None).await;
            }
        }
    )*};
}

with_and_without_cgroups!(
    the_output_writer_is_no_member_and_leaves_with_the_release,
    stop_reaches_a_setsid_helper,
    a_daemonizing_start_command_never_multiplies,
    a_crash_leaves_nothing_behind_before_the_restart,
    a_zombie_is_not_running,
);

/// Where the kernel refuses to create the release's process in its cgroup (`clone3`
/// with `CLONE_INTO_CGROUP`: older than Linux 5.7, or a seccomp filter), the agent forks
/// and the child joins the cgroup before `exec`: the release still runs in it. The
/// refusal is made here by handing the clone a directory that is not a cgroup.
#[tokio::test]
async fn a_refused_clone_into_the_cgroup_falls_back_to_joining_it() {
    let (_dir, root, desired) = test_root_and_desired("fallback", "1");
    release(&root, "fallback", "1", SLEEPER);
    let tree = match Containment::detect(&CgroupParent::Auto, root.path()) {
        Containment::Cgroup(tree) => tree,
        Containment::Fallback(why) => {
            skipped_without_cgroup(&why);
            return;
        }
    };
    let mut joining = tree.prepare("fallback").expect("prepare");
    joining.dir = fs::File::open("/dev/null").expect("/dev/null");
    let spawned = super::spawn::spawn(&root, HOST, &desired, &settings(), Some(joining));
    let mut spawned = spawned.expect("the fallback spawns");
    let forked = matches!(spawned.child, super::spawn::ReleaseChild::Command(_));
    let pid = spawned.anchor.0;
    let members = tree.members("fallback");
    let _ = tree.kill("fallback");
    let _ = spawned.child.wait().await;
    tree.remove("fallback");
    tree.remove_if_empty();
    assert!(forked, "spawned by the fallback, not by clone3");
    assert_eq!(members, vec![pid], "the release joined its cgroup");
}

#[tokio::test]
async fn a_start_waits_for_work_done_exclusively_on_its_release() {
    let fx = two_versions();
    let sup = fx.open().await;
    start(&sup, "1").await;
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let (held_tx, held_rx) = tokio::sync::oneshot::channel::<()>();
    let holder = tokio::spawn({
        let sup = sup.clone();
        async move {
            let work = async {
                let _ = held_tx.send(());
                let _ = release_rx.await;
            };
            sup.exclusively("app", work).await;
        }
    });
    held_rx.await.expect("the work runs");
    let mut switch = tokio::spawn({
        let sup = sup.clone();
        async move { start(&sup, "2").await }
    });
    // Waiting, not racing: the start cannot end while the work holds the release.
    let waited = tokio::time::timeout(Duration::from_millis(300), &mut switch).await;
    assert!(waited.is_err(), "the start ran beside the exclusive work");
    assert_eq!(
        sup.running_versions(),
        vec![("app".to_string(), "1".to_string())]
    );
    release_tx.send(()).expect("the work waits");
    holder.await.expect("the work ends");
    let started = switch.await.expect("the start ends");
    assert!(!started.already_running);
    assert_eq!(
        sup.running_versions(),
        vec![("app".to_string(), "2".to_string())]
    );
    sup.detach().await;
}

/// Says that a test needing cgroup containment is skipped because of `why`; fails
/// instead where it can run (root, cgroup v2 mounted): never skipped silently.
fn skipped_without_cgroup(why: &str) {
    let mounted = fs::read_to_string("/proc/self/mountinfo")
        .is_ok_and(|m| m.lines().any(|l| l.contains(" - cgroup2 ")));
    assert!(
        !(nix::unistd::geteuid().is_root() && mounted),
        "running as root with cgroup v2 mounted, yet: {why}"
    );
    eprintln!("SKIPPED: this test needs root and a writable cgroup v2: {why}");
}
