//! The master never sends stale or torn content: a rebuilt file is sent again however
//! well it imitates the old one, a file that changes while it is sent fails the push
//! and leaves nothing on the host, and an unchanged file still costs no transfer.

use std::fs::{FileTimes, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use erel_master::client::{Progress, WriteSource, TRANSFER_STALL_TIMEOUT};
use erel_master::Error;

use crate::helper::install::without_digest;
use crate::helper::release::sha256;
use crate::helper::{output_text, pki_and_agent, retry_while_busy, AgentProc, Pki};

/// `len` bytes of a pattern that differs with `seed`.
fn content(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Runs a coreutils command, as a build script would.
fn run(program: &str, args: &[&str]) {
    let status = Command::new(program)
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(status.success(), "{program} {args:?}: {status}");
}

/// `erel push` with a digest cache of its own; returns what it printed.
fn cli_push(pki: &Pki, agent: &AgentProc, cache: &Path, file: &Path, dest: &str) -> String {
    let mut push = pki.erel_at("push", agent);
    let out = push.env("XDG_CACHE_HOME", cache).arg(file).arg(dest);
    let out = out.output().expect("run erel push");
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "push failed: {}", output_text(&out));
    printed
}

struct Stat {
    ino: u64,
    size: u64,
    mtime: i64,
}

fn stat(path: &Path) -> Stat {
    let meta = std::fs::metadata(path).expect("stat");
    Stat {
        ino: meta.ino(),
        size: meta.len(),
        mtime: meta.mtime(),
    }
}

/// Where the pushes of the CLI tests go.
const DEST: &str = "archives/app.tar";

/// An agent, and a file `app.tar` of `len` bytes of `content(1, len)` with the mtime of a
/// reproducible build, pushed once with `erel push` and a digest cache of its own:
/// (PKI, agent, work directory, cache directory, the file).
type PushedOnce = (Pki, AgentProc, tempfile::TempDir, PathBuf, PathBuf);

fn pushed_once(len: usize) -> PushedOnce {
    let (pki, agent) = pki_and_agent("web-1", &[]);
    let work = tempfile::tempdir().expect("tempdir");
    let cache = work.path().join("cache");
    let file = work.path().join("app.tar");
    std::fs::write(&file, content(1, len)).expect("write");
    run(
        "touch",
        &["-d", "@1700000000", file.to_str().expect("utf-8 path")],
    );
    let text = cli_push(&pki, &agent, &cache, &file, DEST);
    assert!(text.contains("(sent "), "{text}");
    (pki, agent, work, cache, file)
}

#[test]
fn a_rebuild_with_the_same_size_inode_and_mtime_is_sent_again() {
    let (pki, agent, work, cache, file) = pushed_once(300_000);
    let (file_arg, dest) = (file.to_str().expect("utf-8 path"), DEST);
    let before = stat(&file);

    // Rebuilt: same size, copied over the same file, the same mtime set back.
    let rebuilt = work.path().join("app.tar.new");
    std::fs::write(&rebuilt, content(2, 300_000)).expect("write");
    run("cp", &[rebuilt.to_str().expect("utf-8 path"), file_arg]);
    run("touch", &["-d", "@1700000000", file_arg]);
    let after = stat(&file);
    assert_eq!(
        (after.ino, after.size, after.mtime),
        (before.ino, before.size, before.mtime),
        "the rebuild keeps inode, size and mtime"
    );

    let text = cli_push(&pki, &agent, &cache, &file, dest);
    assert!(
        text.contains("(sent "),
        "the new bytes must be sent: {text}"
    );
    assert_eq!(
        std::fs::read(agent.root.join(dest)).expect("read on host"),
        content(2, 300_000),
        "the host has the rebuilt bytes"
    );

    // Unchanged since: nothing is sent.
    let text = cli_push(&pki, &agent, &cache, &file, dest);
    assert!(text.contains("already present, nothing sent"), "{text}");
}

#[test]
fn a_replaced_file_and_a_file_rewritten_in_place_are_sent_again() {
    let (pki, agent, work, cache, file) = pushed_once(100_000);
    let (file_arg, dest) = (file.to_str().expect("utf-8 path"), DEST);

    // Replaced by rename (a new inode), same size and mtime.
    let next = work.path().join("app.tar.tmp");
    std::fs::write(&next, content(3, 100_000)).expect("write");
    run(
        "touch",
        &["-d", "@1700000000", next.to_str().expect("utf-8")],
    );
    run("mv", &[next.to_str().expect("utf-8"), file_arg]);
    let text = cli_push(&pki, &agent, &cache, &file, dest);
    assert!(text.contains("(sent "), "{text}");
    assert_eq!(
        std::fs::read(agent.root.join(dest)).expect("read"),
        content(3, 100_000)
    );

    // Rewritten in place by a program that keeps the mtime (only the ctime moves).
    let mtime = std::fs::metadata(&file)
        .and_then(|m| m.modified())
        .expect("mtime");
    let handle = OpenOptions::new().write(true).open(&file).expect("open");
    handle.write_all_at(b"patched", 50_000).expect("patch");
    handle
        .set_times(FileTimes::new().set_modified(mtime))
        .expect("set mtime");
    drop(handle);
    let mut expected = content(3, 100_000);
    expected[50_000..50_007].copy_from_slice(b"patched");
    let text = cli_push(&pki, &agent, &cache, &file, dest);
    assert!(text.contains("(sent "), "{text}");
    assert_eq!(
        std::fs::read(agent.root.join(dest)).expect("read"),
        expected
    );
    let text = cli_push(&pki, &agent, &cache, &file, dest);
    assert!(text.contains("already present, nothing sent"), "{text}");
}

/// Pushes `file` to `dest`, changing the file in place (same size, mtime set back)
/// after the first bytes went out; returns the push's outcome.
async fn push_changing_midway(
    pki: &Pki,
    agent: &AgentProc,
    file: &PathBuf,
    known: bool,
    dest: &str,
) -> Result<erel_proto::Written, Error> {
    let mut client = pki.connect(agent).await;
    let source = WriteSource {
        path: file.clone(),
        sha256: known.then(|| sha256(file)),
        sha256_of: None,
    };
    let size = std::fs::metadata(file).expect("stat").len();
    let mtime = std::fs::metadata(file)
        .and_then(|m| m.modified())
        .expect("mtime");
    let target = file.clone();
    let mut changed = false;
    let mut on_progress = move |p: Progress| {
        if !changed && p.sent > 0 && p.sent < p.total {
            // The tail of the file, not read yet: what was sent and what follows no
            // longer belong to one version of the file.
            let handle = OpenOptions::new().write(true).open(&target).expect("open");
            handle
                .write_all_at(&[0xee; 4096], size - 4096)
                .expect("write");
            handle
                .set_times(FileTimes::new().set_modified(mtime))
                .expect("set mtime");
            changed = true;
        }
    };
    client
        .write_file(&source, dest, 0o644, &mut on_progress)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_changed_while_it_is_sent_fails_naming_it_and_nothing_is_committed() {
    let (pki, agent) = pki_and_agent("web-1", &[]);
    let work = tempfile::tempdir().expect("tempdir");
    // Many chunks, so the change lands while the file is being sent.
    let len = 16 * 1024 * 1024;
    for known in [false, true] {
        let file = work.path().join(format!("big-{known}.tar"));
        std::fs::write(&file, content(5, len)).expect("write");
        let dest = format!("archives/big-{known}.tar");
        let err = push_changing_midway(&pki, &agent, &file, known, &dest)
            .await
            .expect_err("a push whose file changed while it was sent must fail");
        let text = err.to_string();
        assert!(matches!(err, Error::Local { .. }), "{text}");
        assert!(text.contains(file.to_str().expect("utf-8")), "{text}");
        assert!(text.contains("changed while it was being sent"), "{text}");
        assert!(
            !agent.root.join(&dest).exists(),
            "nothing is committed on the host (known digest: {known})"
        );

        // Pushed again as it is now, on a new connection: the host gets exactly it. The
        // agent may still hold the abandoned transfer until it sees the connection
        // closed (at worst its transfer stall timeout): retry while it says busy.
        let source = without_digest(&file);
        let (pki_ref, agent_ref, source_ref, dest_ref) = (&pki, &agent, &source, &dest);
        let written = retry_while_busy(TRANSFER_STALL_TIMEOUT * 2, || async move {
            let mut client = pki_ref.connect(agent_ref).await;
            client
                .write_file(source_ref, dest_ref, 0o644, &mut |_| {})
                .await
        })
        .await
        .expect("push again");
        assert_eq!(written.sha256, sha256(&file));
        assert_eq!(
            std::fs::read(agent.root.join(&dest)).expect("read"),
            std::fs::read(&file).expect("read")
        );
    }
}

/// A digest remembered for the file (the cache's) and a file replaced between that
/// lookup and the push, by a rename or by swapping the symlink it is pushed through:
/// the agent already holds the content of the old file, and must get the new one, not
/// be told "already present".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_replaced_after_its_digest_was_looked_up_is_sent_as_it_is_now() {
    use erel_master::digest_cache::DigestCache;

    let (pki, agent) = pki_and_agent("web-1", &[]);
    let work = tempfile::tempdir().expect("tempdir");
    let cache = DigestCache::new(work.path().join("cache"));
    for how in ["rename", "symlink"] {
        let dest = format!("archives/app-{how}.tar");
        let old = work.path().join(format!("old-{how}.tar"));
        let new = work.path().join(format!("new-{how}.tar"));
        std::fs::write(&old, content(7, 200_000)).expect("write");
        std::fs::write(&new, content(8, 200_000)).expect("write");
        let file = work.path().join(format!("app-{how}.tar"));
        match how {
            "rename" => std::fs::copy(&old, &file).map(drop).expect("copy"),
            _ => std::os::unix::fs::symlink(&old, &file).expect("symlink"),
        }
        // Pushed once: the agent holds the old content, the cache knows its digest.
        let stamp = erel_master::digest_cache::FileStamp::take(&file).expect("stamp");
        let mut client = pki.connect(&agent).await;
        let first = without_digest(&file);
        let written = client
            .write_file(&first, &dest, 0o644, &mut |_| {})
            .await
            .expect("first push");
        cache.put(&file, &stamp, written.sha256);

        // The next push looks the digest up, then the file is replaced before it is
        // opened.
        let (known, of) = cache.get_stamped(&file).expect("cached");
        assert_eq!(known, written.sha256);
        match how {
            "rename" => std::fs::rename(&new, &file).expect("rename"),
            _ => {
                let swap = work.path().join("swap");
                std::os::unix::fs::symlink(&new, &swap).expect("symlink");
                std::fs::rename(&swap, &file).expect("swap symlink");
            }
        }
        let source = WriteSource {
            path: file.clone(),
            sha256: Some(known),
            sha256_of: Some(of),
        };
        let mut client = pki.connect(&agent).await;
        let written = client
            .write_file(&source, &dest, 0o644, &mut |_| {})
            .await
            .expect("push of the new file");
        assert_eq!(written.sha256, sha256(&file), "{how}");
        assert!(written.received > 0, "{how}: sent again");
        assert_eq!(
            std::fs::read(agent.root.join(&dest)).expect("read"),
            content(8, 200_000),
            "{how}: the host holds the file as it is now"
        );
    }
}
