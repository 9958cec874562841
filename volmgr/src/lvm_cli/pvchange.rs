//! `pvchange`: a PV's attributes in its VG's metadata: allocatable (`-x y|n`) and tags
//! (`--addtag`/`--deltag`), as lvm2 does it. A `host:NAME` tag names the storage host the PV
//! lives on, which raid placement keeps images apart by (see `lvm::hosts`).

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use super::devices::DeviceArgs;
use super::scan::Scan;
use super::{absolute, vg::description};

#[derive(Args)]
pub struct PvchangeArgs {
    /// PVs to change.
    #[arg(value_name = "PV", required_unless_present = "all")]
    pvs: Vec<PathBuf>,
    /// Every PV in a VG.
    #[arg(short = 'a', long)]
    all: bool,
    /// Whether new extents may be allocated on the PV (`y` or `n`).
    #[arg(short = 'x', long, value_name = "y|n")]
    allocatable: Option<String>,
    /// Add a tag (repeatable); `host:NAME` names the PV's storage host.
    #[arg(long, value_name = "TAG")]
    addtag: Vec<String>,
    /// Remove a tag (repeatable).
    #[arg(long, value_name = "TAG")]
    deltag: Vec<String>,
    #[command(flatten)]
    dev: DeviceArgs,
}

pub fn pvchange(a: PvchangeArgs) -> Result<()> {
    super::vg::lvm_status(run(&a))
}

fn run(a: &PvchangeArgs) -> Result<()> {
    let alloc = match a.allocatable.as_deref() {
        None => None,
        Some("y") => Some(true),
        Some("n") => Some(false),
        Some(other) => bail!("Invalid argument for --allocatable: {other} (y or n)"),
    };
    if alloc.is_none() && a.addtag.is_empty() && a.deltag.is_empty() {
        bail!("Please give one or more of -x, --addtag or --deltag");
    }
    for t in a.addtag.iter().chain(&a.deltag) {
        if !lvm::hosts::valid_tag(t) {
            bail!("Failed to find a valid tag in {t}");
        }
    }
    let scan = Scan::run_writable(&a.dev)?;
    scan.warn();
    let targets: Vec<PathBuf> = if a.all {
        scan.report
            .vgs
            .iter()
            .flat_map(|v| v.pvs.iter().filter_map(|p| scan.pv_path(&p.id).cloned()))
            .collect()
    } else {
        absolute(&a.pvs)
    };
    let (mut done, mut failed) = (0usize, 0usize);
    for p in &targets {
        // Each change commits a VG version the next one builds on: scan each time.
        let scan = Scan::run_writable(&a.dev)?;
        match change_one(&scan, p, alloc, &a.addtag, &a.deltag) {
            Ok(true) => {
                done += 1;
                println!("  Physical volume \"{}\" changed", p.display());
            }
            Ok(false) => {
                done += 1;
                println!(
                    "  Physical volume \"{}\" is already as asked: nothing to change",
                    p.display()
                );
            }
            Err(e) => {
                failed += 1;
                eprintln!("  {e:#}");
            }
        }
    }
    println!(
        "  {done} physical volume{} changed / {failed} physical volume{} not changed",
        if done == 1 { "" } else { "s" },
        if failed == 1 { "" } else { "s" }
    );
    if failed > 0 {
        bail!("{failed} physical volume(s) not changed");
    }
    Ok(())
}

/// Applies the changes to the PV at `p`; `Ok(false)` when nothing needed changing.
fn change_one(
    scan: &Scan,
    p: &std::path::Path,
    alloc: Option<bool>,
    add: &[String],
    del: &[String],
) -> Result<bool> {
    let shown = p.display();
    scan.refuse_duplicate_device(p)?;
    let i = scan
        .device_index(p)
        .ok_or_else(|| anyhow::anyhow!("Failed to find physical volume \"{shown}\"."))?;
    let Some(label) = &scan.report.devices[i].label else {
        bail!("Failed to find physical volume \"{shown}\".");
    };
    let Some(vg) = scan.vg_of_pv(&label.pv_uuid) else {
        bail!(
            "Unable to change physical volume \"{shown}\": it is not in a volume group (lvm2 \
             keeps attributes and tags in the VG's metadata)"
        );
    };
    let name = vg.name().to_string();
    let mut md = scan.vg(&name)?.metadata.clone();
    let Some(pv) = md
        .vg
        .physical_volumes
        .iter_mut()
        .find(|x| x.id == label.pv_uuid)
    else {
        bail!("Failed to find physical volume \"{shown}\" in volume group \"{name}\".");
    };
    let mut changed = false;
    if let Some(yes) = alloc {
        if pv.status.has("ALLOCATABLE") != yes {
            if yes {
                pv.status.set("ALLOCATABLE");
            } else {
                pv.status.clear("ALLOCATABLE");
            }
            changed = true;
        }
    }
    let mut tags = pv.tags();
    for t in add {
        if !tags.contains(t) {
            tags.push(t.clone());
            changed = true;
        }
    }
    let before = tags.len();
    tags.retain(|t| !del.contains(t));
    changed |= tags.len() != before;
    if !changed {
        return Ok(false);
    }
    pv.set_tags(&tags);
    md.stamp(format!("Created *after* executing '{}'", description()));
    scan.commit(&mut md)?;
    Ok(true)
}
