//! The agent's root directory: the rules for every path the master names, the release
//! layout and its listing, durable writes, free space, and the locks that keep two
//! requests (or two agents) from working on the same thing.
//!
//! Layout under the root:
//!
//! ```text
//! releases/<name>/<version>/   unpacked releases (Start runs from here)
//! <anything else>              files the master writes, e.g. archives/
//! .erel/                       the agent's own state; the master can name nothing here
//!   agent.lock                 held by the one agent serving this root (its pid inside)
//!   staging/                   partial WriteFile transfers
//!   unpack/                    archives being unpacked
//!   unpacked/                  which archive each unpacked directory came from
//!   releases/                  desired state and run records, one file per release
//!   logs/                      release output
//!   trash/                     directories being removed
//! ```
//!
//! One agent per root: an exclusive `flock(2)` ([`AgentLock`]), held for the agent's whole
//! lifetime. Two agents on one root would both adopt the same releases and both restart
//! them when they die. The kernel drops a `flock` when the holder's descriptor closes,
//! `kill -9` and crashes included, so a dead agent never leaves a stale lock; descriptors
//! are close-on-exec, so releases do not inherit it. The root directory itself is locked
//! first (no clean-up under the root can replace it), then `.erel/agent.lock` (which older
//! agents lock), opened without following a symlink; the file holds the holder's pid, for
//! the refusal message only.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use tokio_util::sync::CancellationToken;

use erel_proto::rules::{self, RELEASES_DIR};
use erel_proto::text::shorten;

use crate::error::{Error, IoContext, Result};

/// Name of the agent's state directory under the root.
pub(crate) const STATE_DIR: &str = ".erel";

/// Longest path the master may name, in bytes.
pub(crate) const MAX_PATH_LEN: usize = 1024;

/// Longest component of a path the master names, in bytes: Linux's `NAME_MAX`
/// (`<linux/limits.h>`; the longest name ext4, xfs, btrfs and tmpfs accept).
pub(crate) const MAX_NAME_LEN: usize = 255;

/// What lives in the agent's state directory `root/.erel`, one directory per job, plus
/// the agent's lock file `agent.lock`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum State {
    /// `staging/`: `WriteFile` transfers not yet committed (`<key>.part`).
    Staging,
    /// `unpack/`: `Unpack`'s trees before they are renamed into place.
    Unpack,
    /// `unpacked/`: what was unpacked from which archive (one marker per destination).
    Unpacked,
    /// `releases/`: each release's desired state and current run.
    Releases,
    /// `logs/`: each release's output.
    Logs,
    /// `trash/`: versions on their way out (removed at start-up if a prune was cut).
    Trash,
    /// `agent.lock`: one agent per root.
    AgentLock,
}

impl State {
    /// The directories, created when the root is opened.
    const DIRS: [State; 6] = [
        State::Staging,
        State::Unpack,
        State::Unpacked,
        State::Releases,
        State::Logs,
        State::Trash,
    ];

    fn name(self) -> &'static str {
        match self {
            State::Staging => "staging",
            State::Unpack => "unpack",
            State::Unpacked => "unpacked",
            State::Releases => "releases",
            State::Logs => "logs",
            State::Trash => "trash",
            State::AgentLock => "agent.lock",
        }
    }
}

/// The agent's root directory.
#[derive(Debug, Clone)]
pub(crate) struct Root {
    dir: PathBuf,
}

impl Root {
    /// Opens (creating when missing) the root and its state directories. The root is
    /// canonicalized, so later checks compare real paths.
    pub(crate) fn open(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir).io("create root", dir)?;
        let dir = fs::canonicalize(dir).io("resolve root", dir)?;
        let root = Root { dir };
        for sub in State::DIRS {
            let path = root.state(sub);
            fs::create_dir_all(&path).io("create", &path)?;
        }
        Ok(root)
    }

    /// The root directory, canonical.
    pub(crate) fn path(&self) -> &Path {
        &self.dir
    }

    /// A directory or file inside the state directory `root/.erel`.
    pub(crate) fn state(&self, sub: State) -> PathBuf {
        self.dir.join(STATE_DIR).join(sub.name())
    }

    /// `root/releases/<name>`, after checking `name`.
    pub(crate) fn release_dir(&self, name: &str) -> Result<PathBuf> {
        check_name("release name", name)?;
        Ok(self.dir.join(RELEASES_DIR).join(name))
    }

    /// `root/releases/<name>/<version>` ([`rules::version_dir`]), after checking both.
    pub(crate) fn version_dir(&self, name: &str, version: &str) -> Result<PathBuf> {
        check_name("release version", version)?;
        check_name("release name", name)?;
        Ok(self.dir.join(rules::version_dir(name, version)))
    }

    /// Names of the releases with a directory under `releases/`, sorted.
    pub(crate) fn release_names(&self) -> Vec<String> {
        let found = named_subdirectories(&self.dir.join(RELEASES_DIR), "release name");
        let mut names: Vec<String> = found.into_iter().map(|(_, name)| name).collect();
        names.sort();
        names
    }

    /// Versions of release `name` present on disk, oldest first by modification time
    /// (then by name). Empty for an unknown or invalid name.
    pub(crate) fn versions(&self, name: &str) -> Vec<String> {
        let Ok(dir) = self.release_dir(name) else {
            return Vec::new();
        };
        let mut found = named_subdirectories(&dir, "release version");
        found.sort();
        found.into_iter().map(|(_, version)| version).collect()
    }

    /// `path` (under the root) relative to the root, as a string: the key of what the
    /// agent records per path. Rebuilt from components, so `a//b` and `a/b` are one key.
    pub(crate) fn relative(&self, path: &Path) -> String {
        let inside = path.strip_prefix(&self.dir).unwrap_or(path);
        inside
            .components()
            .collect::<PathBuf>()
            .to_string_lossy()
            .into_owned()
    }

    /// Resolves a path the master named, relative to the root.
    ///
    /// Refused: empty, too long, absolute, any `..` or `.` component, NUL bytes, anything
    /// inside the agent's state directory, and any existing ancestor (or the path itself)
    /// that is a symlink. Nothing is created.
    pub(crate) fn resolve(&self, relative: &str) -> Result<PathBuf> {
        let rel = check_relative(relative)?;
        if rel.components().next() == Some(Component::Normal(OsStr::new(STATE_DIR))) {
            return Err(Error::invalid_path(
                relative,
                "names the agent's own state directory",
            ));
        }
        // Walk every prefix below the root: none may be a symlink, and every existing
        // ancestor must be a directory.
        let mut current = self.dir.clone();
        let components: Vec<_> = rel.components().collect();
        for (i, component) in components.iter().enumerate() {
            current.push(component);
            match fs::symlink_metadata(&current) {
                Ok(meta) => self.check_step(relative, &current, &meta, i + 1 < components.len())?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) => return Err(Error::io("inspect", &current, e)),
            }
        }
        Ok(self.dir.join(&rel))
    }

    /// Refuses `current`, a step of the path `relative`, when it is a symlink, or when
    /// it is not a directory and more is to come below it.
    fn check_step(
        &self,
        relative: &str,
        current: &Path,
        meta: &fs::Metadata,
        below: bool,
    ) -> Result<()> {
        let shown = current.strip_prefix(&self.dir).unwrap_or(current).display();
        if meta.file_type().is_symlink() {
            return Err(Error::invalid_path(
                relative,
                format!("passes through the symlink {shown}"),
            ));
        }
        if below && !meta.is_dir() {
            return Err(Error::invalid_path(
                relative,
                format!("{shown} is not a directory"),
            ));
        }
        Ok(())
    }

    /// Creates the missing parent directories of a path the master named, one
    /// component at a time, never through a symlink (each new directory's parent is
    /// synced, so it survives a crash); then resolves the path as [`Root::resolve`]
    /// does. Nothing is created outside the root even if a symlink appears meanwhile.
    pub(crate) fn create_parents(&self, relative: &str) -> Result<PathBuf> {
        let rel = check_relative(relative)?;
        self.resolve(relative)?;
        let components: Vec<_> = rel.components().collect();
        let mut current = self.dir.clone();
        for component in &components[..components.len().saturating_sub(1)] {
            current.push(component);
            let created = match fs::create_dir(&current) {
                Ok(()) => true,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
                Err(e) => return Err(Error::io("create directory", &current, e)),
            };
            // `mkdir` does not follow a symlink in the last component: check what is there.
            let meta = fs::symlink_metadata(&current).io("inspect", &current)?;
            self.check_step(relative, &current, &meta, true)?;
            if created {
                sync_parent(&current)?;
            }
        }
        self.resolve(relative)
    }
}

/// Real directories (not symlinks) directly under `dir` whose names are valid as `what`
/// ([`check_name`]), with their modification time.
fn named_subdirectories(dir: &Path, what: &str) -> Vec<(SystemTime, String)> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let meta = fs::symlink_metadata(entry.path()).ok()?;
            let name = entry.file_name().into_string().ok()?;
            check_name(what, &name).ok()?;
            let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            meta.is_dir().then_some((modified, name))
        })
        .collect()
}

/// Checks a path the master named: relative, normal components only, bounded.
pub(crate) fn check_relative(relative: &str) -> Result<PathBuf> {
    if relative.is_empty() {
        return Err(Error::invalid_path(relative, "empty path"));
    }
    check_lengths(relative)?;
    if relative.contains('\0') {
        return Err(Error::invalid_path(relative, "contains a NUL byte"));
    }
    let path = Path::new(relative);
    if path.is_absolute() {
        return Err(Error::invalid_path(
            relative,
            "absolute paths are refused; name a path relative to the agent's root",
        ));
    }
    // By the text, not `Path::components`, which hides a `.` in the middle.
    let has = |step: &str| relative.split('/').any(|part| part == step);
    if has("..") {
        return Err(Error::invalid_path(relative, "contains '..'"));
    }
    if has(".") {
        return Err(Error::invalid_path(relative, "contains '.'"));
    }
    Ok(path.to_path_buf())
}

/// Checks the lengths of a path the master named, before anything else looks at it:
/// at most [`MAX_PATH_LEN`] bytes in all and [`MAX_NAME_LEN`] bytes per component.
/// Refused with [`Error::InvalidPath`] naming the limit.
pub(crate) fn check_lengths(relative: &str) -> Result<()> {
    if relative.len() > MAX_PATH_LEN {
        return Err(Error::invalid_path(
            relative,
            format!(
                "{} bytes long, above the limit of {MAX_PATH_LEN} bytes",
                relative.len()
            ),
        ));
    }
    if let Some(long) = relative.split('/').find(|part| part.len() > MAX_NAME_LEN) {
        return Err(Error::invalid_path(
            relative,
            format!(
                "a component of {} bytes ('{}') is above the file-system limit of \
                 {MAX_NAME_LEN} bytes (NAME_MAX)",
                long.len(),
                shorten(long, 64)
            ),
        ));
    }
    Ok(())
}

/// Checks a release name or version against the protocol's rule
/// ([`erel_proto::rules::check_release_name`]); refused with [`Error::InvalidPath`].
pub(crate) fn check_name(what: &str, name: &str) -> Result<()> {
    rules::check_release_name(name)
        .map_err(|fault| Error::invalid_path(name, format!("not a valid {what}: {fault}")))
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, fsync, rename, fsync
/// of the directory. Readers see the old content or the new, never a mix, and so does
/// the next boot after a crash of the machine.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let tmp = write_beside(path, bytes, mode, true)?;
    rename_durably(&tmp, path)
}

/// Writes `bytes` to `path` atomically for every process of this boot (a temporary file
/// beside it, renamed over `path`; rename(2) replaces atomically), without waiting for
/// the disk: an agent that crashes and restarts reads the old content or the new, but
/// after a crash of the machine the file may hold either, or be empty or missing. For
/// what describes the processes of this boot only, which such a crash ends anyway.
pub(crate) fn write_replacing(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let tmp = write_beside(path, bytes, mode, false)?;
    fs::rename(&tmp, path).io("rename into place", path)
}

/// Writes `bytes` to a temporary file beside `path` (fsynced when `durable`), returning
/// its path.
fn write_beside(path: &Path, bytes: &[u8], mode: u32, durable: bool) -> Result<PathBuf> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .io("create", &tmp)?;
    file.write_all(bytes).io("write", &tmp)?;
    if durable {
        file.sync_all().io("fsync", &tmp)?;
    }
    Ok(tmp)
}

/// Renames `from` (already synced) to `to` and fsyncs `to`'s directory, so the rename
/// survives a crash.
pub(crate) fn rename_durably(from: &Path, to: &Path) -> Result<()> {
    fs::rename(from, to).io("rename into place", to)?;
    sync_parent(to)
}

/// Starts writing `len` bytes of `file` from `offset` (bytes) to the disk and returns
/// without waiting for them: `sync_file_range(2)` with `SYNC_FILE_RANGE_WRITE`, which
/// queues the range's dirty pages for write-out (it may block briefly when the device's
/// queue is full). A later `fsync` then has only the rest left to wait for. It makes
/// nothing durable by itself: no metadata is written and nothing waits for the device,
/// so callers still `fsync` before they rely on the bytes (see the man page's warning).
///
/// Errors are those of `sync_file_range(2)`: `EBADF`, `EINVAL` (a negative or overflowing
/// range), `ESPIPE` (not a regular file, directory or block device), `EIO`, `ENOMEM`.
pub(crate) fn start_writeback(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let invalid = |_| std::io::Error::from_raw_os_error(libc::EINVAL);
    let offset = i64::try_from(offset).map_err(invalid)?;
    let len = i64::try_from(len).map_err(invalid)?;
    let fd = file.as_raw_fd();
    #[allow(unsafe_code)]
    // SAFETY: `fd` is borrowed from `file`, open for the whole call; the call reads no
    // memory of ours and changes nothing but the kernel's write-out of the file's pages.
    // Neither nix nor rustix wraps this system call.
    let done = unsafe { libc::sync_file_range(fd, offset, len, libc::SYNC_FILE_RANGE_WRITE) };
    if done == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Fsyncs the directory holding `path`.
fn sync_parent(path: &Path) -> Result<()> {
    match path.parent() {
        Some(parent) => sync_dir(parent),
        None => Ok(()),
    }
}

/// Fsyncs a directory so a rename inside it survives a crash.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .io("fsync directory", dir)
}

/// Removes a file; one already gone is not an error.
pub(crate) fn remove_if_present(path: &Path) -> Result<()> {
    unless_gone(path, fs::remove_file(path))
}

/// The outcome of removing `path`; that it was already gone is not an error.
fn unless_gone(path: &Path, removed: std::io::Result<()>) -> Result<()> {
    match removed {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io("remove", path, e)),
        _ => Ok(()),
    }
}

/// Removes everything inside `dir` (not `dir` itself): files, and directories whole.
/// Used at start-up on staging and trash directories a crash may have left full.
pub(crate) fn empty_dir(dir: &Path) -> Result<()> {
    let entries = fs::read_dir(dir).io("list", dir)?;
    for entry in entries {
        let path = entry.io("list", dir)?.path();
        let removed = if fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        unless_gone(&path, removed)?;
    }
    Ok(())
}

/// Free bytes for an unprivileged writer on the file system holding `path`.
pub(crate) fn free_disk(path: &Path) -> u64 {
    match nix::sys::statvfs::statvfs(path) {
        // The field types differ between platforms; on some the conversion is a no-op.
        #[allow(clippy::useless_conversion)]
        Ok(stat) => {
            u64::from(stat.blocks_available()).saturating_mul(u64::from(stat.fragment_size()))
        }
        Err(_) => 0,
    }
}

/// A claim on one path by one request at a time within this process, released on drop.
///
/// Two transfers of the same staging file, or two unpacks into the same destination,
/// would corrupt each other; the second is refused with [`Error::Busy`] instead, or,
/// through [`PathLock::take_over`], asks the first to let go and waits for it.
#[derive(Debug)]
pub(crate) struct PathLock {
    key: PathBuf,
    /// Cancelled when a newer request asks this holder to let go.
    wanted: CancellationToken,
}

/// How often [`PathLock::take_over`] looks whether the holder has let go.
const TAKE_OVER_POLL: Duration = Duration::from_millis(20);

fn held_paths() -> std::sync::MutexGuard<'static, BTreeMap<PathBuf, CancellationToken>> {
    static HELD: Mutex<BTreeMap<PathBuf, CancellationToken>> = Mutex::new(BTreeMap::new());
    // Every operation on the set is a single insert, lookup or remove, so a panic
    // elsewhere cannot leave it inconsistent: a poisoned lock is still usable.
    HELD.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl PathLock {
    /// Claims `key` (an absolute path on the agent). `name` is what the master called
    /// the thing, for the error when another request holds it.
    pub(crate) fn acquire(key: PathBuf, name: &str) -> Result<PathLock> {
        Self::try_claim(&key).ok_or_else(|| {
            Error::Busy(format!(
                "another request is working on {name}; retry when it is done"
            ))
        })
    }

    /// Claims `key` for a request that repeats one whose connection may be gone: when
    /// another request holds it, that holder is asked to let go (see
    /// [`PathLock::wanted`]) and this call waits up to `wait` for it. Blocking.
    ///
    /// Errors: [`Error::Busy`] when the holder has not let go within `wait` (it is in a
    /// step it cannot leave, such as the final fsync and rename).
    pub(crate) fn take_over(key: PathBuf, name: &str, wait: Duration) -> Result<PathLock> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(lock) = Self::try_claim(&key) {
                return Ok(lock);
            }
            if let Some(holder) = held_paths().get(&key) {
                holder.cancel();
            }
            if Instant::now() >= deadline {
                return Err(Error::Busy(format!(
                    "another request is working on {name} and did not let go within {} ms; \
                     retry when it is done",
                    wait.as_millis()
                )));
            }
            std::thread::sleep(TAKE_OVER_POLL);
        }
    }

    fn try_claim(key: &Path) -> Option<PathLock> {
        let mut held = held_paths();
        if held.contains_key(key) {
            return None;
        }
        let wanted = CancellationToken::new();
        held.insert(key.to_path_buf(), wanted.clone());
        Some(PathLock {
            key: key.to_path_buf(),
            wanted,
        })
    }

    /// Cancelled when a newer request for the same key asks this holder to let go
    /// ([`PathLock::take_over`]); the holder then ends its work, keeping what it did.
    pub(crate) fn wanted(&self) -> CancellationToken {
        self.wanted.clone()
    }

    /// Whether some request holds `key` now.
    pub(crate) fn is_held(key: &Path) -> bool {
        held_paths().contains_key(key)
    }
}

impl Drop for PathLock {
    fn drop(&mut self) {
        held_paths().remove(&self.key);
    }
}

/// A name no other call in this process, nor an earlier run of the agent, has used:
/// process id, nanoseconds since the epoch and a counter.
pub(crate) fn unique_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{}-{nanos}-{n}", std::process::id())
}

/// The lock that makes this process the one agent serving a root; released when dropped
/// (or when the process ends, however it ends).
#[derive(Debug)]
pub(crate) struct AgentLock {
    _root: Flock<File>,
    _lock: Flock<File>,
}

impl AgentLock {
    /// Takes the lock of `root` without waiting, and writes this process's pid into it.
    ///
    /// # Errors
    ///
    /// [`Error::RootInUse`] when another live process holds it (its pid, read from the
    /// file or else from `/proc/locks`, is in the error); [`Error::Io`] when the file cannot
    /// be opened, locked or written.
    pub(crate) fn acquire(root: &Root) -> Result<AgentLock> {
        let path = root.state(State::AgentLock);
        let dir = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(root.path())
            .io("open the root to lock it", root.path())?;
        let root_lock = lock_or_refuse(dir, root, root.path(), &path)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .io("open the agent lock (a regular file, not a link)", &path)?;
        let lock = lock_or_refuse(file, root, &path, &path)?;
        let pid = format!("{}\n", std::process::id());
        lock.set_len(0)
            .and_then(|()| lock.write_all_at(pid.as_bytes(), 0))
            .io("write the agent lock", &path)?;
        Ok(AgentLock {
            _root: root_lock,
            _lock: lock,
        })
    }
}

/// Takes an exclusive `flock` on `file` (opened at `locked`) without waiting; refuses
/// with the holder's pid, read from the pid file `pid_file` or else from `/proc/locks`.
fn lock_or_refuse(file: File, root: &Root, locked: &Path, pid_file: &Path) -> Result<Flock<File>> {
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(lock),
        Err((_, Errno::EWOULDBLOCK)) => Err(Error::RootInUse {
            root: root.path().to_path_buf(),
            holder: holder_pid(pid_file, locked),
        }),
        Err((_, errno)) => Err(Error::io("lock", locked, errno.into())),
    }
}

/// The pid of the agent holding the lock on `locked`: the pid in `pid_file`, or, while it
/// has not written it yet (or the file was removed), the holder `/proc/locks` names for
/// the inode of `locked`.
fn holder_pid(pid_file: &Path, locked: &Path) -> Option<u32> {
    let from_file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(pid_file)
        .and_then(std::io::read_to_string)
        .ok()
        .and_then(|text| text.trim().parse::<u32>().ok());
    from_file.or_else(|| {
        let meta = fs::metadata(locked).ok()?;
        let locks = fs::read_to_string("/proc/locks").ok()?;
        flock_holder(&locks, meta.dev(), meta.ino())
    })
}

/// Finds the pid holding a `FLOCK` on inode `ino` of device `dev` in the text of
/// `/proc/locks` (see `proc(5)`: `id: FLOCK ADVISORY WRITE pid major:minor:inode start
/// end`, major and minor in hexadecimal).
fn flock_holder(locks: &str, dev: u64, ino: u64) -> Option<u32> {
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // A lock others wait for is shown with "->" before its id; skip those.
        if fields.get(1) != Some(&"FLOCK") {
            return None;
        }
        let mut id = fields.get(5)?.split(':');
        let maj = u32::from_str_radix(id.next()?, 16).ok()?;
        let min = u32::from_str_radix(id.next()?, 16).ok()?;
        let inode: u64 = id.next()?.parse().ok()?;
        (maj == major && min == minor && inode == ino)
            .then(|| fields.get(4)?.parse().ok())
            .flatten()
    })
}

/// A fresh root, `root/` in a new temporary directory (so that anything written beside
/// the root shows up there), for tests.
#[cfg(test)]
pub(crate) fn temp_root() -> (tempfile::TempDir, Root) {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = Root::open(&dir.path().join("root")).expect("open root");
    (dir, root)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> (tempfile::TempDir, Root) {
        temp_root()
    }

    #[test]
    fn writeback_starts_on_files_and_refuses_pipes_and_huge_ranges() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let mut file = File::create(&path).expect("create");
        file.write_all(&[7u8; 100_000]).expect("write");
        start_writeback(&file, 0, 100_000).expect("a written range");
        start_writeback(&file, 4096, 0).expect("to the end of the file");
        file.sync_all().expect("fsync");
        assert_eq!(fs::read(&path).expect("read"), vec![7u8; 100_000]);

        let huge = start_writeback(&file, u64::MAX, 1).unwrap_err();
        assert_eq!(huge.raw_os_error(), Some(libc::EINVAL), "{huge}");
        let (read, _write) = nix::unistd::pipe().expect("pipe");
        let pipe = File::from(read);
        let refused = start_writeback(&pipe, 0, 1).unwrap_err();
        assert_eq!(refused.raw_os_error(), Some(libc::ESPIPE), "{refused}");
    }

    #[test]
    fn accepts_plain_relative_paths() {
        let (_dir, root) = root();
        let p = root.resolve("archives/beat-0.1.0.tar.gz").expect("ok");
        assert_eq!(p, root.path().join("archives/beat-0.1.0.tar.gz"));
    }

    #[test]
    fn refuses_escapes_and_state() {
        let (_dir, root) = root();
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a/./b",
            "./a",
            ".erel/releases/x",
            ".erel",
            "a\0b",
        ] {
            let err = root.resolve(bad).unwrap_err();
            assert!(matches!(err, Error::InvalidPath { .. }), "{bad:?}: {err}");
        }
        let long = "a/".repeat(600);
        assert!(root.resolve(&long).is_err());
    }

    #[test]
    fn refuses_paths_through_symlinks() {
        let (_dir, root) = root();
        let outside = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink(outside.path(), root.path().join("link")).expect("symlink");
        let err = root.resolve("link/file").unwrap_err();
        assert!(err.to_string().contains("symlink link"), "{err}");
        let err = root.resolve("link").unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
    }

    #[test]
    fn names_are_single_components() {
        assert!(check_name("release name", "beat").is_ok());
        assert!(check_name("release version", "0.2.0+build.1").is_ok());
        for bad in ["", ".", "..", ".hidden", "a/b", "a b", "x\0"] {
            assert!(check_name("release name", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn lengths_are_checked_before_anything_quotes_the_path() {
        // The issue's input: byte 64 falls inside an `é`.
        let dest = format!("a{}", "é".repeat(600));
        let err = check_relative(&dest).unwrap_err();
        assert!(matches!(err, Error::InvalidPath { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("1201 bytes") && text.contains("1024 bytes"),
            "{text}"
        );
        assert!(text.len() < 400, "quoted short: {text}");
        // Exactly at the limits, multi-byte: accepted.
        let c = format!("a{}", "é".repeat(127));
        let at_limit = format!("{c}/{c}/{c}/{}/a", "é".repeat(127));
        assert_eq!((c.len(), at_limit.len()), (MAX_NAME_LEN, MAX_PATH_LEN));
        check_relative(&at_limit).expect("at the limits");
        // One byte over either limit: refused, naming it.
        let err = check_relative(&format!("{at_limit}b")).unwrap_err();
        assert!(err.to_string().contains("1024 bytes"), "{err}");
        let err = check_relative(&format!("{c}é")).unwrap_err();
        assert!(err.to_string().contains("257 bytes"), "{err}");
        assert!(err.to_string().contains("255 bytes (NAME_MAX)"), "{err}");
        // A NUL past the limit does not matter: the length is what is reported.
        let err = check_relative(&format!("{}\0", "é".repeat(600))).unwrap_err();
        assert!(err.to_string().contains("1024 bytes"), "{err}");
    }

    #[test]
    fn long_names_are_refused_naming_the_limit() {
        let name = "a".repeat(rules::MAX_RELEASE_NAME_LEN);
        check_name("release name", &name).expect("at the limit");
        for long in [
            format!("{name}a"),
            "é".repeat(600),
            format!("a{}", "é".repeat(64)),
        ] {
            let err = check_name("release name", &long).unwrap_err();
            let text = err.to_string();
            assert!(matches!(err, Error::InvalidPath { .. }), "{text}");
            assert!(text.contains("above the limit of 128 bytes"), "{text}");
        }
    }

    #[test]
    fn atomic_write_replaces_content() {
        let (_dir, root) = root();
        let path = root.state(State::Releases).join("beat.json");
        write_atomic(&path, b"one", 0o600).expect("write");
        write_atomic(&path, b"two", 0o600).expect("write");
        assert_eq!(fs::read(&path).expect("read"), b"two");
        let leftovers: Vec<_> = fs::read_dir(root.state(State::Releases))
            .expect("list")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn a_claim_is_exclusive_and_released_on_drop() {
        let key = std::env::temp_dir().join(format!("erel-lock-{}", unique_name()));
        let held = PathLock::acquire(key.clone(), "thing").expect("first claim");
        let err = PathLock::acquire(key.clone(), "thing").unwrap_err();
        assert!(matches!(err, Error::Busy(_)), "{err}");
        assert!(err.to_string().contains("thing"), "{err}");
        assert!(PathLock::is_held(&key));
        drop(held);
        assert!(!PathLock::is_held(&key));
        PathLock::acquire(key, "thing").expect("free again");
    }

    #[test]
    fn a_take_over_asks_the_holder_and_is_busy_when_it_does_not_let_go() {
        let key = std::env::temp_dir().join(format!("erel-lock-{}", unique_name()));
        let held = PathLock::acquire(key.clone(), "thing").expect("claim");
        let wait = Duration::from_millis(300);
        let started = Instant::now();
        let err = PathLock::take_over(key.clone(), "thing", wait).unwrap_err();
        assert!(started.elapsed() >= wait, "waited the whole bound");
        assert!(matches!(err, Error::Busy(_)), "{err}");
        assert!(
            err.to_string().contains("thing") && err.to_string().contains("did not let go"),
            "{err}"
        );
        assert!(
            held.wanted().is_cancelled(),
            "the holder was asked to let go"
        );

        // A holder that lets go when asked hands over within the bound.
        let wanted = held.wanted();
        let letting_go = std::thread::spawn(move || {
            crate::wait::until_blocking(Duration::from_secs(10), || wanted.is_cancelled());
            drop(held);
        });
        PathLock::take_over(key.clone(), "thing", Duration::from_secs(10)).expect("handed over");
        letting_go.join().expect("join");
    }

    fn lock_file(root: &Root) -> PathBuf {
        root.state(State::AgentLock)
    }

    #[test]
    fn a_second_lock_is_refused_naming_the_holder_until_the_first_is_dropped() {
        let (_dir, root) = root();
        let first = AgentLock::acquire(&root).expect("first lock");
        // flock locks belong to an open file description: a second open in the same
        // process conflicts just as another process would.
        let err = AgentLock::acquire(&root).expect_err("second lock");
        let text = err.to_string();
        assert!(
            matches!(err, Error::RootInUse { holder: Some(pid), .. } if pid == std::process::id()),
            "{text}"
        );
        assert!(text.contains(&std::process::id().to_string()), "{text}");
        assert!(text.contains(&root.path().display().to_string()), "{text}");
        drop(first);
        let _again = AgentLock::acquire(&root).expect("lock after release");
        assert_eq!(
            std::fs::read_to_string(lock_file(&root)).expect("read"),
            format!("{}\n", std::process::id())
        );
    }

    #[test]
    fn the_holder_is_found_in_proc_locks_when_the_file_is_empty() {
        let (_dir, root) = root();
        let lock = AgentLock::acquire(&root).expect("lock");
        // As if the holder had locked but not yet written its pid.
        lock._lock.set_len(0).expect("truncate");
        let err = AgentLock::acquire(&root).expect_err("refused");
        assert!(
            matches!(err, Error::RootInUse { holder: Some(pid), .. } if pid == std::process::id()),
            "{err}"
        );
    }

    #[test]
    fn a_child_process_does_not_inherit_the_lock() {
        let (_dir, root) = root();
        let lock = AgentLock::acquire(&root).expect("lock");
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        drop(lock);
        let again = AgentLock::acquire(&root);
        let _ = child.kill();
        let _ = child.wait();
        again.expect("the child holds nothing once the agent let go");
    }

    #[test]
    fn a_removed_or_replaced_lock_file_lets_no_second_agent_in() {
        let (dir, root) = root();
        let _first = AgentLock::acquire(&root).expect("first lock");
        std::fs::remove_file(lock_file(&root)).expect("remove the lock file");
        let err = AgentLock::acquire(&root).expect_err("refused after a removal");
        assert!(
            matches!(err, Error::RootInUse { holder: Some(pid), .. } if pid == std::process::id()),
            "{err}"
        );
        std::fs::write(lock_file(&root), "").expect("replace the lock file");
        let err = AgentLock::acquire(&root).expect_err("refused after a replacement");
        assert!(
            matches!(err, Error::RootInUse { holder: Some(pid), .. } if pid == std::process::id()),
            "{err}"
        );
        // The same root named through a symlink, a trailing slash or `..` is the same root.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(root.path(), &link).expect("symlink");
        for alias in [
            link.clone(),
            PathBuf::from(format!("{}/", root.path().display())),
            root.path().join(".erel").join(".."),
        ] {
            let other = Root::open(&alias).expect("alias root");
            assert!(
                matches!(AgentLock::acquire(&other), Err(Error::RootInUse { .. })),
                "{}",
                alias.display()
            );
        }
    }

    #[test]
    fn the_pid_is_never_written_through_a_symlinked_lock_file() {
        let (dir, root) = root();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep me\n").expect("victim");
        let path = lock_file(&root);
        std::os::unix::fs::symlink(&victim, &path).expect("symlink");
        let err = AgentLock::acquire(&root).expect_err("a symlinked lock file is refused");
        assert!(err.to_string().contains("agent.lock"), "{err}");
        assert_eq!(std::fs::read_to_string(&victim).expect("read"), "keep me\n");
    }

    #[test]
    fn proc_locks_lines_are_parsed() {
        let text = "1: POSIX  ADVISORY  WRITE 77 08:01:42 0 EOF\n\
                    2: FLOCK  ADVISORY  WRITE 4242 00:2c:1234 0 EOF\n\
                    2: -> FLOCK  ADVISORY  WRITE 4343 00:2c:1234 0 EOF\n";
        let dev = libc::makedev(0, 0x2c);
        assert_eq!(flock_holder(text, dev, 1234), Some(4242));
        assert_eq!(flock_holder(text, dev, 42), None);
        assert_eq!(flock_holder(text, libc::makedev(8, 1), 42), None);
    }
}
