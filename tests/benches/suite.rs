//! The side-by-side benchmark suite: each figure is erel beside the tool an operator
//! would use instead (its *peer*) or the machine's *floor*, measured in the same run on
//! the same machine, with the ratio.
//!
//! Every command, erel's and the peers', is timed by `hyperfine` as a real process (the
//! `erel` command line against a real `erel-boot` on loopback over mutual TLS; `scp`
//! and `ssh` against a throw-away `sshd`), so each figure is the median of
//! `EREL_BENCH_RUNS` runs with their min and max. `scripts/bench.sh` prepares all of
//! that (tools, `sshd`, the OTP archive) and runs this binary; it reads:
//!
//! - `EREL_BENCH_SSH_CONFIG`: an `ssh_config(5)` file whose host `bench` is the
//!   loopback `sshd` (required for the peers that use it; they are skipped without it).
//! - `EREL_BENCH_RUNS` (default 5), `EREL_BENCH_SIZES` (MiB, default `64,256,1024`).
//! - `EREL_BENCH_ARCHIVE`: the `.tar.gz` for push + unpack (that section is skipped
//!   without it).
//! - `EREL_BENCH_ONLY`: a comma-separated list of sections to run (default: all).
//!
//! A section is a function that appends [`Row`]s; new figures slot in as new sections.

mod common;
#[path = "suite/config.rs"]
mod config;
#[path = "suite/fanout.rs"]
mod fanout;
#[path = "suite/footprint.rs"]
mod footprint;
#[path = "../tests/e2e/helper/mod.rs"]
mod helper;
#[path = "suite/rollout.rs"]
mod rollout;

use std::io::Write;
use std::path::PathBuf;

use common::{make_file, MIB};
use erel_master::digest_cache::RACY_WINDOW;
use std::process::Command;

use helper::{AgentProc, Pki, MASTER_BIN};

/// Where [`Bench::set_aside`] moves trees, under the scratch directory.
const SET_ASIDE: &str = "set-aside";

/// A named part of the suite.
type Section = fn(&Bench, &mut Vec<Row>);

/// The sections, in the order they run.
const SECTIONS: &[(&str, Section)] = &[
    ("push", push),
    ("unpack", push_and_unpack),
    ("fanout", fanout::fanout),
    ("config", config::config),
    ("footprint", footprint::footprint),
    ("rollout", rollout::rollout),
];

fn main() {
    let bench = Bench::from_env();
    let only: Option<Vec<String>> = std::env::var("EREL_BENCH_ONLY")
        .ok()
        .map(|list| list.split(',').map(|s| s.trim().to_string()).collect());
    println!(
        "# erel benchmark suite: {} runs per command, {} cores, load average {}",
        bench.runs,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        std::fs::read_to_string("/proc/loadavg")
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    );
    let mut rows = Vec::new();
    for (name, section) in SECTIONS {
        if only
            .as_ref()
            .is_some_and(|only| !only.iter().any(|o| o == name))
        {
            continue;
        }
        section(&bench, &mut rows);
    }
    print_table(&rows);
}

/// What every section shares: the settings, a scratch directory, one agent.
struct Bench {
    runs: u32,
    sizes_mib: Vec<u64>,
    ssh_config: Option<PathBuf>,
    archive: Option<PathBuf>,
    work: tempfile::TempDir,
    pki: Pki,
    agent: AgentProc,
}

impl Bench {
    fn from_env() -> Self {
        let runs = env_parse("EREL_BENCH_RUNS", 5);
        let sizes_mib = std::env::var("EREL_BENCH_SIZES")
            .unwrap_or_else(|_| "64,256,1024".into())
            .split(',')
            .map(|s| {
                s.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("EREL_BENCH_SIZES: '{s}' is not a size in MiB"))
            })
            .collect();
        let ssh_config = std::env::var_os("EREL_BENCH_SSH_CONFIG").map(PathBuf::from);
        let archive = std::env::var_os("EREL_BENCH_ARCHIVE").map(PathBuf::from);
        if Command::new("hyperfine").arg("--version").output().is_err() {
            panic!("hyperfine is not installed: run scripts/bench.sh, which installs it");
        }
        let work = tempfile::tempdir().expect("tempdir");
        let pki = Pki::new();
        let agent = AgentProc::start(&pki, "bench-1", &[]);
        Bench {
            runs,
            sizes_mib,
            ssh_config,
            archive,
            work,
            pki,
            agent,
        }
    }

    /// `erel --certs … <words…>` as a shell command line, with a digest cache of its own
    /// (see [`Bench::digest_cache`]).
    fn erel(&self, words: &[&str]) -> String {
        let mut line = vec![
            format!(
                "XDG_CACHE_HOME={}",
                quote(&self.scratch("cache").display().to_string())
            ),
            quote(MASTER_BIN),
            "--certs".into(),
            quote(&self.pki.certs_dir().display().to_string()),
        ];
        line.extend(words.iter().map(|w| quote(w)));
        line.join(" ")
    }

    /// Removes what `erel push` remembers of the files it hashed (its digest cache), so
    /// the next push hashes its file again, as an operator's first push does.
    fn forget_digests(&self) -> String {
        format!(
            "rm -rf {}",
            quote(&self.scratch("cache").display().to_string())
        )
    }

    /// The agent's address as `erel` takes it.
    fn host(&self) -> String {
        self.agent.host().to_string()
    }

    /// A path under the agent's root, for preparing commands.
    fn on_agent(&self, relative: &str) -> String {
        quote(&self.agent.root.join(relative).display().to_string())
    }

    /// A shell command that moves the tree at `quoted` (a path, quoted for `sh`) out of
    /// the way, into a directory of its own on the same file system, when it exists.
    ///
    /// Not removed between runs: on ext4 without a journal (this development machine's
    /// root), an inode freed less than 5 s ago (120 s while its inode table block is
    /// dirty) is not reused, and the allocator looks at each such inode before it
    /// passes it (`recently_deleted` in `fs/ext4/ialloc.c`); a tree of thousands of files
    /// removed just before the timed run makes every file the run creates pay for that
    /// scan (more than half of the agent's CPU in `perf`, for `tar` alike). The trees
    /// set aside are removed once the section is done.
    ///
    /// Then `sync`: `tar` leaves its files to the kernel's write-back, and the agent's
    /// `syncfs` before it makes a tree visible writes everything dirty on the file system,
    /// so without it a timed unpack would also write out the trees of the runs before it.
    fn set_aside(&self, quoted: &str) -> String {
        let aside = quote(&self.scratch(SET_ASIDE).display().to_string());
        format!(
            "mkdir -p {aside} && if [ -e {quoted} ]; then mv {quoted} {aside}/$(date +%s%N); fi \
             && sync"
        )
    }

    /// `ssh`/`scp` with the loopback sshd's config, or None when there is none.
    fn ssh(&self, program: &str) -> Option<String> {
        let config = self.ssh_config.as_ref()?;
        Some(format!(
            "{program} -q -F {}",
            quote(&config.display().to_string())
        ))
    }

    fn scratch(&self, name: &str) -> PathBuf {
        self.work.path().join(name)
    }

    /// Times `command` (after `prepare`, untimed, before each run) with hyperfine.
    fn time(&self, name: &str, prepare: &str, command: &str) -> Timing {
        self.time_and_cpu(name, prepare, command).0
    }

    /// [`Bench::time`], and the CPU time of `command` itself per run (hyperfine's mean
    /// user + system time, of the command and its children), in seconds.
    fn time_and_cpu(&self, name: &str, prepare: &str, command: &str) -> (Timing, f64) {
        let json = self.scratch("hyperfine.json");
        let status = Command::new("hyperfine")
            .args(["--style", "none", "--warmup", "1", "--runs"])
            .arg(self.runs.to_string())
            .arg("--prepare")
            .arg(if prepare.is_empty() { "true" } else { prepare })
            .arg("--export-json")
            .arg(&json)
            .arg("--command-name")
            .arg(name)
            .arg(command)
            .status()
            .expect("run hyperfine");
        assert!(status.success(), "hyperfine failed on: {command}");
        let text = std::fs::read_to_string(&json).expect("hyperfine's JSON");
        let value: serde_json::Value = serde_json::from_str(&text).expect("hyperfine's JSON");
        let result = &value["results"][0];
        let field = |key: &str| {
            result[key]
                .as_f64()
                .unwrap_or_else(|| panic!("hyperfine's JSON has no {key}: {text}"))
        };
        let timing = Timing {
            median: field("median"),
            min: field("min"),
            max: field("max"),
        };
        (timing, field("user") + field("system"))
    }
}

/// Seconds, from hyperfine.
#[derive(Clone, Copy)]
struct Timing {
    median: f64,
    min: f64,
    max: f64,
}

impl std::fmt::Display for Timing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.3} s ({:.3}–{:.3})", self.median, self.min, self.max)
    }
}

/// One figure: erel beside a peer or floor, with the target ratio when the issue sets
/// one.
struct Row {
    figure: String,
    erel: Timing,
    peer: String,
    peer_timing: Option<Timing>,
    target: Option<f64>,
}

impl Row {
    fn ratio(&self) -> Option<f64> {
        self.peer_timing.map(|p| self.erel.median / p.median)
    }
}

fn print_table(rows: &[Row]) {
    println!();
    println!("| figure | erel median (min–max) | peer or floor | its median (min–max) | ratio | target |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for row in rows {
        let (peer_time, ratio) = match (row.peer_timing, row.ratio()) {
            (Some(timing), Some(ratio)) => (timing.to_string(), format!("{ratio:.2}")),
            _ => ("not measured".to_string(), "–".to_string()),
        };
        let target = match (row.target, row.ratio()) {
            (Some(target), Some(ratio)) => format!(
                "≤ {target:.2}: {}",
                if ratio <= target { "met" } else { "NOT met" }
            ),
            (Some(target), None) => format!("≤ {target:.2}"),
            (None, _) => String::new(),
        };
        println!(
            "| {} | {} | {} | {peer_time} | {ratio} | {target} |",
            row.figure, row.erel, row.peer
        );
    }
    std::io::stdout().flush().expect("stdout");
}

/// Push: `erel push` of a file of each size against `scp` to the loopback sshd, and
/// against the floor, `openssl dgst -sha256` of the same file (the agent must hash every
/// byte it receives).
fn push(bench: &Bench, rows: &mut Vec<Row>) {
    for &mib in &bench.sizes_mib {
        let file = bench.scratch(&format!("{mib}m.bin"));
        make_file(&file, mib * MIB);
        let file_arg = file.display().to_string();
        let dest = format!("bench/{mib}m.bin");
        // The headline figure hashes on both sides, as a first push does; with the digest
        // cache warm (the same release pushed again, to another host say) only the agent
        // hashes.
        let push = bench.erel(&["push", &bench.host(), &file_arg, &dest]);
        let clear = format!("rm -f {}", bench.on_agent(&dest));
        let agent_before = agent_cpu(bench);
        let (erel, master_cpu) = bench.time_and_cpu(
            &format!("erel push {mib} MiB"),
            &format!("{clear} && {}", bench.forget_digests()),
            &push,
        );
        // hyperfine's warm-up run is one more push.
        let agent_per_push = (agent_cpu(bench) - agent_before) / f64::from(bench.runs + 1);
        settle(&file);
        let warm = bench.time(
            &format!("erel push {mib} MiB, digest cached"),
            &clear,
            &push,
        );
        let figure = format!("push {mib} MiB");
        if let Some(scp) = bench.ssh("scp") {
            let target = bench.scratch("scp-target.bin");
            let target = quote(&target.display().to_string());
            let timing = bench.time(
                &format!("scp {mib} MiB"),
                &format!("rm -f {target}"),
                &format!("{scp} {} bench:{target}", quote(&file_arg)),
            );
            let _ = std::fs::remove_file(bench.scratch("scp-target.bin"));
            rows.push(Row {
                figure: figure.clone(),
                erel,
                peer: "`scp` to loopback sshd".into(),
                peer_timing: Some(timing),
                target: Some(0.33),
            });
        } else {
            rows.push(Row {
                figure: figure.clone(),
                erel,
                peer: "`scp` (no sshd: run scripts/bench.sh)".into(),
                peer_timing: None,
                target: Some(0.33),
            });
        }
        let floor = bench.time(
            &format!("openssl dgst -sha256 {mib} MiB"),
            "",
            &format!("openssl dgst -sha256 {} >/dev/null", quote(&file_arg)),
        );
        rows.push(Row {
            figure: figure.clone(),
            erel,
            peer: "floor: `openssl dgst -sha256`".into(),
            peer_timing: Some(floor),
            target: Some(1.5),
        });
        // What the disk allows: the same bytes written and synced, as the agent does.
        let copy = bench.scratch("dd-target.bin");
        let copy = quote(&copy.display().to_string());
        let disk = bench.time(
            &format!("dd conv=fsync {mib} MiB"),
            &format!("rm -f {copy}"),
            &format!(
                "dd if={} of={copy} bs=1M conv=fsync status=none",
                quote(&file_arg)
            ),
        );
        let _ = std::fs::remove_file(bench.scratch("dd-target.bin"));
        rows.push(Row {
            figure: figure.clone(),
            erel,
            peer: "disk: `dd conv=fsync` (write + fsync)".into(),
            peer_timing: Some(disk),
            target: None,
        });
        // Both ends share this machine's cores: the least wall time their CPU work
        // allows, were it spread perfectly over the cores, beside the floor.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let least = (master_cpu + agent_per_push) / cores;
        rows.push(Row {
            figure: format!(
                "{figure}: CPU time of both ends (master {master_cpu:.2} s + agent \
                 {agent_per_push:.2} s, user + sys) ÷ {cores} cores"
            ),
            erel: Timing {
                median: least,
                min: least,
                max: least,
            },
            peer: "floor: `openssl dgst -sha256`".into(),
            peer_timing: Some(floor),
            target: None,
        });
        rows.push(Row {
            figure: format!("{figure}, digest cached by `erel`"),
            erel: warm,
            peer: "floor: `openssl dgst -sha256`".into(),
            peer_timing: Some(floor),
            target: Some(1.5),
        });
        let _ = std::fs::remove_file(&file);
        let _ = std::fs::remove_file(bench.agent.root.join(&dest));
    }
}

/// Waits until `file` has not changed for the digest cache's [`RACY_WINDOW`]. Until
/// then the cache does not trust what it recorded (a change within the window can leave
/// the same timestamps) and a push hashes the file again before it sends it: the "digest
/// cached" figure is of a file built a while before it is pushed again.
fn settle(file: &std::path::Path) {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(file).expect("the pushed file");
    let changed = std::time::UNIX_EPOCH
        + std::time::Duration::new(
            u64::try_from(meta.ctime()).expect("ctime after 1970"),
            u32::try_from(meta.ctime_nsec()).expect("nanoseconds"),
        );
    // A margin for the clock's granularity.
    let settled = changed + RACY_WINDOW + std::time::Duration::from_millis(100);
    if let Ok(left) = settled.duration_since(std::time::SystemTime::now()) {
        std::thread::sleep(left);
    }
}

/// Push + unpack: `erel push` then `erel unpack` of a release archive, against local
/// `tar xzf` of the same file and `ssh host 'tar xzf -'`; and the unpack alone (the
/// archive already on the agent) against local `tar xzf`.
fn push_and_unpack(bench: &Bench, rows: &mut Vec<Row>) {
    let Some(archive) = &bench.archive else {
        println!("skipped: push + unpack (no EREL_BENCH_ARCHIVE; scripts/bench.sh builds one)");
        return;
    };
    let size = std::fs::metadata(archive)
        .unwrap_or_else(|e| panic!("EREL_BENCH_ARCHIVE {}: {e}", archive.display()))
        .len();
    let archive_arg = archive.display().to_string();
    let figure = format!("push + unpack {:.1} MB .tar.gz", size as f64 / 1e6);
    let (on_agent, dest) = ("archives/bench.tar.gz", "releases/bench");
    let clear = format!(
        "rm -f {} && {}",
        bench.on_agent(on_agent),
        bench.set_aside(&bench.on_agent(dest))
    );
    let erel = bench.time(
        "erel push + unpack",
        &format!("{clear} && {}", bench.forget_digests()),
        &format!(
            "{} && {}",
            bench.erel(&["push", &bench.host(), &archive_arg, on_agent]),
            bench.erel(&["unpack", &bench.host(), on_agent, dest])
        ),
    );
    let untar = bench.scratch("untar");
    let untar = quote(&untar.display().to_string());
    let local_tar = bench.time(
        "tar xzf",
        &format!("{} && mkdir {untar}", bench.set_aside(&untar)),
        &format!("tar xzf {} -C {untar}", quote(&archive_arg)),
    );
    rows.push(Row {
        figure: figure.clone(),
        erel,
        peer: "local `tar xzf`".into(),
        peer_timing: Some(local_tar),
        target: Some(0.8),
    });
    let ssh_tar = bench.ssh("ssh").map(|ssh| {
        bench.time(
            "ssh tar xzf -",
            &bench.set_aside(&untar),
            &format!(
                "{ssh} bench {} < {}",
                quote(&format!("mkdir {untar} && tar xzf - -C {untar}")),
                quote(&archive_arg)
            ),
        )
    });
    rows.push(Row {
        figure,
        erel,
        peer: "`ssh host 'tar xzf -'`".into(),
        peer_timing: ssh_tar,
        target: Some(0.6),
    });
    // The unpack alone, the archive already pushed: where push + unpack spends its time,
    // and the agent's CPU time per unpack (hyperfine's warm-up run included).
    let cpu_before = agent_cpu(bench);
    let unpack = bench.time(
        "erel unpack",
        &bench.set_aside(&bench.on_agent(dest)),
        &bench.erel(&["unpack", &bench.host(), on_agent, dest]),
    );
    println!(
        "agent CPU time per unpack (user + system): {:.2} s",
        (agent_cpu(bench) - cpu_before) / f64::from(bench.runs + 1)
    );
    rows.push(Row {
        figure: "unpack alone (archive on the agent)".into(),
        erel: unpack,
        peer: "local `tar xzf`".into(),
        peer_timing: Some(local_tar),
        target: None,
    });
    let _ = std::process::Command::new("rm")
        .args(["-rf"])
        .arg(bench.scratch("untar"))
        .arg(bench.agent.root.join(dest))
        .arg(bench.scratch(SET_ASIDE))
        .status();
}

/// The agent's CPU time so far (user + system, from `/proc/PID/stat`), in seconds.
fn agent_cpu(bench: &Bench) -> f64 {
    let pid = bench.agent.pid().expect("agent pid");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("agent's stat");
    // Fields after the command name (which may hold spaces), from field 3 on; utime and
    // stime are fields 14 and 15, in clock ticks (USER_HZ, 100 on Linux).
    let rest = &stat[stat.rfind(')').expect("stat's command name") + 2..];
    let ticks: f64 = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|t| t.parse::<f64>().expect("clock ticks"))
        .sum();
    ticks / 100.0
}

/// A word for `sh`, single-quoted.
fn quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

fn env_parse<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("{name}: '{text}' is not a number")),
        Err(_) => default,
    }
}
