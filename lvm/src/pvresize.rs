//! `pvresize`: a PV takes the size of its device (grown, say, by a bigger disk image) or a
//! size given (`--setphysicalvolumesize`, to shrink it), as LVM2's `pv_resize_single` does.
//!
//! In a VG, the PV's `pe_count` becomes the whole extents from `pe_start` to the new end, and
//! its `dev_size` what LVM2 writes there after a resize (the size less `pe_start`); shrinking
//! is refused when it would cut extents an LV uses. The new version is committed, then the
//! label's device size is updated (informational: a cut in between leaves the old one, which
//! nothing reads for a PV in a VG). An orphan PV only gets its label's device size.
//!
//! Not done here: a PV with a second metadata area at its end (LVM2 moves that area; here the
//! resize is refused), and sizes past the end of the device (LVM2 asks and pretends).

use tables::Bytes;

use crate::commit::{self, Committed};
use crate::label;
use crate::model::SegmentKind;
use crate::pvcreate::PV_MIN_SIZE;
use crate::scan::ScanReport;
use crate::units::Extents;
use crate::uuid::Uuid;
use crate::vgreduce::segment_uses_pv;
use crate::Error;

/// Why a PV cannot take the size; nothing was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResizeError {
    /// The device index is not a PV.
    #[error("{device}: not a PV")]
    NotAPv {
        /// Device name.
        device: String,
    },
    /// Smaller than LVM2's smallest PV.
    #[error("{device}: size {size} must exceed the minimum of {PV_MIN_SIZE}")]
    TooSmall {
        /// Device name.
        device: String,
        /// Size asked.
        size: Bytes,
    },
    /// Larger than the device.
    #[error("{device}: size {size} is past the end of the device ({real})")]
    PastDevice {
        /// Device name.
        device: String,
        /// Size asked.
        size: Bytes,
        /// The device's size.
        real: Bytes,
    },
    /// No whole extent after `pe_start`.
    #[error("{device}: size {size} must leave space for at least one physical extent of {extent} after the first extent's start at {pe_start}")]
    NoExtent {
        /// Device name.
        device: String,
        /// Size asked.
        size: Bytes,
        /// Extent size.
        extent: Bytes,
        /// Where extents start.
        pe_start: Bytes,
    },
    /// A second metadata area sits at the end of the device (LVM2 moves it; not done here).
    #[error("{device}: the PV has a metadata area at its end; resizing it is not supported here")]
    SecondMetadataArea {
        /// Device name.
        device: String,
    },
    /// Shrinking would cut extents LVs use.
    #[error("{device}: cannot resize to {count} extents as later ones are allocated to LV(s) {}", lvs.join(", "))]
    Allocated {
        /// Device name.
        device: String,
        /// Extents it would have.
        count: u32,
        /// The LVs with extents at or past `count`.
        lvs: Vec<String>,
    },
}

/// What a resize did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resized {
    /// The PV.
    pub id: Uuid,
    /// Extents before and after (in a VG).
    pub pe_count: Option<(Extents, Extents)>,
    /// The VG version written (in a VG, when anything changed).
    pub committed: Option<Committed>,
}

/// Resizes the PV on `report.devices[dev]` to `size` bytes (at most the device's size); see
/// the module doc. `description` goes into the VG's new version.
pub fn pvresize(
    report: &ScanReport,
    dev: usize,
    size: Bytes,
    description: &str,
) -> Result<Resized, Error> {
    let d = report.devices.get(dev).ok_or_else(|| ResizeError::NotAPv {
        device: format!("device #{dev}"),
    })?;
    let device = d.name.clone();
    let label = d.label.clone().ok_or_else(|| ResizeError::NotAPv {
        device: device.clone(),
    })?;
    if size < PV_MIN_SIZE {
        return Err(ResizeError::TooSmall { device, size }.into());
    }
    if size > d.size {
        return Err(ResizeError::PastDevice {
            device,
            size,
            real: d.size,
        }
        .into());
    }
    if label.metadata_areas.len() > 1 {
        return Err(ResizeError::SecondMetadataArea { device }.into());
    }
    let size = Bytes(size.0 - size.0 % 512);
    let sv = report
        .vgs
        .iter()
        .find(|v| v.metadata.vg.pv_by_id(&label.pv_uuid).is_some());
    let mut resized = Resized {
        id: label.pv_uuid,
        pe_count: None,
        committed: None,
    };
    if let Some(sv) = sv {
        let mut md = sv.metadata.clone();
        let extent = md.vg.extent_size.bytes();
        let Some(i) = md
            .vg
            .physical_volumes
            .iter()
            .position(|p| p.id == label.pv_uuid)
        else {
            return Err(ResizeError::NotAPv { device }.into());
        };
        let pv = &md.vg.physical_volumes[i];
        let pe_start = pv.pe_start.bytes();
        let usable = size.0.saturating_sub(pe_start.0);
        let count = usable / extent.0.max(1);
        let count = u32::try_from(count).unwrap_or(u32::MAX);
        if count == 0 {
            return Err(ResizeError::NoExtent {
                device,
                size,
                extent,
                pe_start,
            }
            .into());
        }
        let old = pv.pe_count;
        if count < old.0 {
            let lvs = lvs_past(&md.vg, &pv.key, count);
            if !lvs.is_empty() {
                return Err(ResizeError::Allocated { device, count, lvs }.into());
            }
        }
        let dev_size = Bytes(usable).sectors_floor();
        resized.pe_count = Some((old, Extents(count)));
        let pv = &mut md.vg.physical_volumes[i];
        if pv.pe_count.0 != count || pv.dev_size != Some(dev_size) {
            pv.pe_count = Extents(count);
            pv.dev_size = Some(dev_size);
            md.stamp(description);
            resized.committed = Some(commit::commit(report, &mut md)?);
        }
    } else if label.pe_start().is_none_or(|p| p >= size) {
        return Err(ResizeError::NoExtent {
            device,
            size,
            extent: Bytes(0),
            pe_start: label.pe_start().unwrap_or(Bytes(0)),
        }
        .into());
    }
    if label.device_size != size {
        let mut l = label;
        l.device_size = size;
        label::write(d.dev.as_ref(), &l)?;
    }
    Ok(resized)
}

/// LVs with an extent at or past `count` on the PV `key` (striped areas; a segment of another
/// type that names the PV counts, to be safe).
fn lvs_past(vg: &crate::VolumeGroup, key: &str, count: u32) -> Vec<String> {
    let past = |seg: &crate::Segment| match &seg.kind {
        SegmentKind::Striped { stripes, .. } => {
            let len = seg.area_len().map_or(0, |l| l.0);
            stripes
                .iter()
                .any(|a| a.volume == key && a.start.0.saturating_add(len) > count)
        }
        SegmentKind::Other { .. } => segment_uses_pv(seg, key),
    };
    vg.logical_volumes
        .iter()
        .filter(|lv| lv.segments.iter().any(past))
        .map(|lv| lv.name.clone())
        .collect()
}
