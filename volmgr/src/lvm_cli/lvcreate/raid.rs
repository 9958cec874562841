//! raid1/5/10 LVs on volmgr's raid format: one `_rmeta_N` (one extent, zeroed: a blank
//! superblock starts a new array, which then syncs) and one `_rimage_N` hidden LV per image,
//! no two images on one PV, and the visible LV with a `volmgr-raid*` segment over them.

use anyhow::{bail, Result};
use lvm::alloc::{self, Request};
use lvm::segtypes::{RaidLevel, RaidSegment, VolmgrSegment};
use lvm::Extents;
use tables::Sectors;

use super::plain::note_lines;
use super::{pv_selection, Draft, LvcreateArgs};

/// lvm2's default raid region size (2 MiB).
const DEFAULT_REGION: Sectors = Sectors(4096);

pub(super) fn create(a: &LvcreateArgs, d: &mut Draft, level: RaidLevel) -> Result<()> {
    // Images, and how many of them hold distinct data.
    let (images, data) = match level {
        RaidLevel::Raid1 => {
            if a.stripes.unwrap_or(1) > 1 {
                bail!("raid1 takes no -i: use raid10 for striped mirrors");
            }
            let m = a.mirrors.unwrap_or(1);
            if m == 0 {
                bail!("raid1 needs -m 1 or more (two images or more)");
            }
            (m + 1, 1)
        }
        RaidLevel::Raid5 => {
            let s = a.stripes.unwrap_or(2);
            if s < 2 {
                bail!("raid5 needs -i 2 or more data stripes (three images or more)");
            }
            if a.mirrors.unwrap_or(0) > 0 {
                bail!("raid5 takes no -m");
            }
            (s + 1, s)
        }
        RaidLevel::Raid10 => {
            let s = a.stripes.unwrap_or(2);
            if s < 2 || a.mirrors.unwrap_or(1) != 1 {
                bail!("raid10 takes -i 2 or more stripes and -m 1 (two copies)");
            }
            (s * 2, s)
        }
    };
    let vg = &d.md.vg;
    let pvs = pv_selection(&d.scan, vg, &a.pvs)?;
    let size = a.size()?;
    let (lv_extents, note) = size.to_image_extents(vg, pvs.as_ref(), data, images)?;
    note_lines(note);
    let Some(image_extents) = level.image_extents(lv_extents, images) else {
        bail!(
            "{} extents do not divide over {data} data images: give a multiple of {data}",
            lv_extents
        );
    };
    let stripe_size = if level == RaidLevel::Raid1 {
        None
    } else {
        let asked = match &a.stripesize {
            Some(s) => Some(super::super::parse_lvm_size(s, 'k')?.sectors_floor()),
            None => None,
        };
        let (s, note) = alloc::stripe_size(vg, data.max(2), asked)?;
        note_lines(note);
        s
    };
    let lv_sectors = lv_extents
        .to_sectors(vg.extent_size)
        .map(|s| s.0)
        .unwrap_or(0);
    let region = match &a.regionsize {
        Some(r) => {
            let s = super::super::parse_lvm_size(r, 'm')?.sectors_floor();
            if !s.0.is_power_of_two() {
                bail!("-R {r}: the region size must be a power of two");
            }
            s
        }
        // The largest power of two up to the default that the LV holds.
        None => Sectors(
            DEFAULT_REGION
                .0
                .min(1u64 << (63 - lv_sectors.max(1).leading_zeros())),
        ),
    };
    let placed = alloc::allocate(
        vg,
        &Request {
            extents: image_extents,
            stripes: 1,
            legs: images,
            raid_meta: true,
            policy: a.policy()?,
            pvs,
            ..Request::default()
        },
    )?;
    let name = d.name.clone();
    let mut lvs = Vec::new();
    let mut pairs = Vec::new();
    for (i, (leg, meta)) in placed.legs.into_iter().zip(placed.meta).enumerate() {
        let (m, img) = (format!("{name}_rmeta_{i}"), format!("{name}_rimage_{i}"));
        let meta_lv = d.lv(&m, false, vec![meta]);
        // A stale superblock would be taken for this array's: the metadata starts blank.
        d.zero_start(&meta_lv, u64::MAX)?;
        lvs.push(meta_lv);
        lvs.push(d.lv(&img, false, leg));
        pairs.push((m, img));
    }
    let seg = VolmgrSegment::Raid(RaidSegment {
        level,
        region_size: region,
        stripe_size,
        images: pairs,
    })
    .to_segment(Extents(0), lv_extents);
    lvs.insert(0, d.lv(&name, true, vec![seg]));
    d.commit(lvs)
}
