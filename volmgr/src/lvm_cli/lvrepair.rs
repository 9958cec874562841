//! `lvconvert --repair VG/LV`: a raid LV whose images failed (their PV is missing, or the
//! running array failed them) gets new images on hosts no surviving image uses, and rebuilds
//! them, online. The daemon's monitor runs the same repair when `raid_fault_policy` says
//! `allocate` (what dmeventd does for lvm2).
//!
//! Order, so that a crash at any point leaves the LV usable and the metadata truthful:
//! 1. the new metadata extents are zeroed (a raid assembled over them later starts that leg
//!    afresh and never trusts a stale in-sync mark);
//! 2. the VG is committed with the new areas, PVs that are gone flagged `MISSING` (and not
//!    written: lvm2 does the same);
//! 3. if the LV is active, each replaced image's internal devices (`VG-LV_rmeta_N`,
//!    `VG-LV_rimage_N`) are reloaded onto the new areas: the running array's leg now reaches
//!    the new extents through them;
//! 4. the array is told `rebuild N`: leg N is recovered from the others, with progress in
//!    `lvs -o +copy_percent`.
//!
//! A host that comes back later is not trusted: its PV is no longer referenced by the LV (its
//! extents were replaced), so nothing reads its stale copy.

use anyhow::{Context, Result};
use lvm::activate::{dm_name, MissingPvs};
use lvm::alloc::{self, Policy};
use lvm::{SegmentKind, VolumeGroup};
use ublk_target::control::Request as Ctl;

use super::activate::{daemon_devices, ensure_mpaths, table_of};
use super::lvconvert::zero_lvs;
use super::scan::Scan;
use super::DeviceArgs;
use crate::client::{call, expect_text, StateDir};

/// What `raid_fault_policy` says for an LV (lvm2's lvm.conf setting, here a tag on the LV or
/// its VG: `raid_fault_policy:allocate` or `raid_fault_policy:warn`; the LV's wins).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum FaultPolicy {
    /// Log the failure, change nothing (lvm2's default).
    Warn,
    /// Replace failed images from free space, on other hosts.
    Allocate,
}

/// The tag prefix that sets the policy.
pub const POLICY_TAG: &str = "raid_fault_policy:";

impl FaultPolicy {
    /// The policy for `lv` of `vg`: its tag, else the VG's, else `default`.
    pub fn of(vg: &VolumeGroup, lv: &str, default: FaultPolicy) -> FaultPolicy {
        let from = |tags: Vec<String>| {
            tags.iter().find_map(|t| match t.strip_prefix(POLICY_TAG) {
                Some("allocate") => Some(FaultPolicy::Allocate),
                Some("warn") => Some(FaultPolicy::Warn),
                _ => None,
            })
        };
        vg.lv(lv)
            .and_then(|l| from(lvm::hosts::tags_in(&l.extra)))
            .or_else(|| from(lvm::hosts::tags_in(&vg.extra)))
            .unwrap_or(default)
    }
}

/// What a repair did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Repaired {
    /// The images replaced (0-based leg indices).
    pub images: Vec<usize>,
    /// Where each went: `IMAGE_LV on PV_DEVICE`.
    pub placed: Vec<String>,
    /// Whether the running array was told to rebuild them.
    pub rebuilding: bool,
}

/// The failed legs of a running raid array from its status (`raid1 3 AD... ...`): the
/// positions of `D` in the health word.
pub fn failed_legs(status: &str) -> Vec<usize> {
    let words: Vec<&str> = status.split_whitespace().collect();
    // `raidN <#legs> <health> ...`, possibly after `start len raid`.
    words
        .windows(3)
        .find_map(|w| {
            let n: usize = w[1].parse().ok()?;
            (w[0].starts_with("raid") && w[2].len() == n && w[2].chars().all(|c| "ADa".contains(c)))
                .then(|| {
                    w[2].chars()
                        .enumerate()
                        .filter(|(_, c)| *c == 'D')
                        .map(|(i, _)| i)
                        .collect()
                })
        })
        .unwrap_or_default()
}

/// Replaces the failed images of raid LV `vg_name/lv_name` (see the module docs). `Ok(None)`:
/// nothing has failed. `log` hears each step.
pub fn repair_lv(
    dev: &DeviceArgs,
    sd: &StateDir,
    vg_name: &str,
    lv_name: &str,
    policy: Policy,
    log: &dyn Fn(&str),
) -> Result<Option<Repaired>> {
    let scan = Scan::run_writable(dev)?;
    let sv = scan.vg(vg_name)?;
    let mut md = sv.metadata.clone();
    let gone: Vec<lvm::Uuid> = sv
        .pvs
        .iter()
        .filter(|p| p.device.is_none())
        .map(|p| p.id)
        .collect();
    for pv in &mut md.vg.physical_volumes {
        if gone.contains(&pv.id) && !pv.is_missing() {
            pv.flags.set("MISSING");
        }
    }
    let raid = alloc::raid_segment(&md.vg, lv_name)
        .with_context(|| format!("{vg_name}/{lv_name} is not a volmgr raid LV"))?;
    let on_missing = |name: &str| {
        md.vg.lv(name).is_some_and(|l| {
            l.segments.iter().any(|s| match &s.kind {
                SegmentKind::Striped { stripes, .. } => stripes
                    .iter()
                    .any(|a| md.vg.pv_by_key(&a.volume).is_none_or(|p| p.is_missing())),
                SegmentKind::Other { .. } => false,
            })
        })
    };
    let mut failed: Vec<usize> = (0..raid.images.len())
        .filter(|&i| on_missing(&raid.images[i].0) || on_missing(&raid.images[i].1))
        .collect();
    let dm = dm_name(vg_name, lv_name);
    let active = daemon_devices(sd).contains_key(&dm);
    if active {
        let status = expect_text(call(sd, Ctl::Status { name: dm.clone() })?)
            .with_context(|| format!("{dm}: reading its status"))?;
        failed.extend(failed_legs(&status));
    }
    failed.sort_unstable();
    failed.dedup();
    if failed.is_empty() {
        return Ok(None);
    }
    log(&format!(
        "{vg_name}/{lv_name}: image(s) {failed:?} failed; allocating replacements"
    ));
    let reps = alloc::replace_images(&md.vg, lv_name, &failed, policy)
        .with_context(|| format!("{vg_name}/{lv_name}: no room for replacement images"))?;
    alloc::apply_replacements(&mut md.vg, &reps)?;
    let metas: Vec<&lvm::LogicalVolume> =
        reps.iter().filter_map(|r| md.vg.lv(&r.meta_lv)).collect();
    zero_lvs(&scan, &md.vg, &metas)?;
    let placed: Vec<String> = reps
        .iter()
        .map(|r| {
            let pv = r
                .image
                .first()
                .and_then(|s| match &s.kind {
                    SegmentKind::Striped { stripes, .. } => stripes.first(),
                    SegmentKind::Other { .. } => None,
                })
                .and_then(|a| md.vg.pv_by_key(&a.volume))
                .and_then(|p| scan.pv_path(&p.id))
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            format!("{} on {pv}", r.image_lv)
        })
        .collect();
    md.stamp(format!(
        "Created *after* executing 'volmgr lvconvert --repair {vg_name}/{lv_name}'"
    ));
    scan.commit(&mut md)
        .with_context(|| format!("{vg_name}: committing the replacement images"))?;
    log(&format!(
        "{vg_name}/{lv_name}: metadata committed: {}",
        placed.join(", ")
    ));
    if active {
        let running_table = expect_text(call(sd, Ctl::Table { name: dm.clone() })?)
            .with_context(|| format!("{dm}: reading its table"))?;
        let mut absent = Vec::new();
        for r in &reps {
            for name in [&r.meta_lv, &r.image_lv] {
                let l = md.vg.lv(name).context("a replaced sub-LV")?;
                let table = table_of(&scan, &md.vg, l, MissingPvs::Refuse)?;
                // New extents on a PV with several paths need its multipath device.
                let mut running = daemon_devices(sd).into_keys().collect();
                ensure_mpaths(&scan, &md.vg, &table, sd, &mut running)?;
                load_sub_lv(sd, &dm_name(vg_name, name), table, &running)?;
            }
            // A leg the array runs without (`- -`: activated or restored while its host was
            // down) has no device to rebuild onto: the array's own table brings it in.
            let image = format!(
                "{}{}",
                lvm::activate::DAEMON_DEVICE_DIR,
                dm_name(vg_name, &r.image_lv)
            );
            if !running_table.split_whitespace().any(|w| w == image) {
                absent.push(r);
                continue;
            }
            expect_text(call(
                sd,
                Ctl::Message {
                    name: dm.clone(),
                    args: vec!["rebuild".into(), r.index.to_string()],
                },
            )?)
            .with_context(|| format!("{dm}: starting the rebuild of leg {}", r.index))?;
            log(&format!(
                "{vg_name}/{lv_name}: rebuilding image {} onto {}",
                r.index, r.image_lv
            ));
        }
        if !absent.is_empty() {
            // The new legs' metadata is blank: the array assembled over them rebuilds them.
            let l = md.vg.lv(lv_name).context("the repaired LV")?;
            let table = table_of(&scan, &md.vg, l, MissingPvs::Degraded)?;
            expect_text(call(
                sd,
                Ctl::Reload {
                    name: dm.clone(),
                    table,
                },
            )?)
            .with_context(|| format!("{dm}: reloading its table with the new images"))?;
            for r in absent {
                log(&format!(
                    "{vg_name}/{lv_name}: image {} was missing from the running array; \
                     reloaded with {}, rebuilding it",
                    r.index, r.image_lv
                ));
            }
        }
    }
    Ok(Some(Repaired {
        images: failed,
        placed,
        rebuilding: active,
    }))
}

/// Points internal device `name` (a replaced sub-LV) at `table`: a reload when the daemon
/// has it (without the flush of the old table, whose storage is on the dead host and could
/// only fail), a new internal device when it has none (its leg was left out at activation).
fn load_sub_lv(
    sd: &StateDir,
    name: &str,
    table: String,
    running: &std::collections::HashSet<String>,
) -> Result<()> {
    let req = if running.contains(name) {
        Ctl::ReloadNoFlush {
            name: name.to_string(),
            table,
        }
    } else {
        Ctl::Create {
            name: name.to_string(),
            table,
            ublk_id: None,
            export: None,
            nbd: None,
            nbd_limits: Default::default(),
            internal: true,
        }
    };
    expect_text(call(sd, req)?)
        .with_context(|| format!("{name}: loading its table onto the new area"))?;
    Ok(())
}

/// `lvconvert --repair`: the repair, printed as lvm2 words it. With `use_policies`, only when
/// the LV's `raid_fault_policy` is `allocate`.
pub fn lvconvert_repair(
    dev: &DeviceArgs,
    sd: &StateDir,
    vg_name: &str,
    lv_name: &str,
    policy: Policy,
    use_policies: bool,
) -> Result<()> {
    if use_policies {
        let scan = Scan::run(dev)?;
        let vg = &scan.vg(vg_name)?.metadata.vg;
        if FaultPolicy::of(vg, lv_name, FaultPolicy::Warn) == FaultPolicy::Warn {
            eprintln!(
                "  WARNING: raid_fault_policy for {vg_name}/{lv_name} is \"warn\": not \
                 replacing failed images (tag the LV or VG {POLICY_TAG}allocate)"
            );
            return Ok(());
        }
    }
    let say = |m: &str| eprintln!("  {m}");
    match repair_lv(dev, sd, vg_name, lv_name, policy, &say)? {
        None => {
            println!("  {vg_name}/{lv_name}: no failed images: nothing to repair");
            Ok(())
        }
        Some(r) => {
            println!(
                "  Faulty devices in {vg_name}/{lv_name} successfully replaced ({}).",
                r.placed.join(", ")
            );
            if !r.rebuilding {
                println!("  {vg_name}/{lv_name} is not active: the new images resync when it is activated.");
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_legs_from_status() {
        assert_eq!(failed_legs("raid1 3 ADA 100/100 idle 0 0 -"), vec![1]);
        assert_eq!(
            failed_legs("0 2048 raid raid1 3 DDa 5/100 recover 0 0 -"),
            vec![0, 1]
        );
        assert!(failed_legs("raid1 2 AA 100/100 idle 0").is_empty());
        assert!(failed_legs("thin-pool 0 1/2").is_empty());
    }
}
