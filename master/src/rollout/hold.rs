//! Who acts on a cluster file (file mode), by `flock(2)` on two files in the state
//! directory beside it (`.erel-state/`):
//!
//! - `daemon.lock`: held by `erel master --cluster FILE` for its whole life. A second
//!   daemon on the same file refuses to start, and `erel deploy` refuses to act on a
//!   cluster a daemon keeps unless told `--take-over`; both name the holder.
//! - `rollout.lock`: held by whoever rolls out at the moment: the daemon during each
//!   of its passes, `erel deploy` during its rollout. The daemon skips a pass while a
//!   deploy holds it, so the two never switch the same hosts at once; a deploy with
//!   `--take-over` waits (bounded) for the daemon's pass in progress to end.
//!
//! Each file names its holder (master, pid, since) as JSON, written after the lock was
//! taken. The kernel drops a `flock` when its holder exits, even on `kill -9`, so a lock
//! is never left behind by a dead process; the file's text may be, and is then ignored.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::halt::state_dir;
use crate::error::{Error, Result};

/// The daemon's lock file, in the state directory.
pub const DAEMON_LOCK: &str = "daemon.lock";
/// The lock held while rolling out, in the state directory.
pub const ROLLOUT_LOCK: &str = "rollout.lock";
/// How often a deploy waiting for [`ROLLOUT_LOCK`] tries again.
const LOCK_POLL: Duration = Duration::from_millis(100);

/// Who holds a lock, as its holder wrote it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// The master's name (`erel@<host name>`), or what the command calls itself.
    pub master: String,
    /// Its process id.
    pub pid: u32,
    /// When it took the lock, in milliseconds since the Unix epoch.
    pub since_ms: u64,
}

impl Holder {
    /// This process, as `master`, from now.
    pub fn this_process(master: &str) -> Self {
        Holder {
            master: master.to_string(),
            pid: std::process::id(),
            since_ms: crate::amqp::now_ms(),
        }
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ago = crate::amqp::now_ms().saturating_sub(self.since_ms) / 1000;
        write!(f, "{} (pid {}), for {ago} s", self.master, self.pid)
    }
}

/// A lock held; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct HeldLock {
    _lock: Flock<File>,
    path: PathBuf,
}

impl HeldLock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Someone else holds a lock: who, when the file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Busy {
    /// The lock file.
    pub path: PathBuf,
    /// Its holder, unless it has not written itself in yet.
    pub holder: Option<Holder>,
}

impl std::fmt::Display for Busy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.holder {
            Some(holder) => write!(f, "{holder} (lock {})", self.path.display()),
            None => write!(f, "a process that holds {}", self.path.display()),
        }
    }
}

/// Takes the lock `name` beside `cluster` without waiting, writing `holder` into it
/// (unless `None`: a look at whether it is free, which leaves the file as it is).
///
/// # Errors
///
/// [`Error::Local`] naming the file when it cannot be created, locked or written.
fn try_lock(
    cluster: &Path,
    name: &str,
    holder: Option<&Holder>,
) -> Result<std::result::Result<HeldLock, Busy>> {
    let dir = state_dir(cluster);
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::local(&dir, format!("cannot create the directory: {e}")))?;
    let path = dir.join(name);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::local(&path, format!("cannot open the lock file: {e}")))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => {
            let Some(holder) = holder else {
                return Ok(Ok(HeldLock { _lock: lock, path }));
            };
            let text = serde_json::to_vec(holder)
                .map_err(|e| Error::local(&path, format!("cannot encode the holder: {e}")))?;
            lock.set_len(0)
                .and_then(|()| lock.write_all_at(&text, 0))
                .map_err(|e| Error::local(&path, format!("cannot write the holder: {e}")))?;
            Ok(Ok(HeldLock { _lock: lock, path }))
        }
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            let holder = std::fs::read(&path)
                .ok()
                .and_then(|bytes| serde_json::from_slice(&bytes).ok());
            Ok(Err(Busy { path, holder }))
        }
        Err((_, e)) => Err(Error::local(&path, format!("cannot lock: {e}"))),
    }
}

/// The daemon's lock on `cluster`, for its whole life.
///
/// # Errors
///
/// [`Error::Usage`] naming the daemon that already keeps the file; [`Error::Local`]
/// when the lock file cannot be used.
pub fn daemon_lock(cluster: &Path, master: &str) -> Result<HeldLock> {
    try_lock(cluster, DAEMON_LOCK, Some(&Holder::this_process(master)))?.map_err(|busy| {
        Error::Usage(format!(
            "{}: another daemon already keeps this cluster: {busy}",
            cluster.display()
        ))
    })
}

/// The daemon that keeps `cluster`, if one runs. Creates nothing.
///
/// # Errors
///
/// [`Error::Local`] when the lock file cannot be used.
pub fn daemon_holder(cluster: &Path) -> Result<Option<Busy>> {
    if !state_dir(cluster).join(DAEMON_LOCK).exists() {
        // No daemon ever ran on this file: a daemon makes it before it starts.
        return Ok(None);
    }
    Ok(try_lock(cluster, DAEMON_LOCK, None)?.err())
}

/// The rollout lock if it is free now (for the daemon's passes).
///
/// # Errors
///
/// [`Error::Local`] when the lock file cannot be used.
pub fn try_rollout_lock(
    cluster: &Path,
    master: &str,
) -> Result<std::result::Result<HeldLock, Busy>> {
    try_lock(cluster, ROLLOUT_LOCK, Some(&Holder::this_process(master)))
}

/// The rollout lock, waiting up to `limit` for its holder (a daemon's pass in
/// progress) to let it go.
///
/// # Errors
///
/// [`Error::Usage`] naming the holder when it kept the lock for all of `limit`;
/// [`Error::Local`] when the lock file cannot be used.
pub async fn wait_rollout_lock(cluster: &Path, master: &str, limit: Duration) -> Result<HeldLock> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match try_rollout_lock(cluster, master)? {
            Ok(lock) => return Ok(lock),
            Err(busy) if tokio::time::Instant::now() >= deadline => {
                return Err(Error::Usage(format!(
                    "{}: a rollout by {busy} did not end within {} s",
                    cluster.display(),
                    limit.as_secs()
                )))
            }
            Err(_) => tokio::time::sleep(LOCK_POLL).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_daemon_is_refused_naming_the_first_and_the_lock_goes_with_it() {
        let (_dir, cluster) = crate::rollout::halt::temp_cluster();
        assert_eq!(daemon_holder(&cluster).expect("usable"), None);
        let first = daemon_lock(&cluster, "erel@first").expect("first daemon");
        let err = daemon_lock(&cluster, "erel@second").expect_err("second refused");
        let text = err.to_string();
        assert!(
            text.contains("erel@first") && text.contains(DAEMON_LOCK),
            "{text}"
        );
        let busy = daemon_holder(&cluster).expect("usable").expect("held");
        assert_eq!(busy.holder.expect("named").master, "erel@first");
        drop(first);
        assert_eq!(daemon_holder(&cluster).expect("usable"), None);
    }

    #[tokio::test]
    async fn a_rollout_lock_is_waited_for_within_a_bound() {
        let (_dir, cluster) = crate::rollout::halt::temp_cluster();
        let pass = try_rollout_lock(&cluster, "erel@daemon")
            .expect("usable")
            .expect("free");
        let busy = try_rollout_lock(&cluster, "deploy")
            .expect("usable")
            .expect_err("held");
        assert_eq!(busy.holder.expect("named").master, "erel@daemon");
        let err = wait_rollout_lock(&cluster, "deploy", Duration::from_millis(300))
            .await
            .expect_err("still held");
        assert!(err.to_string().contains("erel@daemon"), "{err}");
        let waiting = tokio::spawn({
            let cluster = cluster.clone();
            async move { wait_rollout_lock(&cluster, "deploy", Duration::from_secs(30)).await }
        });
        drop(pass);
        let lock = waiting.await.expect("joined").expect("taken once free");
        assert!(lock.path().ends_with(ROLLOUT_LOCK));
    }
}
