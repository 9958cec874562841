//! Data space map bitmap blocks: one byte of reference count per data block, `PER_BITMAP`
//! blocks per metadata block. 255 means "255 or more: see the overflow tree". A bitmap that
//! would be all zeroes is simply absent from the index tree.
//!
//! Layout after the common header: `index (u64) | reserved (u64)`, then the counts.

use super::{get_u64, put_u64, seal, verify};
use crate::error::{MetaError, MetaResult, Structure};
use crate::types::{MetaBlock, META_BLOCK_SIZE};

/// Magic of bitmap blocks ("TBMP").
pub const BITMAP_MAGIC: u32 = 0x504D_4254;
/// Bytes before the counts.
pub const BITMAP_HEADER: usize = 32;
/// Data blocks covered by one bitmap block.
pub const PER_BITMAP: usize = META_BLOCK_SIZE - BITMAP_HEADER;
/// Count value meaning "look in the overflow tree".
pub const OVERFLOW: u8 = u8::MAX;

/// Packs bitmap number `index` (counts of data blocks `index*PER_BITMAP ..`) at `block`.
pub fn pack(index: u64, counts: &[u8], block: MetaBlock) -> Vec<u8> {
    let mut b = vec![0u8; META_BLOCK_SIZE];
    put_u64(&mut b, 16, index);
    let n = counts.len().min(PER_BITMAP);
    b[BITMAP_HEADER..BITMAP_HEADER + n].copy_from_slice(&counts[..n]);
    seal(&mut b, BITMAP_MAGIC, block);
    b
}

/// Unpacks a bitmap expected to hold number `index`; returns its `PER_BITMAP` counts.
pub fn unpack(b: &[u8], block: MetaBlock, index: u64) -> MetaResult<Vec<u8>> {
    verify(b, block, Structure::Bitmap, &[BITMAP_MAGIC])?;
    let found = get_u64(b, 16);
    if found != index {
        return Err(MetaError::corrupt(
            block,
            Structure::Bitmap,
            format!("bitmap says it is number {found}, index tree says {index}"),
        ));
    }
    Ok(b[BITMAP_HEADER..].to_vec())
}
