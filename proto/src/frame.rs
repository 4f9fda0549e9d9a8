//! The frame codec: a 4-byte big-endian length, then that many bytes of postcard.
//!
//! The length is checked against [`MAX_FRAME`] before anything is allocated, a body must
//! decode to exactly one value with no trailing bytes, and a connection that closes
//! cleanly between frames reads as `Ok(None)`, not as an error.

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The largest control frame body either side accepts, in bytes.
pub const MAX_FRAME: usize = 64 * 1024;

/// Bytes in the length prefix.
const LENGTH_PREFIX: usize = 4;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix announces more than [`MAX_FRAME`].
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// The announced length.
        len: u64,
        /// The limit.
        max: usize,
    },
    /// The connection closed in the middle of a frame.
    #[error("connection closed in the middle of a frame ({got} of {want} bytes)")]
    Truncated {
        /// Bytes received.
        got: usize,
        /// Bytes the frame needed.
        want: usize,
    },
    /// The body is not a valid message of the expected type.
    #[error("undecodable {what} frame: {reason}")]
    Decode {
        /// The message type expected.
        what: &'static str,
        /// What postcard reported.
        reason: String,
    },
    /// The body decoded, but bytes were left over.
    #[error("{what} frame has {extra} trailing bytes")]
    TrailingBytes {
        /// The message type expected.
        what: &'static str,
        /// How many bytes were left.
        extra: usize,
    },
    /// The value could not be encoded (only when it is larger than [`MAX_FRAME`]).
    #[error("cannot encode frame: {0}")]
    Encode(String),
    /// The underlying stream failed.
    #[error("i/o error on the connection: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes `value` as a complete frame: length prefix and body.
pub fn encode_frame<T: Serialize>(value: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = postcard::to_extend(value, vec![0u8; LENGTH_PREFIX])
        .map_err(|e| FrameError::Encode(e.to_string()))?;
    let body_len = out.len() - LENGTH_PREFIX;
    if body_len > MAX_FRAME {
        return Err(FrameError::TooLarge {
            len: body_len as u64,
            max: MAX_FRAME,
        });
    }
    let prefix = u32::try_from(body_len).map_err(|e| FrameError::Encode(e.to_string()))?;
    out[..LENGTH_PREFIX].copy_from_slice(&prefix.to_be_bytes());
    Ok(out)
}

/// Encodes `value` as a frame body only (no length prefix), as stored in golden files.
pub fn encode_body<T: Serialize>(value: &T) -> Result<Vec<u8>, FrameError> {
    postcard::to_stdvec(value).map_err(|e| FrameError::Encode(e.to_string()))
}

/// Decodes one frame body into a `T`, refusing trailing bytes.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    let what = short_type_name::<T>();
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge {
            len: body.len() as u64,
            max: MAX_FRAME,
        });
    }
    let (value, rest) = postcard::take_from_bytes::<T>(body).map_err(|e| FrameError::Decode {
        what,
        reason: describe_postcard_error(&e),
    })?;
    if !rest.is_empty() {
        return Err(FrameError::TrailingBytes {
            what,
            extra: rest.len(),
        });
    }
    Ok(value)
}

/// Reads one frame body. `Ok(None)` when the peer closed cleanly before a new frame.
pub async fn read_frame_body<R: AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<Option<Vec<u8>>, FrameError> {
    let mut prefix = [0u8; LENGTH_PREFIX];
    let mut got = 0;
    while got < LENGTH_PREFIX {
        let n = reader.read(&mut prefix[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(FrameError::Truncated {
                got,
                want: LENGTH_PREFIX,
            });
        }
        got += n;
    }
    let len = u32::from_be_bytes(prefix);
    let len = usize::try_from(len).map_err(|_| FrameError::TooLarge {
        len: u64::from(len),
        max: MAX_FRAME,
    })?;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge {
            len: len as u64,
            max: MAX_FRAME,
        });
    }
    let mut body = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = reader.read(&mut body[got..]).await?;
        if n == 0 {
            return Err(FrameError::Truncated { got, want: len });
        }
        got += n;
    }
    Ok(Some(body))
}

/// Reads and decodes one frame. `Ok(None)` on a clean close between frames.
pub async fn read_frame<T: DeserializeOwned, R: AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<Option<T>, FrameError> {
    match read_frame_body(reader).await? {
        None => Ok(None),
        Some(body) => decode_body(&body).map(Some),
    }
}

/// Encodes and writes one frame, then flushes.
pub async fn write_frame<T: Serialize, W: AsyncWrite + Unpin>(
    writer: &mut W,
    value: &T,
) -> Result<(), FrameError> {
    let frame = encode_frame(value)?;
    writer.write_all(&frame).await?;
    writer.flush().await?;
    Ok(())
}

fn describe_postcard_error(err: &postcard::Error) -> String {
    match err {
        postcard::Error::SerdeDeCustom => "unknown variant or invalid value".to_string(),
        postcard::Error::DeserializeUnexpectedEnd => "body ends too early".to_string(),
        postcard::Error::DeserializeBadVarint => "malformed integer".to_string(),
        postcard::Error::DeserializeBadUtf8 => "string is not UTF-8".to_string(),
        postcard::Error::DeserializeBadBool => "malformed boolean".to_string(),
        postcard::Error::DeserializeBadOption => "malformed option tag".to_string(),
        other => other.to_string(),
    }
}

fn short_type_name<T>() -> &'static str {
    let full = std::any::type_name::<T>();
    full.rsplit("::").next().unwrap_or(full)
}
