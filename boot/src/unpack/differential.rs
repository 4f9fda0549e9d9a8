//! `Unpack` against GNU tar: a corpus of real archives, each unpacked by the agent and by
//! GNU tar into separate directories, and the two trees compared: names, types, modes,
//! link targets, hard-link groups and bytes.
//!
//! The corpus is made here with GNU tar (formats gnu, oldgnu, pax, ustar and v7, plain
//! and gzipped; sparse files in old GNU and in PAX 0.0, 0.1 and 1.0; names over 100 and
//! over 255 bytes; long link targets; symlinks; hard links, also to a symlink; empty
//! directories; unusual modes; unicode names; an incremental dump; a labelled archive;
//! the volumes of a multi-volume archive) and with rebar3 (an OTP release). Where GNU
//! tar fails, the agent must refuse; where GNU tar would guess (an unknown entry type,
//! which it extracts as a regular file, or a lone continuation volume, which it
//! extracts as a fragment) the agent must refuse, naming the entry.
//!
//! Modes: GNU tar run as root keeps the modes stored in the archive; the agent applies
//! its documented policy (file and directory permission bits only, no group or other
//! write, owner read on files and owner `rwx` on directories; setuid and setgid are
//! refused), so GNU tar's modes are compared after that policy. Times and owners are not
//! compared: the agent does not apply them. These tests need GNU tar and rebar3 on PATH
//! (`scripts/test.sh` installs both) and fail when they are missing.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use erel_proto::{ErrorKind, Unpack, Unpacked};
use sha2::{Digest, Sha256};
use tar::EntryType;

use super::tests::Raw;
use crate::fs::Root;
use crate::settings::Limits;

/// One thing found in an unpacked tree.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Dir { mode: u32 },
    File { mode: u32, len: u64, sha256: String },
    Symlink { target: PathBuf },
}

/// A whole unpacked tree: every path under it, and which paths are one inode.
#[derive(Debug, PartialEq, Eq)]
struct Tree {
    nodes: BTreeMap<String, Node>,
    hard_links: BTreeSet<BTreeSet<String>>,
}

/// Reads the tree under `dir`; with `policy`, modes are passed through the agent's
/// documented policy first (for GNU tar's tree): permission bits only, no group or
/// other write, owner read on files and owner `rwx` on directories.
fn tree(dir: &Path, policy: bool) -> Tree {
    let policy = |mode: u32, owner: u32| match policy {
        true => (mode & 0o777 & !0o022) | owner,
        false => mode,
    };
    let mut nodes = BTreeMap::new();
    let mut inodes: BTreeMap<(u64, u64), BTreeSet<String>> = BTreeMap::new();
    let mut queue = vec![dir.to_path_buf()];
    while let Some(here) = queue.pop() {
        for entry in fs::read_dir(&here).expect("list") {
            let path = entry.expect("entry").path();
            let rel = path.strip_prefix(dir).expect("under");
            let rel = rel.to_string_lossy().into_owned();
            let meta = fs::symlink_metadata(&path).expect("meta");
            let mode = meta.permissions().mode() & 0o7777;
            let node = if meta.file_type().is_symlink() {
                let target = fs::read_link(&path).expect("link");
                Node::Symlink { target }
            } else if meta.is_dir() {
                queue.push(path.clone());
                let mode = policy(mode, 0o700);
                Node::Dir { mode }
            } else if meta.is_file() {
                let bytes = fs::read(&path).expect("read");
                Node::File {
                    mode: policy(mode, 0o400),
                    len: meta.len(),
                    sha256: format!("{:x}", Sha256::digest(&bytes)),
                }
            } else {
                panic!("{} is neither file, directory nor symlink", path.display());
            };
            if !meta.is_dir() && meta.nlink() > 1 {
                let group = inodes.entry((meta.dev(), meta.ino())).or_default();
                group.insert(rel.clone());
            }
            nodes.insert(rel, node);
        }
    }
    let hard_links = inodes.into_values().filter(|g| g.len() > 1).collect();
    Tree { nodes, hard_links }
}

/// What differs between the agent's tree and GNU tar's, one line each.
fn differences(agent: &Tree, gnu: &Tree) -> Vec<String> {
    let names: BTreeSet<&String> = agent.nodes.keys().chain(gnu.nodes.keys()).collect();
    let mut out: Vec<String> = names
        .into_iter()
        .filter_map(|name| match (agent.nodes.get(name), gnu.nodes.get(name)) {
            (Some(a), Some(g)) if a == g => None,
            (a, g) => Some(format!("{name}: agent {a:?}, GNU tar {g:?}")),
        })
        .collect();
    if agent.hard_links != gnu.hard_links {
        let (a, g) = (&agent.hard_links, &gnu.hard_links);
        out.push(format!("hard links: agent {a:?}, GNU tar {g:?}"));
    }
    out
}

/// Runs GNU tar in `cwd` with umask 022 (as an operator's shell has) and `args`.
fn gnu_tar<S: AsRef<OsStr>>(args: &[S], cwd: &Path) -> Output {
    let version = Command::new("tar")
        .arg("--version")
        .output()
        .expect("GNU tar must be on PATH for the differential unpack tests");
    let version = String::from_utf8_lossy(&version.stdout);
    assert!(
        version.contains("GNU tar"),
        "the differential unpack tests need GNU tar, found: {version}"
    );
    Command::new("sh")
        .args(["-c", "umask 022; exec tar \"$@\"", "sh"])
        .args(args)
        .current_dir(cwd)
        .env("LC_ALL", "C")
        .output()
        .expect("run tar")
}

fn gnu_tar_ok<S: AsRef<OsStr> + std::fmt::Debug>(args: &[S], cwd: &Path) {
    let out = gnu_tar(args, cwd);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tar {args:?} failed: {err}");
}

/// A temporary agent root with the corpus' archives under `archives/`.
struct Bench {
    dir: tempfile::TempDir,
    root: Root,
}

/// What the agent must do with an archive.
enum Expect {
    /// GNU tar succeeds and the trees are the same.
    Same,
    /// The agent refuses with `kind`, naming `needle`; `gnu_fails` says whether GNU tar
    /// fails too (when it does not, it would have guessed).
    Refused(ErrorKind, &'static str, bool),
}

impl Bench {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = Root::open(&dir.path().join("root")).expect("root");
        Bench { dir, root }
    }

    fn work(&self, name: &str) -> PathBuf {
        let path = self.dir.path().join("work").join(name);
        fs::create_dir_all(&path).expect("mkdir");
        path
    }

    /// A directory `work/name` filled by `parts`.
    fn tree(&self, name: &str, parts: &[fn(&Path)]) -> PathBuf {
        let dir = self.work(name);
        parts.iter().for_each(|part| part(&dir));
        dir
    }

    /// Unpacks `archive` (copied into the root) with the agent into `dest`.
    fn unpack(
        &self,
        archive: &Path,
        dest: &str,
        limits: &Limits,
    ) -> crate::error::Result<Unpacked> {
        let name = archive.file_name().expect("name").to_string_lossy();
        let stored = format!("archives/{name}");
        let in_root = self.root.path().join(&stored);
        fs::create_dir_all(in_root.parent().expect("parent")).expect("mkdir");
        fs::copy(archive, &in_root).expect("copy archive");
        let request = Unpack {
            archive: stored,
            dest: dest.to_string(),
            sha256: None,
        };
        super::unpack(&self.root, &request, limits)
    }

    /// Unpacks `archive` with the agent and with GNU tar and checks `expect`.
    #[track_caller]
    fn check(&self, case: &str, archive: &Path, expect: Expect) {
        let dest = format!("out/{case}");
        let agent = self.unpack(archive, &dest, &Limits::default());
        let gnu_dir = self.work(&format!("gnu-{case}"));
        let args = [
            "-xf".as_ref(),
            archive.as_os_str(),
            "-C".as_ref(),
            gnu_dir.as_os_str(),
        ];
        let gnu = gnu_tar(&args, self.dir.path());
        let gnu_err = String::from_utf8_lossy(&gnu.stderr).into_owned();
        match expect {
            Expect::Same => {
                assert!(gnu.status.success(), "{case}: GNU tar failed: {gnu_err}");
                let done = agent.unwrap_or_else(|e| panic!("{case}: the agent refused: {e}"));
                assert!(!done.already, "{case}");
                let ours = tree(&self.root.path().join(&dest), false);
                let theirs = tree(&gnu_dir, true);
                let nodes = &ours.nodes;
                assert!(nodes.len() > 1, "{case}: nothing unpacked: {nodes:?}");
                let diff = differences(&ours, &theirs).join("\n");
                assert!(
                    diff.is_empty(),
                    "{case}: the agent's tree differs from GNU tar's:\n{diff}"
                );
            }
            Expect::Refused(kind, needle, gnu_fails) => {
                let err = match agent {
                    Ok(done) => panic!("{case}: the agent unpacked {done:?}, must refuse"),
                    Err(e) => e,
                };
                assert_eq!(err.kind(), kind, "{case}: {err}");
                let message = err.to_string();
                assert!(message.contains(needle), "{case}: {needle:?} not in: {err}");
                assert!(!self.root.path().join(&dest).exists(), "{case}");
                let status = gnu.status;
                assert_eq!(
                    !status.success(),
                    gnu_fails,
                    "{case}: GNU tar status {status:?}: {gnu_err}"
                );
            }
        }
    }

    /// Saves a crafted archive and checks the agent refuses it.
    #[track_caller]
    fn refuses(
        &self,
        case: &str,
        raw: Raw,
        kind: ErrorKind,
        needle: &'static str,
        gnu_fails: bool,
    ) {
        let path = self.work("crafted").join(case);
        fs::write(&path, raw.finish()).expect("write");
        self.check(case, &path, Expect::Refused(kind, needle, gnu_fails));
    }
}

/// Writes `data` at each `(offset, data)` of a file of `len` bytes, leaving holes.
fn sparse_file(path: &Path, len: u64, parts: &[(u64, &[u8])]) {
    let mut file = fs::File::create(path).expect("create sparse file");
    file.set_len(len).expect("set_len");
    for (offset, data) in parts {
        file.seek(SeekFrom::Start(*offset)).expect("seek");
        file.write_all(data).expect("write");
    }
}

fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

fn write(path: &Path, data: &[u8], mode: u32) {
    fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    fs::write(path, data).expect("write");
    set_mode(path, mode);
}

fn symlink(target: &str, at: &Path) {
    std::os::unix::fs::symlink(target, at).expect("symlink");
}

fn hard_link(dir: &Path, from: &str, to: &str) {
    fs::hard_link(dir.join(from), dir.join(to)).expect("hard link");
}

/// A release-like tree every tar format can hold: short names, links, modes, unicode.
fn basic_tree(dir: &Path) {
    write(&dir.join("bin/run"), b"#!/bin/sh\necho run\n", 0o755);
    write(&dir.join("etc/conf"), b"key = value\n", 0o644);
    write(&dir.join("etc/secret"), b"s3cret\n", 0o600);
    write(&dir.join("etc/readonly"), b"ro\n", 0o444);
    write(&dir.join("shared/gw"), b"group writable\n", 0o664);
    let beam: Vec<u8> = (0..70_000u32).map(|i| (i * 7 % 251) as u8).collect();
    write(&dir.join("lib/app-1.0/ebin/app.beam"), &beam, 0o644);
    write(&dir.join("empty"), b"", 0o644);
    let unicode = dir.join("donn\u{e9}es/\u{fc}ber-gr\u{f6}\u{df}e.txt");
    write(&unicode, "unicode".as_bytes(), 0o644);
    let rocket = dir.join("\u{65e5}\u{672c}/\u{1f680}.txt");
    write(&rocket, "rocket".as_bytes(), 0o640);
    // A name that is not UTF-8, and one with a newline: bytes, as the file system has.
    let latin = dir.join(OsStr::from_bytes(b"latin-\xe9.txt"));
    write(&latin, b"latin-1", 0o644);
    write(&dir.join("new\nline"), b"newline", 0o644);
    for (empty, mode) in [("log", 0o755), ("var/empty", 0o750), ("private", 0o700)] {
        fs::create_dir_all(dir.join(empty)).expect("mkdir");
        set_mode(&dir.join(empty), mode);
    }
    write(&dir.join("ro/file"), b"in a read-only directory\n", 0o644);
    set_mode(&dir.join("ro"), 0o555);
    fs::create_dir_all(dir.join("tmp")).expect("mkdir");
    set_mode(&dir.join("tmp"), 0o1777);
    symlink("app-1.0", &dir.join("lib/current"));
    symlink("../lib/app-1.0/ebin/app.beam", &dir.join("bin/beam"));
    symlink("nowhere", &dir.join("dangling"));
    hard_link(dir, "bin/run", "bin/run-copy");
    // `link(2)` on a symlink links the symlink itself.
    hard_link(dir, "lib/current", "lib/current-too");
}

/// Names between 100 and 255 bytes (ustar splits them into prefix and name).
fn medium_names(dir: &Path) {
    let deep = format!("deep/{}/{}", "a".repeat(60), "b".repeat(60));
    write(&dir.join(format!("{deep}/file.txt")), b"medium", 0o644);
}

/// Names and link targets over 255 bytes: GNU long names and PAX records only.
fn long_names(dir: &Path) {
    let (c, d, e) = ("c".repeat(90), "d".repeat(90), "e".repeat(90));
    let file = format!("long/{c}/{d}/{e}/{}.txt", "f".repeat(100));
    write(&dir.join(&file), b"long", 0o644);
    // A symlink whose target is over 100 bytes, and a hard link to a long name.
    symlink(&file, &dir.join("long-link"));
    hard_link(dir, &file, "long-hard");
    let dots = format!("{}/../long-link", "g".repeat(120));
    symlink(&dots, &dir.join("long-target-through-dots"));
    fs::create_dir_all(dir.join("g".repeat(120))).expect("mkdir");
}

/// Sparse files: a 4 MiB table, one ending in data, one all hole, one with regions that
/// are not block-aligned.
fn sparse_files(dir: &Path) {
    fs::create_dir_all(dir.join("data")).expect("mkdir");
    let mib = 1u64 << 20;
    let table: &[(u64, &[u8])] = &[(mib, &[b'x'; 5000]), (3 * mib, &[b'y'; 100])];
    sparse_file(&dir.join("data/table.dat"), 4 * mib, table);
    let ends: &[(u64, &[u8])] = &[(0, b"head"), (2 * mib, b"0123456789")];
    sparse_file(&dir.join("data/ends-in-data.dat"), 2 * mib + 10, ends);
    sparse_file(&dir.join("data/all-hole.dat"), mib, &[]);
    // A second name for a sparse file: GNU tar stores a hard link to it.
    hard_link(dir, "data/table.dat", "data/table-too.dat");
    let odd: &[(u64, &[u8])] = &[(100_003, &[b'z'; 777]), (2 * mib + 17, &[b'w'; 4097])];
    sparse_file(&dir.join("data/odd.dat"), 3 * mib + 333, odd);
}

/// Packs `tree` with GNU tar and `args` into `work/name`.
fn archive(work: &Path, name: &str, args: &[&str], tree: &Path) -> PathBuf {
    let path = work.join(name);
    let mut all: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    all.extend([
        "-f".as_ref(),
        path.as_os_str(),
        "-C".as_ref(),
        tree.as_os_str(),
        ".".as_ref(),
    ]);
    gnu_tar_ok(&all, work);
    path
}

#[test]
fn gnu_tar_formats_unpack_as_gnu_tar_unpacks_them() {
    let bench = Bench::new();
    let work = bench.work("corpus");
    let short = bench.tree("corpus/short", &[basic_tree]);
    // ustar cannot mark files sparse (GNU tar refuses --sparse there): they are
    // stored whole.
    let medium = bench.tree("corpus/medium", &[basic_tree, medium_names, sparse_files]);
    let parts: [fn(&Path); 4] = [basic_tree, medium_names, long_names, sparse_files];
    let full = bench.tree("corpus/full", &parts);

    let cases: &[(&str, &[&str], &Path)] = &[
        ("gnu.tar", &["--format=gnu", "-c"], &full),
        (
            "gnu-sparse.tar.gz",
            &["--format=gnu", "--sparse", "-cz"],
            &full,
        ),
        (
            "oldgnu-sparse.tar",
            &["--format=oldgnu", "--sparse", "-c"],
            &full,
        ),
        ("pax.tar", &["--format=pax", "-c"], &full),
        (
            "pax-sparse.tar.gz",
            &["--format=pax", "--sparse", "-cz"],
            &full,
        ),
        (
            "pax-sparse-0.0.tar",
            &["--format=pax", "--sparse", "--sparse-version=0.0", "-c"],
            &full,
        ),
        (
            "pax-sparse-0.1.tar",
            &["--format=pax", "--sparse", "--sparse-version=0.1", "-c"],
            &full,
        ),
        (
            "pax-sparse-1.0.tar",
            &["--format=pax", "--sparse", "--sparse-version=1.0", "-c"],
            &full,
        ),
        ("ustar.tar", &["--format=ustar", "-c"], &medium),
        ("ustar.tar.gz", &["--format=ustar", "-cz"], &medium),
        ("v7.tar", &["--format=v7", "-c"], &short),
    ];
    for (name, args, tree) in cases {
        let path = archive(&work, name, args, tree);
        bench.check(name, &path, Expect::Same);
    }
}

#[test]
fn incremental_labelled_and_multi_volume_archives() {
    let bench = Bench::new();
    let tree = bench.tree("special/tree", &[basic_tree, sparse_files]);
    let work = bench.work("special");

    // An incremental dump: directories are GNU 'D' entries listing their names.
    let snapshot = work.join("snapshot");
    let snapshot = snapshot.to_str().expect("utf-8");
    let incremental = archive(
        &work,
        "incremental.tar",
        &["--format=gnu", "-g", snapshot, "-c"],
        &tree,
    );
    bench.check("incremental.tar", &incremental, Expect::Same);

    // A volume label ('V') comes first; GNU tar extracts nothing for it. In PAX format
    // the label is a global header's GNU.volume.label.
    for (name, format, create) in [
        ("labelled.tar", "--format=gnu", "-c"),
        ("labelled-pax.tar.gz", "--format=pax", "-cz"),
    ] {
        let labelled = archive(&work, name, &[format, "--label=release 1", create], &tree);
        bench.check(name, &labelled, Expect::Same);
    }

    // A multi-volume archive: each volume alone is refused, by GNU tar and the agent.
    let big = work.join("big");
    let noise: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    write(&big.join("noise.bin"), &noise, 0o644);
    for format in ["gnu", "pax"] {
        let one = work.join(format!("{format}-vol1.tar"));
        let two = work.join(format!("{format}-vol2.tar"));
        let format_flag = format!("--format={format}");
        let args: [&OsStr; 12] = [
            format_flag.as_ref(),
            "-c".as_ref(),
            "-M".as_ref(),
            "-L".as_ref(),
            "150".as_ref(),
            "-f".as_ref(),
            one.as_os_str(),
            "-f".as_ref(),
            two.as_os_str(),
            "-C".as_ref(),
            big.as_os_str(),
            ".".as_ref(),
        ];
        gnu_tar_ok(&args, &work);
        // GNU tar fails on a lone GNU continuation, and "extracts" a lone PAX one as a
        // fragment named GNUFileParts/noise.bin.2.
        let unsafe_ = ErrorKind::UnsafeArchive;
        let gnu_fails = format == "gnu";
        let expect = Expect::Refused(unsafe_, "multi-volume", gnu_fails);
        bench.check(&format!("{format}-vol2.tar"), &two, expect);
        let expect = Expect::Refused(ErrorKind::BadArchive, "noise.bin", true);
        bench.check(&format!("{format}-vol1.tar"), &one, expect);
    }
}

#[test]
fn an_otp_release_built_by_rebar3_unpacks_as_gnu_tar_unpacks_it() {
    let bench = Bench::new();
    let work = bench.work("otp");
    // rebar3 keeps its cache under HOME: a fresh one per run.
    let home = bench.work("otp/home");
    let build = "rebar3 new release difftest && cd difftest && rebar3 as prod tar";
    let out = Command::new("sh")
        .args(["-c", build])
        .current_dir(&work)
        .env("HOME", &home)
        .output()
        .expect("run sh");
    let (stdout, stderr) = (out.stdout.escape_ascii(), out.stderr.escape_ascii());
    assert!(
        out.status.success(),
        "{build} failed (scripts/test.sh installs rebar3): {stdout}\n{stderr}"
    );
    let tarball = work.join("difftest/_build/prod/rel/difftest/difftest-0.1.0.tar.gz");
    bench.check("difftest-0.1.0.tar.gz", &tarball, Expect::Same);
}

#[test]
fn what_gnu_tar_fails_on_or_guesses_at_is_refused() {
    let bench = Bench::new();
    let (unsafe_, bad) = (ErrorKind::UnsafeArchive, ErrorKind::BadArchive);
    let raw = Raw::default;
    let extension =
        |name: &[u8], kind, data: &[u8]| Raw::header(name, kind, 0o644, data.len() as u64, b"");
    let long_name = |data| extension(b"././@LongLink", EntryType::GNULongName, data);
    let global = |data| extension(b"pax_global_header", EntryType::XGlobalHeader, data);
    // A hard link to an entry that comes later.
    let ahead = raw().hard_link("link", "later").file("later", b"x");
    bench.refuses("ahead.tar", ahead, unsafe_, "not extracted before", true);
    // An unknown entry type: GNU tar extracts it as a regular file, with a warning.
    let unknown = raw()
        .file("ok", b"ok")
        .entry("vendor", EntryType::new(b'Z'), 0o644, b"abc", "");
    bench.refuses(
        "unknown.tar",
        unknown,
        unsafe_,
        "'vendor': entry type 'Z'",
        false,
    );
    // A PAX keyword nobody defined: GNU tar warns and ignores it.
    let keyword = raw()
        .pax(&[("VENDOR.layout", b"striped")])
        .file("striped", b"data");
    bench.refuses("keyword.tar", keyword, unsafe_, "'VENDOR.layout'", false);
    // A name given both by a GNU long-name header and by PAX: GNU tar takes the PAX
    // one, the tar crate the GNU one.
    let both = raw()
        .pax(&[("path", b"from-pax")])
        .push(&long_name(b"from-gnu\0"), b"from-gnu\0")
        .file("short", b"x");
    bench.refuses("both.tar", both, unsafe_, "disagree", false);
    // A PAX header before a global header: GNU tar applies it to the next file.
    let before_global = raw()
        .pax(&[("path", b"renamed")])
        .push(&global(b""), b"")
        .file("original", b"x");
    bench.refuses("global.tar", before_global, unsafe_, "global header", false);
    // The same keyword twice: GNU tar takes the last, the tar crate the first.
    let twice = raw()
        .pax(&[("path", b"first"), ("path", b"second")])
        .file("header", b"x");
    bench.refuses("twice.tar", twice, unsafe_, "twice", false);
    // A global path: GNU tar gives every following entry that one name.
    let record = b"13 path=same\n";
    let everyone = raw()
        .push(&global(record), record)
        .file("a", b"1")
        .file("b", b"2");
    bench.refuses(
        "everyone.tar",
        everyone,
        unsafe_,
        "every following entry",
        false,
    );
    // A long name with a NUL inside: GNU tar cuts it there.
    let nul = raw()
        .push(&long_name(b"ab\0cd\0"), b"ab\0cd\0")
        .file("x", b"x");
    bench.refuses("nul.tar", nul, unsafe_, "NUL", false);
    // The obsolete names list: GNU tar extracts it as a regular file.
    let names = raw().entry("names", EntryType::new(b'N'), 0o644, b"", "");
    bench.refuses(
        "names.tar",
        names,
        unsafe_,
        "obsolete GNU names list",
        false,
    );

    // A hard link that claims data, a '/'-named file that holds some: GNU tar reads
    // the data as the next header.
    let link_data = raw()
        .file("t", b"x")
        .entry("h", EntryType::Link, 0o644, b"hidden", "t");
    let needle = "a hard link entry that says it holds 6 bytes";
    bench.refuses("link-data.tar", link_data, unsafe_, needle, true);
    // Directories and symlinks that claim data: GNU tar reads that data as the next
    // header (and here extracts 'hidden'), the tar crate skips it.
    let hidden = raw().file("hidden", b"H").bytes;
    for (case, kind, link) in [
        ("dir-data.tar", EntryType::Directory, ""),
        ("symlink-data.tar", EntryType::Symlink, "t"),
    ] {
        let archive = raw()
            .entry("d", kind, 0o644, &hidden, link)
            .file("after", b"a");
        bench.refuses(case, archive, unsafe_, "says it holds 1024 bytes", false);
    }
    let slash_data = raw().file("dir/", b"data");
    bench.refuses("slash-data.tar", slash_data, unsafe_, "ends in '/'", true);

    // A sparse map before its count of regions: GNU tar calls it excess.
    let excess = raw()
        .pax(&[("GNU.sparse.size", b"8"), ("GNU.sparse.map", b"0,8")])
        .file("s", b"12345678");
    bench.refuses("excess.tar", excess, bad, "numblocks", true);

    // A ustar header of version "\0\0" with a name prefix: GNU tar extracts
    // pre/file, the tar crate reads the name as "file".
    let mut odd = tar::Header::new_ustar();
    odd.set_path("file").expect("path");
    odd.as_ustar_mut().expect("ustar").prefix[..3].copy_from_slice(b"pre");
    odd.as_mut_bytes()[263..265].copy_from_slice(b"\0\0");
    odd.set_mode(0o644);
    odd.set_size(0);
    odd.set_cksum();
    bench.refuses(
        "prefix.tar",
        raw().push(&odd, b""),
        unsafe_,
        "name prefix",
        false,
    );

    // A PAX path holding a newline: valid PAX (each record carries its length), but
    // the tar crate splits records at newlines.
    let newline = raw().pax(&[("path", b"long\nname")]).file("short", b"x");
    bench.refuses("newline.tar", newline, bad, "holds a newline", false);
    // A PAX size with a sign: GNU tar rejects the value, Rust's parser would take it.
    let signed = raw().pax(&[("size", b"+2")]).file("signed", b"ab");
    bench.refuses("signed.tar", signed, bad, "'+2'", true);
}

/// A sparse table packed with `tar --format=pax --sparse -czf` unpacks to its real
/// name and bytes, with its holes kept.
#[test]
fn a_pax_sparse_file_unpacks_to_its_real_name_and_bytes() {
    let bench = Bench::new();
    let table = bench.work("sparse/tree/data").join("table.dat");
    let mib = 1u64 << 20;
    let parts: &[(u64, &[u8])] = &[(mib, &[b'x'; 5000]), (3 * mib, &[b'y'; 100])];
    sparse_file(&table, 4 * mib, parts);
    let work = bench.work("sparse");
    let flags = ["--format=pax", "--sparse", "-cz"];
    let tarball = archive(&work, "sparse.tar.gz", &flags, &work.join("tree"));
    let done = bench
        .unpack(&tarball, "releases/sparse/1", &Limits::default())
        .expect("unpack");
    let mib = 1u64 << 20;
    assert_eq!(
        done.bytes,
        4 * mib,
        "the expanded size is what was unpacked"
    );
    let out = bench.root.path().join("releases/sparse/1/data");
    let names: Vec<String> = fs::read_dir(&out)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["table.dat".to_string()], "{names:?}");
    let unpacked = out.join("table.dat");
    let original = fs::read(&table).expect("read");
    assert_eq!(
        fs::read(&unpacked).expect("read"),
        original,
        "same bytes as the original"
    );
    // Holes stay holes: the file takes far less disk than its size.
    let meta = fs::metadata(&unpacked).expect("meta");
    assert_eq!(meta.len(), 4 * mib);
    let on_disk = meta.blocks() * 512;
    assert!(on_disk < mib, "{on_disk} bytes on disk for a sparse file");
}

/// The expanded size of a sparse file counts against the unpack limit, not the few
/// bytes it takes in the archive.
#[test]
fn a_sparse_file_counts_its_expanded_size_against_the_limit() {
    let bench = Bench::new();
    let tree = bench.work("huge/tree");
    // 64 MiB of holes around one byte: a few hundred bytes gzipped.
    sparse_file(&tree.join("huge.dat"), 64 << 20, &[(1 << 20, b"!")]);
    let limits = Limits {
        max_unpack_bytes: 32 << 20,
        ..Limits::default()
    };
    for format in ["pax", "gnu"] {
        let flags = [&format!("--format={format}"), "--sparse", "-cz"];
        let tarball = archive(
            &bench.work("huge"),
            &format!("{format}.tar.gz"),
            &flags,
            &tree,
        );
        assert!(fs::metadata(&tarball).expect("meta").len() < 64 << 10);
        let dest = format!("releases/huge/{format}");
        let err = bench.unpack(&tarball, &dest, &limits).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TooLarge, "{err}");
        assert!(err.to_string().contains("huge.dat"), "{err}");
        assert!(!bench.root.path().join(dest).exists());
    }
}
