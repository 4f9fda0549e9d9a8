//! Walking an archive's entries into the staging tree: what is unpacked, and what is
//! refused and why.
//!
//! The tar crate's own unpacking is not used, because it skips or rewrites bad entries
//! silently. Every entry is either unpacked to what GNU tar extracts from it, or the
//! whole archive is refused naming the entry and what is not supported; nothing is
//! reinterpreted.
//!
//! What is unpacked: regular and contiguous (`7`) files; directories, also GNU
//! incremental ones (`D`, whose listing only matters to incremental restores) and v7
//! files named with a trailing `/`; symlinks; hard links to a file or symlink extracted
//! before; sparse files ([`super::sparse`]); names and link targets from GNU long-name
//! and long-link headers (`L`, `K`) and from PAX records ([`super::pax`]). A GNU volume
//! label (`V`) and a PAX global header (`g`) holding only metadata write nothing.
//!
//! Refused, naming the entry, besides what [`super::confine`] refuses: a directory,
//! symlink or hard link that claims data of its own (GNU tar would read it as the next
//! header); a device, fifo, multi-volume continuation (`M`), obsolete names list (`N`)
//! or any unknown type (GNU tar would extract it as a regular file); setuid or setgid
//! bits; more than [`Limits::max_unpack_entries`] entries; more than
//! [`Limits::max_unpack_bytes`] of content (counted as it is copied, a sparse file at
//! its expanded size, so a decompression bomb stops at the limit); an entry shorter than
//! its header says; PAX records that tar readers resolve differently (a PAX `path` beside
//! a GNU long name, a local header before a global one, a ustar name prefix under a
//! version other than "00"); an extended header (long name, PAX, sparse map) above
//! [`MAX_EXTENDED_HEADER`], so memory stays bounded; and an archive that ends without
//! its end-of-archive marker. A stream that is not a tar at all is refused saying what
//! it looks like (xz, zstd, bzip2, zip...).
//!
//! Files keep their permission bits minus group/other write (executables stay
//! executable); directories get owner `rwx` so they can always be removed. Times and
//! owners stored in the archive are not applied.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use erel_proto::text::quote;
use tar::EntryType;

use super::confine::{entry_path, Tree};
use super::{pax, sparse, stream};
use crate::error::{Error, IoContext, Result};
use crate::fs::free_disk;
use crate::settings::Limits;

/// Largest long-name, long-link or PAX extended header accepted, with the header
/// blocks and padding around one entry, and largest GNU sparse 1.0 map. These are read
/// into memory.
pub(super) const MAX_EXTENDED_HEADER: u64 = 1 << 20;

/// Most data accepted after the end-of-archive marker (tar pads to 10 KiB records).
const MAX_TRAILING_BYTES: u64 = 1 << 20;

/// Copy buffer for file content.
const COPY_BUFFER: u64 = 64 * 1024;

/// Unpacks the archive in `file` into a new directory `tree`; returns the entries and
/// bytes of content unpacked.
pub(super) fn extract(file: File, name: &str, tree: &Path, limits: &Limits) -> Result<(u64, u64)> {
    let stream = stream::open(file, name)?;
    super::make_dir(tree)?;
    let mut extraction = Extraction {
        tree: Tree::new(tree),
        archive_name: name,
        limits,
        entries: 0,
        bytes: 0,
        consumed: 0,
        // The version directory itself: readable and searchable by a release's user,
        // writable by the agent only (see the README on `user`).
        dirs: vec![(tree.to_path_buf(), 0o755)],
        buffer: Vec::with_capacity(COPY_BUFFER as usize),
    };
    extraction.run(stream)?;
    extraction.tree.check_symlinks()?;
    for (path, mode) in &extraction.dirs {
        set_mode(path, *mode)?;
    }
    Ok((extraction.entries, extraction.bytes))
}

/// One pass over the archive's entries into the staging tree.
pub(super) struct Extraction<'a> {
    tree: Tree,
    archive_name: &'a str,
    limits: &'a Limits,
    /// Entries seen (extension headers not counted).
    entries: u64,
    /// Bytes of file content written.
    pub(super) bytes: u64,
    /// Bytes of entry data read, written or not.
    pub(super) consumed: u64,
    /// Directories and the mode they get once everything is written.
    dirs: Vec<(PathBuf, u32)>,
    pub(super) buffer: Vec<u8>,
}

impl Extraction<'_> {
    pub(super) fn bad(&self, reason: impl Into<String>) -> Error {
        Error::BadArchive {
            path: self.archive_name.to_string(),
            reason: reason.into(),
        }
    }

    /// Walks every entry of the archive.
    fn run(&mut self, stream: stream::Stream) -> Result<()> {
        let (meter, format, foreign) = (stream.meter, stream.format, stream.foreign);
        let mut archive = tar::Archive::new(stream.reader);
        let mut entries = archive
            .entries()
            .map_err(|e| self.bad(format!("not a readable {format}: {e}")))?;
        loop {
            // Between entries the reader only meets headers, padding and extended
            // headers (read into memory): bound them.
            meter.allow(MAX_EXTENDED_HEADER);
            let entry = match entries.next() {
                None => break,
                Some(Ok(entry)) => entry,
                Some(Err(_)) if meter.exhausted() => {
                    return Err(self.bad(format!(
                        "after entry {}: an extended header (long name or PAX) is larger than \
                         {MAX_EXTENDED_HEADER} bytes",
                        self.entries
                    )));
                }
                Some(Err(e)) => {
                    let reason = if let (0, Some(foreign)) = (self.entries, foreign) {
                        format!(
                            "not a readable {format}: {e}; it looks like {foreign}, and the \
                             agent unpacks .tar and .tar.gz only"
                        )
                    } else if let Some(name) = meter.last_header_name() {
                        // A header whose checksum holds but whose fields the reader
                        // cannot use (a size that overflows, ...): name its entry.
                        format!("entry '{}': {e}", quote(&name))
                    } else if self.entries == 0 {
                        format!("not a readable {format}: {e}")
                    } else {
                        format!("after entry {}: {e}", self.entries)
                    };
                    return Err(self.bad(reason));
                }
            };
            meter.allow(u64::MAX);
            self.entry(entry)?;
        }
        if meter.eof.get() {
            return Err(self.bad(format!(
                "ends after {} entries without the end-of-archive marker (truncated?)",
                self.entries
            )));
        }
        // Read what follows the marker so gzip checks its trailer (CRC and length).
        meter.allow(MAX_TRAILING_BYTES);
        if let Err(e) = io::copy(&mut archive.into_inner(), &mut io::sink()) {
            return Err(self.bad(if meter.exhausted() {
                format!("more than {MAX_TRAILING_BYTES} bytes follow the end-of-archive marker")
            } else {
                format!("after the end-of-archive marker: {e}")
            }));
        }
        Ok(())
    }

    fn entry<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<()> {
        let header_name = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&header_name).into_owned();
        let kind = entry.header().entry_type();
        match kind {
            // The tar crate folds these into the entry they describe when their header
            // has ustar or GNU magic; one that reaches here has none, and readers
            // disagree on what it applies to.
            EntryType::GNULongName | EntryType::GNULongLink | EntryType::XHeader => {
                return Err(Error::unsafe_entry(
                    &shown,
                    format!(
                        "a {} header without ustar or GNU magic; tar readers disagree on what \
                         it applies to",
                        describe_type(kind)
                    ),
                ));
            }
            EntryType::XGlobalHeader => return self.global_header(&mut entry, &shown),
            // A GNU volume label: GNU tar extracts nothing for it.
            k if k.as_byte() == b'V' => return self.drain(&mut entry, &shown),
            _ => {}
        }
        let pax = match entry.pax_extensions() {
            Ok(records) => pax::read_local(records).map_err(|r| self.refusal(&shown, r))?,
            Err(e) => return Err(self.bad(format!("entry '{shown}': its PAX header: {e}"))),
        };
        check_name_sources(&entry, &pax, &shown)?;
        // GNU tar names a PAX sparse file after GNU.sparse.name, whatever else says.
        let sparse_name = pax.sparse.as_ref().and_then(|s| s.name.clone());
        let raw_name = sparse_name.unwrap_or(header_name);
        let name = String::from_utf8_lossy(&raw_name).into_owned();
        self.entries += 1;
        let limit = self.limits.max_unpack_entries;
        self.within("entry count", &name, self.entries, limit)?;
        let rel = entry_path(&name, &raw_name)?;
        let refuse = |reason: String| Err(Error::unsafe_entry(&name, reason));
        if let Some(reason) = refused_type(kind) {
            return refuse(reason);
        }
        let raw = entry.header().as_bytes();
        if &raw[257..263] == b"ustar\0" && &raw[263..265] != b"00" && raw[345] != 0 {
            // GNU tar reads the name prefix of any `ustar` header, the tar crate only
            // of version "00": they would name the entry differently.
            return refuse(format!(
                "a ustar header of version '{}' with a name prefix; tar readers disagree on \
                 whether the prefix is part of the name",
                String::from_utf8_lossy(&raw[263..265]).escape_default()
            ));
        }
        let size = entry.size();
        // A hard link, symlink or directory.
        if matches!(kind.as_byte(), b'1' | b'2' | b'5') && size != 0 {
            // GNU tar reads no data after these headers whatever their size says, the
            // tar crate skips that many bytes: the two would disagree on where the next
            // header is, and so on what the archive holds.
            let what = describe_type(kind);
            return refuse(format!(
                "a {what} entry that says it holds {size} bytes of data"
            ));
        }
        let mode = match entry.header().mode() {
            Ok(mode) if mode & 0o6000 != 0 => {
                return refuse(format!("setuid or setgid bit in mode {mode:#o}"));
            }
            Ok(mode) => mode,
            Err(e) => return refuse(format!("unreadable mode: {e}")),
        };
        let file = matches!(kind, EntryType::Regular | EntryType::Continuous);
        if pax.sparse.is_some() && !file {
            let what = describe_type(kind);
            return refuse(format!("GNU sparse keywords on a {what} entry"));
        }
        // Old (v7) archives, and GNU tar after them, take a file whose name ends in '/'
        // for a directory.
        let v7_directory = file && raw_name.ends_with(b"/");
        if v7_directory && (size != 0 || pax.sparse.is_some()) {
            return refuse(format!(
                "a file entry whose name ends in '/' holds {size} bytes; GNU tar would \
                 make a directory of it and skip them"
            ));
        }
        // 'D' is a GNU incremental dump's directory: its data lists the directory's
        // names, used only when extracting incrementally; GNU tar otherwise makes the
        // directory, as here.
        if v7_directory || matches!(kind.as_byte(), b'5' | b'D') {
            self.directory(&name, &rel, mode)?;
            return self.drain(&mut entry, &name);
        }
        if kind == EntryType::GNUSparse {
            sparse::check_old_slots(entry.header()).map_err(|r| self.refusal(&name, r))?;
        }
        let path = self.tree.new_path(&name, &rel)?;
        let link = entry.link_name_bytes().map(|t| t.into_owned());
        match kind {
            EntryType::Symlink => {
                let target = self.tree.symlink(&name, &rel, link)?;
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&target), &path)
                    .io("create symlink", &path)?;
                self.drain(&mut entry, &name)
            }
            EntryType::Link => {
                let source = self.tree.link_source(&name, &rel, link)?;
                // `link(2)` does not follow a symlink at its source on Linux.
                fs::hard_link(&source, &path).io("create hard link", &path)
            }
            _ => match &pax.sparse {
                Some(sparse) => self.write_pax_sparse(&mut entry, &name, &path, mode, sparse),
                // Old GNU sparse (`S`): the tar crate expands the map; holes stay holes.
                None => {
                    self.write_file(&mut entry, &name, &path, mode, kind == EntryType::GNUSparse)
                }
            },
        }
    }

    /// Turns a refusal of PAX records into the agent's error for entry `name`.
    pub(super) fn refusal(&self, name: &str, refusal: pax::Refusal) -> Error {
        match refusal {
            pax::Refusal::Malformed(reason) => {
                self.bad(format!("entry '{name}': {reason}", name = quote(name)))
            }
            pax::Refusal::Unsupported(reason) => Error::unsafe_entry(name, reason),
        }
    }

    /// A PAX global header (`git archive` writes a comment): checked, nothing written.
    fn global_header<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>, name: &str) -> Result<()> {
        let size = entry.size();
        if size > MAX_EXTENDED_HEADER {
            return Err(self.bad(format!(
                "global PAX header '{name}' of {size} bytes is larger than \
                 {MAX_EXTENDED_HEADER} bytes",
                name = quote(name)
            )));
        }
        let mut data = Vec::new();
        while let n @ 1.. = self.read_chunk(entry, name)? {
            data.extend_from_slice(&self.buffer[..n]);
        }
        pax::check_global(&data).map_err(|r| self.refusal(name, r))?;
        // A local header, long name or long link before a global header: the tar crate
        // spends it on the global header, GNU tar on the next entry.
        let records = entry
            .pax_extensions()
            .map_err(|e| self.bad(format!("global PAX header '{}': {e}", quote(name))))?;
        let folded_pax = records.is_some_and(|mut r| r.next().is_some());
        let folded_name = entry.path_bytes() != entry.header().path_bytes()
            || entry.link_name_bytes() != entry.header().link_name_bytes();
        if folded_pax || folded_name {
            return Err(Error::unsafe_entry(
                name,
                "a PAX or GNU long-name header stands before a global header; tar readers \
                 disagree on which entry it describes",
            ));
        }
        Ok(())
    }

    /// Reads and discards an entry's data (non-file entries rarely carry any), counting
    /// it against the content limit.
    pub(super) fn drain(&mut self, entry: &mut impl Read, name: &str) -> Result<()> {
        while self.read_chunk(entry, name)? > 0 {}
        Ok(())
    }

    /// Reads the next chunk of an entry into the buffer, counting it against
    /// [`Limits::max_unpack_bytes`].
    pub(super) fn read_chunk(&mut self, entry: &mut impl Read, name: &str) -> Result<usize> {
        self.buffer.clear();
        let read = entry.take(COPY_BUFFER).read_to_end(&mut self.buffer);
        let n = read.map_err(|e| self.bad(format!("reading entry '{}': {e}", quote(name))))?;
        self.consumed += n as u64;
        self.announce(name, 0)?;
        Ok(n)
    }

    /// Refuses when `more` bytes on top of those read would pass
    /// [`Limits::max_unpack_bytes`].
    pub(super) fn announce(&self, name: &str, more: u64) -> Result<()> {
        let value = self.consumed.saturating_add(more);
        self.within("unpacked size", name, value, self.limits.max_unpack_bytes)
    }

    /// Refuses `value` (the archive's `what`, counted up to entry `name`) above `limit`.
    fn within(&self, what: &str, name: &str, value: u64, limit: u64) -> Result<()> {
        if value <= limit {
            return Ok(());
        }
        let (archive, name) = (self.archive_name, quote(name));
        let what = format!("{what} of {archive} (at '{name}')");
        Err(Error::TooLarge { what, value, limit })
    }

    /// Writes a file entry's data. With `holes`, runs of zeros the size of the copy
    /// buffer are left as holes (old GNU sparse files, which the tar crate expands).
    fn write_file<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        name: &str,
        path: &Path,
        mode: u32,
        holes: bool,
    ) -> Result<()> {
        let size = entry.size();
        self.announce(name, size)?;
        let mut out = self.create_within_reserve(name, path, size)?;
        let mut copied: u64 = 0;
        while let n @ 1.. = self.read_chunk(entry, name)? {
            let chunk = &self.buffer[..n];
            let written = if holes && chunk.iter().all(|b| *b == 0) {
                out.seek(SeekFrom::Current(n as i64)).map(drop)
            } else {
                out.write_all(chunk)
            };
            written.io("write", path)?;
            copied += n as u64;
        }
        if copied != size {
            return Err(self.bad(format!(
                "entry '{}' is cut short: its header says {size} bytes, the archive holds \
                 {copied}",
                quote(name)
            )));
        }
        self.finish_file(out, path, copied, mode)
    }

    /// Creates the file of entry `name` at `path` for `size` bytes of content (a sparse
    /// file counted expanded), refusing with [`Error::NoSpace`] when they would eat into
    /// [`Limits::disk_reserve_bytes`] of the file system the tree is on, as `WriteFile`
    /// refuses a transfer: the agent's own records and the next transfer keep room.
    pub(super) fn create_within_reserve(&self, name: &str, path: &Path, size: u64) -> Result<File> {
        if size > 0 {
            let free = free_disk(path.parent().unwrap_or(path));
            let reserve = self.limits.disk_reserve_bytes;
            if free.saturating_sub(reserve) < size {
                return Err(Error::NoSpace {
                    what: format!("entry '{}' of {}", quote(name), self.archive_name),
                    need: size,
                    free,
                    reserve,
                });
            }
        }
        create_file(path)
    }

    /// Gives a written file its length (a hole at its end stays one) and mode.
    pub(super) fn finish_file(
        &mut self,
        out: File,
        path: &Path,
        len: u64,
        mode: u32,
    ) -> Result<()> {
        out.set_len(len).io("set length of", path)?;
        self.bytes += len;
        set_mode(path, (mode & 0o777 & !0o022) | 0o400)
    }

    fn directory(&mut self, name: &str, rel: &[std::ffi::OsString], mode: u32) -> Result<()> {
        if rel.is_empty() {
            // The archive's own root (`./`): that is the destination itself.
            return Ok(());
        }
        let path = match self.tree.place(name, rel)? {
            (path, None) => {
                fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&path)
                    .io("create directory", &path)?;
                path
            }
            (path, Some(meta)) if meta.is_dir() => path,
            (_, Some(_)) => {
                return Err(Error::unsafe_entry(
                    name,
                    "a directory where the archive already put something else",
                ));
            }
        };
        // The archive's bits minus group/other write, owner `rwx`.
        self.dirs.push((path, (mode & 0o777 & !0o022) | 0o700));
        Ok(())
    }
}

/// Creates a file for an entry's content, readable by the agent only until done.
pub(super) fn create_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .io("create", path)
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).io("set mode of", path)
}

/// Refuses an entry whose name or link target the tar crate and GNU tar would take
/// from different places: a GNU long name (`L`) or long link (`K`) together with a
/// PAX `path` or `linkpath` (the crate prefers the GNU header, GNU tar the PAX one).
fn check_name_sources<R: Read>(
    entry: &tar::Entry<'_, R>,
    pax: &pax::LocalPax,
    shown: &str,
) -> Result<()> {
    let differs = |pax: &Option<Vec<u8>>, header: Option<&[u8]>| {
        pax.as_deref().is_some_and(|pax| header != Some(pax))
    };
    let what = if differs(&pax.path, Some(&entry.path_bytes())) {
        "name"
    } else if differs(&pax.linkpath, entry.link_name_bytes().as_deref()) {
        "link"
    } else {
        return Ok(());
    };
    Err(Error::unsafe_entry(
        shown,
        format!(
            "its {what} is given both by a GNU long-{what} header and by a PAX header, and \
             tar readers disagree on which one counts"
        ),
    ))
}

/// Why an entry of type `kind` is refused; `None` for the types that are unpacked.
fn refused_type(kind: EntryType) -> Option<String> {
    let reason = match kind.as_byte() {
        b'0' | b'\0' | b'1' | b'2' | b'5' | b'7' | b'S' | b'D' => return None,
        b'3' | b'4' | b'6' => format!("{}s are refused", describe_type(kind)),
        b'M' => "entry type 'M' continues a file from another volume of a multi-volume \
                 archive; unpack a single-volume archive"
            .to_string(),
        byte => format!(
            "entry type '{}' ({}) is refused: only files, directories, symlinks and hard links \
             are unpacked",
            char::from(byte).escape_default(),
            describe_type(kind)
        ),
    };
    Some(reason)
}

/// What an entry type is, for messages (POSIX ustar typeflags and GNU's additions).
fn describe_type(kind: EntryType) -> &'static str {
    match kind.as_byte() {
        b'0' | b'\0' => "regular file",
        b'1' => "hard link",
        b'2' => "symlink",
        b'3' => "character device",
        b'4' => "block device",
        b'5' => "directory",
        b'6' => "fifo",
        b'7' => "contiguous file",
        b'L' => "GNU long-name",
        b'K' => "GNU long-link",
        b'S' => "GNU sparse file",
        b'g' => "PAX global",
        b'x' => "PAX extended",
        b'D' => "GNU incremental directory",
        b'M' => "GNU multi-volume continuation",
        b'N' => "obsolete GNU names list",
        b'V' => "GNU volume label",
        b'A'..=b'Z' => "vendor extension",
        _ => "unknown type",
    }
}
