//! Peers end to end: unauthenticated peers cannot keep the master out, a master beyond
//! the agent's limit is told so, a command cut mid-way can be repeated at once, and a
//! normal connection end leaves no error in the agent's log.
//!
//! Hostile peers connect from other loopback addresses (127.0.0.0/8 is all loopback on
//! Linux) so that the per-address cap applies to them and not to the master, which
//! connects from 127.0.0.1.

use std::time::{Duration, Instant};

use erel_master::client::Connector;
use erel_master::client::{Progress, WriteSource};
use erel_proto::ErrorKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helper::install::without_digest;
use crate::helper::raw_peer::{closes_within, idle_peer};
use crate::helper::release::sha256;
use crate::helper::stepping::step_until;
use crate::helper::AgentCommands;
use crate::helper::{
    free_port, output_text, pki_and_agent, poll_until, retry_while_busy, wait_until, AgentProc,
    Pki, PATIENCE,
};

/// A generous bound for anything the busy test machine must do "at once".
const PROMPT: Duration = Duration::from_secs(20);

/// A peer that starts a TLS record announcing a large ClientHello and then sends one
/// byte of it at a time, slowly: a handshake that never completes on its own.
async fn slow_handshaker(agent: &AgentProc, source: &str) -> tokio::task::JoinHandle<()> {
    let mut stream = idle_peer(agent, source).await;
    tokio::spawn(async move {
        // Handshake record, TLS 1.0 legacy version, 512 bytes, type ClientHello.
        if stream
            .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
            .await
            .is_err()
        {
            return;
        }
        while stream.write_all(&[0]).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

/// How long a close the agent has already made takes to show on a loopback socket. No
/// agent setting governs it: the "still open" checks that use it come after the oldest
/// peers were seen dropped, and the agent drops one as each newcomer arrives, so a close
/// it made in that step is already sent; only loopback delivery and a wake-up remain.
const CLOSE_SHOWS_WITHIN: Duration = Duration::from_millis(50);

/// Whether the agent has closed `stream` (end of stream or reset), waiting at most
/// [`CLOSE_SHOWS_WITHIN`] for the socket to report it.
async fn closed_by_agent(stream: &TcpStream) -> bool {
    if tokio::time::timeout(CLOSE_SHOWS_WITHIN, stream.readable())
        .await
        .is_err()
    {
        return false;
    }
    let mut byte = [0u8; 1];
    match stream.try_read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
        Err(_) => true,
    }
}

fn no_busy_busy(text: &str) {
    let lower = text.to_ascii_lowercase();
    for kind in [
        "busy",
        "bad request",
        "timeout",
        "internal error",
        "invalid path",
    ] {
        assert!(
            !lower.contains(&format!("{kind}: {kind}")),
            "'{kind}' repeated in:\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_peers_do_not_keep_the_master_out() {
    // Few sessions and a small handshake room, so that the crowd below is many times
    // larger than both; a handshake timeout long enough that the master must not need
    // the crowd to time out first.
    let timeout = Duration::from_secs(15);
    let (pki, agent) = pki_and_agent(
        "web-1",
        &[
            "--max-connections",
            "2",
            "--max-handshakes",
            "8",
            "--max-handshakes-per-address",
            "4",
            "--handshake-timeout-ms",
            &timeout.as_millis().to_string(),
        ],
    );
    // One address opens many idle connections and trickles slow handshakes; a few
    // other addresses each hold one idle connection.
    let mut crowd = Vec::new();
    for _ in 0..24 {
        crowd.push(idle_peer(&agent, "127.0.0.2").await);
    }
    let mut slow = Vec::new();
    for _ in 0..4 {
        slow.push(slow_handshaker(&agent, "127.0.0.2").await);
    }
    for n in 3..10 {
        crowd.push(idle_peer(&agent, &format!("127.0.0.{n}")).await);
    }

    for attempt in 0..3 {
        let started = Instant::now();
        let mut client = Connector::new(pki.client_config(), "test-master")
            .connect(&agent.host())
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "attempt {attempt}: the master is kept out: {e}\n{}",
                    agent.log()
                )
            });
        client.ping().await.expect("ping");
        assert!(
            started.elapsed() < timeout,
            "attempt {attempt}: the master waited {:?}, as long as idle peers may wait",
            started.elapsed()
        );
        client.close().await;
        // More of the crowd arrives between the master's visits.
        crowd.push(idle_peer(&agent, "127.0.0.2").await);
    }
    // The agent says it dropped handshakes.
    agent
        .log_showing("unauthenticated peers at the limit", PATIENCE)
        .await;
    for task in slow {
        task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_holds_at_most_its_cap_of_pending_handshakes() {
    let cap = 3;
    let (pki, agent) = pki_and_agent(
        "web-1",
        &[
            "--max-handshakes",
            "50",
            "--max-handshakes-per-address",
            &cap.to_string(),
            // Long enough that no pending handshake times out during the test.
            "--handshake-timeout-ms",
            "60000",
        ],
    );
    let mut peers = Vec::new();
    for _ in 0..cap * 2 {
        peers.push(idle_peer(&agent, "127.0.0.2").await);
    }
    let other = idle_peer(&agent, "127.0.0.3").await;
    // The agent accepts them in order; each one beyond the cap pushes out the oldest.
    let oldest = &peers[..cap];
    let dropped = wait_until(PROMPT, move || async move {
        for peer in oldest {
            if !closed_by_agent(peer).await {
                return false;
            }
        }
        true
    })
    .await;
    assert!(
        dropped,
        "the {cap} oldest connections from one address are closed\n{}",
        agent.log()
    );
    for (i, peer) in peers[cap..].iter().enumerate() {
        assert!(!closed_by_agent(peer).await, "newer connection {i} is kept");
    }
    assert!(
        !closed_by_agent(&other).await,
        "another address is not touched"
    );
    // A pending handshake is still only a handshake: the master gets in.
    let mut client = pki.connect(&agent).await;
    client.ping().await.expect("ping");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_that_never_completes_is_cut_after_the_timeout() {
    let timeout = Duration::from_millis(1500);
    let (_pki, agent) = pki_and_agent(
        "web-1",
        &["--handshake-timeout-ms", &timeout.as_millis().to_string()],
    );
    let started = Instant::now();
    let mut idle = idle_peer(&agent, "127.0.0.2").await;
    assert!(
        closes_within(&mut idle, timeout + PROMPT).await,
        "an idle peer is cut"
    );
    let waited = started.elapsed();
    assert!(
        waited >= timeout,
        "cut after {waited:?}, before the timeout"
    );

    // A peer that keeps sending, slowly, is cut just the same: the timeout is on the
    // whole handshake, not on silence.
    let mut stream = idle_peer(&agent, "127.0.0.2").await;
    let started = Instant::now();
    stream
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .expect("record header");
    let trickle = async {
        while stream.write_all(&[0]).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    assert!(
        tokio::time::timeout(timeout + PROMPT, trickle)
            .await
            .is_ok(),
        "a slow handshake is cut"
    );
    assert!(started.elapsed() >= timeout);
    assert!(agent.log().contains("TLS handshake timed out"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_beyond_the_connection_limit_is_told_so() {
    let (pki, agent) = pki_and_agent("web-1", &["--max-connections", "2"]);
    let first = pki.connect(&agent).await;
    let mut second = pki.connect(&agent).await;
    second.ping().await.expect("ping");

    let err = Connector::new(pki.client_config(), "test-master")
        .connect(&agent.host())
        .await
        .expect_err("a third master is refused");
    assert_eq!(err.agent_kind(), Some(ErrorKind::Busy), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("limit of 2 connections") && text.contains("max_connections"),
        "{text}"
    );
    no_busy_busy(&text);

    // The CLI says the same.
    let out = pki.erel_at("ping", &agent).output().expect("run erel ping");
    let shown = output_text(&out);
    assert!(!out.status.success(), "{shown}");
    assert!(shown.contains("limit of 2 connections"), "{shown}");
    no_busy_busy(&shown);

    // Room again once a master leaves.
    first.close().await;
    let (agent_ref, pki_ref) = (&agent, &pki);
    let back = wait_until(PROMPT, move || async move {
        let (agent, pki) = (agent_ref, pki_ref);
        match Connector::new(pki.client_config(), "test-master")
            .connect(&agent.host())
            .await
        {
            Ok(mut client) => client.ping().await.is_ok(),
            Err(_) => false,
        }
    })
    .await;
    assert!(
        back,
        "a master gets in when another leaves\n{}",
        agent.log()
    );
}

/// The stdout of the `which` `erel push` that ended with `out`, which must have
/// succeeded without saying "busy" twice.
fn pushed(agent: &AgentProc, which: &str, out: &std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the {which} push fails:\n{stderr}\nagent log:\n{}",
        agent.log()
    );
    no_busy_busy(&stderr);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A file of `size` bytes that are not all alike (so a resume from the wrong place
/// would show), written sparsely apart from a marker every MiB, in a new temporary
/// directory; with its digest.
fn big_file(size: u64) -> (tempfile::TempDir, std::path::PathBuf, erel_proto::Sha256) {
    use std::io::{Seek, SeekFrom, Write};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("big.bin");
    let mut file = std::fs::File::create(&path).expect("create");
    file.set_len(size).expect("size");
    let mut at = 0;
    while at < size {
        file.seek(SeekFrom::Start(at)).expect("seek");
        file.write_all(&at.to_le_bytes()).expect("marker");
        at += 1 << 20;
    }
    drop(file);
    let digest = sha256(&path);
    (dir, path, digest)
}

fn staged_bytes(agent: &AgentProc) -> u64 {
    std::fs::read_dir(agent.root.join(".erel/staging"))
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// The offsets the agent logged for completed `WriteFile`s of `path`.
fn logged_offsets(log: &str, path: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains("command=\"write_file\"") || l.contains("command=write_file"))
        .filter(|l| l.contains(path) && l.contains("ok=true"))
        .filter_map(|l| {
            let rest = &l[l.find("offset=")? + "offset=".len()..];
            rest.split_whitespace().next()?.parse().ok()
        })
        .collect()
}

/// `erel push` of `file` to `data/big.bin` with its digest given up front, the master's
/// digest cache under `work/cache`.
fn erel_push_big(
    pki: &Pki,
    agent: &AgentProc,
    work: &std::path::Path,
    file: &std::path::Path,
    digest: &erel_proto::Sha256,
) -> std::process::Command {
    let mut command = pki.erel();
    command
        .env("XDG_CACHE_HOME", work.join("cache"))
        .arg("push")
        .arg(agent.host().to_string())
        .arg(file)
        .arg("data/big.bin")
        .arg("--sha256")
        .arg(digest.to_hex());
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_killed_mid_way_is_repeated_at_once_and_resumes() {
    let (pki, agent) = pki_and_agent("web-1", &[]);
    let size: u64 = 256 << 20;
    // The digest given up front, as a cluster file gives it: the file is read once per
    // push, and the agent verifies the whole of it before it becomes visible.
    let (work, file, digest) = big_file(size);
    let push = || erel_push_big(&pki, &agent, work.path(), &file, &digest);
    let mut child = push()
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn erel push");
    // Stepped, and held stopped once 16 MiB are staged: killed in the middle.
    let started = tokio::task::block_in_place(|| {
        step_until(child.id(), Duration::from_secs(120), || {
            (staged_bytes(&agent) >= 16 << 20).then_some(())
        })
    });
    assert!(started.is_some(), "the transfer starts\n{}", agent.log());
    child.kill().expect("kill -9 the push");
    let _ = child.wait();
    drop(started);
    let cut_at = staged_bytes(&agent);
    assert!(cut_at < size, "cut mid-way ({cut_at} of {size})");

    // The same command, at once.
    let again = push().output().expect("run erel push again");
    let stdout = pushed(&agent, "repeated", &again);
    assert!(
        stdout.contains("resumed") && stdout.contains(&digest.to_hex()),
        "{stdout}"
    );
    let landed = agent.root.join("data/big.bin");
    assert_eq!(std::fs::metadata(&landed).expect("landed").len(), size);
    let offsets = logged_offsets(&agent.log(), "data/big.bin");
    assert!(
        offsets.iter().any(|&o| o > 0),
        "the repeat resumed from staged bytes: {offsets:?}\n{}",
        agent.log()
    );
    no_busy_busy(&agent.log());
}

/// Two masters push the same file to the same place at once: the later takes the
/// transfer over, and the earlier, told `busy` mid-way, goes on from the bytes the
/// agent holds rather than failing. Both succeed and the file lands once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_masters_pushing_the_same_file_at_once_both_succeed() {
    let (pki, agent) = pki_and_agent("web-1", &[]);
    let size: u64 = 256 << 20;
    let (work, file, digest) = big_file(size);
    let push = || {
        let mut command = erel_push_big(&pki, &agent, work.path(), &file, &digest);
        command
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        command
    };
    let first = push().spawn().expect("spawn the first push");
    // The first is held stopped mid-way until the second has taken its transfer over.
    let started = tokio::task::block_in_place(|| {
        step_until(first.id(), Duration::from_secs(120), || {
            (staged_bytes(&agent) >= 16 << 20).then_some(())
        })
    });
    assert!(
        started.is_some(),
        "the first transfer starts\n{}",
        agent.log()
    );
    let second = push().spawn().expect("spawn the second push");
    agent.log_showing_all(&["taken over by a newer request"], PATIENCE);
    drop(started);
    let second = second.wait_with_output().expect("wait for the second push");
    let first = first.wait_with_output().expect("wait for the first push");
    for (which, out) in [("first", &first), ("second", &second)] {
        let stdout = pushed(&agent, which, out);
        assert!(stdout.contains(&digest.to_hex()), "{which}");
    }
    agent.log_showing_all(&["taken over by a newer request"], PATIENCE);
    let landed = agent.root.join("data/big.bin");
    assert_eq!(std::fs::metadata(&landed).expect("landed").len(), size);
    assert_eq!(sha256(&landed), digest);
}

/// How long the agent lets a transfer's holder take to let go of its staging file before
/// a repeat is refused (the agent's `write_file::TAKE_OVER_WAIT`).
const TAKE_OVER_WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_or_dropped_transfer_is_taken_over_at_once() {
    let (pki, agent) = pki_and_agent("web-1", &[]);
    let size: u64 = 64 << 20;
    let (work, file, digest) = big_file(size);
    let source = WriteSource {
        path: file.clone(),
        sha256: Some(digest),
        sha256_of: None,
    };

    // A master that stops sending mid-way but keeps its connection open, as a peer
    // behind a cut network does: the agent would wait out its stall timeout for it.
    let mut stalled = pki.connect(&agent).await;
    let (counter, mut sent) = tokio::sync::watch::channel(0u64);
    let mut progress = move |p: Progress| {
        counter.send_replace(p.sent);
    };
    tokio::select! {
        // Asked first: the transfer stops at the first look after 8 MiB went out.
        biased;
        _ = sent.wait_for(|sent| *sent >= 8 << 20) => {}
        result = stalled.write_file(&source, "data/a.bin", 0o644, &mut progress) => {
            panic!("the transfer was to be stopped mid-way, it ended: {result:?}")
        }
    }
    let started = Instant::now();
    let mut fresh = pki.connect(&agent).await;
    let written = fresh
        .write_file(&source, "data/a.bin", 0o644, &mut |_| {})
        .await
        .unwrap_or_else(|e| panic!("the repeat is refused: {e}\n{}", agent.log()));
    assert!(
        started.elapsed() < TAKE_OVER_WAIT + PROMPT,
        "taken over in {:?}",
        started.elapsed()
    );
    assert!(written.received < size, "resumed: {written:?}");
    assert_eq!(
        std::fs::read(agent.root.join("data/a.bin")).expect("read"),
        std::fs::read(&file).expect("read")
    );
    // The stalled master learns why its transfer ended.
    let err = stalled
        .ping()
        .await
        .expect_err("the stalled connection was ended");
    no_busy_busy(&err.to_string());
    drop(stalled);

    // A client dropped in the middle of a transfer (its task cancelled): the repeat
    // goes through at once too.
    let other = work.path().join("other.bin");
    std::fs::write(&other, vec![5u8; 32 << 20]).expect("write");
    let other_source = without_digest(&other);
    let mut dropped = pki.connect(&agent).await;
    let (counter, mut sent) = tokio::sync::watch::channel(0u64);
    let task_source = other_source.clone();
    let transfer = async move {
        let mut progress = move |p: Progress| {
            counter.send_replace(p.sent);
        };
        dropped
            .write_file(&task_source, "data/b.bin", 0o644, &mut progress)
            .await
    };
    // Dropped (cancelled) at the first look after 4 MiB went out.
    tokio::select! {
        biased;
        _ = sent.wait_for(|sent| *sent >= 4 << 20) => {}
        result = transfer => {
            panic!("the transfer was to be dropped mid-way, it ended: {result:?}")
        }
    }
    let mut fresh = pki.connect(&agent).await;
    let written = fresh
        .write_file(&other_source, "data/b.bin", 0o644, &mut |_| {})
        .await
        .unwrap_or_else(|e| panic!("the repeat is refused: {e}\n{}", agent.log()));
    assert_eq!(written.size, 32 << 20);
    assert_eq!(
        std::fs::read(agent.root.join("data/b.bin")).expect("read"),
        std::fs::read(&other).expect("read")
    );
    no_busy_busy(&agent.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_normal_connection_end_leaves_no_error_in_the_agent_log() {
    // One session at a time: when the next master gets in, the previous connection's
    // end has been handled (and logged, if it were to be).
    let (pki, agent) = pki_and_agent("web-1", &["--max-connections", "1"]);
    let work = tempfile::tempdir().expect("tempdir");
    let file = work.path().join("small.bin");
    std::fs::write(&file, b"hello").expect("write");

    let (agent_ref, pki_ref) = (&agent, &pki);
    let next_master = move || async move {
        let (agent, pki) = (agent_ref, pki_ref);
        retry_while_busy(Duration::from_secs(20), || async {
            Connector::new(pki.client_config(), "test-master")
                .connect(&agent.host())
                .await
        })
        .await
        .unwrap_or_else(|e| panic!("connect: {e}\n{}", agent.log()))
    };

    // Closed explicitly, dropped, and dropped after an error the agent reported.
    let mut client = next_master().await;
    client.ping().await.expect("ping");
    client.close().await;
    let mut client = next_master().await;
    client
        .write_file(&without_digest(&file), "data/small.bin", 0o644, &mut |_| {})
        .await
        .expect("push");
    drop(client);
    let mut client = next_master().await;
    let refused = client.unpack("missing.tar.gz", "releases/x/1", None).await;
    assert_eq!(
        refused.expect_err("no archive").agent_kind(),
        Some(ErrorKind::NotFound)
    );
    drop(client);
    // The CLI, as an operator runs it.
    for _ in 0..2 {
        let pinged = poll_until(Duration::from_secs(20), || async {
            let out = pki.erel_at("ping", &agent).output().expect("run erel ping");
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            let busy = err.contains("limit of 1 connections");
            assert!(out.status.success() || busy, "{err}");
            out.status.success().then_some(())
        })
        .await;
        assert!(pinged.is_some(), "erel ping still refused as busy");
    }
    let mut last = next_master().await;
    last.ping().await.expect("ping");

    let log = agent.log();
    assert!(log.contains("master connected"), "{log}");
    for line in log.lines() {
        assert!(
            !line.contains("connection ended") && !line.contains("close_notify"),
            "a normal end is logged as an error: {line}\n{log}"
        );
        assert!(!line.contains(" ERROR "), "{line}");
    }
}

/// A `.tar` of `entries` small files under `files/`, written to `dir`.
fn many_files_tar(dir: &std::path::Path, entries: usize) -> std::path::PathBuf {
    let path = dir.join("many.tar");
    let mut builder = tar::Builder::new(std::fs::File::create(&path).expect("create"));
    let body = vec![b'x'; 512];
    for n in 0..entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(body.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        builder
            .append_data(&mut header, format!("files/{n}.txt"), body.as_slice())
            .expect("append");
    }
    builder.finish().expect("finish");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpack_cut_while_it_runs_is_repeated_at_once() {
    let (pki, agent) = pki_and_agent("web-1", &[]);
    let work = tempfile::tempdir().expect("tempdir");
    let entries = 10_000;
    let archive = many_files_tar(work.path(), entries);
    let digest = sha256(&archive);
    let mut client = pki.connect(&agent).await;
    client
        .write_file(
            &WriteSource {
                path: archive.clone(),
                sha256: Some(digest),
                sha256_of: None,
            },
            "archives/many.tar",
            0o644,
            &mut |_| {},
        )
        .await
        .expect("push the archive");
    // Ready before the cut, so that the repeat goes out the moment the first runs.
    let mut repeat = pki.connect(&agent).await;

    let task = tokio::spawn(async move {
        client
            .unpack("archives/many.tar", "releases/many/1", Some(digest))
            .await
    });
    let staging = agent.root.join(".erel/unpack");
    // Stepped, and held stopped once seen unpacking: the cut comes in the middle of it.
    let pid = agent.pid().expect("the agent runs");
    let running = tokio::task::block_in_place(|| {
        step_until(pid, Duration::from_secs(120), || {
            let busy = std::fs::read_dir(&staging).is_ok_and(|mut d| d.next().is_some());
            busy.then_some(())
        })
    });
    assert!(
        running.is_some(),
        "the first unpack starts\n{}",
        agent.log()
    );
    task.abort(); // the master goes away; the agent finishes what it started
    let _ = task.await;
    drop(running);

    let done = repeat
        .unpack("archives/many.tar", "releases/many/1", Some(digest))
        .await
        .unwrap_or_else(|e| panic!("the repeated unpack fails: {e}\n{}", agent.log()));
    assert_eq!(done.sha256, digest);
    assert!(agent
        .root
        .join(format!("releases/many/1/files/{}.txt", entries - 1))
        .is_file());
    let log = agent.log();
    assert!(
        log.lines()
            .any(|l| l.contains("busy") && l.contains("releases/many/1")),
        "the repeat arrived while the first still ran, and waited it out:\n{log}"
    );
    no_busy_busy(&log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_cut_by_the_agent_is_explained_at_the_master() {
    let pki = Pki::new();
    // As an agent whose handshake room is full does: accept, read the ClientHello,
    // close; and the same at once, before reading anything.
    for read_first in [true, false] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            if read_first {
                let mut hello = [0u8; 64];
                let _ = stream.read(&mut hello).await;
            }
            drop(stream);
        });
        let host = erel_master::HostAddr {
            id: "web-1".into(),
            addr: addr.to_string(),
        };
        let err = Connector::new(pki.client_config(), "test-master")
            .connect(&host)
            .await
            .expect_err("cut");
        let text = err.to_string();
        assert!(
            text.contains("closed the connection during the TLS handshake")
                && text.contains("proving who they are"),
            "{text}"
        );
        server.await.expect("server");
    }
}

/// A replaced bundle that does not load is warned about once, not at every connection:
/// otherwise a crowd without certificates would make the agent parse the whole bundle
/// and write a warning for each connection it opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_bundle_is_not_reloaded_for_every_peer() {
    let (pki, agent) = pki_and_agent("web-1", &[]);
    let bundle = pki.bundle("web-1");
    let staged = bundle.join(".crl.pem.new");
    std::fs::write(&staged, "not a CRL\n").expect("stage");
    std::fs::rename(&staged, bundle.join(erel_certs::layout::CRL_PEM)).expect("replace crl.pem");

    let mut crowd = Vec::new();
    for n in 0..40 {
        crowd.push(idle_peer(&agent, &format!("127.0.0.{}", 2 + n % 20)).await);
    }
    let mut client = Connector::new(pki.client_config(), "test-master")
        .connect(&agent.host())
        .await
        .unwrap_or_else(|e| panic!("the previous bundle still serves: {e}\n{}", agent.log()));
    client.ping().await.expect("ping");
    client.close().await;

    let log = agent.log();
    let warnings = log.matches("does not load").count();
    assert_eq!(warnings, 1, "one warning for one refused change:\n{log}");

    // A change to the files is tried again: a good crl.pem back in place is used.
    let good = pki.certs_dir().join(erel_certs::layout::CRL_PEM);
    std::fs::copy(&good, &staged).expect("stage");
    std::fs::rename(&staged, bundle.join(erel_certs::layout::CRL_PEM)).expect("restore");
    let mut client = Connector::new(pki.client_config(), "test-master")
        .connect(&agent.host())
        .await
        .expect("connect");
    client.ping().await.expect("ping");
    client.close().await;
    assert!(agent.log().contains("certificate bundle changed; reloaded"));
}

/// An error whose text already quotes its cause (here the refused connection) is
/// shown once, not followed by that cause again.
#[test]
fn an_unreachable_agent_is_reported_without_repeating_the_cause() {
    let pki = Pki::new();
    let work = tempfile::tempdir().expect("tempdir");
    let file = work.path().join("small.bin");
    std::fs::write(&file, b"bytes").expect("write");
    let out = pki
        .erel()
        .env("XDG_CACHE_HOME", work.path().join("cache"))
        .arg("push")
        .arg(format!("web-1@127.0.0.1:{}", free_port()))
        .arg(&file)
        .arg("data/small.bin")
        .output()
        .expect("run erel push");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert_eq!(stderr.matches("refused").count(), 1, "{stderr}");
    no_busy_busy(&stderr);
}
