//! Writing a new version of a VG to every PV, the way LVM2's `vg_write` / `vg_precommit` /
//! `vg_commit` do, so that a power cut at any point leaves each PV with the old or the new
//! version, never a mix, and [`crate::scan`] picks the newest complete one:
//!
//! 1. PV labels that lack the "in a VG" flag get it (LVM2 rewrites such headers first too).
//! 2. The new text is written into every metadata area's ring, after the committed copy and
//!    never over it; every device is flushed. Nothing points at the new text yet.
//! 3. Precommit: each header gets the new location in slot 1 (durably).
//! 4. Commit: each header gets it in slot 0 and slot 1 is cleared (durably). A header is one
//!    sector, written whole or not at all, so each area switches from old to new atomically.
//!
//! A cut between PVs in step 4 leaves some PVs on the new seqno and some on the old: the scan
//! takes the new one and reports the others as stale; the next commit rewrites them.
//!
//! [`commit_dropping`] writes a version that leaves PVs out (vgreduce): only the PVs it keeps
//! are written; the dropped ones keep their old copy (the scan reports them as no longer in
//! the VG) until the caller makes them orphans ([`crate::orphan`]).

use tables::DeviceRef;

use crate::io;
use crate::label::{self, DiskArea, Label, PV_EXT_USED, PV_HEADER_EXTENSION_VSN};
use crate::mda::{self, MdaHeader, RawLocn};
use crate::model::Metadata;
use crate::scan::{DeviceScan, Problem, ScanReport};
use crate::text::Style;
use crate::uuid::Uuid;
use crate::Error;

/// One copy of the text a commit wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrittenCopy {
    /// Device name.
    pub device: String,
    /// Byte offset of the metadata area.
    pub area: u64,
    /// Where the text went in the area.
    pub locn: RawLocn,
}

/// What a commit did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Committed {
    /// The seqno written.
    pub seqno: u32,
    /// Every copy written.
    pub copies: Vec<WrittenCopy>,
    /// Metadata areas left alone because they are damaged (device, area offset); the scan
    /// keeps reporting them.
    pub skipped: Vec<(String, u64)>,
}

/// A metadata area to write to.
#[derive(Clone, Debug)]
pub(crate) struct AreaTarget {
    /// The header as the scan saw it, or (for `replace`) an empty header for the area.
    pub(crate) header: MdaHeader,
    /// The header on disk is damaged and is replaced (repairs only): no committed copy is
    /// kept, and the header must still be damaged when the write starts.
    pub(crate) replace: bool,
}

/// A PV to write: its device, its label, and its usable metadata areas.
pub(crate) struct Target {
    pub(crate) dev: DeviceRef,
    pub(crate) label: Label,
    pub(crate) areas: Vec<AreaTarget>,
}

/// Why a commit was refused; nothing was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommitError {
    /// The scan did not find the VG.
    #[error("VG {vg} ({id}) was not found by the scan")]
    NotScanned {
        /// VG name.
        vg: String,
        /// VG uuid.
        id: Uuid,
    },
    /// The scan found the VG in a state no update may be written over.
    #[error("VG {vg}: not updating: {problem}")]
    Inconsistent {
        /// VG name.
        vg: String,
        /// What the scan found.
        problem: Box<Problem>,
    },
    /// The seqno is at its maximum.
    #[error("VG {vg}: seqno cannot grow past {}", u32::MAX)]
    SeqnoOverflow {
        /// VG name.
        vg: String,
    },
    /// The new version drops a PV (vgreduce is not done here).
    #[error("VG {vg}: the new version drops PV {id} ({key}); removing PVs is not supported here")]
    DropsPv {
        /// VG name.
        vg: String,
        /// PV uuid.
        id: Uuid,
        /// PV key.
        key: String,
    },
    /// A PV of the new version is on none of the devices.
    #[error("VG {vg}: PV {id} ({key}) is not on any of the devices")]
    PvNotFound {
        /// VG name.
        vg: String,
        /// PV uuid.
        id: Uuid,
        /// PV key.
        key: String,
    },
    /// A PV is on more than one device (or, for `create`, on none or several of the
    /// devices given).
    #[error("VG {vg}: PV {id} is on {count} devices, it must be on exactly one")]
    PvCount {
        /// VG name.
        vg: String,
        /// PV uuid.
        id: Uuid,
        /// Devices carrying it.
        count: usize,
    },
    /// A PV being added already holds VG metadata.
    #[error("{device}: PV {id} already holds VG metadata; it cannot go into VG {vg}")]
    PvInUse {
        /// Device name.
        device: String,
        /// PV uuid.
        id: Uuid,
        /// VG name.
        vg: String,
    },
    /// A device given is not a PV.
    #[error("{device}: not a PV (no label)")]
    NotAPv {
        /// Device name.
        device: String,
    },
    /// A device given holds a PV the VG does not list.
    #[error("{device}: PV {id} is not in VG {vg}")]
    NotInVg {
        /// Device name.
        device: String,
        /// PV uuid.
        id: Uuid,
        /// VG name.
        vg: String,
    },
    /// A metadata area's committed copy is not the one the scan saw (another writer).
    #[error("{device}: metadata area at byte {area} changed since it was scanned")]
    Changed {
        /// Device name.
        device: String,
        /// Byte offset of the area.
        area: u64,
    },
    /// None of the PVs has a usable metadata area.
    #[error("VG {vg}: no metadata area to write to")]
    NoMetadataArea {
        /// VG name.
        vg: String,
    },
    /// A PV to drop is still listed by the new version, or is not in the old one.
    #[error("VG {vg}: PV {id} cannot be dropped: {why}")]
    BadDrop {
        /// VG name.
        vg: String,
        /// PV uuid.
        id: Uuid,
        /// "the new version still lists it" or "the VG does not list it".
        why: &'static str,
    },
}

/// Writes `md` as the next version of the VG the scan `report` found with its uuid: sets
/// `md.vg.seqno` to the scanned seqno + 1 and writes it to every PV of `md.vg`. The header
/// lines (`description`, `creation_host`, `creation_time`) are written as `md` has them:
/// [`Metadata::stamp`] sets them for a new version.
///
/// Refused ([`CommitError`]) when a PV is missing, is on two devices or carries another VG,
/// when a PV of the old version is dropped (see [`commit_dropping`]), when a PV added to the
/// VG already holds metadata, or when a metadata area changed since the scan.
pub fn commit(report: &ScanReport, md: &mut Metadata) -> Result<Committed, Error> {
    commit_dropping(report, md, &[])
}

/// [`commit`] for a version that leaves out the PVs `dropped` (vgreduce): each must be in the
/// scanned VG and not in `md.vg`; they may be missing from the devices (`vgreduce
/// --removemissing`). Every other loss is refused as by [`commit`]. The dropped PVs are not
/// written: their copies stay until the caller makes them orphans ([`crate::orphan`]).
pub fn commit_dropping(
    report: &ScanReport,
    md: &mut Metadata,
    dropped: &[Uuid],
) -> Result<Committed, Error> {
    commit_with(report, md, dropped, false)
}

/// [`commit_dropping`]; with `repair`, metadata areas whose header is damaged in a way that
/// is safe to rewrite ([`crate::repair`]) get a new header instead of being skipped.
pub(crate) fn commit_with(
    report: &ScanReport,
    md: &mut Metadata,
    dropped: &[Uuid],
    repair: bool,
) -> Result<Committed, Error> {
    let id = md.vg.id;
    let vg = md.vg.name.clone();
    let old = report
        .vg_by_id(&id)
        .ok_or_else(|| CommitError::NotScanned { vg: vg.clone(), id })?;
    for p in &old.problems {
        let refused = match p {
            // A PV the new version flags MISSING (lvconvert --repair of a raid LV whose host
            // died) is left out of the write, as lvm2 does.
            Problem::MissingPv { id, .. } => {
                !dropped.contains(id) && !md.vg.pv_by_id(id).is_some_and(|p| p.is_missing())
            }
            Problem::PvOfOtherVg { .. } | Problem::SeqnoConflict { .. } => true,
            _ => false,
        };
        if refused {
            return Err(CommitError::Inconsistent {
                vg: old.name().to_string(),
                problem: Box::new(p.clone()),
            }
            .into());
        }
    }
    for d in dropped {
        let why = if md.vg.pv_by_id(d).is_some() {
            "the new version still lists it"
        } else if old.metadata.vg.pv_by_id(d).is_none() {
            "the VG does not list it"
        } else {
            continue;
        };
        return Err(CommitError::BadDrop { vg, id: *d, why }.into());
    }
    md.vg.seqno = old
        .seqno()
        .checked_add(1)
        .ok_or_else(|| CommitError::SeqnoOverflow { vg: vg.clone() })?;
    for pv in &old.metadata.vg.physical_volumes {
        if md.vg.pv_by_id(&pv.id).is_none() && !dropped.contains(&pv.id) {
            return Err(CommitError::DropsPv {
                vg,
                id: pv.id,
                key: pv.key.clone(),
            }
            .into());
        }
    }
    let mut targets = Vec::new();
    let mut skipped = Vec::new();
    for pv in &md.vg.physical_volumes {
        if pv.is_missing() && pv_device(report, &vg, pv).is_err() {
            continue;
        }
        let d = &report.devices[pv_device(report, &vg, pv)?];
        let is_new = old.metadata.vg.pv_by_id(&pv.id).is_none();
        if is_new && d.mdas.iter().any(|m| m.text.is_some()) {
            return Err(CommitError::PvInUse {
                device: d.name.clone(),
                id: pv.id,
                vg,
            }
            .into());
        }
        targets.push(target(d, repair, &mut skipped)?);
    }
    let written = write_version(&targets, md)?;
    Ok(Committed {
        seqno: md.vg.seqno,
        copies: written,
        skipped,
    })
}

/// Index in `report.devices` of the one device carrying `pv`.
pub(crate) fn pv_device(
    report: &ScanReport,
    vg: &str,
    pv: &crate::PhysicalVolume,
) -> Result<usize, Error> {
    let on: Vec<usize> = (0..report.devices.len())
        .filter(|&i| {
            report.devices[i]
                .label
                .as_ref()
                .is_some_and(|l| l.pv_uuid == pv.id)
        })
        .collect();
    match on.as_slice() {
        [] => Err(CommitError::PvNotFound {
            vg: vg.to_string(),
            id: pv.id,
            key: pv.key.clone(),
        }
        .into()),
        [i] => Ok(*i),
        _ => Err(CommitError::PvCount {
            vg: vg.to_string(),
            id: pv.id,
            count: on.len(),
        }
        .into()),
    }
}

/// The scanned device `d` as a write target: its label and every metadata area that is not
/// ignored. An area whose header could not be read is skipped (recorded in `skipped`), or,
/// with `repair`, gets a new header when [`crate::repair::header_is_repairable`] says so.
pub(crate) fn target(
    d: &DeviceScan,
    repair: bool,
    skipped: &mut Vec<(String, u64)>,
) -> Result<Target, Error> {
    let Some(label) = d.label.clone() else {
        return Err(CommitError::NotAPv {
            device: d.name.clone(),
        }
        .into());
    };
    let mut areas = Vec::new();
    for m in &d.mdas {
        match &m.header {
            Some(h) if h.ignored() => {}
            Some(h) => areas.push(AreaTarget {
                header: h.clone(),
                replace: false,
            }),
            None if repair && crate::repair::header_is_repairable(d.dev.as_ref(), &m.area)? => {
                areas.push(AreaTarget {
                    header: MdaHeader::new(&m.area),
                    replace: true,
                })
            }
            None => skipped.push((d.name.clone(), m.area.offset.0)),
        }
    }
    Ok(Target {
        dev: d.dev.clone(),
        label,
        areas,
    })
}

/// Writes the first version of a new VG, `md`, to `devices`: each must be an orphan PV (a
/// label, metadata areas without VG metadata), and together they must be exactly the PVs
/// `md.vg` lists. This is the on-disk half of `vgcreate`; choosing extents and seqno 1 is the
/// caller's.
pub fn create(devices: &[DeviceRef], md: &Metadata) -> Result<Committed, Error> {
    let vg = &md.vg.name;
    let mut targets = Vec::new();
    for dev in devices {
        let device = dev.name();
        let Some(label) = label::find(dev.as_ref())? else {
            return Err(CommitError::NotAPv { device }.into());
        };
        if md.vg.pv_by_id(&label.pv_uuid).is_none() {
            return Err(CommitError::NotInVg {
                device,
                id: label.pv_uuid,
                vg: vg.clone(),
            }
            .into());
        }
        let mut areas = Vec::new();
        for area in &label.metadata_areas {
            let h = mda::read_header(dev.as_ref(), area)?;
            if !h.committed.is_empty() {
                return Err(CommitError::PvInUse {
                    device,
                    id: label.pv_uuid,
                    vg: vg.clone(),
                }
                .into());
            }
            if !h.ignored() {
                areas.push(AreaTarget {
                    header: h,
                    replace: false,
                });
            }
        }
        targets.push(Target {
            dev: dev.clone(),
            label,
            areas,
        });
    }
    for pv in &md.vg.physical_volumes {
        let count = targets.iter().filter(|t| t.label.pv_uuid == pv.id).count();
        if count != 1 {
            return Err(CommitError::PvCount {
                vg: vg.clone(),
                id: pv.id,
                count,
            }
            .into());
        }
    }
    let copies = write_version(&targets, md)?;
    Ok(Committed {
        seqno: md.vg.seqno,
        copies,
        skipped: Vec::new(),
    })
}

/// Re-reads a header and checks its committed copy is still the one the caller saw (for a
/// header being replaced: that it is still damaged).
fn unchanged(dev: &DeviceRef, seen: &AreaTarget) -> Result<MdaHeader, Error> {
    let area = DiskArea {
        offset: seen.header.start,
        size: seen.header.size,
    };
    let changed = CommitError::Changed {
        device: dev.name(),
        area: seen.header.start.0,
    };
    match mda::read_header(dev.as_ref(), &area) {
        Ok(now) if !seen.replace && now.committed == seen.header.committed => Ok(now),
        Ok(_) => Err(changed.into()),
        Err(mda::MdaIoError::Mda(_)) if seen.replace => Ok(seen.header.clone()),
        Err(e) => Err(e.into()),
    }
}

/// Steps 1-4 of the module doc on every target.
pub(crate) fn write_version(targets: &[Target], md: &Metadata) -> Result<Vec<WrittenCopy>, Error> {
    let mut text = md.to_text(Style::Disk)?.into_bytes();
    text.push(0);
    if targets.iter().all(|t| t.areas.is_empty()) {
        return Err(CommitError::NoMetadataArea {
            vg: md.vg.name.clone(),
        }
        .into());
    }
    let mut headers = Vec::new();
    for t in targets {
        for seen in &t.areas {
            headers.push(unchanged(&t.dev, seen)?);
        }
    }

    // 1. Mark PVs as used by a VG.
    for t in targets {
        if !t.label.in_use() {
            let mut l = t.label.clone();
            let ext = l.extension.get_or_insert_with(|| label::PvExtension {
                version: PV_HEADER_EXTENSION_VSN,
                flags: 0,
                bootloader_areas: Vec::new(),
            });
            ext.flags |= PV_EXT_USED;
            label::write(t.dev.as_ref(), &l)?;
        }
    }

    // 2. The text into every ring, then flush.
    let mut locns = Vec::new();
    let mut k = 0;
    for t in targets {
        for _ in &t.areas {
            locns.push(mda::write_text(t.dev.as_ref(), &headers[k], &text)?);
            k += 1;
        }
    }
    for t in targets {
        io::flush(t.dev.as_ref())?;
    }

    // 3. Precommit: slot 1.
    let mut k = 0;
    let mut done: Vec<(usize, usize)> = Vec::new();
    for (ti, t) in targets.iter().enumerate() {
        for _ in &t.areas {
            let mut h = headers[k].clone();
            h.precommitted = locns[k];
            if let Err(e) = mda::write_header(t.dev.as_ref(), &h, true) {
                revert(targets, &headers, &done);
                return Err(e.into());
            }
            done.push((ti, k));
            k += 1;
        }
    }

    // 4. Commit: slot 0, slot 1 cleared.
    let mut copies = Vec::new();
    let mut k = 0;
    for t in targets {
        for _ in &t.areas {
            let mut h = headers[k].clone();
            h.committed = RawLocn {
                flags: h.committed.flags,
                ..locns[k]
            };
            h.precommitted = RawLocn::default();
            mda::write_header(t.dev.as_ref(), &h, true)?;
            copies.push(WrittenCopy {
                device: t.dev.name(),
                area: h.start.0,
                locn: h.committed,
            });
            k += 1;
        }
    }
    Ok(copies)
}

/// After a failed precommit: puts back the headers already precommitted (best effort; a
/// precommitted slot is harmless to readers anyway).
fn revert(targets: &[Target], headers: &[MdaHeader], done: &[(usize, usize)]) {
    for &(ti, k) in done {
        let _ = mda::write_header(targets[ti].dev.as_ref(), &headers[k], true);
    }
}
