//! The first version of a VG, as `vgcreate` makes it: the VG entry for each orphan PV, and the
//! VG itself with LVM2's defaults. Writing it is [`crate::commit::create`].

use tables::{Bytes, Sectors};

use crate::model::Flags;
use crate::{Extents, Label, PhysicalVolume, Uuid, VolumeGroup};

/// LVM2's default extent size (4 MiB).
pub const DEFAULT_EXTENT_SIZE: Sectors = Sectors(8192);

/// Why a PV cannot join a VG with this extent size.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PvEntryError {
    /// The label has no data area (`pvcreate` always writes one).
    #[error("PV {0}: its label has no data area")]
    NoDataArea(Uuid),
    /// Not even one extent fits.
    #[error("PV {pv}: {free} bytes after pe_start hold no extent of {extent} bytes")]
    TooSmall {
        /// The PV.
        pv: Uuid,
        /// Bytes from pe_start to the end.
        free: u64,
        /// Extent size in bytes.
        extent: u64,
    },
}

/// The VG entry of the PV `label` describes, on a device of `size` bytes: whole extents from
/// `pe_start` to the device's end (or to its second metadata area), as vgcreate counts them.
pub fn pv_entry(
    key: &str,
    label: &Label,
    size: Bytes,
    extent_size: Sectors,
    device: Option<String>,
) -> Result<PhysicalVolume, PvEntryError> {
    let pe_start = label
        .pe_start()
        .ok_or(PvEntryError::NoDataArea(label.pv_uuid))?;
    let end = match label.metadata_areas.get(1) {
        Some(second) => second.offset.0,
        None => size.0,
    };
    let free = end.saturating_sub(pe_start.0);
    let extent = extent_size.bytes().0.max(1);
    let count = u32::try_from(free / extent).unwrap_or(u32::MAX);
    if count == 0 {
        return Err(PvEntryError::TooSmall {
            pv: label.pv_uuid,
            free,
            extent,
        });
    }
    Ok(PhysicalVolume {
        key: key.into(),
        id: label.pv_uuid,
        device,
        status: Flags::of(&["ALLOCATABLE"]),
        flags: Flags::default(),
        dev_size: Some(size.sectors_floor()),
        pe_start: pe_start.sectors_floor(),
        pe_count: Extents(count),
        extra: Vec::new(),
    })
}

/// A new VG over `pvs`, with no LVs and what LVM2's vgcreate sets.
pub fn new_vg(name: &str, extent_size: Sectors, pvs: Vec<PhysicalVolume>) -> VolumeGroup {
    VolumeGroup {
        name: name.into(),
        id: Uuid::generate(),
        seqno: 1,
        format: Some("lvm2".into()),
        status: Flags::of(&["RESIZEABLE", "READ", "WRITE"]),
        flags: Flags::default(),
        extent_size,
        max_lv: 0,
        max_pv: 0,
        metadata_copies: Some(0),
        physical_volumes: pvs,
        logical_volumes: Vec::new(),
        extra: Vec::new(),
    }
}

/// Whether `name` is a name LVM accepts for a VG or LV: letters, digits and `+_.-`, not
/// starting with `-`, not `.` or `..`, at most 127 characters, and not one of LVM's reserved
/// words or prefixes. The error says which rule.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{what} name is empty"));
    }
    if name.len() > 127 {
        return Err(format!(
            "{what} name '{name}' is longer than 127 characters"
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("{what} name '{name}' is reserved"));
    }
    if name.starts_with('-') {
        return Err(format!("{what} name '{name}' starts with '-'"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "+_.-".contains(*c)))
    {
        return Err(format!(
            "{what} name '{name}' has the character '{c}' (use letters, digits and +_.-)"
        ));
    }
    if what == "LV" {
        for bad in ["snapshot", "pvmove"] {
            if name.starts_with(bad) {
                return Err(format!("LV name '{name}' starts with the reserved '{bad}'"));
            }
        }
        for bad in [
            "_cdata", "_cmeta", "_corig", "_mlog", "_mimage", "_pmspare", "_rimage", "_rmeta",
            "_tdata", "_tmeta", "_vorigin", "_vdata",
        ] {
            if name.contains(bad) {
                return Err(format!("LV name '{name}' has the reserved '{bad}' in it"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_lvm_refuses() {
        assert!(check_name("VG", "vg0").is_ok());
        assert!(check_name("VG", "a.b+c_d-e").is_ok());
        for bad in ["", ".", "..", "-x", "a/b", "a b", "é"] {
            assert!(check_name("VG", bad).is_err(), "{bad}");
        }
        assert!(check_name("LV", "snapshot1").is_err());
        assert!(check_name("LV", "x_rimage_0").is_err());
        assert!(check_name("VG", &"a".repeat(128)).is_err());
    }
}
