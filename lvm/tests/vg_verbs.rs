//! The VG/PV verbs' library halves on in-memory PVs: vgextend, vgreduce (and
//! `--removemissing`), vgrename, pvresize, vgcfgrestore and `vgck --updatemetadata`. Each
//! refusal is checked to name what it refuses and to write nothing; each success is checked
//! by a fresh scan (clean, the expected VG), and a random series of verbs (proptest) keeps
//! every PV either in the VG with the newest copy or an orphan with none.

use std::sync::Arc;

use lvm::commit::{self, CommitError};
use lvm::crc::crc;
use lvm::label::{self, DiskArea};
use lvm::mda::{self, MdaHeader};
use lvm::model::Metadata;
use lvm::scan::{self, Problem, ScanReport};
use lvm::text::Style;
use lvm::{pvresize, repair, restore, vgextend, vgreduce, vgrename, Error, Extents, Uuid};
use proptest::prelude::*;
use tables::mem::MemDevice;
use tables::{Bytes, DeviceRef, Sectors};

mod common;
use common::{linear_lv, mem_pvs, new_vg};

const MIB: u64 = 1 << 20;
const MDA_AT: u64 = 4096;
/// 1 MiB extents: a PV of 8 MiB has 7 (pe_start is 1 MiB).
const EXTENT: Sectors = Sectors(2048);

struct Rig {
    mem: Vec<Arc<MemDevice>>,
}

impl Rig {
    fn devs(&self) -> Vec<DeviceRef> {
        self.mem.iter().map(|m| m.clone() as DeviceRef).collect()
    }
    fn scan(&self) -> ScanReport {
        scan::scan(&self.devs())
    }
    fn clean(&self) -> ScanReport {
        let r = self.scan();
        assert!(r.problems.is_empty(), "{:#?}", r.problems);
        r
    }
    fn uuid(&self, d: usize) -> Uuid {
        label::find(self.mem[d].as_ref()).unwrap().unwrap().pv_uuid
    }
    /// Device `d` is an orphan PV: a label not marked used, every area empty.
    fn assert_orphan(&self, d: usize) {
        let l = label::find(self.mem[d].as_ref()).unwrap().unwrap();
        assert!(!l.in_use(), "disk{d} is still marked used");
        for a in &l.metadata_areas {
            let h = mda::read_header(self.mem[d].as_ref(), a).unwrap();
            assert!(
                h.committed.is_empty() && h.precommitted.is_empty(),
                "disk{d}"
            );
        }
    }
    /// Overwrites the committed text of device `d` with garbage (header untouched).
    fn garble_text(&self, d: usize) {
        let h = self.header(d);
        let junk = vec![0x5a; h.committed.size as usize];
        self.mem[d].fill(MDA_AT + h.committed.offset, &junk);
    }
    fn header(&self, d: usize) -> MdaHeader {
        let area = DiskArea {
            offset: Bytes(MDA_AT),
            size: Bytes(MIB - MDA_AT),
        };
        mda::read_header(self.mem[d].as_ref(), &area).unwrap()
    }
}

/// `n` 8 MiB PVs; the first `in_vg` make VG `vg` with LV `a` (2 extents on pv0) and LV `b`
/// (1 extent on pv1 when there is one); the others are orphan PVs.
fn rig(n: usize, in_vg: usize) -> Rig {
    let (mem, mut pvs) = mem_pvs(n, Bytes(8 * MIB), EXTENT);
    pvs.truncate(in_vg);
    let mut vg = new_vg("vg", EXTENT, pvs);
    let a = linear_lv(&vg, "a", "pv0", 2);
    vg.logical_volumes.push(a);
    if in_vg > 1 {
        let b = linear_lv(&vg, "b", "pv1", 1);
        vg.logical_volumes.push(b);
    }
    let md = Metadata::new(vg, "vg_verbs");
    let devs: Vec<DeviceRef> = mem.iter().map(|m| m.clone() as DeviceRef).collect();
    commit::create(&devs[..in_vg], &md).unwrap();
    Rig { mem }
}

fn new_pv(g: &Rig, d: usize) -> vgextend::NewPv {
    vgextend::NewPv {
        label: label::find(g.mem[d].as_ref()).unwrap().unwrap(),
        size: Bytes(8 * MIB),
        device: Some(format!("disk{d}")),
    }
}

fn extend(g: &Rig, ds: &[usize]) -> Result<commit::Committed, Error> {
    let r = g.scan();
    let mut md = r.vg("vg").unwrap().metadata.clone();
    let pvs: Vec<_> = ds.iter().map(|&d| new_pv(g, d)).collect();
    vgextend::add_pvs(&mut md.vg, &pvs)?;
    commit::commit(&r, &mut md)
}

#[test]
fn vgextend_adds_orphans_under_new_keys() {
    let g = rig(4, 2);
    extend(&g, &[2, 3]).unwrap();
    let r = g.clean();
    let vg = &r.vg("vg").unwrap().metadata.vg;
    assert_eq!(vg.seqno, 2);
    let keys: Vec<&str> = vg.physical_volumes.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(keys, ["pv0", "pv1", "pv2", "pv3"]);
    assert_eq!(vg.pv_by_key("pv3").unwrap().id, g.uuid(3));
    assert_eq!(vg.pv_by_key("pv2").unwrap().pe_count, Extents(7));
    for d in 0..4 {
        assert!(label::find(g.mem[d].as_ref()).unwrap().unwrap().in_use());
    }
    assert_eq!(r.vg("vg").unwrap().current.len(), 4);
}

#[test]
fn next_key_follows_the_highest_and_refusals_change_nothing() {
    let g = rig(3, 2);
    let r = g.scan();
    let mut vg = r.vg("vg").unwrap().metadata.vg.clone();
    vg.physical_volumes[1].key = "pv7".into();
    assert_eq!(vgextend::next_pv_key(&vg), "pv8");
    vg.physical_volumes.clear();
    assert_eq!(vgextend::next_pv_key(&vg), "pv0");

    let mut vg = r.vg("vg").unwrap().metadata.vg.clone();
    let before = vg.clone();
    let e = vgextend::add_pvs(&mut vg, &[new_pv(&g, 2), new_pv(&g, 1)]).unwrap_err();
    assert!(
        matches!(&e, vgextend::ExtendError::AlreadyInVg { id, .. } if *id == g.uuid(1)),
        "{e}"
    );
    assert_eq!(vg, before, "a refused add changed the VG");
    vg.max_pv = 2;
    let e = vgextend::add_pvs(&mut vg, &[new_pv(&g, 2)]).unwrap_err();
    assert!(
        matches!(e, vgextend::ExtendError::MaxPv { max: 2, .. }),
        "{e}"
    );

    // A PV of another VG (it holds metadata) is refused by the commit.
    let h = rig(1, 1);
    let mem = vec![g.mem[0].clone(), g.mem[1].clone(), h.mem[0].clone()];
    let g2 = Rig { mem };
    let e = extend(&g2, &[2]).unwrap_err();
    assert!(
        matches!(&e, Error::Commit(CommitError::PvInUse { device, .. }) if device == "disk0"),
        "{e}"
    );
}

#[test]
fn vgreduce_refuses_used_and_last_pvs_naming_the_lvs() {
    let g = rig(3, 3);
    let r = g.scan();
    let sv = r.vg("vg").unwrap();
    let e = vgreduce::vgreduce(&r, sv, &[g.uuid(1)], "t").unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(&e, Error::Reduce(vgreduce::ReduceError::InUse { lvs, key, .. }) if lvs == &["b"] && key == "pv1"),
        "{e}"
    );
    assert!(msg.contains("b") && msg.contains("pv1"), "{msg}");
    let one = rig(1, 1);
    let r1 = one.scan();
    let mut md = r1.vg("vg").unwrap().metadata.clone();
    md.vg.logical_volumes.clear();
    let e = vgreduce::remove_pvs(&mut md.vg, &[one.uuid(0)]).unwrap_err();
    assert!(matches!(e, vgreduce::ReduceError::LastPv { .. }), "{e}");
    let e = vgreduce::remove_pvs(&mut md.vg, &[Uuid::generate()]).unwrap_err();
    assert!(matches!(e, vgreduce::ReduceError::NotInVg { .. }), "{e}");
    // Nothing was written.
    assert_eq!(g.clean().vg("vg").unwrap().seqno(), 1);
}

#[test]
fn vgreduce_orphans_the_pv_and_the_rest_scans_clean() {
    let g = rig(3, 3);
    let r = g.scan();
    let gone = g.uuid(2);
    let done = vgreduce::vgreduce(&r, r.vg("vg").unwrap(), &[gone], "reduce").unwrap();
    assert_eq!(done.committed.seqno, 2);
    assert!(done.committed.copies.iter().all(|c| c.device != "disk2"));
    g.assert_orphan(2);
    let r = g.clean();
    let vg = &r.vg("vg").unwrap().metadata;
    assert_eq!(vg.description, "reduce");
    assert!(vg.vg.pv_by_id(&gone).is_none());
    assert_eq!(vg.vg.physical_volumes.len(), 2);
    // It can join again.
    extend(&g, &[2]).unwrap();
    let r = g.clean();
    assert_eq!(
        r.vg("vg").unwrap().metadata.vg.pv_by_id(&gone).unwrap().key,
        "pv2"
    );
}

#[test]
fn commit_dropping_allows_exactly_the_dropped_pvs() {
    let g = rig(3, 3);
    let r = g.scan();
    let md0 = r.vg("vg").unwrap().metadata.clone();
    // Still listed.
    let mut md = md0.clone();
    let e = commit::commit_dropping(&r, &mut md, &[g.uuid(2)]).unwrap_err();
    assert!(
        matches!(e, Error::Commit(CommitError::BadDrop { why, .. }) if why.contains("still lists")),
        "{e}"
    );
    // Not in the VG.
    let mut md = md0.clone();
    let e = commit::commit_dropping(&r, &mut md, &[Uuid::generate()]).unwrap_err();
    assert!(
        matches!(e, Error::Commit(CommitError::BadDrop { why, .. }) if why.contains("does not list")),
        "{e}"
    );
    // Dropping one more than declared.
    let mut md = md0.clone();
    md.vg.logical_volumes.retain(|l| l.name == "a");
    md.vg.physical_volumes.truncate(1);
    let e = commit::commit_dropping(&r, &mut md, &[g.uuid(2)]).unwrap_err();
    assert!(
        matches!(&e, Error::Commit(CommitError::DropsPv { key, .. }) if key == "pv1"),
        "{e}"
    );
    // Another PV missing is still refused.
    let r = scan::scan(&g.devs()[..2]);
    let mut md = md0.clone();
    md.vg.physical_volumes.remove(1);
    md.vg.logical_volumes.retain(|l| l.name == "a");
    let e = commit::commit_dropping(&r, &mut md, &[g.uuid(1)]).unwrap_err();
    assert!(
        matches!(&e, Error::Commit(CommitError::Inconsistent { problem, .. }) if matches!(**problem, Problem::MissingPv { id, .. } if id == g.uuid(2))),
        "{e}"
    );
    assert_eq!(g.clean().vg("vg").unwrap().seqno(), 1);
}

#[test]
fn removemissing_drops_absent_pvs_and_forced_their_lvs() {
    // pv1 (LV b on it) and pv2 (empty) gone.
    let g = rig(3, 3);
    let r = scan::scan(&g.devs()[..1]);
    let sv = r.vg("vg").unwrap();
    let e = vgreduce::remove_missing(&r, sv, false, "t").unwrap_err();
    assert!(
        matches!(&e, Error::Reduce(vgreduce::ReduceError::PartialLvs { lvs, .. }) if lvs == &["b"]),
        "{e}"
    );
    let done = vgreduce::remove_missing(&r, sv, true, "t")
        .unwrap()
        .unwrap();
    assert_eq!(done.removed_lvs, ["b"]);
    assert_eq!(done.removed.len(), 2);
    let r = scan::scan(&g.devs()[..1]);
    assert!(r.problems.is_empty(), "{:#?}", r.problems);
    let vg = &r.vg("vg").unwrap().metadata.vg;
    assert_eq!(vg.physical_volumes.len(), 1);
    assert!(vg.lv("b").is_none() && vg.lv("a").is_some());
    // Nothing missing now.
    assert!(
        vgreduce::remove_missing(&r, r.vg("vg").unwrap(), false, "t")
            .unwrap()
            .is_none()
    );
    // The PVs that come back carry an old copy of a VG that no longer lists them.
    let r = g.scan();
    assert!(
        r.problems
            .iter()
            .any(|p| matches!(p, Problem::NotInVg { device, .. } if device == "disk1")),
        "{:#?}",
        r.problems
    );
    let up = repair::update_metadata(&r, &r.vg("vg").unwrap().id(), "repair").unwrap();
    assert_eq!(up.wiped, ["disk1", "disk2"]);
    g.clean();
    g.assert_orphan(1);
}

#[test]
fn vgrename_by_name_or_uuid_and_its_refusals() {
    let g = rig(2, 2);
    let other = rig(1, 1);
    let mem = vec![g.mem[0].clone(), g.mem[1].clone(), other.mem[0].clone()];
    let both = Rig { mem };
    let r = both.scan();
    // "vg" twice: the second one, named by its uuid, becomes "other".
    let (id, other_id) = (r.vgs[0].id(), r.vgs[1].id());
    let sv = vgrename::find_vg(&r, other_id.undashed()).unwrap();
    assert_eq!(sv.id(), other_id);
    vgrename::vgrename(&r, sv, "other", "/dev/", "rename").unwrap();
    let r = both.clean();
    let sv = vgrename::find_vg(&r, "vg").unwrap();
    assert_eq!(sv.id(), id);
    for (new, want) in [
        ("vg", "must differ"),
        ("other", "already exists"),
        ("bad/name", "invalid"),
        ("-x", "invalid"),
    ] {
        let e = vgrename::check_new_name(&r, sv, new, "/dev/").unwrap_err();
        assert!(e.to_string().contains(want), "{new}: {e}");
    }
    let long = "a".repeat(122);
    let e = vgrename::check_new_name(&r, sv, &long, "/dev/").unwrap_err();
    assert!(
        matches!(e, vgrename::RenameError::TooLong { max: 121 }),
        "{e}"
    );
    assert!(vgrename::check_new_name(&r, sv, &"a".repeat(121), "/dev/").is_ok());
    let e = vgrename::check_new_name(&r, sv, &other_id.to_string(), "/dev/").unwrap_err();
    assert!(
        matches!(e, vgrename::RenameError::MatchesUuid { .. }),
        "{e}"
    );
    vgrename::vgrename(&r, sv, "renamed", "/dev/", "rename").unwrap();
    let r = both.clean();
    let v = r.vg("renamed").unwrap();
    assert_eq!((v.id(), v.seqno()), (id, 2));
    assert!(r.vg("vg").is_none());
    assert_eq!(r.vg("other").unwrap().id(), other_id);
}

#[test]
fn pvresize_shrinks_grows_and_refuses_cutting_lvs() {
    let g = rig(2, 2);
    let r = g.scan();
    // LV a holds extents 0-1 of pv0: 2 extents (3 MiB) are the least it takes.
    let e = pvresize::pvresize(&r, 0, Bytes(2 * MIB + 512 * 1024), "t").unwrap_err();
    assert!(
        matches!(&e, Error::Resize(pvresize::ResizeError::Allocated { lvs, count: 1, .. }) if lvs == &["a"]),
        "{e}"
    );
    assert!(e.to_string().contains("a"), "{e}");
    let e = pvresize::pvresize(&r, 0, Bytes(MIB), "t").unwrap_err();
    assert!(
        matches!(e, Error::Resize(pvresize::ResizeError::TooSmall { .. })),
        "{e}"
    );
    let e = pvresize::pvresize(&r, 0, Bytes(9 * MIB), "t").unwrap_err();
    assert!(
        matches!(e, Error::Resize(pvresize::ResizeError::PastDevice { .. })),
        "{e}"
    );
    assert_eq!(g.clean().vg("vg").unwrap().seqno(), 1);

    let done = pvresize::pvresize(&r, 0, Bytes(3 * MIB), "shrink").unwrap();
    assert_eq!(done.pe_count, Some((Extents(7), Extents(2))));
    let r = g.clean();
    let pv = r.vg("vg").unwrap().metadata.vg.physical_volumes[0].clone();
    assert_eq!(pv.pe_count, Extents(2));
    // LVM2 writes the size less pe_start.
    assert_eq!(pv.dev_size, Some(Sectors(4096)));
    assert_eq!(
        label::find(g.mem[0].as_ref()).unwrap().unwrap().device_size,
        Bytes(3 * MIB)
    );
    // Back to the whole device.
    pvresize::pvresize(&r, 0, Bytes(8 * MIB), "grow").unwrap();
    let r = g.clean();
    let vg = &r.vg("vg").unwrap().metadata.vg;
    assert_eq!(vg.physical_volumes[0].pe_count, Extents(7));
    assert_eq!(vg.seqno, 3);
    // The same size again writes nothing.
    let again = pvresize::pvresize(&r, 0, Bytes(8 * MIB), "same").unwrap();
    assert!(again.committed.is_none());
}

#[test]
fn pvresize_of_an_orphan_writes_its_label_only() {
    let g = rig(2, 1);
    let r = g.scan();
    let before = g.header(1);
    let done = pvresize::pvresize(&r, 1, Bytes(5 * MIB), "t").unwrap();
    assert!(done.committed.is_none() && done.pe_count.is_none());
    let l = label::find(g.mem[1].as_ref()).unwrap().unwrap();
    assert_eq!(l.device_size, Bytes(5 * MIB));
    assert!(!l.in_use());
    assert_eq!(g.header(1), before);
    g.clean();
}

fn backup(g: &Rig) -> Metadata {
    let r = g.clean();
    let text = r.vg("vg").unwrap().metadata.to_text(Style::File).unwrap();
    Metadata::from_text(text.as_bytes()).unwrap()
}

#[test]
fn restore_writes_over_garbage_in_every_copy() {
    let g = rig(2, 2);
    let mut md = backup(&g);
    extend_lv(&g); // seqno 2 on disk, the backup has 1.
    g.garble_text(0);
    g.garble_text(1);
    let r = g.scan();
    assert!(r.vg("vg").is_none(), "every copy is garbage");
    let done = restore::restore(&r, &mut md, false).unwrap();
    // One past the backup's (the garbled copies' seqno cannot be read).
    assert_eq!(done.committed.seqno, 2);
    assert_eq!(done.committed.copies.len(), 2);
    let r = g.clean();
    let vg = &r.vg("vg").unwrap().metadata.vg;
    assert!(vg.lv("c").is_none() && vg.lv("b").is_some());
}

/// Adds LV `c` (seqno + 1).
fn extend_lv(g: &Rig) {
    let r = g.scan();
    let mut md = r.vg("vg").unwrap().metadata.clone();
    let c = linear_lv(&md.vg, "c", "pv1", 1);
    md.vg.logical_volumes.push(c);
    commit::commit(&r, &mut md).unwrap();
}

#[test]
fn restore_goes_past_the_newest_copy_and_onto_orphans() {
    let g = rig(2, 2);
    let mut md = backup(&g);
    extend_lv(&g);
    extend_lv_named(&g, "d");
    // One PV orphaned (as vgremove leaves it), the other one keeps seqno 3.
    let r = g.scan();
    lvm::orphan::make_orphan(g.mem[1].as_ref(), r.devices[1].label.as_ref().unwrap()).unwrap();
    let r = g.scan();
    let done = restore::restore(&r, &mut md, false).unwrap();
    assert_eq!(done.committed.seqno, 4);
    let r = g.clean();
    assert_eq!(r.vg("vg").unwrap().current.len(), 2);
    assert!(label::find(g.mem[1].as_ref()).unwrap().unwrap().in_use());
}

fn extend_lv_named(g: &Rig, name: &str) {
    let r = g.scan();
    let mut md = r.vg("vg").unwrap().metadata.clone();
    let c = linear_lv(&md.vg, name, "pv0", 1);
    md.vg.logical_volumes.push(c);
    commit::commit(&r, &mut md).unwrap();
}

#[test]
fn restore_refusals() {
    let g = rig(3, 2);
    let md0 = backup(&g);
    // A missing PV: refused, or written to the others with force.
    let r = scan::scan(&g.devs()[..1]);
    let e = restore::restore(&r, &mut md0.clone(), false).unwrap_err();
    assert!(
        matches!(&e, Error::Restore(restore::RestoreError::MissingPvs { pvs, .. }) if pvs.len() == 1 && pvs[0].starts_with("pv1")),
        "{e}"
    );
    let done = restore::restore(&r, &mut md0.clone(), true).unwrap();
    assert_eq!(done.missing, [g.uuid(1)]);
    // A PV that now belongs to another VG.
    let r = g.scan();
    let mut other = md0.clone();
    other.vg.name = "other".into();
    other.vg.id = Uuid::generate();
    other.vg.physical_volumes.truncate(1);
    other.vg.logical_volumes.retain(|l| l.name == "a");
    let e = restore::restore(&r, &mut other, false).unwrap_err();
    assert!(
        matches!(&e, Error::Restore(restore::RestoreError::PvOfOtherVg { other, device, .. }) if other == "vg" && device == "disk0"),
        "{e}"
    );
    // Another VG has the name.
    let mut same_name = md0.clone();
    same_name.vg.id = Uuid::generate();
    let e = restore::restore(&r, &mut same_name, false).unwrap_err();
    assert!(
        matches!(e, Error::Restore(restore::RestoreError::NameTaken { .. })),
        "{e}"
    );
    // A layout that is not the label's.
    let mut moved = md0.clone();
    moved.vg.physical_volumes[1].pe_start = Sectors(4096);
    let e = restore::restore(&r, &mut moved, false).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Restore(restore::RestoreError::LayoutMismatch { .. })
        ),
        "{e}"
    );
    let mut big = md0.clone();
    big.vg.physical_volumes[1].pe_count = Extents(8);
    big.vg.physical_volumes[1].dev_size = None;
    let e = restore::restore(&r, &mut big, false).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Restore(restore::RestoreError::DeviceTooSmall { .. })
        ),
        "{e}"
    );
}

#[test]
fn update_metadata_rewrites_stale_bad_and_damaged_copies() {
    let g = rig(3, 3);
    // disk1: stale (a commit cut before its header); disk2: header crc broken.
    let old = g.header(1);
    extend_lv(&g);
    mda::write_header(g.mem[1].as_ref(), &old, false).unwrap();
    let mut b = g.header(2).to_sector();
    b[100] ^= 1;
    g.mem[2].fill(MDA_AT, &b);
    let r = g.scan();
    assert!(r
        .problems
        .iter()
        .any(|p| matches!(p, Problem::Stale { device, .. } if device == "disk1")));
    assert!(r
        .problems
        .iter()
        .any(|p| matches!(p, Problem::BadMetadataArea(e) if e.device == "disk2")));
    // A plain commit skips the damaged header.
    let mut md = r.vg("vg").unwrap().metadata.clone();
    let done = commit::commit(&r, &mut md).unwrap();
    assert_eq!(done.skipped, [("disk2".to_string(), MDA_AT)]);
    let r = g.scan();
    let up = repair::update_metadata(&r, &r.vg("vg").unwrap().id(), "vgck").unwrap();
    assert!(up.committed.skipped.is_empty());
    assert_eq!(up.committed.copies.len(), 3);
    let r = g.clean();
    assert_eq!(r.vg("vg").unwrap().seqno(), 4);
    assert_eq!(r.vg("vg").unwrap().metadata.description, "vgck");
}

#[test]
fn damaged_headers_are_replaced_only_when_it_is_safe() {
    let g = rig(1, 1);
    let area = DiskArea {
        offset: Bytes(MDA_AT),
        size: Bytes(MIB - MDA_AT),
    };
    let dev = g.mem[0].as_ref();
    assert!(!repair::header_is_repairable(dev, &area).unwrap());
    let good = g.header(0).to_sector();
    let set = |f: &dyn Fn(&mut [u8; 512]), fix: bool| {
        let mut b = good;
        f(&mut b);
        if fix {
            let c = crc(&b[4..]);
            b[..4].copy_from_slice(&c.to_le_bytes());
        }
        g.mem[0].fill(MDA_AT, &b);
        repair::header_is_repairable(dev, &area).unwrap()
    };
    assert!(set(&|b| b[60] ^= 1, false), "crc");
    assert!(set(&|b| b[20] = 9, true), "version");
    assert!(!set(&|b| b[5] ^= 1, false), "magic under a bad crc");
    assert!(!set(&|b| b[5] ^= 1, true), "magic");
    assert!(!set(&|b| b[24] ^= 2, true), "start");
    assert!(!set(&|b| b[24] ^= 2, false), "start under a bad crc");
    assert!(!set(&|b| b[32] ^= 2, true), "size");
    assert!(!set(&|b| b[..].fill(0), false), "zeroed");
    // An unrepairable header is left alone and reported.
    let r = g.scan();
    assert!(r.vg("vg").is_none());
    let zero = g.mem[0].snapshot(MDA_AT, 512);
    assert!(zero.iter().all(|&b| b == 0));
}

/// One step of the random series.
#[derive(Clone, Debug)]
enum Op {
    Extend(usize),
    Reduce(usize),
    Rename(u8),
    Resize(usize, u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0usize..4).prop_map(Op::Extend),
        (0usize..4).prop_map(Op::Reduce),
        any::<u8>().prop_map(Op::Rename),
        (0usize..4, 3u64..=8).prop_map(|(d, m)| Op::Resize(d, m)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Random vgextend/vgreduce/vgrename/pvresize: refused or done, each leaves the scan clean,
    /// every device either a PV of the VG holding its newest copy or an orphan with no copy,
    /// and the VG's extents match the PVs' sizes.
    #[test]
    fn random_verbs_keep_every_pv_in_the_vg_or_an_orphan(ops in proptest::collection::vec(op(), 1..10)) {
        let g = rig(4, 2);
        let id = g.scan().vgs[0].id();
        for o in &ops {
            let r = g.scan();
            let sv = r.vg_by_id(&id).unwrap();
            let res = match o {
                Op::Extend(d) => {
                    let mut md = sv.metadata.clone();
                    vgextend::add_pvs(&mut md.vg, &[new_pv(&g, *d)])
                        .map_err(Error::from)
                        .and_then(|_| commit::commit(&r, &mut md).map(|_| ()))
                }
                Op::Reduce(d) => vgreduce::vgreduce(&r, sv, &[g.uuid(*d)], "r").map(|_| ()),
                Op::Rename(n) => vgrename::vgrename(&r, sv, &format!("vg{n}"), "/dev/", "n").map(|_| ()),
                Op::Resize(d, m) => pvresize::pvresize(&r, *d, Bytes(m * MIB), "s").map(|_| ()),
            };
            let after = g.scan();
            prop_assert!(after.problems.is_empty(), "{o:?} {res:?}: {:#?}", after.problems);
            let sv = after.vg_by_id(&id).unwrap();
            if res.is_err() {
                prop_assert_eq!(sv.seqno(), r.vg_by_id(&id).unwrap().seqno(), "{:?} refused but wrote", o);
            }
            for d in 0..4 {
                let l = label::find(g.mem[d].as_ref()).unwrap().unwrap();
                match sv.metadata.vg.pv_by_id(&l.pv_uuid) {
                    Some(pv) => {
                        prop_assert!(l.in_use());
                        prop_assert!(sv.current.iter().any(|&(i, _)| i == d));
                        let pe = u64::from(pv.pe_count.0) * EXTENT.bytes().0 + pv.pe_start.bytes().0;
                        prop_assert!(pe <= l.device_size.0 && l.device_size.0 < pe + EXTENT.bytes().0,
                            "{o:?}: disk{d}: {} extents for {} bytes", pv.pe_count.0, l.device_size.0);
                    }
                    None => {
                        prop_assert!(!l.in_use());
                        prop_assert!(after.devices[d].mdas.iter().all(|m| m.text.is_none()));
                    }
                }
            }
        }
    }
}
