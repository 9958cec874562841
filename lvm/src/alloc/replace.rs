//! Replacement images for a raid LV whose images failed (`lvconvert --repair`, and the
//! daemon's monitor under `raid_fault_policy = allocate`): new metadata and data extents
//! for each failed image, on failure domains (hosts, or PVs without one) that no surviving
//! image uses and that are not the failed images' own PVs.

use std::collections::HashSet;

use super::plan::{self, Shape};
use super::raid::{pvs_of, raid_segment};
use super::space;
use super::{AllocError, Policy};
use crate::model::{Segment, VolumeGroup};

/// The new areas of one replaced image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replacement {
    /// The image's index in the raid segment (0-based, as the raid target counts legs).
    pub index: usize,
    /// Its `_rmeta_N` LV and the one-extent segment it gets.
    pub meta_lv: String,
    /// The new metadata segment.
    pub meta: Segment,
    /// Its `_rimage_N` LV and the segments it gets (replacing all of its old ones).
    pub image_lv: String,
    /// The new image segments.
    pub image: Vec<Segment>,
}

/// Places new images for the images `failed` (indices) of raid LV `lv`. The space comes from
/// allocatable PVs not flagged missing; under `normal`/`contiguous` (and `inherit` resolving
/// to them) never on a host a surviving image uses, never on a failed image's PVs. Errors say
/// which images could not be placed and where space was looked for.
pub fn replace_images(
    vg: &VolumeGroup,
    lv: &str,
    failed: &[usize],
    policy: Policy,
) -> Result<Vec<Replacement>, AllocError> {
    let l = vg.lv(lv).ok_or_else(|| AllocError::UnknownLv {
        lv: lv.to_string(),
        vg: vg.name.clone(),
    })?;
    let raid = raid_segment(vg, lv).ok_or_else(|| AllocError::NotExtendable {
        lv: lv.to_string(),
        what: "not one volmgr raid segment".into(),
    })?;
    let n = raid.images.len();
    let mut failed: Vec<usize> = failed.to_vec();
    failed.sort_unstable();
    failed.dedup();
    if let Some(&bad) = failed.iter().find(|&&i| i >= n) {
        return Err(AllocError::Invalid(format!(
            "{lv} has {n} images: there is no image {bad}"
        )));
    }
    if failed.is_empty() {
        return Ok(Vec::new());
    }
    if failed.len() >= n {
        return Err(AllocError::Invalid(format!(
            "every image of {lv} failed: nothing to rebuild the replacements from"
        )));
    }
    let policy = policy.resolve_for_lv(vg, l);
    let per = raid
        .images
        .iter()
        .find_map(|(_, img)| vg.lv(img).and_then(|i| i.extent_count()))
        .ok_or_else(|| AllocError::Invalid(format!("{lv}: its images have no extents")))?;
    let mut sp = space::eligible(vg, None)?;
    // Keep off the failed images' PVs, and (unless anything goes) off every domain a
    // surviving image uses.
    let mut banned_pvs: HashSet<String> = HashSet::new();
    let mut banned_domains: HashSet<String> = HashSet::new();
    for (i, (meta, img)) in raid.images.iter().enumerate() {
        let keys: HashSet<String> = pvs_of(vg, meta).union(&pvs_of(vg, img)).cloned().collect();
        if failed.contains(&i) {
            banned_pvs.extend(keys);
        } else if policy != Policy::Anywhere {
            for k in &keys {
                banned_domains.insert(match vg.pv_by_key(k).and_then(|p| p.host()) {
                    Some(h) => format!("host {h}"),
                    None => format!("pv {k}"),
                });
            }
        }
    }
    for i in 0..sp.pvs.len() {
        let why = if banned_pvs.contains(&sp.pvs[i].key) {
            Some("holds a failed image")
        } else if banned_domains.contains(&sp.domain(i)) {
            Some("is on a host a surviving image uses")
        } else {
            None
        };
        if let Some(why) = why {
            let name = sp.pvs[i].name.clone();
            sp.pvs[i].runs.clear();
            sp.skipped.push(format!("{name} {why}"));
        }
    }
    let shape = Shape {
        areas: u32::try_from(failed.len()).unwrap_or(u32::MAX),
        legs: true,
        meta: true,
    };
    let placed = plan::place(&mut sp, &shape, per.0, policy, None, Some(lv))?;
    let alloc = placed.into_allocation(&sp, None, per.0);
    Ok(failed
        .iter()
        .zip(alloc.legs.into_iter().zip(alloc.meta))
        .map(|(&index, (image, meta))| Replacement {
            index,
            meta_lv: raid.images[index].0.clone(),
            meta,
            image_lv: raid.images[index].1.clone(),
            image,
        })
        .collect())
}

/// Applies `reps` to `vg`: each image's metadata and data LVs get their new segments.
pub fn apply_replacements(vg: &mut VolumeGroup, reps: &[Replacement]) -> Result<(), AllocError> {
    for r in reps {
        for (name, segs) in [
            (&r.meta_lv, vec![r.meta.clone()]),
            (&r.image_lv, r.image.clone()),
        ] {
            let vg_name = vg.name.clone();
            let l = vg.lv_mut(name).ok_or_else(|| AllocError::UnknownLv {
                lv: name.clone(),
                vg: vg_name,
            })?;
            l.segments = segs;
        }
    }
    Ok(())
}
