//! A cache of local files' sha256 digests, so a file pushed once is not read twice.
//!
//! Entries are keyed by the file's canonical path and remembered with its size,
//! modification time, inode and device: any change to the file misses the cache. A
//! cache that cannot be read or written is simply not used.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use erel_proto::Sha256;
use sha2::Digest;

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

    /// The digest recorded for `file`, if the file has not changed since.
    pub fn get(&self, file: &Path) -> Option<Sha256> {
        let (entry, stamp) = self.entry(file)?;
        let text = std::fs::read_to_string(entry).ok()?;
        let (recorded, hex) = text.trim().rsplit_once(' ')?;
        if recorded != stamp {
            return None;
        }
        Sha256::from_hex(hex)
    }

    /// Records the digest of `file` as it is now.
    pub fn put(&self, file: &Path, sha256: Sha256) {
        let Some((entry, stamp)) = self.entry(file) else {
            return;
        };
        if std::fs::create_dir_all(&self.dir).is_err() {
            return;
        }
        let tmp = entry.with_extension(format!("tmp-{}", std::process::id()));
        if std::fs::write(&tmp, format!("{stamp} {}\n", sha256.to_hex())).is_ok() {
            let _ = std::fs::rename(&tmp, &entry);
        } else {
            let _ = std::fs::remove_file(&tmp);
        }
    }

    fn entry(&self, file: &Path) -> Option<(PathBuf, String)> {
        let canonical = std::fs::canonicalize(file).ok()?;
        let meta = std::fs::metadata(&canonical).ok()?;
        let stamp = format!(
            "{} {} {} {} {}",
            meta.len(),
            meta.mtime(),
            meta.mtime_nsec(),
            meta.ino(),
            meta.dev()
        );
        let key = sha2::Sha256::digest(canonical.as_os_str().as_encoded_bytes());
        Some((self.dir.join(Sha256(key.into()).to_hex()), stamp))
    }
}

/// Computes the sha256 of a file (blocking).
pub fn sha256_file(path: &Path) -> std::io::Result<Sha256> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(Sha256(hasher.finalize().into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_until_the_file_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = DigestCache::new(dir.path().join("cache"));
        let file = dir.path().join("a.bin");
        std::fs::write(&file, b"one").expect("write");
        assert_eq!(cache.get(&file), None);
        let sha = sha256_file(&file).expect("hash");
        cache.put(&file, sha);
        assert_eq!(cache.get(&file), Some(sha));
        std::fs::write(&file, b"two!").expect("write");
        assert_eq!(cache.get(&file), None, "a changed file misses the cache");
    }
}
