//! `pvmove SRC [DST...]`: every extent off a PV, one segment area at a time, while the LVs
//! stay in use, as LVM does it.
//!
//! For each area (one stripe of one segment of any LV, hidden sub-LVs included) on SRC:
//! a destination run is allocated (one run, on DST or any PV but SRC and the PVs the segment's
//! other stripes use); then
//! - the LV is active: three internal devices are made, `VG-pvmove0_src` and `VG-pvmove0_dst`
//!   (linear over the two areas) and `VG-pvmove0`, a raid1 over them without metadata, which
//!   resyncs from the source at every start; the LV's table is reloaded with that area mapped
//!   onto `VG-pvmove0`, so every write reaches both copies while the copy runs;
//! - the LV is not active: the bytes are copied here.
//!
//! Once the copy is complete the VG metadata is committed with the area on the destination,
//! the active LV's table is reloaded from it and the pvmove devices go. Until that commit the
//! metadata names the source, which every write keeps current; after it, the destination,
//! which the mirror kept current. A kill of the daemon mid-move brings the mirror back (it is a
//! persisted device) and it resyncs from the source; running `pvmove` again finds it and
//! continues (`--abort` puts the LV back on the source instead).

use anyhow::{bail, Context, Result};
use clap::Args;
use lvm::activate::{dm_name, MissingPvs};
use lvm::alloc::{self, Policy, PvSelection, Request};
use lvm::{Extents, LogicalVolume, Segment, SegmentKind, VolumeGroup};
use ublk_target::control::Request as Ctl;

use super::activate::{daemon_devices, ensure_mpaths, table_of};
use super::scan::Scan;
use super::DeviceArgs;
use crate::client::{call, expect_text, StateDir};

#[derive(Args)]
pub struct PvmoveArgs {
    /// The PV to empty, and optionally the PVs to move to (default: any other).
    pvs: Vec<String>,
    /// Put LVs that a killed pvmove left mirrored back on the source and remove the mirror.
    #[arg(long)]
    abort: bool,
    /// Move only this LV's extents.
    #[arg(short = 'n', long = "name", value_name = "LV")]
    lv: Option<String>,
    /// Copy rate limit of an active LV's mirror, KiB/s per device (default: no limit).
    #[arg(long, value_name = "KIB_PER_S")]
    rate: Option<u64>,
    #[command(flatten)]
    sd: StateDir,
    #[command(flatten)]
    dev: DeviceArgs,
}

/// The name of the temporary mirror LV, as lvm2 names it.
const MIRROR: &str = "pvmove0";

/// One area to move: stripe `stripe` of segment `seg` of LV `lv`.
#[derive(Clone, Debug)]
struct Item {
    lv: String,
    seg: usize,
    stripe: usize,
    start: Extents,
    len: Extents,
}

fn items(vg: &VolumeGroup, src: &str, only: Option<&str>) -> Vec<Item> {
    let mut out = Vec::new();
    for lv in &vg.logical_volumes {
        if only.is_some_and(|n| n != lv.name && !lv.name.starts_with(&format!("{n}_"))) {
            continue;
        }
        for (si, seg) in lv.segments.iter().enumerate() {
            let (SegmentKind::Striped { stripes, .. }, Some(len)) = (&seg.kind, seg.area_len())
            else {
                continue;
            };
            for (k, a) in stripes.iter().enumerate() {
                if a.volume == src {
                    out.push(Item {
                        lv: lv.name.clone(),
                        seg: si,
                        stripe: k,
                        start: a.start,
                        len,
                    });
                }
            }
        }
    }
    out
}

fn segment<'a>(vg: &'a VolumeGroup, it: &Item) -> Result<&'a Segment> {
    vg.lv(&it.lv)
        .and_then(|l| l.segments.get(it.seg))
        .with_context(|| format!("{}/{}: segment {} is gone", vg.name, it.lv, it.seg + 1))
}

/// The PV key and first extent the item's area moves to.
fn destination(
    vg: &VolumeGroup,
    src: &str,
    dst: &[String],
    it: &Item,
) -> Result<(String, Extents)> {
    let SegmentKind::Striped { stripes, .. } = &segment(vg, it)?.kind else {
        bail!("not a striped segment");
    };
    let others: Vec<&str> = stripes
        .iter()
        .enumerate()
        .filter(|(k, _)| *k != it.stripe)
        .map(|(_, a)| a.volume.as_str())
        .collect();
    let keys: Vec<String> = if dst.is_empty() {
        vg.physical_volumes.iter().map(|p| p.key.clone()).collect()
    } else {
        dst.to_vec()
    };
    let sel = PvSelection::whole(
        keys.into_iter()
            .filter(|k| k != src && !others.contains(&k.as_str())),
    );
    let placed = alloc::allocate(
        vg,
        &Request {
            extents: it.len,
            policy: Policy::Contiguous,
            pvs: Some(sel),
            ..Request::default()
        },
    )
    .with_context(|| {
        format!(
            "{}/{}: no free run of {} extents to move its area to",
            vg.name, it.lv, it.len
        )
    })?;
    match placed.legs.first().and_then(|l| l.first()).map(|s| &s.kind) {
        Some(SegmentKind::Striped { stripes, .. }) if stripes.len() == 1 => {
            Ok((stripes[0].volume.clone(), stripes[0].start))
        }
        _ => bail!("the allocator gave no single run"),
    }
}

/// `vg` with the item's area on (`key`, `start`).
fn moved(vg: &VolumeGroup, it: &Item, key: &str, start: Extents) -> Result<VolumeGroup> {
    let mut v = vg.clone();
    let lv = v.lv_mut(&it.lv).context("the LV")?;
    let seg = lv.segments.get_mut(it.seg).context("the segment")?;
    let SegmentKind::Striped { stripes, .. } = &mut seg.kind else {
        bail!("not a striped segment");
    };
    let a = stripes.get_mut(it.stripe).context("the stripe")?;
    a.volume = key.to_string();
    a.start = start;
    Ok(v)
}

/// A linear table over `len` extents of PV `key` from `start`.
fn area_table(
    scan: &Scan,
    vg: &VolumeGroup,
    key: &str,
    start: Extents,
    len: Extents,
) -> Result<String> {
    let lv = LogicalVolume::new("area", vec![Segment::linear(Extents(0), len, key, start)]);
    table_of(scan, vg, &lv, MissingPvs::Refuse)
}

fn ctl(sd: &StateDir, req: Ctl) -> Result<String> {
    expect_text(call(sd, req)?)
}

fn remove_mirror(sd: &StateDir, vg: &str) -> Result<()> {
    let running = daemon_devices(sd);
    for n in [
        MIRROR.to_string(),
        format!("{MIRROR}_src"),
        format!("{MIRROR}_dst"),
    ] {
        let name = dm_name(vg, &n);
        if running.contains_key(&name) {
            ctl(
                sd,
                Ctl::Remove {
                    name: name.clone(),
                    force: false,
                },
            )
            .with_context(|| format!("{name}: removing"))?;
        }
    }
    Ok(())
}

/// Reloads `lv`'s active device with the table of `vg`.
fn reload_lv(scan: &Scan, vg: &VolumeGroup, lv: &str, sd: &StateDir) -> Result<()> {
    let l = vg.lv(lv).context("the LV")?;
    let table = table_of(scan, vg, l, MissingPvs::Refuse)?;
    ctl(
        sd,
        Ctl::Reload {
            name: dm_name(&vg.name, lv),
            table,
        },
    )
    .with_context(|| format!("{}/{lv}: reloading", vg.name))?;
    Ok(())
}

/// A pvmove running in `vg`, as the daemon shows it: the LVs' devices on the mirror, the
/// source device, and the copy's progress (sectors done, in all).
pub(crate) struct Moving {
    /// Daemon device names of the LVs whose area is on the mirror.
    pub users: Vec<String>,
    /// The source device path.
    pub source: String,
    /// Copied and total sectors.
    pub progress: Option<(u64, u64)>,
}

/// The pvmove in progress in `vg`, if the daemon has its mirror.
pub(crate) fn moving(sd: &StateDir, vg: &str) -> Option<Moving> {
    let running = daemon_devices(sd);
    let mirror = dm_name(vg, MIRROR);
    if !running.contains_key(&mirror) {
        return None;
    }
    let src = ctl(
        sd,
        Ctl::Table {
            name: dm_name(vg, &format!("{MIRROR}_src")),
        },
    )
    .ok()?;
    let source = src
        .split_whitespace()
        .nth(3)
        .unwrap_or_default()
        .to_string();
    let progress = ctl(sd, Ctl::Status { name: mirror }).ok().and_then(|s| {
        crate::progress::parse_work(&s)
            .first()
            .map(|w| (w.done, w.total))
    });
    Some(Moving {
        users: mirror_users(sd, vg),
        source,
        progress,
    })
}

/// The daemon devices whose tables use the pvmove mirror of `vg`.
fn mirror_users(sd: &StateDir, vg: &str) -> Vec<String> {
    let needle = format!(
        "{}{}",
        lvm::activate::DAEMON_DEVICE_DIR,
        dm_name(vg, MIRROR)
    );
    daemon_devices(sd)
        .keys()
        .filter(|n| {
            ctl(sd, Ctl::Table { name: (*n).clone() })
                .map(|t| t.split_whitespace().any(|w| w == needle))
                .unwrap_or(false)
        })
        .cloned()
        .collect()
}

pub fn pvmove(a: PvmoveArgs) -> Result<()> {
    let Some((src_arg, dst_args)) = a.pvs.split_first() else {
        bail!("pvmove: name the PV to move extents off");
    };
    let scan = Scan::run_writable(&a.dev)?;
    scan.warn();
    let key_of = |scan: &Scan, path: &str| -> Result<(String, String)> {
        let label = scan
            .device_index(std::path::Path::new(path))
            .and_then(|i| scan.report.devices[i].label.clone())
            .with_context(|| format!("No PV found on device {path}."))?;
        let sv = scan
            .vg_of_pv(&label.pv_uuid)
            .with_context(|| format!("Physical volume {path} not in a volume group."))?;
        let pv = sv.metadata.vg.pv_by_id(&label.pv_uuid).context("the PV")?;
        Ok((sv.name().to_string(), pv.key.clone()))
    };
    let (vg_name, src) = key_of(&scan, src_arg)?;
    let mut dst = Vec::new();
    for d in dst_args {
        let (v, k) = key_of(&scan, d)?;
        if v != vg_name {
            bail!("{d} is in VG {v}, {src_arg} in {vg_name}");
        }
        dst.push(k);
    }

    if a.abort {
        let md = scan.vg(&vg_name)?.metadata.clone();
        for dev in mirror_users(&a.sd, &vg_name) {
            let lv = md
                .vg
                .logical_volumes
                .iter()
                .find(|l| dm_name(&vg_name, &l.name) == dev)
                .with_context(|| format!("{dev}: not an LV of {vg_name}"))?;
            reload_lv(&scan, &md.vg, &lv.name, &a.sd)?;
            println!("  {vg_name}/{}: back on the metadata's extents", lv.name);
        }
        remove_mirror(&a.sd, &vg_name)?;
        println!("  pvmove of {src_arg} aborted.");
        return Ok(());
    }

    let mut scan = scan;
    let mut moved_extents = 0u64;
    let mut n = 0usize;
    loop {
        let md = scan.vg(&vg_name)?.metadata.clone();
        let todo = items(&md.vg, &src, a.lv.as_deref());
        let Some(it) = todo.first().cloned() else {
            break;
        };
        let total: u64 = todo.iter().map(|i| u64::from(i.len.0)).sum::<u64>() + moved_extents;
        n += 1;
        let (dkey, dstart) = move_one(&a, &scan, &md.vg, &src, &dst, &it)?;
        let mut md = md;
        md.vg = moved(&md.vg, &it, &dkey, dstart)?;
        md.stamp(format!(
            "Created *after* executing 'volmgr pvmove {src_arg}'"
        ));
        scan.commit(&mut md)?;
        let active = daemon_devices(&a.sd).contains_key(&dm_name(&vg_name, &it.lv));
        if active {
            reload_lv(&scan, &md.vg, &it.lv, &a.sd)?;
        }
        remove_mirror(&a.sd, &vg_name)?;
        moved_extents += u64::from(it.len.0);
        println!(
            "  {src_arg}: Moved: {:.2}% ({vg_name}/{} area {n} now on {dkey} at extent {dstart})",
            moved_extents as f64 * 100.0 / total.max(1) as f64,
            it.lv
        );
        scan = Scan::run_writable(&a.dev)?;
    }
    if n == 0 {
        println!("  No data to move for {vg_name}.");
    } else {
        println!("  {src_arg}: Moved: 100.00%");
    }
    Ok(())
}

/// Copies one area to its destination (through a mirror when the LV is active) and returns
/// where it went; the caller commits.
fn move_one(
    a: &PvmoveArgs,
    scan: &Scan,
    vg: &VolumeGroup,
    src: &str,
    dst: &[String],
    it: &Item,
) -> Result<(String, Extents)> {
    let vgn = &vg.name;
    let src_table = area_table(scan, vg, src, it.start, it.len)?;
    let running = daemon_devices(&a.sd);
    let mirror = dm_name(vgn, MIRROR);
    // A mirror a killed pvmove left for this very area: continue with its destination.
    let resumed = if running.contains_key(&mirror) {
        let s = ctl(
            &a.sd,
            Ctl::Table {
                name: dm_name(vgn, &format!("{MIRROR}_src")),
            },
        )?;
        if s.trim() != src_table.trim() {
            bail!(
                "{vgn}: a pvmove mirror of another area is active ({}); run pvmove --abort first",
                s.trim()
            );
        }
        let d = ctl(
            &a.sd,
            Ctl::Table {
                name: dm_name(vgn, &format!("{MIRROR}_dst")),
            },
        )?;
        let found = vg.physical_volumes.iter().find_map(|pv| {
            let path = super::activate::pv_device(scan, pv)?;
            let f: Vec<&str> = d.split_whitespace().collect();
            let [_, _, "linear", dev, off] = f.as_slice() else {
                return None;
            };
            let off: u64 = off.parse().ok()?;
            let e = off.checked_sub(pv.pe_start.0)? / vg.extent_size.0.max(1);
            let e = u32::try_from(e).ok()?;
            (*dev == path).then(|| (pv.key.clone(), Extents(e)))
        });
        let found = found.context("the pvmove mirror's destination is not on a PV of the VG")?;
        println!(
            "  {vgn}/{}: resuming the move of its area to {}",
            it.lv, found.0
        );
        Some(found)
    } else {
        None
    };
    let (dkey, dstart) = match resumed.clone() {
        Some(r) => r,
        None => destination(vg, src, dst, it)?,
    };
    let active = running.contains_key(&dm_name(vgn, &it.lv));
    if !active {
        copy_area(scan, vg, src, it.start, &dkey, dstart, it.len)?;
        return Ok((dkey, dstart));
    }
    if resumed.is_none() {
        let dst_table = area_table(scan, vg, &dkey, dstart, it.len)?;
        let len = it.len.to_sectors(vg.extent_size).context("area size")?.0;
        let mut running_names = running.keys().cloned().collect();
        for (sub, table) in [("_src", &src_table), ("_dst", &dst_table)] {
            // An area on a PV with several paths is on its multipath device.
            ensure_mpaths(scan, vg, table, &a.sd, &mut running_names)?;
            ctl(
                &a.sd,
                Ctl::Create {
                    name: dm_name(vgn, &format!("{MIRROR}{sub}")),
                    table: table.clone(),
                    ublk_id: None,
                    nbd: None,
                    nbd_limits: Default::default(),
                    internal: true,
                    export: None,
                },
            )?;
        }
        let rate = a
            .rate
            .map(|r| format!(" max_recovery_rate {r}"))
            .unwrap_or_default();
        let nparams = if a.rate.is_some() { 5 } else { 3 };
        let region = 1024u64.min(1 << (63 - len.max(1).leading_zeros()));
        let dir = lvm::activate::DAEMON_DEVICE_DIR;
        let table = format!(
            "0 {len} raid raid1 {nparams} 0 region_size {region}{rate} 2 - {dir}{} - {dir}{}\n",
            dm_name(vgn, &format!("{MIRROR}_src")),
            dm_name(vgn, &format!("{MIRROR}_dst"))
        );
        ctl(
            &a.sd,
            Ctl::Create {
                name: mirror.clone(),
                table,
                ublk_id: None,
                nbd: None,
                nbd_limits: Default::default(),
                internal: true,
                export: None,
            },
        )?;
        // The LV with this area on the mirror: a temporary LV in a copy of the VG.
        let mut tmp = moved(vg, it, MIRROR, Extents(0))?;
        tmp.logical_volumes.push(LogicalVolume::new(
            MIRROR,
            vec![Segment::linear(Extents(0), it.len, src, it.start)],
        ));
        reload_lv(scan, &tmp, &it.lv, &a.sd)?;
    }
    crate::progress::follow(&format!("{vgn}/{}", it.lv), None, || {
        let st = ctl(
            &a.sd,
            Ctl::Status {
                name: mirror.clone(),
            },
        )?;
        Ok(crate::progress::parse_work(&st))
    })
    .with_context(|| format!("{vgn}/{}: copying its area", it.lv))?;
    // The mirror must really be in sync (both legs `A`) before the metadata names the copy.
    let st = ctl(
        &a.sd,
        Ctl::Status {
            name: mirror.clone(),
        },
    )?;
    if !st.split_whitespace().any(|w| w == "AA") {
        bail!(
            "{vgn}/{}: the mirror is not in sync ({st}); nothing was committed",
            it.lv
        );
    }
    Ok((dkey, dstart))
}

/// Copies `len` extents from (`src`, `s`) to (`dst`, `d`) for an LV that is not active.
fn copy_area(
    scan: &Scan,
    vg: &VolumeGroup,
    src: &str,
    s: Extents,
    dst: &str,
    d: Extents,
    len: Extents,
) -> Result<()> {
    let place = |key: &str, e: Extents| -> Result<(usize, u64)> {
        let pv = vg.pv_by_key(key).context("PV")?;
        let i = scan
            .report
            .device_of_pv(&pv.id)
            .with_context(|| format!("PV {key} is missing"))?;
        let off = e
            .to_sectors(vg.extent_size)
            .and_then(|x| x.0.checked_add(pv.pe_start.0))
            .context("offset overflows")?;
        Ok((i, off * 512))
    };
    let (si, so) = place(src, s)?;
    let (di, dof) = place(dst, d)?;
    let bytes = len.to_sectors(vg.extent_size).context("size")?.0 * 512;
    let (sd, dd) = (&scan.report.devices[si].dev, &scan.report.devices[di].dev);
    let chunk = 1u64 << 20;
    let mut at = 0;
    while at < bytes {
        let n = chunk.min(bytes - at) as usize;
        let buf = lvm::io::read_vec(sd.as_ref(), so + at, n)?;
        lvm::io::write_at(dd.as_ref(), dof + at, &buf, false)?;
        at += n as u64;
    }
    lvm::io::flush(dd.as_ref())?;
    Ok(())
}
