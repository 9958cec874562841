//! `vgcfgrestore -f FILE VG`: a VG from a backup file (LVM2's `vgcfgbackup` text) written back
//! to the PVs it lists, found by PV uuid on the scanned devices, as LVM2's
//! `backup_restore_from_file` does. This is the recovery path, so it works when the VG's
//! current metadata is unreadable: every copy's text damaged, headers damaged (replaced where
//! that is safe, see [`crate::repair`]), or the PVs orphans whose labels still carry their
//! uuids (vgremove'd, or their areas wiped).
//!
//! The restored version's seqno is one past both the backup's and any copy of the VG found,
//! so it is the newest wherever it lands. Refused when a PV of the backup is missing or
//! flagged `MISSING` (LVM2 refuses those; `force` writes to the PVs present), when a PV now
//! carries another VG's metadata, or when another VG has the name; with `force` only, when a
//! PV's label puts its data elsewhere than the backup's `pe_start` or the device is too small
//! for the extents the backup gives it.

use tables::Bytes;

use crate::commit::{self, CommitError, Committed};
use crate::model::Metadata;
use crate::scan::ScanReport;
use crate::uuid::Uuid;
use crate::Error;

/// Why a backup cannot be restored; nothing was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    /// PVs of the backup were not found (or the backup flags them `MISSING`).
    #[error("Cannot restore Volume Group {vg} with {} PVs marked as missing: {}", pvs.len(), pvs.join(", "))]
    MissingPvs {
        /// VG name.
        vg: String,
        /// Each missing PV: key, uuid and the device hint.
        pvs: Vec<String>,
    },
    /// A PV of the backup now carries another VG.
    #[error("{device}: PV {id} now holds the metadata of VG {other}; restoring VG {vg} over it is refused")]
    PvOfOtherVg {
        /// VG name.
        vg: String,
        /// Device name.
        device: String,
        /// PV uuid.
        id: Uuid,
        /// The VG on it.
        other: String,
    },
    /// Another VG (another uuid) has the name.
    #[error("a different VG ({other}) is named {vg}")]
    NameTaken {
        /// VG name.
        vg: String,
        /// The other VG's uuid.
        other: Uuid,
    },
    /// The PV's label puts its data elsewhere than the backup.
    #[error("{device}: PV {id}'s label puts its first extent at byte {label}, the backup at byte {backup}")]
    LayoutMismatch {
        /// Device name.
        device: String,
        /// PV uuid.
        id: Uuid,
        /// From the label.
        label: u64,
        /// From the backup.
        backup: u64,
    },
    /// The device is smaller than the backup's extents on it.
    #[error("{device}: PV {id}'s extents end at byte {needs} in the backup, the device has {size} bytes")]
    DeviceTooSmall {
        /// Device name.
        device: String,
        /// PV uuid.
        id: Uuid,
        /// End of its last extent.
        needs: u64,
        /// Device size.
        size: u64,
    },
}

/// What a restore wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restored {
    /// The version written.
    pub committed: Committed,
    /// PVs of the backup not written because they are missing (only with `force`).
    pub missing: Vec<Uuid>,
}

/// Writes the backup `md` to its PVs found in `report` as a new version (its seqno and
/// header lines as written are set in `md`). See the module doc for what is refused.
pub fn restore(report: &ScanReport, md: &mut Metadata, force: bool) -> Result<Restored, Error> {
    let vg = md.vg.name.clone();
    let id = md.vg.id;
    if let Some(other) = report.vgs.iter().find(|v| v.name() == vg && v.id() != id) {
        return Err(RestoreError::NameTaken {
            vg,
            other: other.id(),
        }
        .into());
    }
    let mut found = Vec::new();
    let mut missing = Vec::new();
    let mut missing_names = Vec::new();
    for pv in &md.vg.physical_volumes {
        let dev = if pv.is_missing() {
            None
        } else {
            match commit::pv_device(report, &vg, pv) {
                Ok(i) => Some(i),
                Err(Error::Commit(CommitError::PvNotFound { .. })) => None,
                Err(e) => return Err(e),
            }
        };
        let Some(i) = dev else {
            missing.push(pv.id);
            missing_names.push(format!(
                "{} ({}, last seen as {})",
                pv.key,
                pv.id,
                pv.device.as_deref().unwrap_or("unknown device")
            ));
            continue;
        };
        let d = &report.devices[i];
        let own = d
            .mdas
            .iter()
            .filter_map(|m| m.text.as_ref())
            .max_by_key(|t| t.metadata.vg.seqno);
        if let Some(t) = own.filter(|t| t.metadata.vg.id != id) {
            return Err(RestoreError::PvOfOtherVg {
                vg,
                device: d.name.clone(),
                id: pv.id,
                other: t.metadata.vg.name.clone(),
            }
            .into());
        }
        if !force {
            let label = d.label.as_ref().and_then(|l| l.pe_start());
            let backup = pv.pe_start.bytes();
            if label != Some(backup) {
                return Err(RestoreError::LayoutMismatch {
                    device: d.name.clone(),
                    id: pv.id,
                    label: label.map_or(0, |b| b.0),
                    backup: backup.0,
                }
                .into());
            }
            let needs = pv
                .pe_count
                .to_sectors(md.vg.extent_size)
                .and_then(|s| s.checked_add(pv.pe_start))
                .and_then(|s| s.checked_bytes())
                .unwrap_or(Bytes(u64::MAX));
            if needs > d.size {
                return Err(RestoreError::DeviceTooSmall {
                    device: d.name.clone(),
                    id: pv.id,
                    needs: needs.0,
                    size: d.size.0,
                }
                .into());
            }
        }
        found.push(i);
    }
    if !missing.is_empty() && !force {
        return Err(RestoreError::MissingPvs {
            vg,
            pvs: missing_names,
        }
        .into());
    }
    // One past every copy of this VG anywhere (stale ones included) and the backup.
    let on_disk = report
        .devices
        .iter()
        .flat_map(|d| d.mdas.iter())
        .filter_map(|m| m.text.as_ref())
        .filter(|t| t.metadata.vg.id == id)
        .map(|t| t.metadata.vg.seqno)
        .max()
        .unwrap_or(0);
    md.vg.seqno = md
        .vg
        .seqno
        .max(on_disk)
        .checked_add(1)
        .ok_or_else(|| CommitError::SeqnoOverflow { vg: vg.clone() })?;
    let mut targets = Vec::new();
    let mut skipped = Vec::new();
    for i in found {
        targets.push(commit::target(&report.devices[i], true, &mut skipped)?);
    }
    let copies = commit::write_version(&targets, md)?;
    Ok(Restored {
        committed: Committed {
            seqno: md.vg.seqno,
            copies,
            skipped,
        },
        missing,
    })
}
