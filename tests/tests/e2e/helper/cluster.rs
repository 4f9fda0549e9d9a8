//! A RabbitMQ cluster of three nodes of its own on this machine, for the tests that lose
//! a broker node.
//!
//! Each node is a `rabbitmq-server` with its own node name (`erel-<tag>-<pid>-a@localhost`,
//! …), AMQP port and distribution port (free ports), and its data, logs, configuration
//! and enabled-plugins files in a temporary directory; they share an Erlang cookie kept
//! in that directory (`HOME` points there), and no plugin runs. Node `b` and `c` join
//! `a` (`rabbitmqctl stop_app`, `join_cluster`, `start_app`). The machine's own broker
//! (`rabbit@…`, its cookie, its ports) is never used.
//!
//! Dropping the cluster stops every node still running (`rabbitmqctl shutdown`), kills
//! the Erlang VM of any that does not stop, and deletes the directory.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use super::{free_port, wait_until_blocking};

/// Where the RabbitMQ scripts are (Debian's package puts them here).
const RABBITMQ_BIN: &str = "/usr/lib/rabbitmq/bin";
/// How long a node may take to boot (three boot at once on a busy machine).
const BOOT_LIMIT: Duration = Duration::from_secs(180);
/// How long one `rabbitmqctl` call may take before it counts as failed.
const CTL_LIMIT: Duration = Duration::from_secs(120);
/// How long a node may take to shut down before its VM is killed.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(60);

/// One node of the cluster.
pub struct Node {
    /// `erel-<tag>-<pid>-<letter>@localhost`.
    pub name: String,
    /// Its AMQP port on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
    server: Option<Child>,
}

impl Node {
    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// The pid of its Erlang VM, from the pid file the node writes.
    fn vm_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.dir.join("pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

/// Three clustered RabbitMQ nodes; stopped and deleted when dropped.
pub struct RabbitCluster {
    pub nodes: Vec<Node>,
    home: PathBuf,
    dir: tempfile::TempDir,
}

impl RabbitCluster {
    /// Starts three nodes named after `tag` and joins them. `Err` says why they could
    /// not be started (no RabbitMQ here, a node that does not boot or join), for the
    /// test to print as its reason to skip.
    pub fn start(tag: &str) -> Result<Self, String> {
        let server = Path::new(RABBITMQ_BIN).join("rabbitmq-server");
        if !server.exists() {
            return Err(format!("{} is not installed", server.display()));
        }
        let dir = tempfile::Builder::new()
            .prefix("erel-rabbit-")
            .tempdir()
            .map_err(|e| format!("temporary directory: {e}"))?;
        let home = dir.path().join("home");
        std::fs::create_dir_all(&home).map_err(|e| e.to_string())?;
        let cookie = home.join(".erlang.cookie");
        let secret = format!(
            "EREL{}{}",
            std::process::id(),
            super::amqp::unique_prefix(tag)
        );
        let secret: String = secret.chars().filter(char::is_ascii_alphanumeric).collect();
        std::fs::write(&cookie, secret).map_err(|e| e.to_string())?;
        // Erlang refuses a cookie file others may read.
        std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o400))
            .map_err(|e| e.to_string())?;
        std::fs::write(dir.path().join("enabled_plugins"), "[].\n").map_err(|e| e.to_string())?;
        std::fs::write(dir.path().join("rabbitmq-env.conf"), "").map_err(|e| e.to_string())?;
        let mut cluster = RabbitCluster {
            nodes: Vec::new(),
            home,
            dir,
        };
        let tag: String = tag.chars().filter(char::is_ascii_alphanumeric).collect();
        for letter in ["a", "b", "c"] {
            let node =
                cluster.spawn_node(&format!("erel-{tag}-{}-{letter}", std::process::id()))?;
            cluster.nodes.push(node);
        }
        for i in 0..cluster.nodes.len() {
            let name = cluster.nodes[i].name.clone();
            let booted = wait_until_blocking(BOOT_LIMIT, || {
                cluster
                    .ctl(&name, &["await_startup", "--timeout", "5"])
                    .status
                    .success()
            });
            if !booted {
                return Err(format!(
                    "node {name} did not boot within {BOOT_LIMIT:?}: {}",
                    cluster.node_log(i)
                ));
            }
        }
        let first = cluster.nodes[0].name.clone();
        for i in 1..cluster.nodes.len() {
            let name = cluster.nodes[i].name.clone();
            for words in [
                vec!["stop_app"],
                vec!["join_cluster", first.as_str()],
                vec!["start_app"],
            ] {
                let out = cluster.ctl(&name, &words);
                if !out.status.success() {
                    return Err(format!(
                        "rabbitmqctl -n {name} {}: {}",
                        words.join(" "),
                        super::output_text(&out)
                    ));
                }
            }
        }
        let out = cluster.ctl(&first, &["await_online_nodes", "3", "--timeout", "60"]);
        if !out.status.success() {
            return Err(format!(
                "the three nodes are not online together: {}",
                super::output_text(&out)
            ));
        }
        Ok(cluster)
    }

    fn spawn_node(&self, short: &str) -> Result<Node, String> {
        let name = format!("{short}@localhost");
        let port = free_port();
        let dist_port = free_port();
        let dir = self.dir.path().join(short);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let config = dir.join("rabbitmq.conf");
        std::fs::write(
            &config,
            format!("listeners.tcp.default = 127.0.0.1:{port}\nloopback_users = none\n"),
        )
        .map_err(|e| e.to_string())?;
        let out = std::fs::File::create(dir.join("server.out")).map_err(|e| e.to_string())?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let server = self
            .env(Command::new(
                Path::new(RABBITMQ_BIN).join("rabbitmq-server"),
            ))
            .env("RABBITMQ_NODENAME", &name)
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_CONFIG_FILE", &config)
            .env("RABBITMQ_PID_FILE", dir.join("pid"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("spawn rabbitmq-server: {e}"))?;
        Ok(Node {
            name,
            port,
            dir,
            server: Some(server),
        })
    }

    /// The environment every RabbitMQ program of this cluster runs with: the cookie's
    /// home, no system-wide `rabbitmq-env.conf`, no plugins, loopback only.
    fn env(&self, mut command: Command) -> Command {
        command
            .env("HOME", &self.home)
            .env(
                "RABBITMQ_CONF_ENV_FILE",
                self.dir.path().join("rabbitmq-env.conf"),
            )
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                self.dir.path().join("enabled_plugins"),
            )
            .env("ERL_EPMD_ADDRESS", "127.0.0.1");
        command
    }

    /// Runs `rabbitmqctl -n <node> <words>`, killed after [`CTL_LIMIT`].
    pub fn ctl(&self, node: &str, words: &[&str]) -> Output {
        self.tool("rabbitmqctl", node, words)
    }

    /// Runs `<tool> -n <node> <words>` (`rabbitmqctl`, `rabbitmq-streams`,
    /// `rabbitmq-queues`), killed after [`CTL_LIMIT`].
    pub fn tool(&self, tool: &str, node: &str, words: &[&str]) -> Output {
        let mut child = self
            .env(Command::new(Path::new(RABBITMQ_BIN).join(tool)))
            .arg("-n")
            .arg(node)
            .args(words)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {tool}: {e}"));
        if super::exit_within(&mut child, CTL_LIMIT).is_none() {
            let _ = child.kill();
        }
        child.wait_with_output().expect("wait for rabbitmqctl")
    }

    /// Every node's URL, in node order.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Node::url).collect()
    }

    /// Loses node `index` for good, as a crashed machine goes: its Erlang VM is killed
    /// (SIGKILL), so it closes nothing cleanly. Panics when the node still answers.
    pub fn kill_node(&mut self, index: usize) {
        let name = self.nodes[index].name.clone();
        let vm = self.nodes[index]
            .vm_pid()
            .unwrap_or_else(|| panic!("node {name} wrote no pid file"));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(vm),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap_or_else(|e| panic!("kill the VM of node {name}: {e}"));
        self.reap(index);
        assert!(
            !self.ctl(&name, &["status"]).status.success(),
            "node {name} still answers after its VM was killed"
        );
    }

    /// Waits for node `index`'s server to exit, killing its VM when it does not within
    /// [`SHUTDOWN_LIMIT`].
    fn reap(&mut self, index: usize) {
        let vm = self.nodes[index].vm_pid();
        let Some(mut server) = self.nodes[index].server.take() else {
            return;
        };
        if super::exit_within(&mut server, SHUTDOWN_LIMIT).is_none() {
            if let Some(pid) = vm {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = server.kill();
            let _ = server.wait();
        }
    }

    /// The end of node `index`'s output, for failure messages.
    pub fn node_log(&self, index: usize) -> String {
        let text =
            std::fs::read_to_string(self.nodes[index].dir.join("server.out")).unwrap_or_default();
        let skip = text.chars().count().saturating_sub(3000);
        text.chars().skip(skip).collect()
    }
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        for index in 0..self.nodes.len() {
            if self.nodes[index].server.is_some() {
                let name = self.nodes[index].name.clone();
                let _ = self.ctl(&name, &["shutdown"]);
                self.reap(index);
            }
        }
    }
}
