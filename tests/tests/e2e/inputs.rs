//! Hostile and oversized strings in every request, over the wire: each is refused with
//! the error kind that fits and a message naming the limit, never a panic, and the
//! answer always fits in one frame (an input is quoted by its start and length).

use std::path::Path;
use std::time::Duration;

use erel_master::client::WriteSource;
use erel_master::{AgentClient, Error};
use erel_proto::{ErrorKind, Start};

use crate::helper::install::{no_progress, start_request, with_digest, without_digest};
use crate::helper::pki_and_agent;
use crate::helper::release::{sha256, shell_release};
use crate::helper::AgentCommands;

/// `a` followed by `n` copies of `é` (two bytes each).
fn a_and_e(n: usize) -> String {
    format!("a{}", "é".repeat(n))
}

/// Checks `err` is the agent's refusal of `kind` and that its message holds every one
/// of `needles` and no sign of a panic; the message stays short however long the input.
fn assert_refused(err: &Error, kind: ErrorKind, needles: &[&str]) {
    assert_eq!(err.agent_kind(), Some(kind), "{err}");
    let text = err.to_string();
    for needle in needles {
        assert!(text.contains(needle), "'{needle}' missing from: {text}");
    }
    assert!(!text.contains("panicked"), "{text}");
    assert!(text.len() < 1024, "{} bytes: {text}", text.len());
}

/// A small file to push, `app.tar`, in a new temporary directory.
fn some_bytes() -> (tempfile::TempDir, std::path::PathBuf) {
    let work = tempfile::tempdir().expect("tempdir");
    let file = work.path().join("app.tar");
    std::fs::write(&file, b"some bytes").expect("write");
    (work, file)
}

async fn push(client: &mut AgentClient, file: &Path, dest: &str) -> Result<u64, Error> {
    client
        .write_file(&without_digest(file), dest, 0o644, &mut no_progress())
        .await
        .map(|written| written.size)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_of_a_and_600_e_is_an_invalid_path_naming_the_1024_byte_limit() {
    let (pki, agent) = pki_and_agent("web-1", &[]);
    let (work, file) = some_bytes();
    let dest = a_and_e(600);
    assert_eq!(dest.len(), 1201);

    let mut client = pki.connect(&agent).await;
    let err = push(&mut client, &file, &dest).await.unwrap_err();
    assert_refused(&err, ErrorKind::InvalidPath, &["1201 bytes", "1024 bytes"]);
    // The quotation starts with the input itself, cut on a character boundary.
    assert!(err.to_string().contains("aéééé"), "{err}");
    client.ping().await.expect("the connection still serves");

    // The same through the command line.
    let out = pki
        .erel()
        .env("XDG_CACHE_HOME", work.path().join("cache"))
        .arg("push")
        .arg(agent.host().to_string())
        .arg(&file)
        .arg(&dest)
        .output()
        .expect("run erel push");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("invalid path") && stderr.contains("1024 bytes"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        !agent.log().contains("panicked"),
        "agent log:\n{}",
        agent.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_over_each_limit_are_refused_in_write_file_and_unpack_and_accepted_at_it() {
    let (pki, agent) = pki_and_agent("web-1", &[]);
    let (work, file) = some_bytes();
    let mut client = pki.connect(&agent).await;

    // Over the whole-path limit, with a character across byte 1024 and across byte 64.
    let over = format!("dir/{}", "é".repeat(511)); // 1026 bytes
    let err = push(&mut client, &file, &over).await.unwrap_err();
    assert_refused(&err, ErrorKind::InvalidPath, &["1026 bytes", "1024 bytes"]);

    // A component over NAME_MAX (255 bytes): refused by name, not an I/O error.
    let long_component = format!("dir/{}", a_and_e(128)); // 257-byte component
    let err = push(&mut client, &file, &long_component).await.unwrap_err();
    assert_refused(&err, ErrorKind::InvalidPath, &["257 bytes", "255 bytes"]);

    // Exactly at both limits, multi-byte: accepted, and the name arrives intact.
    let c = a_and_e(127); // 255 bytes
    let at_limit = format!("{c}/{c}/{c}/{}/a", "é".repeat(127));
    assert_eq!(at_limit.len(), 1024);
    let size = push(&mut client, &file, &at_limit)
        .await
        .expect("a 1024-byte path of 255-byte components is accepted");
    assert_eq!(size, 10);
    assert_eq!(
        std::fs::read(agent.root.join(&at_limit)).expect("written"),
        b"some bytes"
    );

    // Unpack: the archive and the destination are held to the same limits.
    let tarball = shell_release(work.path(), "app", "1", "#!/bin/sh\nsleep 60\n");
    client
        .write_file(
            &with_digest(&tarball),
            "archives/app-1.tar.gz",
            0o644,
            &mut no_progress(),
        )
        .await
        .expect("push archive");
    let err = client
        .unpack(&a_and_e(600), "releases/app/1", None)
        .await
        .unwrap_err();
    assert_refused(&err, ErrorKind::InvalidPath, &["1201 bytes", "1024 bytes"]);
    let err = client
        .unpack("archives/app-1.tar.gz", &a_and_e(600), None)
        .await
        .unwrap_err();
    assert_refused(&err, ErrorKind::InvalidPath, &["1201 bytes", "1024 bytes"]);
    let err = client
        .unpack(
            "archives/app-1.tar.gz",
            &format!("x/{}", a_and_e(200)),
            None,
        )
        .await
        .unwrap_err();
    assert_refused(&err, ErrorKind::InvalidPath, &["401 bytes", "255 bytes"]);
    assert!(!agent.root.join("releases/app/1").exists());
    client.ping().await.expect("the connection still serves");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_names_argv_and_users_are_refused_in_start_and_stop() {
    let (pki, agent) = pki_and_agent("web-1", &[]);
    let work = tempfile::tempdir().expect("tempdir");
    let mut client = pki.connect(&agent).await;
    let tarball = shell_release(work.path(), "app", "1", "#!/bin/sh\nsleep 60\n");
    let digest = sha256(&tarball);
    client
        .write_file(
            &WriteSource {
                path: tarball,
                sha256: Some(digest),
                sha256_of: None,
            },
            "archives/app-1.tar.gz",
            0o644,
            &mut no_progress(),
        )
        .await
        .expect("push");
    client
        .unpack("archives/app-1.tar.gz", "releases/app/1", Some(digest))
        .await
        .expect("unpack");

    let app = || start_request("app", "1", &[]);
    let refused: Vec<(Start, ErrorKind, &[&str])> = vec![
        // Release name and version: 128 bytes at most.
        (
            start_request(&a_and_e(600), "1", &[]),
            ErrorKind::InvalidPath,
            &["release name", "1201 bytes", "128 bytes"],
        ),
        (
            start_request("app", &a_and_e(600), &[]),
            ErrorKind::InvalidPath,
            &["release version", "1201 bytes", "128 bytes"],
        ),
        (
            start_request(&"a".repeat(129), "1", &[]),
            ErrorKind::InvalidPath,
            &["129 bytes", "128 bytes"],
        ),
        // Multi-byte within the length limit is refused for its characters, not cut.
        (
            start_request("app", &"é".repeat(64), &[]),
            ErrorKind::InvalidPath,
            &["letters, digits"],
        ),
        // The program is a path under the version directory.
        (
            Start {
                argv: vec![format!("bin/{}", a_and_e(600)), "x".into()],
                ..app()
            },
            ErrorKind::InvalidPath,
            &["1205 bytes", "1024 bytes"],
        ),
        (
            Start {
                argv: vec![format!("bin/{}", a_and_e(300))],
                ..app()
            },
            ErrorKind::InvalidPath,
            &["601 bytes", "255 bytes"],
        ),
        // A user name longer than any system allows.
        (
            Start {
                user: Some(a_and_e(600)),
                ..app()
            },
            ErrorKind::SpawnFailed,
            &["user name", "1201 bytes", "255 bytes"],
        ),
        (
            Start {
                user: Some("é".repeat(100)),
                ..app()
            },
            ErrorKind::SpawnFailed,
            &["unknown user"],
        ),
        // An environment name that cannot be one, quoted short.
        (
            Start {
                env: vec![(format!("{}=", "é".repeat(20_000)), "v".into())],
                ..app()
            },
            ErrorKind::BadRequest,
            &["environment variable"],
        ),
    ];
    for (request, kind, needles) in refused {
        let err = client.start(request).await.unwrap_err();
        assert_refused(&err, kind, needles);
    }

    // Nothing of the above was recorded or started.
    assert!(agent.release_pids("app").is_empty());

    // Stop names the same limit.
    let err = client
        .stop(&a_and_e(600), Duration::from_secs(1))
        .await
        .unwrap_err();
    assert_refused(&err, ErrorKind::InvalidPath, &["1201 bytes", "128 bytes"]);
    let at_limit = client
        .stop(&"a".repeat(128), Duration::from_secs(1))
        .await
        .expect("a 128-byte name is accepted");
    assert!(!at_limit.was_running);
    client.ping().await.expect("the connection still serves");
    assert!(
        !agent.log().contains("panicked"),
        "agent log:\n{}",
        agent.log()
    );
}

/// A GNU long-name (`L`) or long-link (`K`) record carrying `value` for the entry
/// that follows it.
fn gnu_long(out: &mut Vec<u8>, kind: tar::EntryType, value: &[u8]) {
    let mut long = tar::Header::new_gnu();
    long.set_entry_type(kind);
    long.as_gnu_mut().expect("gnu").name[..13].copy_from_slice(b"././@LongLink");
    long.set_size(value.len() as u64 + 1);
    long.set_mode(0o644);
    long.set_cksum();
    out.extend_from_slice(long.as_bytes());
    let mut padded = value.to_vec();
    padded.push(0);
    padded.resize(padded.len().div_ceil(512) * 512, 0);
    out.extend_from_slice(&padded);
}

/// An entry of `kind` with a short stored name and `data`.
fn plain(out: &mut Vec<u8>, kind: tar::EntryType, name: &[u8], data: &[u8]) {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.as_gnu_mut().expect("gnu").name[..name.len()].copy_from_slice(name);
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    out.extend_from_slice(header.as_bytes());
    let mut body = data.to_vec();
    body.resize(body.len().div_ceil(512) * 512, 0);
    out.extend_from_slice(&body);
}

/// A regular file named `name` (through a GNU long name) holding `data`.
fn long_name_entry(out: &mut Vec<u8>, name: &[u8], data: &[u8]) {
    gnu_long(out, tar::EntryType::GNULongName, name);
    plain(out, tar::EntryType::Regular, b"short", data);
}

/// An archive of one regular file named `name` (through a GNU long name).
fn long_named_file(name: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    long_name_entry(&mut out, name, b"x");
    finish(out)
}

fn finish(mut out: Vec<u8>) -> Vec<u8> {
    out.extend_from_slice(&[0u8; 1024]);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_entries_with_long_or_multibyte_names_are_refused_by_kind() {
    let (pki, agent) = pki_and_agent("web-1", &[]);
    let work = tempfile::tempdir().expect("tempdir");
    let mut client = pki.connect(&agent).await;

    let cases: Vec<(&str, Vec<u8>, ErrorKind, Vec<String>)> = vec![
        (
            // 200 KB of name, then an escape: the refusal quotes it short enough to be
            // answered at all (the whole name would not fit in a frame).
            "escape",
            {
                let mut name = "é/".repeat(70_000).into_bytes();
                name.extend_from_slice(b"../../x");
                long_named_file(&name)
            },
            ErrorKind::UnsafeArchive,
            vec!["'..'".into(), "210007 bytes".into()],
        ),
        (
            // A component over NAME_MAX: refused by name, not an I/O error.
            "component",
            long_named_file(format!("dir/{}", a_and_e(200)).as_bytes()),
            ErrorKind::UnsafeArchive,
            vec!["401 bytes".into(), "255 bytes".into()],
        ),
        (
            // A device with a long multi-byte name.
            "device",
            {
                let mut out = Vec::new();
                let name = format!("dev/{}fifo", "éé/".repeat(1000));
                gnu_long(&mut out, tar::EntryType::GNULongName, name.as_bytes());
                plain(&mut out, tar::EntryType::Fifo, b"fifo", b"");
                finish(out)
            },
            ErrorKind::UnsafeArchive,
            vec!["fifos are refused".into(), "5008 bytes".into()],
        ),
        (
            // Short components, but deeper than any path the system takes.
            "deep",
            long_named_file(format!("{}x", "d/".repeat(2100)).as_bytes()),
            ErrorKind::UnsafeArchive,
            vec!["4201 bytes".into(), "4095 bytes (PATH_MAX)".into()],
        ),
        (
            // A symlink whose target no system call takes.
            "target",
            {
                let mut out = Vec::new();
                gnu_long(
                    &mut out,
                    tar::EntryType::GNULongLink,
                    "é/".repeat(2000).as_bytes(),
                );
                plain(&mut out, tar::EntryType::Symlink, b"link", b"");
                finish(out)
            },
            ErrorKind::UnsafeArchive,
            vec![
                "symlink target of 6000 bytes".into(),
                "4095 bytes (PATH_MAX)".into(),
            ],
        ),
    ];
    for (label, bytes, kind, needles) in cases {
        let path = work.path().join(format!("{label}.tar"));
        std::fs::write(&path, &bytes).expect("write archive");
        let archive = format!("archives/{label}.tar");
        push(&mut client, &path, &archive)
            .await
            .unwrap_or_else(|e| panic!("{label}: push: {e}"));
        let dest = format!("releases/{label}/1");
        let err = client.unpack(&archive, &dest, None).await.unwrap_err();
        let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
        assert_refused(&err, kind, &needles);
        assert!(!agent.root.join(&dest).exists(), "{label}");
        client.ping().await.expect("the connection still serves");
    }
}
