//! Sparse files (GNU tar manual, "Storing Sparse Files"): old GNU (`S`), whose map the
//! tar crate expands, and the PAX formats 0.0, 0.1 and 1.0, written here with their
//! holes kept and at their real size.
//!
//! Refused: a sparse map that overlaps, leaves the file, does not match the stored
//! data, or (old GNU) goes on after an empty slot where GNU tar stops reading it; a 1.0
//! map above [`MAX_EXTENDED_HEADER`]. The expanded size counts against
//! [`Limits::max_unpack_bytes`](crate::settings::Limits::max_unpack_bytes).

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use erel_proto::text::quote;

use super::entries::{Extraction, MAX_EXTENDED_HEADER};
use super::pax::{self, malformed, unsupported, MapSource, PaxSparse, Refusal};
use super::stream::BLOCK;
use crate::error::{IoContext, Result};

/// One data region of a sparse file: `length` bytes at byte `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Region {
    /// Offset in the expanded file, bytes.
    pub(super) offset: u64,
    /// Length, bytes.
    pub(super) length: u64,
}

/// Regions from a flat list of offset, length pairs.
pub(super) fn regions(numbers: &[u64]) -> Vec<Region> {
    let pair = |p: &[u64]| Region {
        offset: p[0],
        length: p[1],
    };
    numbers.chunks(2).map(pair).collect()
}

impl Extraction<'_> {
    /// Writes a GNU sparse file stored in PAX format: the data regions land at their
    /// offsets, the rest stays a hole, and the file gets its expanded size.
    pub(super) fn write_pax_sparse<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        name: &str,
        path: &Path,
        mode: u32,
        sparse: &PaxSparse,
    ) -> Result<()> {
        let stored = entry.size();
        self.announce(name, sparse.real_size)?;
        let (regions, map_len) = match &sparse.map {
            MapSource::Records(regions) => (regions.clone(), 0),
            MapSource::Data => self.read_map(entry, name, stored)?,
        };
        // The map and the padding around regions are read but not unpacked: up to the
        // bound on an extended header, they do not count as unpacked bytes, so a sparse
        // file counts exactly its real size in every format.
        let mut forgivable = MAX_EXTENDED_HEADER;
        let mut forgive = |consumed: &mut u64, bytes: u64| {
            let forgiven = bytes.min(forgivable);
            forgivable -= forgiven;
            *consumed = consumed.saturating_sub(forgiven);
        };
        forgive(&mut self.consumed, map_len);
        let after_map = stored - map_len;
        let data = check_regions(&regions, sparse.real_size, after_map)
            .map_err(|r| self.refusal(name, r))?;
        // A map is at most MAX_EXTENDED_HEADER bytes and forgiven whole, so the real
        // size announced above still fits: count the holes now.
        self.consumed += sparse.real_size - data;
        let mut out = self.create_within_reserve(name, path, sparse.real_size)?;
        let mut at = 0u64;
        for region in regions.iter().filter(|r| r.length > 0) {
            // Each region's data starts on a block boundary.
            let start = blocks(at).unwrap_or(at);
            forgive(&mut self.consumed, start - at);
            self.copy_exact(entry, name, start - at, None)?;
            out.seek(SeekFrom::Start(region.offset))
                .io("seek in", path)?;
            self.copy_exact(entry, name, region.length, Some((&mut out, path)))?;
            at = start + region.length;
        }
        forgive(&mut self.consumed, after_map.saturating_sub(at));
        self.drain(entry, name)?;
        self.finish_file(out, path, sparse.real_size, mode)
    }

    /// Copies exactly `len` bytes of the entry to `out`, or discards them without one.
    fn copy_exact(
        &mut self,
        entry: &mut impl Read,
        name: &str,
        len: u64,
        mut out: Option<(&mut std::fs::File, &Path)>,
    ) -> Result<()> {
        let mut part = entry.take(len);
        let mut copied = 0u64;
        while let n @ 1.. = self.read_chunk(&mut part, name)? {
            if let Some((file, path)) = out.as_mut() {
                file.write_all(&self.buffer[..n]).io("write", *path)?;
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
    fn read_map(
        &mut self,
        entry: &mut impl Read,
        name: &str,
        stored: u64,
    ) -> Result<(Vec<Region>, u64)> {
        let mut text: Vec<u8> = Vec::new();
        let mut numbers: Vec<u64> = Vec::new();
        let mut parsed = 0usize;
        while numbers
            .first()
            .map(|n| n.saturating_mul(2).saturating_add(1))
            != Some(numbers.len() as u64)
        {
            if let Some(line) = text[parsed..].iter().position(|b| *b == b'\n') {
                let value = pax::number("a sparse map number", &text[parsed..parsed + line])
                    .map_err(|r| self.refusal(name, r))?;
                parsed += line + 1;
                numbers.push(value);
                continue;
            }
            let grown = text.len() as u64 + BLOCK;
            if grown > MAX_EXTENDED_HEADER || grown > stored {
                return Err(self.bad(format!(
                    "entry '{name}': its GNU sparse map does not end within {} bytes",
                    grown.min(stored).min(MAX_EXTENDED_HEADER),
                    name = quote(name)
                )));
            }
            let mut block = entry.take(BLOCK);
            while let n @ 1.. = self.read_chunk(&mut block, name)? {
                text.extend_from_slice(&self.buffer[..n]);
            }
            if text.len() as u64 != grown {
                return Err(self.bad(format!(
                    "entry '{name}' is cut short in its sparse map",
                    name = quote(name)
                )));
            }
        }
        Ok((regions(&numbers[1..]), text.len() as u64))
    }
}

/// Checks the four map slots of an old GNU sparse header the way GNU tar reads them
/// (`oldgnu_get_sparse_info`): the map ends at the first slot whose size is empty, and
/// no extension block is read after that. The tar crate skips empty slots and reads on,
/// so a header with regions or extensions after an empty slot means two different
/// files; it is refused. (Regions inside extension blocks are read by the tar crate
/// alone.)
pub(super) fn check_old_slots(header: &tar::Header) -> std::result::Result<(), Refusal> {
    let Some(gnu) = header.as_gnu() else {
        return Ok(()); // the tar crate refuses an 'S' entry without a GNU header
    };
    let Some(end) = gnu.sparse.iter().position(|slot| slot.numbytes[0] == 0) else {
        return Ok(());
    };
    let blank =
        |slot: &tar::GnuSparseHeader| slot.offset.iter().chain(&slot.numbytes).all(|b| *b == 0);
    if !gnu.sparse[end..].iter().all(blank) || gnu.isextended[0] != 0 {
        return unsupported(format!(
            "its old GNU sparse map goes on after the empty slot {end}, where GNU tar stops \
             reading it"
        ));
    }
    Ok(())
}

/// `n` rounded up to a whole number of blocks.
fn blocks(n: u64) -> Option<u64> {
    n.checked_add(BLOCK - 1).map(|n| n & !(BLOCK - 1))
}

/// Checks a sparse map against the file's expanded size and the bytes stored for it
/// after the map (`stored`), the way GNU tar lays them out (`sparse_extract_region`):
/// regions in increasing order, not overlapping, inside the file, the last one ending
/// at its size (a file that ends in a hole has a last region of length 0 there); each
/// region's data starts on a block boundary. Returns the bytes of data to copy.
fn check_regions(
    regions: &[Region],
    real_size: u64,
    stored: u64,
) -> std::result::Result<u64, Refusal> {
    let mut end = 0u64;
    let mut needed = 0u64;
    let mut data = 0u64;
    let overflow = || Refusal::Malformed("sparse map offsets overflow".into());
    for (i, region) in regions.iter().enumerate() {
        if region.offset < end {
            return unsupported(format!(
                "sparse map region {i} at offset {} overlaps or precedes the one before it",
                region.offset
            ));
        }
        if region.length == 0 && i + 1 != regions.len() {
            return malformed(format!(
                "sparse map region {i} is empty and not the last one"
            ));
        }
        end = region
            .offset
            .checked_add(region.length)
            .ok_or_else(overflow)?;
        if end > real_size {
            return malformed(format!(
                "sparse map region {i} ends at {end}, beyond the file's size of {real_size}"
            ));
        }
        // Each region's data starts on a block boundary of the stored data (an empty
        // region reads nothing).
        if region.length > 0 {
            needed = blocks(needed).ok_or_else(overflow)?;
            needed = needed.checked_add(region.length).ok_or_else(overflow)?;
        }
        data += region.length;
    }
    if end != real_size {
        return malformed(format!(
            "sparse map ends at {end}, not at the file's size of {real_size}"
        ));
    }
    let padded = blocks(needed).ok_or_else(overflow)?;
    if stored < needed || stored > padded {
        return malformed(format!(
            "sparse map needs {needed} bytes of stored data, the entry holds {stored}"
        ));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_regions_are_checked_against_sizes() {
        let r = |offset, length| Region { offset, length };
        assert_eq!(check_regions(&[r(0, 512), r(4096, 0)], 4096, 512), Ok(512));
        // Each region's data starts on a block boundary.
        assert_eq!(check_regions(&[r(0, 10), r(100, 10)], 110, 522), Ok(20));
        assert_eq!(check_regions(&[r(0, 10), r(100, 10)], 110, 1024), Ok(20));
        assert!(check_regions(&[r(0, 10), r(100, 10)], 110, 20).is_err());
        assert!(check_regions(&[r(0, 10), r(100, 10)], 110, 1025).is_err());
        // Overlapping, out of order, outside, not reaching the end, empty in the middle.
        assert!(check_regions(&[r(0, 512), r(100, 10)], 110, 1024).is_err());
        assert!(check_regions(&[r(0, 10)], 5, 10).is_err());
        assert!(check_regions(&[r(0, 10)], 50, 10).is_err());
        assert!(check_regions(&[r(0, 0), r(10, 0)], 10, 0).is_err());
        assert!(check_regions(&[r(u64::MAX, 2)], u64::MAX, 0).is_err());
        // A last empty region needs no padding before it.
        assert_eq!(check_regions(&[r(0, 3), r(100, 0)], 100, 3), Ok(3));
    }
}
