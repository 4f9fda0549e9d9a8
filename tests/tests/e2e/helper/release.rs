//! Release tarballs made on the spot, relx-style: no top directory, `bin/<name>`.

use std::path::{Path, PathBuf};

/// The test release program (see `src/bin/e2e-beat.rs`).
pub const BEAT_BIN: &str = env!("CARGO_BIN_EXE_e2e-beat");

/// A `.tar.gz` holding `bin/<name>` = `script` (a shell script) and a
/// `releases/<version>/start.boot`-like marker file, written to `dir`.
pub fn shell_release(dir: &Path, name: &str, version: &str, script: &str) -> PathBuf {
    let path = dir.join(format!("{name}-{version}.tar.gz"));
    let file = std::fs::File::create(&path).expect("create tarball");
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    append(&mut tar, &format!("bin/{name}"), script.as_bytes(), 0o755);
    append(
        &mut tar,
        &format!("releases/{version}/RELEASE"),
        format!("{name} {version}\n").as_bytes(),
        0o644,
    );
    tar.into_inner()
        .expect("finish tar")
        .finish()
        .expect("finish gz");
    path
}

/// A release whose `bin/<name> foreground` runs the beat server from the tarball.
pub fn beat_release(dir: &Path, name: &str, version: &str) -> PathBuf {
    let path = dir.join(format!("{name}-{version}.tar.gz"));
    let file = std::fs::File::create(&path).expect("create tarball");
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    let script = "#!/bin/sh\ncd \"$(dirname \"$0\")/..\"\nexec bin/beat-server \"$@\"\n";
    append(&mut tar, &format!("bin/{name}"), script.as_bytes(), 0o755);
    let server = std::fs::read(BEAT_BIN).expect("read beat server");
    append(&mut tar, "bin/beat-server", &server, 0o755);
    append(
        &mut tar,
        &format!("releases/{version}/RELEASE"),
        format!("{name} {version}\n").as_bytes(),
        0o644,
    );
    tar.into_inner()
        .expect("finish tar")
        .finish()
        .expect("finish gz");
    path
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
    let path = dir.join(format!("{name}-{version}.tar.gz"));
    let file = std::fs::File::create(&path).expect("create tarball");
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    let script = format!(
        "#!/bin/sh\ncd \"$(dirname \"$0\")/..\"\nBEAT_FAIL={mode} exec bin/beat-server \"$@\"\n"
    );
    append(&mut tar, &format!("bin/{name}"), script.as_bytes(), 0o755);
    let server = std::fs::read(BEAT_BIN).expect("read beat server");
    append(&mut tar, "bin/beat-server", &server, 0o755);
    tar.into_inner()
        .expect("finish tar")
        .finish()
        .expect("finish gz");
    path
}
