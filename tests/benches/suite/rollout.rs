//! Rolling deploys at fleet scale: the real `erel deploy` against real `erel-boot`
//! processes on loopback, beside the floor the health gate sets (the number of batches ×
//! `min_up_secs`: each batch must stay up that long before the next may begin).
//!
//! Two fleets, each grown in place (the agents of the smaller size are kept, so each
//! host's certificate is issued once per run of the suite):
//!
//! - `EREL_BENCH_ROLLING` (default `25,50,100`): the beat release, probed over TCP,
//!   `max_in_flight` 10, one canary, `min_up_secs` 1.
//! - `EREL_BENCH_FLEET` (default `100,250,500,1000`): a release that only sleeps, no
//!   probe, `max_in_flight` 100, one canary, `min_up_secs` 1.
//!
//! The agents are the static agent of `scripts/build-agent.sh`, the program a host runs
//! (its output writer, started with each release, is that program too).
//!
//! Each run deploys a new version to every host of the size (push, unpack, stop, start,
//! verify; the staging overlaps the switches), after one untimed warm-up deploy that
//! installs the release on the hosts new to the size. Besides the wall time, the
//! master's peak RSS (`VmHWM`, read from `/proc/PID/status` while it runs),
//! its CPU time and the most file descriptors it held at once (sampled from
//! `/proc/PID/fd`) are printed for each size.
//!
//! `EREL_BENCH_ROLLOUT_LOGS=DIR` keeps the output of every deploy, warm-up included, as
//! `DIR/<kind>-<hosts>-<run>.log` (each event with the time since the rollout began; with
//! `EREL_LOG=debug` the master's debug log too): the timeline of each batch.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::helper::release::{beat_release, shell_release};
use crate::helper::{free_port, status_kib, AgentProc, Pki, MASTER_BIN};
use crate::{Bench, Row, Timing};

/// What every size of one fleet shares: its agents, its release and its group lines.
struct Fleet {
    /// `tcp` (the beat release, probed) or `sleep`.
    kind: &'static str,
    pki: Pki,
    agents: Vec<AgentProc>,
    /// The beat release's port on each agent (empty for the sleeping release).
    ports: Vec<u16>,
    dir: tempfile::TempDir,
    max_in_flight: usize,
    revision: u64,
}

/// `min_up_secs` of both fleets: the health gate each batch waits out.
const MIN_UP_SECS: u64 = 1;

/// The rolling deploy section.
pub(crate) fn rollout(bench: &Bench, rows: &mut Vec<Row>) {
    raise_open_files();
    let rolling = sizes("EREL_BENCH_ROLLING", "25,50,100");
    let fleet = sizes("EREL_BENCH_FLEET", "100,250,500,1000");
    let mut tcp = Fleet::new("tcp", 10);
    for &n in &rolling {
        let target = (n == 100).then_some(1.05);
        tcp.measure(bench, rows, n, target);
    }
    drop(tcp);
    let mut sleep = Fleet::new("sleep", 100);
    for &n in &fleet {
        let target = (n == 1000).then_some(1.2);
        sleep.measure(bench, rows, n, target);
    }
}

fn sizes(name: &str, default: &str) -> Vec<usize> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_string())
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            s.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{name}: '{s}' is not a number of hosts"))
        })
        .collect()
}

/// This process holds a pipe per agent and a reservation lock per release port: its
/// soft `RLIMIT_NOFILE` is raised to the hard limit (getrlimit(2)).
fn raise_open_files() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

impl Fleet {
    fn new(kind: &'static str, max_in_flight: usize) -> Self {
        Fleet {
            kind,
            pki: Pki::new(),
            agents: Vec::new(),
            ports: Vec::new(),
            dir: tempfile::tempdir().expect("tempdir"),
            max_in_flight,
            revision: 0,
        }
    }

    /// Starts agents until there are `n`; returns how long that took.
    fn grow(&mut self, n: usize) -> Duration {
        let began = Instant::now();
        while self.agents.len() < n {
            let id = format!("{}-{}", self.kind, self.agents.len() + 1);
            let agent = crate::footprint::static_agent();
            self.agents
                .push(AgentProc::start_program(&self.pki, &id, &agent, &[]));
            if self.kind == "tcp" {
                self.ports.push(free_port());
            }
        }
        began.elapsed()
    }

    /// The release archive of `version`, written beside the cluster file.
    fn archive(&self, version: &str) -> PathBuf {
        let releases = self.dir.path().join("releases");
        std::fs::create_dir_all(&releases).expect("mkdir releases");
        match self.kind {
            "tcp" => beat_release(&releases, "beat", version),
            _ => shell_release(
                &releases,
                "sleeper",
                version,
                "#!/bin/sh\nexec sleep 100000\n",
            ),
        }
    }

    /// Writes the cluster file naming the first `n` agents, all at `version`.
    fn write_cluster(&mut self, n: usize, version: &str, archive: &Path) -> PathBuf {
        self.revision += 1;
        let mut text = format!("revision = {}\n", self.revision);
        for (i, agent) in self.agents.iter().take(n).enumerate() {
            text.push_str(&format!(
                "[[host]]\nid = \"{}\"\naddr = \"{}\"\ngroup = \"fleet\"\n",
                agent.id, agent.addr
            ));
            if let Some(port) = self.ports.get(i) {
                text.push_str(&format!("env = {{ BEAT_PORT = \"{port}\" }}\n"));
            }
        }
        let name = archive.file_name().expect("file name").to_string_lossy();
        let (release, argv, health) = match self.kind {
            "tcp" => (
                "beat",
                "",
                format!("health = {{ tcp = \"$BEAT_PORT\", min_up_secs = {MIN_UP_SECS}, deadline_secs = 60 }}"),
            ),
            _ => (
                "sleeper",
                "argv = [\"bin/sleeper\"]\n",
                format!("health = {{ min_up_secs = {MIN_UP_SECS}, deadline_secs = 60 }}"),
            ),
        };
        text.push_str(&format!(
            "[group.fleet]\nrelease = \"{release}\"\nversion = \"{version}\"\narchive = \"releases/{name}\"\n\
             {argv}stop_grace_secs = 5\nmax_in_flight = {}\ncanaries = 1\n{health}\n",
            self.max_in_flight
        ));
        let path = self.dir.path().join("cluster.toml");
        std::fs::write(&path, text).expect("write the cluster file");
        path
    }

    /// Deploys `bench.runs` new versions to the first `n` agents (after a warm-up) and
    /// adds the row.
    fn measure(&mut self, bench: &Bench, rows: &mut Vec<Row>, n: usize, target: Option<f64>) {
        let started = self.grow(n);
        println!(
            "rollout: {n} agents ({}) ready, {:.1} s to start the new ones",
            self.kind,
            started.as_secs_f64()
        );
        let mut runs = Vec::new();
        for run in 0..=bench.runs {
            let version = format!("{n}.{run}.0");
            let archive = self.archive(&version);
            let cluster = self.write_cluster(n, &version, &archive);
            let log = self.dir.path().join("deploy.log");
            let deploy = deploy(&self.pki, &cluster, &log);
            if let Some(keep) = std::env::var_os("EREL_BENCH_ROLLOUT_LOGS") {
                let kept = Path::new(&keep).join(format!("{}-{n}-{run}.log", self.kind));
                std::fs::create_dir_all(&keep).expect("create EREL_BENCH_ROLLOUT_LOGS");
                std::fs::copy(&log, &kept).expect("keep the deploy log");
            }
            if run > 0 {
                runs.push(deploy);
            }
        }
        let batches = 1 + (n - 1).div_ceil(self.max_in_flight);
        let floor = (batches as u64 * MIN_UP_SECS) as f64;
        let walls: Vec<f64> = runs.iter().map(|r| r.wall).collect();
        let peak_rss = runs.iter().map(|r| r.max_rss_kib).max().unwrap_or(0);
        let fds = runs.iter().map(|r| r.max_fds).max().unwrap_or(0);
        let cpu: Vec<f64> = runs.iter().map(|r| r.cpu).collect();
        println!(
            "rollout: {n} hosts ({}): master peak RSS {:.1} MiB, CPU {} s per deploy, at most {fds} fds open",
            self.kind,
            peak_rss as f64 / 1024.0,
            Timing::of(&cpu)
        );
        let what = match self.kind {
            "tcp" => "beat release, TCP probe",
            _ => "release that only sleeps",
        };
        rows.push(Row {
            figure: format!(
                "rolling deploy, {n} hosts ({what}, max_in_flight {}, 1 canary; master peak RSS {:.1} MiB)",
                self.max_in_flight,
                peak_rss as f64 / 1024.0
            ),
            erel: Timing::of(&walls),
            peer: format!("floor: {batches} batches × min_up_secs {MIN_UP_SECS}"),
            peer_timing: Some(Timing {
                median: floor,
                min: floor,
                max: floor,
            }),
            target,
        });
    }
}

/// One `erel deploy`, measured.
struct Deployed {
    /// Wall time, seconds.
    wall: f64,
    /// User + system CPU time, seconds.
    cpu: f64,
    /// Peak resident set (`VmHWM`), KiB.
    max_rss_kib: u64,
    /// The most file descriptors open at once.
    max_fds: usize,
}

/// How often the master's `VmHWM` and open descriptors are read while it runs.
const SAMPLE_EVERY: Duration = Duration::from_millis(10);

/// Runs `erel deploy --cluster <cluster>` to its end; panics with its output when it
/// fails. Its CPU time is what `getrusage(RUSAGE_CHILDREN)` gains while it runs (this
/// process reaps no other child meanwhile: the agents run on); its `VmHWM` (proc(5),
/// monotonic) and its open descriptors are read every [`SAMPLE_EVERY`] until it exits.
fn deploy(pki: &Pki, cluster: &Path, log: &Path) -> Deployed {
    use nix::sys::resource::{getrusage, UsageWho};
    let out = std::fs::File::create(log).expect("create the deploy log");
    let err = out.try_clone().expect("clone the log file");
    let children_cpu = || {
        let usage = getrusage(UsageWho::RUSAGE_CHILDREN).expect("getrusage");
        let seconds = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
        seconds(usage.user_time()) + seconds(usage.system_time())
    };
    let cpu_before = children_cpu();
    let began = Instant::now();
    let mut child = Command::new(MASTER_BIN)
        .arg("--certs")
        .arg(pki.certs_dir())
        .arg("deploy")
        .arg("--cluster")
        .arg(cluster)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("spawn erel deploy");
    let pid = child.id();
    let done = Arc::new(AtomicBool::new(false));
    let (most_fds, most_rss) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicU64::new(0)));
    let sampler = {
        let (done, most_fds, most_rss) = (done.clone(), most_fds.clone(), most_rss.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
                    most_fds.fetch_max(entries.count(), Ordering::Relaxed);
                }
                most_rss.fetch_max(status_kib(pid, "VmHWM"), Ordering::Relaxed);
                std::thread::sleep(SAMPLE_EVERY);
            }
        })
    };
    let status = child.wait().expect("wait for erel deploy");
    let wall = began.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    if !status.success() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(60)..].join("\n");
        panic!("erel deploy failed ({status}):\n{tail}");
    }
    Deployed {
        wall,
        cpu: children_cpu() - cpu_before,
        max_rss_kib: most_rss.load(Ordering::Relaxed),
        max_fds: most_fds.load(Ordering::Relaxed),
    }
}

impl Timing {
    /// The median, min and max of `samples` (seconds; at least one).
    fn of(samples: &[f64]) -> Timing {
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        assert!(n > 0, "no sample");
        let median = match n % 2 {
            1 => sorted[n / 2],
            _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
        };
        Timing {
            median,
            min: sorted[0],
            max: sorted[n - 1],
        }
    }
}
