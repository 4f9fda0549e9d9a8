//! A fleet: agents on loopback, each with a port of its own for the release it runs, and
//! directories for the cluster files, the archives they name and the masters' state.

use std::path::PathBuf;
use std::time::Duration;

use erel_proto::ReleaseState;

use super::AgentCommands;
use super::{free_port, AgentProc, Pki};

/// Agents with a release port each, in groups, and the directories a master works in.
pub struct Fleet {
    pub pki: Pki,
    pub agents: Vec<AgentProc>,
    /// The port each agent's release serves on (`BEAT_PORT` in its environment).
    pub ports: Vec<u16>,
    /// The group of each agent.
    pub groups: Vec<String>,
    /// Cluster files and the archives they name, side by side.
    pub dir: tempfile::TempDir,
    /// State directories of masters.
    pub states: tempfile::TempDir,
}

impl Fleet {
    /// One agent per entry of `groups`, named `<prefix>-<i>` counting from 1.
    pub fn new(prefix: &str, groups: &[&str]) -> Self {
        let pki = Pki::new();
        let agents = (1..=groups.len())
            .map(|i| AgentProc::start(&pki, &format!("{prefix}-{i}"), &[]))
            .collect();
        Fleet::of(pki, agents, groups)
    }

    /// A fleet of `agents` the caller started on `pki`, one per entry of `groups`.
    pub fn of(pki: Pki, agents: Vec<AgentProc>, groups: &[&str]) -> Self {
        assert_eq!(agents.len(), groups.len(), "one group per agent");
        let ports = groups.iter().map(|_| free_port()).collect();
        Fleet {
            pki,
            agents,
            ports,
            groups: groups.iter().map(|g| g.to_string()).collect(),
            dir: tempfile::tempdir().expect("tempdir"),
            states: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// The `[[host]]` entries of a cluster file: every agent in its group, its port in
    /// the environment variable `port_var`.
    pub fn hosts_toml(&self, port_var: &str) -> String {
        let mut text = String::new();
        for ((agent, port), group) in self.agents.iter().zip(&self.ports).zip(&self.groups) {
            text.push_str(&format!(
                "[[host]]\nid = \"{}\"\naddr = \"{}\"\ngroup = \"{group}\"\nenv = {{ {port_var} = \"{port}\" }}\n",
                agent.id, agent.addr
            ));
        }
        text
    }

    /// Asserts what each agent's beat answers, in host order: `beat <version> <id>` for
    /// each entry of `versions`, or nothing where the entry is "" (the release is down).
    pub fn expect_beats_per_host(&self, versions: &[&str]) {
        let expected: Vec<String> = self
            .agents
            .iter()
            .zip(versions)
            .map(|(agent, version)| match *version {
                "" => String::new(),
                version => format!("beat {version} {}", agent.id),
            })
            .collect();
        assert_eq!(self.beats(), expected);
    }

    /// What each agent's release answers on its port.
    pub fn beats(&self) -> Vec<String> {
        self.ports.iter().map(|p| beat(*p)).collect()
    }

    /// What every agent answers when it runs the beat release `version`.
    pub fn beats_of(&self, version: &str) -> Vec<String> {
        self.agents
            .iter()
            .map(|a| format!("beat {version} {}", a.id))
            .collect()
    }

    /// True when every agent answers `beat <version> <id>`.
    pub fn all_run(&self, version: &str) -> bool {
        self.beats() == self.beats_of(version)
    }

    /// Asserts that every agent answers `beat <version> <id>`.
    pub fn expect_beats(&self, version: &str) {
        assert_eq!(self.beats(), self.beats_of(version));
    }

    /// What each agent says of `release`: (version, state).
    pub async fn running(&self, release: &str) -> Vec<(Option<String>, ReleaseState)> {
        let mut out = Vec::new();
        for agent in &self.agents {
            let mut client = self.pki.connect(agent).await;
            let pong = client.ping().await.expect("ping");
            let status = pong
                .releases
                .into_iter()
                .find(|r| r.name == release)
                .map(|r| (r.version, r.state))
                .unwrap_or((None, ReleaseState::Stopped));
            out.push(status);
        }
        out
    }

    /// A fresh state directory for a master.
    pub fn state_dir(&self, name: &str) -> PathBuf {
        self.states.path().join(name)
    }

    /// Waits up to `limit` until every host runs `version`; panics saying `what`, with
    /// the beats and `logs()`, when they do not.
    pub fn wait_all_run(
        &self,
        version: &str,
        limit: Duration,
        what: &str,
        logs: impl FnOnce() -> String,
    ) {
        let all = super::wait_until_blocking(limit, || self.all_run(version));
        assert!(all, "{what}: {:?}\n{}", self.beats(), logs());
    }

    /// The pids of release `name` on each host, in host order.
    pub fn release_pids(&self, name: &str) -> Vec<Vec<i32>> {
        self.agents.iter().map(|a| a.release_pids(name)).collect()
    }

    /// Every agent's log, for failure messages.
    pub fn agent_logs(&self) -> String {
        self.agents
            .iter()
            .map(|a| format!("--- agent {}\n{}", a.id, a.log()))
            .collect()
    }
}

/// What the beat release on `port` answers (`beat <version> <host>`), or "".
pub fn beat(port: u16) -> String {
    use std::io::Read;
    let mut text = String::new();
    if let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = stream.read_to_string(&mut text);
    }
    text.trim().to_string()
}
