//! Power cuts during the VG/PV verbs' writes: vgextend, vgreduce, vgrename, pvresize and
//! vgcfgrestore (over damaged copies), on 3-4 PVs (`tables::mem::CrashDevice`s behind the
//! shared budget of `common/cut.rs`). Each verb's mutating I/Os are counted once; then the cut
//! lands at every one of them (seeds 0 and 1) or at a random one (other seeds), unflushed
//! writes are dropped or kept and torn, and the devices are scanned:
//!
//! - every copy of the VG on every PV is the version before the verb or the one it wrote
//!   (compared whole), and the scan's VG is the newest of those that exists;
//! - nothing else is wrong beyond what a cut may leave (stale copies, an interrupted
//!   precommit, for vgreduce the removed PV's old copy, for vgcfgrestore the damage it was
//!   repairing);
//! - `vgck --updatemetadata` ([`lvm::repair::update_metadata`]) then leaves the scan clean,
//!   with the VG as before or as after the verb, and a removed PV an orphan.
//!
//! `LVM_CUTS` sets the number of random cuts per verb (default 40).

use std::sync::atomic::Ordering;

use lvm::commit;
use lvm::label;
use lvm::model::{Metadata, VolumeGroup};
use lvm::pvcreate::{self, PvCreateOptions};
use lvm::scan::{self, Problem, ScanReport};
use lvm::text::Style;
use lvm::{pvresize, repair, restore, vgextend, vgreduce, vgrename, Extents, Uuid};
use tables::io::BlockDevice;
use tables::{Bytes, DeviceRef, Sectors};

mod common;
use common::{linear_lv, new_vg, pv_entry};
#[path = "common/cut.rs"]
mod cut;
use cut::{rig, rng, Rig};

const MIB: u64 = 1 << 20;
const PV_SIZE: u64 = 4 * MIB;
const EXTENT: Sectors = Sectors(8);
/// Devices: 0-2 in the VG, 3 an orphan PV.
const DEVS: usize = 4;
/// pvresize's new size for PV 0.
const SHRUNK: u64 = 3 * MIB;

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Verb {
    Extend,
    Reduce,
    Rename,
    Resize,
    Restore,
}

const VERBS: [Verb; 5] = [
    Verb::Extend,
    Verb::Reduce,
    Verb::Rename,
    Verb::Resize,
    Verb::Restore,
];

/// The state before the verb: the VG (uuid, metadata), a backup taken one version earlier,
/// and the metadata areas damaged on purpose (restore's case).
struct Before {
    id: Uuid,
    md: Metadata,
    backup: Metadata,
    damaged: Vec<String>,
}

fn scan_all(devs: &[DeviceRef]) -> ScanReport {
    scan::scan(devs)
}

/// Formats the PVs, writes the VG (LV `a` at the start of PV 0, LV `b` on PV 1; PV 2 empty),
/// one more version, and for restore damages two PVs' metadata. No cut happens here.
fn setup(r: &Rig, seed: u64, verb: Verb) -> Before {
    let mut s = seed;
    let mut pvs = Vec::new();
    for (i, d) in r.cut.iter().enumerate() {
        let opts = PvCreateOptions {
            metadata_size: Sectors(64 + 8 * (rng(&mut s) % 3)),
            // PV 0 is resized: one area (a second one at the end is not resized here).
            metadata_copies: if i == 0 {
                1
            } else {
                1 + (rng(&mut s) % 2) as u32
            },
            data_alignment: Sectors(8),
            ..PvCreateOptions::default()
        };
        let l = pvcreate::pvcreate(d.as_ref(), &opts).unwrap();
        pvs.push(pv_entry(
            &format!("pv{i}"),
            &l,
            Bytes(PV_SIZE),
            EXTENT,
            Some(d.name()),
        ));
    }
    pvs.truncate(3);
    let mut vg = new_vg("cutvg", EXTENT, pvs);
    let a = linear_lv(&vg, "a", "pv0", 5 + (rng(&mut s) % 20) as u32);
    vg.logical_volumes.push(a);
    let md = Metadata {
        vg,
        description: "first".into(),
        creation_host: "cut".into(),
        creation_time: 1_700_000_000,
        extra: Vec::new(),
    };
    commit::create(&r.cut[..3], &md).unwrap();
    let rep = scan_all(&r.cut);
    let backup = text_round_trip(&rep.vg("cutvg").unwrap().metadata);
    let mut md = rep.vg("cutvg").unwrap().metadata.clone();
    let b = linear_lv(&md.vg, "b", "pv1", 3);
    md.vg.logical_volumes.push(b);
    md.description = "second".into();
    commit::commit(&rep, &mut md).unwrap();
    let mut damaged = Vec::new();
    if verb == Verb::Restore {
        // PV 0: its text garbled; PV 1: its first header's crc broken.
        let rep = scan_all(&r.cut);
        let l0 = rep.devices[0].label.clone().unwrap();
        let h = rep.devices[0].mdas[0].header.clone().unwrap();
        let junk = vec![b'#'; h.committed.size as usize];
        lvm::io::write_at(
            r.cut[0].as_ref(),
            l0.metadata_areas[0].offset.0 + h.committed.offset,
            &junk,
            true,
        )
        .unwrap();
        let l1 = rep.devices[1].label.clone().unwrap();
        let mut sector = rep.devices[1].mdas[0].header.clone().unwrap().to_sector();
        sector[300] ^= 0x40;
        lvm::io::write_at(
            r.cut[1].as_ref(),
            l1.metadata_areas[0].offset.0,
            &sector,
            true,
        )
        .unwrap();
        damaged = vec![r.cut[0].name(), r.cut[1].name()];
    }
    let rep = scan_all(&r.cut);
    let sv = rep.vg("cutvg").unwrap();
    Before {
        id: sv.id(),
        md: sv.metadata.clone(),
        backup,
        damaged,
    }
}

/// A backup as `vgcfgbackup` writes it and `vgcfgrestore` reads it.
fn text_round_trip(md: &Metadata) -> Metadata {
    Metadata::from_text(md.to_text(Style::File).unwrap().as_bytes()).unwrap()
}

/// The VG the verb writes (seqno aside).
fn expected(r: &Rig, b: &Before, verb: Verb) -> VolumeGroup {
    let mut vg = b.md.vg.clone();
    match verb {
        Verb::Extend => {
            let l = label::find(r.crash[3].as_ref()).unwrap().unwrap();
            let new = vgextend::NewPv {
                label: l,
                size: Bytes(PV_SIZE),
                device: Some(r.crash[3].name()),
            };
            vgextend::add_pvs(&mut vg, &[new]).unwrap();
        }
        Verb::Reduce => {
            let id = vg.physical_volumes[2].id;
            vgreduce::remove_pvs(&mut vg, &[id]).unwrap();
        }
        Verb::Rename => vg.name = "renamed".into(),
        Verb::Resize => {
            let pv = &mut vg.physical_volumes[0];
            let usable = SHRUNK - pv.pe_start.bytes().0;
            pv.pe_count = Extents((usable / EXTENT.bytes().0) as u32);
            pv.dev_size = Some(Bytes(usable).sectors_floor());
        }
        Verb::Restore => vg = b.backup.vg.clone(),
    }
    vg.seqno = b.md.vg.seqno + 1;
    vg
}

/// Runs the verb on the devices behind the budget.
fn run(r: &Rig, b: &Before, verb: Verb) -> Result<(), lvm::Error> {
    let rep = scan_all(&r.cut);
    let sv = rep.vg_by_id(&b.id).expect("the VG before the verb");
    match verb {
        Verb::Extend => {
            let d = &rep.devices[3];
            let new = vgextend::NewPv {
                label: d.label.clone().unwrap(),
                size: d.size,
                device: Some(d.name.clone()),
            };
            let mut md = sv.metadata.clone();
            vgextend::add_pvs(&mut md.vg, &[new])?;
            md.stamp("extend");
            commit::commit(&rep, &mut md).map(|_| ())
        }
        Verb::Reduce => {
            let id = sv.metadata.vg.physical_volumes[2].id;
            vgreduce::vgreduce(&rep, sv, &[id], "reduce").map(|_| ())
        }
        Verb::Rename => vgrename::vgrename(&rep, sv, "renamed", "/dev/", "rename").map(|_| ()),
        Verb::Resize => pvresize::pvresize(&rep, 0, Bytes(SHRUNK), "resize").map(|_| ()),
        Verb::Restore => {
            let mut md = b.backup.clone();
            md.stamp("restore");
            restore::restore(&rep, &mut md, false).map(|_| ())
        }
    }
}

/// The checks of the module doc, after the cut and after the repair.
fn check(r: &Rig, b: &Before, verb: Verb, new: &VolumeGroup, ctx: &str) {
    let devs: Vec<DeviceRef> = r.crash.iter().map(|c| c.clone() as DeviceRef).collect();
    let rep = scan::scan(&devs);
    for p in &rep.problems {
        let ok = match p {
            Problem::Stale { .. } | Problem::Uncommitted { .. } => true,
            Problem::NotInVg { device, .. } => verb == Verb::Reduce && *device == r.crash[2].name(),
            Problem::BadMetadataArea(e) => b.damaged.contains(&e.device),
            Problem::BadText { device, .. } => b.damaged.contains(device),
            _ => false,
        };
        assert!(ok, "{ctx}: {p}");
    }
    let old = &b.md.vg;
    let mut newest = None;
    for d in &rep.devices {
        for m in &d.mdas {
            let Some(t) = &m.text else { continue };
            let vg = &t.metadata.vg;
            assert_eq!(vg.id, b.id, "{ctx}: {} holds another VG", d.name);
            let want = if vg.seqno == old.seqno { old } else { new };
            assert_eq!(vg, want, "{ctx}: {} holds neither version", d.name);
            newest = newest.max(Some(vg.seqno));
        }
    }
    let sv = rep
        .vg_by_id(&b.id)
        .unwrap_or_else(|| panic!("{ctx}: VG lost"));
    assert_eq!(Some(sv.seqno()), newest, "{ctx}");
    // While the VG still lists the removed PV, the PV is untouched.
    if verb == Verb::Reduce && sv.seqno() == old.seqno {
        let l = rep.devices[2].label.as_ref().unwrap();
        assert!(sv.metadata.vg.pv_by_id(&l.pv_uuid).is_some(), "{ctx}");
    }

    // vgck --updatemetadata: clean, and the VG is the old or the new one.
    let up =
        repair::update_metadata(&rep, &b.id, "repair").unwrap_or_else(|e| panic!("{ctx}: {e}"));
    let rep = scan::scan(&devs);
    assert!(
        rep.problems.is_empty(),
        "{ctx}: after repair: {:#?}",
        rep.problems
    );
    let mut vg = rep.vg_by_id(&b.id).unwrap().metadata.vg.clone();
    assert_eq!(vg.seqno, up.committed.seqno, "{ctx}");
    let unnumbered = |v: &VolumeGroup| VolumeGroup {
        seqno: 0,
        ..v.clone()
    };
    vg.seqno = 0;
    let is_new = vg == unnumbered(new);
    assert!(
        is_new || vg == unnumbered(old),
        "{ctx}: repaired into a third VG"
    );
    if verb == Verb::Reduce && is_new {
        let l = label::find(r.crash[2].as_ref()).unwrap().unwrap();
        assert!(!l.in_use(), "{ctx}: the removed PV is still marked used");
        assert!(
            rep.devices[2].mdas.iter().all(|m| m.text.is_none()),
            "{ctx}"
        );
    }
}

fn one_cut(verb: Verb, seed: u64, point: Option<i64>) {
    // Dry run: how many mutating I/Os the verb takes.
    let r = rig(DEVS, PV_SIZE);
    let b = setup(&r, seed, verb);
    let before = r.budget.load(Ordering::SeqCst);
    run(&r, &b, verb).unwrap_or_else(|e| panic!("{verb:?} seed {seed}: uncut: {e}"));
    let total = before - r.budget.load(Ordering::SeqCst);
    assert!(total > 0, "{verb:?} wrote nothing");
    let points: Vec<i64> = match point {
        Some(p) => vec![p],
        None => (1..=total).collect(),
    };
    let mut cs = seed ^ 0x5a5a;
    for p in points {
        let p = if point.is_some() {
            1 + (rng(&mut cs) % total as u64) as i64
        } else {
            p
        };
        let r = rig(DEVS, PV_SIZE);
        let b = setup(&r, seed, verb);
        let new = expected(&r, &b, verb);
        r.budget.store(p, Ordering::SeqCst);
        assert!(
            run(&r, &b, verb).is_err(),
            "{verb:?}: the cut at {p} of {total} missed"
        );
        let mode = r.cut_power(&mut cs);
        let ctx = format!("{verb:?}, seed {seed}, cut at I/O {p} of {total}, {mode:?}");
        check(&r, &b, verb, &new, &ctx);
    }
}

#[test]
fn every_cut_leaves_the_vg_before_or_after_each_verb() {
    let cuts = cut::cuts(40);
    for verb in VERBS {
        // Every I/O of two layouts, then random ones.
        one_cut(verb, 0, None);
        one_cut(verb, 1, None);
        for seed in 2..cuts {
            one_cut(verb, seed, Some(0));
        }
    }
}

#[test]
fn uncut_verbs_leave_the_expected_vg() {
    for verb in VERBS {
        let r = rig(DEVS, PV_SIZE);
        let b = setup(&r, 3, verb);
        let new = expected(&r, &b, verb);
        run(&r, &b, verb).unwrap();
        let rep = scan_all(&r.cut);
        let ok = |p: &Problem| verb == Verb::Restore && matches!(p, Problem::BadMetadataArea(_));
        assert!(rep.problems.iter().all(ok), "{verb:?}: {:#?}", rep.problems);
        assert_eq!(rep.vg_by_id(&b.id).unwrap().metadata.vg, new, "{verb:?}");
    }
}
