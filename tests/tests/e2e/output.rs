//! Release output never fills the disk: real agents on a small tmpfs root, releases that
//! write as fast as they can, the log's cap checked at every sample, the tail `Ping`
//! reports after a crash, and a push that still fits afterwards.
//!
//! These tests mount a tmpfs and so need root. Without it they say so on stderr and do
//! nothing; with it they always run.

use std::path::Path;
use std::time::{Duration, Instant};

use erel_master::AgentClient;
use erel_proto::{ReleaseState, ReleaseStatus, OUTPUT_TAIL_MAX};

use crate::helper::install::{install_and_start, no_progress, release_status, with_digest};
use crate::helper::release::shell_release;
use crate::helper::tmpfs::{can_mount, Tmpfs};
use crate::helper::AgentCommands;
use crate::helper::{pki_and_agent, poll_until, wait_until, AgentProc, Pki};

/// The cap the agents here run with (the default, said explicitly).
const CAP: u64 = 4 << 20;
/// How long the flood runs, as in the issue.
const FLOOD: Duration = Duration::from_secs(30);
/// How often free space and log sizes are sampled during the flood.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);
/// Disk the agent's own state may take besides the logs (records, lock, the tarballs).
const STATE_SLACK: u64 = 1 << 20;
/// Bounded waits for agent-side reactions (restart backoff, exits) on a busy machine.
const PATIENCE: Duration = Duration::from_secs(30);

/// Bytes in the release's two log files.
fn log_bytes(root: &Path, name: &str) -> (u64, u64) {
    let logs = root.join(".erel").join("logs");
    let size = |file: String| {
        std::fs::metadata(logs.join(file))
            .map(|m| m.len())
            .unwrap_or(0)
    };
    (size(format!("{name}.log")), size(format!("{name}.log.1")))
}

/// Pushes, unpacks and starts a shell release `name` 1 running `script`.
async fn run_release(client: &mut AgentClient, work: &Path, name: &str, script: &str) {
    let tarball = shell_release(work, name, "1", script);
    install_and_start(client, &tarball, name, "1", Vec::new()).await;
}

/// Polls (bounded by `limit`) until `name` is crash-looping; its status then.
async fn crash_looping(
    pki: &Pki,
    agent: &AgentProc,
    name: &str,
    limit: Duration,
) -> Option<ReleaseStatus> {
    poll_until(limit, || async move {
        release_status(pki, agent, name)
            .await
            .filter(|found| found.state == ReleaseState::CrashLooping)
    })
    .await
}

/// Bytes a process wrote so far (`wchar` in `/proc/<pid>/io`, see proc(5)).
fn bytes_written(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                l.strip_prefix("wchar: ")
                    .and_then(|n| n.trim().parse().ok())
            })
        })
        .unwrap_or(0)
}

fn agent_flags(cap: u64) -> Vec<String> {
    vec![
        "--log-max-bytes".into(),
        cap.to_string(),
        // The tmpfs is small: let pushes use it.
        "--disk-reserve-bytes".into(),
        (1u64 << 20).to_string(),
        // One crash, after however long a run, leaves the release stopped, so its tail
        // stays on show.
        "--crash-loop-after".into(),
        "1".into(),
        "--stable-after-ms".into(),
        "3600000".into(),
    ]
}

/// A tmpfs of `size`, a PKI and agent `id` on the tmpfs with [`agent_flags`] for
/// [`CAP`]; `None` when the test cannot mount. (Bound in this order, they are dropped
/// agent first, tmpfs last.)
fn agent_on_tmpfs(size: &str, id: &str) -> Option<(Tmpfs, Pki, AgentProc)> {
    if !can_mount() {
        return None;
    }
    let tmpfs = Tmpfs::mount(size);
    let pki = Pki::new();
    let flags = agent_flags(CAP);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let agent = AgentProc::start_on_root(&pki, id, &tmpfs.path, &flags);
    Some((tmpfs, pki, agent))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn yes_for_30_seconds_never_fills_a_small_root() {
    let Some((tmpfs, pki, agent)) = agent_on_tmpfs("64m", "out-1") else {
        return;
    };
    let work = tempfile::tempdir().expect("tempdir");
    let (total, free_before) = tmpfs.space();
    let used_before = total - free_before;

    let mut client = pki.connect(&agent).await;
    // The input: `exec yes`.
    run_release(
        &mut client,
        work.path(),
        "flood",
        "#!/bin/sh\nexec yes erel-flood-line\n",
    )
    .await;
    // Its siblings, one release: stderr as well as stdout, a background child, and a
    // child that left the session (setsid) but kept the output.
    run_release(
        &mut client,
        work.path(),
        "siblings",
        "#!/bin/sh\nyes erel-stderr-line >&2 &\nsetsid yes erel-daemon-line &\nexec yes erel-stdout-line\n",
    )
    .await;
    let flood_pid = agent.release_pids("flood");
    assert_eq!(flood_pid.len(), 1, "one flood process: {flood_pid:?}");
    let flood_pid = flood_pid[0];

    let started = Instant::now();
    let mut samples = 0u32;
    let mut peak_used = 0u64;
    let mut peak_log = 0u64;
    while started.elapsed() < FLOOD {
        let (_, free) = tmpfs.space();
        let used = total - free;
        peak_used = peak_used.max(used);
        for name in ["flood", "siblings"] {
            let (now, old) = log_bytes(&tmpfs.path, name);
            peak_log = peak_log.max(now + old);
            assert!(
                now <= CAP / 2 && old <= CAP / 2,
                "{name}: {now} + {old} bytes after {:?}, cap {CAP} (each file at most half)",
                started.elapsed()
            );
        }
        assert!(
            used <= used_before + 2 * CAP + STATE_SLACK,
            "{used} bytes used after {:?}, {used_before} before the releases; two logs of {CAP} may take {} more",
            started.elapsed(),
            2 * CAP
        );
        samples += 1;
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    let flooded = bytes_written(flood_pid);
    eprintln!(
        "{samples} samples; `yes` wrote {flooded} bytes in {FLOOD:?}; peak log {peak_log} bytes, peak use {peak_used} bytes of {total}"
    );
    assert!(
        flooded > total,
        "the flood wrote {flooded} bytes, more than the whole root ({total}): without the cap it would have filled it"
    );
    assert!(
        peak_log > CAP / 2,
        "the logs did fill up to the cap: {peak_log}"
    );
    let flood = release_status(&pki, &agent, "flood")
        .await
        .expect("flood status");
    assert_eq!(
        flood.state,
        ReleaseState::Running,
        "the flood never stopped"
    );
    assert_eq!(flood.pid, Some(flood_pid as u32), "nor restarted");

    // Every writer of the siblings wrote far more than the cap into the one log.
    let siblings = agent.release_pids("siblings");
    let written: Vec<u64> = siblings.iter().map(|&pid| bytes_written(pid)).collect();
    assert!(
        siblings.len() == 3 && written.iter().all(|&n| n > 2 * CAP),
        "three writers, each far over the cap: {siblings:?} wrote {written:?}"
    );

    // Kill the release: its tail survives, as Ping reports it.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(flood_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the flood");
    let crashed = crash_looping(&pki, &agent, "flood", PATIENCE)
        .await
        .unwrap_or_else(|| panic!("the killed release is left stopped\n{}", agent.log()));
    let tail = crashed.output_tail;
    assert!(
        tail.len() >= OUTPUT_TAIL_MAX - "erel-flood-line\n".len(),
        "a full tail: {} bytes",
        tail.len()
    );
    // Whole lines, but for the first (the tail starts anywhere) and perhaps the last (the
    // kill may have cut a write short).
    let lines: Vec<&str> = tail.lines().collect();
    let (last, middle) = lines[1..].split_last().expect("lines");
    assert!(
        middle.iter().all(|l| *l == "erel-flood-line") && "erel-flood-line".starts_with(last),
        "the tail is the release's output: {tail:?}"
    );

    // The next push is not refused for lack of space.
    let big = work.path().join("big.bin");
    std::fs::write(&big, vec![7u8; 8 << 20]).expect("write big");
    let mut client = pki.connect(&agent).await;
    client
        .write_file(
            &with_digest(&big),
            "archives/big.bin",
            0o644,
            &mut no_progress(),
        )
        .await
        .expect("an 8 MiB push fits beside two capped logs");

    let stopped = client
        .stop("siblings", Duration::from_secs(2))
        .await
        .expect("stop");
    assert!(stopped.was_running);
    let (now, old) = log_bytes(&tmpfs.path, "siblings");
    assert!(now <= CAP / 2 && old <= CAP / 2, "{now} + {old}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nearly_full_root_keeps_the_newest_output_and_the_last_words() {
    let Some((tmpfs, pki, agent)) = agent_on_tmpfs("32m", "out-2") else {
        return;
    };
    let mut client = pki.connect(&agent).await;
    let work = tempfile::tempdir().expect("tempdir");
    // 3 MB of numbered lines, then last words and a crash. The release is written so
    // it only starts writing once the disk is full (it waits for a file the test makes).
    let script = "#!/bin/sh\n\
        while [ ! -e \"$EREL_ROOT/go\" ]; do sleep 0.05; done\n\
        i=0\n\
        while [ $i -lt 30000 ]; do echo \"line $i ................................................................................\"; i=$((i+1)); done\n\
        echo last-words\n\
        exit 3\n";
    run_release(&mut client, work.path(), "full", script).await;

    // Fill the disk, leaving 512 KiB: less than the release will write, less than the cap.
    let (_, free) = tmpfs.space();
    let ballast = free.saturating_sub(512 << 10);
    std::fs::write(tmpfs.path.join("ballast"), vec![0u8; ballast as usize]).expect("ballast");
    std::fs::write(tmpfs.path.join("go"), b"").expect("go");

    let crashed = crash_looping(&pki, &agent, "full", Duration::from_secs(120))
        .await
        .unwrap_or_else(|| {
            panic!(
                "the release wrote everything and ended (it was never blocked nor killed)\n{}",
                agent.log()
            )
        });
    assert!(
        crashed.output_tail.ends_with("line 29999 ................................................................................\nlast-words\n"),
        "the last words survive a full disk: {:?}",
        crashed.output_tail
    );
    let (now, old) = log_bytes(&tmpfs.path, "full");
    assert!(now <= CAP / 2 && old <= CAP / 2, "{now} + {old}");
    assert!(
        agent.log().contains("no space left"),
        "the writer said why output was cut\n{}",
        agent.log()
    );
}

/// Live processes whose command line names `needle` (the output writer names its log).
fn processes_naming(needle: &Path) -> Vec<i32> {
    let needle = needle.to_string_lossy().into_owned();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(true);
        if !zombie
            && cmdline
                .split(|b| *b == 0)
                .any(|arg| arg == needle.as_bytes())
        {
            pids.push(pid);
        }
    }
    pids
}

fn ticks(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches("tick-")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_keeps_flowing_while_the_agent_is_down_and_the_writer_ends_with_the_release() {
    let (pki, mut agent) = pki_and_agent("out-3", &[]);
    let work = tempfile::tempdir().expect("tempdir");
    let mut client = pki.connect(&agent).await;
    run_release(
        &mut client,
        work.path(),
        "ticker",
        "#!/bin/sh\ni=0\nwhile :; do echo tick-$i; i=$((i+1)); sleep 0.05; done\n",
    )
    .await;
    let log = agent.root.join(".erel/logs/ticker.log");
    assert!(
        wait_until(PATIENCE, || async { ticks(&log) > 3 }).await,
        "the release logs\n{}",
        agent.log()
    );
    let pid = release_status(&pki, &agent, "ticker")
        .await
        .and_then(|s| s.pid)
        .expect("pid");
    assert_eq!(processes_naming(&log).len(), 1, "one output writer");

    // The agent goes away: the release and its writer do not notice.
    agent.kill9();
    let before = ticks(&log);
    assert!(
        wait_until(PATIENCE, || async { ticks(&log) > before + 10 }).await,
        "output is still written while the agent is down ({} ticks)",
        ticks(&log)
    );
    agent.restart();
    let adopted = release_status(&pki, &agent, "ticker")
        .await
        .expect("status");
    assert_eq!(
        (adopted.state, adopted.pid),
        (ReleaseState::Running, Some(pid)),
        "the same process, adopted"
    );
    let before = ticks(&log);
    assert!(
        wait_until(PATIENCE, || async { ticks(&log) > before + 10 }).await,
        "and still written after"
    );
    assert_eq!(processes_naming(&log).len(), 1, "still one output writer");

    let mut client = pki.connect(&agent).await;
    let stopped = client
        .stop("ticker", Duration::from_secs(5))
        .await
        .expect("stop");
    assert!(stopped.was_running && !stopped.killed, "{stopped:?}");
    assert!(
        processes_naming(&log).is_empty(),
        "the output writer ended with the release"
    );
    assert!(agent.release_pids("ticker").is_empty());
}
