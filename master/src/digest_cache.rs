//! A cache of local files' sha256 digests, so a file pushed once is not read twice.
//!
//! Entries are keyed by the file's canonical path and remembered with a [`FileStamp`]:
//! size, modification time, change time (ctime), inode and device. Any write to the
//! file, any `touch`, `cp` over it or rename onto it moves one of them: the ctime in
//! particular cannot be set back by a user (see `inode(7)`), so a rebuild with the same
//! size and a reset mtime, as reproducible builds do, still misses the cache.
//!
//! The stamp is taken *before* the file is read and the digest is recorded only when
//! the file still has that stamp afterwards ([`DigestCache::put`]), so a digest is
//! never recorded against content it was not computed from.
//!
//! File systems keep timestamps at a coarse granularity (a clock tick, up to seconds),
//! so a file written twice within one tick can keep the same stamp. As `git` does for
//! its index ("racy git", `Documentation/technical/racy-git.txt`), an entry whose file
//! was changed within [`RACY_WINDOW`] of taking its stamp is not trusted on its own:
//! [`DigestCache::get`] hashes such a file again (a local read, never a transfer) and
//! records the fresh digest. A cache that cannot be read or written is simply not used.
//!
//! Every read of a whole local file, to hash it or to send it, is counted
//! ([`files_hashed`], [`files_read`]) and logged at `debug` under this module's target
//! (`EREL_LOG=erel_master::digest_cache=debug`): how often a rollout reads and hashes
//! its archive can be seen, whatever the number of hosts.

use std::fs::{File, Metadata};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use erel_proto::Sha256;
use sha2::Digest;

use crate::durable;
use crate::error::{Error, Result};

/// Bytes read at a time when a local file is hashed.
pub(crate) const HASH_READ: usize = 256 * 1024;

/// A file changed this little before its stamp was taken may change again without its
/// stamp moving; its cached digest is checked by reading the file.
pub const RACY_WINDOW: Duration = Duration::from_secs(3);

/// Version tag of the entry format; entries of another format are misses.
const ENTRY_FORMAT: &str = "v2";

/// Whole local files this process has hashed (see [`files_hashed`]).
static FILES_HASHED: AtomicU64 = AtomicU64::new(0);
/// Whole local files this process has read, hashed or sent (see [`files_read`]).
static FILES_READ: AtomicU64 = AtomicU64::new(0);

/// How many times this process has hashed a whole local file (a release archive when a
/// cluster file is loaded, a file pushed without a known digest), since it started.
pub fn files_hashed() -> u64 {
    FILES_HASHED.load(Ordering::Relaxed)
}

/// How many times this process has read a local file from start to end (or from a
/// resumed offset to the end), to hash it or to send it, since it started. A push of a
/// file whose digest is known hashes it nowhere; a rollout's pushes of its archive read
/// it once for all their hosts together (`client::SharedFile`, counted once, with the
/// bytes they took from disk), `erel push` once per host.
pub fn files_read() -> u64 {
    FILES_READ.load(Ordering::Relaxed)
}

/// Counts one read of `path` that passed `bytes` bytes, hashing them when `hashed`, for
/// the reason `why` (`"to hash"`, `"to send"`, …), and logs it at `debug`: the line a
/// benchmark or an operator counts (`local file read`, with `hashed=true` when it was
/// hashed).
pub(crate) fn note_read(path: &Path, bytes: u64, hashed: bool, why: &str) {
    FILES_READ.fetch_add(1, Ordering::Relaxed);
    if hashed {
        FILES_HASHED.fetch_add(1, Ordering::Relaxed);
    }
    tracing::debug!(file = %path.display(), bytes, hashed, why, "local file read");
}

/// One state of a file as `stat(2)` reports it, and when it was observed.
#[derive(Debug, Clone, Copy)]
pub struct FileStamp {
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    ino: u64,
    dev: u64,
    taken: SystemTime,
}

impl FileStamp {
    /// The stamp of `meta`, observed now.
    pub fn of(meta: &Metadata) -> Self {
        FileStamp {
            size: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            ino: meta.ino(),
            dev: meta.dev(),
            taken: SystemTime::now(),
        }
    }

    /// The stamp of the file at `path` (following symlinks), observed now.
    pub fn take(path: &Path) -> Result<Self> {
        std::fs::metadata(path)
            .map(|meta| FileStamp::of(&meta))
            .map_err(|e| cannot_read(path, e))
    }

    /// The stamp of an open file (`fstat(2)`) at `path`, observed now.
    pub(crate) fn of_file(file: &File, path: &Path) -> Result<Self> {
        file.metadata()
            .map(|meta| FileStamp::of(&meta))
            .map_err(|e| cannot_read(path, e))
    }

    /// The file's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// True when both stamps describe the same state of the same file (when they were
    /// taken does not matter).
    pub fn same_state(&self, other: &FileStamp) -> bool {
        self.fields() == other.fields()
    }

    /// What differs in `later`, in words (`None` when nothing does).
    pub fn change(&self, later: &FileStamp) -> Option<String> {
        let mut what = Vec::new();
        if (self.ino, self.dev) != (later.ino, later.dev) {
            what.push("it was replaced by another file".to_string());
        }
        if self.size != later.size {
            what.push(format!(
                "its size went from {} to {} bytes",
                self.size, later.size
            ));
        }
        if self.mtime != later.mtime {
            what.push("its modification time moved".to_string());
        }
        if self.ctime != later.ctime {
            what.push("its change time (ctime) moved".to_string());
        }
        (!what.is_empty()).then(|| what.join(", "))
    }

    /// True when the file had not changed for [`RACY_WINDOW`] when this stamp was
    /// taken, so that a later change cannot share its timestamps. An unsettled stamp
    /// that is still the same later does not prove the file unchanged.
    pub fn is_settled(&self) -> bool {
        let ctime = UNIX_EPOCH
            .checked_add(Duration::new(
                u64::try_from(self.ctime.0).unwrap_or(0),
                u32::try_from(self.ctime.1).unwrap_or(0),
            ))
            .unwrap_or(UNIX_EPOCH);
        self.taken
            .duration_since(ctime)
            .is_ok_and(|age| age > RACY_WINDOW)
    }

    fn fields(&self) -> (u64, (i64, i64), (i64, i64), u64, u64) {
        (self.size, self.mtime, self.ctime, self.ino, self.dev)
    }

    fn to_text(self) -> String {
        format!(
            "{} {} {} {} {} {} {}",
            self.size, self.mtime.0, self.mtime.1, self.ctime.0, self.ctime.1, self.ino, self.dev
        )
    }
}

/// Where digests are kept.
#[derive(Debug, Clone)]
pub struct DigestCache {
    dir: PathBuf,
}

impl DigestCache {
    /// A cache in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        DigestCache { dir: dir.into() }
    }

    /// The user's cache: `$XDG_CACHE_HOME/erel/digests`, else `~/.cache/erel/digests`.
    pub fn for_user() -> Option<Self> {
        let base = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
        Some(DigestCache::new(base.join("erel").join("digests")))
    }

    /// The digest of `file` as it is now, when the cache knows it: recorded under the
    /// file's current stamp. An entry recorded within [`RACY_WINDOW`] of the file's last
    /// change is confirmed by hashing the file again (blocking; the fresh digest is
    /// returned and recorded). `None` for a file the cache does not know as it is now.
    pub fn get(&self, file: &Path) -> Option<Sha256> {
        self.get_stamped(file).map(|(sha256, _)| sha256)
    }

    /// [`DigestCache::get`], with the state of the file the digest holds for: a reader
    /// that opens the file afterwards checks that it still finds that state (see
    /// [`crate::client::WriteSource::sha256_of`]).
    pub fn get_stamped(&self, file: &Path) -> Option<(Sha256, FileStamp)> {
        let canonical = std::fs::canonicalize(file).ok()?;
        let now = FileStamp::take(&canonical).ok()?;
        let text = std::fs::read_to_string(self.entry_path(&canonical)).ok()?;
        let mut words = text.split_whitespace();
        if words.next() != Some(ENTRY_FORMAT) {
            return None;
        }
        let fields: Vec<&str> = words.collect();
        let [stamp @ .., settled, hex] = fields.as_slice() else {
            return None;
        };
        if stamp.join(" ") != now.to_text() {
            return None;
        }
        if *settled == "settled" {
            return Sha256::from_hex(hex).map(|sha256| (sha256, now));
        }
        let (stamp, fresh) = hash_unchanged(&canonical).ok()?;
        self.put(&canonical, &stamp, fresh);
        Some((fresh, stamp))
    }

    /// Records `sha256` as the digest of `file` in the state `before`, the stamp taken
    /// before the file was read. Nothing is recorded when the file no longer has that
    /// stamp: it changed while or after it was read, and the digest may be of neither
    /// its old content nor its new one.
    pub fn put(&self, file: &Path, before: &FileStamp, sha256: Sha256) {
        let Ok(canonical) = std::fs::canonicalize(file) else {
            return;
        };
        match FileStamp::take(&canonical) {
            Ok(now) if now.same_state(before) => {}
            _ => return,
        }
        let entry = self.entry_name(&canonical);
        let settled = if before.is_settled() {
            "settled"
        } else {
            "racy"
        };
        let text = format!(
            "{ENTRY_FORMAT} {} {settled} {}\n",
            before.to_text(),
            sha256.to_hex()
        );
        // A cache: an entry that cannot be written is only a digest computed again.
        let _ = durable::write(&self.dir, &entry, text.as_bytes());
    }

    fn entry_path(&self, canonical: &Path) -> PathBuf {
        self.dir.join(self.entry_name(canonical))
    }

    /// The entry's file name: the hex sha256 of the file's canonical path.
    fn entry_name(&self, canonical: &Path) -> String {
        let key = sha2::Sha256::digest(canonical.as_os_str().as_encoded_bytes());
        Sha256(key.into()).to_hex()
    }
}

/// Computes the sha256 of a file (blocking).
pub fn sha256_file(path: &Path) -> Result<Sha256> {
    let mut file = File::open(path).map_err(|e| cannot_read(path, e))?;
    hash_file(path, &mut file)
}

/// The sha256 of the rest of the open `file` at `path`, counted by [`note_read`].
fn hash_file(path: &Path, file: &mut File) -> Result<Sha256> {
    let mut hasher = sha2::Sha256::new();
    let bytes = hash_into(&mut hasher, file).map_err(|e| cannot_read(path, e))?;
    note_read(path, bytes, true, "to hash");
    Ok(Sha256(hasher.finalize().into()))
}

/// A local file that could not be read, and why.
fn cannot_read(path: &Path, error: std::io::Error) -> Error {
    Error::local(path, format!("cannot read: {error}"))
}

/// The digest of `path` and the stamp it was computed under: the stamp is taken before
/// reading and must be unchanged after, on the open file and on the path.
fn hash_unchanged(path: &Path) -> Result<(FileStamp, Sha256)> {
    let mut file = File::open(path).map_err(|e| cannot_read(path, e))?;
    let before = FileStamp::of_file(&file, path)?;
    let sha256 = hash_file(path, &mut file)?;
    let after_file = FileStamp::of_file(&file, path)?;
    let after_path = FileStamp::take(path)?;
    if before.same_state(&after_file) && before.same_state(&after_path) {
        Ok((before, sha256))
    } else {
        Err(Error::local(path, "changed while it was read"))
    }
}

/// Reads `reader` to its end into `hasher`, [`HASH_READ`] bytes at a time (blocking):
/// the one loop that reads a local file to hash it, whole or a prefix (a [`Read::take`]
/// of it). Returns how many bytes were hashed; a read interrupted by a signal is made
/// again.
///
/// # Errors
///
/// The first read error other than [`std::io::ErrorKind::Interrupted`].
pub(crate) fn hash_into(hasher: &mut sha2::Sha256, reader: &mut impl Read) -> std::io::Result<u64> {
    let mut buf = vec![0u8; HASH_READ];
    let mut hashed = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return Ok(hashed),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        hashed += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use std::fs::{FileTimes, OpenOptions};
    use std::os::unix::fs::FileExt;

    use super::*;

    #[test]
    fn a_whole_file_and_a_prefix_are_hashed_by_the_same_reader() {
        // More than one read's worth, not a multiple of it.
        let bytes: Vec<u8> = (0..HASH_READ * 2 + 7).map(|i| (i % 251) as u8).collect();
        let sha = |b: &[u8]| Sha256(sha2::Sha256::digest(b).into());

        let mut hasher = sha2::Sha256::new();
        let hashed = hash_into(&mut hasher, &mut bytes.as_slice()).expect("hash");
        assert_eq!(hashed, bytes.len() as u64);
        assert_eq!(Sha256(hasher.finalize().into()), sha(&bytes));

        let len = HASH_READ as u64 + 3;
        let mut hasher = sha2::Sha256::new();
        let hashed = hash_into(&mut hasher, &mut bytes.as_slice().take(len)).expect("hash");
        assert_eq!(hashed, len);
        assert_eq!(
            Sha256(hasher.finalize().into()),
            sha(&bytes[..HASH_READ + 3])
        );

        // A reader shorter than the prefix asked for says how much it gave.
        let mut hasher = sha2::Sha256::new();
        let hashed = hash_into(&mut hasher, &mut bytes[..10].take(len)).expect("hash");
        assert_eq!(hashed, 10);
    }

    /// Overwrites the start of `path` in place (same size, same inode) and sets its
    /// modification time back to what it was: only the ctime can tell.
    fn rewrite_in_place(path: &Path, bytes: &[u8]) {
        let mtime = std::fs::metadata(path)
            .and_then(|m| m.modified())
            .expect("mtime");
        let file = OpenOptions::new().write(true).open(path).expect("open");
        file.write_all_at(bytes, 0).expect("write");
        file.set_times(FileTimes::new().set_modified(mtime))
            .expect("set mtime");
    }

    /// Waits (bounded) until a change to `path` is older than [`RACY_WINDOW`].
    fn wait_until_settled(path: &Path) -> FileStamp {
        let deadline = std::time::Instant::now() + RACY_WINDOW * 4;
        loop {
            let stamp = FileStamp::take(path).expect("stamp");
            if stamp.is_settled() {
                return stamp;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "never settled: {stamp:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A cache in a temporary directory and a file `name` beside it holding `bytes`.
    fn cache_and_file(name: &str, bytes: &[u8]) -> (tempfile::TempDir, DigestCache, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = DigestCache::new(dir.path().join("cache"));
        let file = dir.path().join(name);
        std::fs::write(&file, bytes).expect("write");
        (dir, cache, file)
    }

    #[test]
    fn remembers_until_the_file_changes() {
        let (_dir, cache, file) = cache_and_file("a.bin", b"one");
        assert_eq!(cache.get(&file), None);
        let stamp = FileStamp::take(&file).expect("stamp");
        let sha = sha256_file(&file).expect("hash");
        cache.put(&file, &stamp, sha);
        assert_eq!(cache.get(&file), Some(sha));
        std::fs::write(&file, b"two!").expect("write");
        assert_eq!(cache.get(&file), None, "a changed file misses the cache");
    }

    #[test]
    fn same_size_same_inode_same_mtime_is_still_a_change() {
        let (_dir, cache, file) = cache_and_file("app.tar", b"old bytes");
        let stamp = wait_until_settled(&file);
        let old = sha256_file(&file).expect("hash");
        cache.put(&file, &stamp, old);
        assert_eq!(cache.get(&file), Some(old));

        rewrite_in_place(&file, b"new");
        let after = FileStamp::take(&file).expect("stamp");
        assert_eq!(after.size, stamp.size);
        assert_eq!(after.mtime, stamp.mtime);
        assert_eq!(after.ino, stamp.ino);
        assert_eq!(
            stamp.change(&after).as_deref(),
            Some("its change time (ctime) moved")
        );
        assert_eq!(cache.get(&file), None, "the ctime tells the files apart");
    }

    #[test]
    fn nothing_is_recorded_for_a_file_that_changed_after_its_stamp() {
        let (_dir, cache, file) = cache_and_file("app.tar", b"old bytes");
        let before = FileStamp::take(&file).expect("stamp");
        let old = sha256_file(&file).expect("hash");
        // Rebuilt between reading and recording, same size and mtime.
        rewrite_in_place(&file, b"new");
        cache.put(&file, &before, old);
        assert_ne!(
            cache.get(&file),
            Some(old),
            "the old digest is never served"
        );
    }

    #[test]
    fn a_racy_entry_is_confirmed_by_reading_and_a_settled_one_is_trusted() {
        let (_dir, cache, file) = cache_and_file("app.tar", b"content");
        let real = sha256_file(&file).expect("hash");
        let wrong = Sha256([7; 32]);

        // Just written: the entry is racy, so `get` reads the file and corrects it.
        let fresh = FileStamp::take(&file).expect("stamp");
        assert!(!fresh.is_settled());
        cache.put(&file, &fresh, wrong);
        assert_eq!(cache.get(&file), Some(real));

        // Settled: the entry alone answers, without reading the file (shown here by
        // a deliberately wrong entry being served as recorded).
        let settled = wait_until_settled(&file);
        cache.put(&file, &settled, wrong);
        assert_eq!(cache.get(&file), Some(wrong));
    }

    #[test]
    fn a_replaced_file_is_a_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("app.tar");
        std::fs::write(&file, b"one").expect("write");
        let before = FileStamp::take(&file).expect("stamp");
        let other = dir.path().join("app.tar.new");
        std::fs::write(&other, b"two").expect("write");
        std::fs::rename(&other, &file).expect("rename");
        let after = FileStamp::take(&file).expect("stamp");
        let change = before.change(&after).expect("a change");
        assert!(change.contains("replaced by another file"), "{change}");
    }
}
