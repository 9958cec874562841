//! The metadata layer alone against a model, with trees deep enough to split, merge and
//! collapse while snapshots share subtrees: random runs of inserts (fresh blocks, or an
//! existing block shared dedup-style), removals, snapshots, deletes, commits and reloads.
//! Checks after every step: lookups equal the model, a lookup never claims a block is
//! exclusive while the model has another reference to it, used data blocks equal the
//! distinct blocks referenced; after each commit + reload the loaded metadata recounts
//! clean.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use proptest::prelude::*;
use tables::mem::MemDevice;
use tables::{Bytes, DeviceRef};
use thin::meta::{self, Metadata};
use thin::{DataBlock, ThinId, VBlock};

#[derive(Clone, Debug)]
enum Op {
    Run {
        dev: u8,
        start: u64,
        n: u64,
        stride: u64,
        share: bool,
    },
    Remove {
        dev: u8,
        start: u64,
        n: u64,
    },
    Snap {
        id: u8,
        origin: u8,
    },
    Delete {
        id: u8,
    },
    Create {
        id: u8,
    },
    Commit {
        reload: bool,
    },
    Hold,
    Release,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..5u8, 0..4000u64, 1..700u64, 1..4u64, any::<bool>())
            .prop_map(|(dev, start, n, stride, share)| Op::Run { dev, start, n, stride, share }),
        3 => (0..5u8, 0..4000u64, 1..900u64).prop_map(|(dev, start, n)| Op::Remove { dev, start, n }),
        2 => (0..5u8, 0..5u8).prop_map(|(id, origin)| Op::Snap { id, origin }),
        1 => (0..5u8).prop_map(|id| Op::Delete { id }),
        1 => (0..5u8).prop_map(|id| Op::Create { id }),
        2 => any::<bool>().prop_map(|reload| Op::Commit { reload }),
        1 => Just(Op::Hold),
        1 => Just(Op::Release),
    ]
}

type Model = HashMap<u8, BTreeMap<u64, u64>>;

fn refs(m: &Model, d: u64) -> usize {
    m.values()
        .map(|v| v.values().filter(|&&x| x == d).count())
        .sum()
}

fn distinct(m: &Model) -> usize {
    distinct_with(m, None)
}

/// Distinct blocks referenced by the live devices and the held metadata snapshot.
fn distinct_with(m: &Model, held: Option<&Model>) -> usize {
    let mut s = std::collections::HashSet::new();
    for v in m.values().chain(held.into_iter().flat_map(|h| h.values())) {
        s.extend(v.values().copied());
    }
    s.len()
}

fn run_ops(ops: &[Op]) -> Result<(), TestCaseError> {
    let dev: DeviceRef = Arc::new(MemDevice::new("meta", Bytes(64 << 20)));
    let mut m = Metadata::format(8, 100_000, (64 << 20) / 4096).unwrap();
    let mut model: Model = HashMap::new();
    let mut held: Option<Model> = None;
    let mut pick = 0u64;
    for op in ops {
        match op.clone() {
            Op::Run {
                dev: id,
                start,
                n,
                stride,
                share,
            } if model.contains_key(&id) => {
                for i in 0..n {
                    let v = start + i * stride;
                    let d = if share && !model[&id].is_empty() {
                        // Map to a block some device already uses (what dedup will do).
                        let all: Vec<u64> =
                            model.values().flat_map(|x| x.values().copied()).collect();
                        pick = pick
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        DataBlock(all[(pick >> 33) as usize % all.len()])
                    } else {
                        m.reserve_data().expect("space")
                    };
                    m.map_insert(ThinId(id as u32), VBlock(v), d).unwrap();
                    model.get_mut(&id).unwrap().insert(v, d.0);
                }
            }
            Op::Remove { dev: id, start, n } if model.contains_key(&id) => {
                for v in start..start + n {
                    let r = m.map_remove(ThinId(id as u32), VBlock(v)).unwrap();
                    prop_assert_eq!(r.map(|d| d.0), model.get_mut(&id).unwrap().remove(&v));
                }
            }
            Op::Snap { id, origin } => {
                let ok = !model.contains_key(&id) && model.contains_key(&origin);
                prop_assert_eq!(
                    m.create_snap(ThinId(id as u32), ThinId(origin as u32))
                        .is_ok(),
                    ok
                );
                if ok {
                    let o = model[&origin].clone();
                    model.insert(id, o);
                }
            }
            Op::Delete { id } => {
                prop_assert_eq!(
                    m.delete(ThinId(id as u32)).is_ok(),
                    model.remove(&id).is_some()
                );
            }
            Op::Create { id } => {
                prop_assert_eq!(
                    m.create_thin(ThinId(id as u32)).is_ok(),
                    !model.contains_key(&id)
                );
                model.entry(id).or_default();
            }
            Op::Hold => {
                prop_assert_eq!(m.reserve_metadata_snap().is_ok(), held.is_none());
                if held.is_none() {
                    held = Some(model.clone());
                }
            }
            Op::Release => {
                prop_assert_eq!(m.release_metadata_snap().is_ok(), held.is_some());
                held = None;
            }
            Op::Commit { reload } => {
                iort::block_on(meta::commit_offline(&*dev, &mut m))
                    .unwrap()
                    .unwrap();
                if reload {
                    let (m2, rep) = iort::block_on(meta::load(&*dev)).unwrap().unwrap();
                    prop_assert!(
                        rep.leaked.is_empty(),
                        "leaked {:?}",
                        &rep.leaked[..rep.leaked.len().min(5)]
                    );
                    prop_assert!(
                        rep.bad_mapped_counts.is_empty(),
                        "{:?}",
                        rep.bad_mapped_counts
                    );
                    m = m2;
                }
            }
            _ => {}
        }
        prop_assert_eq!(
            m.data_used() as usize,
            distinct_with(&model, held.as_ref()),
            "after {:?}",
            op
        );
        if let Some(h) = &held {
            let hd = m.held_devices().unwrap().expect("held");
            prop_assert_eq!(hd.len(), h.len());
            for (id, info) in hd {
                let got = m
                    .tree_range(info.root, VBlock(0), VBlock(u64::MAX))
                    .unwrap();
                let want: Vec<(VBlock, DataBlock)> = h[&(id.0 as u8)]
                    .iter()
                    .map(|(&v, &d)| (VBlock(v), DataBlock(d)))
                    .collect();
                prop_assert!(got == want, "held snapshot of device {} changed", id.0);
            }
        }
        // Every mapping of every device, and the exclusivity claim.
        for (id, map) in &model {
            let got = m
                .map_range(ThinId(*id as u32), VBlock(0), VBlock(u64::MAX), usize::MAX)
                .unwrap();
            let want: Vec<(VBlock, DataBlock)> = map
                .iter()
                .map(|(&v, &d)| (VBlock(v), DataBlock(d)))
                .collect();
            prop_assert!(got == want, "device {} mappings differ after {:?}", id, op);
            let (info_mapped, _) = (m.device(ThinId(*id as u32)).unwrap().unwrap().mapped, ());
            prop_assert_eq!(info_mapped as usize, map.len());
            for (&v, &d) in map.iter().step_by(37) {
                let l = m
                    .map_lookup(ThinId(*id as u32), VBlock(v))
                    .unwrap()
                    .unwrap();
                prop_assert_eq!(l.block.0, d);
                if l.exclusive {
                    let in_held = held.as_ref().map(|h| refs(h, d)).unwrap_or(0);
                    prop_assert_eq!(
                        refs(&model, d) + in_held,
                        1,
                        "block {} claimed exclusive but shared",
                        d
                    );
                }
            }
        }
    }
    iort::block_on(meta::commit_offline(&*dev, &mut m))
        .unwrap()
        .unwrap();
    let (_, rep) = iort::block_on(meta::load(&*dev)).unwrap().unwrap();
    prop_assert!(rep.leaked.is_empty() && rep.bad_mapped_counts.is_empty());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn metadata_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        let mut all = vec![Op::Create { id: 0 }, Op::Create { id: 1 }];
        all.extend(ops);
        run_ops(&all)?;
    }
}

#[test]
fn three_level_trees_with_snapshots() {
    // 120k mappings need three levels (254 entries per node).
    let dev: DeviceRef = Arc::new(MemDevice::new("meta", Bytes(64 << 20)));
    let mut m = Metadata::format(8, 400_000, (64 << 20) / 4096).unwrap();
    let mut model: Model = HashMap::new();
    m.create_thin(ThinId(0)).unwrap();
    model.insert(0, BTreeMap::new());
    let mut s = 12345u64;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    for _ in 0..120_000 {
        let v = next() % 1_000_000;
        let d = m.reserve_data().unwrap();
        m.map_insert(ThinId(0), VBlock(v), d).unwrap();
        if let Some(old) = model.get_mut(&0).unwrap().insert(v, d.0) {
            let _ = old;
        }
    }
    iort::block_on(meta::commit_offline(&*dev, &mut m))
        .unwrap()
        .unwrap();
    m.create_snap(ThinId(1), ThinId(0)).unwrap();
    model.insert(1, model[&0].clone());
    // Diverge: the origin loses a third of its mappings (merges, collapses), the snapshot
    // rewrites some (copy-on-write down shared subtrees).
    let keys: Vec<u64> = model[&0].keys().copied().collect();
    for (i, &v) in keys.iter().enumerate() {
        if i % 3 == 0 {
            m.map_remove(ThinId(0), VBlock(v)).unwrap();
            model.get_mut(&0).unwrap().remove(&v);
        } else if i % 7 == 0 {
            let d = m.reserve_data().unwrap();
            m.map_insert(ThinId(1), VBlock(v), d).unwrap();
            model.get_mut(&1).unwrap().insert(v, d.0);
        }
    }
    assert_eq!(m.data_used() as usize, distinct(&model));
    iort::block_on(meta::commit_offline(&*dev, &mut m))
        .unwrap()
        .unwrap();
    let (m2, rep) = iort::block_on(meta::load(&*dev)).unwrap().unwrap();
    assert!(rep.leaked.is_empty() && rep.bad_mapped_counts.is_empty());
    for id in 0..2u8 {
        let got = m2
            .map_range(ThinId(id as u32), VBlock(0), VBlock(u64::MAX), usize::MAX)
            .unwrap();
        let want: Vec<(VBlock, DataBlock)> = model[&id]
            .iter()
            .map(|(&v, &d)| (VBlock(v), DataBlock(d)))
            .collect();
        assert!(got == want, "device {id}");
    }
    let mut m = m2;
    m.delete(ThinId(0)).unwrap();
    model.remove(&0);
    assert_eq!(m.data_used() as usize, distinct(&model));
    m.delete(ThinId(1)).unwrap();
    assert_eq!(m.data_used(), 0);
    iort::block_on(meta::commit_offline(&*dev, &mut m))
        .unwrap()
        .unwrap();
    let (m3, _) = iort::block_on(meta::load(&*dev)).unwrap().unwrap();
    // Only the superblock and the three empty tree roots remain.
    assert_eq!(m3.meta_used(), 4);
}
