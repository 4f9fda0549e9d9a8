//! Spawning a release: the checks a `Start` passes first (version directory, program,
//! user, environment), its data directory, its output writer, and the child created in
//! the release's cgroup, which leads a new session and drops to the release's user.

use std::ffi::CString;
use std::fs;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt as _;
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;

use erel_proto::rules;
use erel_proto::text::quote;
use nix::unistd::{Gid, Uid};
use tokio::process::{Child, Command};
use tracing::debug;

use crate::error::{Error, IoContext, Result};
use crate::fs::Root;
use crate::settings::Supervision;

use super::cgroup::Joining;
use super::log;
use super::process::proc_stat;
use super::record::Desired;
use users::{Account, Wanted};

mod clone;
mod users;

pub(crate) use clone::ClonedChild;

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

/// A release process just spawned by the agent.
#[derive(Debug)]
pub(crate) struct Spawned {
    /// The child, to be waited for (and so reaped) by its supervision task.
    pub(crate) child: ReleaseChild,
    /// Its pid (also its process group and session) and start time from `/proc`.
    pub(crate) anchor: (u32, u64),
    /// Its output writer (pid, start time), outside the release.
    pub(crate) writer: (u32, u64),
}

/// A release's main process, a child of the agent.
#[derive(Debug)]
pub(crate) enum ReleaseChild {
    /// Created in its cgroup by `clone3` ([`clone`]).
    Cloned(ClonedChild),
    /// Spawned by tokio's `Command` (no cgroup, or a kernel without `CLONE_INTO_CGROUP`).
    Command(Child),
}

impl ReleaseChild {
    /// Its pid.
    pub(crate) fn id(&self) -> Option<u32> {
        match self {
            ReleaseChild::Cloned(child) => Some(child.id()),
            ReleaseChild::Command(child) => child.id(),
        }
    }

    /// Waits for it to end and reaps it.
    ///
    /// # Errors
    ///
    /// The operating system's, when it cannot be waited for.
    pub(crate) async fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        match self {
            ReleaseChild::Cloned(child) => child.wait().await,
            ReleaseChild::Command(child) => child.wait().await,
        }
    }
}

/// Who a release runs as: the user's passwd entry and the groups it is in.
#[derive(Debug, Clone)]
struct RunAs {
    user: Account,
    groups: Vec<Gid>,
}

/// The refusal of a start that cannot spawn `desired`, and why.
pub(super) fn spawn_failed(desired: &Desired, reason: impl Into<String>) -> Error {
    Error::SpawnFailed {
        name: desired.name.clone(),
        version: desired.version.clone(),
        reason: reason.into(),
    }
}

/// Looks up the user a release should run as (a name, or a numeric uid with a passwd
/// entry) in `/etc/passwd`, and its groups in `/etc/group` (see [`users`]).
fn lookup_user(desired: &Desired, name: &str) -> Result<RunAs> {
    let failed = |why: String| Err(spawn_failed(desired, why));
    if name.len() > MAX_USER_LEN {
        let why = format!(
            "user name '{}' is above the limit of {MAX_USER_LEN} bytes (LOGIN_NAME_MAX)",
            quote(name)
        );
        return failed(why);
    }
    let cannot = |file: &str, e: std::io::Error| {
        failed(format!(
            "cannot look up user '{}': {file}: {e}",
            quote(name)
        ))
    };
    let passwd = match users::read(Path::new(users::PASSWD)) {
        Ok(passwd) => passwd,
        Err(e) => return cannot(users::PASSWD, e),
    };
    let Some(user) = users::find_user(&passwd, Wanted::parse(name)) else {
        return failed(format!("unknown user '{}'", quote(name)));
    };
    // A host without /etc/group: the user is in its primary group only.
    let group = match users::read(Path::new(users::GROUP)) {
        Ok(group) => group,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return cannot(users::GROUP, e),
    };
    let groups = users::groups_of(&group, &user.name, user.gid);
    Ok(RunAs { user, groups })
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
    let shown = format!(
        "{}/{program}",
        rules::version_dir(&desired.name, &desired.version)
    );
    let full = version_dir.join(relative);
    let real = fs::canonicalize(&full).map_err(|_| Error::NotFound {
        what: "program",
        path: shown.clone(),
    })?;
    let real_dir = fs::canonicalize(&version_dir).io("resolve", &version_dir)?;
    if !real.starts_with(&real_dir) {
        return Err(Error::invalid_path(
            program,
            "resolves outside the version directory",
        ));
    }
    let meta = fs::metadata(&real).io("inspect", &real)?;
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
    let data = data_dir(root, &desired.name).to_string_lossy().into_owned();
    let (home, user) = match run_as {
        Some(run_as) => (
            run_as.user.dir.to_string_lossy().into(),
            Some(run_as.user.name.clone()),
        ),
        None => (
            std::env::var("HOME").unwrap_or_else(|_| version_dir.to_string_lossy().into()),
            std::env::var("USER").ok().or_else(|| {
                let passwd = users::read(Path::new(users::PASSWD)).ok()?;
                let uid = nix::unistd::geteuid().as_raw();
                users::find_user(&passwd, Wanted::Uid(uid)).map(|u| u.name)
            }),
        ),
    };
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), BASE_PATH.into()),
        ("LANG".into(), "C.UTF-8".into()),
        ("RUNNER_LOG_DIR".into(), format!("{data}/log")),
        ("ERL_CRASH_DUMP".into(), format!("{data}/erl_crash.dump")),
        ("HOME".into(), home),
    ];
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
    let root_text = root.path().to_string_lossy().into_owned();
    let values = [host_id, &desired.name, &desired.version, &root_text, &data];
    env.extend(
        EREL_VARS
            .iter()
            .zip(values)
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
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
        |r| (r.user.uid, r.user.gid),
    ));
    for (dir, mode, owner) in [
        (top.clone(), 0o755, None),
        (data.clone(), 0o750, owner),
        (data.join("log"), 0o750, owner),
    ] {
        let made = nix::unistd::mkdir(&dir, nix::sys::stat::Mode::from_bits_truncate(mode));
        unless(made, &[nix::errno::Errno::EEXIST]).io("create", &dir)?;
        // Opened without following a symlink, then changed through the descriptor: the
        // release's user owns `data/<name>/` and may swap what is in it at any moment,
        // so a path checked first and changed after may no longer be the directory.
        let shown = dir.strip_prefix(root.path()).unwrap_or(&dir).display();
        let why = format!(
            "{shown} must be a directory (the release's data directory), not a link or file"
        );
        let not_a_dir = || spawn_failed(desired, why.clone());
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
        let meta = handle.metadata().io("inspect", &dir)?;
        if !meta.is_dir() {
            return Err(not_a_dir());
        }
        let (uid, gid) = owner.unwrap_or((Uid::from_raw(meta.uid()), Gid::from_raw(meta.gid())));
        if meta.uid() != uid.as_raw() || meta.gid() != gid.as_raw() {
            std::os::unix::fs::fchown(&handle, Some(uid.as_raw()), Some(gid.as_raw()))
                .io("change the owner of", &dir)?;
            if dir == data && meta.uid() != uid.as_raw() {
                // A new user: what the previous one left is the new one's to write.
                hand_over(&handle, meta.uid(), (uid, gid), HAND_OVER_DEPTH)
                    .io("hand over the contents of", &dir)?;
            }
        }
        if meta.permissions().mode() & 0o7777 != mode {
            handle
                .set_permissions(fs::Permissions::from_mode(mode))
                .io("set mode of", &dir)?;
        }
    }
    Ok(data)
}

/// Gives to `to` everything below the open directory `dir` that `from` owns, through
/// descriptors and without following a symlink: the previous user may still run other
/// processes and swap entries meanwhile, and what it does not own (a hard link to
/// another user's file) is not its to give. Directories deeper than `depth` are left.
fn hand_over(dir: &fs::File, from: u32, to: (Uid, Gid), depth: usize) -> std::io::Result<()> {
    use nix::errno::Errno::{ELOOP, ENOENT, ENOTDIR};
    use nix::fcntl::{AtFlags, OFlag};
    let nofollow = AtFlags::AT_SYMLINK_NOFOLLOW;
    // The listing of the directory the descriptor holds, whatever its path is now.
    for entry in fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd()))? {
        let name = entry?.file_name();
        let name = name.as_os_str();
        // An entry that went away meanwhile is skipped.
        let Some(stat) = unless(nix::sys::stat::fstatat(dir, name, nofollow), &[ENOENT])? else {
            continue;
        };
        // What `from` does not own is not its to give.
        if stat.st_uid != from {
            continue;
        }
        let chown = nix::unistd::fchownat(dir, name, Some(to.0), Some(to.1), nofollow);
        if unless(chown, &[ENOENT])?.is_none() {
            continue;
        }
        if stat.st_mode & libc::S_IFMT == libc::S_IFDIR && depth > 0 {
            let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
            let sub = nix::fcntl::openat(dir, name, flags, nix::sys::stat::Mode::empty());
            if let Some(sub) = unless(sub, &[ENOENT, ELOOP, ENOTDIR])? {
                hand_over(&fs::File::from(sub), from, to, depth - 1)?;
            }
        }
    }
    Ok(())
}

/// `Ok(None)` for an error in `skip`.
fn unless<T>(result: nix::Result<T>, skip: &[nix::errno::Errno]) -> std::io::Result<Option<T>> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(e) if skip.contains(&e) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Checks that `run_as` can reach and run the program: every directory from `/` down to
/// the program searchable by it, the program readable and executable by it. Without
/// this a release started as a user fails later with a bare "Permission denied".
fn check_user_access(desired: &Desired, run_as: &RunAs, program: &Path) -> Result<()> {
    let may = |meta: &fs::Metadata, bits: u32| {
        let mode = meta.permissions().mode();
        if run_as.user.uid.is_root() {
            return true;
        }
        let allowed = if meta.uid() == run_as.user.uid.as_raw() {
            (mode >> 6) & 0o7
        } else if run_as.groups.iter().any(|g| g.as_raw() == meta.gid())
            || meta.gid() == run_as.user.gid.as_raw()
        {
            (mode >> 3) & 0o7
        } else {
            mode & 0o7
        };
        allowed & bits == bits
    };
    // Every directory from `/` down, then the program itself.
    let mut checks: Vec<(&Path, u32)> = program.ancestors().map(|dir| (dir, 0o1)).collect();
    checks[0].1 = 0o5;
    checks.reverse();
    for (path, bits) in checks {
        let meta = fs::metadata(path).io("inspect", path)?;
        if !may(&meta, bits) {
            let (what, hint) = match bits {
                0o1 => ("enter", "; the root and releases/ must be searchable by it"),
                _ => ("read and execute", ""),
            };
            let (name, uid) = (&run_as.user.name, run_as.user.uid);
            let (mode, owner) = (meta.permissions().mode() & 0o7777, meta.uid());
            let why = format!("user '{name}' (uid {uid}) cannot {what} {} (mode {mode:o}, owner uid {owner}){hint}", path.display());
            return Err(spawn_failed(desired, why));
        }
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
            path: rules::version_dir(&desired.name, &desired.version),
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
    let RunAs { user, .. } = &run_as;
    if user.uid != euid && !euid.is_root() {
        let why = format!(
            "the agent runs as uid {euid} and cannot switch to user '{}' (uid {})",
            user.name, user.uid
        );
        return Err(spawn_failed(desired, why));
    }
    Ok(run_as)
}

/// Spawns a release: a new session (so a new process group), inside `cgroup` when given
/// (created in it by [`clone`], or joining it before `exec` where the kernel cannot do
/// that), cwd the version
/// directory, stdin from `/dev/null`, stdout and stderr a pipe to its output writer (see
/// [`log`]), started first and outside the release's session and cgroup, the environment
/// cleared and set by [`environment`], its data directory created, and privileges dropped
/// to `desired.user` when named. Not killed when the agent goes away.
pub(crate) fn spawn(
    root: &Root,
    host_id: &str,
    desired: &Desired,
    settings: &Supervision,
    cgroup: Option<Joining>,
) -> Result<Spawned> {
    let Prepared {
        version_dir,
        program,
        run_as,
        env,
    } = prepare(root, host_id, desired)?;
    ensure_data_dir(root, desired, run_as.as_ref())?;

    let log_path = log::log_path(root, &desired.name);
    let (name, version, now) = (&desired.name, &desired.version, log::utc_now());
    let header = format!("--- erel: starting {name} {version} at {now} ---");
    // The writer first: a release never runs without its writer, and a release that
    // fails to start leaves a writer that ends at once (its pipe has no writer left).
    let (read, (stdout, stderr)) = log::output_pipe(&log_path, &header)?;
    let writer = &settings.output_writer;
    let writer_pid = log::start_writer(read, &log_path, writer, settings.log_max_bytes)
        .map_err(|error| spawn_failed(desired, error.to_string()))?;
    let writer_start_time = proc_stat(writer_pid).map(|s| s.start_time).unwrap_or(0);

    let run_as = run_as.filter(|r| r.user.uid != nix::unistd::geteuid());
    // Created in the cgroup by `clone3` where the kernel can; else by tokio's `Command`,
    // joining the cgroup (when there is one) before `exec`. The plan, dropped at the end
    // of its arm, holds this side's copies of the output pipe.
    let cloned = match cgroup {
        None => Err((stdout, stderr, None)),
        Some(cgroup) => {
            let plan = clone_plan(
                desired,
                &program,
                &version_dir,
                &env,
                stdout,
                stderr,
                run_as.as_ref(),
            )?;
            match clone::spawn(&plan, cgroup.dir.as_fd()) {
                Ok(child) => Ok(child),
                Err(clone::Refused::Failed(why)) => {
                    return Err(spawn_failed(
                        desired,
                        format!("{}: {why}", program.display()),
                    ))
                }
                Err(clone::Refused::Unsupported(e)) => {
                    debug!(release = %desired.name, "clone3 into the cgroup refused ({e}): forking and joining it instead");
                    let [_, stdout, stderr] = plan.stdio;
                    Err((stdout, stderr, Some(cgroup.procs)))
                }
            }
        }
    };
    let child = match cloned {
        Ok(child) => ReleaseChild::Cloned(child),
        Err((stdout, stderr, procs)) => {
            let stdio = (Stdio::from(stdout), Stdio::from(stderr));
            command_spawn(desired, &program, &version_dir, env, stdio, procs, run_as)?
        }
    };
    let pid = child
        .id()
        .ok_or_else(|| Error::Internal(format!("{} exited before it had a pid", desired.name)))?;
    // The child is not reaped before its task waits for it, so its /proc entry exists.
    let start_time = proc_stat(pid).map(|s| s.start_time).unwrap_or(0);
    Ok(Spawned {
        child,
        anchor: (pid, start_time),
        writer: (writer_pid, writer_start_time),
    })
}

/// The release's program run by tokio's `Command`: `procs`, when given, is the
/// `cgroup.procs` the child joins before `exec` (see [`pre_exec`]).
fn command_spawn(
    desired: &Desired,
    program: &Path,
    version_dir: &Path,
    env: Vec<(String, String)>,
    (stdout, stderr): (Stdio, Stdio),
    procs: Option<fs::File>,
    run_as: Option<RunAs>,
) -> Result<ReleaseChild> {
    let mut command = std::process::Command::new(program);
    command
        .args(desired.argv.iter().skip(1))
        .current_dir(version_dir)
        .env_clear()
        .envs(env)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    pre_exec(&mut command, procs.as_ref().map(|f| f.as_raw_fd()), run_as);
    let mut command = Command::from(command);
    command.kill_on_drop(false);
    let child = command
        .spawn()
        .map_err(|e| spawn_failed(desired, format!("{}: {e}", program.display())))?;
    // The command holds descriptors of the pipe's write end: the writer sees the end of
    // the output only once every one is closed. `procs` stays open until the child has
    // joined: the spawn returns once it has exec'd.
    drop(command);
    drop(procs);
    Ok(ReleaseChild::Command(child))
}

/// What [`clone::spawn`] needs, made before the clone: the program, `argv` (the
/// program first, then `desired.argv` after its first word, as std's `Command` builds
/// it), the environment, the working directory, `/dev/null` and the output pipe as
/// standard descriptors, and the ids to drop to.
fn clone_plan(
    desired: &Desired,
    program: &Path,
    version_dir: &Path,
    env: &[(String, String)],
    stdout: OwnedFd,
    stderr: OwnedFd,
    run_as: Option<&RunAs>,
) -> Result<clone::Plan> {
    let text = |what: &str, bytes: Vec<u8>| {
        CString::new(bytes).map_err(|_| spawn_failed(desired, format!("{what} holds a NUL byte")))
    };
    let path = |p: &Path| p.as_os_str().as_bytes().to_vec();
    let mut argv = vec![text("the program", path(program))?];
    for arg in desired.argv.iter().skip(1) {
        argv.push(text("an argument", arg.clone().into_bytes())?);
    }
    let env = env
        .iter()
        .map(|(k, v)| text("the environment", format!("{k}={v}").into_bytes()))
        .collect::<Result<Vec<_>>>()?;
    let null = fs::File::open("/dev/null").io("open", Path::new("/dev/null"))?;
    Ok(clone::Plan {
        program: text("the program", path(program))?,
        argv,
        env,
        cwd: text("the version directory", path(version_dir))?,
        stdio: [null.into(), stdout, stderr],
        ids: run_as.map(|r| (r.groups.clone(), r.user.gid, r.user.uid)),
    })
}

/// Makes the child, before anything else runs in it, join its cgroup (when `procs` is
/// the open `cgroup.procs` of one), lead a new session, and drop to `run_as` when given:
/// supplementary groups, then group, then user.
///
/// Writing `0` to `cgroup.procs` moves the writing process (cgroup-v2(7)); done in the
/// child, everything the release later forks is born in the cgroup. A failed write
/// aborts the spawn: a release never runs outside its cgroup. std's `CommandExt::uid`
/// and `gid` clear the supplementary groups and offer no stable way to set them, and a
/// release often needs its user's groups (to read a key, say), so those three calls are
/// made here too.
#[allow(unsafe_code)]
fn pre_exec(command: &mut std::process::Command, procs: Option<i32>, run_as: Option<RunAs>) {
    let ids = run_as.map(|r| (r.groups, r.user.gid, r.user.uid));
    // SAFETY: the closure runs in the forked child before exec. It only makes the write,
    // setsid, setgroups, setgid and setuid system calls on a descriptor and data prepared
    // before the fork (no allocation, no lock, nothing that is not async-signal-safe),
    // and reports failure through the returned io::Error, which aborts the spawn. The
    // descriptor stays open in the parent until the spawn returns.
    unsafe {
        command.pre_exec(move || {
            if let Some(fd) = procs {
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            nix::unistd::setsid()?;
            if let Some((groups, gid, uid)) = &ids {
                nix::unistd::setgroups(groups)?;
                nix::unistd::setgid(*gid)?;
                nix::unistd::setuid(*uid)?;
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::DirBuilderExt;
    use std::time::{Duration, Instant};

    /// The data directory is the release user's: while the agent prepares it, that user
    /// may swap `log/` for a symlink. Nothing the agent does to it may reach the target.
    #[test]
    fn a_data_directory_swapped_for_a_symlink_never_passes_a_change_on() {
        let (dir, root, desired) = super::super::tests::test_root_and_desired("app", "1");
        let victim = dir.path().join("victim");
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&victim)
            .expect("victim");
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o700)).expect("chmod");
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
}
