//! One agent per root: an exclusive `flock(2)` on `.erel/agent.lock`, held for the
//! agent's whole lifetime.
//!
//! Two agents on one root would both adopt the same releases and both restart them when
//! they die, leaving two copies running. So the agent takes this lock before it touches
//! anything under the root (sweeps, recovery, listening) and refuses to start when another
//! process holds it, naming that process's pid.
//!
//! Why `flock(2)` (see `flock(2)`, "locks created by flock() are associated with an open
//! file description"): the kernel drops the lock when the holder's descriptor closes,
//! which includes `kill -9` and a crash, so a dead agent never leaves a stale lock. The
//! descriptor is opened close-on-exec, so release processes the agent spawns do not
//! inherit it and cannot keep the next agent out after this one is gone. The file holds
//! the holder's pid as decimal text, for the refusal message only: the lock, not the
//! file's content, decides.
//!
//! The lock file alone is not enough: removed or replaced while an agent runs (by hand,
//! by a clean-up of `.erel/`), the next agent would create a new file, lock it and run
//! beside the first. So the agent first locks the root directory itself, which no
//! clean-up under the root can replace, and then the file (which agents that lock only
//! the file still see). The file is opened without following a symlink, so the pid is
//! never written through one into another file.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::error::{Error, Result};
use crate::root::Root;

/// The lock file, under the state directory.
pub const AGENT_LOCK_FILE: &str = "agent.lock";

/// The lock that makes this process the one agent serving a root; released when dropped
/// (or when the process ends, however it ends).
#[derive(Debug)]
pub struct AgentLock {
    _root: Flock<File>,
    _lock: Flock<File>,
    path: PathBuf,
}

impl AgentLock {
    /// Takes the lock of `root` without waiting, and writes this process's pid into it.
    ///
    /// # Errors
    ///
    /// [`Error::RootInUse`] when another live process holds it (its pid, read from the
    /// file or else from `/proc/locks`, is in the error); [`Error::Io`] when the file cannot
    /// be opened, locked or written.
    pub fn acquire(root: &Root) -> Result<AgentLock> {
        let path = root.state_dir().join(AGENT_LOCK_FILE);
        let dir = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(root.path())
            .map_err(|e| Error::io("open the root to lock it", root.path(), e))?;
        let root_lock = lock_or_refuse(dir, root, root.path(), &path)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| Error::io("open the agent lock (a regular file, not a link)", &path, e))?;
        let lock = lock_or_refuse(file, root, &path, &path)?;
        let pid = format!("{}\n", std::process::id());
        lock.set_len(0)
            .and_then(|()| lock.write_all_at(pid.as_bytes(), 0))
            .map_err(|e| Error::io("write the agent lock", &path, e))?;
        Ok(AgentLock {
            _root: root_lock,
            _lock: lock,
            path,
        })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
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
        Err((_, errno)) => Err(Error::io(
            "lock",
            locked,
            std::io::Error::from_raw_os_error(errno as i32),
        )),
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
        .and_then(|mut file| {
            let mut text = String::new();
            file.read_to_string(&mut text).map(|_| text)
        })
        .ok()
        .and_then(|text| text.trim().parse::<u32>().ok());
    if from_file.is_some() {
        return from_file;
    }
    let meta = std::fs::metadata(locked).ok()?;
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    flock_holder(&locks, meta.dev(), meta.ino())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_naming_the_holder_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = Root::open(dir.path()).expect("root");
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
        let again = AgentLock::acquire(&root).expect("lock after release");
        assert_eq!(
            std::fs::read_to_string(again.path()).expect("read"),
            format!("{}\n", std::process::id())
        );
    }

    #[test]
    fn the_holder_is_found_in_proc_locks_when_the_file_is_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = Root::open(dir.path()).expect("root");
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
        let dir = tempfile::tempdir().expect("tempdir");
        let root = Root::open(dir.path()).expect("root");
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
        let dir = tempfile::tempdir().expect("tempdir");
        let root = Root::open(dir.path()).expect("root");
        let first = AgentLock::acquire(&root).expect("first lock");
        std::fs::remove_file(first.path()).expect("remove the lock file");
        let err = AgentLock::acquire(&root).expect_err("refused after a removal");
        assert!(
            matches!(err, Error::RootInUse { holder: Some(pid), .. } if pid == std::process::id()),
            "{err}"
        );
        std::fs::write(first.path(), "").expect("replace the lock file");
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
        let dir = tempfile::tempdir().expect("tempdir");
        let root = Root::open(dir.path()).expect("root");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep me\n").expect("victim");
        let path = root.state_dir().join(AGENT_LOCK_FILE);
        std::os::unix::fs::symlink(&victim, &path).expect("symlink");
        let err = AgentLock::acquire(&root).expect_err("a symlinked lock file is refused");
        assert!(err.to_string().contains(AGENT_LOCK_FILE), "{err}");
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
