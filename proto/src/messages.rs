//! The wire messages of protocol v1.
//!
//! Every type here is encoded with postcard. Enum variants are append-only: a new variant
//! goes at the end, an existing one never changes shape, and every variant has a golden
//! byte file under `proto/tests/golden/`.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The protocol version both sides announce in [`Hello`].
pub const PROTOCOL_VERSION: u32 = 1;

/// A sha256 digest: 32 raw bytes on the wire, lowercase hex for people.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Sha256(pub [u8; 32]);

impl Sha256 {
    /// The digest as 64 lowercase hex characters.
    pub fn to_hex(&self) -> String {
        let mut out = String::with_capacity(64);
        for byte in self.0 {
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0x0f)]));
        }
        out
    }

    /// Parses 64 hex characters (either case).
    pub fn from_hex(text: &str) -> Option<Self> {
        let bytes = text.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            let high = hex_value(pair[0])?;
            let low = hex_value(pair[1])?;
            out[i] = (high << 4) | low;
        }
        Some(Self(out))
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256({})", self.to_hex())
    }
}

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// The first frame each side sends on a new connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Always [`PROTOCOL_VERSION`] for this crate; a peer that sees another value answers
    /// with [`ErrorKind::VersionMismatch`] and closes.
    pub protocol: u32,
    /// Who is speaking: the master's name, or the agent's host id.
    pub name: String,
    /// The sending program and its version, for example `erel-boot 0.1.0`.
    pub software: String,
}

/// Everything the master sends as a command frame.
///
/// The agent answers each with exactly one [`Response`], except [`Request::WriteFile`],
/// which opens a transfer (see [`WriteFile`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Opens the connection; must be the first frame.
    Hello(Hello),
    /// Asks for the agent's live state; answered with [`Response::Pong`].
    Ping(Ping),
    /// Writes a file under the root, resumably; see [`WriteFile`].
    WriteFile(WriteFile),
    /// Unpacks an archive under the root; answered with [`Response::Unpacked`].
    Unpack(Unpack),
    /// Starts a release version; answered with [`Response::Started`].
    Start(Start),
    /// Stops a release; answered with [`Response::Stopped`].
    Stop(Stop),
}

/// Everything the agent sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// The agent's answer to the master's [`Hello`].
    Hello(Hello),
    /// Answer to [`Request::Ping`].
    Pong(Pong),
    /// First answer to [`Request::WriteFile`]: what the agent already holds.
    WriteOffer(WriteOffer),
    /// Final answer to a [`Request::WriteFile`] transfer: the file is in place.
    Written(Written),
    /// Answer to [`Request::Unpack`].
    Unpacked(Unpacked),
    /// Answer to [`Request::Start`].
    Started(Started),
    /// Answer to [`Request::Stop`].
    Stopped(Stopped),
    /// The request was refused or failed; nothing half-done is visible.
    Error(ErrorReply),
}

/// Asks for the agent's state. Carries nothing today; a struct so that it has a shape.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ping {}

/// The agent's live state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pong {
    /// The host id from the agent's certificate bundle.
    pub host_id: String,
    /// The agent's own version, for example `0.1.0`.
    pub agent_version: String,
    /// Seconds since the agent process started.
    pub uptime_secs: u64,
    /// Bytes free for writing on the file system holding the root.
    pub free_disk_bytes: u64,
    /// Every release the agent knows: present on disk or recorded as desired.
    pub releases: Vec<ReleaseStatus>,
}

/// One release as the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseStatus {
    /// The release name.
    pub name: String,
    /// Versions unpacked under `releases/<name>/`, oldest first by modification time.
    pub versions: Vec<String>,
    /// The version the agent runs or last ran for this name, if any.
    pub version: Option<String>,
    /// Whether the agent has recorded that this release should run.
    pub desired_running: bool,
    /// The process id of the group leader while it runs.
    pub pid: Option<u32>,
    /// What the process is doing now.
    pub state: ReleaseState,
    /// How often the agent restarted it since the last `Start`.
    pub restarts: u32,
    /// Seconds the current process has been running, while it runs.
    pub up_secs: Option<u64>,
    /// The last bytes of its output (lossy UTF-8, at most [`OUTPUT_TAIL_MAX`] bytes, from
    /// the start of a line), in every state: recent output while it runs, its last words
    /// once it has exited, crashed or crash-loops.
    pub output_tail: String,
}

/// The most output a [`ReleaseStatus::output_tail`] carries.
pub const OUTPUT_TAIL_MAX: usize = 2048;

/// The life state of a release's process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReleaseState {
    /// Not running, and not meant to run.
    Stopped,
    /// Running now.
    Running,
    /// It exited on its own and a restart is pending (with backoff).
    Exited {
        /// The exit code, when it exited normally.
        code: Option<i32>,
        /// The signal that ended it, when one did.
        signal: Option<i32>,
    },
    /// It kept dying; the agent gave up restarting it until the next `Start`.
    CrashLooping,
}

/// Writes `size` bytes to `root/path`, resumably and atomically.
///
/// The exchange, all on one connection:
///
/// 1. master: `Request::WriteFile`
/// 2. agent: `Response::WriteOffer { have, have_sha256 }` (or `Response::Error`)
/// 3. master: a [`WriteBegin`] frame with `offset <= have` (0 to discard what is staged)
/// 4. master: exactly `size - offset` raw bytes, unframed
/// 5. master: a [`WriteCommit`] frame with the sha256 of the whole file
/// 6. agent: `Response::Written` once the file is verified, synced and renamed into
///    place, or `Response::Error`.
///
/// When `sha256` is given, the agent keys its staging by that digest and answers
/// `have == size` when the file is already in place, so a repeated push sends nothing.
/// When it is `None` (the master streams a file it has not hashed yet and sends the
/// digest only in [`WriteCommit`]), staging is keyed by `path` and `size`, and the master
/// checks `have_sha256` against its own prefix before resuming.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteFile {
    /// Destination, relative to the agent's root.
    pub path: String,
    /// Unix permission bits for the file (setuid, setgid and sticky are refused).
    pub mode: u32,
    /// Exact size in bytes.
    pub size: u64,
    /// The whole file's digest, when the master knows it in advance.
    pub sha256: Option<Sha256>,
}

/// The agent's first answer to a [`WriteFile`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteOffer {
    /// Bytes of this file the agent already holds (staged, or `size` if in place).
    pub have: u64,
    /// The sha256 of those `have` bytes.
    pub have_sha256: Sha256,
}

/// The master's choice after a [`WriteOffer`]: where its raw bytes start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteBegin {
    /// Offset of the first byte that follows; at most `have`. Zero discards the staging.
    pub offset: u64,
}

/// Closes a transfer after the raw bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteCommit {
    /// The digest of the whole file; it must equal `WriteFile::sha256` when that was given.
    pub sha256: Sha256,
}

/// The file is in place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Written {
    /// Its digest, as verified by the agent.
    pub sha256: Sha256,
    /// Its size.
    pub size: u64,
    /// Bytes received on this connection for it (0 when it was already present).
    pub received: u64,
}

/// Unpacks an archive (`.tar.gz` or `.tar`, detected from its first bytes) into `dest`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unpack {
    /// The archive, relative to the root.
    pub archive: String,
    /// The destination directory, relative to the root; it must not exist yet, unless it
    /// was unpacked from the same archive before.
    pub dest: String,
    /// The archive's expected digest, checked before anything is unpacked.
    pub sha256: Option<Sha256>,
}

/// The archive is unpacked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unpacked {
    /// The digest of the archive it came from.
    pub sha256: Sha256,
    /// Entries written.
    pub entries: u64,
    /// Bytes of file content written.
    pub bytes: u64,
    /// True when `dest` already held this archive's content and nothing was done.
    pub already: bool,
}

/// Starts version `version` of release `name`, supervised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Start {
    /// Release name.
    pub name: String,
    /// Version: a directory under `releases/<name>/`.
    pub version: String,
    /// Program and arguments; the program is relative to the version directory. Empty
    /// means `bin/<name> foreground`.
    pub argv: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Run as this user (name or numeric uid) instead of the agent's.
    pub user: Option<String>,
}

/// The release runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    /// Process id of the group leader.
    pub pid: u32,
    /// True when that version already ran and nothing changed.
    pub already_running: bool,
}

/// Stops release `name`: SIGTERM to its group, SIGKILL after `grace_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stop {
    /// Release name.
    pub name: String,
    /// Milliseconds between SIGTERM and SIGKILL.
    pub grace_ms: u64,
}

/// The release is stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stopped {
    /// False when nothing was running.
    pub was_running: bool,
    /// True when it had to be killed after the grace period.
    pub killed: bool,
}

/// A refusal or failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// What a program can act on.
    pub kind: ErrorKind,
    /// What a person reads: names the path, entry, field or limit at fault.
    pub message: String,
}

/// Kinds of error a master can act on. Append-only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The frame could not be decoded, or came at the wrong time.
    BadRequest,
    /// The peer speaks another protocol version.
    VersionMismatch,
    /// A path is absolute, has `..`, passes through a symlink or names agent state.
    InvalidPath,
    /// Something named does not exist (archive, version directory, program).
    NotFound,
    /// The destination holds something else.
    Conflict,
    /// Content does not match its sha256, or a size does not match.
    ChecksumMismatch,
    /// A size or count is above the agent's limit.
    TooLarge,
    /// Not enough free disk.
    NoSpace,
    /// An archive entry is unsafe (escape, device, setuid, link outside).
    UnsafeArchive,
    /// An archive is not a readable tar or tar.gz.
    BadArchive,
    /// A process could not be started.
    SpawnFailed,
    /// A phase took longer than the agent allows.
    Timeout,
    /// The agent is at its connection limit.
    Busy,
    /// An input/output error on the agent's side.
    Io,
    /// A bug or an unexpected state in the agent.
    Internal,
}

impl ErrorReply {
    /// Builds an error reply.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            ErrorKind::BadRequest => "bad request",
            ErrorKind::VersionMismatch => "protocol version mismatch",
            ErrorKind::InvalidPath => "invalid path",
            ErrorKind::NotFound => "not found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::ChecksumMismatch => "checksum mismatch",
            ErrorKind::TooLarge => "too large",
            ErrorKind::NoSpace => "no space",
            ErrorKind::UnsafeArchive => "unsafe archive",
            ErrorKind::BadArchive => "bad archive",
            ErrorKind::SpawnFailed => "spawn failed",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Busy => "busy",
            ErrorKind::Io => "i/o error",
            ErrorKind::Internal => "internal error",
        };
        f.write_str(text)
    }
}

impl ErrorReply {
    /// Whether `message` already says the words of `kind` (`"busy: …"` for
    /// [`ErrorKind::Busy`], `"archive not found: …"` for [`ErrorKind::NotFound`]),
    /// compared without regard to ASCII case, as whole words. Such a message is shown as
    /// it is, so that no text reads `busy: busy: …`; agents already in the field send
    /// messages like that.
    fn message_names_kind(kind: ErrorKind, message: &str) -> bool {
        let kind = kind.to_string().to_ascii_lowercase();
        let text = message.to_ascii_lowercase();
        let boundary = |c: Option<char>| !c.is_some_and(char::is_alphanumeric);
        text.match_indices(&kind).any(|(at, _)| {
            boundary(text[..at].chars().next_back())
                && boundary(text[at + kind.len()..].chars().next())
        })
    }
}

impl fmt::Display for ErrorReply {
    /// `kind: message`, or the message alone when it already names the kind.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if ErrorReply::message_names_kind(self.kind, &self.message) {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.kind, self.message)
        }
    }
}

#[cfg(test)]
mod error_text_tests {
    use super::*;

    #[test]
    fn an_error_reply_never_repeats_its_kind() {
        let cases = [
            (
                ErrorKind::Busy,
                "busy: another request is working on a.bin",
                "busy: another request is working on a.bin",
            ),
            (
                ErrorKind::Busy,
                "another request is working on a.bin",
                "busy: another request is working on a.bin",
            ),
            (
                ErrorKind::BadRequest,
                "bad request: mode 0o4755",
                "bad request: mode 0o4755",
            ),
            (ErrorKind::BadRequest, "Bad Request: x", "Bad Request: x"),
            (
                ErrorKind::InvalidPath,
                "invalid path '../x': escapes the root",
                "invalid path '../x': escapes the root",
            ),
            (
                ErrorKind::UnsafeArchive,
                "unsafe archive entry 'a': device",
                "unsafe archive entry 'a': device",
            ),
            (
                ErrorKind::Internal,
                "internal error: oops",
                "internal error: oops",
            ),
            (
                ErrorKind::NotFound,
                "archive not found: a.tgz",
                "archive not found: a.tgz",
            ),
            (ErrorKind::Busy, "the agent is busy", "the agent is busy"),
            // A word that merely starts like the kind is not the kind.
            (
                ErrorKind::Busy,
                "busybox is missing",
                "busy: busybox is missing",
            ),
            (
                ErrorKind::Timeout,
                "timed out waiting",
                "timeout: timed out waiting",
            ),
            (ErrorKind::Io, "", "i/o error: "),
        ];
        for (kind, message, shown) in cases {
            assert_eq!(
                ErrorReply::new(kind, message).to_string(),
                shown,
                "{kind:?} {message:?}"
            );
        }
    }
}
