//! One scan of the candidate devices, and what the verbs ask of it: which device carries a
//! PV, which VG a PV belongs to, free extents, warnings about what the scan found wrong.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use lvm::scan::{Problem, ScanReport, ScannedVg};
use lvm::{SegmentKind, Uuid, VolumeGroup};

use super::DeviceArgs;

/// What an administrator does about a PV on two devices.
const DUPLICATE_HINT: &str = "leave all but one of them out of --devices or the devices file";

/// A scan and the paths of its devices (same order as `report.devices`).
pub struct Scan {
    /// The report.
    pub report: ScanReport,
    /// Device paths.
    pub paths: Vec<PathBuf>,
    /// Opened for a verb that writes: [`Scan::vg`] refuses a VG with a PV on two devices.
    writable: bool,
}

/// What a VG with a PV seen on more than one device is refused for (lvm2's two messages).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DuplicateUse {
    /// Writing its metadata, or anything else on its PVs.
    Update,
    /// Activating its LVs.
    Activate,
}

impl Scan {
    /// The devices `args` says to scan that can be opened. Devices that cannot be opened
    /// are skipped quietly (lvm2 does the same), unless they were named with `--devices`.
    fn openable(args: &DeviceArgs) -> Result<Vec<PathBuf>> {
        let mut paths = Vec::new();
        for p in args.candidates()? {
            match lvm::scan::open_paths(&[&p], true) {
                Ok(_) => paths.push(p),
                // A scanned device we may not open (a disk the sandbox or a driver holds) is
                // skipped quietly, as lvm2 does; one named with --devices is an error.
                Err(_) if args.devices.is_empty() => {}
                Err(e) => return Err(e).with_context(|| format!("{}", p.display())),
            }
        }
        Ok(paths)
    }

    /// Scans what `args` says to scan, read-only.
    pub fn run(args: &DeviceArgs) -> Result<Scan> {
        let paths = Scan::openable(args)?;
        let report = lvm::scan::scan_paths(&paths).context("scanning for PVs")?;
        Ok(Scan {
            report,
            paths,
            writable: false,
        })
    }

    /// As [`Scan::run`], with the devices opened writable, for a verb that commits a new
    /// version of a VG (the commit writes through the scan's devices, and refuses if a
    /// metadata area changed since this scan: two commands racing on one VG cannot both win).
    /// Its [`Scan::vg`] refuses a VG with a PV on two devices, before the verb writes anything.
    pub fn run_writable(args: &DeviceArgs) -> Result<Scan> {
        Scan::writable_paths(Scan::openable(args)?)
    }

    /// `paths` opened for writing (read-only where that is refused: a write-protected device
    /// can still be scanned, and only fails if it is written) and scanned.
    pub fn writable_paths(paths: Vec<PathBuf>) -> Result<Scan> {
        let mut devs = Vec::new();
        for p in &paths {
            let one = std::slice::from_ref(p);
            let dev = lvm::scan::open_paths(one, false)
                .or_else(|_| lvm::scan::open_paths(one, true))
                .with_context(|| format!("opening {}", p.display()))?;
            devs.extend(dev);
        }
        Ok(Scan {
            report: lvm::scan::scan(&devs),
            paths,
            writable: true,
        })
    }

    /// Writes `md` as the next version of its VG (see [`lvm::commit::commit`]).
    pub fn commit(&self, md: &mut lvm::Metadata) -> Result<lvm::commit::Committed> {
        let vg = md.vg.name.clone();
        let c = lvm::commit::commit(&self.report, md)
            .with_context(|| format!("writing the metadata of VG {vg}"))?;
        for (device, area) in &c.skipped {
            eprintln!(
                "  WARNING: VG {vg}: {device}: the damaged metadata area at byte {area} was \
                 not written (vgck --updatemetadata repairs it)"
            );
        }
        Ok(c)
    }

    /// Prints the scan's findings as lvm2 prints warnings.
    pub fn warn(&self) {
        for p in &self.report.problems {
            eprintln!("  WARNING: {p}");
        }
    }

    /// The VG named `name`, or an error naming it. From a writable scan, a VG with a PV on
    /// more than one device is an error too (see [`Scan::refuse_duplicates`]).
    pub fn vg(&self, name: &str) -> Result<&ScannedVg> {
        let vg = self
            .report
            .vg(name)
            .ok_or_else(|| anyhow::anyhow!("Volume group \"{name}\" not found"))?;
        if self.writable {
            self.refuse_duplicates(&vg.metadata.vg, DuplicateUse::Update)?;
        }
        Ok(vg)
    }

    /// "PV U is on A and B" for each PV `wanted` says the scan found on several devices.
    fn duplicates(&self, wanted: impl Fn(&Uuid) -> bool) -> Vec<String> {
        self.report
            .problems
            .iter()
            .filter_map(|p| match p {
                Problem::DuplicatePv { id, devices } if wanted(id) => {
                    Some(format!("PV {id} is on {}", devices.join(" and ")))
                }
                _ => None,
            })
            .collect()
    }

    /// Refuses `what` on `vg` when one of its PVs is on more than one device (a cloned disk,
    /// a disk seen through two paths), as lvm2 refuses both: which copy is the PV cannot be
    /// told, and writing one would make the copies differ. The error names the VG, the PV and
    /// every device carrying it.
    pub fn refuse_duplicates(&self, vg: &VolumeGroup, what: DuplicateUse) -> Result<()> {
        let dups = self.duplicates(|id| vg.pv_by_id(id).is_some());
        if dups.is_empty() {
            return Ok(());
        }
        let name = &vg.name;
        let head = match what {
            DuplicateUse::Update => {
                format!("Cannot update volume group {name} with duplicate PV devices")
            }
            DuplicateUse::Activate => {
                format!("Cannot activate LVs in VG {name} while PVs appear on duplicate devices")
            }
        };
        bail!("{head}: {} ({DUPLICATE_HINT})", dups.join("; "))
    }

    /// Refuses to write to the PV on `path` when its PV uuid is on more than one device.
    pub fn refuse_duplicate_device(&self, path: &Path) -> Result<()> {
        let Some(i) = self.device_index(path) else {
            return Ok(());
        };
        let Some(l) = &self.report.devices[i].label else {
            return Ok(());
        };
        let dups = self.duplicates(|id| id == &l.pv_uuid);
        if dups.is_empty() {
            return Ok(());
        }
        bail!(
            "Cannot use device {} with duplicates: {} ({DUPLICATE_HINT})",
            path.display(),
            dups.join("; ")
        )
    }

    /// Whether device `i` carries a PV the scan found first on another device: a copy that
    /// is not used (reports leave it out, as lvm2 does).
    pub fn is_unused_duplicate(&self, i: usize) -> bool {
        self.report.devices[i]
            .label
            .as_ref()
            .is_some_and(|l| self.report.device_of_pv(&l.pv_uuid) != Some(i))
    }

    /// The path of the device carrying the PV `id`.
    pub fn pv_path(&self, id: &Uuid) -> Option<&PathBuf> {
        self.report.device_of_pv(id).and_then(|i| self.paths.get(i))
    }

    /// The index of the device at `path` (by canonical path; a network extent by its URI, a
    /// group of paths by its spelling),
    /// if it was scanned.
    pub fn device_index(&self, path: &std::path::Path) -> Option<usize> {
        if super::is_network(path) || super::is_group(path) {
            return self.paths.iter().position(|p| p == path);
        }
        let want = std::fs::canonicalize(path).ok()?;
        self.paths
            .iter()
            .position(|p| std::fs::canonicalize(p).ok().as_ref() == Some(&want))
    }

    /// The VG (name) whose metadata lists the PV `id`.
    pub fn vg_of_pv(&self, id: &Uuid) -> Option<&ScannedVg> {
        self.report
            .vgs
            .iter()
            .find(|v| v.metadata.vg.pv_by_id(id).is_some())
    }
}

/// Extents used on each PV (by key) of a VG: every striped area of every LV segment.
pub fn used_extents(vg: &VolumeGroup) -> BTreeMap<String, u64> {
    let mut used: BTreeMap<String, u64> = BTreeMap::new();
    for lv in &vg.logical_volumes {
        for seg in &lv.segments {
            if let (SegmentKind::Striped { stripes, .. }, Some(len)) = (&seg.kind, seg.area_len()) {
                for a in stripes {
                    if vg.pv_by_key(&a.volume).is_some() {
                        *used.entry(a.volume.clone()).or_default() += u64::from(len.0);
                    }
                }
            }
        }
    }
    used
}

/// Free extents of a VG.
pub fn free_extents(vg: &VolumeGroup) -> u64 {
    let used = used_extents(vg);
    vg.physical_volumes
        .iter()
        .map(|p| u64::from(p.pe_count.0).saturating_sub(used.get(&p.key).copied().unwrap_or(0)))
        .sum()
}
