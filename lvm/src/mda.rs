//! A metadata area (`lib/format_text/format-text.c`, `layout.h`): a 512-byte header, then a
//! ring buffer of metadata text.
//!
//! ```text
//! mda_header   0  u32 crc of bytes 4..512
//!              4  16 bytes magic " LVM2 x[5A%r0N*>"
//!             20  u32 version (1)
//!             24  u64 start: byte offset of this header on the device
//!             32  u64 size of the whole area (header included)
//!             40  raw_locn slot 0 { u64 offset, u64 size, u32 crc, u32 flags }: committed
//!             64  raw_locn slot 1: precommitted (new text written, not yet committed)
//! ```
//!
//! `raw_locn.offset` is relative to the header; the ring is `[512, size)`. A copy of the text
//! that runs past the end continues at 512 ("wraps"). The size counts the text's trailing NUL
//! and the crc covers exactly `size` bytes (both pieces, chained).
//!
//! LVM2 updates in two phases, which [`crate::commit`] follows on every PV: write the new text
//! after the current one (never over it), then rewrite the header: slot 1 first
//! (precommit), then slot 0 (commit). Until slot 0 is rewritten, readers see the old text.

use tables::{BlockDevice, Bytes};

use crate::crc;
use crate::io::{self, DevIoError};
use crate::label::DiskArea;
use crate::le::{u32_at, u64_at};

/// Size of the header sector.
pub const MDA_HEADER_SIZE: usize = 512;
/// Magic of a metadata area header (`FMTT_MAGIC`).
pub const FMTT_MAGIC: &[u8; 16] = b" LVM2 x[5A%r0N*>";
/// Header version (`FMTT_VERSION`).
pub const FMTT_VERSION: u32 = 1;
/// Slot-0 flag: this area is not used for metadata (`pvchange --metadataignore y`).
pub const RAW_LOCN_IGNORED: u32 = 1;
/// Alignment of each copy of the text in the ring.
const TEXT_ALIGN: u64 = 512;
/// The largest text this crate reads or writes. LVM2 passes text sizes as 32-bit values and
/// its default area holds under 0.5 MiB of text; a header claiming more than this is refused
/// rather than allocated.
pub const MAX_TEXT: u64 = 64 << 20;

const HDR: u64 = MDA_HEADER_SIZE as u64;
const SLOT0: usize = 40;
const SLOT_LEN: usize = 24;

/// A `raw_locn`: where one copy of the text is, relative to the header.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct RawLocn {
    /// Start of the text, bytes from the start of the area.
    pub offset: u64,
    /// Length of the text including its NUL.
    pub size: u64,
    /// LVM2 crc of the text.
    pub checksum: u32,
    /// Flags ([`RAW_LOCN_IGNORED`] in slot 0).
    pub flags: u32,
}

impl RawLocn {
    /// Whether the slot points at no text.
    pub fn is_empty(&self) -> bool {
        self.offset == 0 && self.size == 0
    }
}

/// A metadata area header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MdaHeader {
    /// Byte offset of the header on the device.
    pub start: Bytes,
    /// Size of the area, header included.
    pub size: Bytes,
    /// Slot 0: the committed text.
    pub committed: RawLocn,
    /// Slot 1: the precommitted text (only between the two phases of an update).
    pub precommitted: RawLocn,
}

/// What is wrong in a metadata area.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MdaProblem {
    /// The header's crc does not match.
    #[error("header checksum {stored:#010x} does not match the header's {computed:#010x}")]
    BadHeaderChecksum {
        /// Stored crc.
        stored: u32,
        /// Computed crc.
        computed: u32,
    },
    /// Not a metadata area header.
    #[error("wrong magic (not an LVM2 metadata area header)")]
    BadMagic,
    /// Unknown version.
    #[error("version {0}, only 1 exists")]
    BadVersion(u32),
    /// The header says it is somewhere else.
    #[error("records start {recorded}, but the label puts it at {expected}")]
    WrongStart {
        /// Start in the header.
        recorded: u64,
        /// Start from the label.
        expected: u64,
    },
    /// The header's area size disagrees with the label's.
    #[error("records area size {recorded}, but the label says {expected}")]
    WrongSize {
        /// Size in the header.
        recorded: u64,
        /// Size from the label.
        expected: u64,
    },
    /// A slot points outside the ring or holds more than it can.
    #[error("text at {offset} of {size} bytes does not fit a ring of {ring} bytes at 512")]
    BadLocation {
        /// Slot offset.
        offset: u64,
        /// Slot size.
        size: u64,
        /// Ring size (area size less the header).
        ring: u64,
    },
    /// A slot claims more text than this reader accepts.
    #[error("text of {0} bytes is larger than {MAX_TEXT} bytes")]
    TooLarge(u64),
    /// The text's crc does not match the slot's.
    #[error("text checksum {computed:#010x} does not match the header's {stored:#010x}")]
    BadTextChecksum {
        /// Crc in the slot.
        stored: u32,
        /// Crc of the text read.
        computed: u32,
    },
    /// New text does not fit next to the current copy.
    #[error("new metadata of {size} bytes exceeds the maximum {max} bytes for this area")]
    NoSpace {
        /// New text size.
        size: u64,
        /// Largest copy the area takes (half its ring, less one sector).
        max: u64,
    },
}

/// A metadata area problem, naming the device, the field and its byte offset on the device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{device}: metadata area at byte {area}: {field} at byte {offset}: {problem}")]
pub struct MdaError {
    /// Device name.
    pub device: String,
    /// Byte offset of the area on the device.
    pub area: u64,
    /// The field (`checksum`, `magic`, `slot 0`, `text`, ...).
    pub field: &'static str,
    /// Byte offset of the field (or of the text) on the device.
    pub offset: u64,
    /// What is wrong.
    pub problem: MdaProblem,
}

/// Reading or writing a metadata area failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MdaIoError {
    /// The device failed.
    #[error(transparent)]
    Io(#[from] DevIoError),
    /// The area's contents are wrong.
    #[error(transparent)]
    Mda(#[from] MdaError),
}

fn slot_at(b: &[u8], at: usize) -> RawLocn {
    RawLocn {
        offset: u64_at(b, at),
        size: u64_at(b, at + 8),
        checksum: u32_at(b, at + 16),
        flags: u32_at(b, at + 20),
    }
}

fn put_slot(b: &mut [u8], at: usize, l: &RawLocn) {
    b[at..at + 8].copy_from_slice(&l.offset.to_le_bytes());
    b[at + 8..at + 16].copy_from_slice(&l.size.to_le_bytes());
    b[at + 16..at + 20].copy_from_slice(&l.checksum.to_le_bytes());
    b[at + 20..at + 24].copy_from_slice(&l.flags.to_le_bytes());
}

/// The pieces of a copy of text in the ring: `(offset in area, length)`, one or two.
fn pieces(area_size: u64, l: &RawLocn) -> [(u64, u64); 2] {
    // Callers checked `offset < area_size`. Comparing with the room left, rather than
    // computing `offset + size`, cannot overflow even for an area near 2^64 bytes.
    let room = area_size - l.offset;
    if l.size > room {
        [(l.offset, room), (HDR, l.size - room)]
    } else {
        [(l.offset, l.size), (HDR, 0)]
    }
}

impl MdaHeader {
    /// An empty header for a new area (what `pvcreate` writes).
    pub fn new(area: &DiskArea) -> MdaHeader {
        MdaHeader {
            start: area.offset,
            size: area.size,
            committed: RawLocn::default(),
            precommitted: RawLocn::default(),
        }
    }

    /// Whether slot 0 marks the area as ignored.
    pub fn ignored(&self) -> bool {
        self.committed.flags & RAW_LOCN_IGNORED != 0
    }

    /// Ring capacity (area less header).
    fn ring(&self) -> u64 {
        self.size.0.saturating_sub(HDR)
    }

    /// The largest copy of text this area takes (LVM2: half the ring, less one sector, since
    /// two copies must fit and each starts on a sector).
    pub fn max_text(&self) -> u64 {
        (self.ring() / 2).saturating_sub(TEXT_ALIGN)
    }

    /// Parses the header sector of the area `area` of device `device`, checking crc, magic,
    /// version, that it is where the label puts it, and that both slots fit its ring.
    pub fn from_sector(
        b: &[u8; MDA_HEADER_SIZE],
        area: &DiskArea,
        device: &str,
    ) -> Result<MdaHeader, MdaError> {
        let err = |field, at: usize, problem| MdaError {
            device: device.to_string(),
            area: area.offset.0,
            field,
            offset: area.offset.0.saturating_add(at as u64),
            problem,
        };
        let stored = u32_at(b, 0);
        let computed = crc::crc(&b[4..]);
        if stored != computed {
            return Err(err(
                "checksum",
                0,
                MdaProblem::BadHeaderChecksum { stored, computed },
            ));
        }
        if &b[4..20] != FMTT_MAGIC {
            return Err(err("magic", 4, MdaProblem::BadMagic));
        }
        let version = u32_at(b, 20);
        if version != FMTT_VERSION {
            return Err(err("version", 20, MdaProblem::BadVersion(version)));
        }
        let start = u64_at(b, 24);
        if start != area.offset.0 {
            return Err(err(
                "start",
                24,
                MdaProblem::WrongStart {
                    recorded: start,
                    expected: area.offset.0,
                },
            ));
        }
        let size = u64_at(b, 32);
        if size != area.size.0 {
            return Err(err(
                "size",
                32,
                MdaProblem::WrongSize {
                    recorded: size,
                    expected: area.size.0,
                },
            ));
        }
        let h = MdaHeader {
            start: Bytes(start),
            size: Bytes(size),
            committed: slot_at(b, SLOT0),
            precommitted: slot_at(b, SLOT0 + SLOT_LEN),
        };
        for (field, at, slot) in [
            ("slot 0", SLOT0, &h.committed),
            ("slot 1", SLOT0 + SLOT_LEN, &h.precommitted),
        ] {
            h.check_slot(slot).map_err(|p| err(field, at, p))?;
        }
        Ok(h)
    }

    /// A slot is empty, or points at a copy that starts inside the ring (at least a sector
    /// before its end, as LVM2 places them) and is no longer than the ring.
    fn check_slot(&self, l: &RawLocn) -> Result<(), MdaProblem> {
        if l.is_empty() {
            return Ok(());
        }
        let ring = self.ring();
        let bad = MdaProblem::BadLocation {
            offset: l.offset,
            size: l.size,
            ring,
        };
        if l.offset < HDR || l.offset >= self.size.0 || l.size == 0 || l.size > ring {
            return Err(bad);
        }
        if l.size > MAX_TEXT {
            return Err(MdaProblem::TooLarge(l.size));
        }
        Ok(())
    }

    /// The header sector as LVM2 writes it (crc computed).
    pub fn to_sector(&self) -> [u8; MDA_HEADER_SIZE] {
        let mut b = [0u8; MDA_HEADER_SIZE];
        b[4..20].copy_from_slice(FMTT_MAGIC);
        b[20..24].copy_from_slice(&FMTT_VERSION.to_le_bytes());
        b[24..32].copy_from_slice(&self.start.0.to_le_bytes());
        b[32..40].copy_from_slice(&self.size.0.to_le_bytes());
        put_slot(&mut b, SLOT0, &self.committed);
        put_slot(&mut b, SLOT0 + SLOT_LEN, &self.precommitted);
        let c = crc::crc(&b[4..]);
        b[..4].copy_from_slice(&c.to_le_bytes());
        b
    }

    /// Where LVM2 puts the next copy of `size` bytes (`_next_rlocn_offset` and the checks of
    /// `_vg_write_raw`): after the committed copy, rounded up to a sector, or back at 512 when
    /// fewer than 512 bytes would be left before the end; never overlapping the committed copy.
    pub fn next_offset(&self, size: u64) -> Result<u64, MdaProblem> {
        let max = self.max_text();
        if size == 0 || size > max || size > MAX_TEXT {
            return Err(MdaProblem::NoSpace { size, max });
        }
        let area = self.size.0;
        let old = if self.ignored() || self.committed.is_empty() {
            None
        } else {
            Some(self.committed)
        };
        let Some(old) = old else {
            return Ok(HDR);
        };
        self.check_slot(&old)?;
        // Checked slot: offset in [512, area), size <= ring, so no overflow below.
        let [(_, first), (_, wrap)] = pieces(area, &old);
        let old_last = if wrap > 0 {
            HDR + wrap - 1
        } else {
            old.offset + first - 1
        };
        let new_start = if area - old_last < TEXT_ALIGN {
            HDR
        } else {
            // old_last < area, so +1 does not overflow; rounding up might, near 2^64.
            let s = (old_last + 1)
                .checked_next_multiple_of(TEXT_ALIGN)
                .unwrap_or(u64::MAX);
            if s > area - TEXT_ALIGN {
                HDR
            } else {
                s
            }
        };
        // LVM2's overlap check; with `size <= max` it cannot trigger, but it is what keeps
        // the committed copy intact, so keep it. (LVM2 compares a copy's first and last byte
        // with `<`, which also refuses 1-byte copies; real texts are far larger, so `<=`.)
        let new = RawLocn {
            offset: new_start,
            size,
            ..RawLocn::default()
        };
        let [(ns, nf), (_, nw)] = pieces(area, &new);
        let new_last = if nw > 0 { HDR + nw - 1 } else { ns + nf - 1 };
        let old_start = old.offset;
        let ok = match (wrap > 0, nw > 0) {
            (true, true) => false,
            (false, false) => {
                (new_start > old_last && new_last >= new_start)
                    || (new_start < old_start && new_last < old_start)
            }
            (true, false) => old_last < new_start && new_start <= new_last && new_last < old_start,
            (false, true) => new_last < old_start && old_start <= old_last && old_last < new_start,
        };
        if !ok {
            return Err(MdaProblem::NoSpace { size, max });
        }
        Ok(new_start)
    }
}

/// Reads and checks the header of the metadata area `area` on `dev`.
pub fn read_header(dev: &dyn BlockDevice, area: &DiskArea) -> Result<MdaHeader, MdaIoError> {
    let mut b = [0u8; MDA_HEADER_SIZE];
    io::read_at(dev, area.offset.0, &mut b)?;
    Ok(MdaHeader::from_sector(&b, area, &dev.name())?)
}

/// Writes `hdr` to its place on `dev`; with `fua` it is durable on return.
pub fn write_header(dev: &dyn BlockDevice, hdr: &MdaHeader, fua: bool) -> Result<(), DevIoError> {
    io::write_at(dev, hdr.start.0, &hdr.to_sector(), fua)
}

/// Reads the copy of text `locn` points at (both pieces if it wraps) and checks its crc.
/// Returns the bytes, trailing NUL included.
pub fn read_text(
    dev: &dyn BlockDevice,
    hdr: &MdaHeader,
    locn: &RawLocn,
) -> Result<Vec<u8>, MdaIoError> {
    let err = |problem| MdaError {
        device: dev.name(),
        area: hdr.start.0,
        field: "text",
        offset: hdr.start.0.saturating_add(locn.offset),
        problem,
    };
    hdr.check_slot(locn).map_err(err)?;
    let mut text = Vec::new();
    for (off, len) in pieces(hdr.size.0, locn) {
        if len == 0 {
            continue;
        }
        // `check_slot` bounded `len` by MAX_TEXT.
        let mut part = io::read_vec(dev, hdr.start.0.saturating_add(off), len as usize)?;
        text.append(&mut part);
    }
    let computed = crc::crc(&text);
    if computed != locn.checksum {
        return Err(err(MdaProblem::BadTextChecksum {
            stored: locn.checksum,
            computed,
        })
        .into());
    }
    Ok(text)
}

/// Writes `text` (which should end with its NUL, as LVM2's does) into the ring where LVM2
/// would put the next copy, zero-padding the last piece to a sector as LVM2 does, without
/// flushing. Returns the slot that points at it; nothing refers to it until a header does.
pub fn write_text(
    dev: &dyn BlockDevice,
    hdr: &MdaHeader,
    text: &[u8],
) -> Result<RawLocn, MdaIoError> {
    let size = text.len() as u64;
    let offset = hdr.next_offset(size).map_err(|problem| MdaError {
        device: dev.name(),
        area: hdr.start.0,
        field: "text",
        offset: hdr.start.0,
        problem,
    })?;
    let locn = RawLocn {
        offset,
        size,
        checksum: crc::crc(text),
        flags: 0,
    };
    let mut at = 0usize;
    for (off, len) in pieces(hdr.size.0, &locn) {
        if len == 0 {
            continue;
        }
        // `next_offset` bounded the size by MAX_TEXT.
        let len = len as usize;
        let mut buf = text[at..at + len].to_vec();
        // Pad to the sector, as LVM2 does: it zeroes the gap before the next copy. A first
        // piece of a wrapped copy ends at the area's end, already on a sector.
        buf.resize(len.next_multiple_of(TEXT_ALIGN as usize), 0);
        io::write_at(dev, hdr.start.0.saturating_add(off), &buf, false)?;
        at += len;
    }
    Ok(locn)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LVM2_HEADER: &[u8; 512] = include_bytes!("../tests/data/lvm2-mda-header.bin");
    const LVM2_TEXT: &[u8] = include_bytes!("../tests/data/lvm2-metadata-seqno3.bin");

    fn area() -> DiskArea {
        DiskArea {
            offset: Bytes(4096),
            size: Bytes(1044480),
        }
    }

    #[test]
    fn reads_the_header_lvm2_wrote() {
        let h = MdaHeader::from_sector(LVM2_HEADER, &area(), "loop0").unwrap();
        assert_eq!(h.committed.offset, 3072);
        assert_eq!(h.committed.size, 1504);
        assert_eq!(h.committed.size as usize, LVM2_TEXT.len());
        assert!(h.precommitted.is_empty());
        // The text checksum LVM2 stored is ours of the text it wrote (NUL included).
        assert_eq!(crc::crc(LVM2_TEXT), h.committed.checksum);
        assert_eq!(LVM2_TEXT.last(), Some(&0));
        assert_eq!(&h.to_sector(), LVM2_HEADER);
    }

    #[test]
    fn header_problems_are_named() {
        let mut b = *LVM2_HEADER;
        b[100] = 1;
        let e = MdaHeader::from_sector(&b, &area(), "loop0").unwrap_err();
        assert_eq!(e.field, "checksum");
        assert_eq!(e.offset, 4096);
        let other = DiskArea {
            offset: Bytes(8192),
            ..area()
        };
        let e = MdaHeader::from_sector(LVM2_HEADER, &other, "loop0").unwrap_err();
        assert_eq!(e.field, "start");
        assert_eq!(e.offset, 8192 + 24);
    }

    fn locn(offset: u64, size: u64) -> RawLocn {
        RawLocn {
            offset,
            size,
            ..RawLocn::default()
        }
    }

    #[test]
    fn one_byte_copies_are_not_overlaps() {
        // LVM2's strict comparisons call a 1-byte copy an overlap with anything.
        let mut h = MdaHeader::new(&DiskArea {
            offset: Bytes(4096),
            size: Bytes(21 * 512),
        });
        h.committed = locn(512, 1);
        assert_eq!(h.next_offset(1), Ok(1024));
        h.committed = locn(7680, 1);
        assert_eq!(h.next_offset(2561), Ok(8192));
        h.committed = locn(10240, 600);
        assert_eq!(h.next_offset(1), Ok(1024));
    }

    #[test]
    fn next_offset_follows_lvm2() {
        let mut h = MdaHeader::new(&DiskArea {
            offset: Bytes(4096),
            size: Bytes(8192),
        });
        // Empty: right after the header.
        assert_eq!(h.next_offset(100), Ok(512));
        // max = (8192-512)/2 - 512 = 3328.
        assert_eq!(h.max_text(), 3328);
        assert!(h.next_offset(3329).is_err());
        h.committed = locn(512, 1000);
        assert_eq!(h.next_offset(100), Ok(1536));
        // A copy ending within 512 bytes of the end sends the next one back to 512.
        h.committed = locn(6144, 600);
        assert_eq!(h.next_offset(100), Ok(7168));
        h.committed.size = 1100;
        assert_eq!(h.next_offset(100), Ok(7680));
        h.committed.size = 1600;
        assert_eq!(h.next_offset(100), Ok(512));
        // A wrapped committed copy: the next starts after its tail.
        h.committed = locn(7680, 1000);
        assert_eq!(h.next_offset(100), Ok(1024));
    }
}
