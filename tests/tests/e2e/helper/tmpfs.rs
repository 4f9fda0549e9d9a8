//! A small file system of its own for an agent's root: a tmpfs of a chosen size, so
//! that a test can fill the disk without touching anyone else's.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static MOUNTS: AtomicU32 = AtomicU32::new(0);

/// A tmpfs mounted on a fresh directory, unmounted (lazily, so never left behind) and
/// removed when dropped, also when a test panics.
pub struct Tmpfs {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as mount(8) takes it: `32m`). Needs root: see
    /// [`can_mount`].
    pub fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("root");
        std::fs::create_dir(&path).expect("mount point");
        let name = format!(
            "erel-test-{}-{}",
            std::process::id(),
            MOUNTS.fetch_add(1, Ordering::SeqCst)
        );
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size},mode=0755"))
            .arg(&name)
            .arg(&path)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mount -t tmpfs {name} on {}",
            path.display()
        );
        Tmpfs { _dir: dir, path }
    }

    /// (total, free) bytes, from statvfs(3).
    pub fn space(&self) -> (u64, u64) {
        let stat = nix::sys::statvfs::statvfs(&self.path).expect("statvfs");
        let frag = stat.fragment_size() as u64;
        (
            stat.blocks() as u64 * frag,
            stat.blocks_available() as u64 * frag,
        )
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// True when the test can mount a tmpfs; otherwise says why on stderr, naming the test
/// (the harness names each test's thread after it).
pub fn can_mount() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    let current = std::thread::current();
    let test = current.name().unwrap_or("this test");
    eprintln!("SKIPPED {test}: mounting a tmpfs root needs root; run the tests as root");
    false
}
