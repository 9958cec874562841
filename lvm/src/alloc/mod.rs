//! LVM's extent allocator, as a pure function over the model: given a VG and a request
//! (`lvcreate`- or `lvextend`-shaped), the segments to add, or an error that says why not.
//!
//! - [`free_report`]: free extents and runs of each PV (`pvs`' PFree, `vgs`' VFree).
//! - [`allocate`]: a new LV (linear, striped, or the images and metadata extents of a raid
//!   LV) under a [`Policy`], optionally restricted to a [`PvSelection`].
//! - [`extend`]: more extents for an existing linear or striped LV.
//! - [`extend_raid`]: more extents for every image of a volmgr raid LV, never on a PV another
//!   image uses.
//! - [`replace_images`]: new extents for failed images of a raid LV (`lvconvert --repair`),
//!   on hosts no surviving image uses.
//! - [`Size`] / [`parse_size`]: `-L` and `-l` arguments, turned into extents with LVM2's
//!   rounding and messages.
//!
//! # Where space comes from
//! A PV's free extents are those no segment area uses: `striped` areas, and the areas of any
//! other segment type that names PVs (arrays of `"pvN", extent` pairs; their length counted
//! as the whole segment, which is never less than lvm2's). PVs without `ALLOCATABLE`, PVs
//! flagged `MISSING`, and PVs outside the caller's selection are skipped; a selection with
//! `PV:PE-PE` ranges restricts further.
//!
//! # Policies
//! - `contiguous`: each stripe (or raid image with its metadata extent) is one free run on a
//!   PV of its own; when extending, each stripe continues in place right after its last area.
//! - `normal` (LVM's default; `cling` is taken as `normal`): the contiguous placement if there
//!   is one, else as few segments as the rules allow. Stripes: the PVs of one segment are
//!   distinct. A stripe stays on the PV it used before: in place when the next extents are
//!   free, else in that PV's largest run (lvm2's cling). Otherwise PVs are ranked by the run
//!   lvm2 would take on each ([`PvSelection`] order, else VG order, breaks ties; a run that
//!   holds everything still needed counts as that much, so the first PVs that can hold it
//!   all win), and each segment is as long as the shortest chosen run allows. A stripe may
//!   continue on a PV another stripe used at other LV offsets (as in lvm2), never within a
//!   segment; the request fails only when no such layout exists (the PVs, each counted up to
//!   one stripe's length, hold less than the request). Raid images: the PV sets of different
//!   images are disjoint; an image may span several PVs; each image's metadata extent is the
//!   first extent of its first run, so the image follows it on the same PV (as lvm2 does).
//! - **Storage hosts** (`normal` and `contiguous`): where PVs name the host they live on
//!   ([`crate::hosts`]: a `host:NAME` tag, or the host of the NBD/iSCSI URI the PV is on),
//!   the *hosts* of different raid images are disjoint too, so losing one host loses at most
//!   one image (HDFS's "no two replicas on one host"); a PV without a host is a host of its
//!   own. Placement then starts from the hosts with most free space, so successive raid LVs
//!   spread evenly over the hosts; lvm2's PV-order preference applies only to VGs without
//!   hosts. `anywhere` may put images on one host when nothing else fits. An extension grows
//!   each image on PVs of its own hosts or of hosts no image uses.
//! - `anywhere`: the `normal` placement if there is one, else stripes and images anywhere
//!   free, also on one PV (distinct PVs first).
//! - `inherit`: the LV's policy (for [`extend`]), else the VG's (`allocation_policy`), else
//!   `normal`.
//!
//! # Where this follows lvm2 and where not
//! Which run of a PV an area gets follows lvm2 2.03's walk over the PV's free areas
//! (`PvSpace::lvm2_run`: largest first, then on to shorter ones while the one before was
//! only partly used; often, not always, the smallest run that holds the area), and PVs are
//! ranked as lvm2 ranks them (by what the chosen run can give, then PV order).
//! `tests/alloc_interop.rs` checks lvcreate (linear on a named PV, striped, contiguous, a PE
//! range, spanning PVs, a choice among runs) and lvextend (cling, in place, refused) against
//! lvm2 2.03.16: same PVs and extents.
//!
//! Differences: lvm2's first segment of a striped LV takes as much as its chosen PVs hold,
//! even when what is left cannot be placed on distinct PVs (three PVs with 10 free extents
//! each and `-i 2 -l 30`: lvm2 takes 10 + 10 and fails for the rest); here segments are cut
//! shorter so that the rest stays placeable (5 + 5 on three PV pairs), and a segment is cut
//! shorter than lvm2's only in such cases. lvm2's `cling_by_tags`, `maximise_cling` over all
//! of an LV's segments (here: its last segment), mirror logs and raid10/raid0 layouts are
//! not modelled; raid images are placed by a search for disjoint PV sets (bounded; the error
//! says when it gave up), not by lvm2's parallel walk, so multi-PV images may be split at
//! different points than lvm2 would.

mod plan;
mod raid;
mod replace;
mod select;
mod size;
mod space;

pub use raid::{extend_raid, raid_segment, RaidExtension};
pub use replace::{apply_replacements, replace_images, Replacement};
pub use select::{PvSelection, SelectedPv};
pub use size::{
    display_size, parse_size, stripe_size, Amount, PercentOf, Sign, Size, DEFAULT_STRIPE_SIZE,
    MAX_STRIPES,
};

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use tables::Sectors;

use crate::model::{LogicalVolume, Segment, SegmentKind, VolumeGroup};
use crate::text::{Item, Value};
use crate::units::Extents;

/// An allocation policy (`--alloc`), in LVM's spellings.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Default)]
pub enum Policy {
    /// `normal` (also read from `cling` and `cling_by_tags`, which this allocator treats as
    /// `normal`, and from old metadata's `next free`).
    #[default]
    Normal,
    /// `contiguous`: each stripe or image one run; extensions in place.
    Contiguous,
    /// `anywhere`: like normal, else also several stripes or images on one PV.
    Anywhere,
    /// `inherit`: the LV's policy, else the VG's.
    Inherit,
}

/// What raid images are kept apart on, for messages.
fn domains_word(hosts: bool) -> &'static str {
    if hosts {
        "hosts (or PVs without a host)"
    } else {
        "physical volumes"
    }
}

/// An allocation policy name LVM does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Unrecognised allocation policy {0}")]
pub struct UnknownPolicy(pub String);

impl FromStr for Policy {
    type Err = UnknownPolicy;
    fn from_str(s: &str) -> Result<Policy, UnknownPolicy> {
        match s {
            "normal" | "cling" | "cling_by_tags" | "next free" => Ok(Policy::Normal),
            "contiguous" => Ok(Policy::Contiguous),
            "anywhere" => Ok(Policy::Anywhere),
            "inherit" => Ok(Policy::Inherit),
            _ => Err(UnknownPolicy(s.to_string())),
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Policy::Normal => "normal",
            Policy::Contiguous => "contiguous",
            Policy::Anywhere => "anywhere",
            Policy::Inherit => "inherit",
        })
    }
}

/// `allocation_policy` of a VG or LV section (LVM2 writes it when it is not the default).
fn policy_entry(extra: &[(String, Item)]) -> Option<Policy> {
    extra.iter().find_map(|(k, v)| match (k.as_str(), v) {
        ("allocation_policy", Item::Value(Value::Str(s))) => s.parse().ok(),
        _ => None,
    })
}

impl Policy {
    /// The policy a new LV of `vg` gets: `inherit` is the VG's policy (`normal` when the VG
    /// has none or says `inherit`).
    pub fn resolve(self, vg: &VolumeGroup) -> Policy {
        match self {
            Policy::Inherit => match policy_entry(&vg.extra) {
                Some(Policy::Inherit) | None => Policy::Normal,
                Some(p) => p,
            },
            p => p,
        }
    }

    /// The policy for extending `lv`: `inherit` is the LV's policy, else the VG's.
    pub fn resolve_for_lv(self, vg: &VolumeGroup, lv: &LogicalVolume) -> Policy {
        match self {
            Policy::Inherit => policy_entry(&lv.extra)
                .unwrap_or(Policy::Inherit)
                .resolve(vg),
            p => p,
        }
    }
}

/// What to allocate for a new LV.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Extents of the LV (for raid: of each image). A multiple of `stripes`.
    pub extents: Extents,
    /// Stripes (1: linear). With `legs > 1` it must be 1.
    pub stripes: u32,
    /// Stripe size with two or more stripes (`None`: LVM's default, 64 KiB); see
    /// [`stripe_size`].
    pub stripe_size: Option<Sectors>,
    /// 1 for a plain LV; more: raid images of `extents` each, on disjoint PV sets.
    pub legs: u32,
    /// One metadata extent (`rmeta`) per image, just before the image on its PV.
    pub raid_meta: bool,
    /// The policy (`Inherit`: the VG's).
    pub policy: Policy,
    /// The PVs (and extent ranges) that may be used; `None`: all.
    pub pvs: Option<PvSelection>,
    /// lvm2's "approximate" allocation for percentage sizes (`-l 100%FREE`, see
    /// [`Size::is_approximate`]): when `extents` do not fit, as many as do (whole stripes),
    /// and [`Allocation::extents`] says how many.
    pub approx: bool,
}

impl Default for Request {
    fn default() -> Request {
        Request {
            extents: Extents(0),
            stripes: 1,
            stripe_size: None,
            legs: 1,
            raid_meta: false,
            policy: Policy::Normal,
            pvs: None,
            approx: false,
        }
    }
}

/// The segments of a new LV (or of each raid image), and the raid metadata extents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocation {
    /// One list per image (one for a plain LV): `striped` segments on PV areas, with
    /// `start_extent` counted from 0.
    pub legs: Vec<Vec<Segment>>,
    /// With `raid_meta`: one 1-extent linear segment per image, in image order.
    pub meta: Vec<Segment>,
    /// Extents of the LV (of each image): the request's, or fewer with `approx`.
    pub extents: Extents,
}

/// Free space of one PV, for `pvs`/`vgs` (PFree, VFree).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PvFree {
    /// The PV's key (`pv0`).
    pub key: String,
    /// Free extents.
    pub free: Extents,
    /// The free runs, in extent order.
    pub runs: Vec<Range<u32>>,
}

/// Why an allocation or a size cannot be done; the messages follow lvm2's where it has one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    /// Less free space (in the usable PVs) than the request needs at all.
    #[error("Insufficient free space: {needed} extents needed, but only {available} available{}", detail(.why))]
    InsufficientSpace {
        /// Extents needed (every stripe, image and metadata extent).
        needed: u64,
        /// Free extents on the usable PVs.
        available: u64,
        /// Which PVs were skipped and why (may be empty).
        why: String,
    },
    /// Enough free space, but not in a layout the policy allows.
    #[error("Insufficient suitable {}allocatable extents{}: {more} more required ({why})",
        if *.contiguous { "contiguous " } else { "" },
        .lv.as_ref().map(|l| format!(" for logical volume {l}")).unwrap_or_default())]
    NoPlacement {
        /// Whether the policy was `contiguous`.
        contiguous: bool,
        /// The LV, when extending.
        lv: Option<String>,
        /// Extents that could not be placed.
        more: u64,
        /// Which rule and which PVs stood in the way.
        why: String,
    },
    /// More stripes than PVs, with a policy other than `anywhere`.
    #[error("Number of stripes ({stripes}) must not exceed number of physical volumes ({pvs})")]
    TooManyStripes {
        /// Stripes asked.
        stripes: u32,
        /// PVs in the VG or the selection.
        pvs: usize,
    },
    /// More raid images than usable failure domains (PVs, or hosts where PVs name one), with
    /// a policy other than `anywhere`.
    #[error(
        "{legs} images need {legs} {} with free space, only {pvs} usable: {why}",
        domains_word(*.hosts)
    )]
    TooManyLegs {
        /// Images asked.
        legs: u32,
        /// Usable PVs (or hosts) with free space.
        pvs: usize,
        /// Some PV has a host: the count is of hosts (and PVs without one).
        hosts: bool,
        /// The usable PVs.
        why: String,
    },
    /// `extents` is not a multiple of the stripe count.
    #[error("Number of extents requested ({extents}) needs to be divisible by {stripes}.")]
    NotDivisible {
        /// Extents asked.
        extents: u32,
        /// Stripes.
        stripes: u32,
    },
    /// A request or size argument lvm2 would refuse (the message says which).
    #[error("{0}")]
    Invalid(String),
    /// A PV named in a selection is not in the VG.
    #[error("Physical Volume \"{pv}\" not found in Volume Group \"{vg}\".")]
    UnknownPv {
        /// The PV (key or path as given).
        pv: String,
        /// The VG.
        vg: String,
    },
    /// The LV to extend is not in the VG.
    #[error("Logical volume {lv} not found in volume group {vg}.")]
    UnknownLv {
        /// The LV.
        lv: String,
        /// The VG.
        vg: String,
    },
    /// The LV's last segment is not one this allocator extends.
    #[error("Cannot extend {lv}: its last segment is {what}; only linear and striped segments on PVs can be extended here")]
    NotExtendable {
        /// The LV.
        lv: String,
        /// What its last segment is.
        what: String,
    },
}

fn detail(why: &str) -> String {
    if why.is_empty() {
        String::new()
    } else {
        format!(" ({why})")
    }
}

/// Free extents and runs of every PV of `vg`, in VG order (allocatable or not: this is what
/// `pvs` reports as PFree; their sum is `vgs`' VFree).
pub fn free_report(vg: &VolumeGroup) -> Vec<PvFree> {
    let used = space::used(vg);
    vg.physical_volumes
        .iter()
        .map(|pv| {
            let runs = space::free_runs(pv.pe_count.0, used.get(pv.key.as_str()));
            let free: u64 = runs.iter().map(|r| u64::from(r.end - r.start)).sum();
            PvFree {
                key: pv.key.clone(),
                free: Extents(u32::try_from(free).unwrap_or(u32::MAX)),
                runs,
            }
        })
        .collect()
}

/// Places a new LV: `req.legs` images (one for a plain LV) of `req.extents` each, striped
/// over `req.stripes` PVs, plus a metadata extent per image with `raid_meta`.
pub fn allocate(vg: &VolumeGroup, req: &Request) -> Result<Allocation, AllocError> {
    let policy = req.policy.resolve(vg);
    let stripes = req.stripes;
    if req.legs == 0 {
        return Err(AllocError::Invalid(
            "Number of images must be at least 1.".into(),
        ));
    }
    if req.legs > 1 && stripes != 1 {
        return Err(AllocError::Invalid(format!(
            "{} striped images: striped raid (raid10, raid0) is not supported by this allocator",
            req.legs
        )));
    }
    if stripes == 0 || stripes > MAX_STRIPES {
        return Err(AllocError::Invalid(format!(
            "Number of stripes ({stripes}) must be between 1 and {MAX_STRIPES}."
        )));
    }
    let stripe_size = if stripes > 1 {
        stripe_size(vg, stripes, req.stripe_size)?.0
    } else {
        None
    };
    if req.extents.0 == 0 {
        return Err(AllocError::Invalid(
            "Unable to create new logical volume with no extents.".into(),
        ));
    }
    if !req.extents.0.is_multiple_of(stripes) {
        return Err(AllocError::NotDivisible {
            extents: req.extents.0,
            stripes,
        });
    }
    if policy != Policy::Anywhere && stripes > 1 {
        // lvm2 counts the PVs of the selection (as filtered: allocatable, present, not
        // full) or, without one, every PV of the VG.
        let pvs = match &req.pvs {
            Some(sel) => space::eligible(vg, Some(sel))?
                .pvs
                .iter()
                .filter(|p| p.cap() > 0)
                .count(),
            None => vg.physical_volumes.len(),
        };
        if stripes as usize > pvs {
            return Err(AllocError::TooManyStripes { stripes, pvs });
        }
    }
    // Images (with their metadata extents) go through the image placement even when there
    // is one: lvconvert -m 1 adds a single image with its rmeta.
    let as_images = req.legs > 1 || req.raid_meta;
    if as_images && stripes != 1 {
        return Err(AllocError::Invalid(format!(
            "raid images with metadata extents take one stripe, not {stripes}"
        )));
    }
    let shape = plan::Shape {
        areas: if as_images { req.legs } else { stripes },
        legs: as_images,
        meta: req.raid_meta,
    };
    let attempt = |extents: u32| -> Result<Allocation, AllocError> {
        let mut sp = space::eligible(vg, req.pvs.as_ref())?;
        let per = if shape.legs {
            extents
        } else {
            extents / stripes
        };
        let placed = plan::place(&mut sp, &shape, per, policy, None, None)?;
        Ok(placed.into_allocation(&sp, stripe_size, extents))
    };
    match attempt(req.extents.0) {
        Ok(a) => Ok(a),
        Err(e @ (AllocError::InsufficientSpace { .. } | AllocError::NoPlacement { .. }))
            if req.approx =>
        {
            // Fewer extents are never harder to place, so the largest count that fits is
            // found by bisection over whole stripes.
            let (mut lo, mut hi) = (0u32, req.extents.0 / stripes);
            let mut best = None;
            while lo < hi {
                let mid = lo + (hi - lo).div_ceil(2);
                match attempt(mid * stripes) {
                    Ok(a) => {
                        best = Some(a);
                        lo = mid;
                    }
                    Err(_) => hi = mid - 1,
                }
            }
            match best {
                Some(a) => Ok(a),
                None if lo > 0 => attempt(lo * stripes),
                None => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

/// Segments that extend the linear or striped LV `lv` by `more` extents (a multiple of its
/// last segment's stripe count), with that segment's stripe count and size. They start at the
/// LV's current end; a segment that continues the last one in place is returned as a new
/// segment (the caller may merge it).
pub fn extend(
    vg: &VolumeGroup,
    lv: &str,
    more: Extents,
    policy: Policy,
    pvs: Option<&PvSelection>,
) -> Result<Vec<Segment>, AllocError> {
    let l = vg.lv(lv).ok_or_else(|| AllocError::UnknownLv {
        lv: lv.to_string(),
        vg: vg.name.clone(),
    })?;
    let last = l.segments.last().ok_or_else(|| AllocError::NotExtendable {
        lv: lv.to_string(),
        what: "missing (the LV has no segments)".into(),
    })?;
    let (stripe_size, areas) = match &last.kind {
        SegmentKind::Striped {
            stripe_size,
            stripes,
        } => (*stripe_size, stripes),
        SegmentKind::Other { segtype } => {
            return Err(AllocError::NotExtendable {
                lv: lv.to_string(),
                what: format!("of type {segtype}"),
            })
        }
    };
    let stripes = u32::try_from(areas.len()).unwrap_or(u32::MAX);
    let area_len = last.area_len().unwrap_or(Extents(0));
    let mut prev = Vec::with_capacity(areas.len());
    for a in areas {
        if vg.pv_by_key(&a.volume).is_none() {
            return Err(AllocError::NotExtendable {
                lv: lv.to_string(),
                what: format!("stacked on LV {}", a.volume),
            });
        }
        let end = a.start.0.checked_add(area_len.0).ok_or_else(|| {
            AllocError::Invalid(format!("{lv}: an area of its last segment ends past 2^32"))
        })?;
        prev.push((a.volume.clone(), end));
    }
    if more.0 == 0 {
        return Err(AllocError::Invalid(format!(
            "New size ({0} extents) matches existing size ({0} extents).",
            l.extent_count().unwrap_or(Extents(0))
        )));
    }
    if stripes == 0 || !more.0.is_multiple_of(stripes) {
        return Err(AllocError::NotDivisible {
            extents: more.0,
            stripes,
        });
    }
    let start = l
        .extent_count()
        .filter(|c| c.checked_add(more).is_some())
        .ok_or_else(|| AllocError::Invalid(format!("{lv} would be longer than 2^32-1 extents")))?;
    let policy = policy.resolve_for_lv(vg, l);
    let mut sp = space::eligible(vg, pvs)?;
    let shape = plan::Shape {
        areas: stripes,
        legs: false,
        meta: false,
    };
    let placed = plan::place(
        &mut sp,
        &shape,
        more.0 / stripes,
        policy,
        Some(&prev),
        Some(lv),
    )?;
    let alloc = placed.into_allocation(&sp, stripe_size, more.0);
    Ok(alloc
        .legs
        .into_iter()
        .flatten()
        .map(|mut s| {
            // Cannot saturate: the new segments end at `start + more`, checked above.
            s.start_extent = Extents(s.start_extent.0.saturating_add(start.0));
            s
        })
        .collect())
}

#[cfg(test)]
// Single ranges are what these tests mean.
#[allow(clippy::single_range_in_vec_init)]
mod tests;
