//! Pieces the bench binaries share.

use std::io::Write;
use std::path::Path;

pub const MIB: u64 = 1024 * 1024;

/// Writes `size` bytes (whole MiB) of incompressible-looking data (xorshift64), so that
/// nothing on the way can compress them.
pub fn make_file(path: &Path, size: u64) {
    let mut file = std::io::BufWriter::with_capacity(
        4 * MIB as usize,
        std::fs::File::create(path).expect("create"),
    );
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut block = vec![0u8; MIB as usize];
    for _ in 0..size / MIB {
        for chunk in block.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes());
        }
        file.write_all(&block).expect("write");
    }
    file.flush().expect("flush");
}
