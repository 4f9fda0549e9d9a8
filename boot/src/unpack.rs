//! `Unpack`: safe, atomic unpacking of `.tar.gz` and `.tar` archives under the root.
//!
//! The archive is opened once: hashed (and checked against the request's digest), then
//! read again from the same open file, so a concurrent `WriteFile` replacing it cannot
//! slip other content in between. Its first bytes tell gzip (`1f 8b`) from plain tar.
//!
//! Entries are walked one by one into a fresh staging directory
//! `.erel/unpack/<unique>/tree/`; the tar crate's own unpacking is not used, because it
//! skips or rewrites bad entries silently. Every entry is either unpacked to what GNU
//! tar extracts from it, or the whole archive is refused naming the entry and what is
//! not supported; nothing is reinterpreted.
//!
//! What is unpacked: regular and contiguous (`7`) files; directories, also GNU
//! incremental ones (`D`, whose listing only matters to incremental restores) and v7
//! files named with a trailing `/`; symlinks; hard links to a file or symlink extracted
//! before; sparse files, old GNU (`S`) and PAX formats 0.0, 0.1 and 1.0, expanded to
//! their real name and size with holes kept; names and link targets from GNU long-name
//! and long-link headers (`L`, `K`) and from PAX records. A GNU volume label (`V`) and
//! a PAX global header (`g`) holding only metadata write nothing. PAX keywords are
//! sorted in `pax`: `path`, `linkpath`, `size` and the GNU sparse ones are applied;
//! times, owners, comments and extended attributes are ignored (the agent applies none
//! of them, as GNU tar applies no xattrs by default); any other keyword is refused.
//!
//! The whole archive is refused, naming the entry, on an absolute path, a `..`
//! component or a NUL byte; a symlink that is absolute or leads outside the
//! destination (checked lexically as each link arrives, then once more at the end by
//! resolving every link through the links the archive created); a hard link whose
//! target is outside or not extracted yet; a directory, symlink or hard link that
//! claims data of its own (GNU tar would read it as the next header); a device,
//! fifo, multi-volume continuation (`M`), obsolete names list (`N`) or any unknown type
//! (GNU tar would extract it as a regular file); setuid or setgid bits; a write through
//! a symlink or into a non-directory; a path that appears twice; more than
//! [`Limits::max_unpack_entries`] entries; more than [`Limits::max_unpack_bytes`] of
//! content (counted as it is copied, a sparse file at its expanded size, so a
//! decompression bomb stops at the limit); an entry shorter than its header says; a
//! sparse map that overlaps, leaves the file, does not match the stored data, or (old
//! GNU) goes on after an empty slot where GNU tar stops reading it; PAX
//! records that are malformed, repeated, unknown, or that tar readers resolve
//! differently (a PAX `path` beside a GNU long name, a local header before a global
//! one, a global header setting `path` or `size`, a ustar name prefix under a version
//! other than "00"); an extended header (long name, PAX, sparse map) above
//! [`MAX_EXTENDED_HEADER`], so memory stays bounded; and an archive that ends without
//! its end-of-archive marker. A stream that is not a tar at all is refused saying what
//! it looks like (xz, zstd, bzip2, zip...). On any error the staging directory is
//! removed: `dest` does not exist and nothing outside the staging directory was
//! written.
//!
//! Files keep their permission bits minus group/other write (executables stay
//! executable); directories get owner `rwx` so they can always be removed. Times and
//! owners stored in the archive are not applied. When the tree is complete it is
//! synced (`syncfs`), and renamed onto `dest` without replacing anything
//! (`renameat2(RENAME_NOREPLACE)` where available), and the parent is synced.
//!
//! # Idempotency
//!
//! A marker `.erel/unpacked/<sha256 of dest>.json` records the destination, the
//! archive, its digest, the counts, and the device and inode of the staged tree. It is
//! written (atomically, synced) *before* the rename; a rename keeps the inode, so after
//! it the marker and `dest` agree. An `Unpack` whose `dest` exists counts as done only
//! when the marker names the same digest *and* the same device, inode and birth time as
//! `dest`: a crash between marker and rename leaves a marker for a `dest` that does not
//! exist (ignored and rewritten by the next attempt), and a `dest` that something else
//! put there is another inode, or the same inode number reused with a later birth time,
//! so it is a `Conflict`, never a false `already`. (On a file system that records no
//! birth time, a directory made at `dest` that reuses the tree's inode number would be
//! taken for it; only the agent writes under the root, so that needs a person to
//! replace the directory by hand.) A restored backup has new inodes: a `Conflict`,
//! which is the safe answer. When the request names the digest, a done `dest` is
//! answered without reading the archive.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

use erel_proto::text::quote;
use erel_proto::{Sha256, Unpack, Unpacked};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256 as Hasher};
use tar::EntryType;

use crate::error::{Error, Result};
use crate::fs::{self as root, PathLock, Root};
use crate::settings::Limits;

mod pax;

/// Largest long-name, long-link or PAX extended header accepted, with the header
/// blocks and padding around one entry, and largest GNU sparse 1.0 map. These are read
/// into memory.
pub const MAX_EXTENDED_HEADER: u64 = 1 << 20;

/// Most data accepted after the end-of-archive marker (tar pads to 10 KiB records).
const MAX_TRAILING_BYTES: u64 = 1 << 20;

/// Most symlinks followed while checking where one symlink leads (as Linux does).
const MAX_LINK_EXPANSIONS: u32 = 40;

/// Longest path a system call takes, in bytes, without its terminating NUL: Linux's
/// `PATH_MAX` (4096, `<linux/limits.h>`) less one. Also the longest symlink target.
const MAX_SYSTEM_PATH: usize = 4095;

/// Copy buffer for file content.
const COPY_BUFFER: usize = 64 * 1024;

/// Mode of an unpacked directory's top: 0755, so that a release started as a `user`
/// can read and run it; nothing in it is writable by anyone but root.
const VERSION_DIR_MODE: u32 = 0o755;

/// Unpacks `request.archive` into `request.dest` through a staging directory. Blocking.
pub fn unpack(root: &Root, request: &Unpack, limits: &Limits) -> Result<Unpacked> {
    let archive_path = root.resolve(&request.archive)?;
    let dest = root.resolve(&request.dest)?;
    let dest_rel = relative(root, &dest);
    let archive_rel = relative(root, &archive_path);
    let _lock = PathLock::acquire(dest.clone(), &request.dest)?;

    if let Some(expected) = request.sha256 {
        if let Some(done) = already_unpacked(root, &dest, &dest_rel, expected)? {
            return Ok(done);
        }
    }

    let mut file = open_archive(&archive_path, &request.archive)?;
    let sha256 = hash_file(&mut file, &archive_path)?;
    if let Some(expected) = request.sha256 {
        if expected != sha256 {
            return Err(Error::ChecksumMismatch {
                path: request.archive.clone(),
                reason: format!("archive has sha256 {sha256}, the request names {expected}"),
            });
        }
    }
    if let Some(done) = already_unpacked(root, &dest, &dest_rel, sha256)? {
        return Ok(done);
    }
    if let Some(holds) = describe_existing(root, &dest, &dest_rel)? {
        return Err(Error::Conflict {
            path: request.dest.clone(),
            reason: holds,
        });
    }

    let staging = root.state("unpack").join(root::unique_name());
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(|e| Error::io("create staging directory", &staging, e))?;
    let tree = staging.join("tree");
    let outcome = stage_and_place(
        root,
        Staged {
            file,
            archive_name: &request.archive,
            archive_rel: &archive_rel,
            sha256,
            tree: &tree,
            dest: &dest,
            dest_name: &request.dest,
            dest_rel: &dest_rel,
        },
        limits,
    );
    // On success the tree was renamed away and this removes an empty directory; on
    // failure it removes everything that was written.
    if let Err(e) = fs::remove_dir_all(&staging) {
        // Removed at the next start by `sweep_stale`; the unpack itself is settled.
        tracing::warn!(path = %staging.display(), error = %e, "could not remove unpack staging");
    }
    outcome
}

/// What [`stage_and_place`] works on.
struct Staged<'a> {
    file: File,
    archive_name: &'a str,
    archive_rel: &'a str,
    sha256: Sha256,
    tree: &'a Path,
    dest: &'a Path,
    dest_name: &'a str,
    dest_rel: &'a str,
}

/// Extracts into `tree`, syncs it, writes the marker and renames the tree onto `dest`.
fn stage_and_place(root: &Root, staged: Staged<'_>, limits: &Limits) -> Result<Unpacked> {
    let Staged {
        mut file,
        archive_name,
        archive_rel,
        sha256,
        tree,
        dest,
        dest_name,
        dest_rel,
    } = staged;
    let gzip = is_gzip(&mut file, archive_name)?;
    let source: Box<dyn Read> = if gzip {
        Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(file)))
    } else {
        Box::new(BufReader::new(file))
    };
    let mut extraction = Extraction {
        tree: tree.to_path_buf(),
        archive_name,
        limits,
        entries: 0,
        bytes: 0,
        consumed: 0,
        dirs: Vec::new(),
        symlinks: Vec::new(),
        buffer: vec![0u8; COPY_BUFFER],
    };
    fs::DirBuilder::new()
        .mode(0o700)
        .create(tree)
        .map_err(|e| Error::io("create staging directory", tree, e))?;
    extraction.run(source, gzip)?;
    extraction.check_symlinks()?;
    extraction.apply_dir_modes()?;
    // The version directory itself: readable and searchable by a release's user, writable
    // by the agent only (see the README on `user`).
    fs::set_permissions(tree, fs::Permissions::from_mode(VERSION_DIR_MODE))
        .map_err(|e| Error::io("set mode of", tree, e))?;
    sync_tree(tree)?;

    let meta = fs::symlink_metadata(tree).map_err(|e| Error::io("inspect", tree, e))?;
    let marker = Marker {
        dest: dest_rel.to_string(),
        archive: archive_rel.to_string(),
        sha256: sha256.to_hex(),
        entries: extraction.entries,
        bytes: extraction.bytes,
        dev: meta.dev(),
        ino: meta.ino(),
        born: birth(&meta),
    };
    let marker_file = marker_path(root, dest_rel);
    let json = serde_json::to_vec_pretty(&marker)
        .map_err(|e| Error::Internal(format!("cannot encode unpack marker: {e}")))?;
    root::write_atomic(&marker_file, &json, 0o600)?;

    let placed = place(root, tree, dest, dest_name);
    if placed.is_err() {
        // The marker names an inode that is not at `dest`; remove it anyway.
        let _ = fs::remove_file(&marker_file);
    }
    placed?;
    Ok(Unpacked {
        sha256,
        entries: extraction.entries,
        bytes: extraction.bytes,
        already: false,
    })
}

/// Creates `dest`'s parents, checks the path again and renames `tree` onto `dest`
/// without replacing anything, then syncs the parent directory.
fn place(root: &Root, tree: &Path, dest: &Path, dest_name: &str) -> Result<()> {
    let parent = dest
        .parent()
        .ok_or_else(|| Error::Internal(format!("{} has no parent", dest.display())))?;
    let again = root.create_parents(dest_name)?;
    if again != dest {
        return Err(Error::Internal(format!(
            "{dest_name} resolved to {} then {}",
            dest.display(),
            again.display()
        )));
    }
    match rename_no_replace(tree, dest) {
        Ok(()) => {}
        Err(e) if matches!(e.kind(), io::ErrorKind::AlreadyExists) || dest.exists() => {
            return Err(Error::Conflict {
                path: dest_name.to_string(),
                reason: "appeared while the archive was being unpacked".into(),
            });
        }
        Err(e) => return Err(Error::io("rename into place", dest, e)),
    }
    root::sync_dir(parent)
}

/// Renames without replacing an existing `to`.
fn rename_no_replace(from: &Path, to: &Path) -> io::Result<()> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use nix::errno::Errno;
        use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
        match renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE) {
            Ok(()) => return Ok(()),
            // File systems without RENAME_NOREPLACE: fall back to check, then rename.
            Err(Errno::EINVAL) | Err(Errno::ENOSYS) => {}
            Err(errno) => return Err(io::Error::from(errno)),
        }
    }
    if fs::symlink_metadata(to).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists", to.display()),
        ));
    }
    fs::rename(from, to)
}

/// Makes everything written under `tree` durable.
fn sync_tree(tree: &Path) -> Result<()> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let dir = File::open(tree).map_err(|e| Error::io("open", tree, e))?;
        nix::unistd::syncfs(&dir)
            .map_err(|errno| Error::io("sync file system of", tree, io::Error::from(errno)))
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        let _ = tree;
        nix::unistd::sync();
        Ok(())
    }
}

/// One pass over the archive's entries into the staging tree.
struct Extraction<'a> {
    tree: PathBuf,
    archive_name: &'a str,
    limits: &'a Limits,
    /// Entries seen (extension headers not counted).
    entries: u64,
    /// Bytes of file content written.
    bytes: u64,
    /// Bytes of entry data read, written or not.
    consumed: u64,
    /// Directories and the mode they get once everything is written.
    dirs: Vec<(PathBuf, u32)>,
    /// Symlinks written: entry name and path components under the tree.
    symlinks: Vec<(String, Vec<OsString>)>,
    buffer: Vec<u8>,
}

impl Extraction<'_> {
    fn bad(&self, reason: impl Into<String>) -> Error {
        Error::BadArchive {
            path: self.archive_name.to_string(),
            reason: reason.into(),
        }
    }

    /// Walks every entry of the archive read from `source`.
    fn run(&mut self, source: Box<dyn Read>, gzip: bool) -> Result<()> {
        let (source, foreign) = self.skip_volume_label(source)?;
        let meter = Rc::new(Meter::default());
        let mut archive = tar::Archive::new(Metered {
            inner: source,
            meter: meter.clone(),
        });
        let format = if gzip { "tar.gz" } else { "tar" };
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
        let mut rest = archive.into_inner();
        meter.allow(MAX_TRAILING_BYTES);
        if let Err(e) = io::copy(&mut rest, &mut io::sink()) {
            if meter.exhausted() {
                return Err(self.bad(format!(
                    "more than {MAX_TRAILING_BYTES} bytes follow the end-of-archive marker"
                )));
            }
            return Err(self.bad(format!("after the end-of-archive marker: {e}")));
        }
        Ok(())
    }

    /// GNU tar's `--label` writes a first header of type `V` whose size field is left
    /// empty, which the tar crate cannot read as a number. GNU tar extracts nothing for
    /// a label, so a first block that is such a header (checksum right, size empty or
    /// zero) is skipped; anything else is handed on untouched. Also says what other
    /// format the first bytes look like, for the message if they are not a tar.
    fn skip_volume_label(
        &self,
        mut source: Box<dyn Read>,
    ) -> Result<(Box<dyn Read>, Option<&'static str>)> {
        let mut first = vec![0u8; 512];
        let mut got = 0;
        while got < first.len() {
            match source.read(&mut first[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.bad(format!("not readable: {e}"))),
            }
        }
        first.truncate(got);
        let foreign = foreign_format(&first);
        if got == 512 && is_volume_label(&first) {
            return Ok((source, foreign));
        }
        Ok((Box::new(io::Cursor::new(first).chain(source)), foreign))
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
        self.check_name_sources(&entry, &pax, &shown)?;
        // GNU tar names a PAX sparse file after GNU.sparse.name, whatever else says.
        let raw_name = match pax.sparse.as_ref().and_then(|s| s.name.clone()) {
            Some(real) => real,
            None => header_name,
        };
        let name = String::from_utf8_lossy(&raw_name).into_owned();
        self.entries += 1;
        if self.entries > self.limits.max_unpack_entries {
            return Err(Error::TooLarge {
                what: format!(
                    "entry count of {} (at '{}')",
                    self.archive_name,
                    quote(&name)
                ),
                value: self.entries,
                limit: self.limits.max_unpack_entries,
            });
        }
        let rel = entry_path(&name, &raw_name)?;
        if let Some(reason) = refused_type(kind) {
            return Err(Error::unsafe_entry(&name, reason));
        }
        let raw = entry.header().as_bytes();
        if &raw[257..263] == b"ustar\0" && &raw[263..265] != b"00" && raw[345] != 0 {
            // GNU tar reads the name prefix of any `ustar` header, the tar crate only
            // of version "00": they would name the entry differently.
            return Err(Error::unsafe_entry(
                &name,
                format!(
                    "a ustar header of version '{}' with a name prefix; tar readers disagree \
                     on whether the prefix is part of the name",
                    String::from_utf8_lossy(&raw[263..265]).escape_default()
                ),
            ));
        }
        if matches!(
            kind,
            EntryType::Directory | EntryType::Symlink | EntryType::Link
        ) && entry.size() != 0
        {
            // GNU tar reads no data after these headers whatever their size says, the
            // tar crate skips that many bytes: the two would disagree on where the next
            // header is, and so on what the archive holds.
            return Err(Error::unsafe_entry(
                &name,
                format!(
                    "a {} entry that says it holds {} bytes of data",
                    describe_type(kind),
                    entry.size()
                ),
            ));
        }
        let mode = entry
            .header()
            .mode()
            .map_err(|e| Error::unsafe_entry(&name, format!("unreadable mode: {e}")))?;
        if mode & 0o6000 != 0 {
            return Err(Error::unsafe_entry(
                &name,
                format!("setuid or setgid bit in mode {mode:#o}"),
            ));
        }
        if pax.sparse.is_some() && !matches!(kind, EntryType::Regular | EntryType::Continuous) {
            return Err(Error::unsafe_entry(
                &name,
                format!("GNU sparse keywords on a {} entry", describe_type(kind)),
            ));
        }
        // Old (v7) archives, and GNU tar after them, take a file whose name ends in '/'
        // for a directory.
        let trailing_slash = raw_name.ends_with(b"/");
        match kind {
            EntryType::Regular | EntryType::Continuous if trailing_slash => {
                if entry.size() != 0 || pax.sparse.is_some() {
                    return Err(Error::unsafe_entry(
                        &name,
                        format!(
                            "a file entry whose name ends in '/' holds {} bytes; GNU tar would \
                             make a directory of it and skip them",
                            entry.size()
                        ),
                    ));
                }
                self.directory(&name, &rel, mode)?;
                self.drain(&mut entry, &name)
            }
            EntryType::Regular | EntryType::Continuous => {
                let path = self.new_path(&name, &rel)?;
                match &pax.sparse {
                    Some(sparse) => self.write_pax_sparse(&mut entry, &name, &path, mode, sparse),
                    None => self.write_file(&mut entry, &name, &path, mode, false),
                }
            }
            // Old GNU sparse: the tar crate expands the map; holes stay holes.
            EntryType::GNUSparse => {
                check_old_sparse_slots(entry.header()).map_err(|r| self.refusal(&name, r))?;
                let path = self.new_path(&name, &rel)?;
                self.write_file(&mut entry, &name, &path, mode, true)
            }
            // 'D' is a GNU incremental dump's directory: its data lists the directory's
            // names, used only when extracting incrementally; GNU tar otherwise makes
            // the directory, as here.
            k if k == EntryType::Directory || k.as_byte() == b'D' => {
                if rel.is_empty() {
                    // The archive's own root (`./`): that is the destination itself.
                    return self.drain(&mut entry, &name);
                }
                self.directory(&name, &rel, mode)?;
                self.drain(&mut entry, &name)
            }
            EntryType::Symlink => {
                let target = entry.link_name_bytes().map(|t| t.into_owned());
                let path = self.new_path(&name, &rel)?;
                self.symlink(&name, rel, &path, target)?;
                self.drain(&mut entry, &name)
            }
            EntryType::Link => {
                let target = entry.link_name_bytes().map(|t| t.into_owned());
                let path = self.new_path(&name, &rel)?;
                self.hard_link(&name, rel, &path, target)
            }
            _ => Err(Error::unsafe_entry(
                &name,
                refused_type(kind).unwrap_or_else(|| "unsupported entry type".into()),
            )),
        }
    }

    /// Turns a refusal of PAX records into the agent's error for entry `name`.
    fn refusal(&self, name: &str, refusal: pax::Refusal) -> Error {
        match refusal {
            pax::Refusal::Malformed(reason) => {
                self.bad(format!("entry '{name}': {reason}", name = quote(name)))
            }
            pax::Refusal::Unsupported(reason) => Error::unsafe_entry(name, reason),
        }
    }

    /// Refuses an entry whose name or link target the tar crate and GNU tar would take
    /// from different places: a GNU long name (`L`) or long link (`K`) together with a
    /// PAX `path` or `linkpath` (the crate prefers the GNU header, GNU tar the PAX one).
    fn check_name_sources<R: Read>(
        &self,
        entry: &tar::Entry<'_, R>,
        pax: &pax::LocalPax,
        shown: &str,
    ) -> Result<()> {
        let both = |what: &str| {
            Error::unsafe_entry(
                shown,
                format!(
                    "its {what} is given both by a GNU long-{what} header and by a PAX \
                     header, and tar readers disagree on which one counts"
                ),
            )
        };
        if let Some(path) = &pax.path {
            if entry.path_bytes().as_ref() != path.as_slice() {
                return Err(both("name"));
            }
        }
        if let Some(link) = &pax.linkpath {
            if entry.link_name_bytes().as_deref() != Some(link.as_slice()) {
                return Err(both("link"));
            }
        }
        Ok(())
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
        loop {
            let n = self.read_chunk(entry, name)?;
            if n == 0 {
                break;
            }
            data.extend_from_slice(&self.buffer[..n]);
        }
        pax::check_global(&data).map_err(|r| self.refusal(name, r))?;
        // A local header, long name or long link before a global header: the tar crate
        // spends it on the global header, GNU tar on the next entry.
        let folded_pax = match entry.pax_extensions() {
            Ok(Some(mut records)) => records.next().is_some(),
            Ok(None) => false,
            Err(e) => {
                return Err(self.bad(format!(
                    "global PAX header '{name}': {e}",
                    name = quote(name)
                )))
            }
        };
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
    fn drain<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>, name: &str) -> Result<()> {
        loop {
            let n = self.read_chunk(entry, name)?;
            if n == 0 {
                return Ok(());
            }
        }
    }

    /// Takes `bytes` read (or about to be read) but not unpacked off the unpacked count,
    /// within what is left of `allowance` for the entry: reading stays bounded.
    fn forgive(&mut self, bytes: u64, allowance: &mut u64) {
        let forgiven = bytes.min(*allowance);
        *allowance -= forgiven;
        self.consumed = self.consumed.saturating_sub(forgiven);
    }

    /// Reads the next chunk of an entry into the buffer, counting it against
    /// [`Limits::max_unpack_bytes`].
    fn read_chunk(&mut self, entry: &mut impl Read, name: &str) -> Result<usize> {
        let n = loop {
            match entry.read(&mut self.buffer) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.bad(format!("reading entry '{}': {e}", quote(name)))),
            }
        };
        self.consumed += n as u64;
        if self.consumed > self.limits.max_unpack_bytes {
            return Err(self.too_many_bytes(name, self.consumed));
        }
        Ok(n)
    }

    fn too_many_bytes(&self, name: &str, value: u64) -> Error {
        Error::TooLarge {
            what: format!(
                "unpacked size of {} (at '{}')",
                self.archive_name,
                quote(name)
            ),
            value,
            limit: self.limits.max_unpack_bytes,
        }
    }

    /// The staging path for an entry that creates something new: parents are
    /// directories (created when missing), none a symlink, and nothing is there yet.
    fn new_path(&self, name: &str, rel: &[OsString]) -> Result<PathBuf> {
        let Some((last, parents)) = rel.split_last() else {
            return Err(Error::unsafe_entry(name, "names the archive's root"));
        };
        let mut path = self.parent_dir(name, parents)?;
        path.push(last);
        self.fits(name, &path)?;
        match fs::symlink_metadata(&path) {
            Ok(_) => Err(Error::unsafe_entry(
                name,
                "appears twice in the archive; overwriting is refused",
            )),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(path),
            Err(e) => Err(Error::io("inspect", &path, e)),
        }
    }

    /// Walks `parents` under the tree, creating missing directories; refuses to pass
    /// through a symlink or a non-directory.
    fn parent_dir(&self, name: &str, parents: &[OsString]) -> Result<PathBuf> {
        let mut dir = self.tree.clone();
        for component in parents {
            dir.push(component);
            self.fits(name, &dir)?;
            match fs::symlink_metadata(&dir) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    return Err(Error::unsafe_entry(
                        name,
                        format!(
                            "its parent {} is a symlink; writing through links is refused",
                            self.display(&dir)
                        ),
                    ));
                }
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => {
                    return Err(Error::unsafe_entry(
                        name,
                        format!("its parent {} is not a directory", self.display(&dir)),
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::DirBuilder::new()
                        .mode(0o755)
                        .create(&dir)
                        .map_err(|e| Error::io("create directory", &dir, e))?;
                }
                Err(e) => return Err(Error::io("inspect", &dir, e)),
            }
        }
        Ok(dir)
    }

    /// Refuses an entry whose path on the host would be longer than the system takes
    /// (the kernel would answer `ENAMETOOLONG`), naming the limit.
    fn fits(&self, name: &str, path: &Path) -> Result<()> {
        let len = path.as_os_str().len();
        if len > MAX_SYSTEM_PATH {
            return Err(Error::unsafe_entry(
                name,
                format!(
                    "its path while unpacking would be {len} bytes, above the system's limit \
                     of {MAX_SYSTEM_PATH} bytes (PATH_MAX)"
                ),
            ));
        }
        Ok(())
    }

    /// A path under the tree as the archive names it, for messages.
    fn display(&self, path: &Path) -> String {
        path.strip_prefix(&self.tree)
            .unwrap_or(path)
            .display()
            .to_string()
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
        let announced = self.consumed.saturating_add(size);
        if announced > self.limits.max_unpack_bytes {
            return Err(self.too_many_bytes(name, announced));
        }
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| Error::io("create", path, e))?;
        let mut copied: u64 = 0;
        loop {
            let n = self.read_chunk(entry, name)?;
            if n == 0 {
                break;
            }
            let chunk = &self.buffer[..n];
            if holes && chunk.iter().all(|b| *b == 0) {
                out.seek(SeekFrom::Current(n as i64))
                    .map_err(|e| Error::io("seek in", path, e))?;
            } else {
                out.write_all(chunk)
                    .map_err(|e| Error::io("write", path, e))?;
            }
            copied += n as u64;
        }
        if copied != size {
            return Err(self.bad(format!(
                "entry '{}' is cut short: its header says {size} bytes, the archive holds \
                 {copied}",
                quote(name)
            )));
        }
        if holes {
            out.set_len(copied)
                .map_err(|e| Error::io("set length of", path, e))?;
        }
        self.bytes += copied;
        out.set_permissions(fs::Permissions::from_mode(file_mode(mode)))
            .map_err(|e| Error::io("set mode of", path, e))
    }

    /// Writes a GNU sparse file stored in PAX format (GNU tar manual, "Storing Sparse
    /// Files"): the data regions land at their offsets, the rest stays a hole, and the
    /// file gets its expanded size. The expanded size counts against
    /// [`Limits::max_unpack_bytes`].
    fn write_pax_sparse<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        name: &str,
        path: &Path,
        mode: u32,
        sparse: &pax::PaxSparse,
    ) -> Result<()> {
        let stored = entry.size();
        let early = self.consumed.saturating_add(sparse.real_size);
        if early > self.limits.max_unpack_bytes {
            return Err(self.too_many_bytes(name, early));
        }
        let (regions, map_len) = match &sparse.map {
            pax::MapSource::Records(regions) => (regions.clone(), 0),
            pax::MapSource::Data => self.read_sparse_map(entry, name, stored)?,
        };
        // The map and the padding around regions are read but not unpacked: up to the
        // bound on an extended header, they do not count as unpacked bytes, so a sparse
        // file counts exactly its real size in every format.
        let mut forgivable = MAX_EXTENDED_HEADER;
        self.forgive(map_len, &mut forgivable);
        let after_map = stored - map_len;
        let data = pax::check_regions(&regions, sparse.real_size, after_map)
            .map_err(|r| self.refusal(name, r))?;
        let hole_bytes = sparse.real_size - data;
        let announced = self.consumed.saturating_add(sparse.real_size);
        if announced > self.limits.max_unpack_bytes {
            return Err(self.too_many_bytes(name, announced));
        }
        self.consumed += hole_bytes;
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| Error::io("create", path, e))?;
        let mut at = 0u64;
        for region in regions.iter().filter(|r| r.length > 0) {
            // Each region's data starts on a block boundary.
            let start = pax::blocks(at).unwrap_or(at);
            self.forgive(start - at, &mut forgivable);
            self.copy_exact(entry, name, start - at, None)?;
            out.seek(SeekFrom::Start(region.offset))
                .map_err(|e| Error::io("seek in", path, e))?;
            self.copy_exact(entry, name, region.length, Some((&mut out, path)))?;
            at = start + region.length;
        }
        self.forgive(after_map.saturating_sub(at), &mut forgivable);
        self.drain(entry, name)?;
        out.set_len(sparse.real_size)
            .map_err(|e| Error::io("set length of", path, e))?;
        self.bytes += sparse.real_size;
        out.set_permissions(fs::Permissions::from_mode(file_mode(mode)))
            .map_err(|e| Error::io("set mode of", path, e))
    }

    /// Copies exactly `len` bytes of the entry to `out`, or discards them without one.
    fn copy_exact<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        name: &str,
        len: u64,
        mut out: Option<(&mut File, &Path)>,
    ) -> Result<()> {
        let mut part = entry.take(len);
        let mut copied = 0u64;
        loop {
            let n = self.read_chunk(&mut part, name)?;
            if n == 0 {
                break;
            }
            if let Some((file, path)) = out.as_mut() {
                file.write_all(&self.buffer[..n])
                    .map_err(|e| Error::io("write", *path, e))?;
            }
            copied += n as u64;
        }
        if copied != len {
            return Err(self.bad(format!(
                "entry '{name}' is cut short: its sparse map needs {len} more bytes, the \
                 archive holds {copied}",
                name = quote(name)
            )));
        }
        Ok(())
    }

    /// Reads the map of a GNU sparse 1.0 file from the start of its data: decimal
    /// numbers one per line, the count of regions then offset and length of each,
    /// padded to whole blocks. Returns the regions and the bytes the map took.
    fn read_sparse_map<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        name: &str,
        stored: u64,
    ) -> Result<(Vec<pax::Region>, u64)> {
        let mut text: Vec<u8> = Vec::new();
        let mut numbers: Vec<u64> = Vec::new();
        let mut parsed = 0usize;
        let mut wanted: Option<u64> = None;
        while wanted != Some(numbers.len() as u64) {
            if let Some(line) = text[parsed..].iter().position(|b| *b == b'\n') {
                let value = pax::number("a sparse map number", &text[parsed..parsed + line])
                    .map_err(|r| self.refusal(name, r))?;
                parsed += line + 1;
                numbers.push(value);
                if wanted.is_none() {
                    wanted = Some(value.saturating_mul(2).saturating_add(1));
                }
                continue;
            }
            let grown = text.len() as u64 + pax::BLOCK;
            if grown > MAX_EXTENDED_HEADER || grown > stored {
                return Err(self.bad(format!(
                    "entry '{name}': its GNU sparse map does not end within {} bytes",
                    grown.min(stored).min(MAX_EXTENDED_HEADER),
                    name = quote(name)
                )));
            }
            let from = text.len();
            text.resize(from + pax::BLOCK as usize, 0);
            let mut got = 0;
            while got < pax::BLOCK as usize {
                let n = self.read_chunk(&mut entry.take(pax::BLOCK - got as u64), name)?;
                if n == 0 {
                    return Err(self.bad(format!(
                        "entry '{name}' is cut short in its sparse map",
                        name = quote(name)
                    )));
                }
                text[from + got..from + got + n].copy_from_slice(&self.buffer[..n]);
                got += n;
            }
        }
        let regions = numbers[1..]
            .chunks(2)
            .map(|pair| pax::Region {
                offset: pair[0],
                length: pair[1],
            })
            .collect();
        Ok((regions, text.len() as u64))
    }

    fn directory(&mut self, name: &str, rel: &[OsString], mode: u32) -> Result<()> {
        let Some((last, parents)) = rel.split_last() else {
            return Ok(());
        };
        let mut path = self.parent_dir(name, parents)?;
        path.push(last);
        self.fits(name, &path)?;
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() && !meta.file_type().is_symlink() => {}
            Ok(_) => {
                return Err(Error::unsafe_entry(
                    name,
                    "a directory where the archive already put something else",
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&path)
                    .map_err(|e| Error::io("create directory", &path, e))?;
            }
            Err(e) => return Err(Error::io("inspect", &path, e)),
        }
        self.dirs.push((path, dir_mode(mode)));
        Ok(())
    }

    fn symlink(
        &mut self,
        name: &str,
        rel: Vec<OsString>,
        path: &Path,
        target: Option<Vec<u8>>,
    ) -> Result<()> {
        let target = match target {
            Some(target) if !target.is_empty() => target,
            _ => return Err(Error::unsafe_entry(name, "symlink without a target")),
        };
        if target.len() > MAX_SYSTEM_PATH {
            return Err(Error::unsafe_entry(
                name,
                format!(
                    "symlink target of {} bytes, above the system's limit of \
                     {MAX_SYSTEM_PATH} bytes (PATH_MAX)",
                    target.len()
                ),
            ));
        }
        let shown = quote(&String::from_utf8_lossy(&target)).into_owned();
        if target.contains(&0) {
            return Err(Error::unsafe_entry(
                name,
                format!(
                    "symlink target {} contains a NUL byte",
                    shown.escape_default()
                ),
            ));
        }
        let steps = steps(&target).map_err(|()| {
            Error::unsafe_entry(name, format!("symlink to the absolute path {shown}"))
        })?;
        // Lexically first: where the link sits, then its target from there.
        let mut depth = rel.len().saturating_sub(1);
        for step in &steps {
            match step {
                Step::Up if depth == 0 => {
                    return Err(Error::unsafe_entry(
                        name,
                        format!("symlink to {shown} leads outside the destination"),
                    ));
                }
                Step::Up => depth -= 1,
                Step::Name(_) => depth += 1,
            }
        }
        std::os::unix::fs::symlink(OsStr::from_bytes(&target), path)
            .map_err(|e| Error::io("create symlink", path, e))?;
        self.symlinks.push((name.to_string(), rel));
        Ok(())
    }

    /// A hard link to a file or to a symlink the archive extracted before (GNU tar uses
    /// `link(2)`, which links a symlink itself); a linked symlink is checked from its new
    /// place like any other.
    fn hard_link(
        &mut self,
        name: &str,
        rel: Vec<OsString>,
        path: &Path,
        target: Option<Vec<u8>>,
    ) -> Result<()> {
        let target = match target {
            Some(target) if !target.is_empty() => target,
            _ => return Err(Error::unsafe_entry(name, "hard link without a target")),
        };
        let shown = quote(&String::from_utf8_lossy(&target)).into_owned();
        let target_rel = entry_path(&shown, &target).map_err(|e| match e {
            Error::UnsafeArchive { reason, .. } => {
                Error::unsafe_entry(name, format!("hard link to {shown}: {reason}"))
            }
            other => other,
        })?;
        let mut source = self.tree.clone();
        for (i, component) in target_rel.iter().enumerate() {
            source.push(component);
            self.fits(name, &source)?;
            let last = i + 1 == target_rel.len();
            match fs::symlink_metadata(&source) {
                Ok(meta) if meta.file_type().is_symlink() && !last => {
                    return Err(Error::unsafe_entry(
                        name,
                        format!("hard link to {shown} passes through a symlink"),
                    ));
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(Error::unsafe_entry(
                        name,
                        format!("hard link to {shown}, which the archive has not extracted before"),
                    ));
                }
                Err(e) => return Err(Error::io("inspect", &source, e)),
            }
        }
        let meta = fs::symlink_metadata(&source).map_err(|e| Error::io("inspect", &source, e))?;
        let to_symlink = meta.file_type().is_symlink();
        if target_rel.is_empty() || !(meta.is_file() || to_symlink) {
            return Err(Error::unsafe_entry(
                name,
                format!("hard link to {shown}, which is not a regular file or a symlink"),
            ));
        }
        // `link(2)` does not follow a symlink at its source on Linux.
        fs::hard_link(&source, path).map_err(|e| Error::io("create hard link", path, e))?;
        if to_symlink {
            self.symlinks.push((name.to_string(), rel));
        }
        Ok(())
    }

    /// Resolves every symlink through the links the archive created, now that all
    /// exist; refuses any that leads outside the tree.
    fn check_symlinks(&self) -> Result<()> {
        for (name, rel) in &self.symlinks {
            if let Err(reason) = confined(&self.tree, rel) {
                return Err(Error::unsafe_entry(name, reason));
            }
        }
        Ok(())
    }

    fn apply_dir_modes(&self) -> Result<()> {
        for (path, mode) in &self.dirs {
            fs::set_permissions(path, fs::Permissions::from_mode(*mode))
                .map_err(|e| Error::io("set mode of", path, e))?;
        }
        Ok(())
    }
}

/// File permissions: the archive's bits minus group/other write, owner read kept.
fn file_mode(mode: u32) -> u32 {
    (mode & 0o777 & !0o022) | 0o400
}

/// Directory permissions: the archive's bits minus group/other write, owner `rwx`.
fn dir_mode(mode: u32) -> u32 {
    (mode & 0o777 & !0o022) | 0o700
}

/// What a stream that is not a tar looks like, from its magic bytes (as `file(1)`
/// tells them): other compressors GNU tar would run, and other archive formats.
fn foreign_format(first: &[u8]) -> Option<&'static str> {
    const MAGICS: &[(&[u8], &str)] = &[
        (b"BZh", "bzip2 data"),
        (b"\xfd7zXZ\x00", "xz data"),
        (b"\x28\xb5\x2f\xfd", "zstd data"),
        (b"LZIP", "lzip data"),
        (b"\x04\x22\x4d\x18", "lz4 data"),
        (b"\x1f\x9d", "compress (.Z) data"),
        (b"\x1f\x8b", "gzip data inside gzip"),
        (b"PK\x03\x04", "a zip archive"),
        (b"7z\xbc\xaf\x27\x1c", "a 7-zip archive"),
    ];
    MAGICS
        .iter()
        .find(|(magic, _)| first.starts_with(magic))
        .map(|(_, what)| *what)
}

/// Whether a header block is a GNU volume label without data: type `V`, a right
/// checksum, and a size field that is empty or zero.
fn is_volume_label(block: &[u8]) -> bool {
    if block.len() != 512 || block[156] != b'V' {
        return false;
    }
    let header = tar::Header::from_byte_slice(block);
    let sum: u32 = block[..148]
        .iter()
        .chain(&block[156..])
        .map(|b| u32::from(*b))
        .sum::<u32>()
        + 8 * u32::from(b' ');
    let size = &block[124..136];
    header.cksum().ok() == Some(sum) && size.iter().all(|b| matches!(b, 0 | b'0' | b' '))
}

/// Checks the four map slots of an old GNU sparse header the way GNU tar reads them
/// (`oldgnu_get_sparse_info`): the map ends at the first slot whose size is empty, and
/// no extension block is read after that. The tar crate skips empty slots and reads on,
/// so a header with regions or extensions after an empty slot means two different
/// files; it is refused. (Regions inside extension blocks are read by the tar crate
/// alone.)
fn check_old_sparse_slots(header: &tar::Header) -> std::result::Result<(), pax::Refusal> {
    let Some(gnu) = header.as_gnu() else {
        return Ok(()); // the tar crate refuses an 'S' entry without a GNU header
    };
    let Some(end) = gnu.sparse.iter().position(|slot| slot.numbytes[0] == 0) else {
        return Ok(());
    };
    let blank =
        |slot: &tar::GnuSparseHeader| slot.offset.iter().chain(&slot.numbytes).all(|b| *b == 0);
    if !gnu.sparse[end..].iter().all(blank) || gnu.isextended[0] != 0 {
        return Err(pax::Refusal::Unsupported(format!(
            "its old GNU sparse map goes on after the empty slot {end}, where GNU tar stops \
             reading it"
        )));
    }
    Ok(())
}

/// Why an entry of type `kind` is refused; `None` for the types that are unpacked.
fn refused_type(kind: EntryType) -> Option<String> {
    let reason = match kind {
        EntryType::Regular
        | EntryType::Continuous
        | EntryType::GNUSparse
        | EntryType::Directory
        | EntryType::Symlink
        | EntryType::Link => return None,
        k if k.as_byte() == b'D' => return None,
        EntryType::Char => "character devices are refused".to_string(),
        EntryType::Block => "block devices are refused".to_string(),
        EntryType::Fifo => "fifos are refused".to_string(),
        k if k.as_byte() == b'M' => "entry type 'M' continues a file from another volume of a \
                                    multi-volume archive; unpack a single-volume archive"
            .to_string(),
        other => format!(
            "entry type '{}' ({}) is refused: only files, directories, symlinks and hard links \
             are unpacked",
            char::from(other.as_byte()).escape_default(),
            describe_type(other)
        ),
    };
    Some(reason)
}

/// What an entry type is, for messages (POSIX ustar typeflags and GNU's additions).
fn describe_type(kind: EntryType) -> &'static str {
    match kind {
        EntryType::Regular => "regular file",
        EntryType::Link => "hard link",
        EntryType::Symlink => "symlink",
        EntryType::Char => "character device",
        EntryType::Block => "block device",
        EntryType::Directory => "directory",
        EntryType::Fifo => "fifo",
        EntryType::Continuous => "contiguous file",
        EntryType::GNULongName => "GNU long-name",
        EntryType::GNULongLink => "GNU long-link",
        EntryType::GNUSparse => "GNU sparse file",
        EntryType::XGlobalHeader => "PAX global",
        EntryType::XHeader => "PAX extended",
        other => match other.as_byte() {
            b'D' => "GNU incremental directory",
            b'M' => "GNU multi-volume continuation",
            b'N' => "obsolete GNU names list",
            b'V' => "GNU volume label",
            b'A'..=b'Z' => "vendor extension",
            _ => "unknown type",
        },
    }
}

/// The normal components of an entry's path; `.` components are dropped.
fn entry_path(name: &str, raw: &[u8]) -> Result<Vec<OsString>> {
    if raw.is_empty() {
        return Err(Error::unsafe_entry(name, "empty path"));
    }
    if raw.first() == Some(&b'/') {
        return Err(Error::unsafe_entry(name, "absolute path"));
    }
    if raw.contains(&0) {
        // GNU tar stops a name at its first NUL; a file system name cannot hold one.
        return Err(Error::unsafe_entry(
            name.escape_default().to_string(),
            "path contains a NUL byte",
        ));
    }
    let mut out = Vec::new();
    for component in Path::new(OsStr::from_bytes(raw)).components() {
        match component {
            Component::Normal(part) if part.len() > root::MAX_NAME_LEN => {
                return Err(Error::unsafe_entry(
                    name,
                    format!(
                        "a component of {} bytes, above the file-system limit of {} bytes \
                         (NAME_MAX)",
                        part.len(),
                        root::MAX_NAME_LEN
                    ),
                ));
            }
            Component::Normal(part) => out.push(part.to_os_string()),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(Error::unsafe_entry(name, "path contains '..'"));
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(Error::unsafe_entry(name, "absolute path"));
            }
        }
    }
    Ok(out)
}

/// One step of a symlink target.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Up,
    Name(OsString),
}

/// The steps of a relative symlink target; `Err` for an absolute one.
fn steps(target: &[u8]) -> std::result::Result<Vec<Step>, ()> {
    if target.first() == Some(&b'/') {
        return Err(());
    }
    let mut out = Vec::new();
    for component in Path::new(OsStr::from_bytes(target)).components() {
        match component {
            Component::Normal(part) => out.push(Step::Name(part.to_os_string())),
            Component::CurDir => {}
            Component::ParentDir => out.push(Step::Up),
            Component::RootDir | Component::Prefix(_) => return Err(()),
        }
    }
    Ok(out)
}

/// Follows the symlink at `rel` under `tree` the way the kernel would, expanding links
/// met on the way; `Err` says why it leads outside the tree.
fn confined(tree: &Path, rel: &[OsString]) -> std::result::Result<(), String> {
    let Some((_, parents)) = rel.split_last() else {
        return Err("symlink at the archive's root".into());
    };
    let join = |stack: &[OsString]| -> PathBuf {
        let mut path = tree.to_path_buf();
        path.extend(stack);
        path
    };
    let link = join(rel);
    let first = fs::read_link(&link).map_err(|e| format!("cannot read it back: {e}"))?;
    let shown = first.display().to_string();
    let mut stack: Vec<OsString> = parents.to_vec();
    let mut queue: VecDeque<Step> = steps(first.as_os_str().as_bytes())
        .map_err(|()| format!("symlink to the absolute path {shown}"))?
        .into();
    let mut expansions = 0;
    while let Some(step) = queue.pop_front() {
        match step {
            Step::Up => {
                if stack.pop().is_none() {
                    return Err(format!(
                        "symlink to {shown} leads outside the destination through the links \
                         it passes"
                    ));
                }
            }
            Step::Name(part) => {
                let mut here = join(&stack);
                here.push(&part);
                match fs::symlink_metadata(&here) {
                    Ok(meta) if meta.file_type().is_symlink() => {
                        expansions += 1;
                        if expansions > MAX_LINK_EXPANSIONS {
                            return Err(format!(
                                "symlink to {shown} passes more than {MAX_LINK_EXPANSIONS} links \
                                 (a loop?)"
                            ));
                        }
                        let next = fs::read_link(&here)
                            .map_err(|e| format!("cannot read {}: {e}", here.display()))?;
                        let more = steps(next.as_os_str().as_bytes()).map_err(|()| {
                            format!("symlink to {shown} passes a link to an absolute path")
                        })?;
                        for step in more.into_iter().rev() {
                            queue.push_front(step);
                        }
                    }
                    _ => stack.push(part),
                }
            }
        }
    }
    Ok(())
}

/// Shared count of bytes read from the decompressed stream, with a movable limit, and
/// the last whole block read (so a header the tar reader fails on can be named).
#[derive(Debug)]
struct Meter {
    read: Cell<u64>,
    limit: Cell<u64>,
    eof: Cell<bool>,
    /// The block being read, up to the current position.
    current: RefCell<[u8; pax::BLOCK as usize]>,
    /// The last block read whole and the stream offset just after it.
    last_block: RefCell<Option<([u8; pax::BLOCK as usize], u64)>>,
}

impl Default for Meter {
    fn default() -> Self {
        Meter {
            read: Cell::new(0),
            limit: Cell::new(0),
            eof: Cell::new(false),
            current: RefCell::new([0; pax::BLOCK as usize]),
            last_block: RefCell::new(None),
        }
    }
}

impl Meter {
    /// Notes `data`, read at stream offset `at`: only its last two blocks can matter.
    fn record(&self, at: u64, data: &[u8]) {
        let block = pax::BLOCK;
        let end = at + data.len() as u64;
        let from = at.max(end.saturating_sub(2 * block) & !(block - 1));
        let mut current = self.current.borrow_mut();
        for offset in from..end {
            let in_block = usize::try_from(offset % block).unwrap_or(0);
            current[in_block] = data[usize::try_from(offset - at).unwrap_or(0)];
            if offset % block == block - 1 {
                *self.last_block.borrow_mut() = Some((*current, offset + 1));
            }
        }
    }

    /// The name in the block just read, when it is a tar header (its checksum holds):
    /// the entry the tar reader was reading when it failed.
    fn last_header_name(&self) -> Option<String> {
        let (block, end) = (*self.last_block.borrow())?;
        if end != self.read.get() {
            return None;
        }
        let header = tar::Header::from_byte_slice(&block);
        let stored = header.cksum().ok()?;
        let sum: u32 = block[..148]
            .iter()
            .chain(&[b' '; 8])
            .chain(&block[156..])
            .map(|b| u32::from(*b))
            .sum();
        (stored == sum).then(|| String::from_utf8_lossy(&header.path_bytes()).into_owned())
    }

    /// Allows `more` bytes from now on.
    fn allow(&self, more: u64) {
        self.limit.set(self.read.get().saturating_add(more));
    }

    fn exhausted(&self) -> bool {
        self.read.get() >= self.limit.get()
    }
}

/// The archive stream, counted by a [`Meter`] and cut off at its limit.
struct Metered {
    inner: Box<dyn Read>,
    meter: Rc<Meter>,
}

impl Read for Metered {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let room = self.meter.limit.get().saturating_sub(self.meter.read.get());
        if room == 0 {
            return Err(io::Error::other("size limit reached"));
        }
        let want = usize::try_from(room).unwrap_or(usize::MAX).min(buf.len());
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            self.meter.eof.set(true);
        }
        self.meter.record(self.meter.read.get(), &buf[..n]);
        self.meter.read.set(self.meter.read.get() + n as u64);
        Ok(n)
    }
}

/// Opens the archive: it must exist and be a regular file.
fn open_archive(path: &Path, name: &str) -> Result<File> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_file() => {}
        Ok(_) => {
            return Err(Error::NotFound {
                what: "archive (as a regular file)",
                path: name.to_string(),
            });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Error::NotFound {
                what: "archive",
                path: name.to_string(),
            });
        }
        Err(e) => return Err(Error::io("inspect", path, e)),
    }
    File::open(path).map_err(|e| Error::io("open", path, e))
}

/// The digest of the whole file, read once; leaves the position at the end.
fn hash_file(file: &mut File, path: &Path) -> Result<Sha256> {
    let mut hasher = Hasher::new();
    let mut buffer = vec![0u8; COPY_BUFFER];
    loop {
        let n = match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io("read", path, e)),
        };
        hasher.update(&buffer[..n]);
    }
    Ok(Sha256(hasher.finalize().into()))
}

/// Whether the archive starts with the gzip magic; leaves the position at the start.
fn is_gzip(file: &mut File, name: &str) -> Result<bool> {
    let seek = |file: &mut File| {
        file.seek(SeekFrom::Start(0))
            .map_err(|e| Error::io("seek", name, e))
    };
    seek(file)?;
    let mut magic = [0u8; 2];
    let mut got = 0;
    while got < magic.len() {
        match file.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io("read", name, e)),
        }
    }
    seek(file)?;
    Ok(got == 2 && magic == [0x1f, 0x8b])
}

/// The path relative to the root, as a string (the key of markers).
pub(crate) fn relative(root: &Root, path: &Path) -> String {
    // Rebuilt from components, so `a//b` and `a/b` are one key.
    path.strip_prefix(root.path())
        .unwrap_or(path)
        .components()
        .collect::<PathBuf>()
        .to_string_lossy()
        .into_owned()
}

/// What the agent records about a directory it unpacked.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Marker {
    /// The destination, relative to the root.
    pub(crate) dest: String,
    /// The archive it came from, relative to the root.
    pub(crate) archive: String,
    /// The archive's sha256, hex.
    pub(crate) sha256: String,
    /// Entries unpacked.
    pub(crate) entries: u64,
    /// Bytes of file content unpacked.
    pub(crate) bytes: u64,
    /// Device of the unpacked tree.
    pub(crate) dev: u64,
    /// Inode of the unpacked tree: the same at `dest` after the rename.
    pub(crate) ino: u64,
    /// Birth time of the unpacked tree in nanoseconds since the epoch, where the file
    /// system records one: tells the tree from a later directory reusing its inode.
    pub(crate) born: Option<u128>,
}

/// Birth time in nanoseconds since the epoch, where the file system records one.
fn birth(meta: &fs::Metadata) -> Option<u128> {
    meta.created()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
}

/// Where the marker for `dest_rel` (relative to the root) lives.
pub(crate) fn marker_path(root: &Root, dest_rel: &str) -> PathBuf {
    let key = Sha256(Hasher::digest(dest_rel.as_bytes()).into());
    root.state("unpacked")
        .join(format!("{}.json", key.to_hex()))
}

/// Reads a marker; `None` when missing or unreadable.
pub(crate) fn read_marker(path: &Path) -> Option<Marker> {
    let bytes = fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Whether a marker describes what is at `dest` now: same device, inode and birth time.
pub(crate) fn marker_matches(marker: &Marker, dest: &Path) -> bool {
    match fs::symlink_metadata(dest) {
        Ok(meta) => {
            meta.is_dir()
                && meta.dev() == marker.dev
                && meta.ino() == marker.ino
                && birth(&meta) == marker.born
        }
        Err(_) => false,
    }
}

/// `Some` when `dest` holds exactly what this agent unpacked from an archive with
/// digest `sha256`.
fn already_unpacked(
    root: &Root,
    dest: &Path,
    dest_rel: &str,
    sha256: Sha256,
) -> Result<Option<Unpacked>> {
    let Some(marker) = read_marker(&marker_path(root, dest_rel)) else {
        return Ok(None);
    };
    if marker.sha256 != sha256.to_hex() || !marker_matches(&marker, dest) {
        return Ok(None);
    }
    Ok(Some(Unpacked {
        sha256,
        entries: marker.entries,
        bytes: marker.bytes,
        already: true,
    }))
}

/// `Some(what it holds)` when `dest` exists.
fn describe_existing(root: &Root, dest: &Path, dest_rel: &str) -> Result<Option<String>> {
    let meta = match fs::symlink_metadata(dest) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("inspect", dest, e)),
    };
    if !meta.is_dir() {
        return Ok(Some(
            "exists and is not a directory; unpack into a path that does not exist".into(),
        ));
    }
    if let Some(marker) = read_marker(&marker_path(root, dest_rel)) {
        if marker_matches(&marker, dest) {
            return Ok(Some(format!(
                "holds what was unpacked from {} (sha256 {}), not this archive",
                marker.archive, marker.sha256
            )));
        }
    }
    let count = fs::read_dir(dest).map(|d| d.count()).unwrap_or(0);
    Ok(Some(format!(
        "exists as a directory with {count} entries that this agent did not unpack from this \
         archive; remove it or unpack elsewhere"
    )))
}

/// Removes staging directories left by an unpack interrupted by a crash. Run at startup,
/// before any request is served.
pub fn sweep_stale(root: &Root) -> Result<()> {
    crate::fs::empty_dir(&root.state("unpack"))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::os::unix::fs::FileTypeExt;
    use std::time::{Duration, Instant};

    use erel_proto::ErrorKind;
    use flate2::write::GzEncoder;
    use flate2::Compression;

    use super::*;

    struct Fixture {
        dir: tempfile::TempDir,
        root: Root,
        limits: Limits,
    }

    /// The root is a subdirectory of the temporary directory, so that anything written
    /// beside it (an escape) shows up in [`Fixture::snapshot`].
    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = Root::open(&dir.path().join("root")).expect("open root");
        let limits = Limits {
            max_unpack_bytes: 10 << 20,
            max_unpack_entries: 1_000,
            ..Limits::default()
        };
        Fixture { dir, root, limits }
    }

    impl Fixture {
        fn put(&self, name: &str, bytes: &[u8]) {
            let path = self.root.path().join(name);
            fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            fs::write(path, bytes).expect("write archive");
        }

        fn request(&self, archive: &str, dest: &str) -> Unpack {
            Unpack {
                archive: archive.into(),
                dest: dest.into(),
                sha256: None,
            }
        }

        fn unpack(&self, archive: &str, dest: &str) -> Result<Unpacked> {
            unpack(&self.root, &self.request(archive, dest), &self.limits)
        }

        /// Every path under the temporary directory, with its type and size.
        fn snapshot(&self) -> BTreeMap<PathBuf, String> {
            let mut out = BTreeMap::new();
            let mut queue = vec![self.dir.path().to_path_buf()];
            while let Some(dir) = queue.pop() {
                for entry in fs::read_dir(&dir).expect("list") {
                    let path = entry.expect("entry").path();
                    let meta = fs::symlink_metadata(&path).expect("meta");
                    let kind = if meta.file_type().is_symlink() {
                        format!("link {}", fs::read_link(&path).expect("link").display())
                    } else if meta.is_dir() {
                        queue.push(path.clone());
                        "dir".to_string()
                    } else {
                        format!("file {}", meta.len())
                    };
                    out.insert(path, kind);
                }
            }
            out
        }

        fn staging_is_empty(&self) -> bool {
            fs::read_dir(self.root.state("unpack"))
                .expect("list")
                .next()
                .is_none()
        }

        /// Unpacks `bytes` and checks the refusal: its kind, that its message names
        /// `needle`, that `dest` does not exist and that nothing at all changed.
        #[track_caller]
        fn refuses(&self, bytes: &[u8], kind: ErrorKind, needle: &str) -> Error {
            self.put("archives/hostile.tar", bytes);
            let before = self.snapshot();
            let err = self
                .unpack("archives/hostile.tar", "releases/evil/1")
                .expect_err("must be refused");
            assert_eq!(err.kind(), kind, "{err}");
            assert!(err.to_string().contains(needle), "{needle:?} not in: {err}");
            assert!(!self.root.path().join("releases/evil/1").exists());
            assert_eq!(before, self.snapshot(), "something was written: {err}");
            assert!(self.staging_is_empty());
            err
        }
    }

    /// A tar written header by header, so that it can say what no tool would write.
    #[derive(Default)]
    struct Raw {
        bytes: Vec<u8>,
    }

    impl Raw {
        fn header(name: &[u8], kind: EntryType, mode: u32, size: u64, link: &[u8]) -> tar::Header {
            let mut header = tar::Header::new_gnu();
            let old = header.as_old_mut();
            old.name[..name.len()].copy_from_slice(name);
            old.linkname[..link.len()].copy_from_slice(link);
            header.set_entry_type(kind);
            header.set_mode(mode);
            header.set_size(size);
            header.set_mtime(1_700_000_000);
            header.set_cksum();
            header
        }

        fn push(mut self, header: &tar::Header, data: &[u8]) -> Self {
            self.bytes.extend_from_slice(header.as_bytes());
            self.bytes.extend_from_slice(data);
            let pad = (512 - data.len() % 512) % 512;
            self.bytes.extend(std::iter::repeat_n(0u8, pad));
            self
        }

        fn entry(self, name: &str, kind: EntryType, mode: u32, data: &[u8], link: &str) -> Self {
            let header = Self::header(
                name.as_bytes(),
                kind,
                mode,
                data.len() as u64,
                link.as_bytes(),
            );
            self.push(&header, data)
        }

        fn file(self, name: &str, data: &[u8]) -> Self {
            self.entry(name, EntryType::Regular, 0o644, data, "")
        }

        fn dir(self, name: &str) -> Self {
            self.entry(name, EntryType::Directory, 0o755, b"", "")
        }

        fn symlink(self, name: &str, target: &str) -> Self {
            self.entry(name, EntryType::Symlink, 0o777, b"", target)
        }

        fn hard_link(self, name: &str, target: &str) -> Self {
            self.entry(name, EntryType::Link, 0o644, b"", target)
        }

        fn finish(mut self) -> Vec<u8> {
            self.bytes.extend([0u8; 1024]);
            self.bytes
        }
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
        encoder.write_all(bytes).expect("gzip");
        encoder.finish().expect("gzip")
    }

    fn sha(bytes: &[u8]) -> Sha256 {
        Sha256(Hasher::digest(bytes).into())
    }

    const LONG_DIR: &str = "lib/a_rather_long_application_name_as_real_releases_have-10.2.3/\
                            priv/some/deeply/nested/directory/structure";

    const SCRIPT: &[u8] = b"#!/bin/sh\nexec erts/bin/erl \"$@\"\n";

    /// A relx-like release built the way real tools build one, gzipped.
    fn release(version: &str) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        let mut add = |path: &str, mode: u32, data: &[u8]| {
            let mut header = tar::Header::new_gnu();
            header.set_mode(mode);
            header.set_size(data.len() as u64);
            header.set_entry_type(EntryType::Regular);
            builder
                .append_data(&mut header, path, data)
                .expect("append");
        };
        add("bin/beat", 0o755, SCRIPT);
        add("erts-14.2/bin/beam.smp", 0o755, b"\x7fELF pretend");
        add(
            &format!("lib/beat-{version}/ebin/beat.app"),
            0o644,
            b"{application, beat, []}.\n",
        );
        add(
            &format!("releases/{version}/start.boot"),
            0o644,
            &[7u8; 3000],
        );
        add(
            &format!("{LONG_DIR}/file_with_a_long_name.txt"),
            0o644,
            b"long",
        );
        let mut dir = tar::Header::new_gnu();
        dir.set_entry_type(EntryType::Directory);
        dir.set_mode(0o755);
        dir.set_size(0);
        builder
            .append_data(&mut dir, "log", io::empty())
            .expect("dir");
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(EntryType::Symlink);
        link.set_mode(0o777);
        link.set_size(0);
        builder
            .append_link(&mut link, "lib/current", format!("beat-{version}"))
            .expect("symlink");
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(EntryType::Symlink);
        link.set_mode(0o777);
        link.set_size(0);
        builder
            .append_link(&mut link, "bin/erl", "../erts-14.2/bin/beam.smp")
            .expect("symlink");
        let mut hard = tar::Header::new_gnu();
        hard.set_entry_type(EntryType::Link);
        hard.set_mode(0o755);
        hard.set_size(0);
        builder
            .append_link(&mut hard, "bin/beat-copy", "bin/beat")
            .expect("hard link");
        gzip(&builder.into_inner().expect("tar"))
    }

    #[test]
    fn unpacks_a_release_with_links_and_long_names() {
        let f = fixture();
        let archive = release("0.1.0");
        f.put("archives/beat-0.1.0.tar.gz", &archive);
        let done = f
            .unpack("archives/beat-0.1.0.tar.gz", "releases/beat/0.1.0")
            .expect("unpack");
        assert!(!done.already);
        assert_eq!(done.sha256, sha(&archive));
        assert_eq!(done.entries, 9);
        let dest = f.root.path().join("releases/beat/0.1.0");
        let mode = |p: &str| fs::metadata(dest.join(p)).expect(p).permissions().mode() & 0o777;
        assert_eq!(mode("bin/beat"), 0o755);
        assert_eq!(mode("erts-14.2/bin/beam.smp"), 0o755);
        assert_eq!(mode("lib/beat-0.1.0/ebin/beat.app"), 0o644);
        assert_eq!(
            fs::read_link(dest.join("lib/current")).expect("link"),
            Path::new("beat-0.1.0")
        );
        assert!(dest.join("lib/current/ebin/beat.app").is_file());
        assert!(dest.join("bin/erl").is_file());
        assert_eq!(
            fs::metadata(dest.join("bin/beat")).expect("meta").ino(),
            fs::metadata(dest.join("bin/beat-copy"))
                .expect("meta")
                .ino()
        );
        assert_eq!(
            fs::read(dest.join(format!("{LONG_DIR}/file_with_a_long_name.txt"))).expect("long"),
            b"long"
        );
        assert!(dest.join("log").is_dir());
        let expected_bytes = (SCRIPT.len() + 12 + 25 + 3000 + 4) as u64;
        assert_eq!(done.bytes, expected_bytes);
        assert!(f.staging_is_empty());
    }

    #[test]
    fn unpacking_again_is_already_done() {
        let f = fixture();
        let archive = release("0.1.0");
        f.put("archives/a.tar.gz", &archive);
        let first = f
            .unpack("archives/a.tar.gz", "releases/beat/0.1.0")
            .expect("unpack");
        let again = f
            .unpack("archives/a.tar.gz", "releases/beat/0.1.0")
            .expect("again");
        assert!(again.already);
        assert_eq!((again.entries, again.bytes), (first.entries, first.bytes));

        // With the digest named, the archive is not even needed any more.
        fs::remove_file(f.root.path().join("archives/a.tar.gz")).expect("rm");
        let request = Unpack {
            sha256: Some(sha(&archive)),
            ..f.request("archives/a.tar.gz", "releases/beat/0.1.0")
        };
        assert!(unpack(&f.root, &request, &f.limits).expect("known").already);
    }

    #[test]
    fn plain_tar_and_dot_prefixed_paths_unpack() {
        let f = fixture();
        let tar = Raw::default()
            .dir("./")
            .dir("./bin/")
            .entry("./bin/run", EntryType::Regular, 0o700, b"#!/bin/sh\n", "")
            .entry("old/", EntryType::Regular, 0o755, b"", "")
            .finish();
        f.put("a.tar", &tar);
        let done = f.unpack("a.tar", "out").expect("unpack");
        assert_eq!(done.entries, 4);
        assert!(f.root.path().join("out/old").is_dir());
        // `a//b` names the same destination as `a/b`.
        assert!(f.unpack("a.tar", "out//").expect("again").already);
        f.unpack("a.tar", "x/y").expect("unpack");
        assert!(f.unpack("a.tar", "x//y").expect("again").already);
        let run = f.root.path().join("out/bin/run");
        assert_eq!(
            fs::metadata(run).expect("meta").permissions().mode() & 0o777,
            0o700
        );
    }

    #[test]
    fn pax_paths_and_global_headers_are_understood() {
        fn record(key: &str, value: &str) -> Vec<u8> {
            // "<length> key=value\n", the length counting its own digits.
            let body = format!(" {key}={value}\n");
            let mut len = body.len();
            while len.to_string().len() + body.len() != len {
                len = len.to_string().len() + body.len();
            }
            format!("{len}{body}").into_bytes()
        }
        let long = format!("{LONG_DIR}/{}", "n".repeat(120));
        let global = record("comment", "git archive says hello");
        let local = record("path", &long);
        let mut pax = tar::Header::new_ustar();
        pax.set_entry_type(EntryType::XHeader);
        pax.set_size(local.len() as u64);
        pax.set_path("PaxHeaders/x").expect("path");
        pax.set_cksum();
        let mut pax_global = tar::Header::new_ustar();
        pax_global.set_entry_type(EntryType::XGlobalHeader);
        pax_global.set_size(global.len() as u64);
        pax_global.set_path("pax_global_header").expect("path");
        pax_global.set_cksum();
        let tar = Raw::default()
            .push(&pax_global, &global)
            .push(&pax, &local)
            .file("truncated-name", b"pax")
            .finish();
        f_unpack_ok(&tar, |dest, done| {
            assert_eq!(done.entries, 1);
            assert_eq!(fs::read(dest.join(&long)).expect("pax path"), b"pax");
        });
    }

    fn f_unpack_ok(bytes: &[u8], check: impl FnOnce(&Path, &Unpacked)) {
        let f = fixture();
        f.put("x.tar", bytes);
        let done = f.unpack("x.tar", "out").expect("unpack");
        check(&f.root.path().join("out"), &done);
    }

    #[test]
    fn dest_holding_something_else_is_a_conflict() {
        let f = fixture();
        f.put("a.tar.gz", &release("0.1.0"));
        f.put("b.tar.gz", &release("0.2.0"));
        fs::create_dir_all(f.root.path().join("releases/beat/0.0.9")).expect("mkdir");
        fs::write(f.root.path().join("releases/beat/0.0.9/x"), b"x").expect("write");
        let err = f.unpack("a.tar.gz", "releases/beat/0.0.9").unwrap_err();
        assert!(matches!(err, Error::Conflict { .. }), "{err}");
        assert!(err.to_string().contains("releases/beat/0.0.9"), "{err}");
        assert!(err.to_string().contains("did not unpack"), "{err}");

        f.unpack("a.tar.gz", "releases/beat/0.1.0").expect("unpack");
        let err = f.unpack("b.tar.gz", "releases/beat/0.1.0").unwrap_err();
        assert!(matches!(err, Error::Conflict { .. }), "{err}");
        assert!(err.to_string().contains("a.tar.gz"), "{err}");

        f.put("file", b"x");
        let err = f.unpack("a.tar.gz", "file").unwrap_err();
        assert!(matches!(err, Error::Conflict { .. }), "{err}");
        assert!(f.staging_is_empty());
    }

    #[test]
    fn replaced_dest_is_not_taken_for_done() {
        let f = fixture();
        f.put("a.tar.gz", &release("0.1.0"));
        f.unpack("a.tar.gz", "rel").expect("unpack");
        let dest = f.root.path().join("rel");
        fs::remove_dir_all(&dest).expect("rm");
        fs::create_dir(&dest).expect("mkdir");
        let err = f.unpack("a.tar.gz", "rel").unwrap_err();
        assert!(matches!(err, Error::Conflict { .. }), "{err}");
    }

    #[test]
    fn marker_without_dest_is_ignored() {
        // A crash after the marker was written and before the rename.
        let f = fixture();
        f.put("a.tar.gz", &release("0.1.0"));
        f.unpack("a.tar.gz", "rel").expect("unpack");
        fs::remove_dir_all(f.root.path().join("rel")).expect("rm");
        let again = f.unpack("a.tar.gz", "rel").expect("unpack again");
        assert!(!again.already);
        assert!(f.root.path().join("rel/bin/beat").is_file());
        assert!(f.unpack("a.tar.gz", "rel").expect("third").already);
    }

    #[test]
    fn wrong_digest_and_missing_archive_are_refused() {
        let f = fixture();
        f.put("a.tar.gz", &release("0.1.0"));
        let request = Unpack {
            sha256: Some(sha(b"other")),
            ..f.request("a.tar.gz", "rel")
        };
        let err = unpack(&f.root, &request, &f.limits).unwrap_err();
        assert!(matches!(err, Error::ChecksumMismatch { .. }), "{err}");
        assert!(err.to_string().contains(&sha(b"other").to_hex()), "{err}");
        assert!(!f.root.path().join("rel").exists());

        let err = f.unpack("nothere.tar.gz", "rel").unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }), "{err}");
        assert!(err.to_string().contains("nothere.tar.gz"), "{err}");
        fs::create_dir(f.root.path().join("adir")).expect("mkdir");
        let err = f.unpack("adir", "rel").unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }), "{err}");
        let err = f.unpack("a.tar.gz", ".erel/x").unwrap_err();
        assert!(matches!(err, Error::InvalidPath { .. }), "{err}");
    }

    #[test]
    fn refuses_escaping_paths() {
        let f = fixture();
        let unsafe_ = ErrorKind::UnsafeArchive;
        f.refuses(
            &Raw::default()
                .file("ok", b"x")
                .file("../escape", b"x")
                .finish(),
            unsafe_,
            "../escape",
        );
        f.refuses(
            &Raw::default().file("a/../../x", b"x").finish(),
            unsafe_,
            "a/../../x",
        );
        let absolute = f.dir.path().join("abs");
        let absolute = absolute.to_str().expect("utf-8");
        f.refuses(
            &Raw::default().file(absolute, b"x").finish(),
            unsafe_,
            absolute,
        );
        assert!(!Path::new(absolute).exists());
    }

    #[test]
    fn refuses_escaping_symlinks() {
        let f = fixture();
        let unsafe_ = ErrorKind::UnsafeArchive;
        f.refuses(
            &Raw::default().symlink("x", "../../..").finish(),
            unsafe_,
            "'x'",
        );
        f.refuses(
            &Raw::default().symlink("d/x", "../..").finish(),
            unsafe_,
            "d/x",
        );
        f.refuses(
            &Raw::default().symlink("etc", "/etc").finish(),
            unsafe_,
            "absolute",
        );
        // Through another link, in either order.
        f.refuses(
            &Raw::default()
                .symlink("s", ".")
                .symlink("e", "s/..")
                .finish(),
            unsafe_,
            "'e'",
        );
        f.refuses(
            &Raw::default()
                .symlink("e", "s/../x")
                .dir("d/")
                .symlink("s", "d/..")
                .symlink("d/u", "..")
                .finish(),
            unsafe_,
            "outside",
        );
        f.refuses(
            &Raw::default()
                .symlink("a", "b")
                .symlink("b", "a")
                .symlink("c", "a/..")
                .finish(),
            unsafe_,
            "loop",
        );
    }

    #[test]
    fn refuses_writing_through_symlinks() {
        let f = fixture();
        let unsafe_ = ErrorKind::UnsafeArchive;
        f.refuses(
            &Raw::default()
                .dir("d/")
                .symlink("a", "d")
                .file("a/x", b"x")
                .finish(),
            unsafe_,
            "a/x",
        );
        f.refuses(
            &Raw::default()
                .symlink("a", "/tmp")
                .file("a/x", b"x")
                .finish(),
            unsafe_,
            "'a'",
        );
        // Replacing a link by a file, or a file by a link.
        f.refuses(
            &Raw::default().symlink("a", "b").file("a", b"x").finish(),
            unsafe_,
            "twice",
        );
        f.refuses(
            &Raw::default().file("a", b"x").symlink("a", "b").finish(),
            unsafe_,
            "twice",
        );
        f.refuses(
            &Raw::default().file("a", b"x").file("a/b", b"x").finish(),
            unsafe_,
            "not a directory",
        );
    }

    #[test]
    fn refuses_hard_links_outside_or_ahead() {
        let f = fixture();
        let unsafe_ = ErrorKind::UnsafeArchive;
        f.refuses(
            &Raw::default().hard_link("p", "/etc/passwd").finish(),
            unsafe_,
            "'p'",
        );
        f.refuses(
            &Raw::default().hard_link("p", "../outside").finish(),
            unsafe_,
            "../outside",
        );
        f.refuses(
            &Raw::default()
                .hard_link("p", "later")
                .file("later", b"x")
                .finish(),
            unsafe_,
            "not extracted",
        );
        f.refuses(
            &Raw::default()
                .dir("d/")
                .symlink("s", "d")
                .file("d/f", b"x")
                .hard_link("p", "s/f")
                .finish(),
            unsafe_,
            "symlink",
        );
        f.refuses(
            &Raw::default().dir("d/").hard_link("p", "d").finish(),
            unsafe_,
            "regular file",
        );
    }

    #[test]
    fn refuses_devices_fifos_and_special_bits() {
        let f = fixture();
        let unsafe_ = ErrorKind::UnsafeArchive;
        f.refuses(
            &Raw::default()
                .entry("dev/null", EntryType::Char, 0o666, b"", "")
                .finish(),
            unsafe_,
            "character device",
        );
        f.refuses(
            &Raw::default()
                .entry("sda", EntryType::Block, 0o660, b"", "")
                .finish(),
            unsafe_,
            "block device",
        );
        f.refuses(
            &Raw::default()
                .entry("pipe", EntryType::Fifo, 0o644, b"", "")
                .finish(),
            unsafe_,
            "fifo",
        );
        f.refuses(
            &Raw::default()
                .entry("bin/su", EntryType::Regular, 0o4755, b"x", "")
                .finish(),
            unsafe_,
            "setuid",
        );
        f.refuses(
            &Raw::default()
                .entry("bin/sg", EntryType::Regular, 0o2755, b"x", "")
                .finish(),
            unsafe_,
            "bin/sg",
        );
        f.refuses(
            &Raw::default()
                .entry("vol", EntryType::new(b'M'), 0o644, b"", "")
                .finish(),
            unsafe_,
            "multi-volume",
        );
        f.refuses(
            &Raw::default()
                .entry("names", EntryType::new(b'N'), 0o644, b"", "")
                .finish(),
            unsafe_,
            "'N' (obsolete GNU names list)",
        );
        f.refuses(
            &Raw::default()
                .entry("vendor", EntryType::new(b'Z'), 0o644, b"abc", "")
                .finish(),
            unsafe_,
            "'Z' (vendor extension)",
        );
        f.refuses(
            &Raw::default()
                .entry("odd", EntryType::new(b'9'), 0o644, b"", "")
                .finish(),
            unsafe_,
            "'9' (unknown type)",
        );
    }

    #[test]
    fn refuses_too_many_entries() {
        let mut f = fixture();
        f.limits.max_unpack_entries = 5;
        let mut raw = Raw::default();
        for i in 0..10 {
            raw = raw.file(&format!("f{i}"), b"x");
        }
        let err = f.refuses(&raw.finish(), ErrorKind::TooLarge, "f5");
        assert!(err.to_string().contains("limit of 5"), "{err}");
    }

    #[test]
    fn stops_a_decompression_bomb_at_the_limit() {
        let f = fixture();
        // 200 MiB of zeros, gzipped to about 200 KiB.
        let size: u64 = 200 << 20;
        let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
        let header = Raw::header(b"zeros", EntryType::Regular, 0o644, size, b"");
        encoder.write_all(header.as_bytes()).expect("gzip");
        io::copy(&mut io::repeat(0).take(size), &mut encoder).expect("gzip");
        encoder.write_all(&[0u8; 1024]).expect("gzip");
        let bomb = encoder.finish().expect("gzip");
        let started = Instant::now();
        let err = f.refuses(&bomb, ErrorKind::TooLarge, "zeros");
        assert!(
            err.to_string().contains(&format!("limit of {}", 10 << 20)),
            "{err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );

        // Many files, each within the limit: stops at the one that crosses it.
        let mut raw = Raw::default();
        let mib = vec![1u8; 1 << 20];
        for i in 0..12 {
            raw = raw.file(&format!("part{i:02}"), &mib);
        }
        f.refuses(&gzip(&raw.finish()), ErrorKind::TooLarge, "part10");
    }

    #[test]
    fn refuses_headers_that_lie_about_sizes() {
        let f = fixture();
        // Says 1000 bytes, holds 100, then the archive ends.
        let header = Raw::header(b"short", EntryType::Regular, 0o644, 1000, b"");
        let mut bytes = header.as_bytes().to_vec();
        bytes.extend([b'a'; 100]);
        f.refuses(&bytes, ErrorKind::BadArchive, "short");
        // Says 10 bytes, holds 2000: the rest is read as a header and fails its checksum.
        let header = Raw::header(b"long", EntryType::Regular, 0o644, 10, b"");
        let mut bytes = header.as_bytes().to_vec();
        bytes.extend([b'a'; 2048]);
        bytes.extend([0u8; 1024]);
        f.refuses(&bytes, ErrorKind::BadArchive, "after entry 1");
        // A long-name header of 2 MiB would be held in memory: refused.
        let name = vec![b'n'; 2 << 20];
        let header = Raw::header(
            b"././@LongLink",
            EntryType::GNULongName,
            0o644,
            name.len() as u64,
            b"",
        );
        let bytes = Raw::default().push(&header, &name).file("x", b"x").finish();
        f.refuses(&gzip(&bytes), ErrorKind::BadArchive, "extended header");
    }

    #[test]
    fn a_header_size_the_reader_cannot_use_is_refused_naming_its_entry() {
        let f = fixture();
        // Base-256 sizes: the largest, and a negative one.
        for size in [
            [0x80].iter().chain(&[0xff; 11]),
            [0xff; 12][..1].iter().chain(&[0xff; 11]),
        ] {
            let mut header = Raw::header(b"huge-size", EntryType::Regular, 0o644, 0, b"");
            for (at, byte) in header.as_old_mut().size.iter_mut().zip(size) {
                *at = *byte;
            }
            header.set_cksum();
            let bytes = Raw::default().push(&header, b"").file("x", b"x").finish();
            f.refuses(&bytes, ErrorKind::BadArchive, "entry 'huge-size'");
            // After another entry, and gzipped.
            let bytes = Raw::default()
                .file("first", b"1")
                .push(&header, b"")
                .finish();
            f.refuses(&gzip(&bytes), ErrorKind::BadArchive, "entry 'huge-size'");
        }
        // A PAX size of u64::MAX, which the reader cannot pad to a block.
        let record = b"29 size=18446744073709551615\n";
        let pax = Raw::header(b"pax", EntryType::XHeader, 0o644, record.len() as u64, b"");
        let bytes = Raw::default()
            .push(&pax, record)
            .file("pax-size", b"x")
            .finish();
        f.refuses(&bytes, ErrorKind::BadArchive, "entry 'pax-size'");
    }

    #[test]
    fn refuses_truncated_and_foreign_archives() {
        let f = fixture();
        let good = release("0.1.0");
        f.refuses(
            &good[..good.len() / 2],
            ErrorKind::BadArchive,
            "hostile.tar",
        );
        // Cut before the gzip trailer: the tar looks complete, the CRC is never seen.
        f.refuses(
            &good[..good.len() - 4],
            ErrorKind::BadArchive,
            "hostile.tar",
        );
        let mut corrupt = good.clone();
        let at = corrupt.len() - 6;
        corrupt[at] ^= 0xff;
        f.refuses(&corrupt, ErrorKind::BadArchive, "hostile.tar");
        f.refuses(
            b"just some text, not an archive at all",
            ErrorKind::BadArchive,
            "hostile.tar",
        );
        f.refuses(&[0x1f, 0x8b, 1, 2, 3], ErrorKind::BadArchive, "hostile.tar");
        f.refuses(b"", ErrorKind::BadArchive, "hostile.tar");
        // Other compressors are named.
        let mut xz = b"\xfd7zXZ\x00".to_vec();
        xz.resize(2048, 7);
        f.refuses(&xz, ErrorKind::BadArchive, "xz data");
        let mut zstd = vec![0x28, 0xb5, 0x2f, 0xfd];
        zstd.resize(100, 1);
        f.refuses(&gzip(&zstd), ErrorKind::BadArchive, "zstd data");
        // A tar cut at an entry boundary, without its end-of-archive marker.
        let mut cut = Raw::default().file("a", b"a").finish();
        cut.truncate(1024);
        f.refuses(&cut, ErrorKind::BadArchive, "end-of-archive");
    }

    #[test]
    fn concurrent_unpacks_into_one_dest_are_busy() {
        let f = fixture();
        let dest = f.root.resolve("rel").expect("resolve");
        let _held = PathLock::acquire(dest, "rel").expect("lock");
        f.put("a.tar.gz", &release("0.1.0"));
        let err = f.unpack("a.tar.gz", "rel").unwrap_err();
        assert!(matches!(err, Error::Busy(_)), "{err}");
    }

    #[test]
    fn sweep_removes_interrupted_unpacks() {
        let f = fixture();
        let left = f.root.state("unpack").join("123-456-0/tree/bin");
        fs::create_dir_all(&left).expect("mkdir");
        fs::write(left.join("x"), b"x").expect("write");
        sweep_stale(&f.root).expect("sweep");
        assert!(f.staging_is_empty());
    }

    #[test]
    fn special_file_types_never_reach_disk() {
        // Belt and braces for the refusals above: nothing under the root is special.
        let f = fixture();
        f.put("a.tar.gz", &release("0.1.0"));
        f.unpack("a.tar.gz", "rel").expect("unpack");
        for (path, _) in f.snapshot() {
            let meta = fs::symlink_metadata(&path).expect("meta");
            let t = meta.file_type();
            assert!(
                !t.is_char_device() && !t.is_block_device() && !t.is_fifo(),
                "{path:?}"
            );
            assert_eq!(meta.permissions().mode() & 0o6000, 0, "{path:?}");
        }
    }

    impl Raw {
        /// A PAX extended header (`x`) holding `records`.
        fn pax(self, records: &[(&str, &[u8])]) -> Self {
            self.pax_typed(EntryType::XHeader, records)
        }

        fn pax_typed(self, kind: EntryType, records: &[(&str, &[u8])]) -> Self {
            let mut data = Vec::new();
            for (key, value) in records {
                let body = 3 + key.len() + value.len();
                let mut len = body + 1;
                while len.to_string().len() + body != len {
                    len = len.to_string().len() + body;
                }
                data.extend(format!("{len} {key}=").into_bytes());
                data.extend_from_slice(value);
                data.push(b'\n');
            }
            let mut header = tar::Header::new_ustar();
            header.set_entry_type(kind);
            header.set_size(data.len() as u64);
            header.set_path("PaxHeaders/x").expect("path");
            header.set_cksum();
            self.push(&header, &data)
        }
    }

    /// A GNU sparse 1.0 entry as GNU tar writes it: map lines, padded, then each
    /// region's data from a block boundary.
    fn sparse_1_0(name: &str, real_size: u64, regions: &[(u64, &[u8])]) -> Raw {
        let mut data = format!("{}\n", regions.len()).into_bytes();
        for (offset, bytes) in regions {
            data.extend(format!("{offset}\n{}\n", bytes.len()).into_bytes());
        }
        data.resize(data.len().div_ceil(512) * 512, 0);
        for (i, (_, bytes)) in regions.iter().enumerate() {
            data.extend_from_slice(bytes);
            if i + 1 != regions.len() {
                data.resize(data.len().div_ceil(512) * 512, 0);
            }
        }
        let real = real_size.to_string();
        Raw::default()
            .pax(&[
                ("GNU.sparse.major", b"1"),
                ("GNU.sparse.minor", b"0"),
                ("GNU.sparse.name", name.as_bytes()),
                ("GNU.sparse.realsize", real.as_bytes()),
            ])
            .entry("./GNUSparseFile.1/x", EntryType::Regular, 0o640, &data, "")
    }

    #[test]
    fn pax_sparse_files_are_expanded_under_their_real_name() {
        let f = fixture();
        let tar = sparse_1_0(
            "data/table.dat",
            10_000,
            &[(3, b"abc"), (4_000, &[b'x'; 700]), (10_000, b"")],
        )
        .finish();
        f.put("s.tar", &tar);
        let done = f.unpack("s.tar", "out").expect("unpack");
        assert_eq!((done.entries, done.bytes), (1, 10_000));
        let out = f.root.path().join("out");
        assert!(!out.join("GNUSparseFile.1").exists());
        let bytes = fs::read(out.join("data/table.dat")).expect("read");
        let mut expected = vec![0u8; 10_000];
        expected[3..6].copy_from_slice(b"abc");
        expected[4_000..4_700].copy_from_slice(&[b'x'; 700]);
        assert_eq!(bytes, expected);
        let mode = fs::metadata(out.join("data/table.dat"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o640);

        // Format 0.1: the map in a record; 0.0: offset/numbytes pairs, real name.
        let mut v00_data = vec![0u8; 514];
        v00_data[..2].copy_from_slice(b"ab");
        v00_data[512..].copy_from_slice(b"cd");
        let v01 = Raw::default()
            .pax(&[
                ("GNU.sparse.major", b"0"),
                ("GNU.sparse.minor", b"1"),
                ("GNU.sparse.name", b"v01"),
                ("GNU.sparse.size", b"2000"),
                ("GNU.sparse.numblocks", b"2"),
                ("GNU.sparse.map", b"1000,3,2000,0"),
            ])
            .entry("GNUSparseFile.7/v01", EntryType::Regular, 0o644, b"xyz", "")
            .pax(&[
                ("GNU.sparse.size", b"600"),
                ("GNU.sparse.numblocks", b"2"),
                ("GNU.sparse.offset", b"0"),
                ("GNU.sparse.numbytes", b"2"),
                ("GNU.sparse.offset", b"598"),
                ("GNU.sparse.numbytes", b"2"),
            ])
            .entry("v00", EntryType::Regular, 0o644, &v00_data, "")
            .finish();
        f.put("v0.tar", &v01);
        f.unpack("v0.tar", "v0").expect("unpack 0.x");
        let out = f.root.path().join("v0");
        let v01 = fs::read(out.join("v01")).expect("v01");
        assert_eq!(v01.len(), 2000);
        assert_eq!(&v01[1000..1003], b"xyz");
        let v00 = fs::read(out.join("v00")).expect("v00");
        assert_eq!(v00.len(), 600);
        assert_eq!((&v00[..2], &v00[598..]), (&b"ab"[..], &b"cd"[..]));
        assert!(v00[2..598].iter().all(|b| *b == 0));
    }

    fn padded(bytes: &[u8]) -> Vec<u8> {
        let mut out = bytes.to_vec();
        out.resize(bytes.len().div_ceil(512) * 512, 0);
        out
    }

    #[test]
    fn bad_pax_sparse_files_are_refused() {
        let f = fixture();
        let bad = ErrorKind::BadArchive;
        // A region beyond the file's size; a map that does not reach it.
        f.refuses(
            &sparse_1_0("a", 100, &[(90, &[b'x'; 20])]).finish(),
            bad,
            "beyond the file's size",
        );
        f.refuses(
            &sparse_1_0("a", 100, &[(10, b"x")]).finish(),
            bad,
            "not at the file's size",
        );
        // Overlapping regions.
        f.refuses(
            &sparse_1_0("a", 600, &[(0, &[b'x'; 512]), (100, &[b'y'; 500])]).finish(),
            ErrorKind::UnsafeArchive,
            "overlaps",
        );
        // A map line that is not a number, and one that never ends.
        let tar = Raw::default()
            .pax(&[
                ("GNU.sparse.major", b"1"),
                ("GNU.sparse.minor", b"0"),
                ("GNU.sparse.name", b"a"),
                ("GNU.sparse.realsize", b"10"),
            ])
            .entry("s", EntryType::Regular, 0o644, &padded(b"1\n-3\n7\n"), "")
            .finish();
        f.refuses(&tar, bad, "'-3'");
        let tar = Raw::default()
            .pax(&[("GNU.sparse.major", b"1"), ("GNU.sparse.realsize", b"10")])
            .entry("s", EntryType::Regular, 0o644, &[b'1'; 1024], "")
            .finish();
        f.refuses(&tar, bad, "does not end");
        // Stored data shorter than the map needs.
        let tar = Raw::default()
            .pax(&[
                ("GNU.sparse.size", b"10"),
                ("GNU.sparse.numblocks", b"1"),
                ("GNU.sparse.map", b"0,10"),
            ])
            .entry("s", EntryType::Regular, 0o644, b"12345", "")
            .finish();
        f.refuses(&tar, bad, "holds 5");
        // Sparse keywords on a directory; an unknown sparse version.
        let tar = Raw::default()
            .pax(&[
                ("GNU.sparse.size", b"10"),
                ("GNU.sparse.numblocks", b"1"),
                ("GNU.sparse.map", b"0,10"),
            ])
            .entry("d/", EntryType::Directory, 0o755, b"", "")
            .finish();
        f.refuses(&tar, ErrorKind::UnsafeArchive, "on a directory entry");
        let tar = Raw::default()
            .pax(&[("GNU.sparse.major", b"2"), ("GNU.sparse.realsize", b"1")])
            .entry("s", EntryType::Regular, 0o644, b"x", "")
            .finish();
        f.refuses(&tar, ErrorKind::UnsafeArchive, "format 2.0");
    }

    #[test]
    fn sparse_expanded_size_counts_against_the_limit() {
        let mut f = fixture();
        f.limits.max_unpack_bytes = 1 << 20;
        // 4 bytes stored, 2 MiB expanded.
        let tar = Raw::default()
            .pax(&[
                ("GNU.sparse.size", b"2097152"),
                ("GNU.sparse.numblocks", b"2"),
                ("GNU.sparse.map", b"0,4,2097152,0"),
            ])
            .entry("big", EntryType::Regular, 0o644, b"abcd", "")
            .finish();
        let err = f.refuses(&tar, ErrorKind::TooLarge, "big");
        assert!(err.to_string().contains("limit of 1048576"), "{err}");
        // Many small sparse files, each under the limit: stops at the one crossing it.
        let mut raw = Raw::default();
        for i in 0..4 {
            raw = raw
                .pax(&[
                    ("GNU.sparse.size", b"400000"),
                    ("GNU.sparse.numblocks", b"1"),
                    ("GNU.sparse.map", b"400000,0"),
                ])
                .entry(&format!("s{i}"), EntryType::Regular, 0o644, b"", "");
        }
        f.refuses(&raw.finish(), ErrorKind::TooLarge, "s2");
    }

    #[test]
    fn pax_records_that_change_meaning_are_refused() {
        let f = fixture();
        let unsafe_ = ErrorKind::UnsafeArchive;
        let file = |raw: Raw| raw.file("f", b"x").finish();
        f.refuses(
            &file(Raw::default().pax(&[("VENDOR.layout", b"striped")])),
            unsafe_,
            "'VENDOR.layout'",
        );
        f.refuses(
            &file(Raw::default().pax(&[("SCHILY.realsize", b"9")])),
            unsafe_,
            "'SCHILY.realsize'",
        );
        f.refuses(
            &file(Raw::default().pax(&[("GNU.volume.offset", b"512")])),
            unsafe_,
            "multi-volume",
        );
        f.refuses(
            &file(Raw::default().pax(&[("path", b"a"), ("path", b"b")])),
            unsafe_,
            "twice",
        );
        f.refuses(
            &file(Raw::default().pax(&[("size", b"+1")])),
            ErrorKind::BadArchive,
            "'+1'",
        );
        // A record whose length is wrong.
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(EntryType::XHeader);
        header.set_size(11);
        header.set_path("PaxHeaders/x").expect("path");
        header.set_cksum();
        f.refuses(
            &file(Raw::default().push(&header, b"99 path=x\n")),
            ErrorKind::BadArchive,
            "malformed pax extension",
        );
        // A global header that would rename or resize every following entry.
        f.refuses(
            &file(Raw::default().pax_typed(EntryType::XGlobalHeader, &[("path", b"x")])),
            unsafe_,
            "every following entry",
        );
        f.refuses(
            &file(Raw::default().pax_typed(EntryType::XGlobalHeader, &[("size", b"0")])),
            unsafe_,
            "every following entry",
        );
        // A local header spent on a global header, as the tar crate would.
        f.refuses(
            &file(
                Raw::default()
                    .pax(&[("path", b"renamed")])
                    .pax_typed(EntryType::XGlobalHeader, &[("comment", b"hi")]),
            ),
            unsafe_,
            "global header",
        );
        // Both a GNU long name and a PAX path, or long link and linkpath.
        let long = Raw::header(b"././@LongLink", EntryType::GNULongName, 0o644, 4, b"");
        f.refuses(
            &file(
                Raw::default()
                    .pax(&[("path", b"pax")])
                    .push(&long, b"gnu\0"),
            ),
            unsafe_,
            "disagree",
        );
        let long = Raw::header(b"././@LongLink", EntryType::GNULongLink, 0o644, 4, b"");
        f.refuses(
            &Raw::default()
                .file("t", b"x")
                .file("u", b"x")
                .pax(&[("linkpath", b"t")])
                .push(&long, b"u\0")
                .symlink("l", "")
                .finish(),
            unsafe_,
            "disagree",
        );
        // Ignored metadata does not stop anything.
        let tar = Raw::default()
            .pax(&[
                ("mtime", b"1700000000.25"),
                ("uname", b"build"),
                ("SCHILY.xattr.user.k", b"v"),
            ])
            .file("kept", b"x")
            .finish();
        f.put("ok.tar", &tar);
        f.unpack("ok.tar", "ok").expect("ignored keywords");
    }

    #[test]
    fn names_with_nul_bytes_are_refused() {
        let f = fixture();
        let long = Raw::header(b"././@LongLink", EntryType::GNULongName, 0o644, 9, b"");
        f.refuses(
            &Raw::default()
                .push(&long, b"ab\0cd/efg")
                .file("x", b"x")
                .finish(),
            ErrorKind::UnsafeArchive,
            "NUL",
        );
        let long = Raw::header(b"././@LongLink", EntryType::GNULongLink, 0o644, 4, b"");
        f.refuses(
            &Raw::default()
                .push(&long, b"a\0b\0")
                .symlink("l", "")
                .finish(),
            ErrorKind::UnsafeArchive,
            "NUL",
        );
    }

    #[test]
    fn gnu_extras_unpack_as_gnu_tar_does() {
        let f = fixture();
        let tar = Raw::default()
            // A volume label: nothing is extracted for it.
            .entry("release 1", EntryType::new(b'V'), 0o644, b"", "")
            // An incremental dump's directory, with its listing.
            .entry("d/", EntryType::new(b'D'), 0o750, b"Yf\0\0", "")
            .file("d/f", b"x")
            // A contiguous file is a regular file.
            .entry("c", EntryType::Continuous, 0o600, b"contiguous", "")
            // A hard link to a symlink links the symlink.
            .symlink("d/s", "f")
            .hard_link("d/s2", "d/s")
            .finish();
        f.put("g.tar", &tar);
        let done = f.unpack("g.tar", "out").expect("unpack");
        assert_eq!(done.entries, 5);
        let out = f.root.path().join("out");
        assert_eq!(fs::read_dir(&out).expect("list").count(), 2);
        assert_eq!(
            fs::metadata(out.join("d")).expect("d").permissions().mode() & 0o777,
            0o750
        );
        assert_eq!(fs::read(out.join("c")).expect("c"), b"contiguous");
        assert_eq!(
            fs::read_link(out.join("d/s2")).expect("link"),
            Path::new("f")
        );
        assert_eq!(
            fs::symlink_metadata(out.join("d/s")).expect("s").ino(),
            fs::symlink_metadata(out.join("d/s2")).expect("s2").ino()
        );
    }

    /// An old GNU sparse entry: `regions` in the header's four slots (None for a
    /// blank slot), data `stored`, expanded size `real`.
    fn old_sparse(regions: &[Option<(u64, u64)>], stored: &[u8], real: u64) -> Raw {
        let mut header = tar::Header::new_gnu();
        header.set_path("sparse.dat").expect("path");
        header.set_entry_type(EntryType::GNUSparse);
        header.set_mode(0o644);
        header.set_size(stored.len() as u64);
        let gnu = header.as_gnu_mut().expect("gnu");
        for (slot, region) in gnu.sparse.iter_mut().zip(regions) {
            if let Some((offset, length)) = region {
                slot.offset[..11].copy_from_slice(format!("{offset:011o}").as_bytes());
                slot.numbytes[..11].copy_from_slice(format!("{length:011o}").as_bytes());
            }
        }
        gnu.realsize[..11].copy_from_slice(format!("{real:011o}").as_bytes());
        header.set_cksum();
        Raw::default().push(&header, stored)
    }

    #[test]
    fn old_gnu_sparse_files_are_expanded_and_checked() {
        let f = fixture();
        // As GNU tar writes it: a last empty region at the end when the file ends in
        // a hole.
        let tar = old_sparse(
            &[Some((0, 512)), Some((4096, 3)), Some((5000, 0))],
            &{
                let mut data = vec![b'a'; 512];
                data.extend(b"xyz");
                data
            },
            5000,
        )
        .finish();
        f.put("s.tar", &tar);
        let done = f.unpack("s.tar", "out").expect("unpack");
        assert_eq!(done.bytes, 5000);
        let bytes = fs::read(f.root.path().join("out/sparse.dat")).expect("read");
        assert_eq!(bytes.len(), 5000);
        assert_eq!(&bytes[..512], &[b'a'; 512][..]);
        assert_eq!(&bytes[4096..4099], b"xyz");
        assert!(bytes[512..4096].iter().all(|b| *b == 0) && bytes[4099..].iter().all(|b| *b == 0));
        // A region after a blank slot: GNU tar stops at the blank one.
        f.refuses(
            &old_sparse(&[Some((0, 512)), None, Some((4096, 3))], &[b'a'; 515], 4099).finish(),
            ErrorKind::UnsafeArchive,
            "after the empty slot 1",
        );
        // The expanded size counts against the limit.
        let mut small = fixture();
        small.limits.max_unpack_bytes = 4096;
        small.refuses(&tar, ErrorKind::TooLarge, "sparse.dat");
    }

    #[test]
    fn a_sparse_file_of_each_format_counts_its_real_size_exactly() {
        // Regions at unaligned offsets so that 1.0 pads between them, and a map that
        // takes a block of its own.
        let regions: &[(u64, &[u8])] = &[(3, b"abc"), (4_000, &[b'x'; 700]), (10_000, b"")];
        let v10 = sparse_1_0("v10.dat", 10_000, regions).finish();
        let mut v00_data = b"abc".to_vec();
        v00_data.resize(512, 0);
        v00_data.extend([b'x'; 700]);
        let v00 = Raw::default()
            .pax(&[
                ("GNU.sparse.size", b"10000"),
                ("GNU.sparse.numblocks", b"3"),
                ("GNU.sparse.offset", b"3"),
                ("GNU.sparse.numbytes", b"3"),
                ("GNU.sparse.offset", b"4000"),
                ("GNU.sparse.numbytes", b"700"),
                ("GNU.sparse.offset", b"10000"),
                ("GNU.sparse.numbytes", b"0"),
            ])
            .entry("v00.dat", EntryType::Regular, 0o644, &v00_data, "")
            .finish();
        for (tar, name) in [(v10, "v10.dat"), (v00, "v00.dat")] {
            let mut at_limit = fixture();
            at_limit.limits.max_unpack_bytes = 10_000;
            at_limit.put("s.tar", &tar);
            let done = at_limit
                .unpack("s.tar", "out")
                .unwrap_or_else(|e| panic!("{name} at the limit: {e}"));
            assert_eq!(done.bytes, 10_000, "{name}");
            let mut over = fixture();
            over.limits.max_unpack_bytes = 9_999;
            over.refuses(&tar, ErrorKind::TooLarge, name);
        }
    }

    #[test]
    fn entries_readers_disagree_on_are_refused() {
        let f = fixture();
        let unsafe_ = ErrorKind::UnsafeArchive;
        // GNU tar reads a hard link's size as 0, the tar crate skips the data.
        f.refuses(
            &Raw::default()
                .file("t", b"x")
                .entry("h", EntryType::Link, 0o644, b"hidden", "t")
                .finish(),
            unsafe_,
            "a hard link entry that says it holds 6 bytes",
        );
        // Directories and symlinks that claim data: GNU tar reads it as headers.
        let hidden = Raw::default().file("hidden", b"H").bytes;
        f.refuses(
            &Raw::default()
                .entry("d/", EntryType::Directory, 0o755, &hidden, "")
                .finish(),
            unsafe_,
            "a directory entry that says it holds 1024 bytes",
        );
        f.refuses(
            &Raw::default()
                .entry("s", EntryType::Symlink, 0o777, &hidden, "t")
                .finish(),
            unsafe_,
            "a symlink entry that says it holds 1024 bytes",
        );
        // A file whose name ends in '/' but which holds data.
        f.refuses(
            &Raw::default().file("dir/", b"data").finish(),
            unsafe_,
            "ends in '/'",
        );
        // A hard-linked symlink is checked from where the link puts it.
        f.refuses(
            &Raw::default()
                .dir("a/")
                .dir("a/b/")
                .symlink("a/b/s", "../../x")
                .hard_link("top", "a/b/s")
                .finish(),
            unsafe_,
            "'top'",
        );
        // A ustar header of another version with a prefix.
        let mut odd = tar::Header::new_ustar();
        odd.set_path("dir/file").expect("path");
        odd.as_ustar_mut().expect("ustar").prefix[..3].copy_from_slice(b"pre");
        odd.as_mut_bytes()[263..265].copy_from_slice(b"\0\0");
        odd.set_size(0);
        odd.set_cksum();
        f.refuses(
            &Raw::default().push(&odd, b"").finish(),
            unsafe_,
            "name prefix",
        );
        // Extension headers that the tar crate does not fold (no ustar or GNU magic).
        let mut v7 = tar::Header::new_old();
        v7.as_old_mut().name[..4].copy_from_slice(b"long");
        v7.set_entry_type(EntryType::GNULongName);
        v7.set_size(0);
        v7.set_cksum();
        f.refuses(
            &Raw::default().push(&v7, b"").finish(),
            unsafe_,
            "without ustar or GNU magic",
        );
    }
}
