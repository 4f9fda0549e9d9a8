//! The boot agent end to end: every command over real TLS, failures on the wire,
//! supervision and restarts of the agent itself.

use std::io::{Read, Write};
use std::time::Duration;

use erel_master::client::WriteSource;
use erel_proto::{
    encode_frame, read_frame, ErrorKind, Hello, Ping, ReleaseState, Request, Response, Start,
    WriteBegin, WriteFile, PROTOCOL_VERSION,
};
use tokio::io::AsyncWriteExt;
use tokio_rustls::TlsConnector;

use crate::helper::install::{
    install_and_start, no_progress, release_status, start_request, unpack_shell_release,
    without_digest,
};
use crate::helper::release::{beat_release, sha256};
use crate::helper::AgentCommands;
use crate::helper::{
    free_port, listing, outlast_any_restart, pki_and_agent, poll_until, retry_while_busy,
    wait_until, AgentProc, Pki, PATIENCE,
};

/// Pushes, unpacks and starts the beat release `version`; returns the port it serves.
async fn install_beat(pki: &Pki, agent: &AgentProc, version: &str) -> u16 {
    let work = tempfile::tempdir().expect("tempdir");
    let tarball = beat_release(work.path(), "beat", version);
    let mut client = pki.connect(agent).await;
    let port = free_port();
    let env = vec![("BEAT_PORT".into(), port.to_string())];
    install_and_start(&mut client, &tarball, "beat", version, env).await;
    port
}

/// [`install_beat`], then waits until the release answers on its port.
async fn beat_answering(pki: &Pki, agent: &AgentProc, version: &str) -> u16 {
    let port = install_beat(pki, agent, version).await;
    assert!(wait_until(PATIENCE, || async { beat_answer(port).await.is_some() }).await);
    port
}

async fn beat_answer(port: u16) -> Option<String> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let mut line = String::new();
    use tokio::io::AsyncReadExt;
    tokio::time::timeout(Duration::from_secs(2), stream.read_to_string(&mut line))
        .await
        .ok()?
        .ok()?;
    Some(line.trim().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_unpack_start_ping_stop() {
    let (pki, agent) = pki_and_agent("web-1", &[]);
    let port = install_beat(&pki, &agent, "0.1.0").await;

    assert!(
        wait_until(PATIENCE, || async {
            beat_answer(port).await.as_deref() == Some("beat 0.1.0 web-1")
        })
        .await,
        "the release serves its version with EREL_HOST_ID\n{}",
        agent.log()
    );
    let status = release_status(&pki, &agent, "beat").await.expect("known");
    assert_eq!(status.state, ReleaseState::Running);
    assert_eq!(status.version.as_deref(), Some("0.1.0"));
    assert_eq!(status.versions, vec!["0.1.0".to_string()]);
    assert!(status.desired_running);
    assert_eq!(agent.release_pids("beat").len(), 1);

    let mut client = pki.connect(&agent).await;
    let pong = client.ping().await.expect("ping");
    assert_eq!(pong.host_id, "web-1");
    assert!(pong.free_disk_bytes > 0);

    let stopped = client
        .stop("beat", Duration::from_secs(5))
        .await
        .expect("stop");
    assert!(stopped.was_running);
    assert!(
        agent.release_pids("beat").is_empty(),
        "nothing of the group is left"
    );
    let again = client
        .stop("beat", Duration::from_secs(5))
        .await
        .expect("stop twice");
    assert!(!again.was_running, "stopping what is stopped succeeds");
    let status = release_status(&pki, &agent, "beat").await.expect("known");
    assert_eq!(status.state, ReleaseState::Stopped);
    assert!(!status.desired_running);
    assert!(
        agent.log().contains("command=\"start\"") || agent.log().contains("command=start"),
        "one log line per command:\n{}",
        agent.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starting_the_running_version_changes_nothing_and_a_new_version_replaces_it() {
    let (pki, agent) = pki_and_agent("web-1", &[]);
    let port = beat_answering(&pki, &agent, "0.1.0").await;
    let pid = agent.release_pids("beat");

    let mut client = pki.connect(&agent).await;
    let again = client
        .start(Start {
            name: "beat".into(),
            version: "0.1.0".into(),
            argv: vec![],
            env: vec![("BEAT_PORT".into(), port.to_string())],
            user: None,
        })
        .await
        .expect("start again");
    assert!(again.already_running);
    assert_eq!(agent.release_pids("beat"), pid, "same process");

    let port2 = install_beat(&pki, &agent, "0.2.0").await;
    assert!(
        wait_until(PATIENCE, || async {
            beat_answer(port2).await.as_deref() == Some("beat 0.2.0 web-1")
        })
        .await
    );
    assert_eq!(agent.release_pids("beat").len(), 1, "one version at a time");
    assert!(beat_answer(port).await.is_none(), "0.1.0 is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_push_sends_nothing_and_a_cut_push_resumes() {
    let (pki, agent) = pki_and_agent("web-1", &[]);
    let work = tempfile::tempdir().expect("tempdir");
    let file = work.path().join("blob.bin");
    let size: usize = 8 * 1024 * 1024;
    let content: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::write(&file, &content).expect("write");
    let digest = sha256(&file);

    // Cut a transfer half-way with a raw connection.
    let half = size / 2;
    {
        let mut raw = raw_connection(&pki, &agent).await;
        hello(&mut raw).await;
        raw.write_all(
            &encode_frame(&Request::WriteFile(WriteFile {
                path: "data/blob.bin".into(),
                mode: 0o600,
                size: size as u64,
                sha256: Some(digest),
            }))
            .expect("encode"),
        )
        .await
        .expect("send");
        match read_frame::<Response, _>(&mut raw).await.expect("offer") {
            Some(Response::WriteOffer(offer)) => assert_eq!(offer.have, 0),
            other => panic!("expected an offer, got {other:?}"),
        }
        raw.write_all(&encode_frame(&WriteBegin { offset: 0 }).expect("encode"))
            .await
            .expect("send");
        raw.write_all(&content[..half]).await.expect("send half");
        raw.flush().await.expect("flush");
        // Cut: drop the TCP connection without a close_notify.
        let (tcp, _) = raw.into_inner();
        drop(tcp);
    }
    let staging = agent.root.join(".erel/staging");
    let staged = || {
        std::fs::read_dir(&staging)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .max()
                    .unwrap_or(0)
            })
            .unwrap_or(0)
    };
    // The agent keeps what arrived, synced: everything we sent, unless the cut lost
    // some of it in flight.
    let mut last = 0;
    let settled = wait_until(PATIENCE, || {
        let now = staged();
        let stable = now > 0 && now == last;
        last = now;
        async move { stable && now == half as u64 }
    })
    .await;
    let kept = staged();
    assert!(
        kept > 0 && kept <= half as u64,
        "the agent keeps what arrived (staged {kept}, settled {settled})"
    );
    assert!(
        !agent.root.join("data/blob.bin").exists(),
        "nothing half-done is visible"
    );

    let client = pki.connect(&agent).await;
    let source = WriteSource {
        path: file.clone(),
        sha256: Some(digest),
        sha256_of: None,
    };
    // Until the agent has noticed the cut, the staged file is still held: Busy.
    let shared = tokio::sync::Mutex::new(client);
    let (client, source_ref) = (&shared, &source);
    let written = retry_while_busy(Duration::from_secs(10), || async move {
        let mut client = client.lock().await;
        client
            .write_file(source_ref, "data/blob.bin", 0o600, &mut no_progress())
            .await
    })
    .await
    .expect("resume");
    let mut client = shared.into_inner();
    assert_eq!(written.size, size as u64);
    assert_eq!(
        written.received,
        size as u64 - kept,
        "only what the agent lacked is sent"
    );
    assert_eq!(
        std::fs::read(agent.root.join("data/blob.bin")).expect("read"),
        content
    );

    let again = client
        .write_file(&source, "data/blob.bin", 0o600, &mut no_progress())
        .await
        .expect("repeat");
    assert_eq!(again.received, 0, "a file already present costs nothing");

    // Without a digest in advance, the master hashes as it sends and still resumes
    // nothing twice: a second push of the same bytes to a new path goes through whole.
    let unknown = without_digest(&file);
    let fresh = client
        .write_file(&unknown, "data/copy.bin", 0o644, &mut no_progress())
        .await
        .expect("push without digest");
    assert_eq!(fresh.sha256, digest);
    assert_eq!(fresh.received, size as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_push_uses_the_digest_cache_and_shows_what_it_sent() {
    let (pki, agent) = pki_and_agent("web-1", &[]);
    let work = tempfile::tempdir().expect("tempdir");
    let file = work.path().join("app.tar.gz");
    std::fs::write(&file, vec![7u8; 300_000]).expect("write");
    let push = || {
        pki.erel()
            .env("XDG_CACHE_HOME", work.path().join("cache"))
            .arg("push")
            .arg(agent.host().to_string())
            .arg(&file)
            .arg("archives/app.tar.gz")
            .output()
            .expect("run erel push")
    };
    let first = push();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let text = String::from_utf8_lossy(&first.stdout);
    assert!(text.contains("sent 293.0 KiB"), "{text}");
    let second = push();
    assert!(second.status.success());
    let text = String::from_utf8_lossy(&second.stdout);
    assert!(text.contains("already present, nothing sent"), "{text}");

    let refused = pki
        .erel_at("push", &agent)
        .arg(&file)
        .arg("../escape.tar.gz")
        .output()
        .expect("run erel push");
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("invalid path") && err.contains("'..'"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_archive_over_the_wire_writes_nothing() {
    let (pki, agent) = pki_and_agent("web-1", &[]);
    let work = tempfile::tempdir().expect("tempdir");
    // A tarball with an entry that climbs out of the destination, written by hand
    // because the tar builder refuses such paths.
    let path = work.path().join("evil.tar");
    let mut header = tar::Header::new_old();
    {
        let name = b"../../escaped.txt";
        header.as_old_mut().name[..name.len()].copy_from_slice(name);
    }
    header.set_size(5);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    let mut bytes = header.as_bytes().to_vec();
    bytes.extend_from_slice(b"evil\n");
    bytes.resize(bytes.len() + (512 - 5), 0);
    bytes.extend_from_slice(&[0u8; 1024]);
    std::fs::write(&path, &bytes).expect("write");

    let before = listing(agent.root.parent().expect("parent"), "");
    let mut client = pki.connect(&agent).await;
    client
        .write_file(
            &without_digest(&path),
            "archives/evil.tar",
            0o644,
            &mut no_progress(),
        )
        .await
        .expect("push");
    let err = client
        .unpack("archives/evil.tar", "releases/evil/1", None)
        .await
        .unwrap_err();
    assert_eq!(err.agent_kind(), Some(ErrorKind::UnsafeArchive), "{err}");
    assert!(err.to_string().contains("../../escaped.txt"), "{err}");
    assert!(!agent.root.join("releases/evil/1").exists());
    assert!(!agent.root.join("escaped.txt").exists());
    assert!(!agent
        .root
        .parent()
        .expect("parent")
        .join("escaped.txt")
        .exists());
    let after = listing(agent.root.parent().expect("parent"), "");
    let new: Vec<_> = after
        .iter()
        .filter(|p| !before.contains(p))
        .filter(|p| !p.contains("/.erel") && !p.ends_with("archives") && !p.ends_with("evil.tar"))
        .collect();
    assert!(new.is_empty(), "nothing else written: {new:?}");
    // The connection is still usable after a refusal.
    client.ping().await.expect("ping after refusal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_release_is_restarted_and_one_that_exits_at_once_crash_loops() {
    let (pki, agent) = pki_and_agent("web-1", &[]);
    let work = tempfile::tempdir().expect("tempdir");
    let port = beat_answering(&pki, &agent, "0.1.0").await;
    let first = agent.release_pids("beat");
    assert_eq!(first.len(), 1);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill release");
    assert!(
        wait_until(PATIENCE, || async {
            matches!(release_status(&pki, &agent, "beat").await,
                Some(s) if s.state == ReleaseState::Running && s.restarts == 1 && s.pid.map(|p| p as i32) != Some(first[0]))
        })
        .await,
        "restarted after being killed\n{}",
        agent.log()
    );
    assert!(wait_until(PATIENCE, || async { beat_answer(port).await.is_some() }).await);

    // A release that exits at once.
    let script = "#!/bin/sh\necho \"flop cannot find its config\" >&2\nexit 3\n";
    let mut client = unpack_shell_release(&pki, &agent, work.path(), "flop", "1", script).await;
    client
        .start(start_request("flop", "1", &[]))
        .await
        .expect("start");
    assert!(
        wait_until(PATIENCE, || async {
            matches!(release_status(&pki, &agent, "flop").await, Some(s) if s.state == ReleaseState::CrashLooping)
        })
        .await,
        "crash-looping\n{}",
        agent.log()
    );
    let status = release_status(&pki, &agent, "flop").await.expect("known");
    assert!(
        status.output_tail.contains("flop cannot find its config"),
        "{:?}",
        status.output_tail
    );
    let restarts = status.restarts;
    // A restart would come within one restart delay; none comes in several.
    outlast_any_restart().await;
    let later = release_status(&pki, &agent, "flop").await.expect("known");
    assert_eq!(
        later.restarts, restarts,
        "no more restarts once crash-looping"
    );
    assert_eq!(later.state, ReleaseState::CrashLooping);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_kill9_or_sigterm_and_restart_leaves_exactly_one_copy() {
    let (pki, mut agent) = pki_and_agent("web-1", &[]);
    let port = beat_answering(&pki, &agent, "0.1.0").await;
    let pids = agent.release_pids("beat");
    assert_eq!(pids.len(), 1);

    agent.kill9();
    assert_eq!(
        agent.release_pids("beat"),
        pids,
        "the release outlives the agent"
    );
    agent.restart();
    let status = release_status(&pki, &agent, "beat").await.expect("known");
    assert_eq!(status.state, ReleaseState::Running);
    assert_eq!(
        status.pid.map(|p| p as i32),
        Some(pids[0]),
        "adopted, not restarted"
    );
    // A second copy would be started within one restart delay; none is in several.
    outlast_any_restart().await;
    assert_eq!(agent.release_pids("beat"), pids, "exactly one copy");

    assert!(
        agent.terminate(),
        "a clean SIGTERM exits 0\n{}",
        agent.log()
    );
    assert_eq!(
        agent.release_pids("beat"),
        pids,
        "SIGTERM leaves releases running"
    );
    agent.restart();
    outlast_any_restart().await;
    assert_eq!(agent.release_pids("beat"), pids);
    assert_eq!(beat_answer(port).await.as_deref(), Some("beat 0.1.0 web-1"));

    // The release dies while the agent is down: the agent starts it once on return.
    agent.kill9();
    for pid in &pids {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(*pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    assert!(wait_until(PATIENCE, || async { agent.release_pids("beat").is_empty() }).await);
    agent.restart();
    assert!(
        wait_until(PATIENCE, || async { beat_answer(port).await.is_some() }).await,
        "started again after the agent came back\n{}",
        agent.log()
    );
    outlast_any_restart().await;
    assert_eq!(agent.release_pids("beat").len(), 1);
}

// --- the wire: garbage, oversize frames, unknown variants, versions ---

type RawTls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn raw_connection(pki: &Pki, agent: &AgentProc) -> RawTls {
    let tcp = tokio::net::TcpStream::connect(agent.addr)
        .await
        .expect("connect");
    let connector = TlsConnector::from(pki.client_config());
    connector
        .connect(erel_certs::server_name(&agent.id).expect("name"), tcp)
        .await
        .expect("handshake")
}

async fn hello(raw: &mut RawTls) {
    let frame = encode_frame(&Request::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        name: "raw".into(),
        software: "test".into(),
    }))
    .expect("encode");
    raw.write_all(&frame).await.expect("send hello");
    match read_frame::<Response, _>(raw).await.expect("hello back") {
        Some(Response::Hello(h)) => assert_eq!(h.name, "web-1"),
        other => panic!("expected Hello, got {other:?}"),
    }
}

async fn expect_error_then_close(raw: &mut RawTls) -> erel_proto::ErrorReply {
    let reply = match read_frame::<Response, _>(raw).await {
        Ok(Some(Response::Error(reply))) => reply,
        other => panic!("expected an error reply, got {other:?}"),
    };
    let next = read_frame::<Response, _>(raw).await;
    assert!(
        matches!(next, Ok(None) | Err(_)),
        "the agent closes after an undecodable frame: {next:?}"
    );
    reply
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_an_error_and_the_agent_keeps_serving() {
    let (pki, agent) = pki_and_agent("web-1", &[]);

    // Garbage after the handshake.
    let mut raw = raw_connection(&pki, &agent).await;
    hello(&mut raw).await;
    raw.write_all(&[0, 0, 0, 5, 0xde, 0xad, 0xbe, 0xef, 0x99])
        .await
        .expect("send garbage");
    let reply = expect_error_then_close(&mut raw).await;
    assert_eq!(reply.kind, ErrorKind::BadRequest);

    // An oversize frame is refused on its length alone.
    let mut raw = raw_connection(&pki, &agent).await;
    hello(&mut raw).await;
    raw.write_all(&[0xff, 0xff, 0xff, 0xff])
        .await
        .expect("send");
    let reply = expect_error_then_close(&mut raw).await;
    assert_eq!(reply.kind, ErrorKind::BadRequest);
    assert!(reply.message.contains("exceeds"), "{}", reply.message);

    // An unknown variant.
    let mut raw = raw_connection(&pki, &agent).await;
    hello(&mut raw).await;
    raw.write_all(&[0, 0, 0, 1, 42]).await.expect("send");
    let reply = expect_error_then_close(&mut raw).await;
    assert!(
        reply.message.contains("unknown variant"),
        "{}",
        reply.message
    );

    // Garbage instead of Hello.
    let mut raw = raw_connection(&pki, &agent).await;
    raw.write_all(b"GET / HTTP/1.1\r\n\r\n")
        .await
        .expect("send");
    let reply = expect_error_then_close(&mut raw).await;
    assert_eq!(reply.kind, ErrorKind::BadRequest);

    // Another protocol version.
    let mut raw = raw_connection(&pki, &agent).await;
    let frame = encode_frame(&Request::Hello(Hello {
        protocol: 2,
        name: "future".into(),
        software: "erel 9".into(),
    }))
    .expect("encode");
    raw.write_all(&frame).await.expect("send");
    match read_frame::<Response, _>(&mut raw).await {
        Ok(Some(Response::Error(reply))) => {
            assert_eq!(reply.kind, ErrorKind::VersionMismatch);
            assert!(reply.message.contains("protocol 1") && reply.message.contains('2'));
        }
        other => panic!("expected a version mismatch, got {other:?}"),
    }

    // Through all this, the agent serves others.
    let mut client = pki.connect(&agent).await;
    client.ping().await.expect("still serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_request_other_than_hello_and_a_second_hello_are_refused() {
    let (pki, agent) = pki_and_agent("web-1", &[]);

    // A command before Hello: refused, and the connection ends.
    let mut raw = raw_connection(&pki, &agent).await;
    let ping = encode_frame(&Request::Ping(Ping {})).expect("encode");
    raw.write_all(&ping).await.expect("send");
    let reply = expect_error_then_close(&mut raw).await;
    assert_eq!(reply.kind, ErrorKind::BadRequest);
    assert!(
        reply
            .message
            .contains("the first frame must be Hello, got Ping"),
        "{}",
        reply.message
    );

    // A second Hello: refused, and the connection goes on serving.
    let mut raw = raw_connection(&pki, &agent).await;
    hello(&mut raw).await;
    let again = encode_frame(&Request::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        name: "raw".into(),
        software: "test".into(),
    }))
    .expect("encode");
    raw.write_all(&again).await.expect("send");
    match read_frame::<Response, _>(&mut raw).await {
        Ok(Some(Response::Error(reply))) => {
            assert_eq!(reply.kind, ErrorKind::BadRequest);
            assert!(
                reply.message.contains("Hello was already exchanged"),
                "{}",
                reply.message
            );
        }
        other => panic!("expected an error reply, got {other:?}"),
    }
    raw.write_all(&ping).await.expect("send");
    match read_frame::<Response, _>(&mut raw).await {
        Ok(Some(Response::Pong(_))) => {}
        other => panic!("expected a Pong on the same connection, got {other:?}"),
    }
}

/// The agent's fixed bound on the wait for a master's `Hello` once TLS is up
/// (`HELLO_TIMEOUT` in the agent's server; not a flag).
const AGENT_HELLO_TIMEOUT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_that_never_sends_hello_is_cut_after_the_hello_timeout() {
    let (pki, agent) = pki_and_agent("web-1", &[]);
    let started = std::time::Instant::now();
    let mut raw = raw_connection(&pki, &agent).await;
    let end = tokio::time::timeout(
        AGENT_HELLO_TIMEOUT + PATIENCE,
        read_frame::<Response, _>(&mut raw),
    )
    .await
    .expect("the agent ends a connection that never says Hello");
    assert!(matches!(end, Ok(None) | Err(_)), "{end:?}");
    let waited = started.elapsed();
    assert!(
        waited >= AGENT_HELLO_TIMEOUT,
        "cut after {waited:?}, before the Hello timeout"
    );
    agent
        .log_showing("timed out waiting for Hello", PATIENCE)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_from_another_cluster_is_refused_with_a_clear_error() {
    let (pki, agent) = pki_and_agent("web-1", &[]);
    let other = Pki::new();
    let out = other
        .erel_at("ping", &agent)
        .output()
        .expect("run erel ping");
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("unreachable") && (text.contains("certificate") || text.contains("CA")),
        "{text}"
    );
    // Plain TCP garbage never reaches the command parser.
    let mut tcp = std::net::TcpStream::connect(agent.addr).expect("connect");
    tcp.write_all(&[0u8; 64]).expect("write");
    let mut buf = Vec::new();
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = tcp.read_to_end(&mut buf);
    let ok = pki.erel_at("ping", &agent).output().expect("run erel ping");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    let text = String::from_utf8_lossy(&ok.stdout);
    assert!(text.contains("web-1") && text.contains(" ok "), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_json_reports_everything() {
    let (pki, agent) = pki_and_agent("web-1", &[]);
    beat_answering(&pki, &agent, "0.1.0").await;
    let out = pki
        .erel()
        .args(["ping", "--json"])
        .arg(agent.host().to_string())
        .arg("web-9@127.0.0.1:1")
        .output()
        .expect("run erel ping");
    assert!(!out.status.success(), "one host is unreachable");
    let reports: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(reports[0]["reachable"], true);
    assert_eq!(reports[0]["agent"]["host_id"], "web-1");
    assert_eq!(reports[0]["agent"]["releases"][0]["name"], "beat");
    assert_eq!(reports[0]["agent"]["releases"][0]["state"], "running");
    assert_eq!(reports[1]["reachable"], false);
    assert!(reports[1]["error"]
        .as_str()
        .expect("error text")
        .contains("127.0.0.1:1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_master_is_refused_without_restarting_the_agent_and_a_new_one_gets_in() {
    let (pki, agent) = pki_and_agent("web-1", &[]);
    let agent_pid = agent.pid();
    let mut client = pki.connect(&agent).await;
    client.ping().await.expect("ping before");

    // Revoking rewrites crl.pem in every host bundle; the running agent picks it up for
    // new connections.
    pki.master.revoke("master").expect("revoke");
    let refused = erel_master::client::Connector::new(pki.client_config(), "m")
        .connect(&agent.host())
        .await
        .map(|_| ())
        .unwrap_err();
    let text = refused.to_string();
    assert!(text.contains("revoked"), "{text}");
    assert!(
        matches!(refused, erel_master::Error::Tls { .. }),
        "an authentication error, not an I/O one: {refused:?}"
    );

    // A new master certificate from the same CA is accepted, by the same agent process.
    pki.master.reissue_master().expect("reissue");
    let mut client = pki.connect(&agent).await;
    client.ping().await.expect("ping with the new certificate");
    assert_eq!(agent.pid(), agent_pid, "no restart was needed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_versions_and_their_archives_are_removed_beyond_the_kept_ones() {
    let (pki, agent) = pki_and_agent("web-1", &["--keep-versions", "1"]);
    for version in ["1", "2", "3"] {
        beat_answering(&pki, &agent, version).await;
    }
    // Removed after the `Started` answer, in the background: waited for.
    let archive_1 = agent.root.join("archives/beat-1.tar.gz");
    let pruned = poll_until(PATIENCE, || async {
        let status = release_status(&pki, &agent, "beat").await.expect("known");
        (status.versions.len() < 3 && !archive_1.exists()).then_some(status)
    })
    .await
    .expect("version 1 removed in time");
    assert_eq!(pruned.version.as_deref(), Some("3"));
    assert_eq!(
        pruned.versions,
        vec!["2".to_string(), "3".to_string()],
        "the running version and one other are kept"
    );
    assert!(!agent.root.join("releases/beat/1").exists());
    assert!(
        !agent.root.join("archives/beat-1.tar.gz").exists(),
        "the archive version 1 came from is removed too"
    );
    assert!(agent.root.join("archives/beat-2.tar.gz").exists());
}

/// Sends `request` after a Hello on a fresh connection and returns the agent's first
/// answer (`None` when it closed instead).
async fn one_request(pki: &Pki, agent: &AgentProc, request: &Request) -> Option<Response> {
    let mut raw = raw_connection(pki, agent).await;
    hello(&mut raw).await;
    raw.write_all(&encode_frame(request).expect("encode"))
        .await
        .expect("send");
    tokio::time::timeout(Duration::from_secs(30), read_frame::<Response, _>(&mut raw))
        .await
        .expect("answered in time")
        .ok()
        .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_at_the_edges_of_every_field_are_answered_without_a_panic() {
    let (pki, agent) = pki_and_agent("web-1", &[]);
    let start = |name: &str, version: &str, argv: &[&str]| Start {
        name: name.into(),
        version: version.into(),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: Vec::new(),
        user: None,
    };
    let mut requests = Vec::new();
    for size in [0, 1, u64::MAX, u64::MAX - 1, 1 << 63] {
        for path in ["f", "", ".", "/", "a/", "a//b", "é", "\u{0}", "..", ".erel"] {
            for mode in [0, 0o644, 0o777, 0o1000, u32::MAX] {
                requests.push(Request::WriteFile(WriteFile {
                    path: path.into(),
                    mode,
                    size,
                    sha256: (size == 1).then_some(erel_proto::Sha256([0; 32])),
                }));
            }
        }
    }
    for (archive, dest) in [
        ("", ""),
        ("a", "a"),
        (".", "x"),
        ("x", "."),
        ("x", ""),
        ("\u{0}", "x"),
        ("releases", "releases/x"),
        ("x", "releases/x/.."),
    ] {
        requests.push(Request::Unpack(erel_proto::Unpack {
            archive: archive.into(),
            dest: dest.into(),
            sha256: None,
        }));
    }
    for (name, version, argv) in [
        ("", "", &[][..]),
        ("a", "1", &[][..]),
        ("a", "1", &[""][..]),
        ("a", "1", &["/bin/sh"][..]),
        ("a", "1", &["../x"][..]),
        ("a", "1", &["\u{0}"][..]),
        ("a", "1", &["bin/a", "\u{0}"][..]),
        (".", ".", &["x"][..]),
        ("..", "1", &["x"][..]),
        ("a", "é", &["x"][..]),
    ] {
        requests.push(Request::Start(start(name, version, argv)));
    }
    for (key, value) in [
        ("", "v"),
        ("=", "v"),
        ("K", "\u{0}"),
        ("\u{0}", "v"),
        ("K=V", ""),
    ] {
        let mut request = start("a", "1", &["bin/a"]);
        request.env = vec![(key.into(), value.into())];
        requests.push(Request::Start(request));
    }
    for user in ["", "root:x", "\u{0}", "4294967295", "-1", "0"] {
        let mut request = start("a", "1", &["bin/a"]);
        request.user = Some(user.into());
        requests.push(Request::Start(request));
    }
    for (name, grace_ms) in [("", 0), ("a", u64::MAX), ("é", 1), ("\u{0}", 1), (".", 1)] {
        requests.push(Request::Stop(erel_proto::Stop {
            name: name.into(),
            grace_ms,
        }));
    }
    requests.push(Request::Hello(Hello {
        protocol: u32::MAX,
        name: "é".repeat(1000),
        software: String::new(),
    }));
    for request in &requests {
        let answer = one_request(&pki, &agent, request).await;
        assert!(
            !agent.log().contains("panicked"),
            "{request:?} -> {answer:?}; agent log:\n{}",
            agent.log()
        );
    }
    let mut client = pki.connect(&agent).await;
    client.ping().await.expect("still serving");
    assert!(!agent.log().contains("panicked"), "{}", agent.log());
}

/// An agent reached under another host id is refused, and the error names what its
/// certificate does name in the operator's spelling (`DNS:web-1, IP:127.0.0.1`, as
/// `openssl x509 -text` shows a subjectAltName), never a library's debug form.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_reached_under_another_name_is_refused_naming_its_certificate_names() {
    let (pki, agent) = pki_and_agent("web-1", &[]);
    let out = pki
        .erel()
        .arg("ping")
        .arg(format!("web-2@{}", agent.addr))
        .output()
        .expect("run erel ping");
    let text = crate::helper::output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("does not name host 'web-2' (it names DNS:web-1, IP:127.0.0.1)"),
        "{text}"
    );
    assert!(
        !text.contains("DnsName(") && !text.contains("IpAddress("),
        "{text}"
    );
}
