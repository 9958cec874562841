//! Power cuts during metadata updates of a VG on 2 to 4 PVs (`tables::mem::CrashDevice`).
//!
//! A seeded workload formats the PVs (some with two metadata areas, all with small areas so
//! the text wraps around the ring often), writes the VG's first version, then commits a series
//! of changes (LVs added, removed, retagged: the text grows and shrinks). Every mutating I/O
//! spends one unit of a shared budget; the one that exhausts it kills every device, so the cut
//! lands anywhere: inside a text write, between the text and the precommit, between two PVs'
//! commit writes, inside the first version's label updates. Then the power is cut (unflushed
//! writes dropped, or kept at random and possibly torn at a sector), sometimes one PV stays
//! dead, and the devices are scanned:
//!
//! - no damaged label, header or text is ever visible, and no two copies conflict;
//! - every metadata copy on every PV that answers is the last committed version or the one in
//!   flight, and the scan's VG is exactly the newest of those that exists on some PV;
//! - with every PV back, the next commit succeeds and leaves every copy on the new seqno.
//!
//! `LVM_CUTS` sets the number of cuts (default 200).

use std::sync::atomic::Ordering;

use lvm::commit;
use lvm::model::{Flags, Metadata};
use lvm::pvcreate::{self, PvCreateOptions};
use lvm::scan::{self, Problem, ScanReport};
use lvm::text::{Item, Value};
use lvm::{Extents, LogicalVolume, Segment, Uuid, VolumeGroup};
use tables::{Bytes, DeviceRef, Sectors};

mod common;
use common::{first_free, new_vg, pv_entry};
#[path = "common/cut.rs"]
mod cut;
use cut::{rig, rng, Rig};

const MIB: u64 = 1 << 20;
const PV_SIZE: u64 = 4 * MIB;
const EXTENT: Sectors = Sectors(8);
/// Commits after the first version.
const STEPS: u32 = 16;

impl Rig {
    /// The workload stops at an error, which must be the cut.
    fn stopped(&self, o: Outcome, e: lvm::Error) -> Outcome {
        assert!(
            self.budget.load(Ordering::SeqCst) <= 0,
            "failed before the cut: {e}"
        );
        o
    }
}

/// What the workload got to: the last version every PV holds durably, and the one being
/// written when the devices died.
struct Outcome {
    committed: Option<Metadata>,
    in_flight: Option<Metadata>,
    /// Copies written that wrapped around the end of their ring.
    wraps: usize,
}

fn new_lv(vg: &VolumeGroup, s: &mut u64, n: usize) -> Option<LogicalVolume> {
    let key = vg.physical_volumes[(rng(s) % vg.physical_volumes.len() as u64) as usize]
        .key
        .clone();
    let count = 1 + (rng(s) % 20) as u32;
    let start = first_free(vg, &key, count)?;
    let tags: Vec<Value> = (0..rng(s) % 80)
        .map(|i| Value::Str(format!("tag{i}_{}", rng(s))))
        .collect();
    Some(LogicalVolume {
        name: format!("lv{n}"),
        id: Uuid::generate(),
        status: Flags::of(&["READ", "WRITE", "VISIBLE"]),
        flags: Flags::default(),
        creation_time: Some(1_700_000_000 + n as u64),
        creation_host: Some("cut".into()),
        segments: vec![Segment::linear(Extents(0), Extents(count), &key, start)],
        extra: vec![("tags".into(), Item::Array(tags))],
    })
}

/// The seeded workload; stops at the first failure (the cut).
fn workload(r: &Rig, seed: u64) -> Outcome {
    let mut s = seed;
    let mut out = Outcome {
        committed: None,
        in_flight: None,
        wraps: 0,
    };
    let mut pvs = Vec::new();
    for (i, d) in r.cut.iter().enumerate() {
        let opts = PvCreateOptions {
            metadata_size: Sectors(64 + 8 * (rng(&mut s) % 3)),
            metadata_copies: 1 + (rng(&mut s) % 2) as u32,
            data_alignment: Sectors(8),
            ..PvCreateOptions::default()
        };
        let l = match pvcreate::pvcreate(d.as_ref(), &opts) {
            Ok(l) => l,
            Err(e) => return r.stopped(out, e),
        };
        pvs.push(pv_entry(
            &format!("pv{i}"),
            &l,
            Bytes(PV_SIZE),
            EXTENT,
            Some(d.name()),
        ));
    }
    let vg = new_vg("cutvg", EXTENT, pvs);
    let mut md = Metadata {
        vg,
        description: "first".into(),
        creation_host: "cut".into(),
        creation_time: 1_700_000_000,
        extra: Vec::new(),
    };
    out.in_flight = Some(md.clone());
    if let Err(e) = commit::create(&r.cut, &md) {
        return r.stopped(out, e);
    }
    out.committed = out.in_flight.take();
    let mut n = 0;
    for step in 0..STEPS {
        let report = scan::scan(&r.cut);
        let Some(cur) = report.vg("cutvg") else {
            return out;
        };
        md = cur.metadata.clone();
        match rng(&mut s) % 4 {
            // At most 5 LVs keep the text under the smallest area's limit (15616 bytes).
            k if md.vg.logical_volumes.len() >= 5
                || (k == 0 && md.vg.logical_volumes.len() > 1) =>
            {
                let k = (rng(&mut s) % md.vg.logical_volumes.len() as u64) as usize;
                md.vg.logical_volumes.remove(k);
            }
            1 if !md.vg.logical_volumes.is_empty() => {
                let lv = &mut md.vg.logical_volumes[0];
                let tags = (0..rng(&mut s) % 60)
                    .map(|i| Value::Str(format!("t{i}")))
                    .collect();
                lv.extra = vec![("tags".into(), Item::Array(tags))];
            }
            _ => {
                n += 1;
                if let Some(lv) = new_lv(&md.vg, &mut s, n) {
                    md.vg.logical_volumes.push(lv);
                }
            }
        }
        md.description = format!("step {step}");
        let mut next = md.clone();
        next.vg.seqno = md.vg.seqno + 1;
        out.in_flight = Some(next);
        let done = match commit::commit(&report, &mut md) {
            Ok(d) => d,
            Err(e) => return r.stopped(out, e),
        };
        for c in &done.copies {
            let area = report
                .devices
                .iter()
                .filter(|d| d.name == c.device)
                .flat_map(|d| d.mdas.iter())
                .find(|m| m.area.offset.0 == c.area)
                .map(|m| m.area.size.0)
                .unwrap();
            if c.locn.offset + c.locn.size > area {
                out.wraps += 1;
            }
        }
        assert_eq!(Some(&md), out.in_flight.as_ref());
        out.committed = out.in_flight.take();
    }
    out
}

fn seqno_of(m: &Option<Metadata>) -> Option<u32> {
    m.as_ref().map(|m| m.vg.seqno)
}

fn check(report: &ScanReport, o: &Outcome, dead: Option<usize>, ctx: &str) {
    for p in &report.problems {
        match p {
            Problem::Unreadable(e) if dead.is_some_and(|d| e.device == format!("pv{d}dev")) => {}
            Problem::MissingPv { .. } if dead.is_some() => {}
            Problem::Stale { .. } | Problem::Uncommitted { .. } => {}
            _ => panic!("{ctx}: {p}"),
        }
    }
    let allowed = [seqno_of(&o.committed), seqno_of(&o.in_flight)];
    // Every copy on every PV that answers is the committed or the in-flight version.
    let mut newest = None;
    for d in &report.devices {
        for m in &d.mdas {
            if let Some(t) = &m.text {
                let sq = t.metadata.vg.seqno;
                assert!(
                    allowed.contains(&Some(sq)),
                    "{ctx}: {} has seqno {sq}",
                    d.name
                );
                let want = if Some(sq) == seqno_of(&o.committed) {
                    &o.committed
                } else {
                    &o.in_flight
                };
                assert_eq!(Some(&t.metadata), want.as_ref(), "{ctx}: {}", d.name);
                newest = newest.max(Some(sq));
            }
        }
    }
    match (report.vg("cutvg"), newest) {
        (None, None) => {}
        (Some(vg), Some(n)) => assert_eq!(vg.seqno(), n, "{ctx}"),
        (vg, n) => panic!(
            "{ctx}: scan found {:?}, copies go up to {n:?}",
            vg.map(|v| v.seqno())
        ),
    }
    // With every PV answering, the last committed version is never lost.
    if dead.is_none() {
        if let Some(c) = seqno_of(&o.committed) {
            assert!(newest >= Some(c), "{ctx}: committed seqno {c} lost");
        }
    }
}

fn one_cut(seed: u64) {
    // Dry run: how many mutating I/Os the whole workload takes.
    let r = rig(2 + (seed % 3) as usize, PV_SIZE);
    workload(&r, seed);
    let total = i64::MAX - r.budget.load(Ordering::SeqCst);

    let mut cs = seed ^ 0x5555;
    let point = 1 + (rng(&mut cs) % total as u64) as i64;
    let r = rig(2 + (seed % 3) as usize, PV_SIZE);
    r.budget.store(point, Ordering::SeqCst);
    let o = workload(&r, seed);
    let mode = r.cut_power(&mut cs);
    let dead = rng(&mut cs)
        .is_multiple_of(5)
        .then(|| (rng(&mut cs) % r.crash.len() as u64) as usize);
    if let Some(d) = dead {
        r.crash[d].kill();
    }
    let devs: Vec<DeviceRef> = r.crash.iter().map(|c| c.clone() as DeviceRef).collect();
    let ctx = format!("seed {seed}, cut at I/O {point} of {total}, {mode:?}, dead {dead:?}");
    let report = scan::scan(&devs);
    check(&report, &o, dead, &ctx);

    // Everything back: the next commit works and repairs every copy.
    if dead.is_some() {
        return;
    }
    let Some(vg) = report.vg("cutvg") else {
        return;
    };
    let mut md = vg.metadata.clone();
    md.description = "after the cut".into();
    let done = commit::commit(&report, &mut md).unwrap_or_else(|e| panic!("{ctx}: {e}"));
    let report = scan::scan(&devs);
    assert!(report.problems.is_empty(), "{ctx}: {:?}", report.problems);
    let vg = report.vg("cutvg").unwrap();
    assert_eq!(vg.seqno(), done.seqno);
    assert!(vg.stale.is_empty());
}

#[test]
fn every_cut_leaves_old_or_new_on_every_pv() {
    let cuts = cut::cuts(200);
    for seed in 0..cuts {
        one_cut(seed);
    }
}

#[test]
fn uncut_workload_commits_every_step() {
    let r = rig(3, PV_SIZE);
    let o = workload(&r, 7);
    assert!(o.in_flight.is_none());
    assert_eq!(seqno_of(&o.committed), Some(STEPS + 1));
    assert!(o.wraps > 0, "the workload should wrap its rings around");
    let report = scan::scan(&r.cut);
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}
