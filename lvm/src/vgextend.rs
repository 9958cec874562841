//! `vgextend`: orphan PVs join a VG, as LVM2's `add_pv_to_vg` does: each gets an entry (its
//! extents counted from its label, as vgcreate counts them, up to the size its label records:
//! LVM2 uses that size, which `pvresize --setphysicalvolumesize` may have made smaller than
//! the device) under the next free `pvN` key, all of it allocatable. Writing the new version to every PV, the new ones included, is
//! [`crate::commit::commit`], which also refuses a PV that already holds VG metadata.

use tables::Bytes;

use crate::label::Label;
use crate::model::VolumeGroup;
use crate::uuid::Uuid;
use crate::vgcreate::{pv_entry, PvEntryError};

/// LVM2's limit on a VG's extents (`MAX_EXTENT_COUNT`, `UINT32_MAX`).
pub const MAX_EXTENT_COUNT: u64 = u32::MAX as u64;

/// Why a PV cannot join the VG; the VG is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtendError {
    /// The VG already lists the PV.
    #[error("PV {id} is already in VG {vg}")]
    AlreadyInVg {
        /// VG name.
        vg: String,
        /// PV uuid.
        id: Uuid,
    },
    /// The VG holds `max_pv` PVs already.
    #[error("no space for PV {id}: VG {vg} holds at most {max} PV(s)")]
    MaxPv {
        /// VG name.
        vg: String,
        /// PV uuid.
        id: Uuid,
        /// `max_pv`.
        max: u32,
    },
    /// The VG's extents would pass LVM2's limit.
    #[error("VG {vg}: new extent count {count} exceeds the limit {MAX_EXTENT_COUNT}")]
    TooManyExtents {
        /// VG name.
        vg: String,
        /// The count it would have.
        count: u64,
    },
    /// The PV cannot hold one extent of the VG's size.
    #[error(transparent)]
    Entry(#[from] PvEntryError),
}

/// The next free key: `pvN` with N one past the highest number in use (`pv0` for none).
/// (LVM2 renumbers the keys on every write; any unused key reads the same.)
pub fn next_pv_key(vg: &VolumeGroup) -> String {
    let next = vg
        .physical_volumes
        .iter()
        .filter_map(|p| p.key.strip_prefix("pv")?.parse::<u64>().ok())
        .max()
        .map_or(0, |n| n.saturating_add(1));
    format!("pv{next}")
}

/// A PV to add: its label, the size of its device, and the device path recorded as a hint.
#[derive(Clone, Debug)]
pub struct NewPv {
    /// The PV's label.
    pub label: Label,
    /// Its device's size (the PV takes the smaller of this and its label's size).
    pub size: Bytes,
    /// The `device` hint.
    pub device: Option<String>,
}

/// Adds `pvs` to `vg` under new keys, which it returns in order. Nothing is added when any
/// of them is refused.
pub fn add_pvs(vg: &mut VolumeGroup, pvs: &[NewPv]) -> Result<Vec<String>, ExtendError> {
    let mut next = vg.clone();
    let mut keys = Vec::new();
    let mut count: u64 = next
        .physical_volumes
        .iter()
        .map(|p| u64::from(p.pe_count.0))
        .sum();
    for p in pvs {
        let id = p.label.pv_uuid;
        if next.pv_by_id(&id).is_some() {
            return Err(ExtendError::AlreadyInVg {
                vg: next.name.clone(),
                id,
            });
        }
        if next.max_pv != 0 && next.physical_volumes.len() >= next.max_pv as usize {
            return Err(ExtendError::MaxPv {
                vg: next.name.clone(),
                id,
                max: next.max_pv,
            });
        }
        let key = next_pv_key(&next);
        let size = p.size.min(p.label.device_size);
        let entry = pv_entry(&key, &p.label, size, next.extent_size, p.device.clone())?;
        count = count.saturating_add(u64::from(entry.pe_count.0));
        if count > MAX_EXTENT_COUNT {
            return Err(ExtendError::TooManyExtents {
                vg: next.name.clone(),
                count,
            });
        }
        next.physical_volumes.push(entry);
        keys.push(key);
    }
    *vg = next;
    Ok(keys)
}
