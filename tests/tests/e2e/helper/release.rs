//! Release tarballs made on the spot, relx-style, with the master's release builder.

use std::path::{Path, PathBuf};

use erel_master::release::{write_tarball, BeatRelease, ReleaseFile};

/// The test release program (see `src/bin/e2e-beat.rs`).
pub const BEAT_BIN: &str = env!("CARGO_BIN_EXE_e2e-beat");

/// A `.tar.gz` holding `bin/<name>` = `script` (a shell script) and a
/// `releases/<version>/start.boot`-like marker file, written to `dir`.
pub fn shell_release(dir: &Path, name: &str, version: &str, script: &str) -> PathBuf {
    let files = [
        ReleaseFile::start_script(name, script),
        ReleaseFile::marker(name, version),
    ];
    write_tarball(dir, name, version, &files).expect("write tarball")
}

/// A release whose `bin/<name> foreground` runs the beat server from the tarball.
pub fn beat_release(dir: &Path, name: &str, version: &str) -> PathBuf {
    beat(dir, name, version, None)
}

/// The sha256 of a file.
pub fn sha256(path: &Path) -> erel_proto::Sha256 {
    erel_master::digest_cache::sha256_file(path).expect("hash")
}

/// Like [`beat_release`], but `bin/<name>` sets `BEAT_FAIL=<mode>` first, so the release
/// is broken on purpose (`exit`: dies at once with code 3; `silent`: never listens).
pub fn failing_beat_release(dir: &Path, name: &str, version: &str, mode: &str) -> PathBuf {
    beat(dir, name, version, Some(mode))
}

/// Whether `text` gives the reason a [`failing_beat_release`] in mode `exit` failed:
/// its exit with code 3, or the restarts that followed it.
pub fn names_the_exit_failure(text: &str) -> bool {
    text.contains("exited with code 3") || text.contains("restarted")
}

fn beat(dir: &Path, name: &str, version: &str, fail: Option<&str>) -> PathBuf {
    let release = BeatRelease {
        name,
        version,
        server: Path::new(BEAT_BIN),
        server_args: &[],
        fail,
    };
    release.write(dir).expect("write beat release")
}
