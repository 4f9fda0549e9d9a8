use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use erel_proto::ErrorKind;
use flate2::write::GzEncoder;
use flate2::Compression;
use tar::EntryType;

use super::*;

struct Fixture {
    root: Root,
    limits: Limits,
    dir: tempfile::TempDir,
}

/// The root is a subdirectory of the temporary directory, so that anything written
/// beside it (an escape) shows up in [`Fixture::snapshot`].
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    Fixture {
        root: Root::open(&dir.path().join("root")).expect("open root"),
        limits: Limits {
            max_unpack_bytes: 10 << 20,
            max_unpack_entries: 1_000,
            ..Limits::default()
        },
        dir,
    }
}

impl Fixture {
    fn put(&self, name: &str, bytes: &[u8]) {
        let path = self.root.path().join(name);
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(path, bytes).expect("write archive");
    }

    /// Puts [`release`] `version` at `name`; returns its bytes.
    fn put_release(&self, name: &str, version: &str) -> Vec<u8> {
        let archive = release(version);
        self.put(name, &archive);
        archive
    }

    /// Unpacks [`release`] 0.1.0, put at `a.tar.gz`, into `rel`.
    fn unpack_release(&self) -> Unpacked {
        self.put_release("a.tar.gz", "0.1.0");
        self.unpack("a.tar.gz", "rel").expect("unpack")
    }

    fn request(&self, archive: &str, dest: &str) -> Unpack {
        Unpack {
            archive: archive.into(),
            dest: dest.into(),
            sha256: None,
        }
    }

    fn unpack(&self, archive: &str, dest: &str) -> Result<Unpacked> {
        unpack(&self.root, &self.request(archive, dest), &self.limits)
    }

    /// Every path under the temporary directory, with its type and size.
    fn snapshot(&self) -> BTreeMap<PathBuf, String> {
        let mut out = BTreeMap::new();
        let mut queue = vec![self.dir.path().to_path_buf()];
        while let Some(dir) = queue.pop() {
            for entry in fs::read_dir(&dir).expect("list") {
                let path = entry.expect("entry").path();
                let meta = fs::symlink_metadata(&path).expect("meta");
                let kind = if meta.file_type().is_symlink() {
                    format!("link {}", fs::read_link(&path).expect("link").display())
                } else if meta.is_dir() {
                    queue.push(path.clone());
                    "dir".to_string()
                } else {
                    format!("file {}", meta.len())
                };
                out.insert(path, kind);
            }
        }
        out
    }

    fn staging_is_empty(&self) -> bool {
        fs::read_dir(self.root.state(State::Unpack))
            .expect("list")
            .next()
            .is_none()
    }

    /// Unpacks `bytes` and checks the refusal: its kind, that its message names
    /// `needle`, that `dest` does not exist and that nothing at all changed.
    #[track_caller]
    fn refuses(&self, bytes: &[u8], kind: ErrorKind, needle: &str) -> Error {
        self.put("archives/hostile.tar", bytes);
        let before = self.snapshot();
        let err = self
            .unpack("archives/hostile.tar", "releases/evil/1")
            .expect_err("must be refused");
        assert_eq!(err.kind(), kind, "{err}");
        assert!(err.to_string().contains(needle), "{needle:?} not in: {err}");
        assert!(!self.root.path().join("releases/evil/1").exists());
        assert_eq!(before, self.snapshot(), "something was written: {err}");
        assert!(self.staging_is_empty());
        err
    }

    /// [`Fixture::refuses`] for an archive the agent finds unsafe.
    #[track_caller]
    fn refuses_unsafe(&self, raw: Raw, needle: &str) {
        self.refuses(&raw.finish(), ErrorKind::UnsafeArchive, needle);
    }
}

/// A tar written header by header, so that it can say what no tool would write.
#[derive(Default)]
pub(super) struct Raw {
    pub(super) bytes: Vec<u8>,
}

impl Raw {
    pub(super) fn header(
        name: &[u8],
        kind: EntryType,
        mode: u32,
        size: u64,
        link: &[u8],
    ) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        let old = header.as_old_mut();
        old.name[..name.len()].copy_from_slice(name);
        old.linkname[..link.len()].copy_from_slice(link);
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_size(size);
        header.set_mtime(1_700_000_000);
        header.set_cksum();
        header
    }

    pub(super) fn push(mut self, header: &tar::Header, data: &[u8]) -> Self {
        self.bytes.extend_from_slice(header.as_bytes());
        self.bytes.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.bytes.extend(std::iter::repeat_n(0u8, pad));
        self
    }

    pub(super) fn entry(
        self,
        name: &str,
        kind: EntryType,
        mode: u32,
        data: &[u8],
        link: &str,
    ) -> Self {
        let header = Self::header(
            name.as_bytes(),
            kind,
            mode,
            data.len() as u64,
            link.as_bytes(),
        );
        self.push(&header, data)
    }

    pub(super) fn file(self, name: &str, data: &[u8]) -> Self {
        self.entry(name, EntryType::Regular, 0o644, data, "")
    }

    pub(super) fn dir(self, name: &str) -> Self {
        self.entry(name, EntryType::Directory, 0o755, b"", "")
    }

    pub(super) fn symlink(self, name: &str, target: &str) -> Self {
        self.entry(name, EntryType::Symlink, 0o777, b"", target)
    }

    pub(super) fn hard_link(self, name: &str, target: &str) -> Self {
        self.entry(name, EntryType::Link, 0o644, b"", target)
    }

    pub(super) fn finish(mut self) -> Vec<u8> {
        self.bytes.extend([0u8; 1024]);
        self.bytes
    }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
    encoder.write_all(bytes).expect("gzip");
    encoder.finish().expect("gzip")
}

fn sha(bytes: &[u8]) -> Sha256 {
    crate::digest::of_bytes(bytes)
}

const LONG_DIR: &str = "lib/a_rather_long_application_name_as_real_releases_have-10.2.3/\
                        priv/some/deeply/nested/directory/structure";

const SCRIPT: &[u8] = b"#!/bin/sh\nexec erts/bin/erl \"$@\"\n";

/// A relx-like release built the way real tools build one, gzipped.
fn release(version: &str) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut add = |path: &str, mode: u32, data: &[u8]| {
        let mut header = tar::Header::new_gnu();
        header.set_mode(mode);
        header.set_size(data.len() as u64);
        header.set_entry_type(EntryType::Regular);
        builder
            .append_data(&mut header, path, data)
            .expect("append");
    };
    add("bin/beat", 0o755, SCRIPT);
    add("erts-14.2/bin/beam.smp", 0o755, b"\x7fELF pretend");
    add(
        &format!("lib/beat-{version}/ebin/beat.app"),
        0o644,
        b"{application, beat, []}.\n",
    );
    add(
        &format!("releases/{version}/start.boot"),
        0o644,
        &[7u8; 3000],
    );
    add(
        &format!("{LONG_DIR}/file_with_a_long_name.txt"),
        0o644,
        b"long",
    );
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    builder
        .append_data(&mut dir, "log", io::empty())
        .expect("dir");
    let links = [
        (
            EntryType::Symlink,
            0o777,
            "lib/current",
            format!("beat-{version}"),
        ),
        (
            EntryType::Symlink,
            0o777,
            "bin/erl",
            "../erts-14.2/bin/beam.smp".into(),
        ),
        (EntryType::Link, 0o755, "bin/beat-copy", "bin/beat".into()),
    ];
    for (kind, mode, path, target) in links {
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(kind);
        link.set_mode(mode);
        link.set_size(0);
        builder.append_link(&mut link, path, target).expect("link");
    }
    gzip(&builder.into_inner().expect("tar"))
}

#[test]
fn unpacks_a_release_with_links_and_long_names() {
    let f = fixture();
    let archive = f.put_release("archives/beat-0.1.0.tar.gz", "0.1.0");
    let done = f
        .unpack("archives/beat-0.1.0.tar.gz", "releases/beat/0.1.0")
        .expect("unpack");
    assert!(!done.already);
    assert_eq!(done.sha256, sha(&archive));
    assert_eq!(done.entries, 9);
    let dest = f.root.path().join("releases/beat/0.1.0");
    let mode = |p: &str| fs::metadata(dest.join(p)).expect(p).permissions().mode() & 0o777;
    assert_eq!(mode("bin/beat"), 0o755);
    assert_eq!(mode("erts-14.2/bin/beam.smp"), 0o755);
    assert_eq!(mode("lib/beat-0.1.0/ebin/beat.app"), 0o644);
    assert_eq!(
        fs::read_link(dest.join("lib/current")).expect("link"),
        Path::new("beat-0.1.0")
    );
    assert!(dest.join("lib/current/ebin/beat.app").is_file());
    assert!(dest.join("bin/erl").is_file());
    assert_eq!(
        fs::metadata(dest.join("bin/beat")).expect("meta").ino(),
        fs::metadata(dest.join("bin/beat-copy"))
            .expect("meta")
            .ino()
    );
    assert_eq!(
        fs::read(dest.join(format!("{LONG_DIR}/file_with_a_long_name.txt"))).expect("long"),
        b"long"
    );
    assert!(dest.join("log").is_dir());
    let expected_bytes = (SCRIPT.len() + 12 + 25 + 3000 + 4) as u64;
    assert_eq!(done.bytes, expected_bytes);
    assert!(f.staging_is_empty());
}

#[test]
fn unpacking_again_is_already_done() {
    let f = fixture();
    let archive = f.put_release("archives/a.tar.gz", "0.1.0");
    let [first, again] = ["unpack", "again"].map(|what| {
        f.unpack("archives/a.tar.gz", "releases/beat/0.1.0")
            .expect(what)
    });
    assert!(again.already);
    assert_eq!((again.entries, again.bytes), (first.entries, first.bytes));

    // With the digest named, the archive is not even needed any more.
    fs::remove_file(f.root.path().join("archives/a.tar.gz")).expect("rm");
    let request = Unpack {
        sha256: Some(sha(&archive)),
        ..f.request("archives/a.tar.gz", "releases/beat/0.1.0")
    };
    assert!(unpack(&f.root, &request, &f.limits).expect("known").already);
}

#[test]
fn plain_tar_and_dot_prefixed_paths_unpack() {
    let f = fixture();
    let tar = Raw::default()
        .dir("./")
        .dir("./bin/")
        .entry("./bin/run", EntryType::Regular, 0o700, b"#!/bin/sh\n", "")
        .entry("old/", EntryType::Regular, 0o755, b"", "")
        .finish();
    f.put("a.tar", &tar);
    let done = f.unpack("a.tar", "out").expect("unpack");
    assert_eq!(done.entries, 4);
    assert!(f.root.path().join("out/old").is_dir());
    // `a//b` names the same destination as `a/b`.
    assert!(f.unpack("a.tar", "out//").expect("again").already);
    f.unpack("a.tar", "x/y").expect("unpack");
    assert!(f.unpack("a.tar", "x//y").expect("again").already);
    let run = f.root.path().join("out/bin/run");
    assert_eq!(
        fs::metadata(run).expect("meta").permissions().mode() & 0o777,
        0o700
    );
}

#[test]
fn pax_paths_and_global_headers_are_understood() {
    let long = format!("{LONG_DIR}/{}", "n".repeat(120));
    let tar = Raw::default()
        .pax_typed(
            EntryType::XGlobalHeader,
            &[("comment", b"git archive says hello")],
        )
        .pax(&[("path", long.as_bytes())])
        .file("truncated-name", b"pax")
        .finish();
    f_unpack_ok(&tar, |dest, done| {
        assert_eq!(done.entries, 1);
        assert_eq!(fs::read(dest.join(&long)).expect("pax path"), b"pax");
    });
}

fn f_unpack_ok(bytes: &[u8], check: impl FnOnce(&Path, &Unpacked)) {
    let f = fixture();
    f.put("x.tar", bytes);
    let done = f.unpack("x.tar", "out").expect("unpack");
    check(&f.root.path().join("out"), &done);
}

#[test]
fn dest_holding_something_else_is_a_conflict() {
    let f = fixture();
    f.put_release("a.tar.gz", "0.1.0");
    f.put_release("b.tar.gz", "0.2.0");
    fs::create_dir_all(f.root.path().join("releases/beat/0.0.9")).expect("mkdir");
    fs::write(f.root.path().join("releases/beat/0.0.9/x"), b"x").expect("write");
    let err = f.unpack("a.tar.gz", "releases/beat/0.0.9").unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }), "{err}");
    assert!(err.to_string().contains("releases/beat/0.0.9"), "{err}");
    assert!(err.to_string().contains("did not unpack"), "{err}");

    f.unpack("a.tar.gz", "releases/beat/0.1.0").expect("unpack");
    let err = f.unpack("b.tar.gz", "releases/beat/0.1.0").unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }), "{err}");
    assert!(err.to_string().contains("a.tar.gz"), "{err}");

    f.put("file", b"x");
    let err = f.unpack("a.tar.gz", "file").unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }), "{err}");
    assert!(f.staging_is_empty());
}

#[test]
fn replaced_dest_is_not_taken_for_done() {
    let f = fixture();
    f.unpack_release();
    let dest = f.root.path().join("rel");
    fs::remove_dir_all(&dest).expect("rm");
    fs::create_dir(&dest).expect("mkdir");
    let err = f.unpack("a.tar.gz", "rel").unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }), "{err}");
}

#[test]
fn marker_without_dest_is_ignored() {
    // A crash after the marker was written and before the rename.
    let f = fixture();
    f.unpack_release();
    fs::remove_dir_all(f.root.path().join("rel")).expect("rm");
    let again = f.unpack("a.tar.gz", "rel").expect("unpack again");
    assert!(!again.already);
    assert!(f.root.path().join("rel/bin/beat").is_file());
    assert!(f.unpack("a.tar.gz", "rel").expect("third").already);
}

#[test]
fn wrong_digest_and_missing_archive_are_refused() {
    let f = fixture();
    f.put_release("a.tar.gz", "0.1.0");
    let request = Unpack {
        sha256: Some(sha(b"other")),
        ..f.request("a.tar.gz", "rel")
    };
    let err = unpack(&f.root, &request, &f.limits).unwrap_err();
    assert!(matches!(err, Error::ChecksumMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&sha(b"other").to_hex()), "{err}");
    assert!(!f.root.path().join("rel").exists());

    let err = f.unpack("nothere.tar.gz", "rel").unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    assert!(err.to_string().contains("nothere.tar.gz"), "{err}");
    fs::create_dir(f.root.path().join("adir")).expect("mkdir");
    let err = f.unpack("adir", "rel").unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    let err = f.unpack("a.tar.gz", ".erel/x").unwrap_err();
    assert!(matches!(err, Error::InvalidPath { .. }), "{err}");
}

#[test]
fn refuses_escaping_paths() {
    let f = fixture();
    f.refuses_unsafe(
        Raw::default().file("ok", b"x").file("../escape", b"x"),
        "../escape",
    );
    f.refuses_unsafe(Raw::default().file("a/../../x", b"x"), "a/../../x");
    let absolute = f.dir.path().join("abs");
    let absolute = absolute.to_str().expect("utf-8");
    f.refuses_unsafe(Raw::default().file(absolute, b"x"), absolute);
    assert!(!Path::new(absolute).exists());
}

#[test]
fn refuses_escaping_symlinks() {
    let f = fixture();
    f.refuses_unsafe(Raw::default().symlink("x", "../../.."), "'x'");
    f.refuses_unsafe(Raw::default().symlink("d/x", "../.."), "d/x");
    f.refuses_unsafe(Raw::default().symlink("etc", "/etc"), "absolute");
    // Through another link, in either order.
    f.refuses_unsafe(Raw::default().symlink("s", ".").symlink("e", "s/.."), "'e'");
    f.refuses_unsafe(
        Raw::default()
            .symlink("e", "s/../x")
            .dir("d/")
            .symlink("s", "d/..")
            .symlink("d/u", ".."),
        "outside",
    );
    f.refuses_unsafe(
        Raw::default()
            .symlink("a", "b")
            .symlink("b", "a")
            .symlink("c", "a/.."),
        "loop",
    );
}

#[test]
fn refuses_writing_through_symlinks() {
    let f = fixture();
    f.refuses_unsafe(
        Raw::default().dir("d/").symlink("a", "d").file("a/x", b"x"),
        "a/x",
    );
    f.refuses_unsafe(Raw::default().symlink("a", "/tmp").file("a/x", b"x"), "'a'");
    // Replacing a link by a file, or a file by a link.
    f.refuses_unsafe(Raw::default().symlink("a", "b").file("a", b"x"), "twice");
    f.refuses_unsafe(Raw::default().file("a", b"x").symlink("a", "b"), "twice");
    f.refuses_unsafe(
        Raw::default().file("a", b"x").file("a/b", b"x"),
        "not a directory",
    );
}

#[test]
fn refuses_hard_links_outside_or_ahead() {
    let f = fixture();
    f.refuses_unsafe(Raw::default().hard_link("p", "/etc/passwd"), "'p'");
    f.refuses_unsafe(Raw::default().hard_link("p", "../outside"), "../outside");
    f.refuses_unsafe(
        Raw::default().hard_link("p", "later").file("later", b"x"),
        "not extracted",
    );
    f.refuses_unsafe(
        Raw::default()
            .dir("d/")
            .symlink("s", "d")
            .file("d/f", b"x")
            .hard_link("p", "s/f"),
        "symlink",
    );
    f.refuses_unsafe(Raw::default().dir("d/").hard_link("p", "d"), "regular file");
}

#[test]
fn refuses_devices_fifos_and_special_bits() {
    let f = fixture();
    let cases: &[(&str, u8, u32, &[u8], &str)] = &[
        ("dev/null", b'3', 0o666, b"", "character device"),
        ("sda", b'4', 0o660, b"", "block device"),
        ("pipe", b'6', 0o644, b"", "fifo"),
        ("bin/su", b'0', 0o4755, b"x", "setuid"),
        ("bin/sg", b'0', 0o2755, b"x", "bin/sg"),
        ("vol", b'M', 0o644, b"", "multi-volume"),
        ("names", b'N', 0o644, b"", "'N' (obsolete GNU names list)"),
        ("vendor", b'Z', 0o644, b"abc", "'Z' (vendor extension)"),
        ("odd", b'9', 0o644, b"", "'9' (unknown type)"),
    ];
    for (name, kind, mode, data, needle) in cases {
        let raw = Raw::default().entry(name, EntryType::new(*kind), *mode, data, "");
        f.refuses_unsafe(raw, needle);
    }
}

#[test]
fn refuses_too_many_entries() {
    let mut f = fixture();
    f.limits.max_unpack_entries = 5;
    let mut raw = Raw::default();
    for i in 0..10 {
        raw = raw.file(&format!("f{i}"), b"x");
    }
    let err = f.refuses(&raw.finish(), ErrorKind::TooLarge, "f5");
    assert!(err.to_string().contains("limit of 5"), "{err}");
}

#[test]
fn stops_a_decompression_bomb_at_the_limit() {
    let f = fixture();
    // 200 MiB of zeros, gzipped to about 200 KiB.
    let size: u64 = 200 << 20;
    let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
    let header = Raw::header(b"zeros", EntryType::Regular, 0o644, size, b"");
    encoder.write_all(header.as_bytes()).expect("gzip");
    io::copy(&mut io::repeat(0).take(size), &mut encoder).expect("gzip");
    encoder.write_all(&[0u8; 1024]).expect("gzip");
    let bomb = encoder.finish().expect("gzip");
    let started = Instant::now();
    let err = f.refuses(&bomb, ErrorKind::TooLarge, "zeros");
    assert!(
        err.to_string().contains(&format!("limit of {}", 10 << 20)),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // Many files, each within the limit: stops at the one that crosses it.
    let mut raw = Raw::default();
    let mib = vec![1u8; 1 << 20];
    for i in 0..12 {
        raw = raw.file(&format!("part{i:02}"), &mib);
    }
    f.refuses(&gzip(&raw.finish()), ErrorKind::TooLarge, "part10");
}

#[test]
fn an_unpack_into_the_disk_reserve_is_refused_and_leaves_nothing() {
    // As `WriteFile` does, an unpack keeps `disk_reserve_bytes` free: the agent's own
    // records and the next transfer need room. No disk has this much free, so every
    // file with content is refused, plain or sparse, naming the entry.
    let mut f = fixture();
    f.limits.disk_reserve_bytes = u64::MAX;
    let raw = Raw::default().file("bin/tool", b"#!/bin/sh\n");
    let err = f.refuses(&raw.finish(), ErrorKind::NoSpace, "bin/tool");
    assert!(err.to_string().contains("reserve"), "{err}");
    let sparse = sparse_1_0("data/table.dat", 10_000, &[(3, b"abc"), (10_000, b"")]);
    f.refuses(&sparse.finish(), ErrorKind::NoSpace, "data/table.dat");
    // Within the reserve, the same archive unpacks.
    f.limits.disk_reserve_bytes = 0;
    f.put(
        "ok.tar",
        &Raw::default().file("bin/tool", b"#!/bin/sh\n").finish(),
    );
    f.unpack("ok.tar", "ok").expect("room enough");
}

#[test]
fn refuses_headers_that_lie_about_sizes() {
    let f = fixture();
    // Says 1000 bytes, holds 100, then the archive ends.
    let header = Raw::header(b"short", EntryType::Regular, 0o644, 1000, b"");
    let mut bytes = header.as_bytes().to_vec();
    bytes.extend([b'a'; 100]);
    f.refuses(&bytes, ErrorKind::BadArchive, "short");
    // Says 10 bytes, holds 2000: the rest is read as a header and fails its checksum.
    let header = Raw::header(b"long", EntryType::Regular, 0o644, 10, b"");
    let mut bytes = header.as_bytes().to_vec();
    bytes.extend([b'a'; 2048]);
    bytes.extend([0u8; 1024]);
    f.refuses(&bytes, ErrorKind::BadArchive, "after entry 1");
    // A long-name header of 2 MiB would be held in memory: refused.
    let name = vec![b'n'; 2 << 20];
    let header = Raw::header(
        b"././@LongLink",
        EntryType::GNULongName,
        0o644,
        name.len() as u64,
        b"",
    );
    let bytes = Raw::default().push(&header, &name).file("x", b"x").finish();
    f.refuses(&gzip(&bytes), ErrorKind::BadArchive, "extended header");
}

#[test]
fn a_header_size_the_reader_cannot_use_is_refused_naming_its_entry() {
    let f = fixture();
    // Base-256 sizes: the largest, and a negative one.
    for size in [
        [0x80].iter().chain(&[0xff; 11]),
        [0xff; 12][..1].iter().chain(&[0xff; 11]),
    ] {
        let mut header = Raw::header(b"huge-size", EntryType::Regular, 0o644, 0, b"");
        for (at, byte) in header.as_old_mut().size.iter_mut().zip(size) {
            *at = *byte;
        }
        header.set_cksum();
        let bytes = Raw::default().push(&header, b"").file("x", b"x").finish();
        f.refuses(&bytes, ErrorKind::BadArchive, "entry 'huge-size'");
        // After another entry, and gzipped.
        let bytes = Raw::default()
            .file("first", b"1")
            .push(&header, b"")
            .finish();
        f.refuses(&gzip(&bytes), ErrorKind::BadArchive, "entry 'huge-size'");
    }
    // A PAX size of u64::MAX, which the reader cannot pad to a block.
    let record = b"29 size=18446744073709551615\n";
    let pax = Raw::header(b"pax", EntryType::XHeader, 0o644, record.len() as u64, b"");
    let bytes = Raw::default()
        .push(&pax, record)
        .file("pax-size", b"x")
        .finish();
    f.refuses(&bytes, ErrorKind::BadArchive, "entry 'pax-size'");
}

#[test]
fn refuses_truncated_and_foreign_archives() {
    let f = fixture();
    let good = release("0.1.0");
    f.refuses(
        &good[..good.len() / 2],
        ErrorKind::BadArchive,
        "hostile.tar",
    );
    // Cut before the gzip trailer: the tar looks complete, the CRC is never seen.
    f.refuses(
        &good[..good.len() - 4],
        ErrorKind::BadArchive,
        "hostile.tar",
    );
    let mut corrupt = good.clone();
    let at = corrupt.len() - 6;
    corrupt[at] ^= 0xff;
    f.refuses(&corrupt, ErrorKind::BadArchive, "hostile.tar");
    f.refuses(
        b"just some text, not an archive at all",
        ErrorKind::BadArchive,
        "hostile.tar",
    );
    f.refuses(&[0x1f, 0x8b, 1, 2, 3], ErrorKind::BadArchive, "hostile.tar");
    f.refuses(b"", ErrorKind::BadArchive, "hostile.tar");
    // Other compressors are named.
    let mut xz = b"\xfd7zXZ\x00".to_vec();
    xz.resize(2048, 7);
    f.refuses(&xz, ErrorKind::BadArchive, "xz data");
    let mut zstd = vec![0x28, 0xb5, 0x2f, 0xfd];
    zstd.resize(100, 1);
    f.refuses(&gzip(&zstd), ErrorKind::BadArchive, "zstd data");
    // A tar cut at an entry boundary, without its end-of-archive marker.
    let mut cut = Raw::default().file("a", b"a").finish();
    cut.truncate(1024);
    f.refuses(&cut, ErrorKind::BadArchive, "end-of-archive");
}

#[test]
fn concurrent_unpacks_into_one_dest_are_busy() {
    let f = fixture();
    let dest = f.root.resolve("rel").expect("resolve");
    let _held = PathLock::acquire(dest, "rel").expect("lock");
    f.put_release("a.tar.gz", "0.1.0");
    let err = f.unpack("a.tar.gz", "rel").unwrap_err();
    assert!(matches!(err, Error::Busy(_)), "{err}");
}

#[test]
fn sweep_removes_interrupted_unpacks() {
    let f = fixture();
    let left = f.root.state(State::Unpack).join("123-456-0/tree/bin");
    fs::create_dir_all(&left).expect("mkdir");
    fs::write(left.join("x"), b"x").expect("write");
    sweep_stale(&f.root).expect("sweep");
    assert!(f.staging_is_empty());
}

#[test]
fn special_file_types_never_reach_disk() {
    // Belt and braces for the refusals above: nothing under the root is special.
    let f = fixture();
    f.unpack_release();
    for (path, _) in f.snapshot() {
        let meta = fs::symlink_metadata(&path).expect("meta");
        let t = meta.file_type();
        assert!(
            !t.is_char_device() && !t.is_block_device() && !t.is_fifo(),
            "{path:?}"
        );
        assert_eq!(meta.permissions().mode() & 0o6000, 0, "{path:?}");
    }
}

impl Raw {
    /// A PAX extended header (`x`) holding `records`.
    pub(super) fn pax(self, records: &[(&str, &[u8])]) -> Self {
        self.pax_typed(EntryType::XHeader, records)
    }

    pub(super) fn pax_typed(self, kind: EntryType, records: &[(&str, &[u8])]) -> Self {
        let data = pax_records(records);
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(kind);
        header.set_size(data.len() as u64);
        header.set_path("PaxHeaders/x").expect("path");
        header.set_cksum();
        self.push(&header, &data)
    }
}

/// PAX records `"<length> key=value\n"`, the length counting its own digits.
pub(super) fn pax_records(records: &[(&str, &[u8])]) -> Vec<u8> {
    let mut data = Vec::new();
    for (key, value) in records {
        let body = 3 + key.len() + value.len();
        let mut len = body + 1;
        while len.to_string().len() + body != len {
            len = len.to_string().len() + body;
        }
        data.extend(format!("{len} {key}=").into_bytes());
        data.extend_from_slice(value);
        data.push(b'\n');
    }
    data
}

/// A GNU sparse 1.0 entry as GNU tar writes it: map lines, padded, then each
/// region's data from a block boundary.
fn sparse_1_0(name: &str, real_size: u64, regions: &[(u64, &[u8])]) -> Raw {
    let mut data = format!("{}\n", regions.len()).into_bytes();
    for (offset, bytes) in regions {
        data.extend(format!("{offset}\n{}\n", bytes.len()).into_bytes());
    }
    data.resize(data.len().div_ceil(512) * 512, 0);
    for (i, (_, bytes)) in regions.iter().enumerate() {
        data.extend_from_slice(bytes);
        if i + 1 != regions.len() {
            data.resize(data.len().div_ceil(512) * 512, 0);
        }
    }
    let real = real_size.to_string();
    Raw::default()
        .pax(&[
            ("GNU.sparse.major", b"1"),
            ("GNU.sparse.minor", b"0"),
            ("GNU.sparse.name", name.as_bytes()),
            ("GNU.sparse.realsize", real.as_bytes()),
        ])
        .entry("./GNUSparseFile.1/x", EntryType::Regular, 0o640, &data, "")
}

#[test]
fn pax_sparse_files_are_expanded_under_their_real_name() {
    let f = fixture();
    let tar = sparse_1_0(
        "data/table.dat",
        10_000,
        &[(3, b"abc"), (4_000, &[b'x'; 700]), (10_000, b"")],
    )
    .finish();
    f.put("s.tar", &tar);
    let done = f.unpack("s.tar", "out").expect("unpack");
    assert_eq!((done.entries, done.bytes), (1, 10_000));
    let out = f.root.path().join("out");
    assert!(!out.join("GNUSparseFile.1").exists());
    let bytes = fs::read(out.join("data/table.dat")).expect("read");
    let mut expected = vec![0u8; 10_000];
    expected[3..6].copy_from_slice(b"abc");
    expected[4_000..4_700].copy_from_slice(&[b'x'; 700]);
    assert_eq!(bytes, expected);
    let mode = fs::metadata(out.join("data/table.dat"))
        .expect("meta")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o640);

    // Format 0.1: the map in a record; 0.0: offset/numbytes pairs, real name.
    let mut v00_data = vec![0u8; 514];
    v00_data[..2].copy_from_slice(b"ab");
    v00_data[512..].copy_from_slice(b"cd");
    let v01 = Raw::default()
        .pax(&[
            ("GNU.sparse.major", b"0"),
            ("GNU.sparse.minor", b"1"),
            ("GNU.sparse.name", b"v01"),
            ("GNU.sparse.size", b"2000"),
            ("GNU.sparse.numblocks", b"2"),
            ("GNU.sparse.map", b"1000,3,2000,0"),
        ])
        .entry("GNUSparseFile.7/v01", EntryType::Regular, 0o644, b"xyz", "")
        .pax(&[
            ("GNU.sparse.size", b"600"),
            ("GNU.sparse.numblocks", b"2"),
            ("GNU.sparse.offset", b"0"),
            ("GNU.sparse.numbytes", b"2"),
            ("GNU.sparse.offset", b"598"),
            ("GNU.sparse.numbytes", b"2"),
        ])
        .entry("v00", EntryType::Regular, 0o644, &v00_data, "")
        .finish();
    f.put("v0.tar", &v01);
    f.unpack("v0.tar", "v0").expect("unpack 0.x");
    let out = f.root.path().join("v0");
    let v01 = fs::read(out.join("v01")).expect("v01");
    assert_eq!(v01.len(), 2000);
    assert_eq!(&v01[1000..1003], b"xyz");
    let v00 = fs::read(out.join("v00")).expect("v00");
    assert_eq!(v00.len(), 600);
    assert_eq!((&v00[..2], &v00[598..]), (&b"ab"[..], &b"cd"[..]));
    assert!(v00[2..598].iter().all(|b| *b == 0));
}

fn padded(bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    out.resize(bytes.len().div_ceil(512) * 512, 0);
    out
}

#[test]
fn bad_pax_sparse_files_are_refused() {
    let f = fixture();
    let bad = ErrorKind::BadArchive;
    // A region beyond the file's size; a map that does not reach it.
    f.refuses(
        &sparse_1_0("a", 100, &[(90, &[b'x'; 20])]).finish(),
        bad,
        "beyond the file's size",
    );
    f.refuses(
        &sparse_1_0("a", 100, &[(10, b"x")]).finish(),
        bad,
        "not at the file's size",
    );
    // Overlapping regions.
    f.refuses_unsafe(
        sparse_1_0("a", 600, &[(0, &[b'x'; 512]), (100, &[b'y'; 500])]),
        "overlaps",
    );
    let v1: Records = &[
        ("GNU.sparse.major", b"1"),
        ("GNU.sparse.minor", b"0"),
        ("GNU.sparse.name", b"a"),
        ("GNU.sparse.realsize", b"10"),
    ];
    let short_v1: Records = &[("GNU.sparse.major", b"1"), ("GNU.sparse.realsize", b"10")];
    let map: Records = &[
        ("GNU.sparse.size", b"10"),
        ("GNU.sparse.numblocks", b"1"),
        ("GNU.sparse.map", b"0,10"),
    ];
    let v2: Records = &[("GNU.sparse.major", b"2"), ("GNU.sparse.realsize", b"1")];
    let unsafe_ = ErrorKind::UnsafeArchive;
    let cases: [(Records, &str, &[u8], ErrorKind, &str); 5] = [
        // A map line that is not a number, and one that never ends.
        (v1, "s", &padded(b"1\n-3\n7\n"), bad, "'-3'"),
        (short_v1, "s", &[b'1'; 1024], bad, "does not end"),
        // Stored data shorter than the map needs.
        (map, "s", b"12345", bad, "holds 5"),
        // Sparse keywords on a directory; an unknown sparse version.
        (map, "d/", b"", unsafe_, "on a directory entry"),
        (v2, "s", b"x", unsafe_, "format 2.0"),
    ];
    for (records, name, data, kind, needle) in cases {
        let entry_type = match name.ends_with('/') {
            true => EntryType::Directory,
            false => EntryType::Regular,
        };
        let raw = Raw::default()
            .pax(records)
            .entry(name, entry_type, 0o755, data, "");
        f.refuses(&raw.finish(), kind, needle);
    }
}

/// PAX records for [`Raw::pax`].
type Records<'a> = &'a [(&'a str, &'a [u8])];

#[test]
fn sparse_expanded_size_counts_against_the_limit() {
    let mut f = fixture();
    f.limits.max_unpack_bytes = 1 << 20;
    // 4 bytes stored, 2 MiB expanded.
    let tar = Raw::default()
        .pax(&[
            ("GNU.sparse.size", b"2097152"),
            ("GNU.sparse.numblocks", b"2"),
            ("GNU.sparse.map", b"0,4,2097152,0"),
        ])
        .entry("big", EntryType::Regular, 0o644, b"abcd", "")
        .finish();
    let err = f.refuses(&tar, ErrorKind::TooLarge, "big");
    assert!(err.to_string().contains("limit of 1048576"), "{err}");
    // Many small sparse files, each under the limit: stops at the one crossing it.
    let mut raw = Raw::default();
    for i in 0..4 {
        raw = raw
            .pax(&[
                ("GNU.sparse.size", b"400000"),
                ("GNU.sparse.numblocks", b"1"),
                ("GNU.sparse.map", b"400000,0"),
            ])
            .entry(&format!("s{i}"), EntryType::Regular, 0o644, b"", "");
    }
    f.refuses(&raw.finish(), ErrorKind::TooLarge, "s2");
}

#[test]
fn pax_records_that_change_meaning_are_refused() {
    let f = fixture();
    let unsafe_ = ErrorKind::UnsafeArchive;
    let bad = ErrorKind::BadArchive;
    let raw = Raw::default;
    // A record whose length is wrong.
    let mut wrong_length = tar::Header::new_ustar();
    wrong_length.set_entry_type(EntryType::XHeader);
    wrong_length.set_size(11);
    wrong_length.set_path("PaxHeaders/x").expect("path");
    wrong_length.set_cksum();
    let global = EntryType::XGlobalHeader;
    let cases = [
        (
            raw().pax(&[("VENDOR.layout", b"striped")]),
            unsafe_,
            "'VENDOR.layout'",
        ),
        (
            raw().pax(&[("SCHILY.realsize", b"9")]),
            unsafe_,
            "'SCHILY.realsize'",
        ),
        (
            raw().pax(&[("GNU.volume.offset", b"512")]),
            unsafe_,
            "multi-volume",
        ),
        (
            raw().pax(&[("path", b"a"), ("path", b"b")]),
            unsafe_,
            "twice",
        ),
        (raw().pax(&[("size", b"+1")]), bad, "'+1'"),
        (
            raw().push(&wrong_length, b"99 path=x\n"),
            bad,
            "malformed pax extension",
        ),
        // A global header that would rename or resize every following entry.
        (
            raw().pax_typed(global, &[("path", b"x")]),
            unsafe_,
            "every following entry",
        ),
        (
            raw().pax_typed(global, &[("size", b"0")]),
            unsafe_,
            "every following entry",
        ),
        // A local header spent on a global header, as the tar crate would.
        (
            raw()
                .pax(&[("path", b"renamed")])
                .pax_typed(global, &[("comment", b"hi")]),
            unsafe_,
            "global header",
        ),
    ];
    for (raw, kind, needle) in cases {
        f.refuses(&raw.file("f", b"x").finish(), kind, needle);
    }
    // Both a GNU long name and a PAX path, or long link and linkpath.
    let long = Raw::header(b"././@LongLink", EntryType::GNULongName, 0o644, 4, b"");
    f.refuses_unsafe(
        raw()
            .pax(&[("path", b"pax")])
            .push(&long, b"gnu\0")
            .file("f", b"x"),
        "disagree",
    );
    let long = Raw::header(b"././@LongLink", EntryType::GNULongLink, 0o644, 4, b"");
    f.refuses_unsafe(
        Raw::default()
            .file("t", b"x")
            .file("u", b"x")
            .pax(&[("linkpath", b"t")])
            .push(&long, b"u\0")
            .symlink("l", ""),
        "disagree",
    );
    // Ignored metadata does not stop anything.
    let tar = Raw::default()
        .pax(&[
            ("mtime", b"1700000000.25"),
            ("uname", b"build"),
            ("SCHILY.xattr.user.k", b"v"),
        ])
        .file("kept", b"x")
        .finish();
    f.put("ok.tar", &tar);
    f.unpack("ok.tar", "ok").expect("ignored keywords");
}

#[test]
fn names_with_nul_bytes_are_refused() {
    let f = fixture();
    let long = Raw::header(b"././@LongLink", EntryType::GNULongName, 0o644, 9, b"");
    f.refuses_unsafe(
        Raw::default().push(&long, b"ab\0cd/efg").file("x", b"x"),
        "NUL",
    );
    let long = Raw::header(b"././@LongLink", EntryType::GNULongLink, 0o644, 4, b"");
    f.refuses_unsafe(
        Raw::default().push(&long, b"a\0b\0").symlink("l", ""),
        "NUL",
    );
}

#[test]
fn gnu_extras_unpack_as_gnu_tar_does() {
    let f = fixture();
    let tar = Raw::default()
        // A volume label: nothing is extracted for it.
        .entry("release 1", EntryType::new(b'V'), 0o644, b"", "")
        // An incremental dump's directory, with its listing.
        .entry("d/", EntryType::new(b'D'), 0o750, b"Yf\0\0", "")
        .file("d/f", b"x")
        // A contiguous file is a regular file.
        .entry("c", EntryType::Continuous, 0o600, b"contiguous", "")
        // A hard link to a symlink links the symlink.
        .symlink("d/s", "f")
        .hard_link("d/s2", "d/s")
        .finish();
    f.put("g.tar", &tar);
    let done = f.unpack("g.tar", "out").expect("unpack");
    assert_eq!(done.entries, 5);
    let out = f.root.path().join("out");
    assert_eq!(fs::read_dir(&out).expect("list").count(), 2);
    assert_eq!(
        fs::metadata(out.join("d")).expect("d").permissions().mode() & 0o777,
        0o750
    );
    assert_eq!(fs::read(out.join("c")).expect("c"), b"contiguous");
    assert_eq!(
        fs::read_link(out.join("d/s2")).expect("link"),
        Path::new("f")
    );
    assert_eq!(
        fs::symlink_metadata(out.join("d/s")).expect("s").ino(),
        fs::symlink_metadata(out.join("d/s2")).expect("s2").ino()
    );
}

/// An old GNU sparse entry: `regions` in the header's four slots (None for a
/// blank slot), data `stored`, expanded size `real`.
fn old_sparse(regions: &[Option<(u64, u64)>], stored: &[u8], real: u64) -> Raw {
    let mut header = tar::Header::new_gnu();
    header.set_path("sparse.dat").expect("path");
    header.set_entry_type(EntryType::GNUSparse);
    header.set_mode(0o644);
    header.set_size(stored.len() as u64);
    let gnu = header.as_gnu_mut().expect("gnu");
    for (slot, region) in gnu.sparse.iter_mut().zip(regions) {
        if let Some((offset, length)) = region {
            slot.offset[..11].copy_from_slice(format!("{offset:011o}").as_bytes());
            slot.numbytes[..11].copy_from_slice(format!("{length:011o}").as_bytes());
        }
    }
    gnu.realsize[..11].copy_from_slice(format!("{real:011o}").as_bytes());
    header.set_cksum();
    Raw::default().push(&header, stored)
}

#[test]
fn old_gnu_sparse_files_are_expanded_and_checked() {
    let f = fixture();
    // As GNU tar writes it: a last empty region at the end when the file ends in
    // a hole.
    let tar = old_sparse(
        &[Some((0, 512)), Some((4096, 3)), Some((5000, 0))],
        &{
            let mut data = vec![b'a'; 512];
            data.extend(b"xyz");
            data
        },
        5000,
    )
    .finish();
    f.put("s.tar", &tar);
    let done = f.unpack("s.tar", "out").expect("unpack");
    assert_eq!(done.bytes, 5000);
    let bytes = fs::read(f.root.path().join("out/sparse.dat")).expect("read");
    assert_eq!(bytes.len(), 5000);
    assert_eq!(&bytes[..512], &[b'a'; 512][..]);
    assert_eq!(&bytes[4096..4099], b"xyz");
    assert!(bytes[512..4096].iter().all(|b| *b == 0) && bytes[4099..].iter().all(|b| *b == 0));
    // A region after a blank slot: GNU tar stops at the blank one.
    f.refuses_unsafe(
        old_sparse(&[Some((0, 512)), None, Some((4096, 3))], &[b'a'; 515], 4099),
        "after the empty slot 1",
    );
    // The expanded size counts against the limit.
    let mut small = fixture();
    small.limits.max_unpack_bytes = 4096;
    small.refuses(&tar, ErrorKind::TooLarge, "sparse.dat");
}

#[test]
fn a_sparse_file_of_each_format_counts_its_real_size_exactly() {
    // Regions at unaligned offsets so that 1.0 pads between them, and a map that
    // takes a block of its own.
    let regions: &[(u64, &[u8])] = &[(3, b"abc"), (4_000, &[b'x'; 700]), (10_000, b"")];
    let v10 = sparse_1_0("v10.dat", 10_000, regions).finish();
    let mut v00_data = b"abc".to_vec();
    v00_data.resize(512, 0);
    v00_data.extend([b'x'; 700]);
    let v00 = Raw::default()
        .pax(&[
            ("GNU.sparse.size", b"10000"),
            ("GNU.sparse.numblocks", b"3"),
            ("GNU.sparse.offset", b"3"),
            ("GNU.sparse.numbytes", b"3"),
            ("GNU.sparse.offset", b"4000"),
            ("GNU.sparse.numbytes", b"700"),
            ("GNU.sparse.offset", b"10000"),
            ("GNU.sparse.numbytes", b"0"),
        ])
        .entry("v00.dat", EntryType::Regular, 0o644, &v00_data, "")
        .finish();
    for (tar, name) in [(v10, "v10.dat"), (v00, "v00.dat")] {
        let mut at_limit = fixture();
        at_limit.limits.max_unpack_bytes = 10_000;
        at_limit.put("s.tar", &tar);
        let done = at_limit
            .unpack("s.tar", "out")
            .unwrap_or_else(|e| panic!("{name} at the limit: {e}"));
        assert_eq!(done.bytes, 10_000, "{name}");
        let mut over = fixture();
        over.limits.max_unpack_bytes = 9_999;
        over.refuses(&tar, ErrorKind::TooLarge, name);
    }
}

#[test]
fn entries_readers_disagree_on_are_refused() {
    let f = fixture();
    // GNU tar reads a hard link's size as 0, the tar crate skips the data.
    f.refuses_unsafe(
        Raw::default()
            .file("t", b"x")
            .entry("h", EntryType::Link, 0o644, b"hidden", "t"),
        "a hard link entry that says it holds 6 bytes",
    );
    // Directories and symlinks that claim data: GNU tar reads it as headers.
    let hidden = Raw::default().file("hidden", b"H").bytes;
    f.refuses_unsafe(
        Raw::default().entry("d/", EntryType::Directory, 0o755, &hidden, ""),
        "a directory entry that says it holds 1024 bytes",
    );
    f.refuses_unsafe(
        Raw::default().entry("s", EntryType::Symlink, 0o777, &hidden, "t"),
        "a symlink entry that says it holds 1024 bytes",
    );
    // A file whose name ends in '/' but which holds data.
    f.refuses_unsafe(Raw::default().file("dir/", b"data"), "ends in '/'");
    // A hard-linked symlink is checked from where the link puts it.
    f.refuses_unsafe(
        Raw::default()
            .dir("a/")
            .dir("a/b/")
            .symlink("a/b/s", "../../x")
            .hard_link("top", "a/b/s"),
        "'top'",
    );
    // A ustar header of another version with a prefix.
    let mut odd = tar::Header::new_ustar();
    odd.set_path("dir/file").expect("path");
    odd.as_ustar_mut().expect("ustar").prefix[..3].copy_from_slice(b"pre");
    odd.as_mut_bytes()[263..265].copy_from_slice(b"\0\0");
    odd.set_size(0);
    odd.set_cksum();
    f.refuses_unsafe(Raw::default().push(&odd, b""), "name prefix");
    // Extension headers that the tar crate does not fold (no ustar or GNU magic).
    let mut v7 = tar::Header::new_old();
    v7.as_old_mut().name[..4].copy_from_slice(b"long");
    v7.set_entry_type(EntryType::GNULongName);
    v7.set_size(0);
    v7.set_cksum();
    f.refuses_unsafe(Raw::default().push(&v7, b""), "without ustar or GNU magic");
}

#[test]
fn a_marker_reads_back_as_written() {
    // The marker's fields, as agents have written them.
    let f = fixture();
    let json = br#"{"dest": "rel", "archive": "a.tar.gz", "sha256": "ab", "entries": 9,
        "bytes": 3066, "dev": 2049, "ino": 1234, "born": 1700000000123456789}"#;
    let path = f.root.state(State::Unpacked).join("old.json");
    fs::write(&path, json).expect("write");
    let marker = read_marker(&path).expect("read");
    assert_eq!(
        (marker.dest.as_str(), marker.archive.as_str()),
        ("rel", "a.tar.gz")
    );
    let done = marker.unpacked(sha(b""), true);
    assert_eq!((done.entries, done.bytes), (9, 3066));
    let again: serde_json::Value = serde_json::to_value(&marker).expect("encode");
    let written: serde_json::Value = serde_json::from_slice(json).expect("decode");
    assert_eq!(again, written);
}
