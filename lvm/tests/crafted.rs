//! Damaged PVs, with checksums recomputed where the damage should get past them: every label
//! field, every metadata area header field, the text, and VG-level inconsistencies. The scan
//! must report each with the device, the field and the byte offset, never panic, never read
//! outside a device, and never make a large allocation (a counting allocator watches the scan
//! thread). Random damage (proptest) must do no worse.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

use lvm::commit::{self, CommitError};
use lvm::crc::crc;
use lvm::label::{LabelProblem, LABEL_SIZE};
use lvm::mda::{MdaHeader, MdaProblem, MDA_HEADER_SIZE};
use lvm::model::Metadata;
use lvm::scan::{self, Problem, ScanReport};
use proptest::prelude::*;
use tables::mem::MemDevice;
use tables::{Bytes, DeviceRef, Sectors};

mod common;
use common::{linear_lv, mem_pvs, new_vg, pv_entry};

/// Largest single allocation the scan may make: the devices are 8 MiB and a metadata area
/// 1 MiB, so anything near this means a size came from disk unchecked.
const ALLOC_LIMIT: usize = 4 << 20;

struct Counting;

thread_local! {
    static WATCH: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards every call to the system allocator unchanged; the bookkeeping touches only
// const-initialised thread locals, which do not allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if WATCH.with(|w| w.get()) {
            LARGEST.with(|m| m.set(m.get().max(l.size())));
        }
        // SAFETY: same layout, same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if WATCH.with(|w| w.get()) {
            LARGEST.with(|m| m.set(m.get().max(l.size())));
        }
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: `p` came from this allocator, i.e. from System, with layout `l`.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if WATCH.with(|w| w.get()) {
            LARGEST.with(|m| m.set(m.get().max(new)));
        }
        // SAFETY: as above.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const MIB: u64 = 1 << 20;
const LABEL_AT: u64 = 512;
const MDA_AT: u64 = 4096;
const EXTENT: Sectors = Sectors(8192);

/// PVs on MemDevices holding one VG (two LVs) at seqno 2.
struct Rig {
    mem: Vec<Arc<MemDevice>>,
}

impl Rig {
    fn devs(&self) -> Vec<DeviceRef> {
        self.mem.iter().map(|m| m.clone() as DeviceRef).collect()
    }

    /// Scans under the allocation watch, and checks what every scan must: no read outside a
    /// device, no large allocation.
    fn scan(&self) -> ScanReport {
        LARGEST.with(|m| m.set(0));
        WATCH.with(|w| w.set(true));
        let r = scan::scan(&self.devs());
        WATCH.with(|w| w.set(false));
        let largest = LARGEST.with(|m| m.get());
        assert!(
            largest <= ALLOC_LIMIT,
            "the scan allocated {largest} bytes at once"
        );
        for p in &r.problems {
            assert!(!matches!(p, Problem::Unreadable(_)), "read failed: {p}");
        }
        r
    }

    fn sector(&self, d: usize, at: u64) -> [u8; 512] {
        let mut b = [0u8; 512];
        b.copy_from_slice(&self.mem[d].snapshot(at, 512));
        b
    }

    /// Changes the label sector of device `d`; with `fix`, the crc is recomputed.
    fn label(&self, d: usize, fix: bool, f: impl FnOnce(&mut [u8; LABEL_SIZE])) {
        let mut b = self.sector(d, LABEL_AT);
        f(&mut b);
        if fix {
            let c = crc(&b[20..]);
            b[16..20].copy_from_slice(&c.to_le_bytes());
        }
        self.mem[d].fill(LABEL_AT, &b);
    }

    /// Changes the first metadata area header of device `d`; with `fix`, the crc too.
    fn header(&self, d: usize, fix: bool, f: impl FnOnce(&mut [u8; MDA_HEADER_SIZE])) {
        let mut b = self.sector(d, MDA_AT);
        f(&mut b);
        if fix {
            let c = crc(&b[4..]);
            b[..4].copy_from_slice(&c.to_le_bytes());
        }
        self.mem[d].fill(MDA_AT, &b);
    }

    fn parsed_header(&self, d: usize) -> MdaHeader {
        let area = lvm::label::DiskArea {
            offset: Bytes(MDA_AT),
            size: Bytes(MIB - MDA_AT),
        };
        MdaHeader::from_sector(&self.sector(d, MDA_AT), &area, "x").unwrap()
    }

    /// The committed text of device `d`, NUL included.
    fn text(&self, d: usize) -> Vec<u8> {
        let h = self.parsed_header(d);
        self.mem[d].snapshot(MDA_AT + h.committed.offset, h.committed.size as usize)
    }

    /// Replaces the committed text of device `d` in place; slot 0's size and crc and the
    /// header's crc follow.
    fn set_text(&self, d: usize, text: &[u8]) {
        let mut h = self.parsed_header(d);
        self.mem[d].fill(MDA_AT + h.committed.offset, text);
        h.committed.size = text.len() as u64;
        h.committed.checksum = crc(text);
        self.mem[d].fill(MDA_AT, &h.to_sector());
    }

    /// Edits the committed text of device `d` as a string.
    fn edit_text(&self, d: usize, f: impl FnOnce(String) -> String) {
        let t = self.text(d);
        let s = String::from_utf8(t[..t.len() - 1].to_vec()).unwrap();
        let mut new = f(s).into_bytes();
        new.push(0);
        self.set_text(d, &new);
    }
}

/// `n` 8 MiB PVs; the first `in_vg` make VG `vgc` (seqno 2, LVs a and b), the rest are
/// orphan PVs.
fn rig_with(n: usize, in_vg: usize) -> Rig {
    let (mem, mut pvs) = mem_pvs(n, Bytes(8 * MIB), EXTENT);
    pvs.truncate(in_vg);
    let mut vg = new_vg("vgc", EXTENT, pvs);
    let a = linear_lv(&vg, "a", "pv0", 1);
    vg.logical_volumes.push(a);
    let mut md = Metadata::new(vg, "crafted");
    let devs: Vec<DeviceRef> = mem.iter().map(|m| m.clone() as DeviceRef).collect();
    commit::create(&devs[..in_vg], &md).unwrap();
    let r = scan::scan(&devs);
    let b = linear_lv(&md.vg, "b", "pv1", 1);
    md.vg.logical_volumes.push(b);
    commit::commit(&r, &mut md).unwrap();
    Rig { mem }
}

fn rig() -> Rig {
    rig_with(2, 2)
}

/// The single problem the scan reports that is not a consequence (missing PV, stale copy).
fn the_problem(r: &ScanReport) -> &Problem {
    let own: Vec<&Problem> = r
        .problems
        .iter()
        .filter(|p| !matches!(p, Problem::MissingPv { .. } | Problem::Stale { .. }))
        .collect();
    assert_eq!(own.len(), 1, "{:#?}", r.problems);
    own[0]
}

/// The message of the one problem `is` picks.
fn the_one(r: &ScanReport, is: impl Fn(&Problem) -> bool) -> String {
    let found: Vec<String> = r
        .problems
        .iter()
        .filter(|p| is(p))
        .map(|p| p.to_string())
        .collect();
    assert_eq!(found.len(), 1, "{:?}", r.problems);
    found[0].clone()
}

fn label_err(r: &ScanReport) -> &lvm::label::LabelError {
    match the_problem(r) {
        Problem::BadLabel(e) => {
            assert_eq!(e.device, "disk0", "{e}");
            let msg = e.to_string();
            assert!(msg.contains("disk0") && msg.contains(&e.field), "{msg}");
            e
        }
        p => panic!("expected a label problem, got {p}"),
    }
}

fn mda_err(r: &ScanReport) -> &lvm::mda::MdaError {
    match the_problem(r) {
        Problem::BadMetadataArea(e) => {
            assert_eq!((e.device.as_str(), e.area), ("disk0", MDA_AT), "{e}");
            assert!(e.to_string().contains("disk0"), "{e}");
            e
        }
        p => panic!("expected a metadata area problem, got {p}"),
    }
}

fn text_err(r: &ScanReport) -> String {
    match the_problem(r) {
        Problem::BadText { device, offset, .. } => {
            assert_eq!(device, "disk0");
            assert!(*offset > MDA_AT && *offset < MIB, "{offset}");
            the_problem(r).to_string()
        }
        p => panic!("expected a text problem, got {p}"),
    }
}

#[test]
fn clean_rig_scans_clean() {
    let r = rig().scan();
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    assert_eq!(r.vg("vgc").unwrap().seqno(), 2);
}

#[test]
fn label_checksum() {
    let g = rig();
    g.label(0, false, |b| b[100] ^= 1);
    let e = label_err(&g.scan()).clone();
    assert_eq!((e.field.as_str(), e.offset), ("crc", LABEL_AT + 16));
    assert!(matches!(e.problem, LabelProblem::BadChecksum { .. }));
}

#[test]
fn label_fields() {
    type Damage = fn(&mut [u8; 512]);
    let cases: [(&str, u64, Damage); 8] = [
        ("sector", 8, |b| b[8] = 2),
        ("contents offset", 20, |b| {
            b[20..24].copy_from_slice(&500u32.to_le_bytes())
        }),
        ("pv_uuid", 32, |b| b[40] = b'_'),
        // The data area list never ends inside the sector.
        ("data area list", 0, |b| b[72..].fill(1)),
        // The metadata area starts past the device's end.
        ("metadata area 1", 104, |b| {
            b[104..112].copy_from_slice(&(9 * MIB).to_le_bytes())
        }),
        // ... or claims 2^64-1 bytes.
        ("metadata area 1", 104, |b| b[112..120].fill(0xff)),
        // ... or overlaps the label sectors.
        ("metadata area 1", 104, |b| {
            b[104..112].copy_from_slice(&1024u64.to_le_bytes())
        }),
        // The data area (pe_start) is past the device's end.
        ("data area 1", 72, |b| {
            b[72..80].copy_from_slice(&(64 * MIB).to_le_bytes())
        }),
    ];
    for (field, at, damage) in cases {
        let g = rig();
        g.label(0, true, damage);
        let e = label_err(&g.scan()).clone();
        assert_eq!(e.field, field, "{e}");
        if at > 0 {
            assert_eq!(e.offset, LABEL_AT + at, "{e}");
        } else {
            assert!((LABEL_AT..LABEL_AT + 512).contains(&e.offset), "{e}");
        }
    }
}

#[test]
fn mda_header_fields() {
    type Damage = fn(&mut [u8; 512]);
    let cases: [(&str, u64, Damage); 7] = [
        ("magic", 4, |b| b[5] = b'X'),
        ("version", 20, |b| b[20] = 2),
        ("start", 24, |b| {
            b[24..32].copy_from_slice(&8192u64.to_le_bytes())
        }),
        ("size", 32, |b| {
            b[32..40].copy_from_slice(&(7 * MIB).to_le_bytes())
        }),
        // Slot 0 starting past the area, holding more than the ring, or inside the header.
        ("slot 0", 40, |b| {
            b[40..48].copy_from_slice(&MIB.to_le_bytes())
        }),
        ("slot 0", 40, |b| {
            b[48..56].copy_from_slice(&MIB.to_le_bytes())
        }),
        ("slot 0", 40, |b| {
            b[40..48].copy_from_slice(&100u64.to_le_bytes())
        }),
    ];
    for (field, at, damage) in cases {
        let g = rig();
        g.header(0, true, damage);
        let e = mda_err(&g.scan()).clone();
        assert_eq!((e.field, e.offset), (field, MDA_AT + at), "{e}");
    }
    let g = rig();
    g.header(0, false, |b| b[300] = 1);
    let e = mda_err(&g.scan()).clone();
    assert_eq!((e.field, e.offset), ("checksum", MDA_AT), "{e}");
    assert!(matches!(e.problem, MdaProblem::BadHeaderChecksum { .. }));
}

#[test]
fn text_checksum() {
    let g = rig();
    let h = g.parsed_header(0);
    let mut t = g.text(0);
    t[10] ^= 0x20;
    g.mem[0].fill(MDA_AT + h.committed.offset, &t);
    let e = mda_err(&g.scan()).clone();
    assert_eq!(
        (e.field, e.offset),
        ("text", MDA_AT + h.committed.offset),
        "{e}"
    );
    assert!(matches!(e.problem, MdaProblem::BadTextChecksum { .. }));
}

#[test]
fn text_contents() {
    type Edit = fn(String) -> String;
    let cases: [(&str, Edit); 8] = [
        ("seqno", |t| t.replace("seqno = 2", "seqno = -2")),
        ("seqno", |t| t.replace("seqno = 2", "seqno = \"2\"")),
        ("stripes", |t| t.replace("\"pv1\", 0", "\"pv9\", 0")),
        ("pe_count", |t| {
            t.replacen("pe_count = 1", "pe_count = 40000", 1)
        }),
        ("contents", |t| {
            t.replace("contents = \"Text Format Volume Group\"", "")
        }),
        ("line", |t| {
            t.replace("extent_size = 8192", "extent_size = = 8192")
        }),
        ("nested", |t| format!("{}{t}", "x {".repeat(100))),
        ("segment_count", |t| {
            t.replacen("segment_count = 1", "segment_count = 2", 1)
        }),
    ];
    for (word, edit) in cases {
        let g = rig();
        g.edit_text(0, edit);
        let msg = text_err(&g.scan());
        assert!(msg.contains(word) && msg.contains("disk0"), "{word}: {msg}");
    }
    // Not UTF-8.
    let g = rig();
    let mut t = g.text(0);
    t[20] = 0xff;
    g.set_text(0, &t);
    assert!(text_err(&g.scan()).contains("UTF-8"));
}

#[test]
fn same_seqno_different_text() {
    let g = rig();
    g.edit_text(1, |t| {
        t.replace(
            "creation_host = \"lvm-crate-test\"",
            "creation_host = \"other\"",
        )
    });
    let r = g.scan();
    match the_problem(&r) {
        Problem::SeqnoConflict { vg, seqno, devices } => {
            assert_eq!((vg.as_str(), *seqno), ("vgc", 2));
            assert_eq!(devices.len(), 1);
        }
        p => panic!("{p}"),
    }
    assert!(!r.vg("vgc").unwrap().is_consistent());
}

#[test]
fn pv_on_two_devices() {
    let g = rig_with(3, 2);
    let copy = g.mem[0].snapshot(0, (2 * MIB) as usize);
    g.mem[2].fill(0, &copy);
    let r = g.scan();
    let dup = the_one(&r, |p| matches!(p, Problem::DuplicatePv { .. }));
    let msg = dup;
    assert!(msg.contains("disk0") && msg.contains("disk2"), "{msg}");
}

#[test]
fn stale_copy_is_named() {
    let g = rig();
    // Put seqno 1 back on disk1: its ring still holds the text, only the header moved on.
    let h = g.parsed_header(1);
    let r0 = g.scan();
    let mut old = h.clone();
    old.committed.offset = 512;
    let first = g.mem[1].snapshot(MDA_AT + 512, h.committed.offset as usize - 512);
    let len = first.iter().position(|&c| c == 0).unwrap() + 1;
    old.committed.size = len as u64;
    old.committed.checksum = crc(&first[..len]);
    g.mem[1].fill(MDA_AT, &old.to_sector());
    assert!(r0.problems.is_empty());
    let r = g.scan();
    assert_eq!(r.vg("vgc").unwrap().seqno(), 2);
    let stale = the_one(&r, |p| matches!(p, Problem::Stale { .. }));
    assert!(
        stale.contains("disk1") && stale.contains("seqno 1") && stale.contains("4096"),
        "{}",
        stale
    );
}

#[test]
fn extents_past_the_device() {
    let g = rig();
    for d in 0..2 {
        g.edit_text(d, |t| {
            t.replacen("dev_size = 16384", "dev_size = 163840", 1)
                .replacen("pe_count = 1", "pe_count = 19", 1)
        });
    }
    let r = g.scan();
    match the_problem(&r) {
        Problem::PvTooSmall {
            device,
            needs,
            size,
            ..
        } => {
            assert_eq!(device, "disk0");
            assert_eq!((*needs, *size), (MIB + 19 * 4 * MIB, 8 * MIB));
        }
        p => panic!("{p}"),
    }
}

#[test]
fn pv_dropped_or_claimed() {
    // disk0 gets a newer text that no longer lists disk1's PV.
    let g = rig();
    let pv1 = g.scan().devices[1].label.as_ref().unwrap().pv_uuid;
    let mut md = Metadata::from_text(&g.text(0)).unwrap();
    md.vg.seqno = 3;
    md.vg.logical_volumes.retain(|l| l.name != "b");
    md.vg.physical_volumes.retain(|p| p.id != pv1);
    let mut t = md.to_text(lvm::text::Style::Disk).unwrap().into_bytes();
    t.push(0);
    g.set_text(0, &t);
    let r = g.scan();
    let not_in = the_one(&r, |p| matches!(p, Problem::NotInVg { .. }));
    assert!(not_in.contains("disk1") && not_in.contains(&pv1.to_string()));

    // A second VG on disk2 whose metadata lists disk0's PV as its own.
    let g = rig_with(3, 2);
    let scanned = g.scan();
    let [l0, l2] = [0, 2].map(|i| scanned.devices[i].label.clone().unwrap());
    let size = Bytes(8 * MIB);
    let vg = new_vg(
        "other",
        EXTENT,
        vec![
            pv_entry("pv0", &l2, size, EXTENT, None),
            pv_entry("pv1", &l0, size, EXTENT, None),
        ],
    );
    let md = Metadata::new(vg, "claims disk0");
    let mut t = md.to_text(lvm::text::Style::Disk).unwrap().into_bytes();
    t.push(0);
    // Write it on disk2 only (its area is empty: point slot 0 at 512).
    let mut h = g.parsed_header(2);
    g.mem[2].fill(MDA_AT + 512, &t);
    h.committed.offset = 512;
    h.committed.size = t.len() as u64;
    h.committed.checksum = crc(&t);
    g.mem[2].fill(MDA_AT, &h.to_sector());
    let r = g.scan();
    let claimed = the_one(&r, |p| matches!(p, Problem::PvOfOtherVg { .. }));
    assert!(
        claimed.contains("disk0") && claimed.contains("other") && claimed.contains("vgc"),
        "{}",
        claimed
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Random bytes in the label, the header or the text, checksums recomputed: the scan
    /// reports, never panics, reads out of range or allocates big.
    #[test]
    fn random_damage(
        target in 0u8..3,
        edits in proptest::collection::vec((0usize..512, any::<u8>()), 1..8),
        fix in any::<bool>(),
    ) {
        let g = rig();
        match target {
            0 => g.label(0, fix, |b| for &(i, v) in &edits { b[i] = v }),
            1 => g.header(0, fix, |b| for &(i, v) in &edits { b[i] = v }),
            _ => {
                let mut t = g.text(0);
                let n = t.len();
                for &(i, v) in &edits {
                    t[i % n] = v;
                }
                if fix { g.set_text(0, &t) } else {
                    let h = g.parsed_header(0);
                    g.mem[0].fill(MDA_AT + h.committed.offset, &t);
                }
            }
        }
        let r = g.scan();
        for p in &r.problems {
            let s = p.to_string();
            prop_assert!(!s.is_empty());
        }
    }
}

#[test]
fn slot_at_the_end_of_a_huge_area() {
    // A sparse device of 2^64-1 bytes with one metadata area covering it: slot 0 starts a
    // sector before the area's end and claims 1 MiB, so it wraps, and offset + size does not
    // fit 64 bits. The scan reads it as a wrapped copy (whose crc is wrong), no overflow.
    let dev = Arc::new(MemDevice::new("huge", Bytes(u64::MAX)));
    let size = (u64::MAX - MDA_AT) / 512 * 512;
    let area = lvm::label::DiskArea {
        offset: Bytes(MDA_AT),
        size: Bytes(size),
    };
    let label = lvm::Label {
        sector: 1,
        pv_uuid: lvm::Uuid::generate(),
        device_size: Bytes(u64::MAX),
        data_areas: vec![lvm::label::DiskArea {
            offset: Bytes(1 << 20),
            size: Bytes(0),
        }],
        metadata_areas: vec![area],
        extension: None,
    };
    dev.fill(LABEL_AT, &label.to_sector().unwrap());
    let mut h = MdaHeader::new(&area);
    h.committed = lvm::mda::RawLocn {
        offset: size - 512,
        size: MIB,
        checksum: 0,
        flags: 0,
    };
    dev.fill(MDA_AT, &h.to_sector());
    let r = scan::scan(&[dev as DeviceRef]);
    assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
    match &r.problems[0] {
        Problem::BadMetadataArea(e) => {
            assert_eq!((e.device.as_str(), e.field), ("huge", "text"), "{e}");
            assert_eq!(e.offset, MDA_AT + size - 512);
            assert!(
                matches!(e.problem, MdaProblem::BadTextChecksum { .. }),
                "{e}"
            );
        }
        p => panic!("{p}"),
    }
}

/// The commit refusal `e` is, or panics.
fn refusal(e: lvm::Error) -> CommitError {
    match e {
        lvm::Error::Commit(c) => c,
        e => panic!("expected a commit refusal, got {e}"),
    }
}

#[test]
fn commit_refuses_what_it_cannot_write_safely() {
    // Dropping a PV.
    let g = rig();
    let r = g.scan();
    let mut md = r.vg("vgc").unwrap().metadata.clone();
    md.vg.logical_volumes.retain(|l| l.name != "b");
    md.vg.physical_volumes.truncate(1);
    let e = refusal(commit::commit(&r, &mut md).unwrap_err());
    assert!(matches!(e, CommitError::DropsPv { .. }), "{e}");

    // A PV missing from the scan.
    let r = scan::scan(&g.devs()[..1]);
    let mut md = r.vg("vgc").unwrap().metadata.clone();
    let e = refusal(commit::commit(&r, &mut md).unwrap_err());
    assert!(
        matches!(&e, CommitError::Inconsistent { problem, .. } if matches!(**problem, Problem::MissingPv { .. })),
        "{e}"
    );

    // Another writer got there between our scan and our commit.
    let r = g.scan();
    let mut first = r.vg("vgc").unwrap().metadata.clone();
    let mut second = first.clone();
    commit::commit(&r, &mut first).unwrap();
    let e = refusal(commit::commit(&r, &mut second).unwrap_err());
    assert!(
        matches!(&e, CommitError::Changed { device, area } if device == "disk0" && *area == MDA_AT),
        "{e}"
    );

    // The seqno cannot wrap.
    let g = rig();
    for d in 0..2 {
        g.edit_text(d, |t| t.replace("seqno = 2", "seqno = 4294967295"));
    }
    let r = g.scan();
    let mut md = r.vg("vgc").unwrap().metadata.clone();
    let e = refusal(commit::commit(&r, &mut md).unwrap_err());
    assert!(matches!(e, CommitError::SeqnoOverflow { .. }), "{e}");

    // create: devices that already hold metadata, or hold a PV the VG does not list.
    let g = rig_with(3, 2);
    let r = g.scan();
    let md = r.vg("vgc").unwrap().metadata.clone();
    let e = refusal(commit::create(&g.devs()[..2], &md).unwrap_err());
    assert!(matches!(e, CommitError::PvInUse { .. }), "{e}");
    let e = refusal(commit::create(&g.devs()[2..], &md).unwrap_err());
    assert!(matches!(e, CommitError::NotInVg { .. }), "{e}");
    // Nothing was written: the scan is as before.
    assert_eq!(g.scan().vg("vgc").unwrap().seqno(), 2);
}
