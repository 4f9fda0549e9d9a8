//! Processes as the kernel sees them: `/proc` inspection, spawning as a user, and the
//! membership of a release when there is no cgroup (the fallback).
//!
//! Liveness is always checked against the start time in `/proc/<pid>/stat`, so a pid the
//! kernel recycled is never mistaken for a release. Zombies count as gone: a zombie of a
//! process that is not ours may never be reaped (PID 1 in a container may not reap), so
//! "nothing of the release is left" means no live, non-zombie member.
//!
//! Every release is spawned as the leader of a new session (`setsid`). Without cgroups,
//! its members are what [`scan_members`] finds: its session and process group, every
//! descendant of those, and every process of the release's user carrying the release's
//! environment markers (`EREL_ROOT` and `EREL_RELEASE`), which a daemon keeps across
//! `setsid` and double forks unless it clears its environment.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt as _;
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use erel_proto::text::quote;
use nix::sys::signal::{kill, Signal};
use nix::unistd::{Gid, Pid, Uid, User};
use tokio::process::{Child, Command};

use crate::error::{Error, Result};
use crate::fs::Root;
use crate::settings::Supervision;

use super::log;
use super::record::Desired;

/// How often a group is checked for members while it is being stopped.
const GROUP_POLL: Duration = Duration::from_millis(50);
/// How long a group may take to disappear after SIGKILL before the stop is reported as
/// timed out (a process stuck in uninterruptible sleep).
const KILL_WAIT: Duration = Duration::from_secs(10);
/// Clock ticks per second in `/proc` (`USER_HZ`, 100 on every Linux ABI).
const USER_HZ: u64 = 100;
/// `PATH` given to every release.
const BASE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Longest user name a `Start` may name, in bytes: `LOGIN_NAME_MAX` (256, see
/// `sysconf(3)`) less its terminating NUL.
const MAX_USER_LEN: usize = 255;
/// Variables the agent always sets itself; a `Start` request cannot override them.
const EREL_VARS: [&str; 5] = [
    "EREL_HOST_ID",
    "EREL_RELEASE",
    "EREL_VERSION",
    "EREL_ROOT",
    "EREL_DATA",
];
/// Deepest level below a release's data directory handed over to a new user.
const HAND_OVER_DEPTH: usize = 64;
/// The directory under the root where each release may write: `data/<name>/`.
pub(crate) const DATA_DIR: &str = "data";

/// The fields of `/proc/<pid>/stat` the supervisor uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcStat {
    /// One-letter state (`R`, `S`, `D`, `Z`, …).
    pub state: char,
    /// Parent process.
    pub ppid: i32,
    /// Process group.
    pub pgrp: i32,
    /// Session.
    pub session: i32,
    /// Start time in clock ticks after boot.
    pub start_time: u64,
}

impl ProcStat {
    /// True for a zombie or a dead task.
    pub fn is_gone(&self) -> bool {
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
fn all_pids() -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .collect()
}

/// Live (non-zombie) members of process group `pgid`.
#[cfg(test)]
pub(crate) fn group_members(pgid: i32) -> Vec<u32> {
    all_pids()
        .into_iter()
        .filter(|&pid| proc_stat(pid).is_some_and(|s| s.pgrp == pgid && !s.is_gone()))
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

/// A live process carrying the environment markers of a release under this root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Marked {
    /// Its pid.
    pub pid: u32,
    /// Its start time.
    pub start_time: u64,
    /// Version (`EREL_VERSION`), when it still has one.
    pub version: Option<String>,
}

/// Every live process whose environment holds `EREL_ROOT=<root>` and
/// `EREL_RELEASE=<name>`, run by the release's user, oldest first. The agent's own
/// process is never one.
///
/// Anyone can put the markers in the environment of their own processes; only the
/// release's user (the owner of its data directory, which the agent hands over at each
/// start), the agent's user or root can run the release. A marked process of any other
/// user is not the release: it neither keeps the release from starting nor is
/// signalled when the release stops.
pub(crate) fn marked(root: &Path, name: &str) -> Vec<Marked> {
    let owners = release_uids(root, name);
    let root = root.to_string_lossy();
    let own = std::process::id();
    let mut found: Vec<Marked> = all_pids()
        .into_iter()
        .filter(|&pid| pid != own && pid > 1)
        .filter_map(|pid| {
            let stat = proc_stat(pid).filter(|s| !s.is_gone())?;
            if !real_uid(pid).is_some_and(|uid| owners.contains(&uid)) {
                return None;
            }
            let env = environ(pid)?;
            let get = |key: &str| env.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
            if get("EREL_ROOT").as_deref() != Some(&*root)
                || get("EREL_RELEASE").as_deref() != Some(name)
            {
                return None;
            }
            Some(Marked {
                pid,
                start_time: stat.start_time,
                version: get("EREL_VERSION"),
            })
        })
        .collect();
    found.sort_by_key(|m| (m.start_time, m.pid));
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
        .map(|m| m.pid)
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
    // Descendants, to a fixed point (a child may be listed before its parent).
    loop {
        let before = members.len();
        let children: Vec<u32> = stats
            .iter()
            .filter(|(pid, s)| {
                !members.contains(pid)
                    && u32::try_from(s.ppid).is_ok_and(|parent| members.contains(&parent))
            })
            .map(|(&pid, _)| pid)
            .collect();
        members.extend(children);
        if members.len() == before {
            break;
        }
    }
    members.into_iter().collect()
}

/// Sends `signal` to each pid; one that is already gone is fine. PID 1, the agent and
/// its process group are never signalled.
pub(crate) fn signal_each(pids: &[u32], signal: Signal) {
    let own = std::process::id();
    let own_group = nix::unistd::getpgrp().as_raw();
    for &pid in pids {
        let Ok(raw) = i32::try_from(pid) else {
            continue;
        };
        if raw <= 1 || pid == own || raw == own_group {
            continue;
        }
        let _ = kill(Pid::from_raw(raw), signal);
    }
}

/// The outcome of stopping a release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GroupStop {
    /// Something of the release was alive.
    pub was_running: bool,
    /// It had to be killed after the grace.
    pub killed: bool,
}

/// Polls until `members` is empty or `limit` passes; true when empty.
///
/// Empty counts only when two scans [`GROUP_POLL`] apart agree: without cgroups members
/// are found partly by their environment, which reads as empty for a moment while a
/// process execs (`/proc/<pid>/environ` before the new image's environment is laid out),
/// so one scan can miss a member that is still there.
pub(crate) async fn wait_empty(members: &impl Fn() -> Vec<u32>, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if members().is_empty() {
            tokio::time::sleep(GROUP_POLL).await;
            if members().is_empty() {
                return true;
            }
            continue;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(GROUP_POLL).await;
    }
}

/// Stops everything `members` lists: SIGTERM to each member, up to `grace` for all of
/// them to be gone, then `kill` (repeated while waiting, for what forked meanwhile) and
/// up to [`KILL_WAIT`] for nothing to be left. Succeeds only when nothing is left;
/// `what` names the release in the error.
pub(crate) async fn stop_members(
    what: &str,
    members: impl Fn() -> Vec<u32>,
    kill_all: impl Fn() -> Result<()>,
    grace: Duration,
) -> Result<GroupStop> {
    let first = members();
    if first.is_empty() {
        return Ok(GroupStop {
            was_running: false,
            killed: false,
        });
    }
    signal_each(&first, Signal::SIGTERM);
    if wait_empty(&members, grace).await {
        return Ok(GroupStop {
            was_running: true,
            killed: false,
        });
    }
    let deadline = Instant::now() + KILL_WAIT;
    loop {
        kill_all()?;
        if wait_empty(&members, GROUP_POLL * 4).await {
            return Ok(GroupStop {
                was_running: true,
                killed: true,
            });
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

/// A release process just spawned by the agent.
#[derive(Debug)]
pub(crate) struct Spawned {
    /// The child, to be waited for (and so reaped) by its supervision task.
    pub child: Child,
    /// Its pid, also its process group.
    pub pid: u32,
    /// Its start time from `/proc`.
    pub start_time: u64,
    /// Its output writer (pid, start time), outside the release.
    pub writer: (u32, u64),
}

/// Who a release runs as.
#[derive(Debug, Clone)]
struct RunAs {
    uid: Uid,
    gid: Gid,
    groups: Vec<Gid>,
    name: String,
    home: PathBuf,
}

fn spawn_failed(desired: &Desired, reason: impl Into<String>) -> Error {
    Error::SpawnFailed {
        name: desired.name.clone(),
        version: desired.version.clone(),
        reason: reason.into(),
    }
}

/// Looks up the user a release should run as (a name, or a numeric uid with a passwd
/// entry).
fn lookup_user(desired: &Desired, user: &str) -> Result<RunAs> {
    if user.len() > MAX_USER_LEN {
        return Err(spawn_failed(
            desired,
            format!(
                "user name '{}' is above the limit of {MAX_USER_LEN} bytes (LOGIN_NAME_MAX)",
                quote(user)
            ),
        ));
    }
    let found = match user.parse::<u32>() {
        Ok(uid) => User::from_uid(Uid::from_raw(uid)),
        Err(_) => User::from_name(user),
    };
    let entry = match found {
        Ok(Some(entry)) => entry,
        Ok(None) => {
            return Err(spawn_failed(
                desired,
                format!("unknown user '{}'", quote(user)),
            ))
        }
        Err(e) => {
            return Err(spawn_failed(
                desired,
                format!("cannot look up user '{}': {e}", quote(user)),
            ))
        }
    };
    let groups = CString::new(entry.name.clone())
        .ok()
        .and_then(|name| nix::unistd::getgrouplist(&name, entry.gid).ok())
        .unwrap_or_else(|| vec![entry.gid]);
    Ok(RunAs {
        uid: entry.uid,
        gid: entry.gid,
        groups,
        name: entry.name,
        home: entry.dir,
    })
}

/// Checks `argv[0]` and returns the program's full path: relative to the version
/// directory, no `..`, an executable regular file that stays inside the version directory.
fn resolve_program(root: &Root, desired: &Desired) -> Result<PathBuf> {
    let version_dir = root.version_dir(&desired.name, &desired.version)?;
    let program = desired
        .argv
        .first()
        .ok_or_else(|| spawn_failed(desired, "empty argv"))?;
    crate::fs::check_lengths(program)?;
    let relative = Path::new(program);
    if relative.is_absolute() || program.is_empty() {
        return Err(Error::invalid_path(
            program,
            "the program must be relative to the version directory",
        ));
    }
    if relative
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(Error::invalid_path(program, "contains '..'"));
    }
    let shown = format!("releases/{}/{}/{}", desired.name, desired.version, program);
    let full = version_dir.join(relative);
    let real = fs::canonicalize(&full).map_err(|_| Error::NotFound {
        what: "program",
        path: shown.clone(),
    })?;
    let real_dir =
        fs::canonicalize(&version_dir).map_err(|e| Error::io("resolve", &version_dir, e))?;
    if !real.starts_with(&real_dir) {
        return Err(Error::invalid_path(
            program,
            "resolves outside the version directory",
        ));
    }
    let meta = fs::metadata(&real).map_err(|e| Error::io("inspect", &real, e))?;
    if !meta.is_file() {
        return Err(spawn_failed(
            desired,
            format!("{shown} is not a regular file"),
        ));
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(spawn_failed(desired, format!("{shown} is not executable")));
    }
    Ok(full)
}

/// The environment of a release: a sane base, defaults for where an Erlang release
/// writes (`RUNNER_LOG_DIR`, `ERL_CRASH_DUMP`, under its data directory), the request's
/// variables, and the agent's own `EREL_*` variables, which always win.
fn environment(
    root: &Root,
    host_id: &str,
    desired: &Desired,
    run_as: Option<&RunAs>,
    version_dir: &Path,
) -> Result<Vec<(String, String)>> {
    let data = data_dir(root, &desired.name);
    let data_text = data.to_string_lossy().into_owned();
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), BASE_PATH.into()),
        ("LANG".into(), "C.UTF-8".into()),
        ("RUNNER_LOG_DIR".into(), format!("{data_text}/log")),
        (
            "ERL_CRASH_DUMP".into(),
            format!("{data_text}/erl_crash.dump"),
        ),
    ];
    let home = match run_as {
        Some(run_as) => run_as.home.to_string_lossy().into_owned(),
        None => std::env::var("HOME").unwrap_or_else(|_| version_dir.to_string_lossy().into()),
    };
    env.push(("HOME".into(), home));
    let user = match run_as {
        Some(run_as) => Some(run_as.name.clone()),
        None => std::env::var("USER").ok().or_else(|| {
            User::from_uid(nix::unistd::geteuid())
                .ok()
                .flatten()
                .map(|u| u.name)
        }),
    };
    if let Some(user) = user {
        env.push(("USER".into(), user.clone()));
        env.push(("LOGNAME".into(), user));
    }
    for (key, value) in &desired.env {
        if key.is_empty() || key.contains('=') || key.contains('\0') || value.contains('\0') {
            return Err(Error::BadRequest(format!(
                "environment variable {:?}: names must be non-empty without '=' or NUL, values without NUL",
                quote(key)
            )));
        }
        if EREL_VARS.contains(&key.as_str()) {
            continue;
        }
        env.retain(|(k, _)| k != key);
        env.push((key.clone(), value.clone()));
    }
    env.push(("EREL_HOST_ID".into(), host_id.into()));
    env.push(("EREL_RELEASE".into(), desired.name.clone()));
    env.push(("EREL_VERSION".into(), desired.version.clone()));
    env.push((
        "EREL_ROOT".into(),
        root.path().to_string_lossy().into_owned(),
    ));
    env.push(("EREL_DATA".into(), data_text));
    Ok(env)
}

/// `root/data/<name>`: the one directory a release may write (besides its user's home
/// and the system's temporary directories).
pub(crate) fn data_dir(root: &Root, name: &str) -> PathBuf {
    root.path().join(DATA_DIR).join(name)
}

/// Creates `root/data/<name>` and its `log/` when missing: owned by the release's user
/// (or the agent's, without one), mode 0750; what a previous user left in it becomes
/// the new user's. `root/data` itself belongs to the agent, mode 0755. Symlinks
/// and non-directories in their place are refused, so nothing outside the root is
/// ever handed to a user.
fn ensure_data_dir(root: &Root, desired: &Desired, run_as: Option<&RunAs>) -> Result<PathBuf> {
    let top = root.path().join(DATA_DIR);
    let data = data_dir(root, &desired.name);
    // Without a user the release runs as the agent: its data directory is the agent's,
    // never left to a user it was handed to before.
    let owner = Some(run_as.map_or_else(
        || (nix::unistd::geteuid(), nix::unistd::getegid()),
        |r| (r.uid, r.gid),
    ));
    for (dir, mode, owner) in [
        (top.clone(), 0o755, None),
        (data.clone(), 0o750, owner),
        (data.join("log"), 0o750, owner),
    ] {
        match fs::DirBuilder::new().mode(mode).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io("create", &dir, e)),
        }
        // Opened without following a symlink, then changed through the descriptor: the
        // release's user owns `data/<name>/` and may swap what is in it at any moment,
        // so a path checked first and changed after may no longer be the directory.
        let not_a_dir = || {
            spawn_failed(
                desired,
                format!(
                    "{} must be a directory (the release's data directory), not a link or file",
                    dir.strip_prefix(root.path()).unwrap_or(&dir).display()
                ),
            )
        };
        let handle = match fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&dir)
        {
            Ok(handle) => handle,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => {
                return Err(not_a_dir())
            }
            Err(e) => return Err(Error::io("open", &dir, e)),
        };
        let meta = handle
            .metadata()
            .map_err(|e| Error::io("inspect", &dir, e))?;
        if !meta.is_dir() {
            return Err(not_a_dir());
        }
        let (uid, gid) = owner.unwrap_or((Uid::from_raw(meta.uid()), Gid::from_raw(meta.gid())));
        if meta.uid() != uid.as_raw() || meta.gid() != gid.as_raw() {
            std::os::unix::fs::fchown(&handle, Some(uid.as_raw()), Some(gid.as_raw()))
                .map_err(|e| Error::io("change the owner of", &dir, e))?;
            if dir == data && meta.uid() != uid.as_raw() {
                // A new user: what the previous one left is the new one's to write.
                hand_over(&handle, meta.uid(), (uid, gid), HAND_OVER_DEPTH)
                    .map_err(|e| Error::io("hand over the contents of", &dir, e))?;
            }
        }
        if meta.permissions().mode() & 0o7777 != mode {
            handle
                .set_permissions(fs::Permissions::from_mode(mode))
                .map_err(|e| Error::io("set mode of", &dir, e))?;
        }
    }
    Ok(data)
}

/// Gives to `to` everything below the open directory `dir` that `from` owns, through
/// descriptors and without following a symlink: the previous user may still run other
/// processes and swap entries meanwhile, and what it does not own (a hard link to
/// another user's file) is not its to give. Directories deeper than `depth` are left.
fn hand_over(dir: &fs::File, from: u32, to: (Uid, Gid), depth: usize) -> std::io::Result<()> {
    use nix::fcntl::{AtFlags, OFlag};
    let gone = |e: &nix::errno::Errno| *e == nix::errno::Errno::ENOENT;
    // The listing of the directory the descriptor holds, whatever its path is now.
    for entry in fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd()))? {
        let name = entry?.file_name();
        let stat =
            match nix::sys::stat::fstatat(dir, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(stat) => stat,
                Err(e) if gone(&e) => continue,
                Err(e) => return Err(e.into()),
            };
        if stat.st_uid != from {
            continue;
        }
        match nix::unistd::fchownat(
            dir,
            name.as_os_str(),
            Some(to.0),
            Some(to.1),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(()) => {}
            Err(e) if gone(&e) => continue,
            Err(e) => return Err(e.into()),
        }
        if stat.st_mode & libc::S_IFMT == libc::S_IFDIR && depth > 0 {
            let sub = match nix::fcntl::openat(
                dir,
                name.as_os_str(),
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            ) {
                Ok(sub) => sub,
                Err(e)
                    if gone(&e)
                        || e == nix::errno::Errno::ELOOP
                        || e == nix::errno::Errno::ENOTDIR =>
                {
                    continue
                }
                Err(e) => return Err(e.into()),
            };
            hand_over(&fs::File::from(sub), from, to, depth - 1)?;
        }
    }
    Ok(())
}

/// Checks that `run_as` can reach and run the program: every directory from `/` down to
/// the program searchable by it, the program readable and executable by it. Without
/// this a release started as a user fails later with a bare "Permission denied".
fn check_user_access(desired: &Desired, run_as: &RunAs, program: &Path) -> Result<()> {
    let may = |meta: &fs::Metadata, bits: u32| {
        let mode = meta.permissions().mode();
        if run_as.uid.is_root() {
            return true;
        }
        let allowed = if meta.uid() == run_as.uid.as_raw() {
            (mode >> 6) & 0o7
        } else if run_as.groups.iter().any(|g| g.as_raw() == meta.gid())
            || meta.gid() == run_as.gid.as_raw()
        {
            (mode >> 3) & 0o7
        } else {
            mode & 0o7
        };
        allowed & bits == bits
    };
    let mut ancestors: Vec<&Path> = program.ancestors().skip(1).collect();
    ancestors.reverse();
    for dir in ancestors {
        let meta = fs::metadata(dir).map_err(|e| Error::io("inspect", dir, e))?;
        if !may(&meta, 0o1) {
            return Err(spawn_failed(
                desired,
                format!(
                    "user '{}' (uid {}) cannot enter {} (mode {:o}, owner uid {}); the root and releases/ must be searchable by it",
                    run_as.name,
                    run_as.uid,
                    dir.display(),
                    meta.permissions().mode() & 0o7777,
                    meta.uid()
                ),
            ));
        }
    }
    let meta = fs::metadata(program).map_err(|e| Error::io("inspect", program, e))?;
    if !may(&meta, 0o5) {
        return Err(spawn_failed(
            desired,
            format!(
                "user '{}' (uid {}) cannot read and execute {} (mode {:o}, owner uid {})",
                run_as.name,
                run_as.uid,
                program.display(),
                meta.permissions().mode() & 0o7777,
                meta.uid()
            ),
        ));
    }
    Ok(())
}

/// Everything a spawn needs, checked.
#[derive(Debug)]
struct Prepared {
    version_dir: PathBuf,
    program: PathBuf,
    run_as: Option<RunAs>,
    env: Vec<(String, String)>,
}

/// Checks everything a spawn needs that can be checked without spawning: the version
/// directory, the program, the user (and that it can reach the program) and the
/// environment.
fn prepare(root: &Root, host_id: &str, desired: &Desired) -> Result<Prepared> {
    let version_dir = root.version_dir(&desired.name, &desired.version)?;
    if !version_dir.is_dir() {
        return Err(Error::NotFound {
            what: "release version",
            path: format!("releases/{}/{}", desired.name, desired.version),
        });
    }
    let program = resolve_program(root, desired)?;
    let run_as = match &desired.user {
        Some(user) => Some(check_switch(desired, lookup_user(desired, user)?)?),
        None => None,
    };
    if let Some(run_as) = &run_as {
        check_user_access(desired, run_as, &program)?;
    }
    let env = environment(root, host_id, desired, run_as.as_ref(), &version_dir)?;
    Ok(Prepared {
        version_dir,
        program,
        run_as,
        env,
    })
}

/// Checks a release can be spawned, without spawning it. Called before the desired state
/// is recorded, so a request that cannot work is refused without changing anything.
pub(crate) fn preflight(root: &Root, host_id: &str, desired: &Desired) -> Result<()> {
    prepare(root, host_id, desired).map(drop)
}

/// Refuses a switch of user the agent is not privileged for.
fn check_switch(desired: &Desired, run_as: RunAs) -> Result<RunAs> {
    let euid = nix::unistd::geteuid();
    if run_as.uid != euid && !euid.is_root() {
        return Err(spawn_failed(
            desired,
            format!(
                "the agent runs as uid {euid} and cannot switch to user '{}' (uid {})",
                run_as.name, run_as.uid
            ),
        ));
    }
    Ok(run_as)
}

/// Spawns a release: a new session (so a new process group), inside `cgroup` when given
/// (the opened `cgroup.procs` of its cgroup, joined before `exec`), cwd the version
/// directory, stdin from `/dev/null`, stdout and stderr a pipe to its output writer (see
/// [`log`]), started first and outside the release's session and cgroup, the environment
/// cleared and set by [`environment`], its data directory created, and privileges dropped
/// to `desired.user` when named. Not killed when the agent goes away.
pub(crate) fn spawn(
    root: &Root,
    host_id: &str,
    desired: &Desired,
    settings: &Supervision,
    cgroup: Option<fs::File>,
) -> Result<Spawned> {
    let Prepared {
        version_dir,
        program,
        run_as,
        env,
    } = prepare(root, host_id, desired)?;
    ensure_data_dir(root, desired, run_as.as_ref())?;

    let log_path = log::log_path(root, &desired.name);
    let header = format!(
        "--- erel: starting {} {} at {} ---",
        desired.name,
        desired.version,
        log::utc_now()
    );
    // The writer first: a release never runs without its writer, and a release that
    // fails to start leaves a writer that ends at once (its pipe has no writer left).
    let (output, writer_pid) = log::OutputPipe::open(&log_path, &header)?
        .start_writer(&settings.output_writer, settings.log_max_bytes)
        .map_err(|error| spawn_failed(desired, error.to_string()))?;
    let writer_start_time = proc_stat(writer_pid).map(|s| s.start_time).unwrap_or(0);
    let (stdout, stderr) = output.release_stdio()?;
    drop(output);

    let mut command = std::process::Command::new(&program);
    command
        .args(desired.argv.iter().skip(1))
        .current_dir(&version_dir)
        .env_clear()
        .envs(env)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    enter_cgroup_and_session(&mut command, cgroup.as_ref().map(|f| f.as_raw_fd()));
    if let Some(run_as) = run_as.filter(|r| r.uid != nix::unistd::geteuid()) {
        drop_privileges(&mut command, run_as);
    }
    let mut command = Command::from(command);
    command.kill_on_drop(false);
    let child = command
        .spawn()
        .map_err(|e| spawn_failed(desired, format!("{}: {e}", program.display())))?;
    // The command holds descriptors of the pipe's write end: the writer sees the end of
    // the output only once every one is closed.
    drop(command);
    drop(cgroup);
    let pid = child
        .id()
        .ok_or_else(|| Error::Internal(format!("{} exited before it had a pid", desired.name)))?;
    // The child is not reaped before its task waits for it, so its /proc entry exists.
    let start_time = proc_stat(pid).map(|s| s.start_time).unwrap_or(0);
    Ok(Spawned {
        child,
        pid,
        start_time,
        writer: (writer_pid, writer_start_time),
    })
}

/// Makes the child join its cgroup (when `procs` is the open `cgroup.procs` of one) and
/// lead a new session, before anything else runs in it.
///
/// Writing `0` to `cgroup.procs` moves the writing process (cgroup-v2(7)); done in the
/// child, everything the release later forks is born in the cgroup. A failed write
/// aborts the spawn: a release never runs outside its cgroup.
#[allow(unsafe_code)]
fn enter_cgroup_and_session(command: &mut std::process::Command, procs: Option<i32>) {
    // SAFETY: the closure runs in the forked child before exec. It only makes the write
    // and setsid system calls on a descriptor and bytes prepared before the fork (no
    // allocation, no lock), and reports failure through the returned io::Error, which
    // aborts the spawn. The descriptor stays open in the parent until the spawn returns.
    unsafe {
        command.pre_exec(move || {
            if let Some(fd) = procs {
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                if written != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            nix::unistd::setsid()?;
            Ok(())
        });
    }
}

/// Makes the child drop to `run_as`: supplementary groups, then group, then user.
///
/// std's `CommandExt::uid`/`gid` clear the supplementary groups and offer no stable way to
/// set them, and a release often needs its user's groups (to read a key, say), so the
/// three calls are made in the child with `pre_exec`.
#[allow(unsafe_code)]
fn drop_privileges(command: &mut std::process::Command, run_as: RunAs) {
    let RunAs {
        uid, gid, groups, ..
    } = run_as;
    // SAFETY: the closure runs in the forked child before exec. It only makes the
    // setgroups, setgid and setuid system calls on data prepared before the fork (no
    // allocation, no lock, nothing that is not async-signal-safe), and reports failure
    // through the returned io::Error, which aborts the spawn.
    unsafe {
        command.pre_exec(move || {
            nix::unistd::setgroups(&groups)?;
            nix::unistd::setgid(gid)?;
            nix::unistd::setuid(uid)?;
            Ok(())
        });
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

    /// The data directory is the release user's: while the agent prepares it, that user
    /// may swap `log/` for a symlink. Nothing the agent does to it may reach the target.
    #[test]
    fn a_data_directory_swapped_for_a_symlink_never_passes_a_change_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = Root::open(dir.path()).expect("root");
        let victim = dir.path().join("victim");
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&victim)
            .expect("victim");
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o700)).expect("chmod");
        let desired = Desired {
            name: "app".into(),
            version: "1".into(),
            argv: vec!["bin/app".into()],
            env: Vec::new(),
            user: None,
            should_run: true,
            crash_looping: false,
        };
        ensure_data_dir(&root, &desired, None).expect("first preparation");
        let log = data_dir(&root, "app").join("log");
        // A symlink to the victim beside `log/`, the two exchanged atomically over and
        // over, `log/` put back to 0700 whenever it is the directory.
        let spare = data_dir(&root, "app").join("spare");
        std::os::unix::fs::symlink(&victim, &spare).expect("symlink");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let swapper = {
            let (log, spare, stop) = (log.clone(), spare.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for path in [&log, &spare] {
                        let is_dir = fs::symlink_metadata(path).is_ok_and(|m| m.is_dir());
                        if is_dir {
                            let _ = fs::set_permissions(path, fs::Permissions::from_mode(0o700));
                        }
                    }
                    let _ = nix::fcntl::renameat2(
                        nix::fcntl::AT_FDCWD,
                        &log,
                        nix::fcntl::AT_FDCWD,
                        &spare,
                        nix::fcntl::RenameFlags::RENAME_EXCHANGE,
                    );
                }
            })
        };
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            let _ = ensure_data_dir(&root, &desired, None);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        swapper.join().expect("swapper");
        let mode = fs::metadata(&victim).expect("victim").permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700, "the agent changed the mode through a symlink");
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
