//! The pieces of the AMQP tests: the broker's URL, a unique name prefix per test with
//! everything deleted at the end, a lock that keeps the broker-restart test away from
//! the others, real `erel master --amqp` processes, and the beat release's answer.

use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use erel_master::amqp::log::LogEntry;
use erel_master::amqp::Broker;

use super::fleet::Fleet;
use super::{follow_lines, output_text, wait_until, wait_until_blocking, Followed, Pki};

/// The broker the tests use: `$EREL_TEST_AMQP`, else the local RabbitMQ.
pub fn amqp_url() -> String {
    std::env::var("EREL_TEST_AMQP")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

/// A prefix no other test (or run) uses.
pub fn unique_prefix(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("t-{test}-{}-{nanos}", std::process::id())
}

/// A process-wide lock on the broker: shared for ordinary tests, exclusive for the test
/// that restarts it, so a restart never happens under another test's feet.
pub struct BrokerLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl BrokerLock {
    fn take(exclusive: bool) -> Self {
        let path = std::env::temp_dir().join("erel-tests-amqp-broker.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .expect("open the broker lock file");
        let arg = if exclusive {
            nix::fcntl::FlockArg::LockExclusive
        } else {
            nix::fcntl::FlockArg::LockShared
        };
        let lock = nix::fcntl::Flock::lock(file, arg)
            .map_err(|(_, e)| e)
            .expect("lock the broker lock file");
        BrokerLock { _lock: lock }
    }

    /// For tests that only use the broker.
    pub fn shared() -> Self {
        Self::take(false)
    }

    /// For the test that restarts the broker.
    pub fn exclusive() -> Self {
        Self::take(true)
    }
}

/// A unique prefix on the test broker; every queue and exchange of it is deleted when
/// dropped (after the masters, which are declared later and so dropped first).
pub struct TestBroker {
    pub broker: Broker,
    pub url: String,
    pub prefix: String,
    pub groups: Vec<String>,
}

impl TestBroker {
    pub fn new(test: &str, groups: &[&str]) -> Self {
        Self::on(amqp_url(), test, groups)
    }

    /// [`TestBroker::new`] on the broker at `url` (a comma-separated list of a
    /// cluster's nodes, as `--amqp` takes it).
    pub fn on(url: String, test: &str, groups: &[&str]) -> Self {
        let prefix = unique_prefix(test);
        let broker = Broker::new(url.clone(), prefix.clone()).expect("valid broker");
        TestBroker {
            broker,
            url,
            prefix,
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    /// `--amqp URL --amqp-prefix PREFIX`.
    /// Every entry of this prefix's config log, oldest first, read from outside any
    /// runtime ([`erel_master::amqp::log::read_all`]); panics when it cannot be read.
    pub fn config_log(&self) -> Vec<LogEntry> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(erel_master::amqp::log::read_all(&self.broker))
            .expect("read the config log")
    }

    pub fn flags(&self) -> Vec<String> {
        vec![
            "--amqp".to_string(),
            self.url.clone(),
            "--amqp-prefix".to_string(),
            self.prefix.clone(),
        ]
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        let broker = self.broker.clone();
        let groups = self.groups.clone();
        // Drop may run inside the test's runtime: clean up on a thread of our own.
        let cleaned = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(wait_until(Duration::from_secs(10), || async {
                broker.delete_everything(&groups).await.is_ok()
            }))
        })
        .join()
        .unwrap_or(false);
        if !cleaned && !std::thread::panicking() {
            panic!("could not delete the queues of prefix {}", self.prefix);
        }
    }
}

/// The `--interval` of the masters [`MasterProc::start`] starts.
pub const MASTER_INTERVAL: Duration = Duration::from_secs(2);

/// A real `erel master --amqp` process.
pub struct MasterProc {
    pub name: String,
    pub state_dir: PathBuf,
    process: Followed,
}

impl MasterProc {
    /// Starts `erel master --amqp …` named `name`, with state in `state_dir`.
    pub fn start(
        pki: &Pki,
        broker: &TestBroker,
        name: &str,
        state_dir: &Path,
        artifacts: &Path,
    ) -> Self {
        Self::start_with(pki, broker, name, state_dir, artifacts, &[])
    }

    /// [`MasterProc::start`] with `extra` arguments (`--trusted-key FILE`, …).
    pub fn start_with(
        pki: &Pki,
        broker: &TestBroker,
        name: &str,
        state_dir: &Path,
        artifacts: &Path,
        extra: &[&str],
    ) -> Self {
        let mut command = pki.erel();
        command
            .arg("master")
            .args(broker.flags())
            .arg("--state-dir")
            .arg(state_dir)
            .arg("--name")
            .arg(name)
            .arg("--artifacts")
            .arg(artifacts)
            .arg("--interval")
            .arg(MASTER_INTERVAL.as_secs().to_string())
            .arg("--reconnect-max-ms")
            .arg("1000")
            .args(extra)
            .env("EREL_LOG", "info,lapin=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        MasterProc {
            name: name.to_string(),
            state_dir: state_dir.to_path_buf(),
            process: Followed::spawn(&mut command, "erel master"),
        }
    }

    /// The revision its state directory holds.
    pub fn held_revision(&self) -> Option<u64> {
        let text = std::fs::read_to_string(self.state_dir.join("config.toml")).ok()?;
        erel_master::amqp::log::text_revision(&text)
    }

    /// The config text its state directory holds.
    pub fn held_text(&self) -> Option<String> {
        std::fs::read_to_string(self.state_dir.join("config.toml")).ok()
    }

    /// SIGTERM and wait; true when it exited with status 0.
    pub fn terminate(&mut self) -> bool {
        self.process.terminate_within(Duration::from_secs(20))
    }
}

process_type!(MasterProc);

impl Drop for MasterProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

impl Fleet {
    /// [`Fleet::new`] with the beat release 1.0.0, 2.0.0 and 3.0.0 in its directory, as
    /// masters find archives in their artifact directory.
    pub fn with_beat_releases(prefix: &str, groups: &[&str]) -> Self {
        let fleet = Fleet::new(prefix, groups);
        for version in ["1.0.0", "2.0.0", "3.0.0"] {
            super::release::beat_release(fleet.dir.path(), "beat", version);
        }
        fleet
    }

    /// A cluster file: every agent in its group, each group running `version`, with
    /// `extra` lines in every group section.
    pub fn config(&self, revision: u64, version: &str, extra: &str) -> String {
        self.config_of(revision, version, &format!("beat-{version}.tar.gz"), extra)
    }

    /// [`Fleet::config`] with the archive `archive` (a file name in the artifact
    /// directory) for `version`.
    pub fn config_of(&self, revision: u64, version: &str, archive: &str, extra: &str) -> String {
        let mut text = format!("revision = {revision}\n");
        text.push_str(&self.hosts_toml("BEAT_PORT"));
        let mut seen = Vec::new();
        for group in &self.groups {
            if seen.contains(group) {
                continue;
            }
            seen.push(group.clone());
            text.push_str(&format!(
                "[group.{group}]\nrelease = \"beat\"\nversion = \"{version}\"\narchive = \"{archive}\"\n\
                 stop_grace_secs = 2\n\
                 health = {{ tcp = \"$BEAT_PORT\", min_up_secs = 1, deadline_secs = 15 }}\n{extra}\n"
            ));
        }
        text
    }

    /// Writes a config into the artifact directory; returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).expect("write the cluster file");
        path
    }

    /// Starts a master on this fleet, its artifacts beside the cluster files.
    pub fn master(&self, broker: &TestBroker, name: &str) -> MasterProc {
        self.master_with(broker, name, self.dir.path(), &[])
    }

    /// Starts a master on this fleet with its artifacts in `artifacts` and `extra`
    /// arguments (`--trusted-key FILE`, …).
    pub fn master_with(
        &self,
        broker: &TestBroker,
        name: &str,
        artifacts: &Path,
        extra: &[&str],
    ) -> MasterProc {
        MasterProc::start_with(
            &self.pki,
            broker,
            name,
            &self.state_dir(name),
            artifacts,
            extra,
        )
    }

    /// Runs `erel config publish` on a config text; (success, stdout + stderr).
    pub fn publish(&self, broker: &TestBroker, text: &str) -> (bool, String) {
        let revision = erel_master::amqp::log::text_revision(text).unwrap_or(0);
        let path = self.write(&format!("cluster-{revision}.toml"), text);
        let out = erel(
            &self.pki,
            &["config", "publish"],
            broker,
            &[path.to_str().expect("utf-8")],
        );
        (out.status.success(), output_text(&out))
    }

    /// [`Fleet::publish`] that must be accepted; panics with erel's output when it is not.
    pub fn published(&self, broker: &TestBroker, text: &str) {
        let (ok, out) = self.publish(broker, text);
        assert!(ok, "{out}");
    }
}

/// A fleet of one `web` host `<prefix>-1` with the beat releases, a test broker for group
/// `web` named after `test`, a master on it per entry of `names`, and revision 1 (1.0.0,
/// with `extra` lines in the group) published to them. Bound as
/// `let (fleet, broker, [m1, m2]) = …`, the masters are dropped first, then the broker.
pub fn one_host_under_masters<const N: usize>(
    prefix: &str,
    test: &str,
    names: [&str; N],
    extra: &str,
) -> (Fleet, TestBroker, [MasterProc; N]) {
    let fleet = Fleet::with_beat_releases(prefix, &["web"]);
    let broker = TestBroker::new(test, &["web"]);
    let masters = names.map(|name| fleet.master(&broker, name));
    fleet.published(&broker, &fleet.config(1, "1.0.0", extra));
    (fleet, broker, masters)
}

/// Runs `erel <words> --amqp … <rest>`.
pub fn erel(pki: &Pki, words: &[&str], broker: &TestBroker, rest: &[&str]) -> Output {
    pki.erel()
        .args(words)
        .args(broker.flags())
        .args(rest)
        .output()
        .expect("run erel")
}

/// Every master's log, for failure messages.
pub fn logs(masters: &[&MasterProc]) -> String {
    masters
        .iter()
        .map(|m| format!("--- master {}\n{}", m.name, m.log()))
        .collect()
}

/// `erel watch` running: what it prints on stdout (the events) collected as it comes;
/// killed when dropped.
pub struct Watcher {
    child: Child,
    events: Arc<Mutex<String>>,
}

impl Watcher {
    /// Starts `erel watch` on `broker` and waits up to `bound` for it to say (on
    /// stderr) that it is watching; panics with what it said if it does not.
    pub fn start(pki: &Pki, broker: &TestBroker, bound: Duration) -> Self {
        let mut child = pki
            .erel()
            .arg("watch")
            .args(broker.flags())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn erel watch");
        let events = Arc::new(Mutex::new(String::new()));
        let listening = Arc::new(Mutex::new(String::new()));
        follow_lines(child.stdout.take().expect("stdout"), events.clone(), |_| {});
        follow_lines(
            child.stderr.take().expect("stderr"),
            listening.clone(),
            |_| {},
        );
        assert!(
            wait_until_blocking(bound, || listening
                .lock()
                .expect("lock")
                .contains("watching events")),
            "erel watch listens: {}",
            listening.lock().expect("lock")
        );
        Watcher { child, events }
    }

    /// The events printed so far.
    pub fn events(&self) -> String {
        self.events.lock().expect("lock").clone()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
