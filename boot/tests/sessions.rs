//! `Sessions`, the agent's command side without TLS that the fuzz targets drive
//! (`fuzz/`): a session on any stream is served as a connection after its handshake,
//! and an input a fuzzer finds crashing is kept here as a regression test.

use std::net::{Ipv4Addr, SocketAddr};

use erel_boot::{CgroupParent, Limits, Sessions, Supervision};
use erel_proto::{
    decode_body, encode_frame, ErrorKind, Hello, Ping, Request, Response, PROTOCOL_VERSION,
};

/// Serves `stream` (after a `Hello` frame) as one session on a fresh root; returns the
/// agent's answers, each decoded.
async fn session(stream: &[u8]) -> Vec<Response> {
    let root = tempfile::tempdir().expect("tempdir");
    let supervision = Supervision {
        cgroup_parent: CgroupParent::None,
        ..Supervision::default()
    };
    let sessions = Sessions::open(root.path(), "test-host", Limits::default(), supervision)
        .await
        .expect("the agent opens a fresh root");
    let hello = Request::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        name: "master".into(),
        software: "test".into(),
    });
    let mut input = encode_frame(&hello).expect("Hello frame");
    input.extend_from_slice(stream);
    let mut output = Vec::new();
    let peer = SocketAddr::from((Ipv4Addr::LOCALHOST, 1));
    sessions
        .serve(tokio::io::join(&input[..], &mut output), peer, "master")
        .await;
    sessions.close().await;
    let mut answers = Vec::new();
    let mut rest = &output[..];
    while !rest.is_empty() {
        let len = u32::from_be_bytes(rest[..4].try_into().expect("a length prefix")) as usize;
        answers.push(decode_body::<Response>(&rest[4..4 + len]).expect("a whole Response"));
        rest = &rest[4 + len..];
    }
    answers
}

#[tokio::test]
async fn a_session_answers_hello_then_each_request_and_refuses_a_bad_frame() {
    let mut stream = encode_frame(&Request::Ping(Ping {})).expect("Ping frame");
    stream.extend_from_slice(&[0, 0, 0, 1, 0xff]);
    let answers = session(&stream).await;
    match answers.as_slice() {
        [Response::Hello(hello), Response::Pong(pong), Response::Error(refusal)] => {
            assert_eq!(hello.name, "test-host");
            assert_eq!(pong.host_id, "test-host");
            assert_eq!(refusal.kind, ErrorKind::BadRequest, "{}", refusal.message);
        }
        other => panic!("unexpected answers: {other:?}"),
    }
}
