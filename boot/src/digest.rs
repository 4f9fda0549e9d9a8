//! sha256 of a whole file, or of a file's first bytes, read with a fixed buffer so memory
//! stays flat whatever the size.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use erel_proto::Sha256;
use sha2::{Digest, Sha256 as Hasher};

use crate::error::{IoContext, Result};

/// Size of the buffer files are read with.
const BUFFER: usize = 64 * 1024;

/// The digest of a byte string.
pub(crate) fn of_bytes(bytes: &[u8]) -> Sha256 {
    Sha256(Hasher::digest(bytes).into())
}

/// The digest a hasher has reached.
pub(crate) fn finish(hasher: Hasher) -> Sha256 {
    Sha256(hasher.finalize().into())
}

/// The digest of the whole file at `path`.
pub(crate) fn of_file(path: &Path) -> Result<Sha256> {
    let mut file = File::open(path).io("open", path)?;
    of_open_file(&mut file, path)
}

/// The digest of what is left to read in `file` (opened at `path`, for messages).
pub(crate) fn of_open_file(file: &mut File, path: &Path) -> Result<Sha256> {
    let mut hasher = Hasher::new();
    io::copy(&mut io::BufReader::with_capacity(BUFFER, file), &mut hasher).io("read", path)?;
    Ok(finish(hasher))
}

/// Hashes the next `len` bytes of `file`, from its current position (which it leaves
/// anywhere); a file that ends before is an `UnexpectedEof` error.
pub(crate) fn of_prefix(file: &mut File, len: u64) -> io::Result<Hasher> {
    let mut hasher = Hasher::new();
    let copied = io::copy(
        &mut io::BufReader::with_capacity(BUFFER, file).take(len),
        &mut hasher,
    )?;
    if copied < len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("file ended {} bytes early", len - copied),
        ));
    }
    Ok(hasher)
}
