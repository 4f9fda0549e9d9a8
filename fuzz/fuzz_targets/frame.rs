//! Frame decoding: the length prefix, the size cap, the body's decoding and trailing bytes.
//!
//! The input is what a peer sends on a connection. Frames are read from it one after
//! another with `read_frame_body` until the stream ends or a frame is refused, and each
//! body is decoded as every message type a connection reads (`Request`, `Response`,
//! `WriteBegin`, `WriteCommit`). Checked: nothing panics; no body read is above
//! `MAX_FRAME` bytes; a refused length prefix is one above `MAX_FRAME`; whatever decodes
//! encodes again (within the cap) and decodes to the same value.
#![no_main]

use std::fmt::Debug;

use erel_proto::{
    decode_body, encode_body, read_frame_body, FrameError, Request, Response, WriteBegin,
    WriteCommit, MAX_FRAME,
};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;

fuzz_target!(|data: &[u8]| {
    let mut stream = data;
    loop {
        let before = stream.len();
        match futures_lite::future::block_on(read_frame_body(&mut stream)) {
            Ok(None) => break,
            Ok(Some(body)) => {
                assert!(
                    body.len() <= MAX_FRAME,
                    "a body of {} bytes was read",
                    body.len()
                );
                assert_eq!(
                    before - stream.len(),
                    4 + body.len(),
                    "frame consumed other than prefix + body"
                );
                round_trip::<Request>(&body);
                round_trip::<Response>(&body);
                round_trip::<WriteBegin>(&body);
                round_trip::<WriteCommit>(&body);
            }
            Err(FrameError::TooLarge { len, max }) => {
                assert_eq!(max, MAX_FRAME);
                assert!(
                    len > MAX_FRAME as u64,
                    "a {len}-byte frame was refused as too large"
                );
                break;
            }
            Err(FrameError::Truncated { got, want }) => {
                assert!(got < want);
                break;
            }
            Err(other) => panic!("reading from a byte slice failed unexpectedly: {other}"),
        }
    }
});

/// Decodes `body` as a `T`; when it decodes, encoding it again gives a body within the cap
/// that decodes to the same value.
fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(body: &[u8]) {
    let value = match decode_body::<T>(body) {
        Ok(value) => value,
        Err(FrameError::Decode { .. } | FrameError::TrailingBytes { .. }) => return,
        Err(other) => panic!("decoding a body failed unexpectedly: {other}"),
    };
    let again = encode_body(&value).expect("a decoded value encodes");
    assert!(again.len() <= body.len(), "re-encoding grew the body");
    let back: T = decode_body(&again).expect("a re-encoded value decodes");
    assert_eq!(back, value);
}
