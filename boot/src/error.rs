//! The agent's one error type. Every variant says what was at fault, and maps to the
//! protocol's [`ErrorKind`] so the master can act on it.

use std::path::PathBuf;

use erel_proto::text::{quote, shorten, MAX_ERROR_MESSAGE};
use erel_proto::{ErrorKind, ErrorReply};

/// Why a command failed or was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A path named by the master is not acceptable.
    #[error("invalid path '{path}': {reason}")]
    InvalidPath {
        /// The path as the master sent it.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Something named does not exist.
    #[error("{what} not found: {path}")]
    NotFound {
        /// What kind of thing (archive, release version, program…).
        what: &'static str,
        /// Where it was looked for, relative to the root.
        path: String,
    },
    /// The destination holds something else.
    #[error("{path}: {reason}")]
    Conflict {
        /// The destination, relative to the root.
        path: String,
        /// What it holds.
        reason: String,
    },
    /// Content or size does not match what was announced.
    #[error("{path}: {reason}")]
    ChecksumMismatch {
        /// The file, relative to the root.
        path: String,
        /// Expected and actual values.
        reason: String,
    },
    /// A size or count is above a configured limit.
    #[error("{what} of {value} exceeds the limit of {limit}")]
    TooLarge {
        /// What was measured (file size, unpacked bytes, entries…).
        what: String,
        /// The value seen.
        value: u64,
        /// The configured limit.
        limit: u64,
    },
    /// Not enough free disk.
    #[error(
        "not enough disk for {what}: need {need} bytes, {free} free with a {reserve}-byte reserve"
    )]
    NoSpace {
        /// What was to be written.
        what: String,
        /// Bytes needed.
        need: u64,
        /// Bytes free.
        free: u64,
        /// Bytes the agent keeps free.
        reserve: u64,
    },
    /// An archive entry is unsafe; nothing was written.
    #[error("unsafe archive entry '{entry}': {reason}")]
    UnsafeArchive {
        /// The entry's path as stored in the archive.
        entry: String,
        /// Why it is refused.
        reason: String,
    },
    /// An archive cannot be read.
    #[error("bad archive {path}: {reason}")]
    BadArchive {
        /// The archive, relative to the root.
        path: String,
        /// What the reader reported.
        reason: String,
    },
    /// A release process could not be started.
    #[error("cannot start {name} {version}: {reason}")]
    SpawnFailed {
        /// Release name.
        name: String,
        /// Release version.
        version: String,
        /// Why.
        reason: String,
    },
    /// The frame was not expected or could not be decoded.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// A phase took too long.
    #[error("timed out {0}")]
    Timeout(String),
    /// The agent is busy with a conflicting operation or at its connection limit.
    #[error("busy: {0}")]
    Busy(String),
    /// An input/output error, with the path and the operation.
    #[error("{op} {path}: {source}")]
    Io {
        /// What the agent was doing (read, write, rename…).
        op: &'static str,
        /// The path, absolute on the agent.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// An unexpected state.
    #[error("internal error: {0}")]
    Internal(String),
    /// Another agent serves this root: it holds the agent lock (see [`crate::fs::AgentLock`]).
    #[error(
        "root {} is already served by another erel-boot ({}): one agent per root, or both would supervise the same releases; stop that agent first",
        root.display(),
        holder.map_or_else(|| "pid unknown".to_string(), |pid| format!("pid {pid}"))
    )]
    RootInUse {
        /// The root directory.
        root: PathBuf,
        /// The pid of the agent holding the lock, when it can be told.
        holder: Option<u32>,
    },
    /// The agent could not start: what it was setting up, and why.
    #[error("{what}")]
    Startup {
        /// What the agent was setting up.
        what: String,
        /// Why it failed, when another error says.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

/// Result with the agent's error.
pub(crate) type Result<T> = std::result::Result<T, Error>;

/// Names the operation and the path of a failed I/O call: `File::open(p).io("open", p)?`
/// gives [`Error::Io`] on failure. Errors that convert to `std::io::Error` (such as nix's
/// `Errno` and serde_json's) are taken too.
pub(crate) trait IoContext<T> {
    /// The result, with an error turned into [`Error::Io`] for `op` on `path`.
    fn io(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T, E: Into<std::io::Error>> IoContext<T> for std::result::Result<T, E> {
    fn io(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|e| Error::io(op, path, e.into()))
    }
}

impl Error {
    /// Builds an [`Error::Io`] for `op` on `path`.
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// Builds an [`Error::Startup`] for `what`, caused by `source`.
    pub(crate) fn startup(
        what: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Error::Startup {
            what: what.into(),
            source: Some(source.into()),
        }
    }

    /// Builds an [`Error::InvalidPath`]. A path longer than
    /// [`MAX_QUOTED`](erel_proto::text::MAX_QUOTED) bytes is quoted by its start and
    /// length (see [`erel_proto::text::quote`]).
    pub(crate) fn invalid_path(path: &str, reason: impl Into<String>) -> Self {
        Error::InvalidPath {
            path: quote(path).into_owned(),
            reason: reason.into(),
        }
    }

    /// Builds an [`Error::UnsafeArchive`]; a long entry name is quoted as in
    /// [`Error::invalid_path`].
    pub(crate) fn unsafe_entry(entry: impl AsRef<str>, reason: impl Into<String>) -> Self {
        Error::UnsafeArchive {
            entry: quote(entry.as_ref()).into_owned(),
            reason: reason.into(),
        }
    }

    /// The protocol kind this error is reported as.
    pub(crate) fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidPath { .. } => ErrorKind::InvalidPath,
            Error::NotFound { .. } => ErrorKind::NotFound,
            Error::Conflict { .. } => ErrorKind::Conflict,
            Error::ChecksumMismatch { .. } => ErrorKind::ChecksumMismatch,
            Error::TooLarge { .. } => ErrorKind::TooLarge,
            Error::NoSpace { .. } => ErrorKind::NoSpace,
            Error::UnsafeArchive { .. } => ErrorKind::UnsafeArchive,
            Error::BadArchive { .. } => ErrorKind::BadArchive,
            Error::SpawnFailed { .. } => ErrorKind::SpawnFailed,
            Error::BadRequest(_) => ErrorKind::BadRequest,
            Error::Timeout(_) => ErrorKind::Timeout,
            Error::Busy(_) => ErrorKind::Busy,
            Error::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => {
                ErrorKind::NoSpace
            }
            Error::Io { .. } => ErrorKind::Io,
            Error::Internal(_) | Error::Startup { .. } => ErrorKind::Internal,
            Error::RootInUse { .. } => ErrorKind::Busy,
        }
    }

    /// The reply sent to the master. The message does not repeat the kind, which the
    /// reply carries on its own: [`Error::Busy`] shows as `busy: …` in the agent's log
    /// and is sent as kind `Busy` with the words after `busy: `. It is at most
    /// [`MAX_ERROR_MESSAGE`] bytes (shortened on a character boundary), so a refusal
    /// that quotes long inputs still fits in one frame.
    pub(crate) fn to_reply(&self) -> ErrorReply {
        let kind = self.kind();
        let text = self.to_string();
        let message = text.strip_prefix(&format!("{kind}: ")).unwrap_or(&text);
        ErrorReply::new(kind, shorten(message, MAX_ERROR_MESSAGE).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_kind() -> Vec<Error> {
        vec![
            Error::invalid_path("../x", "escapes the root"),
            Error::NotFound {
                what: "archive",
                path: "a.tgz".into(),
            },
            Error::Conflict {
                path: "rel".into(),
                reason: "holds something else".into(),
            },
            Error::ChecksumMismatch {
                path: "a".into(),
                reason: "differs".into(),
            },
            Error::TooLarge {
                what: "file size".into(),
                value: 2,
                limit: 1,
            },
            Error::NoSpace {
                what: "a".into(),
                need: 2,
                free: 1,
                reserve: 0,
            },
            Error::unsafe_entry("e", "device file"),
            Error::BadArchive {
                path: "a.tgz".into(),
                reason: "not gzip".into(),
            },
            Error::SpawnFailed {
                name: "beat".into(),
                version: "1".into(),
                reason: "no such file".into(),
            },
            Error::BadRequest("mode 0o4755".into()),
            Error::Timeout("waiting for the release to stop".into()),
            Error::Busy("another request is working on a.bin".into()),
            Error::io("write", "/r/a", std::io::Error::other("broken")),
            Error::Internal("oops".into()),
        ]
    }

    /// No reply, as the master shows it, says the same word twice in a row
    /// (`busy: busy: …`), nor opens its message with its own kind.
    #[test]
    fn replies_never_repeat_their_kind() {
        for error in every_kind() {
            let reply = error.to_reply();
            let shown = reply.to_string();
            let kind = reply.kind.to_string();
            assert!(
                !reply.message.starts_with(&format!("{kind}: ")),
                "{error:?}: message {:?}",
                reply.message
            );
            assert!(
                !shown.contains(&format!("{kind}: {kind}")),
                "{error:?}: shown {shown:?}"
            );
            let words: Vec<&str> = shown.split_whitespace().collect();
            for pair in words.windows(2) {
                assert_ne!(
                    pair[0].trim_end_matches(':'),
                    pair[1].trim_end_matches(':'),
                    "{error:?}: shown {shown:?}"
                );
            }
        }
        let busy = Error::Busy("another request is working on a.bin".into()).to_reply();
        assert_eq!(busy.message, "another request is working on a.bin");
        assert_eq!(
            busy.to_string(),
            "busy: another request is working on a.bin"
        );
    }

    #[test]
    fn replies_fit_in_a_frame_whatever_they_quote() {
        let huge = "é".repeat(40_000);
        for err in [
            Error::invalid_path(&huge, "reason"),
            Error::unsafe_entry(&huge, "reason"),
            Error::BadRequest(huge.clone()),
            Error::Conflict {
                path: huge.clone(),
                reason: huge.clone(),
            },
        ] {
            let reply = err.to_reply();
            assert!(
                reply.message.len() <= erel_proto::text::MAX_ERROR_MESSAGE,
                "{}",
                reply.message.len()
            );
            erel_proto::encode_frame(&erel_proto::Response::Error(reply)).expect("fits a frame");
        }
    }
}
