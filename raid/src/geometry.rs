//! Sizing an array from its table: the bytes each leg holds, the write-intent bitmap's regions
//! and the metadata each leg needs. Everything is computed with checked arithmetic from values
//! the table gives, and bounded so that no table can make a size overflow or a bitmap that
//! does not fit in memory. `table check` (`validate`) and assembly run the same function, so a
//! table that passes the check fails to build only for reasons of the devices themselves.

use tables::{Bytes, Sectors};

use crate::meta;
use crate::parse::{Level, RaidConfig};

/// Largest chunk: background steps and the parity log hold whole chunks in memory (one per
/// leg for a parity check), and log entries record chunk offsets in 32 bits.
pub const MAX_CHUNK_SECTORS: u64 = 1 << 17; // 64 MiB

/// Most bitmap regions: the run-time state costs 9 bytes per region (bit, in-flight count,
/// sequence, pending flag), so this bounds it to 36 MiB. A table's `region_size` must be large
/// enough; the default (2 MiB) is doubled until it fits (arrays over 8 TiB).
pub const MAX_REGIONS: u64 = 1 << 22;

/// Default region size when the table gives none.
pub const DEFAULT_REGION_SECTORS: u64 = 4096; // 2 MiB

/// What the table's arguments and length make of an array.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sizing {
    /// Chunk size in bytes (0 for raid1).
    pub chunk_bytes: u64,
    /// Bytes each data leg must hold (from offset 0 of the leg, after a mirror offset).
    pub leg_bytes: u64,
    /// Bitmap region size in bytes: array space for mirrors, per-leg space (a whole number of
    /// chunks) for parity.
    pub region_bytes: u64,
    /// Number of bitmap regions (at least 1, at most [`MAX_REGIONS`]).
    pub regions: u64,
    /// Bytes each metadata device needs for the superblock and bitmap.
    pub meta_bytes: u64,
}

fn overflow(what: &str) -> String {
    format!("{what} does not fit in 64 bits")
}

/// Sizes an array of `size` bytes (the segment length) for `cfg`; `cfg` is assumed to have
/// passed [`RaidConfig::check`]. Errors name the table value at fault.
pub fn sizing(cfg: &RaidConfig, size: Bytes) -> Result<Sizing, String> {
    if size.0 == 0 || !size.is_sector_aligned() {
        return Err(format!(
            "size {} bytes is not a positive whole number of sectors",
            size.0
        ));
    }
    let n = cfg.legs.len() as u64;
    let chunk_bytes = match cfg.level {
        Level::Raid1 => 0,
        _ => {
            cfg.chunk
                .checked_bytes()
                .ok_or_else(|| overflow("chunk_size in bytes"))?
                .0
        }
    };
    let leg_bytes = match cfg.level {
        Level::Raid1 => size.0,
        Level::Raid10 { copies } => {
            let array_chunks = size.0.div_ceil(chunk_bytes);
            array_chunks
                .checked_mul(copies as u64)
                .map(|c| c.div_ceil(n))
                .and_then(|dev_chunks| dev_chunks.checked_mul(chunk_bytes))
                .ok_or_else(|| overflow("raid10 leg size"))?
        }
        Level::Raid5(_) => {
            let width = chunk_bytes
                .checked_mul(n - 1)
                .ok_or_else(|| overflow("stripe width"))?;
            size.0
                .div_ceil(width)
                .checked_mul(chunk_bytes)
                .ok_or_else(|| overflow("raid4/5 leg size"))?
        }
    };
    for (i, l) in cfg.legs.iter().enumerate() {
        let end = l
            .offset
            .checked_bytes()
            .and_then(|o| o.0.checked_add(leg_bytes));
        if end.is_none() {
            return Err(format!(
                "leg {i}: offset {} sectors plus {leg_bytes} bytes does not fit in 64 bits",
                l.offset.0
            ));
        }
    }
    // Mirror legs on one device must not overlap: each would hold the other's blocks.
    for (i, a) in cfg.legs.iter().enumerate() {
        for (j, b) in cfg.legs.iter().enumerate().take(i) {
            if a.data.is_some() && a.data == b.data {
                // Offsets fit in bytes (checked above); the areas are leg_bytes long.
                let (x, y) = (
                    a.offset.0.saturating_mul(512),
                    b.offset.0.saturating_mul(512),
                );
                if x.abs_diff(y) < leg_bytes {
                    return Err(format!(
                        "legs {j} and {i} overlap on '{}' (offsets {} and {} sectors, \
                         {leg_bytes} bytes each)",
                        a.data.as_deref().unwrap_or("-"),
                        b.offset.0,
                        a.offset.0
                    ));
                }
            }
        }
    }
    // Regions: array space for mirrors, per-leg space (whole stripes) for parity.
    let span = match cfg.level {
        Level::Raid5(_) => leg_bytes,
        _ => size.0,
    };
    let round = |r: u64| -> Result<u64, String> {
        match cfg.level {
            Level::Raid5(_) => r
                .max(chunk_bytes)
                .div_ceil(chunk_bytes)
                .checked_mul(chunk_bytes)
                .ok_or_else(|| overflow("region size")),
            _ => Ok(r),
        }
    };
    let region_bytes = match cfg.region {
        Some(r) => {
            // As dm-raid; dm-mirror lines take any region size.
            if !cfg.mirror && r.0 > size.sectors_floor().0 {
                return Err(format!(
                    "region_size {} sectors is larger than the array ({} sectors)",
                    r.0,
                    size.sectors_floor().0
                ));
            }
            let rb = round(r.checked_bytes().ok_or_else(|| overflow("region_size"))?.0)?;
            if span.div_ceil(rb) > MAX_REGIONS {
                let min = Sectors(span.div_ceil(MAX_REGIONS).div_ceil(512).next_power_of_two());
                return Err(format!(
                    "region_size {} sectors makes {} bitmap regions; at most {MAX_REGIONS} \
                     (use region_size {} or more)",
                    r.0,
                    span.div_ceil(rb),
                    min.0
                ));
            }
            rb
        }
        None => {
            let mut rb = round(Sectors(DEFAULT_REGION_SECTORS).bytes().0)?;
            while span.div_ceil(rb) > MAX_REGIONS {
                rb = rb.checked_mul(2).ok_or_else(|| overflow("region size"))?;
            }
            rb
        }
    };
    let regions = span.div_ceil(region_bytes).max(1);
    let meta_bytes = meta::bitmap_pages(regions)
        .checked_add(1)
        .and_then(|b| b.checked_mul(meta::META_BLOCK as u64))
        .ok_or_else(|| overflow("metadata size"))?;
    Ok(Sizing {
        chunk_bytes,
        leg_bytes,
        region_bytes,
        regions,
        meta_bytes,
    })
}

/// The size of an array as its superblock records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recorded {
    /// Exposed size in bytes.
    pub size: u64,
    /// Set for a superblock written before arrays could grow whose size cannot be told
    /// closely enough from its leg size (raid10): every region is resynced.
    pub full_resync: bool,
}

/// The array size a superblock records (its `leg_bytes` and `array_bytes`), checked against
/// what `cfg` makes of it; `table` is the size the table asks for. A superblock from before
/// arrays could grow (`array_bytes` 0) records only the leg size: it stands for the table's
/// size when the leg sizes agree, and otherwise for the largest size known to have been in
/// sync (raid1: the leg; raid4/5: whole stripes; raid10: the chunks every smaller leg size
/// leaves out), so that a grow resyncs at least everything that is new. Errors say why the
/// superblock cannot be this array's.
pub fn recorded_size(
    cfg: &RaidConfig,
    leg_bytes: u64,
    array_bytes: u64,
    table: Bytes,
) -> Result<Recorded, String> {
    if array_bytes != 0 {
        let s = sizing(cfg, Bytes(array_bytes))
            .map_err(|e| format!("recorded size {array_bytes} bytes: {e}"))?;
        if s.leg_bytes != leg_bytes {
            return Err(format!(
                "records {array_bytes} bytes and {leg_bytes} bytes per leg, but that size \
                 makes {} bytes per leg",
                s.leg_bytes
            ));
        }
        return Ok(Recorded {
            size: array_bytes,
            full_resync: false,
        });
    }
    let t = sizing(cfg, table)?;
    if t.leg_bytes == leg_bytes {
        return Ok(Recorded {
            size: table.0,
            full_resync: false,
        });
    }
    let n = cfg.legs.len() as u64;
    let c = t.chunk_bytes.max(1);
    let whole = leg_bytes / c;
    let size = match cfg.level {
        Level::Raid1 => Some(leg_bytes),
        Level::Raid5(_) => whole.checked_mul(c).and_then(|b| b.checked_mul(n - 1)),
        Level::Raid10 { copies } if leg_bytes > t.leg_bytes => whole
            .checked_mul(n)
            .and_then(|x| x.checked_div(copies as u64))
            .and_then(|x| x.checked_mul(c)),
        Level::Raid10 { copies } => whole
            .saturating_sub(1)
            .checked_mul(n)
            .and_then(|x| x.checked_div(copies as u64))
            .and_then(|x| x.checked_mul(c)),
    };
    match size {
        Some(0) => Ok(Recorded {
            size: table.0,
            full_resync: true,
        }),
        Some(size) if size % 512 == 0 => Ok(Recorded {
            size,
            full_resync: false,
        }),
        _ => Err(format!(
            "{leg_bytes} bytes per leg is no size this array can have"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::parse_raid;

    fn cfg(s: &str) -> RaidConfig {
        parse_raid(&s.split_whitespace().map(String::from).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn sizes_match_the_layouts() {
        let s = sizing(&cfg("raid5 1 8 3 - a - b - c"), Bytes(1 << 20)).unwrap();
        assert_eq!((s.chunk_bytes, s.leg_bytes), (4096, 512 << 10));
        assert_eq!((s.region_bytes, s.regions), (2 << 20, 1));
        assert_eq!(s.meta_bytes, 8192);
        let s = sizing(&cfg("raid10 1 8 3 - a - b - c"), Bytes(3 << 20)).unwrap();
        assert_eq!(s.leg_bytes, 2 << 20);
        let s = sizing(&cfg("raid1 3 0 region_size 64 2 - a - b"), Bytes(1 << 20)).unwrap();
        assert_eq!(
            (s.leg_bytes, s.region_bytes, s.regions),
            (1 << 20, 32768, 32)
        );
    }

    #[test]
    fn recorded_sizes_are_checked_and_old_superblocks_read_safely() {
        let r1 = cfg("raid1 1 0 2 - a - b");
        let ok = |r: Result<Recorded, String>| r.unwrap();
        // Recorded explicitly: must agree with the leg size it makes.
        assert_eq!(
            ok(recorded_size(&r1, 1 << 20, 1 << 20, Bytes(4 << 20))).size,
            1 << 20
        );
        assert!(recorded_size(&r1, 2 << 20, 1 << 20, Bytes(4 << 20)).is_err());
        assert!(recorded_size(&r1, 1 << 20, 1, Bytes(4 << 20)).is_err());
        // Written before arrays could grow (0): the table's size when the legs agree...
        assert_eq!(
            ok(recorded_size(&r1, 4 << 20, 0, Bytes(4 << 20))).size,
            4 << 20
        );
        // ...else what the leg held: raid1 the leg, raid5 whole stripes...
        assert_eq!(
            ok(recorded_size(&r1, 1 << 20, 0, Bytes(4 << 20))).size,
            1 << 20
        );
        let r5 = cfg("raid5 1 8 3 - a - b - c");
        assert_eq!(
            ok(recorded_size(&r5, 64 << 10, 0, Bytes(1 << 20))).size,
            128 << 10
        );
        // ...raid10 only the chunks every smaller leg size leaves out (4 legs, 2 copies, 3
        // chunks a leg: at least 5 chunks were in the array, so 4 surely).
        let r10 = cfg("raid10 1 8 4 - a - b - c - d");
        assert_eq!(
            ok(recorded_size(&r10, 12 << 10, 0, Bytes(1 << 20))).size,
            16 << 10
        );
        let one = ok(recorded_size(&r10, 4 << 10, 0, Bytes(1 << 20)));
        assert_eq!(
            one,
            Recorded {
                size: 1 << 20,
                full_resync: true
            }
        );
        // A larger old leg reads as the larger array it was (a shrink, refused by the caller).
        assert_eq!(
            ok(recorded_size(&r1, 8 << 20, 0, Bytes(4 << 20))).size,
            8 << 20
        );
    }

    #[test]
    fn hostile_sizes_are_errors() {
        let huge = cfg("raid1 3 0 region_size 36028797018963968 2 - a - b");
        let e = sizing(&huge, Sectors(65536).bytes()).unwrap_err();
        assert!(e.contains("larger than the array"), "{e}");
        let tiny = cfg("raid1 3 0 region_size 1 2 - a - b");
        let e = sizing(&tiny, Bytes(1 << 40)).unwrap_err();
        assert!(e.contains("bitmap regions"), "{e}");
        // The default region grows for a big array instead.
        let big = sizing(&cfg("raid1 1 0 2 - a - b"), Bytes(1 << 50)).unwrap();
        assert!(big.regions <= MAX_REGIONS);
        let m = crate::parse::parse_mirror(
            &"core 1 1024 2 a 0 b 36028797018963967"
                .split_whitespace()
                .map(String::from)
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let e = sizing(&m, Bytes(1 << 20)).unwrap_err();
        assert!(e.contains("leg 1: offset") && e.contains("64 bits"), "{e}");
        assert!(sizing(&cfg("raid1 1 0 2 - a - b"), Bytes(0)).is_err());
    }
}
