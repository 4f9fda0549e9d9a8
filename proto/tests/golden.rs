//! Golden byte files freeze protocol v1.
//!
//! Every message variant has a file under `tests/golden/` holding its postcard body. The
//! tests check that each sample encodes to exactly those bytes and that the bytes decode
//! back to the sample. A change to the wire format makes them fail; the files change only
//! through `regenerate_golden_files` (ignored), and the commit that does it says why.

use std::collections::BTreeSet;
use std::path::PathBuf;

use erel_proto::*;

mod common;
use common::ALL_ERROR_KINDS;

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn digest(byte: u8) -> Sha256 {
    Sha256([byte; 32])
}

/// The file name of a request variant. No catch-all: a new variant does not compile
/// until it has a golden sample here.
fn request_name(request: &Request) -> &'static str {
    match request {
        Request::Hello(_) => "request_hello",
        Request::Ping(_) => "request_ping",
        Request::WriteFile(_) => "request_write_file",
        Request::Unpack(_) => "request_unpack",
        Request::Start(_) => "request_start",
        Request::Stop(_) => "request_stop",
    }
}

fn response_name(response: &Response) -> &'static str {
    match response {
        Response::Hello(_) => "response_hello",
        Response::Pong(_) => "response_pong",
        Response::WriteOffer(_) => "response_write_offer",
        Response::Written(_) => "response_written",
        Response::Unpacked(_) => "response_unpacked",
        Response::Started(_) => "response_started",
        Response::Stopped(_) => "response_stopped",
        Response::Error(_) => "response_error",
    }
}

fn state_name(state: &ReleaseState) -> &'static str {
    match state {
        ReleaseState::Stopped => "release_state_stopped",
        ReleaseState::Running => "release_state_running",
        ReleaseState::Exited { .. } => "release_state_exited",
        ReleaseState::CrashLooping => "release_state_crash_looping",
    }
}

fn error_kind_name(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::BadRequest => "error_kind_bad_request",
        ErrorKind::VersionMismatch => "error_kind_version_mismatch",
        ErrorKind::InvalidPath => "error_kind_invalid_path",
        ErrorKind::NotFound => "error_kind_not_found",
        ErrorKind::Conflict => "error_kind_conflict",
        ErrorKind::ChecksumMismatch => "error_kind_checksum_mismatch",
        ErrorKind::TooLarge => "error_kind_too_large",
        ErrorKind::NoSpace => "error_kind_no_space",
        ErrorKind::UnsafeArchive => "error_kind_unsafe_archive",
        ErrorKind::BadArchive => "error_kind_bad_archive",
        ErrorKind::SpawnFailed => "error_kind_spawn_failed",
        ErrorKind::Timeout => "error_kind_timeout",
        ErrorKind::Busy => "error_kind_busy",
        ErrorKind::Io => "error_kind_io",
        ErrorKind::Internal => "error_kind_internal",
    }
}

fn sample_status(state: ReleaseState) -> ReleaseStatus {
    ReleaseStatus {
        name: "beat".into(),
        versions: vec!["0.1.0".into(), "0.2.0".into()],
        version: Some("0.2.0".into()),
        desired_running: true,
        pid: Some(4242),
        state,
        restarts: 3,
        up_secs: Some(61),
        output_tail: "listening on 27182\n".into(),
    }
}

/// Checks that raw bytes decode to the sample they were made from.
type RoundTrip = Box<dyn Fn(&[u8]) -> bool>;

/// One golden sample: a file name and the encoder/decoder check for it.
struct Case {
    name: &'static str,
    bytes: Vec<u8>,
    roundtrip: RoundTrip,
}

fn case<T>(name: &'static str, value: T) -> Case
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug + 'static,
{
    let bytes = encode_body(&value).expect("encode");
    Case {
        name,
        bytes,
        roundtrip: Box::new(move |raw| decode_body::<T>(raw).ok().as_ref() == Some(&value)),
    }
}

fn cases() -> Vec<Case> {
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        name: "web-1".into(),
        software: "erel-boot 0.1.0".into(),
    };
    let requests = vec![
        Request::Hello(Hello {
            name: "master-a".into(),
            software: "erel 0.1.0".into(),
            ..hello.clone()
        }),
        Request::Ping(Ping {}),
        Request::WriteFile(WriteFile {
            path: "archives/beat-0.2.0.tar.gz".into(),
            mode: 0o644,
            size: 1_048_576,
            sha256: Some(digest(0xab)),
        }),
        Request::Unpack(Unpack {
            archive: "archives/beat-0.2.0.tar.gz".into(),
            dest: "releases/beat/0.2.0".into(),
            sha256: Some(digest(0xab)),
        }),
        Request::Start(Start {
            name: "beat".into(),
            version: "0.2.0".into(),
            argv: vec!["bin/beat".into(), "foreground".into()],
            env: vec![("NODE_NAME".into(), "beat".into())],
            user: Some("beat".into()),
        }),
        Request::Stop(Stop {
            name: "beat".into(),
            grace_ms: 10_000,
        }),
    ];
    let responses = vec![
        Response::Hello(hello),
        Response::Pong(Pong {
            host_id: "web-1".into(),
            agent_version: "0.1.0".into(),
            uptime_secs: 3600,
            free_disk_bytes: 10 * 1024 * 1024 * 1024,
            releases: vec![sample_status(ReleaseState::Running)],
        }),
        Response::WriteOffer(WriteOffer {
            have: 65536,
            have_sha256: digest(0x11),
        }),
        Response::Written(Written {
            sha256: digest(0xab),
            size: 1_048_576,
            received: 983_040,
        }),
        Response::Unpacked(Unpacked {
            sha256: digest(0xab),
            entries: 120,
            bytes: 5_000_000,
            already: false,
        }),
        Response::Started(Started {
            pid: 4242,
            already_running: false,
        }),
        Response::Stopped(Stopped {
            was_running: true,
            killed: false,
        }),
        Response::Error(ErrorReply::new(
            ErrorKind::UnsafeArchive,
            "entry '../etc/passwd' escapes the destination",
        )),
    ];
    let states = vec![
        ReleaseState::Stopped,
        ReleaseState::Running,
        ReleaseState::Exited {
            code: Some(1),
            signal: None,
        },
        ReleaseState::CrashLooping,
    ];

    let mut out = Vec::new();
    for request in requests {
        out.push(case(request_name(&request), request));
    }
    for response in responses {
        out.push(case(response_name(&response), response));
    }
    for state in states {
        out.push(case(state_name(&state), sample_status(state)));
    }
    for kind in ALL_ERROR_KINDS {
        out.push(case(
            error_kind_name(kind),
            ErrorReply::new(kind, format!("sample {kind}")),
        ));
    }
    out.push(case("write_begin", WriteBegin { offset: 65536 }));
    out.push(case(
        "write_commit",
        WriteCommit {
            sha256: digest(0xab),
        },
    ));
    out
}

#[test]
fn every_variant_matches_its_golden_file() {
    for case in cases() {
        let path = golden_dir().join(format!("{}.bin", case.name));
        let golden = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; run `cargo test -p erel-proto --test golden -- --ignored` to create it",
                path.display()
            )
        });
        assert_eq!(
            case.bytes, golden,
            "{} no longer encodes to its golden bytes: protocol v1 is frozen",
            case.name
        );
        assert!(
            (case.roundtrip)(&golden),
            "{}: golden bytes no longer decode to the sample",
            case.name
        );
    }
}

#[test]
fn golden_directory_holds_exactly_the_known_variants() {
    let expected: BTreeSet<String> = cases().iter().map(|c| format!("{}.bin", c.name)).collect();
    let present: BTreeSet<String> = std::fs::read_dir(golden_dir())
        .expect("golden dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(expected, present);
}

#[test]
fn samples_cover_every_variant_index() {
    // Variants are encoded as their index. Each enum's samples must cover every index
    // that decodes, and the next index must be unknown: a variant appended without a
    // golden sample fails here.
    fn decodable_indices<T: serde::de::DeserializeOwned>(sample_tail: &[u8]) -> usize {
        (0u8..=127)
            .take_while(|i| {
                let mut body = vec![*i];
                body.extend_from_slice(sample_tail);
                // Only the variant index matters: unit variants decode from [i], others
                // fail on the tail but with a different error than an unknown variant.
                !matches!(
                    postcard::from_bytes::<T>(&body),
                    Err(postcard::Error::SerdeDeCustom)
                )
            })
            .count()
    }
    assert_eq!(decodable_indices::<ErrorKind>(&[]), ALL_ERROR_KINDS.len());
    assert_eq!(decodable_indices::<ReleaseState>(&[]), 4);
    assert_eq!(decodable_indices::<Request>(&[]), 6);
    assert_eq!(decodable_indices::<Response>(&[]), 8);
}

#[test]
fn known_frame_bytes() {
    // A hand-checked frame: Request::Ping is variant 1 with an empty struct, so the body
    // is the single byte 0x01 and the length prefix is 00 00 00 01.
    let frame = encode_frame(&Request::Ping(Ping {})).expect("encode");
    assert_eq!(frame, vec![0, 0, 0, 1, 1]);
    let begin = encode_frame(&WriteBegin { offset: 300 }).expect("encode");
    assert_eq!(begin, vec![0, 0, 0, 2, 0xac, 0x02]);
}

#[test]
#[ignore = "rewrites the golden files; run only for a deliberate, explained format change"]
fn regenerate_golden_files() {
    std::fs::create_dir_all(golden_dir()).expect("create golden dir");
    for case in cases() {
        let path = golden_dir().join(format!("{}.bin", case.name));
        std::fs::write(&path, &case.bytes).expect("write golden file");
    }
}
