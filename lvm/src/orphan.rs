//! A PV leaving its VG (vgremove, vgreduce, outdated PVs wiped by `vgck --updatemetadata`):
//! it becomes an orphan as LVM2 leaves it, a PV in no VG: every metadata area gets an empty
//! header, then the label loses its "in a VG" flag (LVM2's order: with the areas empty first,
//! a cut in between leaves a used-flagged PV without metadata, which LVM2 reports and a later
//! pvcreate or VG write fixes; never a PV that looks free while it still holds a VG).

use tables::BlockDevice;

use crate::label::{self, Label, PV_EXT_USED};
use crate::mda::{self, MdaHeader};
use crate::Error;

/// Makes the PV `label` describes on `dev` an orphan: empty metadata area headers (durable),
/// then the label without [`PV_EXT_USED`]. The label keeps its uuid and layout.
pub fn make_orphan(dev: &dyn BlockDevice, label: &Label) -> Result<(), Error> {
    for area in &label.metadata_areas {
        mda::write_header(dev, &MdaHeader::new(area), true)?;
    }
    if label.in_use() {
        let mut l = label.clone();
        if let Some(ext) = &mut l.extension {
            ext.flags &= !PV_EXT_USED;
        }
        label::write(dev, &l)?;
    }
    Ok(())
}
