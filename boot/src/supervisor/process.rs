//! Processes as the kernel sees them: `/proc` inspection, signals, stopping a set of
//! processes, and the membership of a release when there is no cgroup (the fallback).
//!
//! Liveness is always checked against the start time in `/proc/<pid>/stat`, so a pid the
//! kernel recycled is never mistaken for a release. Zombies count as gone: a zombie of a
//! process that is not ours may never be reaped (PID 1 in a container may not reap), so
//! "nothing of the release is left" means no live, non-zombie member.
//!
//! Every release is spawned as the leader of a new session (`setsid`, see [`super::spawn`]).
//! Without cgroups, its members are what [`scan_members`] finds: its session and process
//! group, every descendant of those, and every process of the release's user carrying the
//! release's environment markers (`EREL_ROOT` and `EREL_RELEASE`), which a daemon keeps
//! across `setsid` and double forks unless it clears its environment.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use erel_proto::Stopped;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::error::{Error, Result};

use super::spawn::DATA_DIR;

/// The longest wait between two looks for members while a group is being stopped, and
/// the wait between the two looks that must agree when members are found by a scan
/// (see [`Listing::Scanned`]).
const GROUP_POLL: Duration = Duration::from_millis(50);
/// The first wait between two looks for members: most releases are gone within a few
/// milliseconds of SIGTERM, so the looks begin close together and the wait doubles up
/// to [`GROUP_POLL`] (5, 10, 20, 40, 50, 50 ms …).
const FIRST_POLL: Duration = Duration::from_millis(5);
/// How long a group may take to disappear after SIGKILL before the stop is reported as
/// timed out (a process stuck in uninterruptible sleep).
const KILL_WAIT: Duration = Duration::from_secs(10);
/// Clock ticks per second in `/proc` (`USER_HZ`, 100 on every Linux ABI).
const USER_HZ: u64 = 100;

/// The outcome of a stop that found nothing running.
pub(crate) const NOTHING_RAN: Stopped = Stopped {
    was_running: false,
    killed: false,
};

/// The fields of `/proc/<pid>/stat` the supervisor uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcStat {
    /// One-letter state (`R`, `S`, `D`, `Z`, …).
    state: char,
    /// Parent process.
    pub(crate) ppid: i32,
    /// Process group.
    pub(crate) pgrp: i32,
    /// Session.
    pub(crate) session: i32,
    /// Start time in clock ticks after boot.
    pub(crate) start_time: u64,
}

impl ProcStat {
    /// True for a zombie or a dead task.
    pub(super) fn is_gone(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// Parses `/proc/<pid>/stat`; `None` when the process does not exist.
pub(crate) fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

fn parse_stat(text: &str) -> Option<ProcStat> {
    // The command name (field 2) is in parentheses and may itself hold ')' or spaces.
    let after = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // fields[0] is field 3 of the man page; field N is fields[N - 3].
    Some(ProcStat {
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        pgrp: fields.get(2)?.parse().ok()?,
        session: fields.get(3)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

/// True when `pid` is alive (not a zombie) and is the process that started at
/// `start_time`.
pub(crate) fn is_alive(pid: u32, start_time: u64) -> bool {
    proc_stat(pid).is_some_and(|s| !s.is_gone() && s.start_time == start_time)
}

/// How long ago a process with this start time started.
pub(crate) fn age(start_time: u64) -> Option<Duration> {
    let uptime = fs::read_to_string("/proc/uptime").ok()?;
    let uptime: f64 = uptime.split_whitespace().next()?.parse().ok()?;
    let started = start_time as f64 / USER_HZ as f64;
    Some(Duration::from_secs_f64((uptime - started).max(0.0)))
}

/// The pids of every process in `/proc`.
pub(crate) fn all_pids() -> Vec<u32> {
    let entries = fs::read_dir("/proc").into_iter().flatten().flatten();
    entries
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// The environment of a process, when readable.
pub(crate) fn environ(pid: u32) -> Option<Vec<(String, String)>> {
    let bytes = fs::read(format!("/proc/{pid}/environ")).ok()?;
    Some(
        bytes
            .split(|&b| b == 0)
            .filter_map(|entry| {
                let text = String::from_utf8_lossy(entry);
                let (key, value) = text.split_once('=')?;
                Some((key.to_string(), value.to_string()))
            })
            .collect(),
    )
}

/// Every live process whose environment holds `EREL_ROOT=<root>` and
/// `EREL_RELEASE=<name>`, run by the release's user, as (pid, start time), oldest
/// first. The agent's own process is never one.
///
/// Anyone can put the markers in the environment of their own processes; only the
/// release's user (the owner of its data directory, which the agent hands over at each
/// start), the agent's user or root can run the release. A marked process of any other
/// user is not the release: it neither keeps the release from starting nor is
/// signalled when the release stops.
pub(crate) fn marked(root: &Path, name: &str) -> Vec<(u32, u64)> {
    let owners = release_uids(root, name);
    let root = root.to_string_lossy();
    let own = std::process::id();
    let mut found: Vec<(u32, u64)> = all_pids()
        .into_iter()
        .filter(|&pid| pid != own && pid > 1)
        .filter_map(|pid| {
            let stat = proc_stat(pid).filter(|s| !s.is_gone())?;
            if !real_uid(pid).is_some_and(|uid| owners.contains(&uid)) {
                return None;
            }
            let env = environ(pid)?;
            let has = |key: &str, value: &str| env.iter().any(|(k, v)| k == key && v == value);
            (has("EREL_ROOT", &root) && has("EREL_RELEASE", name)).then_some((pid, stat.start_time))
        })
        .collect();
    found.sort_by_key(|&(pid, start_time)| (start_time, pid));
    found
}

/// The users that may run release `name` under `root`: root, the agent's user and the
/// owner of the release's data directory (its user since the last start).
fn release_uids(root: &Path, name: &str) -> [u32; 3] {
    let data_owner = fs::symlink_metadata(root.join(DATA_DIR).join(name))
        .ok()
        .filter(|meta| meta.is_dir())
        .map_or(0, |meta| meta.uid());
    [0, nix::unistd::getuid().as_raw(), data_owner]
}

/// The real uid of a process, from the `Uid:` line of `/proc/<pid>/status` (the owner of
/// `/proc/<pid>` is not it: a process that is not dumpable shows as root's there).
fn real_uid(pid: u32) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The members of a release without cgroups: every live process in the session or
/// process group of `anchor` (the pid and start time the release was spawned with),
/// every process carrying the release's markers, and every descendant of those. The
/// agent itself, its process group and PID 1 are never members. When the anchor's pid
/// now belongs to another process (recycled), its session and group are not used.
pub(crate) fn scan_members(anchor: Option<(u32, u64)>, root: &Path, name: &str) -> Vec<u32> {
    let own = std::process::id();
    let own_group = nix::unistd::getpgrp().as_raw();
    let anchor = anchor
        .filter(|&(pid, start_time)| proc_stat(pid).is_none_or(|s| s.start_time == start_time))
        .and_then(|(pid, _)| i32::try_from(pid).ok())
        .filter(|&a| a > 1);
    let stats: BTreeMap<u32, ProcStat> = all_pids()
        .into_iter()
        .filter(|&pid| pid > 1 && pid != own)
        .filter_map(|pid| Some((pid, proc_stat(pid)?)))
        .filter(|(_, s)| !s.is_gone() && s.pgrp != own_group)
        .collect();
    let mut members: BTreeSet<u32> = marked(root, name)
        .into_iter()
        .map(|(pid, _)| pid)
        .filter(|pid| stats.contains_key(pid))
        .collect();
    if let Some(anchor) = anchor {
        members.extend(
            stats
                .iter()
                .filter(|(_, s)| s.session == anchor || s.pgrp == anchor)
                .map(|(&pid, _)| pid),
        );
    }
    // Descendants, parent by parent.
    let mut todo: Vec<u32> = members.iter().copied().collect();
    while let Some(parent) = todo.pop() {
        for (&pid, stat) in &stats {
            if u32::try_from(stat.ppid) == Ok(parent) && members.insert(pid) {
                todo.push(pid);
            }
        }
    }
    members.into_iter().collect()
}

/// Sends `signal` to each pid; one that is already gone is fine. PID 1, the agent and
/// its process group are never signalled.
pub(crate) fn signal_each(pids: &[u32], signal: Signal) {
    let own = std::process::id();
    let own_group = nix::unistd::getpgrp().as_raw();
    for raw in pids.iter().filter_map(|&pid| i32::try_from(pid).ok()) {
        if raw > 1 && raw as u32 != own && raw != own_group {
            let _ = kill(Pid::from_raw(raw), signal);
        }
    }
}

/// How a list of members is known, which says whether one empty look proves that
/// nothing is left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Listing {
    /// The kernel's own list (a cgroup's `cgroup.procs`: a child is in it from its fork,
    /// before its parent can exit), or known pids checked against their start times: one
    /// empty look is final.
    Exact,
    /// Found partly by their environment ([`scan_members`]), which reads as empty for a
    /// moment while a process execs (`/proc/<pid>/environ` before the new image's
    /// environment is laid out): empty counts only when two looks [`GROUP_POLL`] apart
    /// agree.
    Scanned,
}

/// Polls until `members` is empty or `limit` passes; true when empty. The looks begin
/// [`FIRST_POLL`] apart and back off to [`GROUP_POLL`]; `listing` says whether one empty
/// look is enough.
pub(crate) async fn wait_empty(
    members: &impl Fn() -> Vec<u32>,
    listing: Listing,
    limit: Duration,
) -> bool {
    let deadline = Instant::now() + limit;
    let mut pause = FIRST_POLL;
    loop {
        if members().is_empty() {
            if listing == Listing::Exact {
                return true;
            }
            tokio::time::sleep(GROUP_POLL).await;
            if members().is_empty() {
                return true;
            }
            continue;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(GROUP_POLL);
    }
}

/// SIGKILL to each of `pids` (see [`signal_each`]).
pub(crate) fn kill_each(pids: &[u32]) -> Result<()> {
    signal_each(pids, Signal::SIGKILL);
    Ok(())
}

/// Stops everything `members` lists: SIGTERM to each member, up to `grace` for all of
/// them to be gone, then `kill` of what is left (repeated while waiting, for what forked
/// meanwhile) and up to [`KILL_WAIT`] for nothing to be left; `listing` says how
/// `members` knows them ([`wait_empty`]). Succeeds only when nothing is left; `what`
/// names the release in the error.
pub(crate) async fn stop_members(
    what: &str,
    members: impl Fn() -> Vec<u32>,
    listing: Listing,
    kill: impl Fn(&[u32]) -> Result<()>,
    grace: Duration,
) -> Result<Stopped> {
    let first = members();
    if first.is_empty() {
        return Ok(NOTHING_RAN);
    }
    let stopped = |killed| {
        Ok(Stopped {
            was_running: true,
            killed,
        })
    };
    signal_each(&first, Signal::SIGTERM);
    if wait_empty(&members, listing, grace).await {
        return stopped(false);
    }
    let deadline = Instant::now() + KILL_WAIT;
    loop {
        kill(&members())?;
        if wait_empty(&members, listing, GROUP_POLL * 4).await {
            return stopped(true);
        }
        if Instant::now() >= deadline {
            let left = members();
            return Err(Error::Timeout(format!(
                "waiting for {what} to end: {} processes (pids {left:?}) still alive {}s after SIGKILL",
                left.len(),
                KILL_WAIT.as_secs()
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing_survives_odd_command_names() {
        let line = "1234 (we ird) (x) S 1 1234 1234 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 98765 1000 100 18446744073709551615";
        let stat = parse_stat(line).expect("parse");
        assert_eq!(
            stat,
            ProcStat {
                state: 'S',
                ppid: 1,
                pgrp: 1234,
                session: 1234,
                start_time: 98765
            }
        );
        let own = proc_stat(std::process::id()).expect("own stat");
        assert!(!own.is_gone());
        assert!(is_alive(std::process::id(), own.start_time));
        assert!(!is_alive(std::process::id(), own.start_time + 1));
    }

    #[test]
    fn never_signals_the_agent_or_pid_1() {
        // Were any of these signalled, this test process would die of SIGTERM.
        let own = std::process::id();
        let group = u32::try_from(nix::unistd::getpgrp().as_raw()).expect("pgrp");
        signal_each(&[own, group, 1, 0], Signal::SIGTERM);
        assert!(proc_stat(own).is_some_and(|s| !s.is_gone()));
    }
}
