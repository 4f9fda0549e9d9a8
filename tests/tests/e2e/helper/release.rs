//! Release tarballs made on the spot, relx-style, with the master's release builder.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

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
/// misbehaves on purpose (`exit`: dies at once with code 3; `silent`: never listens;
/// `slow-stop`: serves on for 2 s after a SIGTERM, saying so in its output;
/// `exit-at-<ms>`: serves, then dies with code 3 once its process is `<ms>` ms old).
pub fn failing_beat_release(dir: &Path, name: &str, version: &str, mode: &str) -> PathBuf {
    beat(dir, name, version, Some(mode))
}

/// Whether `text` gives the reason a [`failing_beat_release`] in mode `exit` failed:
/// its exit with code 3, or the restarts that followed it.
pub fn names_the_exit_failure(text: &str) -> bool {
    text.contains("exited with code 3") || text.contains("restarted")
}

/// A beat release's name, version and `BEAT_FAIL` mode.
type BeatKey = (String, String, Option<String>);
/// A packed beat release: its file name and the archive's bytes.
type Packed = (OsString, Arc<Vec<u8>>);

/// The beat releases this test process has written, by [`BeatKey`]: the file name and
/// the archive's bytes. Packing the beat program (megabytes, compressed by a debug build)
/// takes seconds, most tests write the same few releases, and an archive is the same
/// bytes each time (fixed modes and times), so each is packed once and copied after.
static WRITTEN: Mutex<BTreeMap<BeatKey, Packed>> = Mutex::new(BTreeMap::new());

fn beat(dir: &Path, name: &str, version: &str, fail: Option<&str>) -> PathBuf {
    let key = (
        name.to_string(),
        version.to_string(),
        fail.map(str::to_string),
    );
    let written = WRITTEN.lock().expect("beat releases").get(&key).cloned();
    if let Some((file_name, bytes)) = written {
        let path = dir.join(file_name);
        std::fs::write(&path, bytes.as_slice())
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        return path;
    }
    let release = BeatRelease {
        name,
        version,
        server: Path::new(BEAT_BIN),
        server_args: &[],
        fail,
    };
    let path = release.write(dir).expect("write beat release");
    let bytes = std::fs::read(&path).expect("read the beat release back");
    let file_name = path
        .file_name()
        .expect("the archive's file name")
        .to_owned();
    WRITTEN
        .lock()
        .expect("beat releases")
        .insert(key, (file_name, Arc::new(bytes)));
    path
}

/// Rewrites the release tarball `archive` (`<name>-<version>.tar.gz`) with `payload`
/// bytes more, in files of at most `file_size` bytes under `lib/payload/` (zeros, not
/// sparse entries, so they take their room on disk when unpacked; many small files make
/// an unpack last): as `.tar.gz` in place when `gzip` (it stays small), else as an
/// uncompressed `<name>-<version>.tar` beside it (every byte sent on a push), the
/// `.tar.gz` removed. The new archive's path.
pub fn with_payload(archive: &Path, payload: u64, file_size: u64, gzip: bool) -> PathBuf {
    use std::io::Write;
    let gz = std::fs::read(archive).expect("read the release tarball");
    let to = match gzip {
        true => archive.to_path_buf(),
        false => {
            let name = archive.to_string_lossy();
            PathBuf::from(name.strip_suffix(".gz").expect("a .tar.gz"))
        }
    };
    let file = std::fs::File::create(&to).expect("create the archive");
    let out: Box<dyn Write> = match gzip {
        true => Box::new(flate2::write::GzEncoder::new(
            file,
            flate2::Compression::fast(),
        )),
        false => Box::new(file),
    };
    let mut tar = tar::Builder::new(out);
    let mut entries = tar::Archive::new(flate2::read::GzDecoder::new(gz.as_slice()));
    for entry in entries.entries().expect("read the release tarball") {
        let mut entry = entry.expect("an entry");
        let mut header = entry.header().clone();
        let path = entry.path().expect("an entry's path").into_owned();
        tar.append_data(&mut header, path, &mut entry)
            .expect("copy an entry");
    }
    let mut left = payload;
    for i in 0.. {
        if left == 0 {
            break;
        }
        let size = left.min(file_size);
        left -= size;
        let mut header = tar::Header::new_gnu();
        header.set_size(size);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mtime(1_700_000_000);
        let path = format!("lib/payload/{i}.bin");
        tar.append_data(&mut header, path, std::io::repeat(0).take(size))
            .expect("append the payload");
    }
    tar.into_inner()
        .expect("finish the archive")
        .flush()
        .expect("flush the archive");
    if !gzip {
        std::fs::remove_file(archive).expect("remove the .tar.gz");
    }
    to
}
