//! On-disk formats of the pool metadata, one module per block type.
//!
//! Every metadata block is 4 KiB and starts with the same 16-byte header:
//! `crc32c (u32) | magic (u32) | own block number (u64)`. The checksum covers bytes 4..4096,
//! the magic says which structure the block is, and the block number catches misdirected
//! writes. All integers are little-endian.

pub mod bitmap;
pub mod node;
pub mod superblock;

use crate::error::{MetaError, MetaResult, Structure};
use crate::types::{MetaBlock, META_BLOCK_SIZE};

/// Length of the common header.
pub const HEADER_LEN: usize = 16;

pub(crate) fn get_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

pub(crate) fn get_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

pub(crate) fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// Fills in the header (magic, block number, checksum) of a packed block. Call last.
pub fn seal(buf: &mut [u8], magic: u32, block: MetaBlock) {
    put_u32(buf, 4, magic);
    put_u64(buf, 8, block.0);
    let crc = crc32c::crc32c(&buf[4..]);
    put_u32(buf, 0, crc);
}

/// Checks the header of a block read from `block` as `structure`: length, checksum, one of
/// the accepted magics, and the stored block number. Returns the magic found.
pub fn verify(
    buf: &[u8],
    block: MetaBlock,
    structure: Structure,
    magics: &[u32],
) -> MetaResult<u32> {
    if buf.len() != META_BLOCK_SIZE {
        return Err(MetaError::corrupt(
            block,
            structure,
            format!("block is {} bytes, expected {META_BLOCK_SIZE}", buf.len()),
        ));
    }
    let stored = get_u32(buf, 0);
    let computed = crc32c::crc32c(&buf[4..]);
    if stored != computed {
        return Err(MetaError::Checksum {
            block,
            structure,
            stored,
            computed,
        });
    }
    let magic = get_u32(buf, 4);
    if !magics.contains(&magic) {
        return Err(MetaError::BadMagic {
            block,
            structure,
            found: magic,
        });
    }
    let own = get_u64(buf, 8);
    if own != block.0 {
        return Err(MetaError::corrupt(
            block,
            structure,
            format!("block says it is block {own} (misdirected write?)"),
        ));
    }
    Ok(magic)
}
