//! On-disk metadata: one superblock per leg plus the write-intent bitmap, both on the leg's
//! metadata device.
//!
//! Layout of a metadata device (all little-endian):
//! - block 0 (4 KiB): the superblock, crc32c over bytes 0..4092 stored at 4092.
//! - blocks 1..: bitmap pages. Each carries a magic, its page index and a crc32c; a page whose
//!   crc fails reads as "every region dirty" (a torn page can only cost resync time).

use crate::RaidError;

/// Size of the superblock and of one bitmap page.
pub const META_BLOCK: usize = 4096;
const SB_MAGIC: &[u8; 8] = b"RSTRAID\x01";
const BM_MAGIC: u32 = 0x504d_4252; // "RBMP"
/// Current superblock version.
pub const SB_VERSION: u32 = 1;
const BM_BITS_OFF: usize = 16;
const BM_BITS_END: usize = 4080;
/// Regions one bitmap page covers.
pub const BITS_PER_PAGE: usize = (BM_BITS_END - BM_BITS_OFF) * 8;
const CRC_OFF: usize = META_BLOCK - 4;

/// The per-leg superblock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// Array identity: a leg with another UUID belongs to another array.
    pub uuid: [u8; 16],
    /// Position of this leg in the table.
    pub leg_index: u32,
    /// Number of legs.
    pub legs: u32,
    /// RAID level code (1, 4, 5, 10).
    pub level: u32,
    /// Layout code (raid5 layout, raid10 copies...).
    pub layout: u32,
    /// Chunk size in sectors.
    pub chunk_sectors: u64,
    /// Bitmap region size in sectors.
    pub region_sectors: u64,
    /// Bytes of each data leg in use.
    pub leg_bytes: u64,
    /// Bumped on every change of array state (failure, rebuild completion); the legs with the
    /// highest count are the truth, older legs are stale.
    pub events: u64,
    /// Legs that are not in sync (failed, or being rebuilt), bit i = leg i.
    pub failed_mask: u64,
    /// Whether the bitmap had no dirty region when this superblock was written.
    pub clean: bool,
    /// crc32c of the data device's name when this was written: a metadata device paired
    /// with another data device (an old leg put back in the table) is not trusted.
    pub data_id: u32,
    /// The array's exposed size in bytes when this was written: what a grow changes (with
    /// `leg_bytes`), so assembly knows which regions of a larger table are new. 0 in
    /// superblocks written before arrays could grow (the size then follows from `leg_bytes`,
    /// see [`crate::geometry::recorded_size`]).
    pub array_bytes: u64,
}

pub(crate) fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
pub(crate) fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}
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

/// What reading a superblock block found.
#[derive(Debug, PartialEq, Eq)]
pub enum SbRead {
    /// All zeroes: a fresh metadata device.
    Blank,
    /// A valid superblock.
    Valid(Superblock),
    /// Something else (bad magic, version or checksum); never trusted.
    Invalid(String),
}

impl Superblock {
    /// Encodes into one metadata block.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; META_BLOCK];
        b[0..8].copy_from_slice(SB_MAGIC);
        put_u32(&mut b, 8, SB_VERSION);
        put_u32(&mut b, 12, self.clean as u32);
        b[16..32].copy_from_slice(&self.uuid);
        put_u32(&mut b, 32, self.leg_index);
        put_u32(&mut b, 36, self.legs);
        put_u32(&mut b, 40, self.level);
        put_u32(&mut b, 44, self.layout);
        put_u64(&mut b, 48, self.chunk_sectors);
        put_u64(&mut b, 56, self.region_sectors);
        put_u64(&mut b, 64, self.leg_bytes);
        put_u64(&mut b, 72, self.events);
        put_u64(&mut b, 80, self.failed_mask);
        put_u32(&mut b, 88, self.data_id);
        put_u64(&mut b, 96, self.array_bytes);
        let crc = crc32c::crc32c(&b[..CRC_OFF]);
        put_u32(&mut b, CRC_OFF, crc);
        b
    }

    /// Decodes one metadata block.
    pub fn decode(b: &[u8]) -> SbRead {
        if b.len() < META_BLOCK {
            return SbRead::Invalid(format!("superblock block is {} bytes", b.len()));
        }
        if b[..META_BLOCK].iter().all(|&x| x == 0) {
            return SbRead::Blank;
        }
        if &b[0..8] != SB_MAGIC {
            return SbRead::Invalid("bad magic (not a raid superblock)".into());
        }
        let crc = crc32c::crc32c(&b[..CRC_OFF]);
        if crc != get_u32(b, CRC_OFF) {
            return SbRead::Invalid("superblock checksum mismatch".into());
        }
        let version = get_u32(b, 8);
        if version != SB_VERSION {
            return SbRead::Invalid(format!("unsupported superblock version {version}"));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[16..32]);
        SbRead::Valid(Superblock {
            uuid,
            clean: get_u32(b, 12) != 0,
            leg_index: get_u32(b, 32),
            legs: get_u32(b, 36),
            level: get_u32(b, 40),
            layout: get_u32(b, 44),
            chunk_sectors: get_u64(b, 48),
            region_sectors: get_u64(b, 56),
            leg_bytes: get_u64(b, 64),
            events: get_u64(b, 72),
            failed_mask: get_u64(b, 80),
            data_id: get_u32(b, 88),
            array_bytes: get_u64(b, 96),
        })
    }
}

/// Event counters at or above this were not written by this code (it bumps the counter by one
/// per state change from 0): a superblock that carries one is forged or corrupt.
pub const MAX_EVENTS: u64 = 1 << 62;

impl Superblock {
    /// Why this superblock, read from the metadata device of leg `leg` of a `legs`-leg
    /// array, cannot be that leg's (whatever its checksum says), or `None`. Geometry is
    /// compared separately ([`check_geometry`]).
    pub fn problem(&self, leg: usize, legs: usize) -> Option<String> {
        if self.leg_index as usize != leg {
            return Some(format!("superblock says leg {}", self.leg_index));
        }
        if self.legs as usize != legs {
            return Some(format!(
                "superblock says {} legs, the table {legs}",
                self.legs
            ));
        }
        let beyond = self.failed_mask.checked_shr(legs as u32).unwrap_or(0);
        if beyond != 0 {
            return Some(format!(
                "failed-legs mask {:#x} names legs beyond the {legs} there are",
                self.failed_mask
            ));
        }
        if self.failed_mask & 1u64.checked_shl(leg as u32).unwrap_or(0) != 0 {
            // Superblocks are written only to legs in sync, so none marks its own leg.
            return Some(format!(
                "failed-legs mask {:#x} marks its own leg",
                self.failed_mask
            ));
        }
        if self.events >= MAX_EVENTS {
            return Some(format!("event counter {} is impossibly large", self.events));
        }
        None
    }
}

/// Number of bitmap pages for `regions` regions.
pub fn bitmap_pages(regions: u64) -> u64 {
    regions.div_ceil(BITS_PER_PAGE as u64)
}

/// Bytes a metadata device needs for `regions` regions (cannot overflow: a page covers
/// 32512 regions).
pub fn meta_bytes(regions: u64) -> u64 {
    (1 + bitmap_pages(regions)) * META_BLOCK as u64
}

/// Encodes bitmap page `page` from the in-memory bit words (`u64` per 64 regions).
pub fn encode_bitmap_page(page: u64, words: &[u64]) -> Vec<u8> {
    let mut b = vec![0u8; META_BLOCK];
    put_u32(&mut b, 0, BM_MAGIC);
    put_u32(&mut b, 4, page as u32);
    let words_per_page = BITS_PER_PAGE / 64;
    let first = page as usize * words_per_page;
    for i in 0..words_per_page {
        let w = words.get(first + i).copied().unwrap_or(0);
        put_u64(&mut b, BM_BITS_OFF + i * 8, w);
    }
    let crc = crc32c::crc32c(&b[..CRC_OFF]);
    put_u32(&mut b, CRC_OFF, crc);
    b
}

/// Decodes bitmap page `page` into `words`, ORing its bits in. A blank page adds nothing; a
/// page with a bad checksum or index marks every region it covers dirty (returns false).
pub fn decode_bitmap_page(page: u64, b: &[u8], words: &mut [u64]) -> bool {
    let words_per_page = BITS_PER_PAGE / 64;
    let first = page as usize * words_per_page;
    let blank = b.iter().all(|&x| x == 0);
    let ok = !blank
        && b.len() >= META_BLOCK
        && get_u32(b, 0) == BM_MAGIC
        && get_u32(b, 4) as u64 == page
        && crc32c::crc32c(&b[..CRC_OFF]) == get_u32(b, CRC_OFF);
    for i in 0..words_per_page {
        let Some(w) = words.get_mut(first + i) else {
            break;
        };
        if blank {
            continue;
        }
        *w |= if ok {
            get_u64(b, BM_BITS_OFF + i * 8)
        } else {
            u64::MAX
        };
    }
    ok || blank
}

/// A fresh random array UUID (std's randomly keyed hasher mixed with time and pid; no
/// cryptographic strength is needed, only that two arrays never share one).
pub fn new_uuid() -> [u8; 16] {
    use std::hash::{BuildHasher, Hasher};
    let mut out = [0u8; 16];
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    for (i, half) in out.chunks_mut(8).enumerate() {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(nanos);
        h.write_u32(std::process::id());
        h.write_usize(i);
        half.copy_from_slice(&h.finish().to_le_bytes());
    }
    out
}

/// Identity of a data device as recorded in the superblock.
pub fn data_id(name: &str) -> u32 {
    crc32c::crc32c(name.as_bytes())
}

/// Formats a UUID for status and messages.
pub fn uuid_string(u: &[u8; 16]) -> String {
    u.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks that a superblock describes the geometry the table asks for, its size aside: the
/// size an array records may be smaller than the table's (the array grows at assembly) and
/// is compared by [`crate::geometry::recorded_size`].
pub fn check_geometry(sb: &Superblock, want: &Superblock) -> Result<(), RaidError> {
    let mut diffs = Vec::new();
    if sb.legs != want.legs {
        diffs.push(format!("legs {} vs {}", sb.legs, want.legs));
    }
    if sb.level != want.level || sb.layout != want.layout {
        diffs.push(format!(
            "level/layout {}/{} vs {}/{}",
            sb.level, sb.layout, want.level, want.layout
        ));
    }
    if sb.chunk_sectors != want.chunk_sectors {
        diffs.push(format!(
            "chunk {} vs {} sectors",
            sb.chunk_sectors, want.chunk_sectors
        ));
    }
    if sb.region_sectors != want.region_sectors {
        diffs.push(format!(
            "region_size {} vs {} sectors",
            sb.region_sectors, want.region_sectors
        ));
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(RaidError::Geometry(format!(
            "metadata (on disk) vs table: {}",
            diffs.join(", ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblock_roundtrips_and_detects_corruption() {
        let sb = Superblock {
            uuid: new_uuid(),
            leg_index: 2,
            legs: 4,
            level: 5,
            layout: 2,
            chunk_sectors: 128,
            region_sectors: 8192,
            leg_bytes: 1 << 30,
            events: 7,
            failed_mask: 0b10,
            clean: true,
            data_id: 42,
            array_bytes: 3 << 30,
        };
        let mut b = sb.encode();
        assert_eq!(Superblock::decode(&b), SbRead::Valid(sb));
        b[100] ^= 1;
        assert!(matches!(Superblock::decode(&b), SbRead::Invalid(_)));
        assert_eq!(Superblock::decode(&[0u8; META_BLOCK]), SbRead::Blank);
    }

    #[test]
    fn superblock_problems_are_named() {
        let sb = Superblock {
            uuid: [1; 16],
            leg_index: 1,
            legs: 3,
            level: 5,
            layout: 2,
            chunk_sectors: 8,
            region_sectors: 64,
            leg_bytes: 1 << 20,
            events: 3,
            failed_mask: 0b100,
            clean: false,
            data_id: 7,
            array_bytes: 2 << 20,
        };
        assert_eq!(sb.problem(1, 3), None);
        let with = |f: &dyn Fn(&mut Superblock)| {
            let mut s = sb.clone();
            f(&mut s);
            s.problem(1, 3).unwrap_or_default()
        };
        assert!(with(&|s| s.leg_index = 2).contains("says leg 2"));
        assert!(with(&|s| s.legs = 64).contains("64 legs"));
        assert!(with(&|s| s.failed_mask = 1 << 3).contains("beyond"));
        assert!(with(&|s| s.failed_mask = 0b10).contains("own leg"));
        assert!(with(&|s| s.events = u64::MAX).contains("impossibly"));
        assert_eq!(
            sb.problem(64, 64).unwrap_or_default(),
            "superblock says leg 1"
        );
    }

    #[test]
    fn bitmap_page_roundtrip_and_torn_page_is_all_dirty() {
        let mut words = vec![0u64; BITS_PER_PAGE / 64 * 2];
        words[3] = 0x55;
        words[BITS_PER_PAGE / 64 + 1] = 1;
        let p1 = encode_bitmap_page(1, &words);
        let mut back = vec![0u64; words.len()];
        assert!(decode_bitmap_page(1, &p1, &mut back));
        assert_eq!(back[BITS_PER_PAGE / 64 + 1], 1);
        assert_eq!(back[3], 0);
        let mut torn = p1.clone();
        torn[2000] ^= 0xff;
        let mut back2 = vec![0u64; words.len()];
        assert!(!decode_bitmap_page(1, &torn, &mut back2));
        assert!(back2[BITS_PER_PAGE / 64..].iter().all(|&w| w == u64::MAX));
    }
}
