//! Extending a volmgr raid LV (`volmgr-raid1/5/10` over `_rimage_N`/`_rmeta_N` sub-LVs):
//! every image grows by its share of the new LV extents (raid1: all of them; raid5 with `k`
//! data images: a `k`th; raid10: a half-image-count-th), on PVs that hold no other image and
//! no other image's metadata extent (lvm2's rule: never two legs on one PV).
//!
//! Under `normal` (and `inherit`) an image grows first on the PVs it already uses (in place
//! after its last area, else its PVs' largest runs: lvm2's cling); what those cannot hold
//! comes from PVs no image uses, and images that need such PVs get disjoint sets of them (a
//! bounded search, as for new images). Under `contiguous` each image continues in place.
//! Under `anywhere` the `normal` placement is tried first, then images may share PVs. A PV
//! selection restricts every image's new extents to the PVs (and ranges) named.

use std::collections::HashSet;

use super::plan::{self, Shape};
use super::space::{self, Space};
use super::{AllocError, Policy, PvSelection};
use crate::model::{Segment, SegmentKind, VolumeGroup};
use crate::segtypes::{RaidSegment, VolmgrSegment};
use crate::units::Extents;

/// The new extents of every image of a raid LV being extended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RaidExtension {
    /// The raid segment (levels, images) the extension is for.
    pub raid: RaidSegment,
    /// Per image, in order: the `_rimage_N` LV and its new segments, which start at its
    /// current end (one that continues the last segment in place may be merged into it).
    pub images: Vec<(String, Vec<Segment>)>,
    /// Extents of each image after the extension.
    pub image_extents: Extents,
    /// Extents of the raid LV after the extension.
    pub lv_extents: Extents,
}

/// The raid segment of `lv`, if `lv` is a volmgr raid LV (one `volmgr-raid*` segment).
pub fn raid_segment(vg: &VolumeGroup, lv: &str) -> Option<RaidSegment> {
    let l = vg.lv(lv)?;
    match l.segments.as_slice() {
        [s] => match VolmgrSegment::parse(s) {
            Ok(Some(VolmgrSegment::Raid(r))) => Some(r),
            _ => None,
        },
        _ => None,
    }
}

/// The PV keys the areas of LV `name` use.
pub(crate) fn pvs_of(vg: &VolumeGroup, name: &str) -> HashSet<String> {
    vg.lv(name)
        .into_iter()
        .flat_map(|l| &l.segments)
        .flat_map(|s| match &s.kind {
            SegmentKind::Striped { stripes, .. } => {
                stripes.iter().map(|a| a.volume.clone()).collect()
            }
            SegmentKind::Other { .. } => Vec::new(),
        })
        .filter(|k| vg.pv_by_key(k).is_some())
        .collect()
}

/// Places the extension of raid LV `lv` by `more` LV extents (a multiple of its data images;
/// see [`Size::to_extend_extents`](super::Size::to_extend_extents)), under `policy`
/// (`inherit`: the LV's, else the VG's) within `pvs`. Refusals say which image could not
/// grow where, in lvm2's words.
pub fn extend_raid(
    vg: &VolumeGroup,
    lv: &str,
    more: Extents,
    policy: Policy,
    pvs: Option<&PvSelection>,
) -> Result<RaidExtension, AllocError> {
    let l = vg.lv(lv).ok_or_else(|| AllocError::UnknownLv {
        lv: lv.to_string(),
        vg: vg.name.clone(),
    })?;
    let raid = raid_segment(vg, lv).ok_or_else(|| AllocError::NotExtendable {
        lv: lv.to_string(),
        what: "not one volmgr raid segment".into(),
    })?;
    let n = u32::try_from(raid.images.len()).unwrap_or(u32::MAX);
    let cur = l.extent_count().unwrap_or(Extents(0));
    if more.0 == 0 {
        return Err(AllocError::Invalid(format!(
            "New size ({cur} extents) matches existing size ({cur} extents)."
        )));
    }
    let new = cur
        .checked_add(more)
        .ok_or_else(|| AllocError::Invalid(format!("{lv} would be longer than 2^32-1 extents")))?;
    let per = |e: Extents| {
        raid.level.image_extents(e, n).ok_or_else(|| {
            AllocError::Invalid(format!(
                "{e} extents of {lv} do not divide evenly over its {n} {} images",
                raid.level.name()
            ))
        })
    };
    let (old_img, new_img) = (per(cur)?, per(new)?);
    let grow = new_img.0 - old_img.0;
    // Each image: its LV, the PVs it and its metadata extent use, where its last area ends.
    let mut images = Vec::with_capacity(raid.images.len());
    for (meta, img) in &raid.images {
        let il = vg.lv(img).ok_or_else(|| AllocError::UnknownLv {
            lv: img.clone(),
            vg: vg.name.clone(),
        })?;
        if il.extent_count() != Some(old_img) {
            return Err(AllocError::Invalid(format!(
                "{img} has {} extents, but {lv} needs {old_img} per image",
                il.extent_count().unwrap_or(Extents(0))
            )));
        }
        let last = match il.segments.last().map(|s| (&s.kind, s.area_len())) {
            Some((SegmentKind::Striped { stripes, .. }, Some(len))) if stripes.len() == 1 => {
                let a = &stripes[0];
                vg.pv_by_key(&a.volume)
                    .and_then(|_| a.start.0.checked_add(len.0))
                    .map(|end| (a.volume.clone(), end))
            }
            _ => None,
        };
        let Some(last) = last else {
            return Err(AllocError::NotExtendable {
                lv: img.clone(),
                what: "not a linear area on a PV".into(),
            });
        };
        let mut used = pvs_of(vg, img);
        used.extend(pvs_of(vg, meta));
        images.push((img.clone(), used, last));
    }
    let policy = policy.resolve_for_lv(vg, l);
    let mut sp = space::eligible(vg, pvs)?;
    let needed = u64::from(grow) * u64::from(n);
    if needed > sp.total() {
        return Err(AllocError::InsufficientSpace {
            needed,
            available: sp.total(),
            why: sp.skipped.join("; "),
        });
    }
    let no_placement = |why: String| AllocError::NoPlacement {
        contiguous: policy == Policy::Contiguous,
        lv: Some(lv.to_string()),
        more: needed,
        why,
    };
    let strict = match policy {
        Policy::Contiguous => place_each(&mut sp, lv, &images, grow, Policy::Contiguous, None),
        _ => match separate(vg, &sp, &images, grow) {
            Err(why) => Err(no_placement(why)),
            Ok(allowed) => {
                let mut trial = sp.clone();
                let r = place_each(
                    &mut trial,
                    lv,
                    &images,
                    grow,
                    Policy::Normal,
                    Some(&allowed),
                );
                if r.is_ok() {
                    sp = trial;
                }
                r
            }
        },
    };
    let mut placed = match (strict, policy) {
        (Ok(p), _) => p,
        (Err(_), Policy::Anywhere) => {
            place_each(&mut sp, lv, &images, grow, Policy::Anywhere, None)?
        }
        (Err(e), _) => return Err(e),
    };
    for (_, segs) in &mut placed {
        for s in segs {
            // Cannot saturate: the images end at `new_img`, checked above.
            s.start_extent = Extents(s.start_extent.0.saturating_add(old_img.0));
        }
    }
    Ok(RaidExtension {
        raid,
        images: placed,
        image_extents: new_img,
        lv_extents: new,
    })
}

type Image = (String, HashSet<String>, (String, u32));

/// The PVs (indices into `sp`) each image may grow on, keeping images on disjoint failure
/// domains (PVs, or hosts where PVs name one): its own PVs (any PV of a domain only it
/// uses), plus for an image they cannot hold, PVs of domains no image uses, disjoint between
/// images. An error says which images could not get enough.
fn separate(
    vg: &VolumeGroup,
    sp: &Space,
    images: &[Image],
    grow: u32,
) -> Result<Vec<Vec<usize>>, String> {
    // The domains each image uses (a PV gone from `sp`, e.g. missing, still counts).
    let domain_of_key = |k: &String| match sp.pvs.iter().position(|p| &p.key == k) {
        Some(i) => sp.domain(i),
        None => match vg.pv_by_key(k).and_then(|p| p.host()) {
            Some(h) => format!("host {h}"),
            None => format!("pv {k}"),
        },
    };
    let domains: Vec<HashSet<String>> = images
        .iter()
        .map(|(_, used, _)| used.iter().map(domain_of_key).collect())
        .collect();
    let everyone: HashSet<&String> = domains.iter().flatten().collect();
    // An image's own PVs: those of domains it uses and no other image does.
    let own: Vec<Vec<usize>> = (0..images.len())
        .map(|i| {
            (0..sp.pvs.len())
                .filter(|&p| {
                    let d = sp.domain(p);
                    domains[i].contains(&d)
                        && !domains
                            .iter()
                            .enumerate()
                            .any(|(j, u)| j != i && u.contains(&d))
                })
                .collect()
        })
        .collect();
    let fresh: Vec<usize> = (0..sp.pvs.len())
        .filter(|&p| !everyone.contains(&sp.domain(p)))
        .collect();
    let needs: Vec<u64> = own
        .iter()
        .map(|o| {
            let have: u64 = o.iter().map(|&p| sp.pvs[p].cap()).sum();
            u64::from(grow).saturating_sub(have)
        })
        .collect();
    let extra = plan::disjoint_sets_for(sp, &fresh, &needs).map_err(|limit| {
        let short: Vec<String> = images
            .iter()
            .zip(&needs)
            .filter(|(_, &d)| d > 0)
            .map(|((img, _, _), d)| format!("{img} {d} more"))
            .collect();
        format!(
            "each image grows on its own PVs or on PVs (and hosts) no other image uses, and \
             these need space on PVs of their own: {}{limit}: {}",
            short.join(", "),
            plan::describe(sp)
        )
    })?;
    Ok(own
        .into_iter()
        .zip(extra)
        .map(|(mut o, e)| {
            o.extend(e);
            o
        })
        .collect())
}

/// Places `grow` extents for each image in turn, continuing after its last area (in place
/// first), only on its `allowed` PVs when given, taking them from `sp`.
fn place_each(
    sp: &mut Space,
    lv: &str,
    images: &[Image],
    grow: u32,
    policy: Policy,
    allowed: Option<&[Vec<usize>]>,
) -> Result<Vec<(String, Vec<Segment>)>, AllocError> {
    let shape = Shape {
        areas: 1,
        legs: false,
        meta: false,
    };
    let mut out = Vec::with_capacity(images.len());
    for (i, (img, _, last)) in images.iter().enumerate() {
        // Only this image's PVs keep their space in the copy it is placed in.
        let mut mine = sp.clone();
        if let Some(a) = allowed.and_then(|a| a.get(i)) {
            for (p, pv) in mine.pvs.iter_mut().enumerate() {
                if !a.contains(&p) {
                    pv.runs.clear();
                }
            }
        }
        let placed = plan::place(
            &mut mine,
            &shape,
            grow,
            policy,
            Some(std::slice::from_ref(last)),
            Some(lv),
        )?;
        let alloc = placed.into_allocation(&mine, None, grow);
        let segs: Vec<Segment> = alloc.legs.into_iter().flatten().collect();
        // What the image took is taken from the space the others see.
        for s in &segs {
            if let SegmentKind::Striped { stripes, .. } = &s.kind {
                for a in stripes {
                    let Some(pv) = sp.pvs.iter_mut().find(|p| p.key == a.volume) else {
                        continue;
                    };
                    if !pv.take(a.start.0, s.extent_count.0) {
                        return Err(AllocError::Invalid(format!(
                            "{img}: internal error: a chosen run is not free"
                        )));
                    }
                }
            }
        }
        out.push((img.clone(), segs));
    }
    Ok(out)
}
