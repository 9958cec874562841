//! The superblock: block 0 of the metadata device, written last in every commit (after a
//! flush, with FUA). Everything it needs fits in the first 512-byte sector and the rest of the
//! block is zero, so a write torn at a sector boundary leaves either the old or the new one.

use super::bitmap::PER_BITMAP;
use super::{get_u32, get_u64, put_u32, put_u64, seal, verify};
use crate::error::{MetaError, MetaResult, Structure};
use crate::types::{MetaBlock, META_BLOCK_SIZE};

/// Virtual blocks of a pool with blocks of `data_block_sectors` must be below this: the
/// byte offset of a block's end must fit in 64 bits.
pub fn vblock_limit(data_block_sectors: u32) -> u64 {
    u64::MAX / (data_block_sectors.max(1) as u64 * 512)
}

/// Magic of the superblock ("THSB").
pub const SB_MAGIC: u32 = 0x4253_4854;
/// On-disk format version of a plain pool.
pub const VERSION: u32 = 1;
/// Version of a dedup pool: the same layout plus the dedup flag and the hash tree root
/// (bytes 96..112, zero in a version-1 superblock). A separate version so that a binary
/// without dedup refuses the pool instead of opening it, ignoring the hash tree (its
/// blocks would look free) and leaving its records stale.
pub const VERSION_DEDUP: u32 = 2;
/// Most data blocks a pool may have: the space map keeps one byte per block in RAM, so this
/// bounds it at 4 GiB (256 TiB of 64 KiB blocks).
pub const MAX_DATA_BLOCKS: u64 = 1 << 32;
/// Fewest metadata blocks a pool may have.
pub const MIN_META_BLOCKS: u64 = 64;

/// Most data blocks a metadata device of `nr_meta_blocks` can describe: its space map needs
/// one bitmap block per `PER_BITMAP` data blocks besides the superblock (a device too
/// small for that could never map its whole data device anyway). Bounding the data block
/// count by the metadata device also bounds the space map kept in RAM by it.
pub fn max_data_blocks(nr_meta_blocks: u64) -> u64 {
    nr_meta_blocks
        .saturating_sub(1)
        .saturating_mul(PER_BITMAP as u64)
        .min(MAX_DATA_BLOCKS)
}

/// Decoded superblock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// Data block size in 512-byte sectors.
    pub data_block_sectors: u32,
    /// Number of data blocks the space map covers.
    pub nr_data_blocks: u64,
    /// Number of metadata blocks (including the superblock).
    pub nr_meta_blocks: u64,
    /// User transaction id (`set_transaction_id`).
    pub transaction_id: u64,
    /// Commit counter, +1 per commit.
    pub generation: u64,
    /// Root of the device-details tree (ThinId -> mapping root, mapped count).
    pub device_root: MetaBlock,
    /// Root of the space map index tree (bitmap index -> bitmap block).
    pub sm_index_root: MetaBlock,
    /// Root of the refcount overflow tree (data block -> count >= 255).
    pub overflow_root: MetaBlock,
    /// Held metadata snapshot (`reserve_metadata_snap`): a device tree root kept alive for
    /// tools; block 0 means none.
    pub held_root: MetaBlock,
    /// The pool deduplicates (a `dedup` table); once set, a table without `dedup` is refused.
    pub dedup: bool,
    /// Root of the hash tree (data block -> first 128 bits of its BLAKE3 hash); block 0 (only
    /// in a plain pool) means none.
    pub hash_root: MetaBlock,
}

impl Superblock {
    /// Packs into a 4 KiB block.
    pub fn pack(&self) -> Vec<u8> {
        let mut b = vec![0u8; META_BLOCK_SIZE];
        put_u32(&mut b, 16, if self.dedup { VERSION_DEDUP } else { VERSION });
        put_u32(&mut b, 20, META_BLOCK_SIZE as u32);
        put_u32(&mut b, 24, self.data_block_sectors);
        put_u64(&mut b, 32, self.nr_data_blocks);
        put_u64(&mut b, 40, self.nr_meta_blocks);
        put_u64(&mut b, 48, self.transaction_id);
        put_u64(&mut b, 56, self.generation);
        put_u64(&mut b, 64, self.device_root.0);
        put_u64(&mut b, 72, self.sm_index_root.0);
        put_u64(&mut b, 80, self.overflow_root.0);
        put_u64(&mut b, 88, self.held_root.0);
        put_u32(&mut b, 96, u32::from(self.dedup));
        put_u64(&mut b, 104, self.hash_root.0);
        seal(&mut b, SB_MAGIC, MetaBlock(0));
        b
    }

    /// Unpacks and validates block 0.
    pub fn unpack(b: &[u8]) -> MetaResult<Superblock> {
        let blk = MetaBlock(0);
        let st = Structure::Superblock;
        verify(b, blk, st, &[SB_MAGIC])?;
        let version = get_u32(b, 16);
        if version != VERSION && version != VERSION_DEDUP {
            return Err(MetaError::corrupt(
                blk,
                st,
                format!("unknown version {version}"),
            ));
        }
        let mbs = get_u32(b, 20);
        if mbs as usize != META_BLOCK_SIZE {
            return Err(MetaError::corrupt(
                blk,
                st,
                format!("metadata block size {mbs}"),
            ));
        }
        let sb = Superblock {
            data_block_sectors: get_u32(b, 24),
            nr_data_blocks: get_u64(b, 32),
            nr_meta_blocks: get_u64(b, 40),
            transaction_id: get_u64(b, 48),
            generation: get_u64(b, 56),
            device_root: MetaBlock(get_u64(b, 64)),
            sm_index_root: MetaBlock(get_u64(b, 72)),
            overflow_root: MetaBlock(get_u64(b, 80)),
            held_root: MetaBlock(get_u64(b, 88)),
            dedup: get_u32(b, 96) != 0,
            hash_root: MetaBlock(get_u64(b, 104)),
        };
        // Version 1 has zeroes there; version 2 says dedup and has a hash tree.
        let dedup_ok = if version == VERSION {
            !sb.dedup && sb.hash_root.0 == 0 && get_u32(b, 96) == 0
        } else {
            get_u32(b, 96) == 1 && sb.hash_root.0 != 0
        };
        if !dedup_ok {
            return Err(MetaError::corrupt(
                blk,
                st,
                format!(
                    "version {version} with dedup flag {} and hash tree root {}",
                    get_u32(b, 96),
                    sb.hash_root.0
                ),
            ));
        }
        // Sizes first: everything below is checked against them, and the loader sizes its
        // tables from them.
        if sb.nr_meta_blocks < MIN_META_BLOCKS {
            return Err(MetaError::corrupt(
                blk,
                st,
                format!(
                    "{} metadata blocks, fewer than the minimum {MIN_META_BLOCKS}",
                    sb.nr_meta_blocks
                ),
            ));
        }
        let max_data = max_data_blocks(sb.nr_meta_blocks);
        if sb.nr_data_blocks > max_data {
            return Err(MetaError::corrupt(
                blk,
                st,
                format!(
                    "{} data blocks, but {} metadata blocks describe at most {max_data}",
                    sb.nr_data_blocks, sb.nr_meta_blocks
                ),
            ));
        }
        if sb.held_root.0 >= sb.nr_meta_blocks {
            return Err(MetaError::corrupt(
                blk,
                st,
                format!(
                    "held root {} outside 0..{}",
                    sb.held_root.0, sb.nr_meta_blocks
                ),
            ));
        }
        let dbs = sb.data_block_sectors;
        if !dbs.is_power_of_two() || !(8..=2_097_152).contains(&dbs) {
            return Err(MetaError::corrupt(
                blk,
                st,
                format!("data block size {dbs} sectors"),
            ));
        }
        if sb.dedup && dbs != 8 {
            return Err(MetaError::corrupt(
                blk,
                st,
                format!("dedup pool with data block size {dbs} sectors (dedup needs 8)"),
            ));
        }
        let mut roots = vec![
            ("device tree root", sb.device_root),
            ("space map index root", sb.sm_index_root),
            ("overflow tree root", sb.overflow_root),
        ];
        if sb.dedup {
            roots.push(("hash tree root", sb.hash_root));
        }
        for (name, r) in roots {
            if r.0 == 0 || r.0 >= sb.nr_meta_blocks {
                return Err(MetaError::corrupt(
                    blk,
                    st,
                    format!("{name} {} outside 1..{}", r.0, sb.nr_meta_blocks),
                ));
            }
        }
        Ok(sb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_bitflip() {
        let sb = Superblock {
            data_block_sectors: 128,
            nr_data_blocks: 1000,
            nr_meta_blocks: 64,
            transaction_id: 7,
            generation: 3,
            device_root: MetaBlock(1),
            sm_index_root: MetaBlock(2),
            overflow_root: MetaBlock(3),
            held_root: MetaBlock(0),
            dedup: false,
            hash_root: MetaBlock(0),
        };
        let mut b = sb.pack();
        assert_eq!(get_u32(&b, 16), VERSION);
        assert_eq!(Superblock::unpack(&b).unwrap(), sb);
        b[100] ^= 4;
        assert!(matches!(
            Superblock::unpack(&b),
            Err(MetaError::Checksum { .. })
        ));
        let d = Superblock {
            dedup: true,
            hash_root: MetaBlock(4),
            data_block_sectors: 8,
            ..sb.clone()
        };
        // Dedup pools have 4 KiB blocks.
        let e = Superblock::unpack(
            &Superblock {
                data_block_sectors: 128,
                ..d.clone()
            }
            .pack(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("dedup needs 8"), "{e}");
        let b = d.pack();
        assert_eq!(get_u32(&b, 16), VERSION_DEDUP);
        assert_eq!(Superblock::unpack(&b).unwrap(), d);
        // A dedup pool without a hash tree, or a plain one with one, is refused.
        for bad in [
            Superblock {
                hash_root: MetaBlock(0),
                ..d.clone()
            },
            Superblock { dedup: false, ..d },
        ] {
            let e = Superblock::unpack(&bad.pack()).unwrap_err().to_string();
            assert!(e.contains("hash tree root") || e.contains("version"), "{e}");
        }
    }
}
