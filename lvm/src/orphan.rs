//! A PV leaving its VG becomes an orphan as LVM2 leaves it, a PV in no VG: every metadata area
//! has an empty header and the label lacks the "in a VG" flag. The order of the two writes
//! decides what a cut between them leaves, so there are two entry points:
//!
//! - [`make_orphan`] (vgremove: the VG goes with its PVs): the areas are emptied first, then
//!   the flag cleared. A cut leaves a PV flagged used with no metadata, which LVM2 refuses to
//!   reuse without `pvcreate -ff`; never a PV that looks free while it holds a live VG.
//! - [`leave_vg`] (vgreduce, outdated PVs): the VG's committed version already no longer lists
//!   the PV, so its copy is history: the flag is cleared first, then the areas. A cut leaves an
//!   unflagged PV with an old copy of a VG that does not list it, which the scan reports
//!   ([`crate::scan::Problem::NotInVg`]) and `vgck --updatemetadata` wipes; never a PV flagged
//!   used that nothing can clear.

use tables::BlockDevice;

use crate::label::{self, Label, PV_EXT_USED};
use crate::mda::{self, MdaHeader};
use crate::Error;

/// Makes the PV `label` describes on `dev` an orphan, metadata areas first (durable), then
/// the label without [`PV_EXT_USED`]. The label keeps its uuid and layout.
pub fn make_orphan(dev: &dyn BlockDevice, label: &Label) -> Result<(), Error> {
    empty_areas(dev, label)?;
    clear_used(dev, label)
}

/// Makes a PV the VG no longer lists an orphan: the label without [`PV_EXT_USED`] first, then
/// the metadata areas emptied (durable).
pub fn leave_vg(dev: &dyn BlockDevice, label: &Label) -> Result<(), Error> {
    clear_used(dev, label)?;
    empty_areas(dev, label)
}

fn empty_areas(dev: &dyn BlockDevice, label: &Label) -> Result<(), Error> {
    for area in &label.metadata_areas {
        mda::write_header(dev, &MdaHeader::new(area), true)?;
    }
    Ok(())
}

fn clear_used(dev: &dyn BlockDevice, label: &Label) -> Result<(), Error> {
    if label.in_use() {
        let mut l = label.clone();
        if let Some(ext) = &mut l.extension {
            ext.flags &= !PV_EXT_USED;
        }
        label::write(dev, &l)?;
    }
    Ok(())
}
