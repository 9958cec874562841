//! `vgreduce`: PVs leave a VG, as LVM2's `vgreduce_single` and `vgreduce --removemissing` do.
//!
//! A PV may leave only when no LV has an extent on it and it is not the VG's last PV. The new
//! version, without it, is written to the PVs that stay ([`commit::commit_dropping`]); then
//! the PV becomes an orphan ([`crate::orphan::leave_vg`]). A cut in between leaves the PV with its old
//! copy of a VG that no longer lists it: the scan reports it ([`Problem::NotInVg`]) and
//! `vgck --updatemetadata` ([`crate::repair`]) or another `vgreduce` finishes the job.
//!
//! `--removemissing` drops PVs the scan did not find. LVs with extents on them block it,
//! unless forced: then those LVs are removed first (LVM2's `--removemissing --force`), as far
//! as this crate understands them (visible linear and striped LVs).
//!
//! [`Problem::NotInVg`]: crate::scan::Problem::NotInVg

use crate::commit::{self, Committed};
use crate::model::{LogicalVolume, Metadata, Segment, SegmentKind, VolumeGroup};
use crate::scan::{ScanReport, ScannedVg};
use crate::text::{Item, Section, Value};
use crate::uuid::Uuid;
use crate::Error;

/// Why PVs cannot leave the VG; nothing was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReduceError {
    /// The VG does not list the PV.
    #[error("PV {id} is not in VG {vg}")]
    NotInVg {
        /// VG name.
        vg: String,
        /// PV uuid.
        id: Uuid,
    },
    /// LVs have extents on the PV.
    #[error("PV {id} ({key}) of VG {vg} is still in use by LV(s) {}", lvs.join(", "))]
    InUse {
        /// VG name.
        vg: String,
        /// PV uuid.
        id: Uuid,
        /// PV key.
        key: String,
        /// The LVs using it.
        lvs: Vec<String>,
    },
    /// It would leave the VG without PVs.
    #[error("PV {id} is the last PV of VG {vg}")]
    LastPv {
        /// VG name.
        vg: String,
        /// PV uuid.
        id: Uuid,
    },
    /// `--removemissing` without force: LVs have extents on missing PVs.
    #[error("VG {vg}: LV(s) {} have extents on missing PVs", lvs.join(", "))]
    PartialLvs {
        /// VG name.
        vg: String,
        /// The LVs.
        lvs: Vec<String>,
    },
    /// `--removemissing --force` would have to remove an LV this crate does not remove (a
    /// hidden LV, or one with a segment type other than striped).
    #[error("VG {vg}: LV {lv} uses a missing PV and is not a visible linear or striped LV; it is not removed here")]
    CannotRemoveLv {
        /// VG name.
        vg: String,
        /// The LV.
        lv: String,
    },
}

/// Whether `item` mentions the string `key` anywhere (arrays and subsections included).
fn mentions(item: &Item, key: &str) -> bool {
    let is = |v: &Value| matches!(v, Value::Str(s) if s == key);
    match item {
        Item::Value(v) => is(v),
        Item::Array(vs) => vs.iter().any(is),
        Item::Section(s) => section_mentions(s, key),
    }
}

fn section_mentions(s: &Section, key: &str) -> bool {
    s.entries.iter().any(|(_, i)| mentions(i, key))
}

/// Whether `seg` has extents on the PV `key`: a striped area on it, or, for segment types
/// this crate does not type, any mention of the key (to be safe).
pub fn segment_uses_pv(seg: &Segment, key: &str) -> bool {
    match &seg.kind {
        SegmentKind::Striped { stripes, .. } => stripes.iter().any(|a| a.volume == key),
        SegmentKind::Other { .. } => seg.extra.iter().any(|(_, i)| mentions(i, key)),
    }
}

/// Whether `lv` has extents on the PV `key` ([`segment_uses_pv`]).
pub fn lv_uses_pv(lv: &LogicalVolume, key: &str) -> bool {
    lv.segments.iter().any(|seg| segment_uses_pv(seg, key))
}

/// Names of the LVs with extents on the PV `key`, in the VG's order.
pub fn lvs_on_pv(vg: &VolumeGroup, key: &str) -> Vec<String> {
    vg.logical_volumes
        .iter()
        .filter(|lv| lv_uses_pv(lv, key))
        .map(|lv| lv.name.clone())
        .collect()
}

/// Takes the PVs `ids` out of `vg`, refusing one that LVs use, one the VG does not list, and
/// leaving no PV.
pub fn remove_pvs(vg: &mut VolumeGroup, ids: &[Uuid]) -> Result<(), ReduceError> {
    for id in ids {
        let pv = vg.pv_by_id(id).ok_or_else(|| ReduceError::NotInVg {
            vg: vg.name.clone(),
            id: *id,
        })?;
        let lvs = lvs_on_pv(vg, &pv.key);
        if !lvs.is_empty() {
            return Err(ReduceError::InUse {
                vg: vg.name.clone(),
                id: *id,
                key: pv.key.clone(),
                lvs,
            });
        }
        if vg.physical_volumes.len() == 1 {
            return Err(ReduceError::LastPv {
                vg: vg.name.clone(),
                id: *id,
            });
        }
        vg.physical_volumes.retain(|p| p.id != *id);
    }
    Ok(())
}

/// What a vgreduce wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reduced {
    /// The new version.
    pub committed: Committed,
    /// PVs that left (present ones are orphans now).
    pub removed: Vec<Uuid>,
    /// LVs removed with them (`--removemissing --force`).
    pub removed_lvs: Vec<String>,
}

/// Removes the PVs `ids` from the VG `sv` of `report`: checks, commits the VG without them to
/// the PVs that stay, then makes each of them that is present an orphan. `description` goes
/// into the new version's header.
pub fn vgreduce(
    report: &ScanReport,
    sv: &ScannedVg,
    ids: &[Uuid],
    description: &str,
) -> Result<Reduced, Error> {
    let mut md = sv.metadata.clone();
    remove_pvs(&mut md.vg, ids)?;
    finish(report, md, ids, Vec::new(), description)
}

/// `vgreduce --removemissing`: drops every PV of `sv` the scan did not find. LVs with extents
/// on them refuse it, or with `force` are removed first. Returns `Ok(None)` when no PV is
/// missing (LVM2: "already consistent").
pub fn remove_missing(
    report: &ScanReport,
    sv: &ScannedVg,
    force: bool,
    description: &str,
) -> Result<Option<Reduced>, Error> {
    let missing: Vec<Uuid> = sv
        .pvs
        .iter()
        .filter(|p| p.device.is_none())
        .map(|p| p.id)
        .collect();
    if missing.is_empty() {
        return Ok(None);
    }
    let mut md = sv.metadata.clone();
    let name = md.vg.name.clone();
    let keys: Vec<String> = md
        .vg
        .physical_volumes
        .iter()
        .filter(|p| missing.contains(&p.id))
        .map(|p| p.key.clone())
        .collect();
    let partial: Vec<&LogicalVolume> = md
        .vg
        .logical_volumes
        .iter()
        .filter(|lv| keys.iter().any(|k| lv_uses_pv(lv, k)))
        .collect();
    let removed_lvs: Vec<String> = partial.iter().map(|lv| lv.name.clone()).collect();
    if !partial.is_empty() {
        if !force {
            return Err(ReduceError::PartialLvs {
                vg: name,
                lvs: removed_lvs,
            }
            .into());
        }
        for lv in &partial {
            let plain = lv.status.has("VISIBLE")
                && lv
                    .segments
                    .iter()
                    .all(|s| matches!(s.kind, SegmentKind::Striped { .. }));
            // Another LV naming it (a snapshot, a pool) would be left dangling.
            let referenced = md.vg.logical_volumes.iter().any(|o| {
                o.name != lv.name
                    && o.segments
                        .iter()
                        .any(|s| s.extra.iter().any(|(_, i)| mentions(i, &lv.name)))
            });
            if !plain || referenced {
                return Err(ReduceError::CannotRemoveLv {
                    vg: name,
                    lv: lv.name.clone(),
                }
                .into());
            }
        }
        md.vg
            .logical_volumes
            .retain(|lv| !removed_lvs.contains(&lv.name));
    }
    remove_pvs(&mut md.vg, &missing)?;
    finish(report, md, &missing, removed_lvs, description).map(Some)
}

/// Commits `md` (which no longer lists `ids`) and makes the present PVs of `ids` orphans.
fn finish(
    report: &ScanReport,
    mut md: Metadata,
    ids: &[Uuid],
    removed_lvs: Vec<String>,
    description: &str,
) -> Result<Reduced, Error> {
    md.stamp(description);
    let committed = commit::commit_dropping(report, &mut md, ids)?;
    for id in ids {
        if let Some(i) = report.device_of_pv(id) {
            let d = &report.devices[i];
            if let Some(label) = &d.label {
                crate::orphan::leave_vg(d.dev.as_ref(), label)?;
            }
        }
    }
    Ok(Reduced {
        committed,
        removed: ids.to_vec(),
        removed_lvs,
    })
}
