//! Shared pieces of the end-to-end tests: a fresh PKI, real agent processes on
//! loopback with a temporary root each, release tarballs made on the spot, and bounded
//! waits. Everything started here is really stopped when dropped, releases included.

#![allow(dead_code)]

/// Gives a type holding a [`Followed`] as its `process` the methods of that process.
macro_rules! process_type {
    ($type:ty) => {
        impl std::ops::Deref for $type {
            type Target = $crate::helper::Followed;

            fn deref(&self) -> &Self::Target {
                &self.process
            }
        }

        impl std::ops::DerefMut for $type {
            fn deref_mut(&mut self) -> &mut Self::Target {
                &mut self.process
            }
        }
    };
}

pub mod amqp;
pub mod cluster;
pub mod commands;
pub mod fleet;
pub mod install;
pub mod netns;
pub mod otp;
pub mod raw_peer;
pub mod release;
pub mod slow_link;
pub mod stepping;
pub mod systemctl;
pub mod tmpfs;

pub use commands::AgentCommands;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use erel_certs::MasterDir;
use erel_master::{AgentClient, HostAddr};

/// The agent program built for these tests.
pub const AGENT_BIN: &str = env!("CARGO_BIN_EXE_e2e-erel-boot");
/// The master program built for these tests.
pub const MASTER_BIN: &str = env!("CARGO_BIN_EXE_e2e-erel");

/// A cluster CA and master certificate in a temporary directory.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub master: MasterDir,
}

impl Pki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let master = MasterDir::new(dir.path().join("certs"));
        master.init("test").expect("certs init");
        Pki { dir, master }
    }

    /// The certificate directory (what `erel --certs` takes).
    pub fn certs_dir(&self) -> &Path {
        self.master.path()
    }

    /// The bundle for `id`, issued on first use for 127.0.0.1.
    pub fn bundle(&self, id: &str) -> PathBuf {
        self.bundle_naming(id, &["127.0.0.1".parse().expect("ip")])
    }

    /// The bundle for `id`, issued on first use with a certificate naming `ips`.
    pub fn bundle_naming(&self, id: &str, ips: &[std::net::IpAddr]) -> PathBuf {
        let dir = self.master.host_dir(id);
        if !dir.join("host.pem").exists() {
            self.master.issue_host(id, ips, &[]).expect("issue host");
        }
        dir
    }

    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.master.client_config().expect("client config")
    }

    /// A connected client for an agent.
    pub async fn connect(&self, agent: &AgentProc) -> AgentClient {
        erel_master::client::Connector::new(self.client_config(), "test-master")
            .connect(&agent.host())
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}\nagent log:\n{}", agent.id, agent.log()))
    }

    /// `erel <command> <agent's HOST>` with this PKI's certificate directory.
    pub fn erel_at(&self, command: &str, agent: &AgentProc) -> Command {
        let mut erel = self.erel();
        erel.arg(command).arg(agent.host().to_string());
        erel
    }

    /// The `erel` command with this PKI's certificate directory.
    pub fn erel(&self) -> Command {
        let mut command = Command::new(MASTER_BIN);
        command.arg("--certs").arg(self.certs_dir());
        command
    }
}

/// A fresh temporary directory and the path `name` inside it, not yet created. (The
/// directory is removed when the first is dropped.)
pub fn temp_path(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(name);
    (dir, path)
}

/// True when `text` holds every one of `parts`.
pub fn holds_all(text: &str, parts: &[&str]) -> bool {
    parts.iter().all(|part| text.contains(part))
}

/// Asserts that `text` holds every one of `parts`; the failure names the first part
/// missing and shows `text`.
pub fn assert_holds_all(text: &str, parts: &[&str]) {
    for part in parts {
        assert!(text.contains(part), "{part:?} missing: {text}");
    }
}

/// What a finished command printed: its stdout, then its stderr.
pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The bound on a wait for something that must happen (a release answering, a restart,
/// a state reached). Polls return as soon as the condition holds, so this only matters
/// when the machine is slow or busy, and it is generous for that reason.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// How long the agent waits, once told to stop, for connections in progress (its fixed
/// drain bound, not a flag).
const AGENT_DRAIN: Duration = Duration::from_secs(30);
/// The bound on an agent's exit after SIGTERM: its drain, then a margin to close down.
const AGENT_EXIT: Duration = AGENT_DRAIN.saturating_add(Duration::from_secs(10));

/// The first restart delay of the test agents (`--restart-backoff-ms`).
pub const RESTART_BACKOFF: Duration = Duration::from_millis(100);
/// The longest restart delay of the test agents (`--restart-backoff-max-ms`): a release
/// the agent means to start again is started within this of its exit.
pub const RESTART_BACKOFF_MAX: Duration = Duration::from_millis(400);
/// How long a release must run before its crashes are forgotten (`--stable-after-ms`).
pub const STABLE_AFTER: Duration = Duration::from_millis(1500);
/// Quick exits in a row after which a release is crash-looping (`--crash-loop-after`).
pub const CRASH_LOOP_AFTER: u32 = 3;

/// How long a test watches to show that the agent does *not* start a release again (no
/// restart once crash-looping, no second copy after adoption): any start the supervisor
/// would make comes within one [`RESTART_BACKOFF_MAX`], so four of them are a margin for
/// a busy machine, not a guess.
pub const NO_RESTART_WITHIN: Duration = RESTART_BACKOFF_MAX.saturating_mul(4);

/// Watches for [`NO_RESTART_WITHIN`]: long enough that any start the agent would make
/// (a restart, a second copy) has come, so that its absence afterwards shows it will not.
pub async fn outlast_any_restart() {
    tokio::time::sleep(NO_RESTART_WITHIN).await;
}

/// Supervision settings that keep the tests fast: the flags of the durations above.
pub fn fast_supervision() -> Vec<String> {
    vec![
        "--restart-backoff-ms".into(),
        RESTART_BACKOFF.as_millis().to_string(),
        "--restart-backoff-max-ms".into(),
        RESTART_BACKOFF_MAX.as_millis().to_string(),
        "--stable-after-ms".into(),
        STABLE_AFTER.as_millis().to_string(),
        "--crash-loop-after".into(),
        CRASH_LOOP_AFTER.to_string(),
    ]
}

/// A fresh PKI and agent `id` on it, started with `extra` flags as
/// [`AgentProc::start`] does. (Bound in this order, the agent is dropped first.)
pub fn pki_and_agent(id: &str, extra: &[&str]) -> (Pki, AgentProc) {
    let pki = Pki::new();
    let agent = AgentProc::start(&pki, id, extra);
    (pki, agent)
}

/// A new agent root: a folder inside a directory the agent owns, so that a test may look
/// at the root's parent without seeing other tests' files.
fn fresh_root() -> (tempfile::TempDir, PathBuf) {
    let root_dir = tempfile::tempdir().expect("tempdir");
    let root = std::fs::canonicalize(root_dir.path())
        .expect("canonical root")
        .join("root");
    std::fs::create_dir(&root).expect("create root");
    (root_dir, root)
}

/// Where an agent listens, with which bundle, in which network namespace.
struct Placement {
    /// The address to listen on (port 0 at first start).
    addr: SocketAddr,
    /// Its certificate bundle.
    bundle: PathBuf,
    /// The network namespace, `None` for the test's own.
    netns: Option<String>,
}

impl Placement {
    /// Loopback, port 0, with the bundle of `id` naming 127.0.0.1.
    fn loopback(pki: &Pki, id: &str) -> Self {
        Placement {
            addr: "127.0.0.1:0".parse().expect("addr"),
            bundle: pki.bundle(id),
            netns: None,
        }
    }
}

/// A real `erel-boot` process on loopback with its own temporary root.
pub struct AgentProc {
    pub id: String,
    pub addr: SocketAddr,
    pub root_dir: tempfile::TempDir,
    pub root: PathBuf,
    bundle: PathBuf,
    extra: Vec<String>,
    /// Variables set in the agent's environment besides its own.
    env: Vec<(String, String)>,
    /// The network namespace (a name under `/run/netns`) the agent runs in; `None` for
    /// the test's own.
    netns: Option<String>,
    /// The executable: the tests' `erel-boot` ([`AGENT_BIN`]) unless started with
    /// [`AgentProc::start_program`].
    program: PathBuf,
    process: Followed,
}

impl AgentProc {
    /// Starts an agent for host `id` with the fast supervision settings and `extra` flags
    /// (which win over the fast settings).
    pub fn start(pki: &Pki, id: &str, extra: &[&str]) -> Self {
        let (root_dir, root) = fresh_root();
        Self::start_with(id, root_dir, root, &[], extra, Placement::loopback(pki, id))
    }

    /// Starts an agent like [`AgentProc::start`], with `env` (`NAME`, `VALUE`) added to
    /// its environment (a preloaded library, say), and so to its releases'.
    pub fn start_with_env(pki: &Pki, id: &str, env: &[(&str, &str)], extra: &[&str]) -> Self {
        let (root_dir, root) = fresh_root();
        Self::start_with(id, root_dir, root, env, extra, Placement::loopback(pki, id))
    }

    /// Starts an agent like [`AgentProc::start`], on `root`: a directory the caller made
    /// (a file system it mounted, say) and removes after the agent is dropped.
    pub fn start_on_root(pki: &Pki, id: &str, root: &Path, extra: &[&str]) -> Self {
        let root_dir = tempfile::tempdir().expect("tempdir");
        let root = std::fs::canonicalize(root).expect("canonical root");
        Self::start_with(id, root_dir, root, &[], extra, Placement::loopback(pki, id))
    }

    /// Starts an agent like [`AgentProc::start`], inside the network namespace `netns`,
    /// listening on `ip` (an address of that namespace) with a certificate naming it.
    pub fn start_in_netns(
        pki: &Pki,
        id: &str,
        netns: &str,
        ip: std::net::IpAddr,
        extra: &[&str],
    ) -> Self {
        let (root_dir, root) = fresh_root();
        let placement = Placement {
            addr: SocketAddr::new(ip, 0),
            bundle: pki.bundle_naming(id, &[ip]),
            netns: Some(netns.to_string()),
        };
        Self::start_with(id, root_dir, root, &[], extra, placement)
    }

    /// Starts an agent like [`AgentProc::start`], running the executable `program`
    /// instead of the tests' `erel-boot` (another build of it: the static agent, say).
    pub fn start_program(pki: &Pki, id: &str, program: &Path, extra: &[&str]) -> Self {
        let (root_dir, root) = fresh_root();
        let mut agent =
            Self::unspawned(id, root_dir, root, &[], extra, Placement::loopback(pki, id));
        agent.program = program.to_path_buf();
        agent.spawn();
        agent
    }

    fn start_with(
        id: &str,
        root_dir: tempfile::TempDir,
        root: PathBuf,
        env: &[(&str, &str)],
        extra: &[&str],
        placement: Placement,
    ) -> Self {
        let mut agent = Self::unspawned(id, root_dir, root, env, extra, placement);
        agent.spawn();
        agent
    }

    fn unspawned(
        id: &str,
        root_dir: tempfile::TempDir,
        root: PathBuf,
        env: &[(&str, &str)],
        extra: &[&str],
        placement: Placement,
    ) -> Self {
        AgentProc {
            id: id.to_string(),
            addr: placement.addr,
            root_dir,
            root,
            bundle: placement.bundle,
            // A flag in `extra` replaces the same fast setting.
            extra: fast_supervision()
                .chunks(2)
                .filter(|pair| !extra.contains(&pair[0].as_str()))
                .flatten()
                .cloned()
                .chain(extra.iter().map(|s| s.to_string()))
                .collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            netns: placement.netns,
            program: PathBuf::from(AGENT_BIN),
            process: Followed::default(),
        }
    }

    /// Starts an agent for host `id` on the bundle directory `bundle` (for instance one
    /// made from an operator's own PKI), with the fast supervision settings.
    pub fn start_with_bundle(bundle: PathBuf, id: &str) -> Self {
        let (root_dir, root) = fresh_root();
        let mut agent = AgentProc {
            id: id.to_string(),
            addr: "127.0.0.1:0".parse().expect("addr"),
            root_dir,
            root,
            bundle,
            extra: fast_supervision(),
            env: Vec::new(),
            netns: None,
            program: PathBuf::from(AGENT_BIN),
            process: Followed::default(),
        };
        agent.spawn();
        agent
    }

    fn spawn(&mut self) {
        // `nsenter` enters the network namespace only and then runs the agent in its
        // place (same process), so the agent sees the test's file systems and cgroups.
        let mut command = match &self.netns {
            Some(netns) => {
                let mut nsenter = Command::new("nsenter");
                nsenter
                    .arg(format!("--net=/run/netns/{netns}"))
                    .arg(&self.program);
                nsenter
            }
            None => Command::new(&self.program),
        };
        let mut child = command
            .arg("--listen")
            .arg(self.addr.to_string())
            .arg("--root")
            .arg(&self.root)
            .arg("--certs")
            .arg(&self.bundle)
            .args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("EREL_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn erel-boot");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel::<SocketAddr>();
        let mut announced = false;
        // The sender goes with the reader when the agent's stderr ends, so an agent that
        // exits before it listens is seen at once.
        follow_lines(stderr, self.process.log.clone(), move |line| {
            if !announced {
                if let Some(addr) = listen_addr(line) {
                    let _ = tx.send(addr);
                    announced = true;
                }
            }
        });
        match rx.recv_timeout(PATIENCE) {
            Ok(addr) => self.addr = addr,
            Err(_) => {
                let _ = child.kill();
                panic!("agent {} did not start:\n{}", self.id, self.log());
            }
        }
        self.process.child = Some(child);
    }

    /// `ID@ADDR:PORT` of this agent.
    pub fn host(&self) -> HostAddr {
        HostAddr {
            id: self.id.clone(),
            addr: self.addr.to_string(),
        }
    }

    /// SIGTERM the agent and wait for it to exit; returns its exit status success.
    /// (`kill9` leaves its releases running.)
    pub fn terminate(&mut self) -> bool {
        self.process.terminate_within(AGENT_EXIT)
    }

    /// `kill -9` the agent and start it again on the same root and port.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// `kill -9` the agent, empty its root (its state lost, as with a replaced disk; what
    /// its releases run is left alone) and start it again on the same root and port.
    pub fn restart_on_wiped_root(&mut self) {
        self.kill9();
        for entry in std::fs::read_dir(&self.root).expect("read root") {
            let path = entry.expect("root entry").path();
            match path.is_dir() && !path.is_symlink() {
                true => std::fs::remove_dir_all(&path),
                false => std::fs::remove_file(&path),
            }
            .unwrap_or_else(|e| panic!("remove {}: {e}", path.display()));
        }
        self.spawn();
    }

    /// Process ids of every live (non-zombie) process started for release `name` under
    /// this agent's root, found by the environment the agent gives releases.
    pub fn release_pids(&self, name: &str) -> Vec<i32> {
        processes_with_env(&[
            format!("EREL_ROOT={}", self.root.display()),
            format!("EREL_RELEASE={name}"),
        ])
    }

    /// Every live process started under this agent's root.
    pub fn all_release_pids(&self) -> Vec<i32> {
        all_release_pids(&self.root)
    }

    /// The agent's cgroup directory, as its start-up log names it (`containment: cgroup
    /// v2 DIR`); `None` when it runs without cgroups.
    pub fn cgroup_dir(&self) -> Option<PathBuf> {
        agent_cgroup_dir(&self.log())
    }
}

/// Every live process started by an agent on `root`.
pub fn all_release_pids(root: &Path) -> Vec<i32> {
    processes_with_env(&[format!("EREL_ROOT={}", root.display())])
}

/// An agent's cgroup directory, as its start-up `log` names it (`containment: cgroup v2
/// DIR`); `None` when it runs without cgroups.
pub fn agent_cgroup_dir(log: &str) -> Option<PathBuf> {
    let start = log.find("containment: cgroup v2 ")? + "containment: cgroup v2 ".len();
    let rest = &log[start..];
    let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
    Some(PathBuf::from(&rest[..end]))
}

/// Kills the agent `process` on `root` (`kill -9`), then everything it started: the
/// cgroups its log names and every release process.
pub fn kill_agent_and_releases(process: &mut Followed, root: &Path) {
    process.kill9();
    if let Some(dir) = agent_cgroup_dir(&process.log()) {
        remove_cgroup_tree(&dir);
    }
    for pid in all_release_pids(root) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Kills everything in the cgroup directory `dir` (recursively, with `cgroup.kill`) and
/// removes it and every cgroup below it, deepest first.
pub fn remove_cgroup_tree(dir: &Path) {
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    remove_cgroups_deepest_first(dir, Instant::now() + PATIENCE);
}

/// Removes the cgroups below `dir`, then `dir`, each as soon as its killed members
/// are gone, waiting for that until `deadline` at the latest.
fn remove_cgroups_deepest_first(dir: &Path, deadline: Instant) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroups_deepest_first(&entry.path(), deadline);
        }
    }
    let left = deadline.saturating_duration_since(Instant::now());
    wait_until_blocking(left, || std::fs::remove_dir(dir).is_ok() || !dir.exists());
}

process_type!(AgentProc);

impl Drop for AgentProc {
    fn drop(&mut self) {
        kill_agent_and_releases(&mut self.process, &self.root);
    }
}

/// Copies each line of a child's output (`stderr`, or its stdout) into `log` on a thread
/// of its own, showing it to `on_line` first; the thread, and `on_line` with it, ends
/// with the stream.
pub fn follow_lines(
    stderr: impl std::io::Read + Send + 'static,
    log: Arc<Mutex<String>>,
    mut on_line: impl FnMut(&str) + Send + 'static,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            on_line(&line);
            let mut log = log.lock().expect("log lock");
            log.push_str(&line);
            log.push('\n');
        }
    })
}

/// A process a test started, with what it writes to stderr collected as it comes,
/// across restarts; killed when dropped. [`AgentProc`] and the AMQP tests' `MasterProc` are one each.
#[derive(Default)]
pub struct Followed {
    child: Option<Child>,
    log: Arc<Mutex<String>>,
}

impl Followed {
    /// Runs `command` with its stderr piped and followed.
    pub fn spawn(command: &mut Command, what: &str) -> Self {
        let mut child = command
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        let mut process = Followed::default();
        let stderr = child.stderr.take().expect("stderr");
        follow_lines(stderr, process.log.clone(), |_| {});
        process.child = Some(child);
        process
    }

    /// Runs `command` with its stdout and stderr piped and followed, into one log.
    pub fn spawn_with_stdout(command: &mut Command, what: &str) -> Self {
        let mut process = Followed::spawn(command.stdout(Stdio::piped()), what);
        let child = process.child.as_mut().expect("just spawned");
        let stdout = child.stdout.take().expect("stdout");
        follow_lines(stdout, process.log.clone(), |_| {});
        process
    }

    /// Its exit status once it exits within `limit`; `None` while it still runs (or
    /// when it was not started).
    pub fn exit_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        exit_within(self.child.as_mut()?, limit)
    }

    /// What the process logged so far.
    pub fn log(&self) -> String {
        self.log.lock().expect("log lock").clone()
    }

    /// The log once `needle` shows in it, waiting up to `limit`; panics with the log
    /// when it does not show.
    pub async fn log_showing(&self, needle: &str, limit: Duration) -> String {
        let shown = wait_until(limit, || async { self.log().contains(needle) }).await;
        let log = self.log();
        assert!(shown, "{needle:?} not logged within {limit:?}:\n{log}");
        log
    }

    /// The log once every one of `needles` shows in it, waiting up to `limit` (blocking);
    /// panics with the log naming what did not show. A line the process writes about
    /// something the test has just seen happen reaches this log through a pipe and a
    /// reader thread: it may come a moment later.
    pub fn log_showing_all(&self, needles: &[&str], limit: Duration) -> String {
        let shown = wait_until_blocking(limit, || {
            let log = self.log();
            needles.iter().all(|needle| log.contains(needle))
        });
        let log = self.log();
        let missing: Vec<&&str> = needles.iter().filter(|n| !log.contains(**n)).collect();
        assert!(shown, "{missing:?} not logged within {limit:?}:\n{log}");
        log
    }

    /// Its process id, while it has one.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// `kill -9` the process, if any, and reap it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM the process and wait up to `limit` for it to exit; true when it exited
    /// with status 0. One still running after `limit` is killed and counts as a failure.
    pub fn terminate_within(&mut self, limit: Duration) -> bool {
        let Some(child) = self.child.take() else {
            return false;
        };
        terminate_child(child, limit)
    }
}

/// A process left running when its test ends (or panics) is killed (`kill -9`).
impl Drop for Followed {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn terminate_child(mut child: Child, limit: Duration) -> bool {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    match exit_within(&mut child, limit) {
        Some(status) => status.success(),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            false
        }
    }
}

fn listen_addr(line: &str) -> Option<SocketAddr> {
    let start = line.find("listen=")? + "listen=".len();
    let rest = &line[start..];
    let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Live processes whose environment holds every one of `needles` (`K=V`).
pub fn processes_with_env(needles: &[String]) -> Vec<i32> {
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let vars: Vec<&[u8]> = environ.split(|b| *b == 0).collect();
        let all = needles
            .iter()
            .all(|needle| vars.contains(&needle.as_bytes()));
        if all && !is_zombie(pid) {
            pids.push(pid);
        }
    }
    pids.sort_unstable();
    pids
}

/// One line per process of `pids`: its pid, parent pid, session id and command line, from
/// `/proc/<pid>/stat` and `/proc/<pid>/cmdline` (proc(5)); a process gone since shows as gone.
pub fn describe_processes(pids: &[i32]) -> String {
    pids.iter()
        .map(|pid| match process_ids(*pid) {
            Some((ppid, sid)) => {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                format!(
                    "pid {pid} ppid {ppid} session {sid}: {}\n",
                    cmdline.trim_end()
                )
            }
            None => format!("pid {pid}: gone\n"),
        })
        .collect()
}

/// The sessions that `pids` belong to, each once, sorted. The agent starts every copy of a
/// release as the leader of a new session (`setsid`), so children it forks (a start
/// script's `$(...)` subshell) share its session: this counts copies, not processes.
pub fn sessions_of(pids: &[i32]) -> Vec<i32> {
    let mut sessions: Vec<i32> = pids
        .iter()
        .filter_map(|p| process_ids(*p))
        .map(|(_, sid)| sid)
        .collect();
    sessions.sort_unstable();
    sessions.dedup();
    sessions
}

/// The parent pid and session id of `pid` (fields 4 and 6 of `/proc/<pid>/stat`, proc(5)).
fn process_ids(pid: i32) -> Option<(i32, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some((fields.get(1)?.parse().ok()?, fields.get(3)?.parse().ok()?))
}

fn is_zombie(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    stat.rsplit_once(')')
        .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        .unwrap_or(true)
}

/// Ports handed out by [`free_port`] lie in this range, below Linux's default ephemeral
/// range (`net.ipv4.ip_local_port_range`, 32768-60999), so that no outgoing connection
/// and no `bind(0)` of another test can take one between the moment it is chosen and the
/// moment a release binds it.
const TEST_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A TCP port on loopback that no other test, in this process or another, is given: for
/// a release to bind later (the agent starts it, so no listener can be handed over).
/// Reserved with [`reserve_number`] for the rest of the process. Panics when no port of
/// [`TEST_PORTS`] is free.
pub fn free_port() -> u16 {
    static HELD: Mutex<Vec<nix::fcntl::Flock<std::fs::File>>> = Mutex::new(Vec::new());
    let first = u32::from(TEST_PORTS.start);
    let span = u32::from(TEST_PORTS.end - TEST_PORTS.start);
    let (port, lock) = reserve_number("erel-tests-ports", first, span, |port| {
        std::net::TcpListener::bind(("127.0.0.1", port as u16)).is_ok()
    })
    .unwrap_or_else(|| panic!("no free port left in {TEST_PORTS:?}"));
    HELD.lock().expect("port reservations").push(lock);
    port as u16
}

/// One of the `span` numbers from `first` that no test, in this process or another,
/// holds, and that `usable` accepts; with the lock that reserves it, or `None` when every
/// one is taken.
///
/// A number is reserved by an exclusive `flock` on a file named after it in
/// `<temp dir>/<dir>`, a directory shared by every test process, for as long as the lock
/// is kept; the kernel drops it when the process exits, so a crashed run leaves nothing
/// reserved. Each process starts looking at its own place, so processes rarely contend
/// for the same files.
pub fn reserve_number(
    dir: &str,
    first: u32,
    span: u32,
    usable: impl Fn(u32) -> bool,
) -> Option<(u32, nix::fcntl::Flock<std::fs::File>)> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(dir);
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("create the reservation directory {}: {e}", dir.display()));
    let start = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let number = first + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let Ok(file) = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(number.to_string()))
        else {
            continue;
        };
        let Ok(lock) = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        else {
            continue;
        };
        if usable(number) {
            return Some((number, lock));
        }
    }
    None
}

/// `GET /metrics` from `addr` (a daemon's `--metrics` address) over plain HTTP/1.1,
/// reading for at most `limit`: the body, or `None` when nothing answers.
pub fn scrape_metrics(addr: &str, limit: Duration) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(limit)).ok()?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    text.split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
}

/// The address a daemon's `log` says it serves its metrics on (`metrics on ADDR`).
pub fn metrics_addr(log: &str) -> Option<String> {
    log.lines()
        .find_map(|l| l.strip_prefix("metrics on ").map(|a| a.trim().to_string()))
}

/// How often a bounded wait looks again.
const POLL_EVERY: Duration = Duration::from_millis(50);

/// Polls `probe` every [`POLL_EVERY`] until it gives a value or `limit` passes; the value,
/// or `None` when time ran out. The one bounded wait of these tests: [`wait_until`] and the
/// blocking forms are this with a yes/no answer or without a runtime.
pub async fn poll_until<T, F, Fut>(limit: Duration, mut probe: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = probe().await {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Polls `condition` until it holds or `limit` passes; whether it held.
pub async fn wait_until<F, Fut>(limit: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    poll_until(limit, || {
        let holds = condition();
        async move { holds.await.then_some(()) }
    })
    .await
    .is_some()
}

/// [`poll_until`] for code without a runtime: blocks the thread between polls.
pub fn poll_until_blocking<T>(limit: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = probe() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(POLL_EVERY);
    }
}

/// [`wait_until`] for code without a runtime: blocks the thread between polls.
pub fn wait_until_blocking(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    poll_until_blocking(limit, || condition().then_some(())).is_some()
}

/// Runs `attempt` again while the agent answers `Busy` (it still holds what a cut
/// connection held, or has no connection to spare), for at most `limit`; the first
/// other outcome. Panics when the agent is still busy after `limit`.
pub async fn retry_while_busy<T, F, Fut>(
    limit: Duration,
    mut attempt: F,
) -> Result<T, erel_master::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, erel_master::Error>>,
{
    poll_until(limit, || {
        let outcome = attempt();
        async move {
            match outcome.await {
                Err(e) if e.agent_kind() == Some(erel_proto::ErrorKind::Busy) => None,
                other => Some(other),
            }
        }
    })
    .await
    .unwrap_or_else(|| panic!("the agent still answers Busy after {limit:?}"))
}

/// `child`'s exit status once it exits within `limit`; `None` while it still runs.
pub fn exit_within(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    poll_until_blocking(limit, || child.try_wait().expect("try_wait"))
}

/// Lists every path under `dir`, relative, sorted, skipping `skip` (a top-level name).
pub fn listing(dir: &Path, skip: &str) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, skip: &str, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let rel = path
                .strip_prefix(base)
                .expect("under base")
                .to_string_lossy()
                .into_owned();
            if rel == skip {
                continue;
            }
            out.push(rel);
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                walk(base, &path, skip, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, skip, &mut out);
    out.sort();
    out
}

/// A field of `/proc/<pid>/status` given in KiB (`VmRSS`, `VmHWM`, ...); 0 when the
/// process or the field is gone (proc(5)).
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return 0;
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .unwrap_or(0)
}
