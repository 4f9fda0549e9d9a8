//! What a release archive says its version is: the `releases/<version>/` directories
//! of the relx layout (the layout `rebar3 release`, `mix release` and erel's own
//! release builder write). Only entry names are read, never file contents.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Component, Path};

use erel_proto::Sha256;
use sha2::Digest;

/// Entries read at most; an archive with more is judged by its first ones.
pub(super) const MAX_ENTRIES: usize = 200_000;

/// The versions an archive holds, sorted, without duplicates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Versions {
    /// Each `<version>` of a `releases/<version>/` directory.
    pub(super) found: Vec<String>,
    /// Whether [`MAX_ENTRIES`] stopped the listing before the end.
    pub(super) truncated: bool,
}

/// Lists the `releases/<version>/` directories of the `.tar.gz` or `.tar` at `path`
/// (gzip is told by its magic bytes `1f 8b`, as the agent does). A leading `./` is
/// ignored. Files directly under `releases/` (`RELEASES`, `start_erl.data`) are not
/// versions.
///
/// # Errors
/// The archive cannot be opened, or is not a readable tar stream.
pub(super) fn release_versions(path: &Path) -> io::Result<Versions> {
    let mut reader = BufReader::new(Hashing::new(File::open(path)?, None));
    let versions = list_versions(&mut reader);
    let bytes = reader.into_inner().bytes;
    crate::digest_cache::note_read(path, bytes, false, "to list its versions");
    versions
}

/// The sha256 of the file at `path` and the versions it holds (as
/// [`release_versions`] lists them), from one read of the file: the bytes the listing
/// reads are hashed as they pass, then the rest of the file (what follows the end of
/// the tar stream, or of a listing cut short). Counted and logged as one hash of the
/// file ([`crate::digest_cache::files_hashed`]).
///
/// # Errors
/// The outer error: the file cannot be opened or read to its end (then there is no
/// digest). The inner one: the file is not a readable tar stream (its digest still is).
pub(super) fn hash_and_list(path: &Path) -> io::Result<(Sha256, io::Result<Versions>)> {
    let file = File::open(path)?;
    let mut reader = BufReader::with_capacity(
        crate::digest_cache::HASH_READ,
        Hashing::new(file, Some(sha2::Sha256::new())),
    );
    let versions = list_versions(&mut reader);
    io::copy(&mut reader, &mut io::sink())?;
    let hashing = reader.into_inner();
    crate::digest_cache::note_read(path, hashing.bytes, true, "to hash and list its versions");
    let hasher = hashing.hasher.unwrap_or_default();
    Ok((Sha256(hasher.finalize().into()), versions))
}

/// A reader that counts the bytes it passes on, and hashes them with `hasher` if any.
struct Hashing<R> {
    inner: R,
    hasher: Option<sha2::Sha256>,
    bytes: u64,
}

impl<R> Hashing<R> {
    fn new(inner: R, hasher: Option<sha2::Sha256>) -> Self {
        Hashing {
            inner,
            hasher,
            bytes: 0,
        }
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(hasher) = self.hasher.as_mut() {
            hasher.update(&buf[..n]);
        }
        self.bytes += n as u64;
        Ok(n)
    }
}

/// [`release_versions`] of the archive `reader` gives.
fn list_versions(mut reader: impl BufRead) -> io::Result<Versions> {
    let mut magic = [0u8; 2];
    let read = read_up_to(&mut reader, &mut magic)?;
    let head = io::Cursor::new(magic[..read].to_vec());
    let stream: Box<dyn Read + '_> = if magic[..read] == [0x1f, 0x8b] {
        Box::new(flate2::bufread::GzDecoder::new(head.chain(reader)))
    } else {
        Box::new(head.chain(reader))
    };
    let mut archive = tar::Archive::new(stream);
    let mut found = Vec::new();
    let mut truncated = false;
    for (count, entry) in archive.entries()?.enumerate() {
        if count == MAX_ENTRIES {
            truncated = true;
            break;
        }
        let entry = entry?;
        let is_dir = entry.header().entry_type().is_dir();
        let path = entry.path()?;
        let mut parts = path
            .components()
            .filter(|c| !matches!(c, Component::CurDir))
            .map(|c| c.as_os_str().to_string_lossy().into_owned());
        let (Some(top), Some(version)) = (parts.next(), parts.next()) else {
            continue;
        };
        if top == "releases" && (is_dir || parts.next().is_some()) && !found.contains(&version) {
            found.push(version);
        }
    }
    found.sort();
    Ok(Versions { found, truncated })
}

fn read_up_to(source: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match source.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}
