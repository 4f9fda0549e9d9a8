//! The frame codec: round trips for every message, and every way a frame can be bad.

use erel_proto::*;
use proptest::prelude::*;

mod common;
use common::ALL_ERROR_KINDS;

fn arb_digest() -> impl Strategy<Value = Sha256> {
    any::<[u8; 32]>().prop_map(Sha256)
}

fn arb_text() -> impl Strategy<Value = String> {
    ".{0,40}"
}

fn arb_hello() -> impl Strategy<Value = Hello> {
    (any::<u32>(), arb_text(), arb_text()).prop_map(|(protocol, name, software)| Hello {
        protocol,
        name,
        software,
    })
}

fn arb_state() -> impl Strategy<Value = ReleaseState> {
    prop_oneof![
        Just(ReleaseState::Stopped),
        Just(ReleaseState::Running),
        (any::<Option<i32>>(), any::<Option<i32>>())
            .prop_map(|(code, signal)| ReleaseState::Exited { code, signal }),
        Just(ReleaseState::CrashLooping),
    ]
}

fn arb_status() -> impl Strategy<Value = ReleaseStatus> {
    (
        arb_text(),
        prop::collection::vec(arb_text(), 0..4),
        any::<Option<String>>(),
        any::<bool>(),
        any::<Option<u32>>(),
        arb_state(),
        any::<u32>(),
        any::<Option<u64>>(),
        ".{0,200}",
    )
        .prop_map(
            |(name, versions, version, desired_running, pid, state, restarts, up_secs, tail)| {
                ReleaseStatus {
                    name,
                    versions,
                    version,
                    desired_running,
                    pid,
                    state,
                    restarts,
                    up_secs,
                    output_tail: tail,
                }
            },
        )
}

fn arb_kind() -> impl Strategy<Value = ErrorKind> {
    prop::sample::select(ALL_ERROR_KINDS.to_vec())
}

fn arb_request() -> impl Strategy<Value = Request> {
    prop_oneof![
        arb_hello().prop_map(Request::Hello),
        Just(Request::Ping(Ping {})),
        (
            arb_text(),
            any::<u32>(),
            any::<u64>(),
            prop::option::of(arb_digest())
        )
            .prop_map(|(path, mode, size, sha256)| Request::WriteFile(WriteFile {
                path,
                mode,
                size,
                sha256
            })),
        (arb_text(), arb_text(), prop::option::of(arb_digest())).prop_map(
            |(archive, dest, sha256)| Request::Unpack(Unpack {
                archive,
                dest,
                sha256
            })
        ),
        (
            arb_text(),
            arb_text(),
            prop::collection::vec(arb_text(), 0..5),
            prop::collection::vec((arb_text(), arb_text()), 0..5),
            any::<Option<String>>()
        )
            .prop_map(|(name, version, argv, env, user)| Request::Start(Start {
                name,
                version,
                argv,
                env,
                user
            })),
        (arb_text(), any::<u64>())
            .prop_map(|(name, grace_ms)| Request::Stop(Stop { name, grace_ms })),
    ]
}

fn arb_response() -> impl Strategy<Value = Response> {
    prop_oneof![
        arb_hello().prop_map(Response::Hello),
        (
            arb_text(),
            arb_text(),
            any::<u64>(),
            any::<u64>(),
            prop::collection::vec(arb_status(), 0..4)
        )
            .prop_map(
                |(host_id, agent_version, uptime_secs, free_disk_bytes, releases)| {
                    Response::Pong(Pong {
                        host_id,
                        agent_version,
                        uptime_secs,
                        free_disk_bytes,
                        releases,
                    })
                }
            ),
        (any::<u64>(), arb_digest())
            .prop_map(|(have, have_sha256)| Response::WriteOffer(WriteOffer { have, have_sha256 })),
        (arb_digest(), any::<u64>(), any::<u64>()).prop_map(|(sha256, size, received)| {
            Response::Written(Written {
                sha256,
                size,
                received,
            })
        }),
        (arb_digest(), any::<u64>(), any::<u64>(), any::<bool>()).prop_map(
            |(sha256, entries, bytes, already)| Response::Unpacked(Unpacked {
                sha256,
                entries,
                bytes,
                already
            })
        ),
        (any::<u32>(), any::<bool>()).prop_map(|(pid, already_running)| Response::Started(
            Started {
                pid,
                already_running
            }
        )),
        (any::<bool>(), any::<bool>()).prop_map(|(was_running, killed)| Response::Stopped(
            Stopped {
                was_running,
                killed
            }
        )),
        (arb_kind(), arb_text())
            .prop_map(|(kind, message)| Response::Error(ErrorReply { kind, message })),
    ]
}

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(future)
}

/// `message` framed and read back: what was decoded, and how many bytes of the
/// frame were left over.
fn read_back<T: serde::Serialize + serde::de::DeserializeOwned>(message: &T) -> (Option<T>, usize) {
    let frame = encode_frame(message).expect("encode");
    let mut reader = &frame[..];
    let decoded = block_on(read_frame(&mut reader)).expect("decode");
    (decoded, reader.len())
}

proptest! {
    #[test]
    fn requests_round_trip(request in arb_request()) {
        let (decoded, left_over) = read_back(&request);
        prop_assert_eq!(decoded, Some(request));
        prop_assert_eq!(left_over, 0);
    }

    #[test]
    fn responses_round_trip(response in arb_response()) {
        let (decoded, _) = read_back(&response);
        prop_assert_eq!(decoded, Some(response));
    }

    #[test]
    fn transfer_frames_round_trip(offset in any::<u64>(), sha in arb_digest()) {
        let begin = WriteBegin { offset };
        let body = encode_body(&begin).expect("encode");
        prop_assert_eq!(decode_body::<WriteBegin>(&body).expect("decode"), begin);
        let commit = WriteCommit { sha256: sha };
        let body = encode_body(&commit).expect("encode");
        prop_assert_eq!(decode_body::<WriteCommit>(&body).expect("decode"), commit);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = decode_body::<Request>(&bytes);
        let _ = decode_body::<Response>(&bytes);
    }

    #[test]
    fn sha_hex_round_trips(sha in arb_digest()) {
        prop_assert_eq!(Sha256::from_hex(&sha.to_hex()), Some(sha));
    }
}

#[tokio::test]
async fn clean_close_between_frames_is_not_an_error() {
    let mut empty: &[u8] = &[];
    let got: Option<Request> = read_frame(&mut empty).await.expect("clean close");
    assert_eq!(got, None);
}

#[tokio::test]
async fn truncated_prefix_is_an_error() {
    let mut short: &[u8] = &[0, 0];
    let err = read_frame::<Request, _>(&mut short).await.unwrap_err();
    assert!(
        matches!(err, FrameError::Truncated { got: 2, want: 4 }),
        "{err}"
    );
}

#[tokio::test]
async fn truncated_body_is_an_error() {
    let frame = encode_frame(&Request::Stop(Stop {
        name: "beat".into(),
        grace_ms: 5000,
    }))
    .expect("encode");
    let mut cut = &frame[..frame.len() - 2];
    let err = read_frame::<Request, _>(&mut cut).await.unwrap_err();
    assert!(matches!(err, FrameError::Truncated { .. }), "{err}");
    assert!(err.to_string().contains("closed in the middle"), "{err}");
}

#[tokio::test]
async fn oversize_length_is_refused_before_reading_the_body() {
    // Announce 4 GiB - 1 and send nothing more: the reader must refuse on the prefix
    // alone, without allocating or waiting for the body.
    let mut frame: &[u8] = &[0xff, 0xff, 0xff, 0xff];
    let err = read_frame::<Request, _>(&mut frame).await.unwrap_err();
    match err {
        FrameError::TooLarge { len, max } => {
            assert_eq!(len, u64::from(u32::MAX));
            assert_eq!(max, MAX_FRAME);
        }
        other => panic!("expected TooLarge, got {other}"),
    }
    let mut just_over = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
    just_over.extend(std::iter::repeat_n(0u8, 16));
    let err = read_frame::<Request, _>(&mut &just_over[..])
        .await
        .unwrap_err();
    assert!(matches!(err, FrameError::TooLarge { .. }), "{err}");
}

#[test]
fn a_frame_at_the_limit_is_accepted_and_over_it_is_not_encoded() {
    let at_limit = Response::Error(ErrorReply::new(ErrorKind::Io, "x".repeat(MAX_FRAME - 8)));
    let body = encode_body(&at_limit).expect("encode");
    assert!(body.len() <= MAX_FRAME);
    encode_frame(&at_limit).expect("a frame within the limit encodes");
    let over = Response::Error(ErrorReply::new(ErrorKind::Io, "x".repeat(MAX_FRAME)));
    assert!(matches!(
        encode_frame(&over),
        Err(FrameError::TooLarge { .. })
    ));
}

#[test]
fn trailing_bytes_are_refused() {
    let mut body = encode_body(&Request::Ping(Ping {})).expect("encode");
    body.push(0);
    let err = decode_body::<Request>(&body).unwrap_err();
    assert!(
        matches!(err, FrameError::TrailingBytes { extra: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("Request"), "{err}");
}

#[test]
fn unknown_variant_is_refused_with_a_clear_error() {
    // Request has six variants (0..=5): 6 is unknown.
    let err = decode_body::<Request>(&[6]).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, FrameError::Decode { .. }), "{text}");
    assert!(text.contains("unknown variant"), "{text}");
    let err = decode_body::<Response>(&[200, 1]).unwrap_err();
    assert!(matches!(err, FrameError::Decode { .. }), "{err}");
}

#[test]
fn empty_body_is_refused() {
    let err = decode_body::<Request>(&[]).unwrap_err();
    assert!(err.to_string().contains("ends too early"), "{err}");
}

#[test]
fn sha_hex_rejects_bad_text() {
    assert_eq!(Sha256::from_hex("00"), None);
    assert_eq!(Sha256::from_hex(&"g".repeat(64)), None);
    assert!(Sha256::from_hex(&"AB".repeat(32)).is_some());
}
