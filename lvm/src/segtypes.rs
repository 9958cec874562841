//! volmgr's own segment types: raid and thin LVs whose data is in volmgr's on-disk formats
//! (the `raid` and `thin` crates), written in the VG metadata as LVM2 writes its `raid1` or
//! `thin-pool` segments but with the type names `volmgr-raid1`, `volmgr-raid5`,
//! `volmgr-raid10`, `volmgr-thin-pool` and `volmgr-thin`.
//!
//! Why other names: the kernel's dm-raid and dm-thin would read volmgr's superblocks and
//! metadata as garbage. LVM2 2.03 treats a segment type it does not know as unknown: it lists
//! the LV, refuses to activate it, and refuses every change to the VG ("Cannot change VG ...
//! with unknown segments in it!"), so it can neither activate these LVs with the kernel's
//! targets nor allocate over their extents. The sub-LVs that hold the data (`_rimage_N`,
//! `_rmeta_N`, `_tdata`, `_tmeta`) are ordinary hidden `striped` LVs, so LVM2 counts their
//! extents as used.
//!
//! The keys follow LVM2's own raid and thin segments (`device_count`, `region_size`,
//! `stripe_size`, `raids`; `metadata`, `pool`, `transaction_id`, `chunk_size`,
//! `zero_new_blocks`; `thin_pool`, `device_id`, `origin`).

use tables::Sectors;

use crate::model::{Segment, SegmentKind};
use crate::text::{Item, Value};
use crate::units::Extents;

/// The prefix of every volmgr segment type.
pub const PREFIX: &str = "volmgr-";
/// The thin pool segment type.
pub const THIN_POOL: &str = "volmgr-thin-pool";
/// The thin volume segment type.
pub const THIN: &str = "volmgr-thin";

/// A raid level volmgr creates.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum RaidLevel {
    /// Mirrors: every image holds everything.
    Raid1,
    /// Striping with rotating parity (md's left-symmetric, dm-raid's `raid5`).
    Raid5,
    /// Striped mirrors, near layout, two copies.
    Raid10,
}

impl RaidLevel {
    /// LVM's and dm-raid's name (`raid1`).
    pub fn name(self) -> &'static str {
        match self {
            RaidLevel::Raid1 => "raid1",
            RaidLevel::Raid5 => "raid5",
            RaidLevel::Raid10 => "raid10",
        }
    }

    /// The segment type volmgr writes (`volmgr-raid1`).
    pub fn segtype(self) -> String {
        format!("{PREFIX}{}", self.name())
    }

    /// From LVM's name.
    pub fn from_name(s: &str) -> Option<RaidLevel> {
        match s {
            "raid1" => Some(RaidLevel::Raid1),
            "raid5" | "raid5_ls" => Some(RaidLevel::Raid5),
            "raid10" => Some(RaidLevel::Raid10),
            _ => None,
        }
    }

    /// How many of `images` images hold distinct data (an LV's extents are a multiple of
    /// it): 1 for raid1, one less than the images for raid5, half of them for raid10.
    pub fn data_images(self, images: u32) -> Option<u32> {
        match self {
            RaidLevel::Raid1 => Some(1),
            RaidLevel::Raid5 => images.checked_sub(1),
            RaidLevel::Raid10 => images.checked_div(2),
        }
    }

    /// Extents each image holds for an LV of `lv_extents` over `images` images, or `None`
    /// when that does not divide evenly.
    pub fn image_extents(self, lv_extents: Extents, images: u32) -> Option<Extents> {
        let data_images = self.data_images(images)?;
        if data_images == 0 || !lv_extents.0.is_multiple_of(data_images) {
            return None;
        }
        Some(Extents(lv_extents.0 / data_images))
    }
}

/// A `volmgr-raid*` segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RaidSegment {
    /// The level.
    pub level: RaidLevel,
    /// Region size (the bitmap's unit), sectors.
    pub region_size: Sectors,
    /// Chunk size for raid5 and raid10, sectors.
    pub stripe_size: Option<Sectors>,
    /// `(metadata LV, image LV)` per image, in order.
    pub images: Vec<(String, String)>,
}

/// A `volmgr-thin-pool` segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThinPoolSegment {
    /// The metadata sub-LV (`pool_tmeta`).
    pub metadata: String,
    /// The data sub-LV (`pool_tdata`).
    pub data: String,
    /// The pool's transaction id: bumped with each thin LV created or removed.
    pub transaction_id: u64,
    /// The pool's block size, sectors.
    pub chunk_size: Sectors,
    /// Whether new blocks are zeroed before use.
    pub zero_new_blocks: bool,
    /// Inline deduplication (the pool's `dedup` feature; 4 KiB blocks). Key `dedup = 1`,
    /// written only when set.
    pub dedup: bool,
    /// Compare bytes before sharing (`dedup_verify`, implies `dedup`). Key
    /// `dedup_verify = 1`, written only when set.
    pub dedup_verify: bool,
}

/// A `volmgr-thin` segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThinSegment {
    /// The pool LV.
    pub thin_pool: String,
    /// The thin device's id in the pool.
    pub device_id: u32,
    /// The LV this one is a snapshot of, when it is one.
    pub origin: Option<String>,
}

/// A volmgr segment, typed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VolmgrSegment {
    /// raid1/5/10.
    Raid(RaidSegment),
    /// A thin pool.
    ThinPool(ThinPoolSegment),
    /// A thin volume.
    Thin(ThinSegment),
}

fn get<'a>(seg: &'a Segment, key: &str) -> Option<&'a Item> {
    seg.extra.iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

fn get_u64(seg: &Segment, key: &str) -> Result<u64, String> {
    match get(seg, key) {
        Some(Item::Value(Value::Int(n))) => {
            u64::try_from(*n).map_err(|_| format!("{key} = {n} is negative"))
        }
        Some(_) => Err(format!("{key} is not a number")),
        None => Err(format!("{key} is missing")),
    }
}

/// An optional `0`/`1` key: absent is `false`, a malformed value is an error.
fn get_flag(seg: &Segment, key: &str) -> Result<bool, String> {
    match get(seg, key) {
        None => Ok(false),
        Some(_) => get_u64(seg, key).map(|v| v != 0),
    }
}

fn get_str(seg: &Segment, key: &str) -> Result<String, String> {
    match get(seg, key) {
        Some(Item::Value(Value::Str(s))) => Ok(s.clone()),
        Some(_) => Err(format!("{key} is not a string")),
        None => Err(format!("{key} is missing")),
    }
}

impl VolmgrSegment {
    /// The typed form of `seg`: `Ok(None)` when it is not a volmgr segment, an error naming
    /// the key when it is one but malformed.
    pub fn parse(seg: &Segment) -> Result<Option<VolmgrSegment>, String> {
        let SegmentKind::Other { segtype } = &seg.kind else {
            return Ok(None);
        };
        let Some(name) = segtype.strip_prefix(PREFIX) else {
            return Ok(None);
        };
        if let Some(level) = RaidLevel::from_name(name) {
            let count = get_u64(seg, "device_count")?;
            let list = match get(seg, "raids") {
                Some(Item::Array(v)) => v,
                _ => return Err("raids is missing or not a list".into()),
            };
            let names: Vec<String> = list
                .iter()
                .map(|v| match v {
                    Value::Str(s) => Ok(s.clone()),
                    _ => Err("raids holds a value that is not an LV name".to_string()),
                })
                .collect::<Result<_, _>>()?;
            if names.len() as u64 != count * 2 || count < 2 {
                return Err(format!(
                    "raids names {} LVs, device_count {count} needs twice that (at least 2)",
                    names.len()
                ));
            }
            let images = names
                .chunks_exact(2)
                .map(|p| (p[0].clone(), p[1].clone()))
                .collect();
            let stripe_size = match get(seg, "stripe_size") {
                Some(_) => Some(Sectors(get_u64(seg, "stripe_size")?)),
                None => None,
            };
            return Ok(Some(VolmgrSegment::Raid(RaidSegment {
                level,
                region_size: Sectors(get_u64(seg, "region_size")?),
                stripe_size,
                images,
            })));
        }
        match segtype.as_str() {
            THIN_POOL => Ok(Some(VolmgrSegment::ThinPool(ThinPoolSegment {
                metadata: get_str(seg, "metadata")?,
                data: get_str(seg, "pool")?,
                transaction_id: get_u64(seg, "transaction_id")?,
                chunk_size: Sectors(get_u64(seg, "chunk_size")?),
                zero_new_blocks: get_u64(seg, "zero_new_blocks").unwrap_or(1) != 0,
                dedup: get_flag(seg, "dedup")?,
                dedup_verify: get_flag(seg, "dedup_verify")?,
            }))),
            THIN => Ok(Some(VolmgrSegment::Thin(ThinSegment {
                thin_pool: get_str(seg, "thin_pool")?,
                device_id: u32::try_from(get_u64(seg, "device_id")?)
                    .map_err(|_| "device_id is out of range".to_string())?,
                origin: match get(seg, "origin") {
                    Some(_) => Some(get_str(seg, "origin")?),
                    None => None,
                },
            }))),
            _ => Err(format!(
                "segment type '{segtype}' is not one this build of volmgr knows"
            )),
        }
    }

    /// This segment as a metadata segment of `count` extents from `start`.
    pub fn to_segment(&self, start: Extents, count: Extents) -> Segment {
        let int = |n: u64| Item::Value(Value::Int(i64::try_from(n).unwrap_or(i64::MAX)));
        let text = |s: &str| Item::Value(Value::Str(s.to_string()));
        let mut extra: Vec<(String, Item)> = Vec::new();
        let segtype = match self {
            VolmgrSegment::Raid(r) => {
                extra.push(("device_count".into(), int(r.images.len() as u64)));
                extra.push(("region_size".into(), int(r.region_size.0)));
                if let Some(s) = r.stripe_size {
                    extra.push(("stripe_size".into(), int(s.0)));
                }
                let list = r
                    .images
                    .iter()
                    .flat_map(|(m, i)| [Value::Str(m.clone()), Value::Str(i.clone())])
                    .collect();
                extra.push(("raids".into(), Item::Array(list)));
                r.level.segtype()
            }
            VolmgrSegment::ThinPool(p) => {
                extra.push(("metadata".into(), text(&p.metadata)));
                extra.push(("pool".into(), text(&p.data)));
                extra.push(("transaction_id".into(), int(p.transaction_id)));
                extra.push(("chunk_size".into(), int(p.chunk_size.0)));
                extra.push(("zero_new_blocks".into(), int(u64::from(p.zero_new_blocks))));
                if p.dedup {
                    extra.push(("dedup".into(), int(1)));
                }
                if p.dedup_verify {
                    extra.push(("dedup_verify".into(), int(1)));
                }
                THIN_POOL.to_string()
            }
            VolmgrSegment::Thin(t) => {
                extra.push(("thin_pool".into(), text(&t.thin_pool)));
                extra.push(("device_id".into(), int(u64::from(t.device_id))));
                if let Some(o) = &t.origin {
                    extra.push(("origin".into(), text(o)));
                }
                THIN.to_string()
            }
        };
        Segment {
            start_extent: start,
            extent_count: count,
            kind: SegmentKind::Other { segtype },
            extra,
        }
    }

    /// The LVs this segment is built on (which must be active first), in order.
    pub fn sub_lvs(&self) -> Vec<String> {
        match self {
            VolmgrSegment::Raid(r) => r
                .images
                .iter()
                .flat_map(|(m, i)| [m.clone(), i.clone()])
                .collect(),
            VolmgrSegment::ThinPool(p) => vec![p.metadata.clone(), p.data.clone()],
            VolmgrSegment::Thin(t) => vec![t.thin_pool.clone()],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_round_trip_and_malformed_ones_name_the_key() {
        let all = [
            VolmgrSegment::Raid(RaidSegment {
                level: RaidLevel::Raid5,
                region_size: Sectors(4096),
                stripe_size: Some(Sectors(128)),
                images: (0..3)
                    .map(|i| (format!("r_rmeta_{i}"), format!("r_rimage_{i}")))
                    .collect(),
            }),
            VolmgrSegment::ThinPool(ThinPoolSegment {
                metadata: "p_tmeta".into(),
                data: "p_tdata".into(),
                transaction_id: 7,
                chunk_size: Sectors(128),
                zero_new_blocks: false,
                dedup: false,
                dedup_verify: false,
            }),
            VolmgrSegment::ThinPool(ThinPoolSegment {
                metadata: "d_tmeta".into(),
                data: "d_tdata".into(),
                transaction_id: 1,
                chunk_size: Sectors(8),
                zero_new_blocks: true,
                dedup: true,
                dedup_verify: true,
            }),
            VolmgrSegment::Thin(ThinSegment {
                thin_pool: "p".into(),
                device_id: 3,
                origin: Some("t1".into()),
            }),
        ];
        for v in all.clone() {
            let seg = v.to_segment(Extents(0), Extents(12));
            assert_eq!(VolmgrSegment::parse(&seg).unwrap(), Some(v));
        }
        // A pool without dedup writes no dedup keys (metadata as before); a malformed flag
        // is refused naming its key.
        let plain = all[1].to_segment(Extents(0), Extents(1));
        assert!(!plain.extra.iter().any(|(k, _)| k.starts_with("dedup")));
        let mut bad_flag = all[2].to_segment(Extents(0), Extents(1));
        for (k, v) in bad_flag.extra.iter_mut() {
            if k == "dedup" {
                *v = Item::Value(Value::Str("yes".into()));
            }
        }
        assert!(VolmgrSegment::parse(&bad_flag)
            .unwrap_err()
            .contains("dedup is not a number"));
        let mut bad = VolmgrSegment::Thin(ThinSegment {
            thin_pool: "p".into(),
            device_id: 3,
            origin: None,
        })
        .to_segment(Extents(0), Extents(1));
        bad.extra.retain(|(k, _)| k != "device_id");
        assert!(VolmgrSegment::parse(&bad)
            .unwrap_err()
            .contains("device_id"));
        let striped = Segment::linear(Extents(0), Extents(1), "pv0", Extents(0));
        assert_eq!(VolmgrSegment::parse(&striped).unwrap(), None);
    }

    #[test]
    fn image_sizes_per_level() {
        assert_eq!(
            RaidLevel::Raid1.image_extents(Extents(10), 2),
            Some(Extents(10))
        );
        assert_eq!(
            RaidLevel::Raid5.image_extents(Extents(10), 3),
            Some(Extents(5))
        );
        assert_eq!(RaidLevel::Raid5.image_extents(Extents(9), 3), None);
        assert_eq!(
            RaidLevel::Raid10.image_extents(Extents(10), 4),
            Some(Extents(5))
        );
    }
}
