//! `lvconvert -m N VG/LV`: a linear or striped LV becomes a raid1 LV (`-m 1` or more), and
//! a raid1 LV goes back to a plain LV (`-m 0`), online.
//!
//! Up: the LV's segments become `LV_rimage_0` as they are (no data moves); new images of the
//! same size and one metadata extent per image are allocated on PVs the first image does not
//! use, the metadata extents are zeroed, and the LV becomes a `volmgr-raid1` LV over them. A
//! raid1 array whose metadata is blank is new: it resyncs from image 0, and while it does,
//! reads of regions not yet in sync come from image 0 (the raid crate's rule), so the LV reads
//! what it held. An active LV gets its sub-LVs as internal devices and its table reloaded in
//! place.
//!
//! Down: the LV keeps image 0 (or, when that leg is failed, the first healthy one); an active
//! LV's table is reloaded onto that image's extents first, the other sub-LVs' devices go, the
//! metadata extents are zeroed (so a raid assembled from them later would start new and resync
//! from image 0, never trust a stale in-sync mark), and then the VG is committed without the
//! sub-LVs.

use anyhow::{bail, Context, Result};
use clap::Args;
use lvm::activate::{dm_name, MissingPvs};
use lvm::alloc::{self, PvSelection, Request};
use lvm::segtypes::{RaidLevel, RaidSegment, VolmgrSegment};
use lvm::{Extents, LogicalVolume, Segment, SegmentKind, VolumeGroup};
use tables::Sectors;
use ublk_target::control::Request as Ctl;

use super::activate::{activate_one, check_tables, daemon_devices, table_of};
use super::lvcreate::pv_selection;
use super::scan::Scan;
use super::{split_lv_name, DeviceArgs};
use crate::client::{call, expect_text, StateDir};

#[derive(Args)]
pub struct LvconvertArgs {
    /// The LV, as VG/LV.
    lv: String,
    /// PVs the new images may use (optionally with extent ranges).
    pvs: Vec<String>,
    /// Mirrors: images beyond the first (1: two-way raid1; 0: back to a plain LV).
    #[arg(short = 'm', long = "mirrors", required_unless_present = "repair")]
    mirrors: Option<u32>,
    /// Replace the failed images of a raid LV (on a missing PV, or failed in the running
    /// array) with new ones on hosts no surviving image uses, and rebuild them.
    #[arg(long, conflicts_with = "mirrors")]
    repair: bool,
    /// With --repair: do what `raid_fault_policy` says (the VG's or LV's
    /// `raid_fault_policy:warn|allocate` tag, else warn), as dmeventd does.
    #[arg(long, requires = "repair")]
    use_policies: bool,
    /// Allocation policy for --repair's new images (`anywhere` lets an image share a host).
    #[arg(long = "alloc", value_name = "POLICY", default_value = "inherit")]
    alloc: String,
    /// Answer yes to the question lvm2 asks before dropping images.
    #[arg(short = 'y', long)]
    yes: bool,
    #[command(flatten)]
    sd: StateDir,
    #[command(flatten)]
    dev: DeviceArgs,
}

/// lvm2's default raid region size (2 MiB).
const DEFAULT_REGION: Sectors = Sectors(4096);

/// PV keys a plain LV's segments use.
fn pvs_of(lv: &LogicalVolume) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in &lv.segments {
        if let SegmentKind::Striped { stripes, .. } = &s.kind {
            for a in stripes {
                if !out.contains(&a.volume) {
                    out.push(a.volume.clone());
                }
            }
        }
    }
    out
}

/// Every PV of `vg` except `used`, or the command line's selection minus `used`.
fn other_pvs(vg: &VolumeGroup, sel: Option<PvSelection>, used: &[String]) -> PvSelection {
    let mut s = sel
        .unwrap_or_else(|| PvSelection::whole(vg.physical_volumes.iter().map(|p| p.key.clone())));
    s.pvs.retain(|p| !used.contains(&p.key));
    s
}

/// The table `lv` gets from the metadata, with PVs at the scan's paths.
fn table(scan: &Scan, vg: &VolumeGroup, lv: &LogicalVolume) -> Result<String> {
    table_of(scan, vg, lv, MissingPvs::Refuse)
}

/// The LV `name` of `md`, to change.
fn lv_mut<'a>(md: &'a mut lvm::Metadata, name: &str) -> Result<&'a mut LogicalVolume> {
    let vg = md.vg.name.clone();
    md.vg
        .lv_mut(name)
        .with_context(|| format!("{vg}/{name}: not in the metadata"))
}

fn reload(sd: &StateDir, name: &str, table: String) -> Result<()> {
    expect_text(call(
        sd,
        Ctl::Reload {
            name: name.to_string(),
            table,
        },
    )?)
    .with_context(|| format!("{name}: reloading its table"))?;
    Ok(())
}

/// Zeroes the metadata extents `lvs` (rmeta sub-LVs) on their PVs.
pub(super) fn zero_lvs(scan: &Scan, vg: &VolumeGroup, lvs: &[&LogicalVolume]) -> Result<()> {
    for l in lvs {
        // The PVs as scanned: a PV with several paths is written through the scan's path.
        for line in super::activate::scan_table(scan, vg, l)?.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let [_, len, "linear", dev, off] = f.as_slice() else {
                bail!("{}/{}: not a linear metadata LV", vg.name, l.name);
            };
            let (len, off): (u64, u64) = (len.parse()?, off.parse()?);
            let i = scan
                .device_index(std::path::Path::new(dev))
                .with_context(|| format!("{dev}: not scanned"))?;
            let d = &scan.report.devices[i].dev;
            let zero = vec![0u8; (len * 512) as usize];
            lvm::io::write_at(d.as_ref(), off * 512, &zero, true)
                .with_context(|| format!("{}/{}: zeroing", vg.name, l.name))?;
        }
    }
    Ok(())
}

pub fn lvconvert(a: LvconvertArgs) -> Result<()> {
    let (vg_name, lv_name) = split_lv_name(&a.lv)?;
    if a.repair {
        let policy: alloc::Policy = a.alloc.parse().map_err(anyhow::Error::msg)?;
        return super::lvrepair::lvconvert_repair(
            &a.dev,
            &a.sd,
            vg_name,
            lv_name,
            policy,
            a.use_policies,
        );
    }
    let mirrors = a.mirrors.unwrap_or(0);
    let scan = Scan::run_writable(&a.dev)?;
    scan.warn();
    let mut md = scan.vg(vg_name)?.metadata.clone();
    let lv = md
        .vg
        .lv(lv_name)
        .with_context(|| format!("Failed to find logical volume \"{vg_name}/{lv_name}\""))?
        .clone();
    let raid = match lv.segments.first().map(VolmgrSegment::parse) {
        Some(Ok(Some(VolmgrSegment::Raid(r)))) => Some(r),
        Some(Ok(Some(_))) => {
            bail!("{vg_name}/{lv_name}: lvconvert -m works on linear, striped and raid1 LVs")
        }
        _ => None,
    };
    let dm = dm_name(vg_name, lv_name);
    let active = daemon_devices(&a.sd).contains_key(&dm);
    md.stamp(format!(
        "Created *after* executing 'volmgr lvconvert -m {mirrors} {vg_name}/{lv_name}'"
    ));
    match (raid, mirrors) {
        (None, 0) => bail!("{vg_name}/{lv_name} has no mirrors: nothing to do"),
        (None, m) => up(&a, &scan, md, lv, m, active),
        (Some(r), 0) if r.level == RaidLevel::Raid1 => down(&a, &scan, md, lv, r, active),
        (Some(r), m) => bail!(
            "{vg_name}/{lv_name} is {} with {} images: convert it to -m 0 first to change its \
             image count to {}",
            r.level.name(),
            r.images.len(),
            m + 1
        ),
    }
}

fn up(
    a: &LvconvertArgs,
    scan: &Scan,
    mut md: lvm::Metadata,
    lv: LogicalVolume,
    mirrors: u32,
    active: bool,
) -> Result<()> {
    let vg = md.vg.clone();
    let (vg_name, name) = (vg.name.clone(), lv.name.clone());
    if !lv.status.has("VISIBLE") {
        bail!("{vg_name}/{name} is an internal LV");
    }
    let extents = lv.extent_count().context("LV size")?;
    let first_pvs = pvs_of(&lv);
    // Image 0 is the LV's own segments; its metadata extent goes next to it if it can.
    let mut image0 = lv.clone();
    image0.name = format!("{name}_rimage_0");
    image0.id = lvm::Uuid::generate();
    image0.status.clear("VISIBLE");
    let mut scratch = vg.clone();
    scratch.logical_volumes.retain(|l| l.name != name);
    scratch.logical_volumes.push(image0.clone());
    let meta0 = alloc::allocate(
        &scratch,
        &Request {
            extents: Extents(1),
            pvs: Some(PvSelection::whole(first_pvs.clone())),
            ..Request::default()
        },
    )
    .or_else(|_| {
        alloc::allocate(
            &scratch,
            &Request {
                extents: Extents(1),
                ..Request::default()
            },
        )
    })
    .context("allocating the first image's metadata extent")?;
    let mut meta0_lv = LogicalVolume::new(
        &format!("{name}_rmeta_0"),
        meta0.legs.into_iter().next().unwrap_or_default(),
    );
    meta0_lv.status.clear("VISIBLE");
    scratch.logical_volumes.push(meta0_lv.clone());
    // The new images: on PVs image 0 does not use, one set of PVs each.
    let sel = pv_selection(scan, &vg, &a.pvs)?;
    let placed = alloc::allocate(
        &scratch,
        &Request {
            extents,
            legs: mirrors,
            raid_meta: true,
            pvs: Some(other_pvs(&vg, sel, &first_pvs)),
            ..Request::default()
        },
    )
    .map_err(|e| {
        anyhow::anyhow!(
            "{vg_name}/{name}: no room for {mirrors} more image(s) of {extents} extents on \
             PVs other than {}: {e}",
            first_pvs.join(", ")
        )
    })?;
    let mut subs = vec![meta0_lv.clone(), image0.clone()];
    let mut pairs = vec![(meta0_lv.name.clone(), image0.name.clone())];
    for (i, (leg, meta)) in placed.legs.into_iter().zip(placed.meta).enumerate() {
        let k = i + 1;
        let mut m = LogicalVolume::new(&format!("{name}_rmeta_{k}"), vec![meta]);
        m.status.clear("VISIBLE");
        let mut img = LogicalVolume::new(&format!("{name}_rimage_{k}"), leg);
        img.status.clear("VISIBLE");
        pairs.push((m.name.clone(), img.name.clone()));
        subs.push(m);
        subs.push(img);
    }
    for s in &subs {
        if vg.lv(&s.name).is_some() {
            bail!("{vg_name}: an LV named {} exists already", s.name);
        }
    }
    let sectors = extents.to_sectors(vg.extent_size).map(|s| s.0).unwrap_or(0);
    let region = Sectors(
        DEFAULT_REGION
            .0
            .min(1u64 << (63 - sectors.max(1).leading_zeros())),
    );
    let seg: Segment = VolmgrSegment::Raid(RaidSegment {
        level: RaidLevel::Raid1,
        region_size: region,
        stripe_size: None,
        images: pairs,
    })
    .to_segment(Extents(0), extents);
    lv_mut(&mut md, &name)?.segments = vec![seg];
    md.vg.logical_volumes.extend(subs.iter().cloned());
    let changed: Vec<&LogicalVolume> = std::iter::once(name.as_str())
        .chain(subs.iter().map(|l| l.name.as_str()))
        .filter_map(|n| md.vg.lv(n))
        .collect();
    check_tables(scan, &md.vg, &changed)?;
    // A blank superblock on every image: the array is new and resyncs from image 0.
    let metas: Vec<&LogicalVolume> = subs.iter().filter(|l| l.name.contains("_rmeta_")).collect();
    zero_lvs(scan, &md.vg, &metas)?;
    scan.commit(&mut md)?;
    if active {
        // The sub-LVs as internal devices, then the LV's own table, in place.
        let vg = &md.vg;
        let top = vg.lv(&name).context("the LV")?;
        let running = daemon_devices(&a.sd);
        for s in &subs {
            if !running.contains_key(&dm_name(&vg_name, &s.name)) {
                activate_one(scan, vg, s, MissingPvs::Refuse, None, &a.sd, &running)?;
            }
        }
        reload(&a.sd, &dm_name(&vg_name, &name), table(scan, vg, top)?)?;
    }
    println!(
        "  Logical volume {vg_name}/{name} successfully converted to raid1 with {} images{}.",
        mirrors + 1,
        if active {
            " (resyncing from image 0: lvs shows Cpy%Sync)"
        } else {
            ""
        }
    );
    Ok(())
}

fn down(
    a: &LvconvertArgs,
    scan: &Scan,
    mut md: lvm::Metadata,
    lv: LogicalVolume,
    raid: RaidSegment,
    active: bool,
) -> Result<()> {
    let vg = md.vg.clone();
    let (vg_name, name) = (vg.name.clone(), lv.name.clone());
    let dm = dm_name(&vg_name, &name);
    // The image to keep: 0, unless the live array says that leg failed.
    let mut keep = 0usize;
    if active {
        let status = expect_text(call(&a.sd, Ctl::Status { name: dm.clone() })?)?;
        let health = status
            .split_whitespace()
            .find(|w| w.len() == raid.images.len() && w.chars().all(|c| "ADa".contains(c)))
            .unwrap_or("");
        if health.contains('a') && !a.yes {
            bail!(
                "{vg_name}/{name} is still syncing ({health}): wait for Cpy%Sync 100.00, or add \
                 --yes to keep image 0 anyway"
            );
        }
        if health.starts_with('D') {
            keep = health.find('A').context("no healthy image to keep")?;
        }
    }
    let (keep_meta, keep_image) = &raid.images[keep];
    let image = vg
        .lv(keep_image)
        .with_context(|| format!("{vg_name}/{keep_image} is missing"))?;
    let subs: Vec<String> = raid
        .images
        .iter()
        .flat_map(|(m, i)| [m.clone(), i.clone()])
        .collect();
    lv_mut(&mut md, &name)?.segments = image.segments.clone();
    md.vg.logical_volumes.retain(|l| !subs.contains(&l.name));
    check_tables(scan, &md.vg, &[md.vg.lv(&name).context("the LV")?])?;
    if active {
        let top = md.vg.lv(&name).context("the LV")?;
        reload(&a.sd, &dm, table(scan, &md.vg, top)?)?;
        for s in &subs {
            let n = dm_name(&vg_name, s);
            if daemon_devices(&a.sd).contains_key(&n) {
                expect_text(call(
                    &a.sd,
                    Ctl::Remove {
                        name: n.clone(),
                        force: false,
                    },
                )?)
                .with_context(|| format!("{n}: removing"))?;
            }
        }
    }
    let metas: Vec<&LogicalVolume> = raid.images.iter().filter_map(|(m, _)| vg.lv(m)).collect();
    zero_lvs(scan, &vg, &metas)?;
    scan.commit(&mut md)?;
    println!(
        "  Logical volume {vg_name}/{name} successfully converted: it keeps {keep_image} \
         (and drops {} other image(s) and {keep_meta} with the rest of the metadata).",
        raid.images.len() - 1
    );
    Ok(())
}
