//! The changed-block walk (`Metadata::delta`) against a brute-force comparison of the two
//! devices' full mappings, after random writes, block copies between devices (equal
//! mappings in different nodes), discards, snapshots, deletes and commits (so nodes are
//! shared, shadowed and freed as in a running pool); and a count of the nodes the walk reads
//! for a 1% change of a big device.

use std::collections::BTreeMap;

use proptest::prelude::*;
use thin::meta::{Delta, DeltaKind, DeltaRange, Metadata};
use thin::{DataBlock, ThinId, VBlock};

/// Virtual blocks per device: writes of up to 300 blocks give trees of 2–3 levels.
const VOL_BLOCKS: u64 = 3000;
const DEVS: u8 = 5;

#[derive(Clone, Debug)]
enum Op {
    Write {
        dev: u8,
        start: u64,
        len: u64,
    },
    Copy {
        dev: u8,
        src: u8,
        start: u64,
        len: u64,
    },
    Discard {
        dev: u8,
        start: u64,
        len: u64,
    },
    /// Create a device with this id.
    Create(u8),
    /// Snapshot (id, origin).
    Snap(u8, u8),
    Delete(u8),
    Commit,
}

fn run() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![(0..VOL_BLOCKS, 1..8u64), (0..VOL_BLOCKS, 1..300u64),]
        .prop_map(|(s, l)| (s, l.min(VOL_BLOCKS - s)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..DEVS, run()).prop_map(|(dev, (start, len))| Op::Write { dev, start, len }),
        2 => (0..DEVS, 0..DEVS, run()).prop_map(|(dev, src, (start, len))| Op::Copy { dev, src, start, len }),
        3 => (0..DEVS, run()).prop_map(|(dev, (start, len))| Op::Discard { dev, start, len }),
        1 => (0..DEVS).prop_map(Op::Create),
        3 => (0..DEVS, 0..DEVS).prop_map(|(id, origin)| Op::Snap(id, origin)),
        1 => (0..DEVS).prop_map(Op::Delete),
        2 => Just(Op::Commit),
    ]
}

fn commit(m: &mut Metadata) {
    let p = m.prepare_commit().expect("prepare commit");
    let freed = m.finish_commit(p);
    m.release_data(&freed);
}

fn exists(m: &Metadata, id: u8) -> bool {
    m.device(ThinId(id as u32))
        .expect("device lookup")
        .is_some()
}

fn apply(m: &mut Metadata, op: &Op) {
    match *op {
        Op::Write { dev, start, len } if exists(m, dev) => {
            for v in start..start + len {
                let Some(d) = m.reserve_data() else {
                    commit(m);
                    return;
                };
                m.map_insert(ThinId(dev as u32), VBlock(v), d).expect("map");
            }
        }
        Op::Copy {
            dev,
            src,
            start,
            len,
        } if exists(m, dev) && exists(m, src) => {
            let from = m
                .map_range(
                    ThinId(src as u32),
                    VBlock(start),
                    VBlock(start + len),
                    usize::MAX,
                )
                .expect("range");
            for (v, d) in from {
                m.map_insert(ThinId(dev as u32), v, d).expect("share");
            }
        }
        Op::Discard { dev, start, len } if exists(m, dev) => {
            for v in start..start + len {
                m.map_remove(ThinId(dev as u32), VBlock(v)).expect("unmap");
            }
        }
        Op::Create(id) if !exists(m, id) => m.create_thin(ThinId(id as u32)).expect("create"),
        Op::Snap(id, origin) if !exists(m, id) && exists(m, origin) => m
            .create_snap(ThinId(id as u32), ThinId(origin as u32))
            .expect("snap"),
        Op::Delete(id) if exists(m, id) => m.delete(ThinId(id as u32)).expect("delete"),
        Op::Commit => commit(m),
        _ => {}
    }
}

/// The difference computed from both devices' complete mappings, block by block.
fn brute_force(m: &Metadata, base: ThinId, new: ThinId) -> Vec<DeltaRange> {
    let a: BTreeMap<VBlock, DataBlock> = m.all_mappings(base).expect("base").into_iter().collect();
    let b: BTreeMap<VBlock, DataBlock> = m.all_mappings(new).expect("new").into_iter().collect();
    let mut keys: Vec<VBlock> = a.keys().chain(b.keys()).copied().collect();
    keys.sort();
    keys.dedup();
    let mut out: Vec<DeltaRange> = Vec::new();
    for v in keys {
        let kind = match (a.get(&v), b.get(&v)) {
            (Some(x), Some(y)) if x == y => continue,
            (_, Some(_)) => DeltaKind::Changed,
            (Some(_), None) => DeltaKind::Unmapped,
            (None, None) => continue,
        };
        match out.last_mut() {
            Some(r) if r.kind == kind && r.start + r.len == v.0 => r.len += 1,
            _ => out.push(DeltaRange {
                start: v.0,
                len: 1,
                kind,
            }),
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn delta_equals_brute_force(ops in proptest::collection::vec(op(), 1..40)) {
        let mut m = Metadata::format(8, 1 << 16, 4096).expect("format");
        m.create_thin(ThinId(0)).expect("create 0");
        for op in &ops {
            apply(&mut m, op);
        }
        let ids: Vec<ThinId> = m.devices().expect("devices").into_iter().map(|(id, _)| id).collect();
        for &a in &ids {
            for &b in &ids {
                let d = m.delta(a, b).expect("delta");
                prop_assert_eq!(&d.ranges, &brute_force(&m, a, b), "delta {} -> {}", a, b);
                if a == b {
                    prop_assert_eq!(d.nodes_visited, 0, "a device against itself reads nothing");
                }
            }
        }
    }
}

/// A device with `n` mapped blocks, snapshotted, then `change` contiguous blocks rewritten
/// and `discard` blocks discarded elsewhere: returns the metadata and the delta.
fn big_change(n: u64, change: u64, discard: u64) -> (Metadata, Delta) {
    let mut m = Metadata::format(8, 1 << 20, 1 << 14).expect("format");
    let (vol, base, new) = (ThinId(1), ThinId(2), ThinId(3));
    m.create_thin(vol).expect("create");
    for v in 0..n {
        let d = m.reserve_data().expect("space");
        m.map_insert(vol, VBlock(v), d).expect("map");
    }
    m.create_snap(base, vol).expect("base snapshot");
    commit(&mut m);
    let first = n / 3;
    for v in first..first + change {
        let d = m.reserve_data().expect("space");
        m.map_insert(vol, VBlock(v), d).expect("rewrite");
    }
    for v in 2 * n / 3..2 * n / 3 + discard {
        m.map_remove(vol, VBlock(v)).expect("discard");
    }
    m.create_snap(new, vol).expect("new snapshot");
    commit(&mut m);
    let d = m.delta(base, new).expect("delta");
    (m, d)
}

#[test]
fn one_percent_change_reads_a_small_part_of_the_tree() {
    let n = 300_000;
    let (m, d) = big_change(n, n / 100, 10);
    let root = m.device(ThinId(3)).expect("lookup").expect("exists").root;
    let total = m.tree_nodes(root).expect("count");
    assert_eq!(
        d.ranges,
        vec![
            DeltaRange {
                start: n / 3,
                len: n / 100,
                kind: DeltaKind::Changed
            },
            DeltaRange {
                start: 2 * n / 3,
                len: 10,
                kind: DeltaKind::Unmapped
            },
        ]
    );
    // 3000 changed blocks span about 12–24 leaves of ~127–254 entries; with the paths to
    // them and the walk's lower-bound peeks the walk must stay within a few percent.
    assert!(total > 1000, "the device has {total} nodes");
    assert!(
        d.nodes_visited * 20 < total,
        "the walk read {} of {total} nodes for a 1% change",
        d.nodes_visited
    );
    assert!(d.shared_skipped > 0);
}

#[test]
fn unchanged_snapshots_read_only_the_roots_or_nothing() {
    let (_m, d) = big_change(50_000, 0, 0);
    assert!(d.ranges.is_empty());
    assert_eq!(d.nodes_visited, 0, "same root: nothing read");
}
