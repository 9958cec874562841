//! The PV label (`lib/label/label.c`, `lib/format_text/text_label.c`, `layout.h`).
//!
//! One of the first four 512-byte sectors of a PV (sector 1 by default) holds, little-endian:
//!
//! ```text
//! label_header   0  "LABELONE"
//!                8  u64 sector number of this label (must match where it is found)
//!               16  u32 crc of bytes 20..512 of the sector
//!               20  u32 offset of the contents from the start of the sector (32)
//!               24  "LVM2 001"
//! pv_header     32  32 bytes PV uuid (no dashes)
//!               64  u64 device size in bytes
//!               72  disk_locn { u64 offset, u64 size } data areas, ended by offset 0
//!                   disk_locn metadata areas, ended by offset 0
//! extension         u32 version (2), u32 flags (1 = PV_EXT_USED: the PV is in a VG),
//!                   disk_locn bootloader areas, ended by offset 0
//! ```
//!
//! Everything read is checked against the sector (lists must end inside it) and the device
//! (every area inside it), so a crafted label can only produce an error.

use tables::Bytes;

use crate::crc;
use crate::io::{self, DevIoError};
use crate::le::{u32_at, u64_at};
use crate::uuid::{Uuid, UuidError, ID_LEN};

/// Size of the label sector.
pub const LABEL_SIZE: usize = 512;
/// Sectors scanned for a label (`LABEL_SCAN_SECTORS`).
pub const LABEL_SCAN_SECTORS: u64 = 4;
/// Bytes at the start of a PV scanned for a label and kept free of metadata areas.
pub const LABEL_SCAN_SIZE: u64 = LABEL_SCAN_SECTORS * 512;
/// Magic of a label sector.
pub const LABEL_ID: &[u8; 8] = b"LABELONE";
/// Type of an LVM2 text-format label.
pub const LVM2_LABEL: &[u8; 8] = b"LVM2 001";
/// Version of the PV header extension LVM2 2.03 writes.
pub const PV_HEADER_EXTENSION_VSN: u32 = 2;
/// Extension flag: the PV belongs to a VG (LVM2 sets it at vgcreate / vgextend).
pub const PV_EXT_USED: u32 = 1;

const HEADER_LEN: usize = 32;
const CRC_FROM: usize = 20;
const PV_FIXED_LEN: usize = ID_LEN + 8;
const LOCN_LEN: usize = 16;
const EXT_FIXED_LEN: usize = 8;

/// A `disk_locn`: an area of the PV, in bytes from the start of the device.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct DiskArea {
    /// Start of the area.
    pub offset: Bytes,
    /// Length of the area; for a data area 0 means "to the end of the device".
    pub size: Bytes,
}

/// The PV header extension (version 1: bootloader areas; version 2: the `PV_EXT_USED` flag).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PvExtension {
    /// Extension version ([`PV_HEADER_EXTENSION_VSN`] when LVM2 2.03 writes it).
    pub version: u32,
    /// Flags ([`PV_EXT_USED`]).
    pub flags: u32,
    /// Bootloader areas.
    pub bootloader_areas: Vec<DiskArea>,
}

/// A PV label: where it is, the PV's identity and the areas of the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Label {
    /// Sector the label is in (0 to 3).
    pub sector: u64,
    /// The PV's uuid.
    pub pv_uuid: Uuid,
    /// Device size recorded at `pvcreate` (the VG metadata's `dev_size` overrides it).
    pub device_size: Bytes,
    /// Data areas (LVM2 writes one: its offset is `pe_start`, its size 0).
    pub data_areas: Vec<DiskArea>,
    /// Metadata areas (at most two with LVM2: one after the label, one at the end).
    pub metadata_areas: Vec<DiskArea>,
    /// The extension; `None` for labels written before it existed (version 0).
    pub extension: Option<PvExtension>,
}

/// What is wrong with a label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelProblem {
    /// The stored crc does not match the sector.
    #[error("checksum {stored:#010x} does not match the sector's {computed:#010x}")]
    BadChecksum {
        /// Checksum in the label.
        stored: u32,
        /// Checksum of the sector.
        computed: u32,
    },
    /// A label found in one sector says it belongs in another.
    #[error("records sector {recorded} but is in sector {found}")]
    WrongSector {
        /// Sector number the label records.
        recorded: u64,
        /// Sector it was found in.
        found: u64,
    },
    /// The contents offset does not leave room for the PV header in the sector.
    #[error("contents offset {0} leaves no room for the PV header in a 512-byte sector")]
    BadContentsOffset(u32),
    /// A list of areas does not end inside the sector.
    #[error("list has no terminating zero entry inside the label sector")]
    Unterminated,
    /// The PV uuid is not an LVM uuid.
    #[error("{0}")]
    BadUuid(UuidError),
    /// An area reaches past the end of the device.
    #[error(
        "area at byte {offset} of {size} bytes does not fit in the device ({device_size} bytes)"
    )]
    OutsideDevice {
        /// Area start.
        offset: u64,
        /// Area length.
        size: u64,
        /// Device size.
        device_size: u64,
    },
    /// A metadata area overlaps the label sectors or another metadata area, or is not whole
    /// sectors, or cannot hold its header and any text.
    #[error("metadata area at byte {offset} of {size} bytes: {why}")]
    BadMetadataArea {
        /// Area start.
        offset: u64,
        /// Area length.
        size: u64,
        /// What is wrong.
        why: &'static str,
    },
    /// Not a label this crate can write (too many areas, a zero offset in a list).
    #[error("{0}")]
    Unwritable(String),
}

/// A label that cannot be read or written, naming the device, the field and its byte offset
/// on the device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{device}: PV label {field} at byte {offset}: {problem}")]
pub struct LabelError {
    /// Device name.
    pub device: String,
    /// The field (`crc`, `sector`, `pv_uuid`, `data area 1`, `metadata area 2`, ...).
    pub field: String,
    /// Byte offset of the field on the device.
    pub offset: u64,
    /// What is wrong.
    pub problem: LabelProblem,
}

/// Reading a label failed: the device, or the label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FindLabelError {
    /// The device could not be read.
    #[error(transparent)]
    Io(#[from] DevIoError),
    /// A label is there but damaged.
    #[error(transparent)]
    Label(#[from] LabelError),
}

/// The crc a label sector must carry (over bytes 20..512).
fn sector_crc(sector: &[u8; LABEL_SIZE]) -> u32 {
    crc::crc(&sector[CRC_FROM..])
}

/// Reads a zero-terminated `disk_locn` list starting at `at` in the sector; returns the areas
/// and the position after the terminator.
fn read_list(
    sector: &[u8; LABEL_SIZE],
    mut at: usize,
    err: &dyn Fn(usize, LabelProblem) -> LabelError,
) -> Result<(Vec<DiskArea>, usize), LabelError> {
    let mut out = Vec::new();
    loop {
        if at + LOCN_LEN > LABEL_SIZE {
            return Err(err(at, LabelProblem::Unterminated));
        }
        let offset = u64_at(sector, at);
        let size = u64_at(sector, at + 8);
        at += LOCN_LEN;
        // LVM2 ends a list at the first zero offset, whatever the size says.
        if offset == 0 {
            return Ok((out, at));
        }
        out.push(DiskArea {
            offset: Bytes(offset),
            size: Bytes(size),
        });
    }
}

impl Label {
    /// Parses the label in `sector`, found in sector number `found_in` of a device of
    /// `device_size` bytes named `device`. Returns `Ok(None)` when the sector holds no label
    /// (no `LABELONE`, or a label of another type).
    pub fn from_sector(
        sector: &[u8; LABEL_SIZE],
        found_in: u64,
        device_size: Bytes,
        device: &str,
    ) -> Result<Option<Label>, LabelError> {
        if &sector[..8] != LABEL_ID {
            return Ok(None);
        }
        let base = found_in.saturating_mul(LABEL_SIZE as u64);
        let err = |at: usize, field: &str, problem| LabelError {
            device: device.to_string(),
            field: field.to_string(),
            offset: base.saturating_add(at as u64),
            problem,
        };
        let recorded = u64_at(sector, 8);
        if recorded != found_in {
            return Err(err(
                8,
                "sector",
                LabelProblem::WrongSector {
                    recorded,
                    found: found_in,
                },
            ));
        }
        let stored = u32_at(sector, 16);
        let computed = sector_crc(sector);
        if stored != computed {
            return Err(err(
                16,
                "crc",
                LabelProblem::BadChecksum { stored, computed },
            ));
        }
        if &sector[24..32] != LVM2_LABEL {
            return Ok(None);
        }
        let contents = u32_at(sector, 20);
        let pv = match usize::try_from(contents) {
            Ok(c) if (HEADER_LEN..=LABEL_SIZE - PV_FIXED_LEN).contains(&c) => c,
            _ => {
                return Err(err(
                    20,
                    "contents offset",
                    LabelProblem::BadContentsOffset(contents),
                ))
            }
        };
        let mut raw = [0u8; ID_LEN];
        raw.copy_from_slice(&sector[pv..pv + ID_LEN]);
        let pv_uuid =
            Uuid::from_raw(&raw).map_err(|e| err(pv, "pv_uuid", LabelProblem::BadUuid(e)))?;
        let recorded_size = Bytes(u64_at(sector, pv + ID_LEN));

        let list_err = |name: &'static str| move |at: usize, p: LabelProblem| err(at, name, p);
        let (data_areas, at) = read_list(sector, pv + PV_FIXED_LEN, &list_err("data area list"))?;
        let mda_start = at;
        let (metadata_areas, at) = read_list(sector, at, &list_err("metadata area list"))?;
        let extension = if at + EXT_FIXED_LEN > LABEL_SIZE || u32_at(sector, at) == 0 {
            // Labels from before the extension have zeros here.
            None
        } else {
            let (bootloader_areas, _) = read_list(
                sector,
                at + EXT_FIXED_LEN,
                &list_err("bootloader area list"),
            )?;
            Some(PvExtension {
                version: u32_at(sector, at),
                flags: u32_at(sector, at + 4),
                bootloader_areas,
            })
        };
        let label = Label {
            sector: found_in,
            pv_uuid,
            device_size: recorded_size,
            data_areas,
            metadata_areas,
            extension,
        };
        label.check_areas(device_size).map_err(|(field, idx, p)| {
            // Point at the entry in the sector.
            let at = match field {
                "data area" => pv + PV_FIXED_LEN + idx * LOCN_LEN,
                "metadata area" => mda_start + idx * LOCN_LEN,
                _ => at + EXT_FIXED_LEN + idx * LOCN_LEN,
            };
            err(at, &format!("{field} {}", idx + 1), p)
        })?;
        Ok(Some(label))
    }

    /// Checks every area against a device of `device_size` bytes and the metadata areas
    /// against the label sectors and each other. The error names the list, the index in it
    /// and the problem.
    fn check_areas(&self, device_size: Bytes) -> Result<(), (&'static str, usize, LabelProblem)> {
        let outside = |a: &DiskArea| LabelProblem::OutsideDevice {
            offset: a.offset.0,
            size: a.size.0,
            device_size: device_size.0,
        };
        let fits = |a: &DiskArea| {
            a.offset
                .checked_add(a.size)
                .is_some_and(|end| end <= device_size)
        };
        for (i, a) in self.data_areas.iter().enumerate() {
            if !fits(a) {
                return Err(("data area", i, outside(a)));
            }
        }
        if let Some(ext) = &self.extension {
            for (i, a) in ext.bootloader_areas.iter().enumerate() {
                if !fits(a) {
                    return Err(("bootloader area", i, outside(a)));
                }
            }
        }
        for (i, a) in self.metadata_areas.iter().enumerate() {
            let bad = |why| LabelProblem::BadMetadataArea {
                offset: a.offset.0,
                size: a.size.0,
                why,
            };
            if !fits(a) {
                return Err(("metadata area", i, outside(a)));
            }
            if !a.offset.is_sector_aligned() || !a.size.is_sector_aligned() {
                return Err(("metadata area", i, bad("not whole sectors")));
            }
            if a.offset.0 < LABEL_SCAN_SIZE {
                return Err(("metadata area", i, bad("overlaps the label sectors")));
            }
            if a.size.0 < 2 * crate::mda::MDA_HEADER_SIZE as u64 {
                return Err(("metadata area", i, bad("too small for a header and text")));
            }
            for b in &self.metadata_areas[..i] {
                // Both ends fit in the device (checked above), so the sums do not overflow.
                if a.offset < b.offset + b.size && b.offset < a.offset + a.size {
                    return Err(("metadata area", i, bad("overlaps another metadata area")));
                }
            }
        }
        Ok(())
    }

    /// The label sector LVM2 would write for this label (crc computed). Fails if the lists
    /// do not fit in the sector or an area has offset 0 (it would end its list).
    pub fn to_sector(&self) -> Result<[u8; LABEL_SIZE], LabelProblem> {
        let mut s = [0u8; LABEL_SIZE];
        if self.sector >= LABEL_SCAN_SECTORS {
            return Err(LabelProblem::Unwritable(format!(
                "label sector {} is not one of the first {LABEL_SCAN_SECTORS}",
                self.sector
            )));
        }
        let bas: &[DiskArea] = self
            .extension
            .as_ref()
            .map_or(&[], |e| e.bootloader_areas.as_slice());
        let need = HEADER_LEN
            + PV_FIXED_LEN
            + LOCN_LEN * (self.data_areas.len() + self.metadata_areas.len() + bas.len() + 3)
            + EXT_FIXED_LEN;
        if need > LABEL_SIZE {
            return Err(LabelProblem::Unwritable(format!(
                "{} areas do not fit in the label sector",
                self.data_areas.len() + self.metadata_areas.len() + bas.len()
            )));
        }
        let all = self
            .data_areas
            .iter()
            .chain(&self.metadata_areas)
            .chain(bas);
        if all.clone().any(|a| a.offset.0 == 0) {
            return Err(LabelProblem::Unwritable(
                "an area at offset 0 cannot be written (0 ends the list)".into(),
            ));
        }
        s[..8].copy_from_slice(LABEL_ID);
        s[8..16].copy_from_slice(&self.sector.to_le_bytes());
        s[20..24].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        s[24..32].copy_from_slice(LVM2_LABEL);
        let mut at = HEADER_LEN;
        s[at..at + ID_LEN].copy_from_slice(self.pv_uuid.as_raw());
        at += ID_LEN;
        s[at..at + 8].copy_from_slice(&self.device_size.0.to_le_bytes());
        at += 8;
        fn put_list(s: &mut [u8; LABEL_SIZE], at: &mut usize, list: &[DiskArea]) {
            for a in list {
                s[*at..*at + 8].copy_from_slice(&a.offset.0.to_le_bytes());
                s[*at + 8..*at + 16].copy_from_slice(&a.size.0.to_le_bytes());
                *at += LOCN_LEN;
            }
            // The terminator is the zeroed entry that follows.
            *at += LOCN_LEN;
        }
        put_list(&mut s, &mut at, &self.data_areas);
        put_list(&mut s, &mut at, &self.metadata_areas);
        if let Some(ext) = &self.extension {
            s[at..at + 4].copy_from_slice(&ext.version.to_le_bytes());
            s[at + 4..at + 8].copy_from_slice(&ext.flags.to_le_bytes());
            at += EXT_FIXED_LEN;
            put_list(&mut s, &mut at, &ext.bootloader_areas);
        }
        let c = sector_crc(&s);
        s[16..20].copy_from_slice(&c.to_le_bytes());
        Ok(s)
    }

    /// `pe_start`: the start of the first data area.
    pub fn pe_start(&self) -> Option<Bytes> {
        self.data_areas.first().map(|a| a.offset)
    }

    /// Whether the extension marks the PV as part of a VG.
    pub fn in_use(&self) -> bool {
        self.extension
            .as_ref()
            .is_some_and(|e| e.flags & PV_EXT_USED != 0)
    }
}

/// Looks for a label in the first four sectors of `dev`, as LVM2's scan does: the first
/// valid one wins. A sector with `LABELONE` that fails its checks is an error (LVM2 would
/// skip it and call the device "not a PV"; we say why). A device too small to hold the label
/// sectors has none.
pub fn find(dev: &dyn tables::BlockDevice) -> Result<Option<Label>, FindLabelError> {
    let size = dev.size();
    if size.0 < LABEL_SCAN_SIZE {
        return Ok(None);
    }
    let buf = io::read_vec(dev, 0, LABEL_SCAN_SIZE as usize)?;
    let name = dev.name();
    let mut first_err = None;
    for (n, chunk) in buf.chunks_exact(LABEL_SIZE).enumerate() {
        let mut sector = [0u8; LABEL_SIZE];
        sector.copy_from_slice(chunk);
        match Label::from_sector(&sector, n as u64, size, &name) {
            Ok(Some(l)) => return Ok(Some(l)),
            Ok(None) => {}
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) => Err(e.into()),
        None => Ok(None),
    }
}

/// Writes `label` to its sector of `dev`, durably (FUA), and nothing else: the other sectors
/// at the start of the device (a boot sector, say) stay as they are, as with LVM2's
/// `label_write`. [`crate::pvcreate`] clears the four label sectors first, so no older label
/// can come before the new one.
pub fn write(dev: &dyn tables::BlockDevice, label: &Label) -> Result<(), crate::Error> {
    let sector = label.to_sector().map_err(|problem| LabelError {
        device: dev.name(),
        field: "label".into(),
        offset: label.sector.saturating_mul(LABEL_SIZE as u64),
        problem,
    })?;
    // `to_sector` checked the sector number (0 to 3).
    io::write_at(dev, label.sector * LABEL_SIZE as u64, &sector, true)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LVM2_SECTOR: &[u8; 512] = include_bytes!("../tests/data/lvm2-label-sector1.bin");

    #[test]
    fn reads_the_label_lvm2_wrote() {
        let l = Label::from_sector(LVM2_SECTOR, 1, Bytes(64 << 20), "loop0")
            .unwrap()
            .unwrap();
        assert_eq!(
            l.pv_uuid.to_string(),
            "EE9ZRo-kwyG-TfYg-k3k5-wEop-aXOJ-yoS7be"
        );
        assert_eq!(l.device_size, Bytes(64 << 20));
        assert_eq!(
            l.data_areas,
            vec![DiskArea {
                offset: Bytes(1 << 20),
                size: Bytes(0)
            }]
        );
        assert_eq!(
            l.metadata_areas,
            vec![DiskArea {
                offset: Bytes(4096),
                size: Bytes(1044480)
            }]
        );
        assert_eq!(
            l.extension,
            Some(PvExtension {
                version: 2,
                flags: PV_EXT_USED,
                bootloader_areas: vec![]
            })
        );
        // Our writer produces the same bytes, crc included.
        assert_eq!(&l.to_sector().unwrap(), LVM2_SECTOR);
    }

    #[test]
    fn writing_a_label_touches_only_its_sector() {
        // Sector 0 may hold a boot sector: a label update (vgcreate marking the PV used)
        // must leave it, like LVM2's label_write, which writes the label sector alone.
        let dev = tables::mem::MemDevice::new("d", Bytes(1 << 20));
        dev.fill(0, &[0xaa; LABEL_SCAN_SIZE as usize]);
        let mut l = Label::from_sector(LVM2_SECTOR, 1, Bytes(64 << 20), "d")
            .unwrap()
            .unwrap();
        l.metadata_areas.clear();
        l.data_areas[0].offset = Bytes(4096);
        write(&dev, &l).unwrap();
        let after = dev.snapshot(0, LABEL_SCAN_SIZE as usize);
        assert!(after[..512].iter().all(|&b| b == 0xaa));
        assert!(after[1024..].iter().all(|&b| b == 0xaa));
        assert_eq!(find(&dev).unwrap(), Some(l));
    }

    #[test]
    fn lvm2s_crc_is_ours() {
        assert_eq!(sector_crc(LVM2_SECTOR), u32_at(LVM2_SECTOR, 16));
    }

    #[test]
    fn wrong_sector_and_bad_crc_are_named() {
        let e = Label::from_sector(LVM2_SECTOR, 2, Bytes(64 << 20), "loop0").unwrap_err();
        assert_eq!(e.field, "sector");
        assert_eq!(e.offset, 1024 + 8);
        let mut s = *LVM2_SECTOR;
        s[100] ^= 1;
        let e = Label::from_sector(&s, 1, Bytes(64 << 20), "loop0").unwrap_err();
        assert_eq!(e.field, "crc");
        assert_eq!(e.offset, 512 + 16);
        assert!(e.to_string().contains("loop0"), "{e}");
    }

    #[test]
    fn any_sector_number_is_safe() {
        // A caller's sector number (found_in) is not trusted either: the offsets in errors
        // saturate instead of overflowing.
        let e = Label::from_sector(LVM2_SECTOR, u64::MAX, Bytes(64 << 20), "d").unwrap_err();
        assert!(matches!(e.problem, LabelProblem::WrongSector { .. }), "{e}");
        assert_eq!(e.offset, u64::MAX);
    }

    #[test]
    fn areas_outside_a_smaller_device_are_refused() {
        let e = Label::from_sector(LVM2_SECTOR, 1, Bytes(512 << 10), "loop0").unwrap_err();
        assert!(
            matches!(e.problem, LabelProblem::OutsideDevice { .. }),
            "{e}"
        );
        assert_eq!(e.field, "data area 1");
        assert_eq!(e.offset, 512 + 72);
    }
}
