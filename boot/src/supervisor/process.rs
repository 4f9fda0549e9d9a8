//! Processes as the kernel sees them: `/proc` inspection, process groups, spawning.
//!
//! Liveness is always checked against the start time in `/proc/<pid>/stat`, so a pid the
//! kernel recycled is never mistaken for a release. Zombies count as gone: a zombie of a
//! process that is not ours may never be reaped (PID 1 in a container may not reap), so
//! "nothing of the group is left" means no live, non-zombie member in `/proc`.

use std::ffi::CString;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt as _;
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use erel_proto::text::quote;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::{Gid, Pid, Uid, User};
use tokio::process::{Child, Command};

use crate::error::{Error, Result};
use crate::root::Root;
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
const EREL_VARS: [&str; 4] = ["EREL_HOST_ID", "EREL_RELEASE", "EREL_VERSION", "EREL_ROOT"];

/// The fields of `/proc/<pid>/stat` the supervisor uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcStat {
    /// One-letter state (`R`, `S`, `D`, `Z`, …).
    pub state: char,
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

/// A live process-group leader that carries a release's environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Found {
    /// Release name (`EREL_RELEASE`).
    pub release: String,
    /// Version (`EREL_VERSION`).
    pub version: String,
    /// Its pid, which is also its process group.
    pub pid: u32,
    /// Its start time.
    pub start_time: u64,
}

/// Every live process-group leader started by an agent on `root`: its environment holds
/// `EREL_ROOT=<root>` and `EREL_RELEASE`. Session leaders are left out: a release is
/// spawned in the agent's session, so a session leader carrying the environment is a
/// daemon the release detached (such as `epmd -daemon`), not the release itself.
pub(crate) fn find_releases(root: &Path) -> Vec<Found> {
    let root = root.to_string_lossy();
    let own = std::process::id();
    let mut found = Vec::new();
    for pid in all_pids() {
        if pid == own {
            continue;
        }
        let Some(stat) = proc_stat(pid) else { continue };
        let Ok(pid_i32) = i32::try_from(pid) else {
            continue;
        };
        if stat.is_gone() || stat.pgrp != pid_i32 || stat.session == pid_i32 {
            continue;
        }
        let Some(env) = environ(pid) else { continue };
        let get = |key: &str| env.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        if get("EREL_ROOT").as_deref() != Some(&*root) {
            continue;
        }
        if let (Some(release), Some(version)) = (get("EREL_RELEASE"), get("EREL_VERSION")) {
            found.push(Found {
                release,
                version,
                pid,
                start_time: stat.start_time,
            });
        }
    }
    found
}

/// The outcome of stopping a process group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GroupStop {
    /// Something of the group was alive.
    pub was_running: bool,
    /// SIGKILL was needed.
    pub killed: bool,
}

/// Signals a process group, refusing groups that must never be signalled.
fn signal_group(pgid: i32, signal: Signal) -> Result<()> {
    if pgid <= 1 || pgid == nix::unistd::getpgrp().as_raw() {
        return Err(Error::Internal(format!(
            "refusing to signal process group {pgid}"
        )));
    }
    match killpg(Pid::from_raw(pgid), signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(e) => Err(Error::Internal(format!(
            "cannot send {signal} to process group {pgid}: {e}"
        ))),
    }
}

/// Polls until no live member of `pgid` is left or `limit` passes; true when empty.
pub(crate) async fn wait_group_empty(pgid: i32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if group_members(pgid).is_empty() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(GROUP_POLL).await;
    }
}

/// SIGTERM to the whole group, up to `grace` for every member to be gone, then SIGKILL
/// and a wait until none is left.
pub(crate) async fn stop_group(pgid: i32, grace: Duration) -> Result<GroupStop> {
    if group_members(pgid).is_empty() {
        return Ok(GroupStop {
            was_running: false,
            killed: false,
        });
    }
    signal_group(pgid, Signal::SIGTERM)?;
    if wait_group_empty(pgid, grace).await {
        return Ok(GroupStop {
            was_running: true,
            killed: false,
        });
    }
    signal_group(pgid, Signal::SIGKILL)?;
    if wait_group_empty(pgid, KILL_WAIT).await {
        return Ok(GroupStop {
            was_running: true,
            killed: true,
        });
    }
    Err(Error::Timeout(format!(
        "waiting for process group {pgid} to end: {} members left {}s after SIGKILL",
        group_members(pgid).len(),
        KILL_WAIT.as_secs()
    )))
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
    crate::root::check_lengths(program)?;
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

/// The environment of a release: a sane base, the request's variables, and the agent's
/// own `EREL_*` variables, which always win.
fn environment(
    root: &Root,
    host_id: &str,
    desired: &Desired,
    run_as: Option<&RunAs>,
    version_dir: &Path,
) -> Result<Vec<(String, String)>> {
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), BASE_PATH.into()),
        ("LANG".into(), "C.UTF-8".into()),
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
    Ok(env)
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
/// directory, the program, the user and the environment.
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

/// Spawns a release: its own process group, cwd the version directory, stdin from
/// `/dev/null`, stdout and stderr a pipe to its output writer (see [`log`]), which joins
/// its group, the environment cleared and set by [`environment`], privileges dropped to
/// `desired.user` when named. Not killed when the agent goes away.
pub(crate) fn spawn(
    root: &Root,
    host_id: &str,
    desired: &Desired,
    settings: &Supervision,
) -> Result<Spawned> {
    let Prepared {
        version_dir,
        program,
        run_as,
        env,
    } = prepare(root, host_id, desired)?;

    let log_path = log::log_path(root, &desired.name);
    let header = format!(
        "--- erel: starting {} {} at {} ---",
        desired.name,
        desired.version,
        log::utc_now()
    );
    let output = log::OutputPipe::open(&log_path, &header)?;
    let (stdout, stderr) = output.release_stdio()?;

    let mut command = std::process::Command::new(&program);
    command
        .args(desired.argv.iter().skip(1))
        .current_dir(&version_dir)
        .env_clear()
        .envs(env)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0);
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
    let pid = child
        .id()
        .ok_or_else(|| Error::Internal(format!("{} exited before it had a pid", desired.name)))?;
    if let Err(error) = output.start_writer(&settings.output_writer, settings.log_max_bytes, pid) {
        // Without its writer the release would block on a full pipe: do not leave it.
        let _ = signal_group(i32::try_from(pid).unwrap_or(0), Signal::SIGKILL);
        return Err(spawn_failed(desired, error.to_string()));
    }
    // The child is not reaped before its task waits for it, so its /proc entry exists.
    let start_time = proc_stat(pid).map(|s| s.start_time).unwrap_or(0);
    Ok(Spawned {
        child,
        pid,
        start_time,
    })
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
    fn refuses_to_signal_dangerous_groups() {
        assert!(signal_group(0, Signal::SIGTERM).is_err());
        assert!(signal_group(1, Signal::SIGTERM).is_err());
        assert!(signal_group(nix::unistd::getpgrp().as_raw(), Signal::SIGTERM).is_err());
    }
}
