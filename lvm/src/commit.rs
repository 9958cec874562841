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

use tables::DeviceRef;

use crate::io;
use crate::label::{self, DiskArea, Label, PV_EXT_USED, PV_HEADER_EXTENSION_VSN};
use crate::mda::{self, MdaHeader, RawLocn};
use crate::model::Metadata;
use crate::scan::{Problem, ScanReport};
use crate::text::Style;
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

/// A PV to write: its device, its label, and its usable metadata areas with their headers as
/// the scan saw them.
struct Target {
    dev: DeviceRef,
    label: Label,
    areas: Vec<MdaHeader>,
}

fn invalid(msg: String) -> Error {
    Error::Invalid(msg)
}

/// Writes `md` as the next version of the VG the scan `report` found with its uuid: sets
/// `md.vg.seqno` to the scanned seqno + 1 and writes it to every PV of `md.vg`.
///
/// Refused when a PV is missing, is on two devices or carries another VG, when a PV of the
/// old version is dropped (removing PVs is not done here), when a PV added to the VG already
/// holds metadata, or when a metadata area changed since the scan.
pub fn commit(report: &ScanReport, md: &mut Metadata) -> Result<Committed, Error> {
    let id = md.vg.id;
    let old = report.vg_by_id(&id).ok_or_else(|| {
        invalid(format!(
            "VG {} ({id}) was not found by the scan",
            md.vg.name
        ))
    })?;
    for p in &old.problems {
        if matches!(
            p,
            Problem::MissingPv { .. } | Problem::PvOfOtherVg { .. } | Problem::SeqnoConflict { .. }
        ) {
            return Err(invalid(format!("VG {}: not updating: {p}", old.name())));
        }
    }
    md.vg.seqno = old.seqno().checked_add(1).ok_or_else(|| {
        invalid(format!(
            "VG {}: seqno cannot grow past {}",
            old.name(),
            u32::MAX
        ))
    })?;
    for pv in &old.metadata.vg.physical_volumes {
        if md.vg.pv_by_id(&pv.id).is_none() {
            return Err(invalid(format!(
                "VG {}: the new version drops PV {} ({}); removing PVs is not supported here",
                md.vg.name, pv.id, pv.key
            )));
        }
    }
    let mut targets = Vec::new();
    let mut skipped = Vec::new();
    for pv in &md.vg.physical_volumes {
        let i = report.device_of_pv(&pv.id).ok_or_else(|| {
            invalid(format!(
                "VG {}: PV {} ({}) is not on any scanned device",
                md.vg.name, pv.id, pv.key
            ))
        })?;
        let d = &report.devices[i];
        let dups = report
            .devices
            .iter()
            .filter(|x| x.label.as_ref().is_some_and(|l| l.pv_uuid == pv.id))
            .count();
        if dups > 1 {
            return Err(invalid(format!(
                "VG {}: PV {} is on {dups} devices",
                md.vg.name, pv.id
            )));
        }
        let is_new = old.metadata.vg.pv_by_id(&pv.id).is_none();
        if is_new && d.mdas.iter().any(|m| m.text.is_some()) {
            return Err(invalid(format!(
                "{}: PV {} already holds VG metadata; it cannot be added to VG {}",
                d.name, pv.id, md.vg.name
            )));
        }
        let Some(label) = d.label.clone() else {
            return Err(invalid(format!("{}: no PV label", d.name)));
        };
        let mut areas = Vec::new();
        for m in &d.mdas {
            match &m.header {
                Some(h) if h.ignored() => {}
                Some(h) => areas.push(h.clone()),
                None => skipped.push((d.name.clone(), m.area.offset.0)),
            }
        }
        targets.push(Target {
            dev: d.dev.clone(),
            label,
            areas,
        });
    }
    let written = write_version(&targets, md)?;
    Ok(Committed {
        seqno: md.vg.seqno,
        copies: written,
        skipped,
    })
}

/// Writes the first version of a new VG, `md`, to `devices`: each must be an orphan PV (a
/// label, metadata areas without VG metadata), and together they must be exactly the PVs
/// `md.vg` lists. This is the on-disk half of `vgcreate`; choosing extents and seqno 1 is the
/// caller's.
pub fn create(devices: &[DeviceRef], md: &Metadata) -> Result<Committed, Error> {
    let mut targets = Vec::new();
    for dev in devices {
        let name = dev.name();
        let label = label::find(dev.as_ref())?
            .ok_or_else(|| invalid(format!("{name}: not a PV (no label)")))?;
        if md.vg.pv_by_id(&label.pv_uuid).is_none() {
            return Err(invalid(format!(
                "{name}: PV {} is not in VG {}",
                label.pv_uuid, md.vg.name
            )));
        }
        let mut areas = Vec::new();
        for area in &label.metadata_areas {
            let h = mda::read_header(dev.as_ref(), area)?;
            if !h.committed.is_empty() {
                return Err(invalid(format!(
                    "{name}: metadata area at byte {} already holds metadata",
                    area.offset.0
                )));
            }
            if !h.ignored() {
                areas.push(h);
            }
        }
        targets.push(Target {
            dev: dev.clone(),
            label,
            areas,
        });
    }
    for pv in &md.vg.physical_volumes {
        let n = targets.iter().filter(|t| t.label.pv_uuid == pv.id).count();
        if n != 1 {
            return Err(invalid(format!(
                "VG {}: PV {} ({}) is on {n} of the devices given, it must be on exactly one",
                md.vg.name, pv.id, pv.key
            )));
        }
    }
    let copies = write_version(&targets, md)?;
    Ok(Committed {
        seqno: md.vg.seqno,
        copies,
        skipped: Vec::new(),
    })
}

/// Re-reads a header and checks its committed copy is still the one the caller saw.
fn unchanged(dev: &DeviceRef, seen: &MdaHeader) -> Result<MdaHeader, Error> {
    let area = DiskArea {
        offset: seen.start,
        size: seen.size,
    };
    let now = mda::read_header(dev.as_ref(), &area)?;
    if now.committed != seen.committed {
        return Err(invalid(format!(
            "{}: metadata area at byte {} changed since it was scanned",
            dev.name(),
            seen.start.0
        )));
    }
    Ok(now)
}

/// Steps 1-4 of the module doc on every target.
fn write_version(targets: &[Target], md: &Metadata) -> Result<Vec<WrittenCopy>, Error> {
    let mut text = md.to_text(Style::Disk)?.into_bytes();
    text.push(0);
    if targets.iter().all(|t| t.areas.is_empty()) {
        return Err(invalid(format!(
            "VG {}: no metadata area to write to",
            md.vg.name
        )));
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
