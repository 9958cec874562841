//! `lvremove` and `lvrename`: metadata-only changes to existing LVs.

use anyhow::{bail, Context, Result};
use clap::Args;
use lvm::activate::dm_name;
use lvm::text::{Item, Value};
use lvm::{SegmentKind, VolumeGroup};

use super::activate::{daemon_devices, deactivate_one};
use super::lvcreate::thin::{
    bump_transaction, ensure_pool_active, message, pool_segment, thin_segment,
};
use super::scan::Scan;
use super::{split_lv_name, Confirm, DeviceArgs};
use crate::client::StateDir;

#[derive(Args)]
pub struct LvremoveArgs {
    /// LVs, as VG/LV (or a VG: every LV in it).
    #[arg(required = true)]
    lvs: Vec<String>,
    #[command(flatten)]
    confirm: Confirm,
    #[command(flatten)]
    sd: StateDir,
    #[command(flatten)]
    dev: DeviceArgs,
}

#[derive(Args)]
pub struct LvrenameArgs {
    /// `VG OLD NEW`, or `VG/OLD VG/NEW`, or `VG/OLD NEW`.
    #[arg(num_args = 2..=3, required = true)]
    names: Vec<String>,
    #[command(flatten)]
    sd: StateDir,
    #[command(flatten)]
    dev: DeviceArgs,
}

/// LVs whose segments map onto `lv` (stacked on it), by name.
fn users_of(vg: &VolumeGroup, lv: &str) -> Vec<String> {
    vg.logical_volumes
        .iter()
        .filter(|l| {
            l.segments.iter().any(|s| match &s.kind {
                SegmentKind::Striped { stripes, .. } => stripes.iter().any(|a| a.volume == lv),
                // Other segment types name their sub-LVs in their own keys.
                SegmentKind::Other { .. } => s.extra.iter().any(|(_, item)| names(item, lv)),
            })
        })
        .map(|l| l.name.clone())
        .collect()
}

/// Whether a metadata item is the string `lv` or an array holding it.
fn names(item: &Item, lv: &str) -> bool {
    let is = |v: &Value| matches!(v, Value::Str(s) if s == lv);
    match item {
        Item::Value(v) => is(v),
        Item::Array(vs) => vs.iter().any(is),
        Item::Section(_) => false,
    }
}

pub fn lvremove(a: LvremoveArgs) -> Result<()> {
    let mut targets: Vec<(String, Option<String>)> = Vec::new();
    for arg in &a.lvs {
        match split_lv_name(arg) {
            Ok((vg, lv)) => targets.push((vg.to_string(), Some(lv.to_string()))),
            Err(_) if !arg.contains('/') => targets.push((arg.clone(), None)),
            Err(e) => return Err(e),
        }
    }
    for (vg_name, lv_name) in targets {
        // One scan and one commit per LV, as lvm2 does: each removal stands on its own.
        let names: Vec<String> = match lv_name {
            Some(l) => vec![l],
            None => {
                let scan = Scan::run(&a.dev)?;
                let vg = &scan.vg(&vg_name)?.metadata.vg;
                vg.logical_volumes
                    .iter()
                    .filter(|l| l.status.has("VISIBLE"))
                    .map(|l| l.name.clone())
                    .collect()
            }
        };
        for lv_name in names {
            remove_one(&a, &vg_name, &lv_name)?;
        }
    }
    Ok(())
}

fn remove_one(a: &LvremoveArgs, vg_name: &str, lv_name: &str) -> Result<()> {
    let scan = Scan::run_writable(&a.dev)?;
    scan.warn();
    let sv = scan.vg(vg_name)?;
    let mut md = sv.metadata.clone();
    let vg = &md.vg;
    let lv = vg
        .lv(lv_name)
        .with_context(|| format!("Failed to find logical volume \"{vg_name}/{lv_name}\""))?;
    if !lv.status.has("VISIBLE") {
        bail!("Can't remove logical volume {vg_name}/{lv_name} used as an internal LV of another");
    }
    let users = users_of(vg, lv_name);
    if !users.is_empty() {
        bail!(
            "Logical volume {vg_name}/{lv_name} is used by {}: remove that first",
            users.join(", ")
        );
    }
    // The LV and the hidden sub-LVs it is built on (raid images, a pool's data and
    // metadata) go together.
    let mut family: Vec<String> = vec![lv_name.to_string()];
    let mut i = 0;
    while i < family.len() && i < 4096 {
        if let Some(l) = vg.lv(&family[i]) {
            for dep in lvm::activate::lv_dependencies(vg, l) {
                if !dep.status.has("VISIBLE") && !family.contains(&dep.name) {
                    family.push(dep.name.clone());
                }
            }
        }
        i += 1;
    }
    let outside: Vec<String> = family
        .iter()
        .flat_map(|m| users_of(vg, m))
        .filter(|u| !family.contains(u))
        .collect();
    if !outside.is_empty() {
        bail!(
            "Logical volume {vg_name}/{lv_name} is used by {}: remove that first",
            outside.join(", ")
        );
    }
    // A thin LV a replication ships or receives into keeps its blocks until that stops.
    if let Some(t) = thin_segment(lv) {
        let pool_dev = dm_name(vg_name, &t.thin_pool);
        if let Some(v) = crate::repl::replicating(&a.sd, &pool_dev, t.device_id) {
            bail!(
                "Logical volume {vg_name}/{lv_name} is replicated as '{v}': \
                 `volmgr repl remove {v} --yes` first"
            );
        }
    }
    let dm = dm_name(vg_name, lv_name);
    let running = daemon_devices(&a.sd);
    if running.contains_key(&dm) {
        if !a.confirm.ask(&format!(
            "Do you really want to remove active logical volume {vg_name}/{lv_name}?"
        ))? {
            bail!("Logical volume {vg_name}/{lv_name} not removed.");
        }
        deactivate_one(vg, lv, &a.sd, &running)
            .with_context(|| format!("{vg_name}/{lv_name}: deactivating"))?;
    }
    // A thin LV's blocks go back to its pool first; the metadata then forgets it.
    if let Some(t) = thin_segment(lv) {
        let pool = vg
            .lv(&t.thin_pool)
            .with_context(|| format!("{vg_name}/{lv_name}: its pool {} is missing", t.thin_pool))?;
        let pool_dev = ensure_pool_active(&scan, vg, pool, &a.sd)?;
        message(
            &a.sd,
            &pool_dev,
            &["delete".into(), t.device_id.to_string()],
        )?;
        let pool_name = t.thin_pool.clone();
        bump_transaction(&mut md.vg, &pool_name, &a.sd, &pool_dev)?;
    } else if pool_segment(lv).is_some() {
        // Its internal device goes with it (no thin LV uses it: checked above).
        let pool_dev = dm_name(vg_name, lv_name);
        if daemon_devices(&a.sd).contains_key(&pool_dev) {
            deactivate_one(vg, lv, &a.sd, &daemon_devices(&a.sd))?;
        }
    }
    md.vg.logical_volumes.retain(|l| !family.contains(&l.name));
    md.stamp(format!(
        "Created *after* executing 'volmgr lvremove {vg_name}/{lv_name}'"
    ));
    scan.commit(&mut md)?;
    println!("  Logical volume \"{lv_name}\" successfully removed.");
    Ok(())
}

pub fn lvrename(a: LvrenameArgs) -> Result<()> {
    let (vg_name, old, new) = match a.names.as_slice() {
        [vg, old, new] => (vg.as_str(), old.as_str(), new.as_str()),
        [old, new] => {
            let (vg, o) = split_lv_name(old)?;
            let n = match split_lv_name(new) {
                Ok((v, n)) if v == vg => n,
                Ok((v, _)) => bail!("Logical volume names must have the same VG ({vg} vs {v})"),
                Err(_) => new.as_str(),
            };
            (vg, o, n)
        }
        _ => bail!("lvrename takes VG OLD NEW or VG/OLD VG/NEW"),
    };
    lvm::vgcreate::check_name("LV", new).map_err(anyhow::Error::msg)?;
    let scan = Scan::run_writable(&a.dev)?;
    scan.warn();
    let mut md = scan.vg(vg_name)?.metadata.clone();
    if md.vg.lv(new).is_some() {
        bail!("Logical Volume \"{new}\" already exists in volume group \"{vg_name}\"");
    }
    if md.vg.lv(old).is_none() {
        bail!("Existing logical volume \"{old}\" not found in volume group \"{vg_name}\"");
    }
    if daemon_devices(&a.sd).contains_key(&dm_name(vg_name, old)) {
        // The daemon's device and /dev/VG/LV carry the old name; a rename under them would
        // leave both stale.
        bail!("Logical volume {vg_name}/{old} is active: deactivate it (lvchange -an) first");
    }
    if !users_of(&md.vg, old).is_empty() {
        bail!("Logical volume {vg_name}/{old} is used by another LV and cannot be renamed");
    }
    for l in &mut md.vg.logical_volumes {
        if l.name == old {
            l.name = new.to_string();
        }
    }
    md.stamp(format!(
        "Created *after* executing 'volmgr lvrename {vg_name} {old} {new}'"
    ));
    scan.commit(&mut md)?;
    println!("  Renamed \"{old}\" to \"{new}\" in volume group \"{vg_name}\"");
    Ok(())
}
