//! Release tarballs made on the spot, relx-style: no top directory, `bin/<name>`.

use std::path::{Path, PathBuf};

/// The test release program (see `src/bin/e2e-beat.rs`).
pub const BEAT_BIN: &str = env!("CARGO_BIN_EXE_e2e-beat");

/// One file of a release tarball: its path inside, its bytes, its mode.
type Entry = (String, Vec<u8>, u32);

/// Writes `dir/<name>-<version>.tar.gz` holding `entries` in order; returns its path.
fn tarball(dir: &Path, name: &str, version: &str, entries: &[Entry]) -> PathBuf {
    let path = dir.join(format!("{name}-{version}.tar.gz"));
    let file = std::fs::File::create(&path).expect("create tarball");
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    for (inside, data, mode) in entries {
        append(&mut tar, inside, data, *mode);
    }
    tar.into_inner()
        .expect("finish tar")
        .finish()
        .expect("finish gz");
    path
}

/// `bin/<name>` = `script`, executable.
fn start_script(name: &str, script: &str) -> Entry {
    (format!("bin/{name}"), script.as_bytes().to_vec(), 0o755)
}

/// The `releases/<version>/RELEASE` marker, a `start.boot` stand-in.
fn release_marker(name: &str, version: &str) -> Entry {
    (
        format!("releases/{version}/RELEASE"),
        format!("{name} {version}\n").into_bytes(),
        0o644,
    )
}

/// The beat server program, as `bin/beat-server`.
fn beat_server() -> Entry {
    let server = std::fs::read(BEAT_BIN).expect("read beat server");
    ("bin/beat-server".to_string(), server, 0o755)
}

/// A `.tar.gz` holding `bin/<name>` = `script` (a shell script) and a
/// `releases/<version>/start.boot`-like marker file, written to `dir`.
pub fn shell_release(dir: &Path, name: &str, version: &str, script: &str) -> PathBuf {
    let entries = [start_script(name, script), release_marker(name, version)];
    tarball(dir, name, version, &entries)
}

/// A release whose `bin/<name> foreground` runs the beat server from the tarball.
pub fn beat_release(dir: &Path, name: &str, version: &str) -> PathBuf {
    let script = "#!/bin/sh\ncd \"$(dirname \"$0\")/..\"\nexec bin/beat-server \"$@\"\n";
    let entries = [
        start_script(name, script),
        beat_server(),
        release_marker(name, version),
    ];
    tarball(dir, name, version, &entries)
}

fn append<W: std::io::Write>(tar: &mut tar::Builder<W>, path: &str, data: &[u8], mode: u32) {
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(mode);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mtime(1_700_000_000);
    tar.append_data(&mut header, path, data)
        .expect("append to tar");
}

/// The sha256 of a file.
pub fn sha256(path: &Path) -> erel_proto::Sha256 {
    erel_master::digest_cache::sha256_file(path).expect("hash")
}

/// Like [`beat_release`], but `bin/<name>` sets `BEAT_FAIL=<mode>` first, so the release
/// is broken on purpose (`exit`: dies at once with code 3; `silent`: never listens).
pub fn failing_beat_release(dir: &Path, name: &str, version: &str, mode: &str) -> PathBuf {
    let script = format!(
        "#!/bin/sh\ncd \"$(dirname \"$0\")/..\"\nBEAT_FAIL={mode} exec bin/beat-server \"$@\"\n"
    );
    tarball(
        dir,
        name,
        version,
        &[start_script(name, &script), beat_server()],
    )
}
