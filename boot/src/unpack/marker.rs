//! What was unpacked from which archive: one marker per destination, written before the
//! tree is renamed into place and read by retention too.
//!
//! A marker `.erel/unpacked/<sha256 of dest>.json` records the destination, the archive,
//! its digest, the counts, and the device, inode and birth time of the staged tree. A
//! rename keeps the inode, so after it the marker and `dest` agree; a `dest` that
//! something else put there is another inode (or the same inode number reused with a
//! later birth time) and never matches.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use erel_proto::{Sha256, Unpacked};
use serde::{Deserialize, Serialize};

use crate::digest;
use crate::error::{Error, IoContext, Result};
use crate::fs::{write_atomic, Root, State};

/// What the agent records about a directory it unpacked.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Marker {
    /// The destination, relative to the root.
    pub(crate) dest: String,
    /// The archive it came from, relative to the root.
    pub(crate) archive: String,
    /// The archive's sha256, hex.
    pub(crate) sha256: String,
    /// Device of the unpacked tree.
    dev: u64,
    /// Inode of the unpacked tree: the same at `dest` after the rename.
    ino: u64,
    /// Birth time of the unpacked tree in nanoseconds since the epoch, where the file
    /// system records one: tells the tree from a later directory reusing its inode.
    born: Option<u128>,
    /// Entries unpacked.
    entries: u64,
    /// Bytes of file content unpacked.
    bytes: u64,
}

impl Marker {
    /// What was unpacked into `tree`, about to become `dest`, from `archive` with
    /// digest `sha256`: its entries and bytes, and the tree's identity.
    pub(super) fn of_tree(
        tree: &Path,
        dest: &str,
        archive: String,
        sha256: Sha256,
        (entries, bytes): (u64, u64),
    ) -> Result<Self> {
        let meta = fs::symlink_metadata(tree).io("inspect", tree)?;
        Ok(Marker {
            dest: dest.to_string(),
            archive,
            sha256: sha256.to_hex(),
            dev: meta.dev(),
            ino: meta.ino(),
            born: birth(&meta),
            entries,
            bytes,
        })
    }

    /// Writes the marker durably; returns its path.
    pub(super) fn write(&self, root: &Root) -> Result<PathBuf> {
        let path = marker_path(root, &self.dest);
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::Internal(format!("cannot encode unpack marker: {e}")))?;
        write_atomic(&path, &json, 0o600)?;
        Ok(path)
    }

    /// The answer to an `Unpack` of the archive with digest `sha256` into this marker's
    /// destination; `already` when it was done before.
    pub(super) fn unpacked(&self, sha256: Sha256, already: bool) -> Unpacked {
        Unpacked {
            sha256,
            entries: self.entries,
            bytes: self.bytes,
            already,
        }
    }
}

/// Birth time in nanoseconds since the epoch, where the file system records one.
fn birth(meta: &fs::Metadata) -> Option<u128> {
    meta.created()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
}

/// The directory of the markers, one `<sha256 of dest>.json` each.
fn markers_dir(root: &Root) -> PathBuf {
    root.state(State::Unpacked)
}

/// Where the marker for `dest_rel` (relative to the root) lives.
pub(crate) fn marker_path(root: &Root, dest_rel: &str) -> PathBuf {
    let key = digest::of_bytes(dest_rel.as_bytes());
    markers_dir(root).join(format!("{}.json", key.to_hex()))
}

/// Every readable marker whose directory is still there as it was unpacked.
pub(crate) fn markers_in_use(root: &Root) -> Vec<Marker> {
    let Ok(entries) = fs::read_dir(markers_dir(root)) else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.file_name().to_string_lossy().ends_with(".json"))
        .filter_map(|entry| read_marker(&entry.path()))
        .filter(|marker| {
            root.resolve(&marker.dest)
                .is_ok_and(|dest| marker_matches(marker, &dest))
        })
        .collect()
}

/// Reads a marker; `None` when missing or unreadable.
pub(crate) fn read_marker(path: &Path) -> Option<Marker> {
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

/// Whether a marker describes what is at `dest` now: same device, inode and birth time.
pub(crate) fn marker_matches(marker: &Marker, dest: &Path) -> bool {
    fs::symlink_metadata(dest).is_ok_and(|meta| {
        meta.is_dir()
            && meta.dev() == marker.dev
            && meta.ino() == marker.ino
            && birth(&meta) == marker.born
    })
}

/// The marker of what this agent unpacked at `dest`, when it is still there.
pub(super) fn current(root: &Root, dest: &Path, dest_rel: &str) -> Option<Marker> {
    read_marker(&marker_path(root, dest_rel)).filter(|marker| marker_matches(marker, dest))
}
