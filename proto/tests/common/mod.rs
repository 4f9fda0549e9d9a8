//! What more than one of the protocol's test binaries needs.

use erel_proto::ErrorKind;

/// Every error kind, in the order of the enum.
pub const ALL_ERROR_KINDS: [ErrorKind; 15] = [
    ErrorKind::BadRequest,
    ErrorKind::VersionMismatch,
    ErrorKind::InvalidPath,
    ErrorKind::NotFound,
    ErrorKind::Conflict,
    ErrorKind::ChecksumMismatch,
    ErrorKind::TooLarge,
    ErrorKind::NoSpace,
    ErrorKind::UnsafeArchive,
    ErrorKind::BadArchive,
    ErrorKind::SpawnFailed,
    ErrorKind::Timeout,
    ErrorKind::Busy,
    ErrorKind::Io,
    ErrorKind::Internal,
];
