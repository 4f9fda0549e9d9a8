//! Fan-out: one release archive of about 50 MB (`EREL_BENCH_FANOUT_MB`) deployed by
//! `erel deploy` to 1, 5 and 20 agents at once (`EREL_BENCH_FANOUT_HOSTS`;
//! `max_in_flight` = the number of hosts, no canary, `min_up_secs` 0), each agent a real
//! `erel-boot` on loopback with a root of its own.
//!
//! Each run deploys a new version (a switch on every host: push, unpack, stop the old
//! version, start the new one, its TCP port answering); the agents' older versions are
//! removed between runs, untimed. Figures per host count: the wall time and the master's
//! CPU time (user + system of the `erel deploy` process, from this process's
//! `cutime`/`cstime` in `/proc/self/stat` around waiting for it), beside `scp` of the
//! same archive to as many destinations at once (wall time, and the CPU time of the `scp`
//! and `ssh` clients). Then the master's CPU time per additional host (target: 30 ms),
//! and how many times the master read and hashed the archive per rollout, counted from
//! its own log (`EREL_LOG=erel_master::digest_cache=debug`: one `local file read` line
//! per read, `hashed=true` when the read hashed it).
//!
//! `EREL_BENCH_FANOUT_WRAP` puts a profiler in front of each `erel deploy` (see
//! [`Deployer::deploy`]).
//!
//! The archive is the beat release (a small TCP server) with the rest made of files of
//! incompressible bytes (4 MiB each), gzipped: the bytes a release of already compressed
//! assets would send.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use erel_master::release::{write_tarball, ReleaseFile};

use crate::helper::release::BEAT_BIN;
use crate::helper::{free_port, AgentProc, MASTER_BIN};
use crate::{env_parse, quote, Bench, Row, Timing};

/// The release's name.
const RELEASE: &str = "fan";
/// Bytes per payload file in the archive.
const PAYLOAD_FILE: usize = 4 * 1024 * 1024;
/// The master's CPU time per additional host the issue allows, in seconds.
const PER_HOST_TARGET: f64 = 0.030;

/// One `erel deploy` run: wall and CPU seconds, and the archive's reads from the log.
struct Run {
    wall: f64,
    cpu: f64,
    hashed: usize,
    reads: usize,
}

/// The fan-out section.
pub(crate) fn fanout(bench: &Bench, rows: &mut Vec<Row>) {
    let hosts: Vec<usize> = std::env::var("EREL_BENCH_FANOUT_HOSTS")
        .unwrap_or_else(|_| "1,5,20".into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .unwrap_or_else(|_| panic!("EREL_BENCH_FANOUT_HOSTS: '{s}' is not a count"))
        })
        .collect();
    let mb: usize = env_parse("EREL_BENCH_FANOUT_MB", 50);
    let most = hosts.iter().copied().max().unwrap_or(1);
    let agents: Vec<AgentProc> = (1..=most)
        .map(|i| AgentProc::start(&bench.pki, &format!("fan-{i}"), &[]))
        .collect();
    let ports: Vec<u16> = agents.iter().map(|_| free_port()).collect();
    let dir = bench.scratch("fanout");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let payload = payload(mb * 1_000_000);
    let mut deployer = Deployer {
        bench,
        agents: &agents,
        ports: &ports,
        dir: &dir,
        payload: &payload,
        revision: 0,
    };
    let mut results: Vec<(usize, Vec<Run>)> = Vec::new();
    let mut size = 0;
    for &n in &hosts {
        // A warm-up run, so that every timed run is a switch on every host.
        let (warm, archive_size) = deployer.deploy(n);
        size = archive_size;
        println!(
            "fan-out warm-up, {n} host(s): {:.3} s, master CPU {:.3} s",
            warm.wall, warm.cpu
        );
        let runs: Vec<Run> = (0..bench.runs).map(|_| deployer.deploy(n).0).collect();
        results.push((n, runs));
    }
    let archive_mb = size as f64 / 1e6;
    for (n, runs) in &results {
        let wall = timing(runs.iter().map(|r| r.wall));
        let cpu = timing(runs.iter().map(|r| r.cpu));
        let scp = scp_peer(bench, &dir, *n, &deployer.last_archive());
        let figure = format!("fan-out {archive_mb:.1} MB to {n} host(s)");
        rows.push(Row {
            figure: format!("{figure}: wall time"),
            erel: wall,
            peer: format!("{n} × `scp` at once (copy only)"),
            peer_timing: scp.as_ref().map(|s| s.0),
            target: None,
        });
        rows.push(Row {
            figure: format!("{figure}: master CPU (user + sys)"),
            erel: cpu,
            peer: format!("{n} × `scp`: client CPU"),
            peer_timing: scp.as_ref().map(|s| s.1),
            target: None,
        });
        let hashed: Vec<usize> = runs.iter().map(|r| r.hashed).collect();
        let reads: Vec<usize> = runs.iter().map(|r| r.reads).collect();
        println!(
            "fan-out to {n} host(s): the master hashed the archive {hashed:?} time(s) per \
             rollout and read it {reads:?} time(s) in all (target: hashed once): {}",
            if hashed.iter().all(|&h| h == 1) {
                "met"
            } else {
                "NOT met"
            }
        );
    }
    // CPU time per additional host: run i of the most hosts against run i of the
    // fewest, for each i.
    if let (Some((few, few_runs)), Some((many, many_runs))) = (results.first(), results.last()) {
        if many > few {
            let per_host = timing(
                many_runs
                    .iter()
                    .zip(few_runs)
                    .map(|(m, f)| (m.cpu - f.cpu) / (many - few) as f64),
            );
            rows.push(Row {
                figure: format!("master CPU per additional host ({few} → {many} hosts)"),
                erel: per_host,
                peer: "target: 30 ms".into(),
                peer_timing: Some(Timing {
                    median: PER_HOST_TARGET,
                    min: PER_HOST_TARGET,
                    max: PER_HOST_TARGET,
                }),
                target: Some(1.0),
            });
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Deploys new versions to the first hosts of the fleet.
struct Deployer<'a> {
    bench: &'a Bench,
    agents: &'a [AgentProc],
    ports: &'a [u16],
    dir: &'a Path,
    payload: &'a [ReleaseFile],
    revision: u64,
}

impl Deployer<'_> {
    /// Version `1.<revision>`'s archive, written beside the cluster file.
    fn archive(&self, version: &str) -> PathBuf {
        let script = "#!/bin/sh\ncd \"$(dirname \"$0\")/..\"\nexec bin/beat-server \"$@\"\n";
        let mut files = vec![
            ReleaseFile::start_script(RELEASE, script),
            ReleaseFile::program("bin/beat-server", Path::new(BEAT_BIN)).expect("beat"),
            ReleaseFile::marker(RELEASE, version),
        ];
        files.extend(self.payload.iter().cloned());
        write_tarball(self.dir, RELEASE, version, &files).expect("write the archive")
    }

    fn last_archive(&self) -> PathBuf {
        self.dir
            .join(format!("{RELEASE}-1.{}.tar.gz", self.revision))
    }

    /// One `erel deploy` of a new version to the first `hosts` agents; the run and the
    /// archive's size. The previous version's files are removed first (untimed).
    fn deploy(&mut self, hosts: usize) -> (Run, u64) {
        let previous = (self.revision > 0).then(|| format!("1.{}", self.revision));
        self.revision += 1;
        let version = format!("1.{}", self.revision);
        let archive = self.archive(&version);
        let name = archive
            .file_name()
            .expect("a file name")
            .to_string_lossy()
            .into_owned();
        let mut text = format!("revision = {}\n", self.revision);
        for (agent, port) in self.agents.iter().zip(self.ports).take(hosts) {
            text.push_str(&format!(
                "[[host]]\nid = \"{}\"\naddr = \"{}\"\ngroup = \"fan\"\nenv = {{ BEAT_PORT = \"{port}\" }}\n",
                agent.id, agent.addr
            ));
        }
        text.push_str(&format!(
            "[group.fan]\nrelease = \"{RELEASE}\"\nversion = \"{version}\"\narchive = \"{name}\"\n\
             max_in_flight = {hosts}\ncanaries = 0\nstop_grace_secs = 5\n\
             health = {{ tcp = \"$BEAT_PORT\", min_up_secs = 0, deadline_secs = 120 }}\n"
        ));
        let cluster = self.dir.join("cluster.toml");
        std::fs::write(&cluster, text).expect("write the cluster file");
        let cpu_before = children_cpu();
        let started = Instant::now();
        // A profiler in front of the master (`EREL_BENCH_FANOUT_WRAP="strace -c -f -o
        // FILE"`, `"perf record -g -o FILE --"`): its own CPU time then counts too.
        let wrap = std::env::var("EREL_BENCH_FANOUT_WRAP").unwrap_or_default();
        let mut words = wrap.split_whitespace();
        let mut command = match words.next() {
            Some(program) => {
                let mut command = Command::new(program);
                command.args(words).arg(MASTER_BIN);
                command
            }
            None => Command::new(MASTER_BIN),
        };
        let mut child = command
            .arg("--certs")
            .arg(self.bench.pki.certs_dir())
            .args(["deploy", "--cluster"])
            .arg(&cluster)
            .env(
                "EREL_LOG",
                "erel_master=warn,erel_master::digest_cache=debug",
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run erel deploy");
        let mut log = String::new();
        let stdout = child.stdout.take().expect("stdout");
        let out = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::BufReader::new(stdout).read_to_string(&mut text);
            text
        });
        child
            .stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut log)
            .expect("read the log");
        let status = child.wait().expect("wait for erel deploy");
        let wall = started.elapsed().as_secs_f64();
        let cpu = children_cpu() - cpu_before;
        let out = out.join().unwrap_or_default();
        assert!(
            status.success(),
            "erel deploy to {hosts} host(s) failed:\n{out}\n{log}"
        );
        let reads: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("local file read") && l.contains(&name))
            .collect();
        let run = Run {
            wall,
            cpu,
            hashed: reads.iter().filter(|l| l.contains("hashed=true")).count(),
            reads: reads.len(),
        };
        let size = std::fs::metadata(&archive).map(|m| m.len()).unwrap_or(0);
        // The previous version is no longer needed anywhere: its archive here, its
        // archive and unpacked tree on the agents.
        if let Some(previous) = previous {
            let old = format!("{RELEASE}-{previous}.tar.gz");
            let _ = std::fs::remove_file(self.dir.join(&old));
            for agent in self.agents {
                let _ = std::fs::remove_file(agent.root.join("archives").join(&old));
                let _ = std::fs::remove_dir_all(
                    agent.root.join("releases").join(RELEASE).join(&previous),
                );
            }
        }
        (run, size)
    }
}

/// `scp` of `archive` to `hosts` destinations on the loopback sshd at once: the wall
/// time, and the CPU time of the clients (`scp` and the `ssh` it runs); `None` without
/// an sshd.
fn scp_peer(bench: &Bench, dir: &Path, hosts: usize, archive: &Path) -> Option<(Timing, Timing)> {
    let scp = bench.ssh("scp")?;
    let mut walls = Vec::new();
    let mut cpus = Vec::new();
    let targets: Vec<String> = (0..hosts)
        .map(|i| quote(&dir.join(format!("scp-{i}.tar.gz")).display().to_string()))
        .collect();
    let script = targets
        .iter()
        .map(|t| {
            format!(
                "{scp} {} bench:{t} &",
                quote(&archive.display().to_string())
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\nwait\n";
    for run in 0..=bench.runs {
        let _ = Command::new("rm")
            .arg("-f")
            .args(targets.iter().map(|t| t.trim_matches('\'')))
            .status();
        let cpu_before = children_cpu();
        let started = Instant::now();
        let status = Command::new("sh")
            .args(["-c", &script])
            .status()
            .expect("run scp");
        let wall = started.elapsed().as_secs_f64();
        let cpu = children_cpu() - cpu_before;
        assert!(status.success(), "scp failed: {script}");
        // The first run warms up, as hyperfine's does.
        if run > 0 {
            walls.push(wall);
            cpus.push(cpu);
        }
    }
    let _ = Command::new("rm")
        .arg("-f")
        .args(targets.iter().map(|t| t.trim_matches('\'')))
        .status();
    Some((timing(walls.into_iter()), timing(cpus.into_iter())))
}

/// Median, min and max of `values`.
fn timing(values: impl Iterator<Item = f64>) -> Timing {
    let mut values: Vec<f64> = values.collect();
    assert!(!values.is_empty(), "no runs");
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let median = if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    };
    Timing {
        median,
        min: values[0],
        max: values[n - 1],
    }
}

/// The CPU time of this process's waited-for children so far (user + system: `cutime`
/// and `cstime` of `/proc/self/stat`, `proc(5)`), in seconds.
fn children_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the command name (which may hold spaces), from field 3 on; cutime
    // and cstime are fields 16 and 17, in clock ticks (USER_HZ, 100 on Linux).
    let rest = &stat[stat.rfind(')').expect("stat's command name") + 2..];
    let ticks: f64 = rest
        .split_whitespace()
        .skip(13)
        .take(2)
        .map(|t| t.parse::<f64>().expect("clock ticks"))
        .sum();
    ticks / 100.0
}

/// The archive's payload: `bytes` of incompressible-looking data (xorshift64) in files
/// of [`PAYLOAD_FILE`] bytes under `lib/payload/`.
fn payload(bytes: usize) -> Vec<ReleaseFile> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut files = Vec::new();
    let mut left = bytes;
    while left > 0 {
        let size = left.min(PAYLOAD_FILE);
        left -= size;
        let mut data = vec![0u8; size.div_ceil(8) * 8];
        for chunk in data.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes());
        }
        data.truncate(size);
        files.push(ReleaseFile {
            path: format!("lib/payload/{}.bin", files.len()),
            data,
            mode: 0o644,
        });
    }
    files
}
