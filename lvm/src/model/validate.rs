//! What makes a VG consistent (LVM2's `vg_validate` and `check_lv_segments`, the parts that
//! concern the format): names, unique ids and keys, contiguous segments, striped areas that
//! exist and fit their PVs, and no PV extent used twice.

use std::collections::{HashMap, HashSet};

use super::{valid_name, ModelError, SegmentKind, VolumeGroup, VG_KEYS};
use crate::text::Item;

const PV_KEYS: &[&str] = &[
    "id", "device", "status", "flags", "dev_size", "pe_start", "pe_count",
];
const LV_KEYS: &[&str] = &[
    "id",
    "status",
    "flags",
    "creation_time",
    "creation_host",
    "segment_count",
];
const SEG_KEYS: &[&str] = &["start_extent", "extent_count", "type"];
const STRIPED_KEYS: &[&str] = &["stripe_count", "stripe_size", "stripes"];

fn err(path: String, problem: impl Into<String>) -> ModelError {
    ModelError {
        path,
        problem: problem.into(),
    }
}

/// `extra` may not repeat a typed key (it would be written twice).
fn check_extra(
    path: &str,
    extra: &[(String, Item)],
    reserved: &[&[&str]],
    sections_allowed: bool,
) -> Result<(), ModelError> {
    for (k, item) in extra {
        if reserved.iter().any(|r| r.contains(&k.as_str())) {
            return Err(err(
                format!("{path}/{k}"),
                "is a typed field and cannot also be an extra entry",
            ));
        }
        if !sections_allowed && matches!(item, Item::Section(_)) {
            return Err(err(
                format!("{path}/{k}"),
                "a section here would be read as a segment",
            ));
        }
    }
    Ok(())
}

impl VolumeGroup {
    /// Checks the VG is consistent; the error names the first problem's key path.
    pub fn validate(&self) -> Result<(), ModelError> {
        let vg = self.name.as_str();
        if !valid_name(vg) {
            return Err(err(vg.to_string(), "not a valid VG name"));
        }
        if self.extent_size.0 == 0 || u32::try_from(self.extent_size.0).is_err() {
            return Err(err(
                format!("{vg}/extent_size"),
                format!("{} is not between 1 and 2^32-1 sectors", self.extent_size),
            ));
        }
        check_extra(vg, &self.extra, &[VG_KEYS], true)?;

        let mut pv_keys = HashMap::new();
        let mut pv_ids = HashSet::new();
        for pv in &self.physical_volumes {
            let path = format!("{vg}/physical_volumes/{}", pv.key);
            if pv.key.is_empty() || pv.key.contains('/') {
                return Err(err(path, "not a usable PV key"));
            }
            if pv_keys.insert(pv.key.as_str(), pv).is_some() {
                return Err(err(path, "PV key used twice"));
            }
            if !pv_ids.insert(pv.id) {
                return Err(err(
                    format!("{path}/id"),
                    format!("PV uuid {} used twice", pv.id),
                ));
            }
            check_extra(&path, &pv.extra, &[PV_KEYS], true)?;
            let extents = pv.pe_count.to_sectors(self.extent_size);
            if extents.and_then(|s| s.checked_add(pv.pe_start)).is_none() {
                return Err(err(path, "pe_start + pe_count extents overflows"));
            }
            // LVM2 writes the device size as `dev_size`, except after pvresize, where it
            // writes the size less pe_start; the extents fit in either.
            match (extents, pv.dev_size) {
                (Some(len), Some(size)) if len > size => {
                    return Err(err(
                        format!("{path}/pe_count"),
                        format!(
                            "{} extents ({len} sectors) are more than dev_size {size}",
                            pv.pe_count
                        ),
                    ))
                }
                _ => {}
            }
        }

        let mut lv_names = HashSet::new();
        let mut lv_ids = HashSet::new();
        for lv in &self.logical_volumes {
            let path = format!("{vg}/logical_volumes/{}", lv.name);
            if !valid_name(&lv.name) {
                return Err(err(path, "not a valid LV name"));
            }
            if !lv_names.insert(lv.name.as_str()) {
                return Err(err(path, "LV name used twice"));
            }
            if !lv_ids.insert(lv.id) {
                return Err(err(
                    format!("{path}/id"),
                    format!("LV uuid {} used twice", lv.id),
                ));
            }
            if lv.creation_time.is_some() != lv.creation_host.is_some() {
                return Err(err(
                    format!("{path}/creation_time"),
                    "creation_time and creation_host go together",
                ));
            }
            check_extra(&path, &lv.extra, &[LV_KEYS], false)?;
        }

        // Extents of each PV used by striped areas: (start, len, lv, segment).
        let mut used: HashMap<&str, Vec<(u64, u64, &str, usize)>> = HashMap::new();
        for lv in &self.logical_volumes {
            let path = format!("{vg}/logical_volumes/{}", lv.name);
            let mut next = 0u64;
            for (i, seg) in lv.segments.iter().enumerate() {
                let spath = format!("{path}/segment{}", i + 1);
                let reserved: &[&[&str]] = match seg.kind {
                    SegmentKind::Striped { .. } => &[SEG_KEYS, STRIPED_KEYS],
                    SegmentKind::Other { .. } => &[SEG_KEYS],
                };
                check_extra(&spath, &seg.extra, reserved, true)?;
                if u64::from(seg.start_extent.0) != next {
                    return Err(err(
                        format!("{spath}/start_extent"),
                        format!(
                            "is {}, the previous segment ends at {next} (gap or overlap)",
                            seg.start_extent
                        ),
                    ));
                }
                if seg.extent_count.0 == 0 {
                    return Err(err(format!("{spath}/extent_count"), "is 0"));
                }
                next += u64::from(seg.extent_count.0);
                if u32::try_from(next).is_err() {
                    return Err(err(spath, "LV longer than 2^32-1 extents"));
                }
                let SegmentKind::Striped {
                    stripe_size,
                    stripes,
                } = &seg.kind
                else {
                    continue;
                };
                let n = stripes.len() as u64;
                if n == 0 {
                    return Err(err(format!("{spath}/stripes"), "is empty"));
                }
                if n > 1 && !stripe_size.is_some_and(|s| s.0 > 0 && s.0 <= u64::from(u32::MAX)) {
                    return Err(err(
                        format!("{spath}/stripe_size"),
                        "missing or out of range with more than one stripe",
                    ));
                }
                if u64::from(seg.extent_count.0) % n != 0 {
                    return Err(err(
                        format!("{spath}/extent_count"),
                        format!("{} is not a multiple of {n} stripes", seg.extent_count),
                    ));
                }
                let len = u64::from(seg.extent_count.0) / n;
                for (a, area) in stripes.iter().enumerate() {
                    let apath = format!("{spath}/stripes");
                    if let Some(pv) = pv_keys.get(area.volume.as_str()) {
                        let end = u64::from(area.start.0) + len;
                        if end > u64::from(pv.pe_count.0) {
                            return Err(err(
                                apath,
                                format!(
                                    "area {}: extents {}..{end} of {} are past its {} extents",
                                    a + 1,
                                    area.start,
                                    pv.key,
                                    pv.pe_count
                                ),
                            ));
                        }
                        used.entry(pv.key.as_str()).or_default().push((
                            u64::from(area.start.0),
                            len,
                            lv.name.as_str(),
                            i + 1,
                        ));
                    } else if !lv_names.contains(area.volume.as_str()) {
                        return Err(err(
                            apath,
                            format!("area {}: no PV or LV named '{}'", a + 1, area.volume),
                        ));
                    }
                }
            }
        }
        for (pv, mut list) in used {
            list.sort();
            for w in list.windows(2) {
                let (s0, l0, lv0, g0) = w[0];
                let (s1, _, lv1, g1) = w[1];
                if s0 + l0 > s1 {
                    return Err(err(
                        format!("{vg}/physical_volumes/{pv}"),
                        format!("extent {s1} is used by {lv0} segment{g0} and {lv1} segment{g1}"),
                    ));
                }
            }
        }
        Ok(())
    }
}
