//! The agent's footprint: the static agent's size, its idle memory, its peak memory
//! while receiving the largest file, its CPU time per pushed file beside the SHA-256
//! floor, and new mutual-TLS connections per second against one agent.
//!
//! Each run starts a fresh agent (the bench build of `erel-boot`, on loopback, with its
//! own PKI bundle) so that its high-water mark belongs to that run alone, then:
//!
//! 1. pings it once, waits [`SETTLE`], and reads `VmRSS` (idle; the static agent's too,
//!    on an agent of its own, when `scripts/build-agent.sh` has built it);
//! 2. pushes each file (256 MiB, and the largest of `EREL_BENCH_SIZES`) with the
//!    master's client code, the digest known in advance so that only the agent hashes,
//!    and reads the agent's CPU time (`/proc/PID/stat`) and `VmHWM`;
//! 3. runs the connection load: [`LOAD_THREADS`] threads, each opening connections with
//!    the master's real client code (`Connector`, its real certificate), `Hello` +
//!    `Ping`, close, one after the other, for [`LOAD_SECONDS`]; it reports connections
//!    per second, the agent's CPU time per connection and its `VmRSS` under load.
//!
//! The suite's shared [`crate::Row`] holds seconds; these figures are sizes, rates and
//! CPU times, so the section prints its own table in the same columns: each figure's
//! median (min–max) over `EREL_BENCH_RUNS` runs, beside its peer, floor or target,
//! with the ratio.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use erel_master::client::{Connector, WriteSource};

use crate::common::{make_file, MIB};
use crate::helper::{status_kib, AgentCommands, AgentProc};
use crate::{quote, Bench};

/// The pause before reading the idle RSS after the first ping: it gives start-up and
/// first-connection work time to end and memory to be handed back (no setting governs
/// it; a figure, not an assertion).
const SETTLE: Duration = Duration::from_millis(500);

/// Threads opening connections at once (one connection each at a time).
const LOAD_THREADS: usize = 4;

/// How long the connection load runs per run (`--quick`: [`LOAD_SECONDS_QUICK`]).
const LOAD_SECONDS: f64 = 3.0;
const LOAD_SECONDS_QUICK: f64 = 0.5;

/// The targets of the issue.
const STATIC_SIZE_TARGET_MIB: f64 = 4.0;
const IDLE_RSS_TARGET_MIB: f64 = 6.0;
const PEAK_RSS_TARGET_MIB: f64 = 16.0;
const CONNECTIONS_TARGET: f64 = 1000.0;
const PUSH_FLOOR_TARGET: f64 = 1.5;

/// Where `scripts/build-agent.sh` leaves the static agent (not built by the suite: its
/// fat-LTO build takes minutes; `scripts/bench.sh` builds it for the sections that use it).
pub(crate) fn static_agent() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/x86_64-unknown-linux-gnu/agent/erel-boot")
}

/// The section.
pub(crate) fn footprint(bench: &Bench, _rows: &mut Vec<crate::Row>) {
    let quick = bench.sizes_mib.iter().all(|&mib| mib < 64);
    let largest = bench.sizes_mib.iter().copied().max().unwrap_or(64);
    let mut pushed: Vec<u64> = bench
        .sizes_mib
        .iter()
        .copied()
        .filter(|&mib| mib == 256)
        .collect();
    if !pushed.contains(&largest) {
        pushed.push(largest);
    }
    let files: Vec<(u64, PathBuf, erel_proto::Sha256)> = pushed
        .iter()
        .map(|&mib| {
            let path = bench.scratch(&format!("footprint-{mib}m.bin"));
            make_file(&path, mib * MIB);
            let digest = erel_master::digest_cache::sha256_file(&path).expect("hash");
            (mib, path, digest)
        })
        .collect();
    let load_seconds = if quick {
        LOAD_SECONDS_QUICK
    } else {
        LOAD_SECONDS
    };

    let mut figures = Vec::new();
    match std::fs::metadata(static_agent()) {
        Ok(meta) => figures.push(Figure::against_target(
            "static agent size (`scripts/build-agent.sh`)",
            Unit::Mib,
            vec![meta.len() as f64 / MIB as f64],
            STATIC_SIZE_TARGET_MIB,
            Goal::AtMost,
        )),
        Err(_) => println!(
            "footprint: static agent size not measured ({} is not built: run scripts/build-agent.sh)",
            static_agent().display()
        ),
    }

    let mut idle = Vec::new();
    let mut peak = Vec::new();
    let mut push_cpu: Vec<Vec<f64>> = vec![Vec::new(); files.len()];
    let mut rates = Vec::new();
    let mut cpu_per_connection = Vec::new();
    let mut loaded_rss = Vec::new();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for run in 0..bench.runs {
        let agent = AgentProc::start(&bench.pki, &format!("footprint-{run}"), &[]);
        let pid = agent.pid().expect("agent pid");
        let connector = Connector::new(bench.pki.client_config(), "bench-master");
        runtime.block_on(async {
            let mut client = connector.connect(&agent.host()).await.expect("connect");
            client.ping().await.expect("ping");
            tokio::time::sleep(SETTLE).await;
            idle.push(status_kib(pid, "VmRSS") as f64 / 1024.0);
            for ((mib, path, digest), cpu) in files.iter().zip(push_cpu.iter_mut()) {
                let source = WriteSource {
                    path: path.clone(),
                    sha256: Some(*digest),
                    sha256_of: None,
                };
                let dest = format!("footprint/{mib}m.bin");
                let before = cpu_seconds(pid);
                let written = client
                    .write_file(&source, &dest, 0o644, &mut |_| {})
                    .await
                    .expect("push");
                assert_eq!(written.received, mib * MIB);
                cpu.push(cpu_seconds(pid) - before);
                let _ = std::fs::remove_file(agent.root.join(&dest));
            }
            peak.push(status_kib(pid, "VmHWM") as f64 / 1024.0);
            client.close().await;
        });
        let load = connection_load(bench, &agent, load_seconds);
        rates.push(load.connections as f64 / load.seconds);
        cpu_per_connection.push(load.agent_cpu * 1000.0 / load.connections as f64);
        loaded_rss.push(load.peak_rss_mib);
        assert_eq!(
            load.failures,
            0,
            "connections failed under load; agent log:\n{}",
            agent.log()
        );
    }

    // The agent a blank host receives is the static one: when it is built, its idle RSS
    // is taken the same way, on an agent of its own per run.
    if static_agent().is_file() {
        let static_idle: Vec<f64> = (0..bench.runs)
            .map(|run| {
                let agent = AgentProc::start_program(
                    &bench.pki,
                    &format!("footprint-static-{run}"),
                    &static_agent(),
                    &[],
                );
                let pid = agent.pid().expect("agent pid");
                let connector = Connector::new(bench.pki.client_config(), "bench-master");
                runtime.block_on(async {
                    let mut client = connector.connect(&agent.host()).await.expect("connect");
                    client.ping().await.expect("ping");
                    tokio::time::sleep(SETTLE).await;
                    let rss = status_kib(pid, "VmRSS") as f64 / 1024.0;
                    client.close().await;
                    rss
                })
            })
            .collect();
        figures.push(Figure::against_target(
            "idle RSS (static agent, `scripts/build-agent.sh`)",
            Unit::Mib,
            static_idle,
            IDLE_RSS_TARGET_MIB,
            Goal::AtMost,
        ));
    }
    figures.push(Figure::against_target(
        "idle RSS (bench build)",
        Unit::Mib,
        idle,
        IDLE_RSS_TARGET_MIB,
        Goal::AtMost,
    ));
    figures.push(Figure::against_target(
        &format!("peak RSS (`VmHWM`) receiving {largest} MiB"),
        Unit::Mib,
        peak,
        PEAK_RSS_TARGET_MIB,
        Goal::AtMost,
    ));
    for ((mib, path, _), cpu) in files.iter().zip(push_cpu) {
        let floor: Vec<f64> = (0..bench.runs).map(|_| sha256_floor_cpu(path)).collect();
        figures.push(Figure {
            figure: format!("agent CPU time (user + system) per push of {mib} MiB"),
            unit: Unit::Seconds,
            values: cpu,
            peer: "floor: CPU time of `openssl dgst -sha256`".into(),
            peer_values: Some(floor),
            goal: Some((Goal::AtMost, PUSH_FLOOR_TARGET)),
        });
    }
    figures.push(Figure::against_target(
        &format!(
            "new mutual-TLS connections per second, `Hello` + `Ping` each, {LOAD_THREADS} client threads"
        ),
        Unit::PerSecond,
        rates,
        CONNECTIONS_TARGET,
        Goal::AtLeast,
    ));
    figures.push(Figure {
        figure: "agent CPU time per connection (user + system)".into(),
        unit: Unit::Millis,
        values: cpu_per_connection,
        peer: String::new(),
        peer_values: None,
        goal: None,
    });
    figures.push(Figure::against_target(
        "agent RSS under the connection load (highest `VmRSS` sampled)",
        Unit::Mib,
        loaded_rss,
        PEAK_RSS_TARGET_MIB,
        Goal::AtMost,
    ));
    print_figures(&figures);
    for (_, path, _) in files {
        let _ = std::fs::remove_file(path);
    }
}

/// What one connection load came to.
struct Load {
    connections: u64,
    failures: u64,
    seconds: f64,
    /// The agent's CPU time over the load, seconds.
    agent_cpu: f64,
    peak_rss_mib: f64,
}

/// [`LOAD_THREADS`] threads opening connections to `agent` for `seconds`, each with a
/// runtime of its own and the master's client code: connect (TCP, TLS 1.3 with both
/// certificates verified, `Hello`), `Ping`, close.
fn connection_load(bench: &Bench, agent: &AgentProc, seconds: f64) -> Load {
    let pid = agent.pid().expect("agent pid");
    let connections = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let config = bench.pki.client_config();
    let host = agent.host();
    let cpu_before = cpu_seconds(pid);
    let started = Instant::now();
    let threads: Vec<_> = (0..LOAD_THREADS)
        .map(|_| {
            let (connections, failures, stop) =
                (connections.clone(), failures.clone(), stop.clone());
            let connector = Connector::new(config.clone(), "bench-master");
            let host = host.clone();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                runtime.block_on(async {
                    while !stop.load(Ordering::Relaxed) {
                        let pinged = match connector.connect(&host).await {
                            Ok(mut client) => {
                                let pong = client.ping().await;
                                client.close().await;
                                pong.is_ok()
                            }
                            Err(_) => false,
                        };
                        let counter = if pinged { &connections } else { &failures };
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                });
            })
        })
        .collect();
    let mut peak_rss = 0;
    while started.elapsed().as_secs_f64() < seconds {
        std::thread::sleep(Duration::from_millis(50));
        peak_rss = peak_rss.max(status_kib(pid, "VmRSS"));
    }
    stop.store(true, Ordering::Relaxed);
    for thread in threads {
        thread.join().expect("load thread");
    }
    let elapsed = started.elapsed().as_secs_f64();
    Load {
        connections: connections.load(Ordering::Relaxed),
        failures: failures.load(Ordering::Relaxed),
        seconds: elapsed,
        agent_cpu: cpu_seconds(pid) - cpu_before,
        peak_rss_mib: peak_rss as f64 / 1024.0,
    }
}

/// The CPU time (user + system, seconds) of one `openssl dgst -sha256` of `path`: the
/// difference in this process's waited-for children's CPU time around it.
fn sha256_floor_cpu(path: &Path) -> f64 {
    let before = children_cpu_seconds();
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl dgst -sha256 {} >/dev/null",
            quote(&path.display().to_string())
        ))
        .status()
        .expect("run openssl");
    assert!(status.success(), "openssl dgst failed");
    children_cpu_seconds() - before
}

/// Fields of `/proc/PID/stat` after the command name, from field 3 on.
fn stat_fields(pid: &str) -> Vec<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let rest = &stat[stat.rfind(')').expect("stat's command name") + 2..];
    rest.split_whitespace()
        .map(|field| field.parse().unwrap_or(0.0))
        .collect()
}

/// CPU time of `pid` (utime + stime, fields 14 and 15, in USER_HZ ticks of 10 ms).
fn cpu_seconds(pid: u32) -> f64 {
    let fields = stat_fields(&pid.to_string());
    (fields[11] + fields[12]) / 100.0
}

/// CPU time of this process's waited-for children (cutime + cstime, fields 16 and 17).
fn children_cpu_seconds() -> f64 {
    let fields = stat_fields("self");
    (fields[13] + fields[14]) / 100.0
}

/// What a figure counts.
#[derive(Clone, Copy)]
enum Unit {
    Mib,
    Seconds,
    Millis,
    PerSecond,
}

impl Unit {
    fn show(self, value: f64) -> String {
        match self {
            Unit::Mib => format!("{value:.2} MiB"),
            Unit::Seconds => format!("{value:.3} s"),
            Unit::Millis => format!("{value:.3} ms"),
            Unit::PerSecond => format!("{value:.0}/s"),
        }
    }
}

/// Which way a figure must fall against its peer or target.
#[derive(Clone, Copy)]
enum Goal {
    AtMost,
    AtLeast,
}

/// One figure over the runs, beside its peer, floor or target.
struct Figure {
    figure: String,
    unit: Unit,
    values: Vec<f64>,
    peer: String,
    peer_values: Option<Vec<f64>>,
    /// The bound on the ratio of the medians.
    goal: Option<(Goal, f64)>,
}

impl Figure {
    /// A figure beside the target for it (the ratio's bound is then 1).
    fn against_target(figure: &str, unit: Unit, values: Vec<f64>, target: f64, goal: Goal) -> Self {
        let word = match goal {
            Goal::AtMost => "under",
            Goal::AtLeast => "at least",
        };
        Figure {
            figure: figure.to_string(),
            unit,
            values,
            peer: format!("target: {word} {}", unit.show(target)),
            peer_values: Some(vec![target]),
            goal: Some((goal, 1.0)),
        }
    }
}

/// Median, min and max of `values`.
fn spread(values: &[f64]) -> (f64, f64, f64) {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    (median, sorted[0], sorted[n - 1])
}

fn show_spread(unit: Unit, values: &[f64]) -> String {
    let (median, min, max) = spread(values);
    if values.len() == 1 {
        return unit.show(median);
    }
    format!(
        "{} ({}–{})",
        unit.show(median),
        unit.show(min),
        unit.show(max)
    )
}

fn print_figures(figures: &[Figure]) {
    println!();
    println!("footprint:");
    println!();
    println!("| figure | erel median (min–max) | peer, floor or target | its median (min–max) | ratio | target |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for figure in figures {
        let ours = show_spread(figure.unit, &figure.values);
        let (theirs, ratio) = match &figure.peer_values {
            Some(peer) => {
                let ratio = spread(&figure.values).0 / spread(peer).0;
                // A target is already named in the peer column.
                let theirs = if figure.peer.starts_with("target:") {
                    String::new()
                } else {
                    show_spread(figure.unit, peer)
                };
                (theirs, Some(ratio))
            }
            None => (String::new(), None),
        };
        let target = match (figure.goal, ratio) {
            (Some((goal, bound)), Some(ratio)) => {
                let (sign, met) = match goal {
                    Goal::AtMost => ("≤", ratio <= bound),
                    Goal::AtLeast => ("≥", ratio >= bound),
                };
                format!("{sign} {bound:.2}: {}", if met { "met" } else { "NOT met" })
            }
            _ => String::new(),
        };
        let ratio = ratio.map_or_else(|| "–".to_string(), |r| format!("{r:.2}"));
        println!(
            "| {} | {ours} | {} | {theirs} | {ratio} | {target} |",
            figure.figure, figure.peer
        );
    }
}
