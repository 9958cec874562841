//! Formatting a device as a PV with LVM2's layout (`pvcreate`; `_text_pv_initialise` and
//! `_text_pv_add_metadata_area` in `format-text.c`).
//!
//! Defaults, as LVM2 2.03 picks them on a device that reports no special alignment: the label
//! in sector 1; one metadata area starting at 4 KiB, 1020 KiB long, so the first extent
//! (`pe_start`) is at 1 MiB. A larger `metadata_size` is rounded up so that `pe_start` stays a
//! multiple of the data alignment (1 MiB). A second metadata area (`--pvmetadatacopies 2`)
//! takes the same size at the end of the device, its start aligned down to the alignment.

use tables::{BlockDevice, Bytes, Sectors};

use crate::io;
use crate::label::{self, DiskArea, Label, PvExtension, LABEL_SCAN_SIZE, PV_HEADER_EXTENSION_VSN};
use crate::mda::{self, MdaHeader};
use crate::uuid::Uuid;
use crate::Error;

/// Page size LVM2 aligns the first metadata area to.
const PAGE: u64 = 4096;
/// Smallest metadata area LVM2 accepts (`MDA_SIZE_MIN`: 8 pages).
pub const MDA_SIZE_MIN: u64 = 8 * PAGE;
/// Default metadata area size: 1 MiB less a page, so `pe_start` is 1 MiB.
pub const DEFAULT_METADATA_SIZE: Sectors = Sectors(2040);
/// Default data alignment (`devices/default_data_alignment`, 1 MiB).
pub const DEFAULT_DATA_ALIGNMENT: Sectors = Sectors(2048);
/// Smallest device LVM2 makes a PV of (`devices/pv_min_size`, 2 MiB).
pub const PV_MIN_SIZE: Bytes = Bytes(2 << 20);
/// Bytes LVM2 zeroes at the start of a new metadata area.
const MDA_WIPE: u64 = 8 * 512;

/// How to lay out a new PV.
#[derive(Clone, Debug)]
pub struct PvCreateOptions {
    /// The PV uuid (random if `None`).
    pub uuid: Option<Uuid>,
    /// Sector of the label (0 to 3; LVM2's default 1).
    pub label_sector: u64,
    /// Requested size of each metadata area (`--metadatasize`).
    pub metadata_size: Sectors,
    /// Metadata areas: 0, 1 (default) or 2 (`--pvmetadatacopies`).
    pub metadata_copies: u32,
    /// Alignment of `pe_start` (`--dataalignment`).
    pub data_alignment: Sectors,
}

impl Default for PvCreateOptions {
    fn default() -> PvCreateOptions {
        PvCreateOptions {
            uuid: None,
            label_sector: 1,
            metadata_size: DEFAULT_METADATA_SIZE,
            metadata_copies: 1,
            data_alignment: DEFAULT_DATA_ALIGNMENT,
        }
    }
}

/// Where a new PV's areas go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PvLayout {
    /// Metadata areas (first after the label, second at the end).
    pub metadata_areas: Vec<DiskArea>,
    /// Start of the first extent.
    pub pe_start: Bytes,
}

/// Why a device cannot be laid out as a PV.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// Smaller than LVM2's minimum PV.
    #[error("device of {0} is smaller than the {PV_MIN_SIZE} LVM2 requires for a PV")]
    TooSmall(Bytes),
    /// More than two metadata areas asked.
    #[error("{0} metadata copies asked, a PV has at most 2")]
    TooManyCopies(u32),
    /// A data alignment of 0 or larger than the device.
    #[error("data alignment of {0} sectors does not fit the device")]
    BadAlignment(Sectors),
    /// A metadata area would be smaller than LVM2's minimum.
    #[error("the {which} metadata area would be {len} bytes, LVM2 needs at least {MDA_SIZE_MIN}")]
    AreaTooSmall {
        /// "first" or "second".
        which: &'static str,
        /// Its length.
        len: u64,
    },
    /// Nothing left after the metadata areas.
    #[error("no room for data: the first extent would start at byte {pe_start} of {size}")]
    NoRoomForData {
        /// Where the first extent would start.
        pe_start: u64,
        /// Usable device size.
        size: u64,
    },
}

/// The layout LVM2 2.03 gives a device of `size` bytes with `opts`.
pub fn layout(size: Bytes, opts: &PvCreateOptions) -> Result<PvLayout, LayoutError> {
    if size < PV_MIN_SIZE {
        return Err(LayoutError::TooSmall(size));
    }
    if opts.metadata_copies > 2 {
        return Err(LayoutError::TooManyCopies(opts.metadata_copies));
    }
    let disk = size.0 - size.0 % 512;
    let align = opts
        .data_alignment
        .checked_bytes()
        .filter(|a| a.0 > 0 && a.0 <= disk)
        .ok_or(LayoutError::BadAlignment(opts.data_alignment))?
        .0;
    // Larger than the device is limited below anyway; clamping keeps the sums in range.
    let want = opts
        .metadata_size
        .checked_bytes()
        .map_or(disk, |b| b.0.min(disk));
    let area = |which: &'static str, start: u64, len: u64| {
        if len < MDA_SIZE_MIN {
            return Err(LayoutError::AreaTooSmall { which, len });
        }
        Ok(DiskArea {
            offset: Bytes(start),
            size: Bytes(len),
        })
    };
    let mut areas = Vec::new();
    // First area: after the label sectors, page aligned, its end on the data alignment.
    let mut pe_start = align;
    if opts.metadata_copies >= 1 {
        let limit = disk;
        let mut start = LABEL_SCAN_SIZE;
        if limit - start >= MDA_SIZE_MIN {
            start = start.next_multiple_of(PAGE);
        }
        let mut len = want;
        // Sums are checked: a device near 2^64 bytes is absurd but must not overflow.
        if let Some(end) = start.checked_add(len) {
            if let Some(aligned_end) = end.checked_next_multiple_of(align) {
                if aligned_end <= limit {
                    len = aligned_end - start;
                }
            }
        }
        if start.checked_add(len).is_none_or(|end| end > limit) {
            // Too big: leave two alignments of data, as LVM2 does, if there is room.
            if limit - start > align.saturating_mul(2) {
                let end = limit - 2 * align;
                len = end.checked_next_multiple_of(align).unwrap_or(limit) - start;
            } else {
                len = limit - start;
            }
        }
        areas.push(area("first", start, len)?);
        pe_start = start + len;
    }
    if opts.metadata_copies == 2 {
        let limit = pe_start;
        if limit >= disk {
            return Err(LayoutError::AreaTooSmall {
                which: "second",
                len: 0,
            });
        }
        let mut len = want.min(disk - limit);
        let mut start = disk - len;
        let adj = start % align;
        if let Some(bigger) = len.checked_add(adj) {
            if adj != 0 && bigger < disk && disk - bigger >= limit {
                len = bigger;
                start = disk - len;
            }
        }
        areas.push(area("second", start, len)?);
    }
    if pe_start >= disk {
        return Err(LayoutError::NoRoomForData {
            pe_start,
            size: disk,
        });
    }
    Ok(PvLayout {
        metadata_areas: areas,
        pe_start: Bytes(pe_start),
    })
}

/// Formats `dev` as an orphan PV (in no VG) as `pvcreate` does: zeroes the label sectors,
/// wipes the start of each metadata area and writes its empty header, then writes the label
/// last, so an interrupted run leaves no PV behind. Returns the label written.
pub fn pvcreate(dev: &dyn BlockDevice, opts: &PvCreateOptions) -> Result<Label, Error> {
    let size = dev.size();
    let lay = layout(size, opts)?;
    let label = Label {
        sector: opts.label_sector,
        pv_uuid: opts.uuid.unwrap_or_else(Uuid::generate),
        device_size: size,
        data_areas: vec![DiskArea {
            offset: lay.pe_start,
            size: Bytes(0),
        }],
        metadata_areas: lay.metadata_areas.clone(),
        extension: Some(PvExtension {
            version: PV_HEADER_EXTENSION_VSN,
            flags: 0,
            bootloader_areas: Vec::new(),
        }),
    };
    // Checked before anything is written.
    label.to_sector().map_err(|problem| label::LabelError {
        device: dev.name(),
        field: "label".into(),
        offset: opts.label_sector.saturating_mul(512),
        problem,
    })?;
    io::write_at(dev, 0, &[0u8; LABEL_SCAN_SIZE as usize], false)?;
    for area in &lay.metadata_areas {
        io::write_at(dev, area.offset.0, &[0u8; MDA_WIPE as usize], false)?;
        mda::write_header(dev, &MdaHeader::new(area), false)?;
    }
    io::flush(dev)?;
    label::write(dev, &label)?;
    Ok(label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_layout_puts_pe_start_at_1mib() {
        let l = layout(Bytes(64 << 20), &PvCreateOptions::default()).unwrap();
        assert_eq!(l.pe_start, Bytes(1 << 20));
        assert_eq!(
            l.metadata_areas,
            vec![DiskArea {
                offset: Bytes(4096),
                size: Bytes(1044480)
            }]
        );
    }

    #[test]
    fn bigger_metadata_rounds_pe_start_up() {
        let opts = PvCreateOptions {
            metadata_size: Sectors(4096),
            ..PvCreateOptions::default()
        };
        let l = layout(Bytes(64 << 20), &opts).unwrap();
        assert_eq!(l.pe_start, Bytes(3 << 20));
        assert_eq!(l.metadata_areas[0].size, Bytes((3 << 20) - 4096));
    }

    #[test]
    fn second_copy_at_the_end() {
        let opts = PvCreateOptions {
            metadata_copies: 2,
            ..PvCreateOptions::default()
        };
        let l = layout(Bytes(64 << 20), &opts).unwrap();
        assert_eq!(
            l.metadata_areas[1],
            DiskArea {
                offset: Bytes(63 << 20),
                size: Bytes(1 << 20)
            }
        );
    }

    #[test]
    fn huge_sizes_do_not_overflow() {
        // Metadata asked as large as a 2^64-byte device, with alignments of 2^62 and 2^63
        // bytes: the sizing sums and the doubled alignment would overflow 64 bits.
        for (shift, copies) in [(53, 1), (54, 1), (53, 2)] {
            let opts = PvCreateOptions {
                metadata_size: Sectors(u64::MAX / 512),
                data_alignment: Sectors(1 << shift),
                metadata_copies: copies,
                ..PvCreateOptions::default()
            };
            match layout(Bytes(u64::MAX), &opts) {
                Ok(l) => assert!(l.pe_start.0.is_multiple_of(512 << shift)),
                // 2^63: no room for two alignments of data, as for LVM2.
                Err(e) => assert_eq!(shift, 54, "{e}"),
            }
        }
    }

    #[test]
    fn tiny_devices_are_refused() {
        assert!(layout(Bytes(1 << 20), &PvCreateOptions::default()).is_err());
    }
}
