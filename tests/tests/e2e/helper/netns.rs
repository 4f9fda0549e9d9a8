//! Hosts on networks of their own: each agent runs in its own network namespace with its
//! own address, linked by a veth pair to a bridge in the test's namespace, where the
//! master runs. A host's link can be cut and restored, shaped (a rate and a short queue:
//! queueing delay and real packet loss, since this kernel has no `netem`), or the host
//! lost for good. Everything is made with iproute2 (`ip`, `tc`) and `nsenter`, and
//! removed when dropped, after a panic too; a test process killed before its drop has its
//! leftovers removed by the next test that builds a network.
//!
//! Names are unique per network: `rl-<pid>-<n>` (hex, at most 12 characters, so that
//! interface names stay within Linux's 15) for the bridge (`-b`), the host-side veth of
//! host `i` (`-h<i>`) and its namespace (`-<i>`); inside the namespace the link is
//! `eth0`. Each network has a private /24, `10.77.<x>.0/24`, reserved across test
//! processes while it lives, as the kit's ports are; the bridge is `.1`, host `i` (from
//! 0) is `.<i + 2>`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::{kill_agent_and_releases, output_text, reserve_number, AgentProc, Pki};

/// Prefix of every name a network here creates (interfaces, namespaces).
const PREFIX: &str = "rl-";
/// The first two octets of every network's /24.
const NET: [u8; 2] = [10, 77];
/// Most hosts on one network (one digit keeps the interface names within 15 characters).
const MAX_HOSTS: usize = 9;

/// A bridge in the test's namespace and one namespace per host linked to it.
pub struct Network {
    /// `rl-<pid>-<n>`.
    tag: String,
    /// The third octet of this network's /24.
    subnet: u8,
    /// Whether the bridge was made (and must be removed).
    bridge_made: bool,
    /// Each host: made, and not lost yet.
    hosts: Vec<Option<NetHost>>,
    /// The subnet's reservation, held as long as the network lives.
    _subnet_lock: nix::fcntl::Flock<std::fs::File>,
}

/// One host's end of a [`Network`].
#[derive(Debug, Clone)]
pub struct NetHost {
    /// Its network namespace (a name under `/run/netns`).
    pub netns: String,
    /// The host-side veth, on the bridge.
    pub link: String,
    /// Its address.
    pub ip: Ipv4Addr,
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network")
            .field("tag", &self.tag)
            .field("subnet", &self.subnet)
            .field("hosts", &self.hosts)
            .finish()
    }
}

impl Network {
    /// A bridge at `10.77.<x>.1/24` and `hosts` namespaces linked to it, each with its
    /// address up and `lo` up. `Err` says why it cannot be made here (not root, no
    /// iproute2 or `nsenter`, no namespaces); what was made by then is removed.
    pub fn new(hosts: usize) -> Result<Network, String> {
        assert!(hosts <= MAX_HOSTS, "at most {MAX_HOSTS} hosts per network");
        if !nix::unistd::geteuid().is_root() {
            return Err("network namespaces need root".into());
        }
        for (tool, flag) in [("ip", "-V"), ("tc", "-V"), ("nsenter", "--version")] {
            match Command::new(tool).arg(flag).output() {
                Ok(out) if out.status.success() => {}
                Ok(out) => return Err(format!("`{tool} {flag}` failed: {}", output_text(&out))),
                Err(e) => return Err(format!("cannot run {tool}: {e}")),
            }
        }
        remove_leftovers();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed) % 0x100;
        let (subnet, lock) = reserve_subnet()?;
        let mut network = Network {
            tag: format!("{PREFIX}{:x}-{n:x}", std::process::id()),
            subnet,
            bridge_made: false,
            hosts: Vec::new(),
            _subnet_lock: lock,
        };
        let bridge = network.bridge();
        run("ip", &["link", "add", &bridge, "type", "bridge"])?;
        network.bridge_made = true;
        run("ip", &["addr", "add", &network.cidr(1), "dev", &bridge])?;
        run("ip", &["link", "set", &bridge, "up"])?;
        for i in 0..hosts {
            let host = NetHost {
                netns: format!("{}-{i}", network.tag),
                link: format!("{}-h{i}", network.tag),
                ip: network.ip(i as u8 + 2),
            };
            run("ip", &["netns", "add", &host.netns])?;
            network.hosts.push(Some(host.clone()));
            let peer = format!("{}-n{i}", network.tag);
            run(
                "ip",
                &[
                    "link",
                    "add",
                    &host.link,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &peer,
                    "netns",
                    &host.netns,
                ],
            )?;
            let ns = host.netns.as_str();
            run("ip", &["-n", ns, "link", "set", &peer, "name", "eth0"])?;
            run(
                "ip",
                &[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &network.cidr(i as u8 + 2),
                    "dev",
                    "eth0",
                ],
            )?;
            run("ip", &["-n", ns, "link", "set", "eth0", "up"])?;
            run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
            run("ip", &["link", "set", &host.link, "master", &bridge, "up"])?;
        }
        Ok(network)
    }

    fn bridge(&self) -> String {
        format!("{}-b", self.tag)
    }

    /// The bridge's address, in the test's namespace: where the master's side of every
    /// link is.
    pub fn bridge_ip(&self) -> Ipv4Addr {
        self.ip(1)
    }

    fn ip(&self, last: u8) -> Ipv4Addr {
        Ipv4Addr::new(NET[0], NET[1], self.subnet, last)
    }

    fn cidr(&self, last: u8) -> String {
        format!("{}/24", self.ip(last))
    }

    /// Host `i`; panics once it is lost.
    pub fn host(&self, i: usize) -> &NetHost {
        self.hosts[i]
            .as_ref()
            .unwrap_or_else(|| panic!("host {i} was lost"))
    }

    /// Cuts host `i` off: its link on the bridge goes down, so nothing passes either way
    /// (no reset is sent: both ends see silence, as with a pulled cable).
    pub fn cut(&self, i: usize) {
        run_or_panic("ip", &["link", "set", &self.host(i).link, "down"]);
    }

    /// Brings host `i`'s link back up after [`Network::cut`].
    pub fn restore(&self, i: usize) {
        run_or_panic("ip", &["link", "set", &self.host(i).link, "up"]);
    }

    /// Shapes host `i`'s link both ways with a token bucket (`tc-tbf(8)`): `rate_kbit`
    /// kbit/s, with a queue of `queue_bytes`: packets wait up to `queue_bytes / rate`
    /// in the queue (latency) and are dropped when it is full (loss).
    pub fn shape(&self, i: usize, rate_kbit: u32, queue_bytes: u32) {
        let host = self.host(i);
        let rate = format!("{rate_kbit}kbit");
        let queue = queue_bytes.to_string();
        // The bucket holds a few full-size frames, so a frame always fits.
        let tbf = [
            "root", "tbf", "rate", &rate, "burst", "16kb", "limit", &queue,
        ];
        let mut outside = vec!["qdisc", "replace", "dev", host.link.as_str()];
        outside.extend(tbf);
        run_or_panic("tc", &outside);
        let mut inside = vec!["-n", host.netns.as_str(), "qdisc", "replace", "dev", "eth0"];
        inside.extend(tbf);
        run_or_panic("tc", &inside);
    }

    /// Packets dropped on host `i`'s link so far, both ways, as `tc -s qdisc` counts
    /// them (0 on a link that was never shaped).
    pub fn dropped(&self, i: usize) -> u64 {
        let host = self.host(i);
        let outside = output_or_panic("tc", &["-s", "qdisc", "show", "dev", &host.link]);
        let inside = output_or_panic(
            "tc",
            &["-n", &host.netns, "-s", "qdisc", "show", "dev", "eth0"],
        );
        dropped_in(&outside) + dropped_in(&inside)
    }

    /// Removes host `i` for good: every process in its namespace killed, the namespace
    /// and its link removed. [`NetFleet::lose`] cuts the link first, so that the host
    /// vanishes without a word, and kills the agent through its handle.
    pub fn lose(&mut self, i: usize) {
        if let Some(host) = self.hosts[i].take() {
            remove_host(&host);
        }
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for host in self.hosts.iter_mut().filter_map(Option::take) {
            remove_host(&host);
        }
        if self.bridge_made {
            let _ = run("ip", &["link", "del", &self.bridge()]);
        }
    }
}

/// Kills what runs in `host`'s namespace, then removes the namespace and its link.
fn remove_host(host: &NetHost) {
    kill_netns_processes(&host.netns);
    let _ = run("ip", &["netns", "del", &host.netns]);
    // Gone with the namespace's end of the pair, unless something still held it.
    let _ = run("ip", &["link", "del", &host.link]);
}

/// `kill -9` every process in the namespace `netns` (`ip netns pids`).
fn kill_netns_processes(netns: &str) {
    let Ok(pids) = output("ip", &["netns", "pids", netns]) else {
        return;
    };
    for pid in pids
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Removes the namespaces and interfaces of networks whose test process is gone (killed
/// before its drop ran): the pid in their name is not alive.
fn remove_leftovers() {
    let dead = |name: &str| {
        let Some(rest) = name.strip_prefix(PREFIX) else {
            return false;
        };
        let pid = rest.split('-').next().unwrap_or("");
        match u32::from_str_radix(pid, 16) {
            Ok(pid) => !Path::new(&format!("/proc/{pid}")).exists(),
            Err(_) => false,
        }
    };
    if let Ok(list) = output("ip", &["netns", "list"]) {
        for netns in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if dead(netns) {
                kill_netns_processes(netns);
                let _ = run("ip", &["netns", "del", netns]);
            }
        }
    }
    if let Ok(list) = output("ip", &["-o", "link", "show"]) {
        for line in list.lines() {
            // "7: rl-1f2e-0-b: <...>", or "rl-1f2e-0-h0@if6: <...>" for a veth.
            let name = line.split(": ").nth(1).unwrap_or("");
            let name = name.split('@').next().unwrap_or("");
            if dead(name) {
                let _ = run("ip", &["link", "del", name]);
            }
        }
    }
}

/// A /24 under `10.77.0.0/16` that no other network of any test process holds and no
/// interface here already uses, reserved with [`reserve_number`] for as long as the lock
/// is kept.
fn reserve_subnet() -> Result<(u8, nix::fcntl::Flock<std::fs::File>), String> {
    let unused = |subnet: u32| {
        let cidr = format!("{}.{}.{subnet}.0/24", NET[0], NET[1]);
        output("ip", &["-o", "addr", "show", "to", &cidr]).is_ok_and(|o| o.trim().is_empty())
    };
    match reserve_number("erel-tests-subnets", 1, 254, unused) {
        Some((subnet, lock)) => Ok((subnet as u8, lock)),
        None => Err(format!(
            "no free /24 left under {}.{}.0.0/16",
            NET[0], NET[1]
        )),
    }
}

/// The sum of the `dropped N` counts in `tc -s qdisc show` output.
fn dropped_in(stats: &str) -> u64 {
    stats
        .split("dropped ")
        .skip(1)
        .filter_map(|rest| {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse::<u64>().ok()
        })
        .sum()
}

/// Runs `tool args`; `Err` names the command and gives its output when it fails.
fn run(tool: &str, args: &[&str]) -> Result<(), String> {
    output(tool, args).map(|_| ())
}

/// What `tool args` printed on stdout; `Err` names the command and gives its output when
/// it fails.
fn output(tool: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(tool)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {tool}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{tool} {}` failed: {}",
            args.join(" "),
            output_text(&out)
        ))
    }
}

fn run_or_panic(tool: &str, args: &[&str]) {
    run(tool, args).unwrap_or_else(|e| panic!("{e}"));
}

fn output_or_panic(tool: &str, args: &[&str]) -> String {
    output(tool, args).unwrap_or_else(|e| panic!("{e}"))
}

/// A [`Network`] with an agent in each namespace, the PKI they share, and a directory
/// for the cluster file and the archives it names. (Fields drop in order: the agents
/// before their network.)
pub struct NetFleet {
    /// Agent `i` runs in host `i`'s namespace, listening on its address.
    pub agents: Vec<AgentProc>,
    pub net: Network,
    pub pki: Pki,
    /// The cluster file and the archives it names.
    pub dir: tempfile::TempDir,
    /// Per host, the address the cluster file gives instead of its agent's (a proxy in
    /// front of it), when one was set ([`NetFleet::reach_through`]).
    reached_at: Vec<Option<SocketAddr>>,
}

/// The port the beat release listens on, on its host's address: each host has a network
/// namespace of its own, so one port serves them all and no test competes for it.
pub const BEAT_PORT: u16 = 7400;

impl NetFleet {
    /// One agent `<prefix>-<i>` (from 1) per host of a new network of `hosts`, each in
    /// its namespace with its certificate naming its address. `None`, after printing
    /// "skipped: `test`: why", where namespaces cannot be made here.
    pub fn new(test: &str, prefix: &str, hosts: usize) -> Option<NetFleet> {
        let net = match Network::new(hosts) {
            Ok(net) => net,
            Err(why) => {
                // Straight to stderr, not through `eprintln!`, whose output the test
                // harness hides for a test that passes: a skip must show.
                use std::io::Write;
                let _ = writeln!(std::io::stderr(), "skipped: {test}: {why}");
                return None;
            }
        };
        let pki = Pki::new();
        let agents = (0..hosts)
            .map(|i| {
                let host = net.host(i);
                let id = format!("{prefix}-{}", i + 1);
                AgentProc::start_in_netns(&pki, &id, &host.netns, IpAddr::V4(host.ip), &[])
            })
            .collect();
        Some(NetFleet {
            agents,
            net,
            pki,
            dir: tempfile::tempdir().expect("tempdir"),
            reached_at: vec![None; hosts],
        })
    }

    /// Where the archives go (made on first use).
    pub fn releases(&self) -> PathBuf {
        let releases = self.dir.path().join("releases");
        std::fs::create_dir_all(&releases).expect("mkdir");
        releases
    }

    /// The cluster file.
    pub fn cluster(&self) -> PathBuf {
        self.dir.path().join("cluster.toml")
    }

    /// From the next [`NetFleet::write_cluster`] on, the cluster file gives host `i` the
    /// address `addr` (a proxy in front of its agent, on the same address as one in
    /// front of its health probe's port) instead of its agent's.
    pub fn reach_through(&mut self, i: usize, addr: SocketAddr) {
        self.reached_at[i] = Some(addr);
    }

    /// Writes the cluster file at `revision`: every host in group `web` with `BEAT_ADDR`
    /// and `BEAT_PORT` in its environment, the group running `release` `version` from
    /// `archive` (a file under [`NetFleet::releases`]), with `group` lines added.
    pub fn write_cluster(
        &self,
        revision: u64,
        release: &str,
        version: &str,
        archive: &Path,
        group: &str,
    ) {
        let mut text = format!("revision = {revision}\n");
        let hosts = self
            .agents
            .iter()
            .zip(&self.net.hosts)
            .zip(&self.reached_at);
        for ((agent, host), reached_at) in hosts {
            let ip = host.as_ref().map(|h| h.ip.to_string()).unwrap_or_default();
            text.push_str(&format!(
                "[[host]]\nid = \"{}\"\naddr = \"{}\"\ngroup = \"web\"\n\
                 env = {{ BEAT_ADDR = \"{ip}\", BEAT_PORT = \"{BEAT_PORT}\" }}\n",
                agent.id,
                reached_at.unwrap_or(agent.addr)
            ));
        }
        let name = archive.file_name().expect("file name").to_string_lossy();
        text.push_str(&format!(
            "[group.web]\nrelease = \"{release}\"\nversion = \"{version}\"\n\
             archive = \"releases/{name}\"\n{group}\n"
        ));
        std::fs::write(self.cluster(), text).expect("write the cluster file");
    }

    /// `erel --cluster <file> deploy <extra>`, run as a child process.
    pub fn deploy_command(&self, extra: &[&str]) -> Command {
        let mut erel = self.pki.erel();
        erel.arg("--cluster")
            .arg(self.cluster())
            .arg("deploy")
            .args(extra);
        erel
    }

    /// What host `i`'s beat release answers on its address (`beat <version> <id>`), or
    /// "" when nothing answers within a second.
    pub fn beat(&self, i: usize) -> String {
        use std::io::Read;
        let addr = (IpAddr::V4(self.net.host(i).ip), BEAT_PORT).into();
        let mut text = String::new();
        if let Ok(mut stream) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = stream.read_to_string(&mut text);
        }
        text.trim().to_string()
    }

    /// Loses host `i` for good, as a host whose power fails: its link cut first, so that
    /// nothing it sends while it goes (no FIN, no reset) reaches anyone, then its agent
    /// and releases killed and its namespace removed.
    pub fn lose(&mut self, i: usize) {
        self.net.cut(i);
        let root = self.agents[i].root.clone();
        kill_agent_and_releases(&mut self.agents[i], &root);
        self.net.lose(i);
    }

    /// Every agent's log, for failure messages.
    pub fn agent_logs(&self) -> String {
        self.agents
            .iter()
            .map(|a| format!("--- agent {}\n{}", a.id, a.log()))
            .collect()
    }
}
