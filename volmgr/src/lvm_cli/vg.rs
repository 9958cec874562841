//! `vgcreate`, `vgextend`, `vgreduce`, `vgrename`, `vgremove`, `vgs`, `vgck`, `vgcfgbackup`,
//! `vgcfgrestore`, with lvm2's messages and exit statuses (5 when a command fails).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use lvm::activate::dm_name;
use lvm::scan::{Problem, ScannedVg};
use lvm::text::Style;
use lvm::Metadata;
use tables::DeviceRef;
use ublk_target::control::DeviceInfo;

use super::activate::daemon_devices;
use super::report::{Field, Kind, Value};
use super::scan::{free_extents, DuplicateUse, Scan};
use super::{absolute, parse_lvm_size, Confirm, DeviceArgs, ReportArgs};
use crate::client::StateDir;

/// lvm2's exit status for a command that ran and failed (`ECMD_FAILED`).
pub const ECMD_FAILED: u8 = 5;

/// A verb's error with the exit status lvm2 gives it; `main` exits with `code`.
#[derive(Debug)]
pub struct LvmStatus {
    /// The exit status.
    pub code: u8,
    error: anyhow::Error,
}

impl fmt::Display for LvmStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#}", self.error)
    }
}

impl std::error::Error for LvmStatus {}

/// `r`, failing with lvm2's `ECMD_FAILED` status.
pub fn lvm_status(r: Result<()>) -> Result<()> {
    r.map_err(|error| {
        anyhow::Error::new(LvmStatus {
            code: ECMD_FAILED,
            error,
        })
    })
}

/// The LVs of VG `vg` that are the daemon's devices now (names of the LVs of `lvs` whose
/// device-mapper name the daemon lists).
fn active_lvs<'a>(
    running: &HashMap<String, DeviceInfo>,
    vg: &str,
    lvs: impl IntoIterator<Item = &'a str>,
) -> Vec<String> {
    lvs.into_iter()
        .filter(|lv| running.contains_key(&dm_name(vg, lv)))
        .map(str::to_string)
        .collect()
}

/// The `description` of a version this command writes, as lvm2 words it ("Write from
/// vgextend vg0 /dev/sdc."), naming volmgr.
pub fn description() -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    format!("Write from volmgr {}.", args.join(" "))
}

#[derive(Args)]
pub struct VgcreateArgs {
    /// Name of the new VG.
    vg: String,
    /// PVs (devices or files); ones that are not PVs yet are initialized as pvcreate would.
    #[arg(required = true)]
    pvs: Vec<PathBuf>,
    /// Extent size (lvm2's default 4m; a power of two, at least 1k... as lvm2 checks it).
    #[arg(short = 's', long = "physicalextentsize", value_name = "SIZE")]
    extent_size: Option<String>,
    #[command(flatten)]
    confirm: Confirm,
    #[command(flatten)]
    dev: DeviceArgs,
}

#[derive(Args)]
pub struct VgremoveArgs {
    /// VGs to remove.
    #[arg(required = true)]
    vgs: Vec<String>,
    #[command(flatten)]
    confirm: Confirm,
    #[command(flatten)]
    dev: DeviceArgs,
    #[command(flatten)]
    sd: StateDir,
}

#[derive(Args)]
pub struct VgsArgs {
    /// Only these VGs.
    vgs: Vec<String>,
    #[command(flatten)]
    report: ReportArgs,
    #[command(flatten)]
    dev: DeviceArgs,
}

#[derive(Args)]
pub struct VgckArgs {
    /// VGs to check (all when none is named).
    vgs: Vec<String>,
    /// Write the VG's metadata again to every PV: stale, damaged or interrupted copies are
    /// replaced (damaged headers where that is safe), outdated PVs are wiped.
    #[arg(long)]
    updatemetadata: bool,
    #[command(flatten)]
    dev: DeviceArgs,
}

#[derive(Args)]
pub struct VgcfgbackupArgs {
    /// The VG.
    vg: String,
    /// Write here (lvm2's default directory is /etc/lvm/backup).
    #[arg(short = 'f', long, value_name = "FILE")]
    file: PathBuf,
    #[command(flatten)]
    dev: DeviceArgs,
}

#[derive(Args)]
pub struct VgextendArgs {
    /// The VG.
    vg: String,
    /// PVs to add (devices or files); ones that are not PVs yet are initialized as pvcreate
    /// would.
    #[arg(required = true, value_name = "PV")]
    pvs: Vec<PathBuf>,
    #[command(flatten)]
    confirm: Confirm,
    #[command(flatten)]
    dev: DeviceArgs,
}

#[derive(Args)]
pub struct VgreduceArgs {
    /// The VG.
    vg: String,
    /// PVs to remove (they must hold no LV extents).
    #[arg(value_name = "PV")]
    pvs: Vec<PathBuf>,
    /// Remove every PV that holds no LV extents (keeping one).
    #[arg(short = 'a', long, conflicts_with_all = ["pvs", "removemissing"])]
    all: bool,
    /// Remove the PVs that cannot be found; with --force also the LVs that have extents on
    /// them.
    #[arg(long, conflicts_with = "pvs")]
    removemissing: bool,
    #[command(flatten)]
    confirm: Confirm,
    #[command(flatten)]
    dev: DeviceArgs,
    #[command(flatten)]
    sd: StateDir,
}

#[derive(Args)]
pub struct VgrenameArgs {
    /// The VG's name or uuid.
    old: String,
    /// The new name.
    new: String,
    #[command(flatten)]
    dev: DeviceArgs,
    #[command(flatten)]
    sd: StateDir,
}

#[derive(Args)]
pub struct VgcfgrestoreArgs {
    /// The VG to restore.
    vg: String,
    /// The backup file (lvm2's vgcfgbackup format).
    #[arg(short = 'f', long, value_name = "FILE", required = true)]
    file: PathBuf,
    /// Restore with PVs of the backup missing (written to the PVs present), or with a PV
    /// whose layout or size no longer matches the backup.
    #[arg(long)]
    force: bool,
    /// Restore even while LVs of the VG are active (lvm2 asks).
    #[arg(short = 'y', long)]
    yes: bool,
    #[command(flatten)]
    dev: DeviceArgs,
    #[command(flatten)]
    sd: StateDir,
}

fn open_rw(p: &std::path::Path) -> Result<DeviceRef> {
    // lvm2's tools (and a scan of ours) may hold the device open too: not exclusive.
    lvm::scan::open_device(p, false, false).with_context(|| format!("opening {}", p.display()))
}

pub fn vgcreate(a: VgcreateArgs) -> Result<()> {
    lvm::vgcreate::check_name("VG", &a.vg).map_err(anyhow::Error::msg)?;
    let extent = match &a.extent_size {
        Some(s) => {
            let b = parse_lvm_size(s, 'm')?;
            if b.0 < 1024 || !b.0.is_power_of_two() {
                bail!("-s {s}: the extent size must be a power of two of at least 1 KiB");
            }
            b.sectors_floor()
        }
        None => lvm::vgcreate::DEFAULT_EXTENT_SIZE,
    };
    let pvs = absolute(&a.pvs);
    let scan = Scan::run(&a.dev)?;
    if scan.report.vg(&a.vg).is_some() {
        bail!("A volume group called {} already exists.", a.vg);
    }
    let mut devs = Vec::new();
    let mut entries = Vec::new();
    // Before anything is written to any of them.
    for p in &pvs {
        scan.refuse_duplicate_device(p)?;
    }
    for (i, p) in pvs.iter().enumerate() {
        let dev = open_rw(p)?;
        let label = match scan
            .device_index(p)
            .and_then(|k| scan.report.devices[k].label.clone())
        {
            Some(l) => {
                if let Some(vg) = scan.vg_of_pv(&l.pv_uuid) {
                    bail!(
                        "Physical volume '{}' is already in volume group '{}'",
                        p.display(),
                        vg.name()
                    );
                }
                l
            }
            None => {
                let l = lvm::pvcreate::pvcreate(dev.as_ref(), &Default::default())
                    .with_context(|| format!("{}", p.display()))?;
                println!(
                    "  Physical volume \"{}\" successfully created.",
                    p.display()
                );
                l
            }
        };
        // A PV takes the size its label records (pvresize may have made it smaller), as lvm2.
        let size = tables::BlockDevice::size(dev.as_ref()).min(label.device_size);
        let e = lvm::vgcreate::pv_entry(
            &format!("pv{i}"),
            &label,
            size,
            extent,
            Some(p.display().to_string()),
        )
        .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
        entries.push(e);
        devs.push(dev);
    }
    let vg = lvm::vgcreate::new_vg(&a.vg, extent, entries);
    let md = Metadata::new(vg, format!("volmgr vgcreate {}", a.vg));
    lvm::commit::create(&devs, &md).with_context(|| format!("creating VG {}", a.vg))?;
    a.dev.remember(&pvs)?;
    println!("  Volume group \"{}\" successfully created", a.vg);
    Ok(())
}

pub fn vgremove(a: VgremoveArgs) -> Result<()> {
    let scan = Scan::run(&a.dev)?;
    for name in &a.vgs {
        let vg = scan.vg(name)?;
        // Orphaning one copy of a PV would leave the VG on the other.
        scan.refuse_duplicates(&vg.metadata.vg, DuplicateUse::Update)?;
        let lvs = vg.metadata.vg.logical_volumes.len();
        if lvs > 0 && a.confirm.force == 0 {
            bail!(
                "Volume group \"{name}\" still contains {lvs} logical volume(s): remove them \
                 first, or add -f to remove them with it"
            );
        }
        if !vg.is_consistent() && a.confirm.force == 0 {
            bail!("Volume group \"{name}\" has problems (run vgck): add -f to remove it anyway");
        }
        // With -f the LVs go with the VG: active ones are deactivated first, never left
        // serving extents that become free.
        super::activate::deactivate_vg(&vg.metadata.vg, &a.sd)?;
        // Every PV of the VG becomes an orphan: empty metadata area headers, then the label
        // without its "used" flag (lvm2's order).
        for pv in &vg.pvs {
            let Some(path) = pv.device.and_then(|i| scan.paths.get(i)) else {
                eprintln!(
                    "  WARNING: PV {} of {name} is missing; its copy stays",
                    pv.id
                );
                continue;
            };
            let dev = open_rw(path)?;
            let label = scan.report.devices[pv.device.unwrap_or(0)]
                .label
                .clone()
                .context("the scan found no label on it")?;
            lvm::orphan::make_orphan(dev.as_ref(), &label)
                .with_context(|| format!("{}: making it an orphan PV", path.display()))?;
        }
        println!("  Volume group \"{name}\" successfully removed");
    }
    Ok(())
}

/// The label the scan found on `path`, if it is a PV.
fn label_at(scan: &Scan, path: &Path) -> Option<(usize, lvm::Label)> {
    let i = scan.device_index(path)?;
    Some((i, scan.report.devices[i].label.clone()?))
}

pub fn vgextend(a: VgextendArgs) -> Result<()> {
    lvm_status(extend(&a))
}

fn extend(a: &VgextendArgs) -> Result<()> {
    let pvs = absolute(&a.pvs);
    let scan = Scan::run_writable(&a.dev)?;
    let sv = scan.vg(&a.vg)?;
    let mut fresh = Vec::new();
    for p in &pvs {
        let shown = p.display();
        scan.refuse_duplicate_device(p)?;
        match label_at(&scan, p) {
            Some((_, l)) => {
                if sv.metadata.vg.pv_by_id(&l.pv_uuid).is_some() {
                    bail!(
                        "Physical volume '{shown} ({})' already in the VG.",
                        l.pv_uuid
                    );
                }
                if let Some(other) = scan.vg_of_pv(&l.pv_uuid) {
                    bail!(
                        "Physical volume '{shown}' is already in volume group '{}'\n  \
                         Unable to add physical volume '{shown}' to volume group '{}'",
                        other.name(),
                        a.vg
                    );
                }
                if l.in_use() {
                    bail!(
                        "PV {shown} is used by a VG but its metadata is missing \
                         (pvcreate -ff it to use it anyway)"
                    );
                }
            }
            None => {
                let dev = open_rw(p)?;
                if let Some(sig) = super::pv::foreign_signature(dev.as_ref()) {
                    if !a.confirm.yes {
                        bail!(
                            "{shown} has a {sig} signature: add -y to overwrite it (its data \
                             is lost)"
                        );
                    }
                }
                fresh.push((p, dev));
            }
        }
    }
    for (p, dev) in &fresh {
        lvm::pvcreate::pvcreate(dev.as_ref(), &Default::default())
            .with_context(|| format!("{}", p.display()))?;
        println!(
            "  Physical volume \"{}\" successfully created.",
            p.display()
        );
    }
    drop(fresh);
    // The new labels are on disk: scan again.
    let scan = if pvs.is_empty() {
        scan
    } else {
        rescan(&a.dev, &pvs)?
    };
    let sv = scan.vg(&a.vg)?;
    let mut new = Vec::new();
    for p in &pvs {
        let (i, label) = label_at(&scan, p)
            .with_context(|| format!("{}: no PV label after pvcreate", p.display()))?;
        new.push(lvm::vgextend::NewPv {
            label,
            size: scan.report.devices[i].size,
            device: Some(p.display().to_string()),
        });
    }
    let mut md = sv.metadata.clone();
    lvm::vgextend::add_pvs(&mut md.vg, &new).with_context(|| format!("extending {}", a.vg))?;
    md.stamp(description());
    lvm::commit::commit(&scan.report, &mut md).with_context(|| format!("writing VG {}", a.vg))?;
    a.dev.remember(&pvs)?;
    println!("  Volume group \"{}\" successfully extended", a.vg);
    Ok(())
}

/// A writable scan again, after PVs were created on `pvs` (a devices file may have to list
/// them first for a scan to see files).
fn rescan(dev: &DeviceArgs, pvs: &[PathBuf]) -> Result<Scan> {
    let mut scan = Scan::run_writable(dev)?;
    let unseen: Vec<&PathBuf> = pvs
        .iter()
        .filter(|p| scan.device_index(p).is_none())
        .collect();
    if !unseen.is_empty() {
        // Not among the scanned devices (a regular file, with no devices file yet): scan
        // them too.
        let mut paths = scan.paths.clone();
        paths.extend(unseen.into_iter().cloned());
        scan = Scan::writable_paths(paths)?;
    }
    Ok(scan)
}

/// lvm2's words for a PV that cannot leave, with the LVs that keep it.
fn reduce_message(e: &lvm::Error, shown: &str, vg: &str) -> String {
    use lvm::vgreduce::ReduceError;
    match e {
        lvm::Error::Reduce(ReduceError::InUse { lvs, .. }) => format!(
            "Physical volume \"{shown}\" still in use by logical volume(s) {}",
            lvs.join(", ")
        ),
        lvm::Error::Reduce(ReduceError::LastPv { .. }) => {
            format!("Can't remove final physical volume \"{shown}\" from volume group \"{vg}\"")
        }
        e => format!("Removal of physical volume \"{shown}\" from \"{vg}\" failed: {e}"),
    }
}

/// The LVs `vgreduce --removemissing --force` would remove from `sv`.
fn removable_partial(sv: &ScannedVg) -> Vec<String> {
    let vg = &sv.metadata.vg;
    let missing: Vec<&str> = sv
        .pvs
        .iter()
        .filter(|p| p.device.is_none())
        .map(|p| p.key.as_str())
        .collect();
    vg.logical_volumes
        .iter()
        .filter(|lv| missing.iter().any(|k| lvm::vgreduce::lv_uses_pv(lv, k)))
        .map(|lv| lv.name.clone())
        .collect()
}

pub fn vgreduce(a: VgreduceArgs) -> Result<()> {
    lvm_status(reduce(&a))
}

fn reduce(a: &VgreduceArgs) -> Result<()> {
    let scan = Scan::run_writable(&a.dev)?;
    let sv = scan.vg(&a.vg)?;
    let desc = description();
    if a.removemissing {
        let partial = removable_partial(sv);
        let active = active_lvs(
            &daemon_devices(&a.sd),
            sv.name(),
            partial.iter().map(String::as_str),
        );
        if a.confirm.force > 0 && !active.is_empty() {
            bail!(
                "Logical volume(s) {} of {} to be removed are active: deactivate them first \
                 (lvchange -an)",
                active.join(", "),
                a.vg
            );
        }
        let force = a.confirm.force > 0;
        match lvm::vgreduce::remove_missing(&scan.report, sv, force, &desc) {
            Ok(None) => println!("  Volume group \"{}\" is already consistent.", a.vg),
            Ok(Some(done)) => {
                for lv in &done.removed_lvs {
                    eprintln!("  WARNING: Removing partial LV {}/{lv}.", a.vg);
                }
                println!("  Wrote out consistent volume group {}.", a.vg);
            }
            Err(lvm::Error::Reduce(lvm::vgreduce::ReduceError::PartialLvs { lvs, .. })) => bail!(
                "There are still partial LVs in VG {}: {}.\n  To remove them unconditionally \
                 use: vgreduce --removemissing --force.",
                a.vg,
                lvs.join(", ")
            ),
            Err(e) => {
                return Err(e).context(format!("Failed to write out a consistent VG for {}", a.vg))
            }
        }
        return Ok(());
    }
    // The PVs named (or, with -a, every PV with no LV extents but one).
    let mut todo: Vec<(String, lvm::Uuid)> = Vec::new();
    if a.all {
        let vg = &sv.metadata.vg;
        let empty: Vec<_> = vg
            .physical_volumes
            .iter()
            .filter(|p| lvm::vgreduce::lvs_on_pv(vg, &p.key).is_empty())
            .collect();
        let keep = usize::from(empty.len() == vg.physical_volumes.len());
        for pv in empty.into_iter().skip(keep) {
            let name = scan
                .pv_path(&pv.id)
                .map_or_else(|| pv.id.to_string(), |p| p.display().to_string());
            todo.push((name, pv.id));
        }
    } else {
        if a.pvs.is_empty() {
            bail!("Please enter physical volume paths or option -a.");
        }
        for p in absolute(&a.pvs) {
            let shown = p.display().to_string();
            let (i, l) = label_at(&scan, &p)
                .ok_or_else(|| anyhow!("Failed to find physical volume \"{shown}\"."))?;
            if sv.metadata.vg.pv_by_id(&l.pv_uuid).is_none() {
                // Left over from a vgreduce cut short: it still carries this VG's old copy.
                let outdated = sv
                    .problems
                    .iter()
                    .any(|q| matches!(q, Problem::NotInVg { id, .. } if *id == l.pv_uuid));
                if !outdated {
                    bail!(
                        "Physical Volume \"{shown}\" not found in Volume Group \"{}\".",
                        a.vg
                    );
                }
                lvm::orphan::leave_vg(scan.report.devices[i].dev.as_ref(), &l)
                    .with_context(|| format!("{shown}: making it an orphan PV"))?;
                println!("  Removed \"{shown}\" from volume group \"{}\"", a.vg);
                continue;
            }
            todo.push((shown, l.pv_uuid));
        }
    }
    // One PV at a time, as lvm2 does: each is its own version.
    let mut failed = 0;
    for (shown, id) in &todo {
        let now = Scan::run_writable(&a.dev)?;
        let cur = now
            .report
            .vg_by_id(&sv.id())
            .with_context(|| format!("Volume group \"{}\" not found", a.vg))?;
        match lvm::vgreduce::vgreduce(&now.report, cur, &[*id], &desc) {
            Ok(_) => println!("  Removed \"{shown}\" from volume group \"{}\"", a.vg),
            Err(e) => {
                failed += 1;
                eprintln!("  {}", reduce_message(&e, shown, &a.vg));
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} physical volume(s) not removed", todo.len());
    }
    Ok(())
}

pub fn vgrename(a: VgrenameArgs) -> Result<()> {
    lvm_status(rename(&a))
}

fn rename(a: &VgrenameArgs) -> Result<()> {
    let scan = Scan::run_writable(&a.dev)?;
    let sv = lvm::vgrename::find_vg(&scan.report, &a.old)
        .ok_or_else(|| anyhow!("Volume group \"{}\" not found", a.old))?;
    scan.refuse_duplicates(&sv.metadata.vg, DuplicateUse::Update)?;
    let dir = super::display::dev_dir();
    lvm::vgrename::check_new_name(&scan.report, sv, &a.new, &dir)?;
    let path = format!("{dir}{}", a.new);
    if Path::new(&path).exists() {
        bail!("{path}: already exists in filesystem");
    }
    let vg = &sv.metadata.vg;
    let active = active_lvs(
        &daemon_devices(&a.sd),
        &vg.name,
        vg.logical_volumes.iter().map(|l| l.name.as_str()),
    );
    if !active.is_empty() {
        bail!(
            "Volume group \"{}\" has active logical volume(s) {}: deactivate them first \
             (vgchange -an {})",
            vg.name,
            active.join(", "),
            vg.name
        );
    }
    lvm::vgrename::vgrename(&scan.report, sv, &a.new, &dir, &description())
        .with_context(|| format!("renaming {}", vg.name))?;
    println!(
        "  Volume group \"{}\" successfully renamed to \"{}\"",
        a.old, a.new
    );
    Ok(())
}

pub fn vgcfgrestore(a: VgcfgrestoreArgs) -> Result<()> {
    lvm_status(cfgrestore(&a))
}

fn cfgrestore(a: &VgcfgrestoreArgs) -> Result<()> {
    lvm::vgcreate::check_name("VG", &a.vg)
        .map_err(|e| anyhow!("Volume group name \"{}\" is invalid: {e}", a.vg))?;
    let text = std::fs::read(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    let mut md = Metadata::from_text(&text).with_context(|| {
        format!(
            "Couldn't read volume group metadata from file {}",
            a.file.display()
        )
    })?;
    if md.vg.name != a.vg {
        bail!("{} holds VG {}, not {}", a.file.display(), md.vg.name, a.vg);
    }
    let scan = Scan::run_writable(&a.dev)?;
    scan.refuse_duplicates(&md.vg, DuplicateUse::Update)?;
    // LVs active under this name: what the backup has and what the disks have.
    let mut names: Vec<&str> = md
        .vg
        .logical_volumes
        .iter()
        .map(|l| l.name.as_str())
        .collect();
    if let Some(cur) = scan.report.vg(&a.vg) {
        scan.refuse_duplicates(&cur.metadata.vg, DuplicateUse::Update)?;
        names.extend(
            cur.metadata
                .vg
                .logical_volumes
                .iter()
                .map(|l| l.name.as_str()),
        );
    }
    names.sort();
    names.dedup();
    let active = active_lvs(&daemon_devices(&a.sd), &a.vg, names);
    if !active.is_empty() {
        for lv in &active {
            println!("  Volume group {} has active volume: {lv}.", a.vg);
        }
        eprintln!(
            "  WARNING: Found {} active volume(s) in volume group \"{}\".",
            active.len(),
            a.vg
        );
        if !a.yes {
            bail!(
                "Restoring VG with active LVs may cause mismatch with its metadata: add -y to \
                 restore anyway, or deactivate them first (vgchange -an {}).\n  Restore aborted.",
                a.vg
            );
        }
    }
    // The device hints say where each PV is now.
    for pv in &mut md.vg.physical_volumes {
        if let Some(p) = scan.pv_path(&pv.id) {
            pv.device = Some(p.display().to_string());
        }
    }
    md.stamp(description());
    let done = lvm::restore::restore(&scan.report, &mut md, a.force)
        .map_err(|e| anyhow!("{e}\n  Restore failed."))?;
    for id in &done.missing {
        eprintln!(
            "  WARNING: PV {id} is missing: its copy of VG {} was not written.",
            a.vg
        );
    }
    for (dev, area) in &done.committed.skipped {
        eprintln!(
            "  WARNING: {dev}: metadata area at byte {area} is damaged in a way that is not \
             safe to rewrite; left alone"
        );
    }
    println!("  Restored volume group {}.", a.vg);
    Ok(())
}

const VG_FIELDS: &[Field] = &[
    Field {
        name: "vg_name",
        heading: "VG",
        kind: Kind::Text,
    },
    Field {
        name: "pv_count",
        heading: "#PV",
        kind: Kind::Number,
    },
    Field {
        name: "lv_count",
        heading: "#LV",
        kind: Kind::Number,
    },
    Field {
        name: "snap_count",
        heading: "#SN",
        kind: Kind::Number,
    },
    Field {
        name: "vg_attr",
        heading: "Attr",
        kind: Kind::Text,
    },
    Field {
        name: "vg_size",
        heading: "VSize",
        kind: Kind::Size,
    },
    Field {
        name: "vg_free",
        heading: "VFree",
        kind: Kind::Size,
    },
    Field {
        name: "vg_uuid",
        heading: "VG UUID",
        kind: Kind::Text,
    },
    Field {
        name: "vg_extent_size",
        heading: "Ext",
        kind: Kind::Size,
    },
    Field {
        name: "vg_extent_count",
        heading: "#Ext",
        kind: Kind::Number,
    },
    Field {
        name: "vg_free_count",
        heading: "Free",
        kind: Kind::Number,
    },
    Field {
        name: "vg_seqno",
        heading: "Seq",
        kind: Kind::Number,
    },
    Field {
        name: "vg_mda_count",
        heading: "#VMda",
        kind: Kind::Number,
    },
];
const VG_DEFAULT: &[&str] = &[
    "vg_name",
    "pv_count",
    "lv_count",
    "snap_count",
    "vg_attr",
    "vg_size",
    "vg_free",
];

pub fn vgs(a: VgsArgs) -> Result<()> {
    let scan = Scan::run(&a.dev)?;
    scan.warn();
    let mut vgs: Vec<&lvm::scan::ScannedVg> = scan
        .report
        .vgs
        .iter()
        .filter(|v| a.vgs.is_empty() || a.vgs.iter().any(|n| n == v.name()))
        .collect();
    vgs.sort_by(|x, y| x.name().cmp(y.name()));
    a.report.print("vg", VG_FIELDS, VG_DEFAULT, &vgs, |sv, f| {
        let v = &sv.metadata.vg;
        let ext = v.extent_size.bytes().0;
        let count: u64 = v
            .physical_volumes
            .iter()
            .map(|p| u64::from(p.pe_count.0))
            .sum();
        let free = free_extents(v);
        match f {
            "vg_name" => Value::Text(v.name.clone()),
            "pv_count" => Value::Number(v.physical_volumes.len() as u64),
            "lv_count" => Value::Number(
                v.logical_volumes
                    .iter()
                    .filter(|l| l.status.has("VISIBLE"))
                    .count() as u64,
            ),
            "snap_count" => Value::Number(0),
            "vg_attr" => Value::Text(format!(
                "{}{}-{}n-",
                if v.status.has("WRITE") { 'w' } else { 'r' },
                if v.status.has("RESIZEABLE") { 'z' } else { '-' },
                if sv.pvs.iter().any(|p| p.device.is_none()) {
                    'p'
                } else {
                    '-'
                },
            )),
            "vg_size" => Value::Size(count * ext),
            "vg_free" => Value::Size(free * ext),
            "vg_uuid" => Value::Text(v.id.to_string()),
            "vg_extent_size" => Value::Size(ext),
            "vg_extent_count" => Value::Number(count),
            "vg_free_count" => Value::Number(free),
            "vg_seqno" => Value::Number(u64::from(v.seqno)),
            "vg_mda_count" => Value::Number((sv.current.len() + sv.stale.len()) as u64),
            _ => Value::Empty,
        }
    })?;
    super::refuse_unknown_names(&a.vgs, &scan)
}

/// `vgck`: every copy of every VG's metadata read and compared; exit 5 on any problem. With
/// `--updatemetadata` the newest good copy is written again everywhere.
pub fn vgck(a: VgckArgs) -> Result<()> {
    lvm_status(check(&a))
}

fn check(a: &VgckArgs) -> Result<()> {
    if a.updatemetadata {
        return update_metadata(a);
    }
    let scan = Scan::run(&a.dev)?;
    let mut bad = 0;
    for v in &scan.report.vgs {
        if !a.vgs.is_empty() && !a.vgs.iter().any(|n| n == v.name()) {
            continue;
        }
        // The VG's own findings, and damage on its PVs' devices (a copy that does not read).
        let devices: Vec<&str> = v
            .pvs
            .iter()
            .filter_map(|p| p.device)
            .map(|i| scan.report.devices[i].name.as_str())
            .collect();
        let on_its_pvs = scan
            .report
            .problems
            .iter()
            .filter(|p| device_problem(p).is_some_and(|d| devices.contains(&d)));
        for p in v.problems.iter().chain(on_its_pvs) {
            eprintln!("  {}: {p}", v.name());
            bad += 1;
        }
    }
    for n in &a.vgs {
        scan.vg(n)?;
    }
    if bad > 0 {
        bail!("{bad} problem(s) found");
    }
    Ok(())
}

/// The device a device-level finding of the scan is about (damaged label, area or text).
fn device_problem(p: &Problem) -> Option<&str> {
    match p {
        Problem::Unreadable(e) => Some(&e.device),
        Problem::BadLabel(e) => Some(&e.device),
        Problem::BadMetadataArea(e) => Some(&e.device),
        Problem::BadText { device, .. } | Problem::Uncommitted { device, .. } => Some(device),
        _ => None,
    }
}

/// `vgck --updatemetadata`: [`lvm::repair::update_metadata`] for each VG named (or all).
fn update_metadata(a: &VgckArgs) -> Result<()> {
    let scan = Scan::run_writable(&a.dev)?;
    let ids: Vec<(String, lvm::Uuid)> = if a.vgs.is_empty() {
        scan.report
            .vgs
            .iter()
            .map(|v| (v.name().to_string(), v.id()))
            .collect()
    } else {
        a.vgs
            .iter()
            .map(|n| scan.vg(n).map(|v| (n.clone(), v.id())))
            .collect::<Result<_>>()?
    };
    let desc = description();
    let mut failed = 0;
    for (k, (name, id)) in ids.iter().enumerate() {
        // Each VG's write changes what the next one sees (headers moved on): scan again.
        let rescanned;
        let now = if k == 0 {
            &scan
        } else {
            rescanned = Scan::run_writable(&a.dev)?;
            &rescanned
        };
        let checked = match now.report.vg_by_id(id) {
            Some(v) => now.refuse_duplicates(&v.metadata.vg, DuplicateUse::Update),
            None => Ok(()),
        };
        if let Err(e) = checked {
            failed += 1;
            eprintln!("  {name}: {e:#}");
            continue;
        }
        match lvm::repair::update_metadata(&now.report, id, &desc) {
            Ok(up) => {
                for (dev, area) in &up.committed.skipped {
                    eprintln!(
                        "  WARNING: not repairing bad metadata in the area at byte {area} on \
                         {dev} (its header does not look like this PV's)"
                    );
                }
                for dev in &up.wiped {
                    eprintln!("  WARNING: wiping mda on outdated PV {dev}");
                }
            }
            Err(e) => {
                failed += 1;
                eprintln!("  {name}: {e}");
            }
        }
    }
    if failed > 0 {
        bail!("Failed to write VG metadata of {failed} VG(s).");
    }
    Ok(())
}

pub fn vgcfgbackup(a: VgcfgbackupArgs) -> Result<()> {
    let scan = Scan::run(&a.dev)?;
    let v = scan.vg(&a.vg)?;
    let mut md = v.metadata.clone();
    md.description = format!("Created *after* executing 'volmgr vgcfgbackup {}'", a.vg);
    let text = md.to_text(Style::File).context("writing the backup text")?;
    std::fs::write(&a.file, text).with_context(|| format!("writing {}", a.file.display()))?;
    println!("  Volume group \"{}\" successfully backed up.", a.vg);
    Ok(())
}
