//! erel wire protocol, version 1: frozen.
//!
//! - [`messages`]: the types both sides exchange: [`Hello`], the five requests
//!   ([`Ping`], [`WriteFile`], [`Unpack`], [`Start`], [`Stop`]), their answers, and
//!   [`ErrorReply`] with an [`ErrorKind`] a program can act on.
//! - [`frame`]: the codec: a 4-byte big-endian length, then a postcard body of at most
//!   [`MAX_FRAME`] bytes.
//! - [`rules`]: what both sides agree on beyond the bytes: the release-name rule, the
//!   release layout (`releases/<name>/<version>`), the default argv, message names.
//! - [`text`]: bounds on what messages quote, and char-boundary-safe shortening.
//!
//! `PROTOCOL.md` beside this crate describes the handshake, each exchange and the
//! append-only rule; golden byte files under `tests/golden/` freeze every variant.
#![deny(missing_docs)]

pub mod frame;
pub mod messages;
pub mod rules;
pub mod text;

pub use frame::{
    decode_body, encode_body, encode_frame, read_frame, read_frame_body, write_frame, FrameError,
    MAX_FRAME,
};
pub use messages::*;
