//! `vgck --updatemetadata`: the VG's newest good metadata written again, as a new version, to
//! every metadata area of every PV, as LVM2's `vg_write` + `vg_write_commit_bad_mdas` do:
//!
//! - stale copies, copies whose text is damaged (bad crc, does not parse) and areas left with
//!   an interrupted precommit are rewritten by the ordinary commit;
//! - an area whose header is damaged gets a new header when that is safe: its crc or version
//!   is wrong, or a slot points outside the ring, but the magic and the recorded start say it
//!   is the header the label points at. A wrong magic, start or size may mean the label
//!   points at the wrong place, so such areas are left alone and reported (LVM2 does the same);
//! - outdated PVs (a device whose copies are older versions of this VG, which no longer lists
//!   its PV: a vgreduce cut short) are made orphans.
//!
//! Refused, as by [`crate::commit::commit`], when a PV is missing, carries another VG, or two
//! texts share the newest seqno: which copy is right is then the administrator's call
//! (`vgcfgrestore`).

use tables::BlockDevice;

use crate::commit::{self, Committed};
use crate::label::DiskArea;
use crate::le::u64_at;
use crate::mda::{self, MdaIoError, MdaProblem, FMTT_MAGIC, MDA_HEADER_SIZE};
use crate::model::Metadata;
use crate::scan::ScanReport;
use crate::uuid::Uuid;
use crate::Error;

/// Whether the header of `area` on `dev` is damaged in a way a new header may be written
/// over (see the module doc). `false` for a header that reads fine.
pub fn header_is_repairable(dev: &dyn BlockDevice, area: &DiskArea) -> Result<bool, Error> {
    let problem = match mda::read_header(dev, area) {
        Ok(_) => return Ok(false),
        Err(MdaIoError::Io(e)) => return Err(e.into()),
        Err(MdaIoError::Mda(e)) => e.problem,
    };
    Ok(match problem {
        // The crc failed before any field was checked: check the two that say where we are.
        MdaProblem::BadHeaderChecksum { .. } => {
            let mut b = [0u8; MDA_HEADER_SIZE];
            crate::io::read_at(dev, area.offset.0, &mut b)?;
            &b[4..20] == FMTT_MAGIC && u64_at(&b, 24) == area.offset.0
        }
        MdaProblem::BadVersion(_) | MdaProblem::BadLocation { .. } | MdaProblem::TooLarge(_) => {
            true
        }
        MdaProblem::BadMagic
        | MdaProblem::WrongStart { .. }
        | MdaProblem::WrongSize { .. }
        | MdaProblem::BadTextChecksum { .. }
        | MdaProblem::NoSpace { .. } => false,
    })
}

/// What [`update_metadata`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Updated {
    /// The version written.
    pub committed: Committed,
    /// Devices of outdated PVs made orphans.
    pub wiped: Vec<String>,
}

/// Writes the VG with uuid `id`, as the scan `report` found it, as its next version to every
/// metadata area of its PVs (damaged headers replaced where safe), stamped with
/// `description`; then makes outdated PVs orphans. See the module doc.
pub fn update_metadata(
    report: &ScanReport,
    id: &Uuid,
    description: &str,
) -> Result<Updated, Error> {
    let vg = report
        .vg_by_id(id)
        .ok_or_else(|| commit::CommitError::NotScanned {
            vg: id.to_string(),
            id: *id,
        })?;
    let mut md: Metadata = vg.metadata.clone();
    md.stamp(description);
    let committed = commit::commit_with(report, &mut md, &[], true)?;
    let mut wiped = Vec::new();
    for d in &report.devices {
        let Some(label) = &d.label else { continue };
        if md.vg.pv_by_id(&label.pv_uuid).is_some() {
            continue;
        }
        // Only copies of this VG, all older than the version just written.
        let mut copies = d.mdas.iter().filter_map(|m| m.text.as_ref()).peekable();
        if copies.peek().is_none() {
            continue;
        }
        if copies.all(|t| t.metadata.vg.id == *id && t.metadata.vg.seqno < md.vg.seqno) {
            crate::orphan::leave_vg(d.dev.as_ref(), label)?;
            wiped.push(d.name.clone());
        }
    }
    Ok(Updated { committed, wiped })
}
