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
//! (`scripts/test.sh` installs rebar3) and fail when they are missing.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use erel_boot::root::Root;
use erel_boot::settings::Limits;
use erel_master::client::Progress;
use erel_proto::{ErrorKind, Unpack};
use sha2::{Digest, Sha256};

use crate::helper::install::{with_digest, without_digest};
use crate::helper::otp::build_release;
use crate::helper::{AgentProc, Pki};

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

/// The agent's documented mode policy for files.
fn file_policy(mode: u32) -> u32 {
    (mode & 0o777 & !0o022) | 0o400
}

/// The agent's documented mode policy for directories.
fn dir_policy(mode: u32) -> u32 {
    (mode & 0o777 & !0o022) | 0o700
}

/// Reads the tree under `dir`; with `policy`, modes are passed through the agent's
/// policy first (for GNU tar's tree).
fn tree(dir: &Path, policy: bool) -> Tree {
    let mut nodes = BTreeMap::new();
    let mut inodes: BTreeMap<(u64, u64), BTreeSet<String>> = BTreeMap::new();
    let mut queue = vec![dir.to_path_buf()];
    while let Some(here) = queue.pop() {
        for entry in fs::read_dir(&here).expect("list") {
            let path = entry.expect("entry").path();
            let rel = path
                .strip_prefix(dir)
                .expect("under")
                .to_string_lossy()
                .into_owned();
            let meta = fs::symlink_metadata(&path).expect("meta");
            let mode = meta.permissions().mode() & 0o7777;
            let node = if meta.file_type().is_symlink() {
                Node::Symlink {
                    target: fs::read_link(&path).expect("link"),
                }
            } else if meta.is_dir() {
                queue.push(path.clone());
                Node::Dir {
                    mode: if policy { dir_policy(mode) } else { mode },
                }
            } else if meta.is_file() {
                let bytes = fs::read(&path).expect("read");
                Node::File {
                    mode: if policy { file_policy(mode) } else { mode },
                    len: meta.len(),
                    sha256: format!("{:x}", Sha256::digest(&bytes)),
                }
            } else {
                panic!("{} is neither file, directory nor symlink", path.display());
            };
            if !meta.is_dir() && meta.nlink() > 1 {
                inodes
                    .entry((meta.dev(), meta.ino()))
                    .or_default()
                    .insert(rel.clone());
            }
            nodes.insert(rel, node);
        }
    }
    Tree {
        nodes,
        hard_links: inodes.into_values().filter(|g| g.len() > 1).collect(),
    }
}

/// What differs between the agent's tree and GNU tar's, one line each.
fn differences(agent: &Tree, gnu: &Tree) -> Vec<String> {
    let mut out = Vec::new();
    let names: BTreeSet<&String> = agent.nodes.keys().chain(gnu.nodes.keys()).collect();
    for name in names {
        match (agent.nodes.get(name), gnu.nodes.get(name)) {
            (Some(a), Some(g)) if a == g => {}
            (a, g) => out.push(format!("{name}: agent {a:?}, GNU tar {g:?}")),
        }
    }
    if agent.hard_links != gnu.hard_links {
        out.push(format!(
            "hard links: agent {:?}, GNU tar {:?}",
            agent.hard_links, gnu.hard_links
        ));
    }
    out
}

fn require_gnu_tar() {
    let out = Command::new("tar")
        .arg("--version")
        .output()
        .expect("GNU tar must be on PATH for the differential unpack tests");
    let version = String::from_utf8_lossy(&out.stdout);
    assert!(
        version.contains("GNU tar"),
        "the differential unpack tests need GNU tar, found: {version}"
    );
}

/// Runs GNU tar with umask 022 (as an operator's shell has) and `args`.
fn gnu_tar(args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new("sh")
        .arg("-c")
        .arg("umask 022; exec tar \"$@\"")
        .arg("sh")
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .expect("run tar")
}

fn gnu_tar_ok(args: &[&str], cwd: &Path) {
    let out = Command::new("sh")
        .arg("-c")
        .arg("umask 022; exec tar \"$@\"")
        .arg("sh")
        .args(args)
        .current_dir(cwd)
        .env("LC_ALL", "C")
        .output()
        .expect("run tar");
    assert!(
        out.status.success(),
        "tar {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A temporary agent root with the corpus' archives under `archives/`.
struct Bench {
    dir: tempfile::TempDir,
    root: Root,
    limits: Limits,
}

/// What the agent must do with an archive.
enum Expect {
    /// GNU tar succeeds and the trees are the same.
    Same,
    /// The agent refuses with `kind`, naming `needle`; `gnu_fails` says whether GNU tar
    /// fails too (when it does not, it would have guessed).
    Refused {
        kind: ErrorKind,
        needle: &'static str,
        gnu_fails: bool,
    },
}

impl Bench {
    fn new() -> Self {
        require_gnu_tar();
        let dir = tempfile::tempdir().expect("tempdir");
        let root = Root::open(&dir.path().join("root")).expect("root");
        Bench {
            dir,
            root,
            limits: Limits::default(),
        }
    }

    fn work(&self, name: &str) -> PathBuf {
        let path = self.dir.path().join("work").join(name);
        fs::create_dir_all(&path).expect("mkdir");
        path
    }

    /// Unpacks `archive` with the agent and with GNU tar and checks `expect`.
    #[track_caller]
    fn check(&self, case: &str, archive: &Path, expect: Expect) {
        let stored = format!("archives/{case}");
        let in_root = self.root.path().join(&stored);
        fs::create_dir_all(in_root.parent().expect("parent")).expect("mkdir");
        fs::copy(archive, &in_root).expect("copy archive");
        let dest = format!("out/{case}");
        let agent = erel_boot::unpack::unpack(
            &self.root,
            &Unpack {
                archive: stored,
                dest: dest.clone(),
                sha256: None,
            },
            &self.limits,
        );
        let gnu_dir = self.work(&format!("gnu-{case}"));
        let gnu = gnu_tar(&[
            "-xf".as_ref(),
            archive.as_os_str(),
            "-C".as_ref(),
            gnu_dir.as_os_str(),
        ]);
        let gnu_err = String::from_utf8_lossy(&gnu.stderr).into_owned();
        match expect {
            Expect::Same => {
                assert!(gnu.status.success(), "{case}: GNU tar failed: {gnu_err}");
                let done = agent.unwrap_or_else(|e| panic!("{case}: the agent refused: {e}"));
                assert!(!done.already, "{case}");
                let ours = tree(&self.root.path().join(&dest), false);
                let theirs = tree(&gnu_dir, true);
                assert!(
                    ours.nodes.len() > 1,
                    "{case}: nothing unpacked: {:?}",
                    ours.nodes
                );
                let diff = differences(&ours, &theirs);
                assert!(
                    diff.is_empty(),
                    "{case}: the agent's tree differs from GNU tar's:\n{}",
                    diff.join("\n")
                );
            }
            Expect::Refused {
                kind,
                needle,
                gnu_fails,
            } => {
                let err = match agent {
                    Ok(done) => panic!("{case}: the agent unpacked {done:?}, must refuse"),
                    Err(e) => e,
                };
                assert_eq!(err.kind(), kind, "{case}: {err}");
                assert!(
                    err.to_string().contains(needle),
                    "{case}: {needle:?} not in: {err}"
                );
                assert!(!self.root.path().join(&dest).exists(), "{case}");
                assert_eq!(
                    !gnu.status.success(),
                    gnu_fails,
                    "{case}: GNU tar status {:?}: {gnu_err}",
                    gnu.status
                );
            }
        }
    }
}

/// Writes `data` at each `(offset, data)` of a file of `len` bytes, leaving holes.
fn sparse_file(path: &Path, len: u64, parts: &[(u64, &[u8])]) {
    use std::io::{Seek, SeekFrom};
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
    write(
        &dir.join("donn\u{e9}es/\u{fc}ber-gr\u{f6}\u{df}e.txt"),
        "unicode".as_bytes(),
        0o644,
    );
    write(
        &dir.join("\u{65e5}\u{672c}/\u{1f680}.txt"),
        "rocket".as_bytes(),
        0o640,
    );
    // A name that is not UTF-8, and one with a newline: bytes, as the file system has.
    write(
        &dir.join(std::ffi::OsStr::from_bytes(b"latin-\xe9.txt")),
        b"latin-1",
        0o644,
    );
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
    fs::hard_link(dir.join("bin/run"), dir.join("bin/run-copy")).expect("hard link");
    // `link(2)` on a symlink links the symlink itself.
    fs::hard_link(dir.join("lib/current"), dir.join("lib/current-too")).expect("hard link");
}

/// Names between 100 and 255 bytes (ustar splits them into prefix and name).
fn medium_names(dir: &Path) {
    let deep = format!("deep/{}/{}", "a".repeat(60), "b".repeat(60));
    write(&dir.join(format!("{deep}/file.txt")), b"medium", 0o644);
}

/// Names and link targets over 255 bytes: GNU long names and PAX records only.
fn long_names(dir: &Path) {
    let long = format!(
        "long/{}/{}/{}",
        "c".repeat(90),
        "d".repeat(90),
        "e".repeat(90)
    );
    let file = format!("{long}/{}.txt", "f".repeat(100));
    write(&dir.join(&file), b"long", 0o644);
    // A symlink whose target is over 100 bytes, and a hard link to a long name.
    symlink(&file, &dir.join("long-link"));
    fs::hard_link(dir.join(&file), dir.join("long-hard")).expect("hard link");
    symlink(
        &format!("{}/../long-link", "g".repeat(120)),
        &dir.join("long-target-through-dots"),
    );
    fs::create_dir_all(dir.join("g".repeat(120))).expect("mkdir");
}

/// Sparse files: the 4 MiB table, one ending in data, one all hole, one with
/// regions that are not block-aligned.
fn sparse_files(dir: &Path) {
    fs::create_dir_all(dir.join("data")).expect("mkdir");
    let mib = 1u64 << 20;
    sparse_file(
        &dir.join("data/table.dat"),
        4 * mib,
        &[(mib, &[b'x'; 5000]), (3 * mib, &[b'y'; 100])],
    );
    sparse_file(
        &dir.join("data/ends-in-data.dat"),
        2 * mib + 10,
        &[(0, b"head"), (2 * mib, b"0123456789")],
    );
    sparse_file(&dir.join("data/all-hole.dat"), mib, &[]);
    // A second name for a sparse file: GNU tar stores a hard link to it.
    fs::hard_link(dir.join("data/table.dat"), dir.join("data/table-too.dat")).expect("link");
    sparse_file(
        &dir.join("data/odd.dat"),
        3 * mib + 333,
        &[(100_003, &[b'z'; 777]), (2 * mib + 17, &[b'w'; 4097])],
    );
}

fn archive(work: &Path, name: &str, args: &[&str], tree: &Path) -> PathBuf {
    let path = work.join(name);
    let mut all: Vec<&str> = args.to_vec();
    let path_str = path.to_str().expect("utf-8 path");
    all.extend(["-f", path_str, "-C", tree.to_str().expect("utf-8"), "."]);
    gnu_tar_ok(&all, work);
    path
}

#[test]
fn gnu_tar_formats_unpack_as_gnu_tar_unpacks_them() {
    let bench = Bench::new();
    let work = bench.work("corpus");
    let short = work.join("short");
    basic_tree(&short);
    let medium = work.join("medium");
    basic_tree(&medium);
    medium_names(&medium);
    // ustar cannot mark files sparse (GNU tar refuses --sparse there): they are
    // stored whole.
    sparse_files(&medium);
    let full = work.join("full");
    basic_tree(&full);
    medium_names(&full);
    long_names(&full);
    sparse_files(&full);

    let cases: Vec<(&str, Vec<&str>, &Path)> = vec![
        ("gnu.tar", vec!["--format=gnu", "-c"], &full),
        (
            "gnu-sparse.tar.gz",
            vec!["--format=gnu", "--sparse", "-cz"],
            &full,
        ),
        (
            "oldgnu-sparse.tar",
            vec!["--format=oldgnu", "--sparse", "-c"],
            &full,
        ),
        ("pax.tar", vec!["--format=pax", "-c"], &full),
        (
            "pax-sparse.tar.gz",
            vec!["--format=pax", "--sparse", "-cz"],
            &full,
        ),
        (
            "pax-sparse-0.0.tar",
            vec!["--format=pax", "--sparse", "--sparse-version=0.0", "-c"],
            &full,
        ),
        (
            "pax-sparse-0.1.tar",
            vec!["--format=pax", "--sparse", "--sparse-version=0.1", "-c"],
            &full,
        ),
        (
            "pax-sparse-1.0.tar",
            vec!["--format=pax", "--sparse", "--sparse-version=1.0", "-c"],
            &full,
        ),
        ("ustar.tar", vec!["--format=ustar", "-c"], &medium),
        ("ustar.tar.gz", vec!["--format=ustar", "-cz"], &medium),
        ("v7.tar", vec!["--format=v7", "-c"], &short),
    ];
    for (name, args, tree) in cases {
        let path = archive(&work, name, &args, tree);
        bench.check(name, &path, Expect::Same);
    }
}

#[test]
fn incremental_labelled_and_multi_volume_archives() {
    let bench = Bench::new();
    let work = bench.work("special");
    let tree = work.join("tree");
    basic_tree(&tree);
    sparse_files(&tree);

    // An incremental dump: directories are GNU 'D' entries listing their names.
    let snapshot = work.join("snapshot");
    let incremental = archive(
        &work,
        "incremental.tar",
        &[
            "--format=gnu",
            "-g",
            snapshot.to_str().expect("utf-8"),
            "-c",
        ],
        &tree,
    );
    bench.check("incremental.tar", &incremental, Expect::Same);

    // A volume label ('V') comes first; GNU tar extracts nothing for it.
    let labelled = archive(
        &work,
        "labelled.tar",
        &["--format=gnu", "--label=release 1", "-c"],
        &tree,
    );
    bench.check("labelled.tar", &labelled, Expect::Same);
    // In PAX format the label is a global header's GNU.volume.label.
    let labelled = archive(
        &work,
        "labelled-pax.tar.gz",
        &["--format=pax", "--label=release 1", "-cz"],
        &tree,
    );
    bench.check("labelled-pax.tar.gz", &labelled, Expect::Same);

    // A multi-volume archive: each volume alone is refused, by GNU tar and the agent.
    let big = work.join("big");
    let noise: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    write(&big.join("noise.bin"), &noise, 0o644);
    for format in ["gnu", "pax"] {
        let one = work.join(format!("{format}-vol1.tar"));
        let two = work.join(format!("{format}-vol2.tar"));
        gnu_tar_ok(
            &[
                &format!("--format={format}"),
                "-c",
                "-M",
                "-L",
                "150",
                "-f",
                one.to_str().expect("utf-8"),
                "-f",
                two.to_str().expect("utf-8"),
                "-C",
                big.to_str().expect("utf-8"),
                ".",
            ],
            &work,
        );
        // GNU tar fails on a lone GNU continuation, and "extracts" a lone PAX one as a
        // fragment named GNUFileParts/noise.bin.2.
        bench.check(
            &format!("{format}-vol2.tar"),
            &two,
            Expect::Refused {
                kind: ErrorKind::UnsafeArchive,
                needle: "multi-volume",
                gnu_fails: format == "gnu",
            },
        );
        bench.check(
            &format!("{format}-vol1.tar"),
            &one,
            Expect::Refused {
                kind: ErrorKind::BadArchive,
                needle: "noise.bin",
                gnu_fails: true,
            },
        );
    }
}

#[test]
fn an_otp_release_built_by_rebar3_unpacks_as_gnu_tar_unpacks_it() {
    let bench = Bench::new();
    let work = bench.work("otp");
    let tarball = build_release(&work, "difftest", None);
    bench.check("difftest-0.1.0.tar.gz", &tarball, Expect::Same);
}

/// A tar written header by header, for what no tool writes.
#[derive(Default)]
struct Raw {
    bytes: Vec<u8>,
}

impl Raw {
    fn push(mut self, name: &str, kind: u8, size: u64, link: &str, data: &[u8]) -> Self {
        let mut header = tar::Header::new_gnu();
        let old = header.as_old_mut();
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        header.set_entry_type(tar::EntryType::new(kind));
        header.set_mode(0o644);
        header.set_size(size);
        header.set_mtime(1_700_000_000);
        header.set_cksum();
        self.bytes.extend_from_slice(header.as_bytes());
        self.bytes.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.bytes.extend(std::iter::repeat_n(0u8, pad));
        self
    }

    fn pax(self, records: &[(&str, &str)]) -> Self {
        let mut data = Vec::new();
        for (key, value) in records {
            let body = format!(" {key}={value}\n");
            let mut len = body.len();
            while len.to_string().len() + body.len() != len {
                len = len.to_string().len() + body.len();
            }
            data.extend(format!("{len}{body}").into_bytes());
        }
        self.push("PaxHeaders/x", b'x', data.len() as u64, "", &data)
    }

    fn file(self, name: &str, data: &[u8]) -> Self {
        self.push(name, b'0', data.len() as u64, "", data)
    }

    fn save(mut self, path: &Path) -> PathBuf {
        self.bytes.extend([0u8; 1024]);
        fs::write(path, &self.bytes).expect("write");
        path.to_path_buf()
    }
}

#[test]
fn what_gnu_tar_fails_on_or_guesses_at_is_refused() {
    let bench = Bench::new();
    let work = bench.work("crafted");
    let unsafe_ = ErrorKind::UnsafeArchive;

    // A hard link to an entry that comes later.
    let ahead = Raw::default()
        .push("link", b'1', 0, "later", b"")
        .file("later", b"x")
        .save(&work.join("ahead.tar"));
    bench.check(
        "ahead.tar",
        &ahead,
        Expect::Refused {
            kind: unsafe_,
            needle: "not extracted before",
            gnu_fails: true,
        },
    );

    // An unknown entry type: GNU tar extracts it as a regular file, with a warning.
    let unknown = Raw::default()
        .file("ok", b"ok")
        .push("vendor", b'Z', 3, "", b"abc")
        .save(&work.join("unknown.tar"));
    bench.check(
        "unknown.tar",
        &unknown,
        Expect::Refused {
            kind: unsafe_,
            needle: "'vendor': entry type 'Z'",
            gnu_fails: false,
        },
    );

    // A PAX keyword nobody defined: GNU tar warns and ignores it.
    let keyword = Raw::default()
        .pax(&[("VENDOR.layout", "striped")])
        .file("striped", b"data")
        .save(&work.join("keyword.tar"));
    bench.check(
        "keyword.tar",
        &keyword,
        Expect::Refused {
            kind: unsafe_,
            needle: "'VENDOR.layout'",
            gnu_fails: false,
        },
    );

    // A name given both by a GNU long-name header and by PAX: GNU tar takes the PAX
    // one, the tar crate the GNU one.
    let both = Raw::default()
        .pax(&[("path", "from-pax")])
        .push("././@LongLink", b'L', 9, "", b"from-gnu\0")
        .file("short", b"x")
        .save(&work.join("both.tar"));
    bench.check(
        "both.tar",
        &both,
        Expect::Refused {
            kind: unsafe_,
            needle: "disagree",
            gnu_fails: false,
        },
    );

    // A PAX header before a global header: GNU tar applies it to the next file.
    let global = Raw::default()
        .pax(&[("path", "renamed")])
        .push("pax_global_header", b'g', 0, "", b"")
        .file("original", b"x")
        .save(&work.join("global.tar"));
    bench.check(
        "global.tar",
        &global,
        Expect::Refused {
            kind: unsafe_,
            needle: "global header",
            gnu_fails: false,
        },
    );

    // The same keyword twice: GNU tar takes the last, the tar crate the first.
    let twice = Raw::default()
        .pax(&[("path", "first"), ("path", "second")])
        .file("header", b"x")
        .save(&work.join("twice.tar"));
    bench.check(
        "twice.tar",
        &twice,
        Expect::Refused {
            kind: unsafe_,
            needle: "twice",
            gnu_fails: false,
        },
    );

    // A global path: GNU tar gives every following entry that one name.
    let everyone = Raw::default()
        .push("pax_global_header", b'g', 13, "", b"13 path=same\n")
        .file("a", b"1")
        .file("b", b"2")
        .save(&work.join("everyone.tar"));
    bench.check(
        "everyone.tar",
        &everyone,
        Expect::Refused {
            kind: unsafe_,
            needle: "every following entry",
            gnu_fails: false,
        },
    );

    // A long name with a NUL inside: GNU tar cuts it there.
    let nul = Raw::default()
        .push("././@LongLink", b'L', 6, "", b"ab\0cd\0")
        .file("x", b"x")
        .save(&work.join("nul.tar"));
    bench.check(
        "nul.tar",
        &nul,
        Expect::Refused {
            kind: unsafe_,
            needle: "NUL",
            gnu_fails: false,
        },
    );

    // The obsolete names list: GNU tar extracts it as a regular file.
    let names = Raw::default()
        .push("names", b'N', 0, "", b"")
        .save(&work.join("names.tar"));
    bench.check(
        "names.tar",
        &names,
        Expect::Refused {
            kind: unsafe_,
            needle: "obsolete GNU names list",
            gnu_fails: false,
        },
    );

    // A hard link that claims data, a '/'-named file that holds some: GNU tar reads
    // the data as the next header.
    let link_data = Raw::default()
        .file("t", b"x")
        .push("h", b'1', 6, "t", b"hidden")
        .save(&work.join("link-data.tar"));
    bench.check(
        "link-data.tar",
        &link_data,
        Expect::Refused {
            kind: unsafe_,
            needle: "a hard link entry that says it holds 6 bytes",
            gnu_fails: true,
        },
    );
    // Directories and symlinks that claim data: GNU tar reads that data as the next
    // header (and here extracts 'hidden'), the tar crate skips it.
    let hidden = Raw::default().file("hidden", b"H").bytes;
    for (case, kind, link) in [("dir-data.tar", b'5', ""), ("symlink-data.tar", b'2', "t")] {
        let archive = Raw::default()
            .push("d", kind, hidden.len() as u64, link, &hidden)
            .file("after", b"a")
            .save(&work.join(case));
        bench.check(
            case,
            &archive,
            Expect::Refused {
                kind: unsafe_,
                needle: "says it holds 1024 bytes",
                gnu_fails: false,
            },
        );
    }
    let slash_data = Raw::default()
        .file("dir/", b"data")
        .save(&work.join("slash-data.tar"));
    bench.check(
        "slash-data.tar",
        &slash_data,
        Expect::Refused {
            kind: unsafe_,
            needle: "ends in '/'",
            gnu_fails: true,
        },
    );

    // A sparse map before its count of regions: GNU tar calls it excess.
    let excess = Raw::default()
        .pax(&[("GNU.sparse.size", "8"), ("GNU.sparse.map", "0,8")])
        .file("s", b"12345678")
        .save(&work.join("excess.tar"));
    bench.check(
        "excess.tar",
        &excess,
        Expect::Refused {
            kind: ErrorKind::BadArchive,
            needle: "numblocks",
            gnu_fails: true,
        },
    );

    // A ustar header of version "\0\0" with a name prefix: GNU tar extracts
    // pre/file, the tar crate reads the name as "file".
    let mut odd = tar::Header::new_ustar();
    odd.set_path("file").expect("path");
    odd.as_ustar_mut().expect("ustar").prefix[..3].copy_from_slice(b"pre");
    odd.as_mut_bytes()[263..265].copy_from_slice(b"\0\0");
    odd.set_mode(0o644);
    odd.set_size(0);
    odd.set_cksum();
    let mut bytes = odd.as_bytes().to_vec();
    bytes.extend([0u8; 1024]);
    let prefix = work.join("prefix.tar");
    fs::write(&prefix, bytes).expect("write");
    bench.check(
        "prefix.tar",
        &prefix,
        Expect::Refused {
            kind: unsafe_,
            needle: "name prefix",
            gnu_fails: false,
        },
    );

    // A PAX path holding a newline: valid PAX (each record carries its length), but
    // the tar crate splits records at newlines.
    let newline = Raw::default()
        .pax(&[("path", "long\nname")])
        .file("short", b"x")
        .save(&work.join("newline.tar"));
    bench.check(
        "newline.tar",
        &newline,
        Expect::Refused {
            kind: ErrorKind::BadArchive,
            needle: "holds a newline",
            gnu_fails: false,
        },
    );

    // A PAX size with a sign: GNU tar rejects the value, Rust's parser would take it.
    let signed = Raw::default()
        .pax(&[("size", "+2")])
        .file("signed", b"ab")
        .save(&work.join("signed.tar"));
    bench.check(
        "signed.tar",
        &signed,
        Expect::Refused {
            kind: ErrorKind::BadArchive,
            needle: "'+2'",
            gnu_fails: true,
        },
    );
}

/// The input, end to end: a sparse table packed with
/// `tar --format=pax --sparse -czf`, pushed to and unpacked by a real agent.
#[tokio::test(flavor = "multi_thread")]
async fn a_pax_sparse_file_unpacks_to_its_real_name_and_bytes() {
    require_gnu_tar();
    let work = tempfile::tempdir().expect("tempdir");
    let tree = work.path().join("tree");
    fs::create_dir_all(tree.join("data")).expect("mkdir");
    let mib = 1u64 << 20;
    let table = tree.join("data/table.dat");
    sparse_file(
        &table,
        4 * mib,
        &[(mib, &[b'x'; 5000]), (3 * mib, &[b'y'; 100])],
    );
    let tarball = work.path().join("sparse.tar.gz");
    gnu_tar_ok(
        &[
            "--format=pax",
            "--sparse",
            "-czf",
            tarball.to_str().expect("utf-8"),
            "-C",
            tree.to_str().expect("utf-8"),
            "data",
        ],
        work.path(),
    );

    let pki = Pki::new();
    let agent = AgentProc::start(&pki, "sparse-1", &[]);
    let mut client = pki.connect(&agent).await;
    let source = with_digest(&tarball);
    let mut no_progress = |_: Progress| {};
    client
        .write_file(&source, "archives/sparse.tar.gz", 0o644, &mut no_progress)
        .await
        .expect("push");
    let done = client
        .unpack("archives/sparse.tar.gz", "releases/sparse/1", source.sha256)
        .await
        .expect("unpack");
    assert_eq!(
        done.bytes,
        4 * mib,
        "the expanded size is what was unpacked"
    );

    let out = agent.root.join("releases/sparse/1/data");
    let names: Vec<String> = fs::read_dir(&out)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["table.dat".to_string()], "{names:?}");
    let unpacked = out.join("table.dat");
    assert_eq!(
        fs::read(&unpacked).expect("read"),
        fs::read(&table).expect("read"),
        "same bytes as the original"
    );
    // Holes stay holes: the file takes far less disk than its size.
    let meta = fs::metadata(&unpacked).expect("meta");
    assert_eq!(meta.len(), 4 * mib);
    assert!(
        meta.blocks() * 512 < mib,
        "{} bytes on disk for a sparse file",
        meta.blocks() * 512
    );
}

/// The expanded size of a sparse file counts against the unpack limit, not the few
/// bytes it takes in the archive.
#[tokio::test(flavor = "multi_thread")]
async fn a_sparse_file_counts_its_expanded_size_against_the_limit() {
    require_gnu_tar();
    let work = tempfile::tempdir().expect("tempdir");
    let tree = work.path().join("tree");
    fs::create_dir_all(&tree).expect("mkdir");
    // 64 MiB of holes around one byte: a few hundred bytes gzipped.
    sparse_file(&tree.join("huge.dat"), 64 << 20, &[(1 << 20, b"!")]);
    let pki = Pki::new();
    let agent = AgentProc::start(&pki, "sparse-2", &["--max-unpack-bytes", "33554432"]);
    let mut client = pki.connect(&agent).await;
    for (format, flags) in [("pax", "-czf"), ("gnu", "-czf")] {
        let tarball = work.path().join(format!("{format}.tar.gz"));
        gnu_tar_ok(
            &[
                &format!("--format={format}"),
                "--sparse",
                flags,
                tarball.to_str().expect("utf-8"),
                "-C",
                tree.to_str().expect("utf-8"),
                "huge.dat",
            ],
            work.path(),
        );
        assert!(fs::metadata(&tarball).expect("meta").len() < 64 << 10);
        let dest = format!("archives/{format}.tar.gz");
        let source = without_digest(&tarball);
        let mut no_progress = |_: Progress| {};
        client
            .write_file(&source, &dest, 0o644, &mut no_progress)
            .await
            .expect("push");
        let err = client
            .unpack(&dest, &format!("releases/huge/{format}"), None)
            .await
            .unwrap_err();
        assert_eq!(err.agent_kind(), Some(ErrorKind::TooLarge), "{err}");
        assert!(err.to_string().contains("huge.dat"), "{err}");
        assert!(!agent.root.join(format!("releases/huge/{format}")).exists());
    }
}
