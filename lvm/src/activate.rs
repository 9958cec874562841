//! From LV metadata to a device-mapper table: what `lvchange -ay` hands to the daemon.
//!
//! A `striped` segment maps as kernel LVM maps it, so an LV reads the same bytes through our
//! daemon as through the kernel's own activation: extent `e` of a PV starts at sector
//! `pe_start + e * extent_size` of its device. One area is a `linear` line, several a
//! `striped` line with LVM's `stripe_size` as the chunk size. An area on another LV (a
//! sub-LV) maps onto that LV's daemon device, `/dev/volmgr/<dm name>`.
//!
//! Every sector computed here goes through checked arithmetic: the metadata may be crafted.

use std::fmt::Write as _;

use tables::Sectors;

use crate::model::{Area, LogicalVolume, PhysicalVolume, Segment, SegmentKind, VolumeGroup};
use crate::segtypes::{RaidLevel, VolmgrSegment};

/// Where the daemon's devices appear; sub-LV areas map onto them.
pub const DAEMON_DEVICE_DIR: &str = "/dev/volmgr/";

/// What to do with an area on a PV that is not present.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum MissingPvs {
    /// Refuse to activate (lvm2's `--activationmode complete`, the safe default).
    #[default]
    Refuse,
    /// lvm2's `--activationmode degraded`: a raid LV whose image or metadata sub-LV has an
    /// area on a missing PV runs with that leg missing (`- -`, as dm-raid writes it), as long
    /// as the level keeps a copy of everything; any other LV on a missing PV is refused.
    Degraded,
    /// Map the missing areas onto the `error` target (lvm2's `--activationmode partial`):
    /// what is on the PVs that are present reads and writes, the rest fails.
    Error,
}

/// Why an LV cannot be turned into a table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActivateError {
    /// The LV has no segments.
    #[error("{vg}/{lv}: has no segments")]
    Empty {
        /// VG name.
        vg: String,
        /// LV name.
        lv: String,
    },
    /// A segment of a type this build does not map.
    #[error("{vg}/{lv}: segment {index} has type '{segtype}', which volmgr cannot activate")]
    Unsupported {
        /// VG name.
        vg: String,
        /// LV name.
        lv: String,
        /// 1-based segment number, as in the metadata (`segment1`).
        index: usize,
        /// The segment type.
        segtype: String,
    },
    /// An area names a PV whose device was not found.
    #[error(
        "{vg}/{lv}: segment {index} needs PV {pv} ({id}), which is missing; \
         use --activationmode partial to map it onto the error target"
    )]
    MissingPv {
        /// VG name.
        vg: String,
        /// LV name.
        lv: String,
        /// 1-based segment number.
        index: usize,
        /// PV key.
        pv: String,
        /// PV uuid.
        id: String,
    },
    /// An area names neither a PV nor an LV of the VG, or the segment is malformed.
    #[error("{vg}/{lv}: segment {index}: {problem}")]
    Bad {
        /// VG name.
        vg: String,
        /// LV name.
        lv: String,
        /// 1-based segment number.
        index: usize,
        /// What is wrong.
        problem: String,
    },
}

/// The device-mapper name of LV `lv` of VG `vg`, as LVM names it: `VG-LV`, with every `-`
/// inside either name doubled so the split stays unambiguous (`my-vg`/`lv` is
/// `my--vg-lv`).
pub fn dm_name(vg: &str, lv: &str) -> String {
    format!("{}-{}", vg.replace('-', "--"), lv.replace('-', "--"))
}

/// The table of `lv`, with `device_of(pv)` giving the path of each PV's device (`None`: the
/// PV is missing, handled as `missing` says).
pub fn lv_table(
    vg: &VolumeGroup,
    lv: &LogicalVolume,
    device_of: &dyn Fn(&PhysicalVolume) -> Option<String>,
    missing: MissingPvs,
) -> Result<String, ActivateError> {
    if lv.segments.is_empty() {
        return Err(ActivateError::Empty {
            vg: vg.name.clone(),
            lv: lv.name.clone(),
        });
    }
    let mut out = String::new();
    for (i, seg) in lv.segments.iter().enumerate() {
        let index = i + 1;
        let bad = |problem: String| ActivateError::Bad {
            vg: vg.name.clone(),
            lv: lv.name.clone(),
            index,
            problem,
        };
        let start = seg
            .start_extent
            .to_sectors(vg.extent_size)
            .ok_or_else(|| bad("start_extent overflows".into()))?;
        let len = seg
            .extent_count
            .to_sectors(vg.extent_size)
            .ok_or_else(|| bad("extent_count overflows".into()))?;
        let target = segment_target(vg, lv, seg, index, device_of, missing)?;
        // Writing to a String cannot fail.
        let _ = writeln!(out, "{} {} {target}", start.0, len.0);
    }
    Ok(out)
}

/// `TARGET ARGS` of one segment.
fn segment_target(
    vg: &VolumeGroup,
    lv: &LogicalVolume,
    seg: &Segment,
    index: usize,
    device_of: &dyn Fn(&PhysicalVolume) -> Option<String>,
    missing: MissingPvs,
) -> Result<String, ActivateError> {
    let bad = |problem: String| ActivateError::Bad {
        vg: vg.name.clone(),
        lv: lv.name.clone(),
        index,
        problem,
    };
    let (stripe_size, stripes) = match &seg.kind {
        SegmentKind::Striped {
            stripe_size,
            stripes,
        } => (stripe_size, stripes),
        SegmentKind::Other { segtype } => {
            return match VolmgrSegment::parse(seg).map_err(&bad)? {
                Some(v) => volmgr_target(vg, &v, device_of, missing).map_err(bad),
                None => Err(ActivateError::Unsupported {
                    vg: vg.name.clone(),
                    lv: lv.name.clone(),
                    index,
                    segtype: segtype.clone(),
                }),
            };
        }
    };
    let area_len = seg
        .area_len()
        .ok_or_else(|| bad("no stripes".to_string()))?;
    let n = stripes.len() as u64;
    if u64::from(seg.extent_count.0) != u64::from(area_len.0) * n {
        return Err(bad(format!(
            "extent_count {} is not a multiple of its {n} stripes",
            seg.extent_count
        )));
    }
    let mut places = Vec::with_capacity(stripes.len());
    for a in stripes {
        match area_place(vg, a, device_of).map_err(bad)? {
            Some(p) => places.push(p),
            None if missing == MissingPvs::Error => return Ok("error".to_string()),
            None => {
                // area_place returns None only for a PV of this VG.
                let pv = vg.pv_by_key(&a.volume);
                return Err(ActivateError::MissingPv {
                    vg: vg.name.clone(),
                    lv: lv.name.clone(),
                    index,
                    pv: a.volume.clone(),
                    id: pv.map(|p| p.id.to_string()).unwrap_or_default(),
                });
            }
        }
    }
    if let [(dev, off)] = places.as_slice() {
        return Ok(format!("linear {dev} {}", off.0));
    }
    let chunk = stripe_size.ok_or_else(|| bad(format!("{n} stripes and no stripe_size")))?;
    if chunk.0 == 0 {
        return Err(bad("stripe_size is 0".into()));
    }
    let mut t = format!("striped {n} {}", chunk.0);
    for (dev, off) in places {
        let _ = write!(t, " {dev} {}", off.0);
    }
    Ok(t)
}

/// The daemon device of LV `lv` of `vg`, checked to exist in the VG.
fn sub_device(vg: &VolumeGroup, lv: &str) -> Result<String, String> {
    if vg.lv(lv).is_none() {
        return Err(format!("names the LV '{lv}', which the VG does not have"));
    }
    Ok(format!("{DAEMON_DEVICE_DIR}{}", dm_name(&vg.name, lv)))
}

/// Whether every area of `lv`, and of the LVs under it, is on a PV `device_of` finds.
pub fn lv_available(
    vg: &VolumeGroup,
    lv: &LogicalVolume,
    device_of: &dyn Fn(&PhysicalVolume) -> Option<String>,
) -> bool {
    fn walk(
        vg: &VolumeGroup,
        lv: &LogicalVolume,
        device_of: &dyn Fn(&PhysicalVolume) -> Option<String>,
        depth: usize,
    ) -> bool {
        if depth > 8 {
            return false;
        }
        let pvs_present = lv.segments.iter().all(|s| match &s.kind {
            SegmentKind::Striped { stripes, .. } => stripes.iter().all(|a| {
                vg.pv_by_key(&a.volume)
                    .is_none_or(|pv| device_of(pv).is_some())
            }),
            SegmentKind::Other { .. } => true,
        });
        pvs_present
            && lv_dependencies(vg, lv)
                .iter()
                .all(|d| walk(vg, d, device_of, depth + 1))
    }
    walk(vg, lv, device_of, 0)
}

/// `TARGET ARGS` of a volmgr raid or thin segment: dm-raid's and dm-thin's syntax, which the
/// `raid` and `thin` crates take, over the daemon devices of the sub-LVs. With `missing` not
/// `Refuse`, a raid leg whose sub-LVs are not all available is written `- -`.
fn volmgr_target(
    vg: &VolumeGroup,
    v: &VolmgrSegment,
    device_of: &dyn Fn(&PhysicalVolume) -> Option<String>,
    missing: MissingPvs,
) -> Result<String, String> {
    match v {
        VolmgrSegment::Raid(r) => {
            let chunk = match r.level {
                RaidLevel::Raid1 => 0,
                _ => {
                    r.stripe_size
                        .ok_or_else(|| format!("{} needs a stripe_size", r.level.name()))?
                        .0
                }
            };
            let mut t = format!(
                "raid {} 3 {chunk} region_size {} {}",
                r.level.name(),
                r.region_size.0,
                r.images.len()
            );
            let mut gone = 0;
            for (meta, image) in &r.images {
                let here = |n: &str| vg.lv(n).is_some_and(|l| lv_available(vg, l, device_of));
                if missing != MissingPvs::Refuse && !(here(meta) && here(image)) {
                    t.push_str(" - -");
                    gone += 1;
                    continue;
                }
                let _ = write!(t, " {} {}", sub_device(vg, meta)?, sub_device(vg, image)?);
            }
            let tolerated = match r.level {
                RaidLevel::Raid1 => r.images.len().saturating_sub(1),
                RaidLevel::Raid5 => 1,
                // Near layout, two copies: one leg of each pair; the raid target checks the
                // exact pairs, this only bounds the count.
                RaidLevel::Raid10 => r.images.len() / 2,
            };
            if gone > tolerated {
                return Err(format!(
                    "{gone} of its {} images are on missing PVs: {} keeps data with at most \
                     {tolerated} missing",
                    r.images.len(),
                    r.level.name()
                ));
            }
            Ok(t)
        }
        VolmgrSegment::ThinPool(p) => {
            // dm-thin's feature words first, then the pool's dedup ones (its canonical order).
            let mut features = Vec::new();
            if !p.zero_new_blocks {
                features.push("skip_block_zeroing");
            }
            if p.dedup || p.dedup_verify {
                features.push("dedup");
            }
            if p.dedup_verify {
                features.push("dedup_verify");
            }
            let mut t = format!(
                "thin-pool {} {} {} 0",
                sub_device(vg, &p.metadata)?,
                sub_device(vg, &p.data)?,
                p.chunk_size.0
            );
            if !features.is_empty() {
                t += &format!(" {} {}", features.len(), features.join(" "));
            }
            Ok(t)
        }
        VolmgrSegment::Thin(t) => Ok(format!(
            "thin {} {}",
            sub_device(vg, &t.thin_pool)?,
            t.device_id
        )),
    }
}

/// The device and start sector of one area: `Ok(None)` for an area on a missing PV.
fn area_place(
    vg: &VolumeGroup,
    a: &Area,
    device_of: &dyn Fn(&PhysicalVolume) -> Option<String>,
) -> Result<Option<(String, Sectors)>, String> {
    if let Some(pv) = vg.pv_by_key(&a.volume) {
        let Some(dev) = device_of(pv) else {
            return Ok(None);
        };
        let off = a
            .start
            .to_sectors(vg.extent_size)
            .and_then(|s| s.0.checked_add(pv.pe_start.0))
            .ok_or_else(|| format!("area on {} at extent {} overflows", pv.key, a.start))?;
        return Ok(Some((dev, Sectors(off))));
    }
    if vg.lv(&a.volume).is_some() {
        let off = a
            .start
            .to_sectors(vg.extent_size)
            .ok_or_else(|| format!("area on LV {} at extent {} overflows", a.volume, a.start))?;
        return Ok(Some((
            format!("{DAEMON_DEVICE_DIR}{}", dm_name(&vg.name, &a.volume)),
            off,
        )));
    }
    Err(format!(
        "area names '{}', which is neither a PV nor an LV of the VG",
        a.volume
    ))
}

/// The LVs `lv`'s segments map onto (sub-LVs, a thin LV's pool), which must be active
/// before it, in order.
pub fn lv_dependencies<'a>(vg: &'a VolumeGroup, lv: &LogicalVolume) -> Vec<&'a LogicalVolume> {
    let mut names: Vec<String> = Vec::new();
    for seg in &lv.segments {
        match &seg.kind {
            SegmentKind::Striped { stripes, .. } => {
                names.extend(stripes.iter().map(|a| a.volume.clone()))
            }
            SegmentKind::Other { .. } => {
                if let Ok(Some(v)) = VolmgrSegment::parse(seg) {
                    names.extend(v.sub_lvs());
                }
            }
        }
    }
    let mut deps: Vec<&LogicalVolume> = Vec::new();
    for n in names {
        if let Some(l) = vg.lv(&n) {
            if !deps.iter().any(|d| d.name == l.name) {
                deps.push(l);
            }
        }
    }
    deps
}

/// Whether `lv` is activated without a front end: sub-LVs (hidden) and thin pools, which
/// only the LVs stacked on them use.
pub fn is_internal(lv: &LogicalVolume) -> bool {
    !lv.status.has("VISIBLE")
        || lv.segments.iter().any(|s| {
            matches!(
                VolmgrSegment::parse(s),
                Ok(Some(VolmgrSegment::ThinPool(_)))
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Flags;
    use crate::units::Extents;
    use crate::uuid::Uuid;

    fn vg() -> VolumeGroup {
        let pv = |k: &str, n: u8| PhysicalVolume {
            key: k.into(),
            id: Uuid::from_raw(&[b'a' + n; 32]).unwrap(),
            device: None,
            status: Flags::of(&["ALLOCATABLE"]),
            flags: Flags::default(),
            dev_size: None,
            pe_start: Sectors(2048),
            pe_count: Extents(100),
            extra: Vec::new(),
        };
        crate::vgcreate::new_vg("my-vg", Sectors(8192), vec![pv("pv0", 0), pv("pv1", 1)])
    }

    fn lv(name: &str, segments: Vec<Segment>) -> LogicalVolume {
        LogicalVolume::new(name, segments)
    }

    fn dev(pv: &PhysicalVolume) -> Option<String> {
        Some(format!("/dev/{}", pv.key))
    }

    #[test]
    fn thin_pool_tables_carry_the_dedup_feature_words() {
        let mut g = vg();
        let sub = |name: &str, pv: &str| {
            lv(
                name,
                vec![Segment::linear(Extents(0), Extents(2), pv, Extents(0))],
            )
        };
        g.logical_volumes.push(sub("p_tmeta", "pv0"));
        g.logical_volumes.push(sub("p_tdata", "pv1"));
        let table = |zero_new_blocks, dedup, dedup_verify| {
            let seg = VolmgrSegment::ThinPool(crate::segtypes::ThinPoolSegment {
                metadata: "p_tmeta".into(),
                data: "p_tdata".into(),
                transaction_id: 0,
                chunk_size: Sectors(8),
                zero_new_blocks,
                dedup,
                dedup_verify,
            });
            let l = lv("p", vec![seg.to_segment(Extents(0), Extents(2))]);
            let t = lv_table(&g, &l, &dev, MissingPvs::Refuse).unwrap();
            t.split_once(" 8 0").map(|x| x.1.to_string()).unwrap_or(t)
        };
        assert_eq!(table(true, false, false), "\n");
        assert_eq!(table(false, false, false), " 1 skip_block_zeroing\n");
        assert_eq!(table(true, true, false), " 1 dedup\n");
        assert_eq!(table(true, true, true), " 2 dedup dedup_verify\n");
        assert_eq!(
            table(false, false, true),
            " 3 skip_block_zeroing dedup dedup_verify\n"
        );
    }

    #[test]
    fn dm_names_double_hyphens() {
        assert_eq!(dm_name("vg0", "lv0"), "vg0-lv0");
        assert_eq!(dm_name("my-vg", "my-lv"), "my--vg-my--lv");
    }

    #[test]
    fn linear_and_striped_map_like_kernel_lvm() {
        let g = vg();
        let l = lv(
            "a",
            vec![
                Segment::linear(Extents(0), Extents(10), "pv0", Extents(5)),
                Segment {
                    start_extent: Extents(10),
                    extent_count: Extents(8),
                    kind: SegmentKind::Striped {
                        stripe_size: Some(Sectors(128)),
                        stripes: vec![
                            Area {
                                volume: "pv1".into(),
                                start: Extents(0),
                            },
                            Area {
                                volume: "pv0".into(),
                                start: Extents(20),
                            },
                        ],
                    },
                    extra: Vec::new(),
                },
            ],
        );
        let t = lv_table(&g, &l, &dev, MissingPvs::Refuse).unwrap();
        assert_eq!(
            t,
            "0 81920 linear /dev/pv0 43008\n\
             81920 65536 striped 2 128 /dev/pv1 2048 /dev/pv0 165888\n"
        );
    }

    #[test]
    fn missing_pvs_refuse_or_error() {
        let g = vg();
        let l = lv(
            "a",
            vec![
                Segment::linear(Extents(0), Extents(10), "pv0", Extents(0)),
                Segment::linear(Extents(10), Extents(10), "pv1", Extents(0)),
            ],
        );
        let only_pv0 = |p: &PhysicalVolume| (p.key == "pv0").then(|| "/dev/x".to_string());
        let e = lv_table(&g, &l, &only_pv0, MissingPvs::Refuse).unwrap_err();
        assert!(
            matches!(&e, ActivateError::MissingPv { pv, index: 2, .. } if pv == "pv1"),
            "{e}"
        );
        let t = lv_table(&g, &l, &only_pv0, MissingPvs::Error).unwrap();
        assert_eq!(t, "0 81920 linear /dev/x 2048\n81920 81920 error\n");
    }

    #[test]
    fn crafted_segments_are_refused_not_overflowed() {
        let g = vg();
        let huge = lv(
            "a",
            vec![Segment::linear(
                Extents(u32::MAX),
                Extents(u32::MAX),
                "pv0",
                Extents(u32::MAX),
            )],
        );
        // u32::MAX extents of 8192 sectors fit in u64; the sum with pe_start does too: the
        // table builder (not this module) refuses a device that is too small.
        assert!(lv_table(&g, &huge, &dev, MissingPvs::Refuse).is_ok());
        let nowhere = lv(
            "b",
            vec![Segment::linear(Extents(0), Extents(1), "pv9", Extents(0))],
        );
        let e = lv_table(&g, &nowhere, &dev, MissingPvs::Refuse).unwrap_err();
        assert!(e.to_string().contains("neither a PV nor an LV"), "{e}");
        let mut odd = Segment::linear(Extents(0), Extents(3), "pv0", Extents(0));
        if let SegmentKind::Striped { stripes, .. } = &mut odd.kind {
            stripes.push(Area {
                volume: "pv1".into(),
                start: Extents(0),
            });
        }
        let e = lv_table(&g, &lv("c", vec![odd]), &dev, MissingPvs::Refuse).unwrap_err();
        assert!(e.to_string().contains("not a multiple"), "{e}");
        let other = lv(
            "d",
            vec![Segment {
                start_extent: Extents(0),
                extent_count: Extents(1),
                kind: SegmentKind::Other {
                    segtype: "mirror".into(),
                },
                extra: Vec::new(),
            }],
        );
        let e = lv_table(&g, &other, &dev, MissingPvs::Refuse).unwrap_err();
        assert!(matches!(e, ActivateError::Unsupported { .. }), "{e}");
        assert!(matches!(
            lv_table(&g, &lv("e", vec![]), &dev, MissingPvs::Refuse),
            Err(ActivateError::Empty { .. })
        ));
    }

    #[test]
    fn sub_lv_areas_map_onto_daemon_devices() {
        let mut g = vg();
        g.logical_volumes.push(lv(
            "a_rimage_0",
            vec![Segment::linear(Extents(0), Extents(4), "pv0", Extents(0))],
        ));
        let top = lv(
            "a",
            vec![Segment::linear(
                Extents(0),
                Extents(4),
                "a_rimage_0",
                Extents(0),
            )],
        );
        let t = lv_table(&g, &top, &dev, MissingPvs::Refuse).unwrap();
        assert_eq!(t, "0 32768 linear /dev/volmgr/my--vg-a_rimage_0 0\n");
        assert_eq!(lv_dependencies(&g, &top)[0].name, "a_rimage_0");
    }

    #[test]
    fn degraded_raid_leaves_out_legs_on_missing_pvs() {
        let mut g = vg();
        for (i, pv) in ["pv0", "pv1"].iter().enumerate() {
            let mut m = lv(
                &format!("r_rmeta_{i}"),
                vec![Segment::linear(Extents(0), Extents(1), pv, Extents(0))],
            );
            m.status.clear("VISIBLE");
            let mut d = lv(
                &format!("r_rimage_{i}"),
                vec![Segment::linear(Extents(0), Extents(4), pv, Extents(1))],
            );
            d.status.clear("VISIBLE");
            g.logical_volumes.push(m);
            g.logical_volumes.push(d);
        }
        let raid = crate::segtypes::VolmgrSegment::Raid(crate::segtypes::RaidSegment {
            level: RaidLevel::Raid1,
            region_size: Sectors(4096),
            stripe_size: None,
            images: (0..2)
                .map(|i| (format!("r_rmeta_{i}"), format!("r_rimage_{i}")))
                .collect(),
        });
        let top = lv("r", vec![raid.to_segment(Extents(0), Extents(4))]);
        let only_pv0 = |p: &PhysicalVolume| (p.key == "pv0").then(|| "/dev/x".to_string());
        assert!(lv_table(&g, &top, &only_pv0, MissingPvs::Refuse)
            .unwrap()
            .contains("/dev/volmgr/my--vg-r_rimage_1"));
        let t = lv_table(&g, &top, &only_pv0, MissingPvs::Degraded).unwrap();
        assert_eq!(
            t,
            "0 32768 raid raid1 3 0 region_size 4096 2 /dev/volmgr/my--vg-r_rmeta_0 \
             /dev/volmgr/my--vg-r_rimage_0 - -\n"
        );
        let none = |_: &PhysicalVolume| None;
        let e = lv_table(&g, &top, &none, MissingPvs::Degraded).unwrap_err();
        assert!(e.to_string().contains("2 of its 2 images"), "{e}");
        assert!(!lv_available(&g, g.lv("r_rimage_1").unwrap(), &only_pv0));
        assert!(lv_available(&g, g.lv("r_rimage_0").unwrap(), &only_pv0));
    }
}
