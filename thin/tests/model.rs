//! Reference model with snapshots: random writes, reads, discards, write-zeroes,
//! create_thin, create_snap and delete across several volumes. Every read equals the model;
//! the pool's used data blocks equal the number of distinct physical blocks the model says
//! are referenced (the model tracks block identity: provisioning and copy-on-write make new
//! identities, snapshots share them); check is clean and a reopened pool reads the same.
//!
//! With dedup on, writes draw their bytes from 4 block contents plus zeroes (so duplicates
//! are frequent, whole and partial), identity is content: used data blocks must equal the
//! number of distinct contents of mapped blocks (without an origin a block is mapped iff it
//! is not all zeroes), and index entries must equal hash records at every reopen.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use common::*;
use proptest::prelude::*;
use tables::io::BlockDevice;
use tables::{Bytes, DeviceRef, WriteFlags};
use thin::{tools, Pool, PoolOptions, ThinDevice, ThinId};

const BS: u64 = 4096; // 8-sector blocks
const VOL_BLOCKS: u64 = 24;
const VOL: u64 = VOL_BLOCKS * BS;

#[derive(Clone, Debug)]
enum Op {
    Write {
        dev: u8,
        off: u64,
        len: u64,
        val: u8,
    },
    Read {
        dev: u8,
        off: u64,
        len: u64,
    },
    Discard {
        dev: u8,
        off: u64,
        len: u64,
    },
    Zero {
        dev: u8,
        off: u64,
        len: u64,
    },
    Create {
        id: u8,
    },
    Snap {
        id: u8,
        origin: u8,
    },
    Delete {
        id: u8,
    },
    Flush,
    Reopen,
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        // Whole, block-aligned ranges.
        (0..VOL_BLOCKS, 1..4u64).prop_map(|(b, n)| (b * BS, (n * BS).min(VOL - b * BS))),
        // Arbitrary byte ranges.
        (0..VOL - 1).prop_flat_map(|o| (Just(o), 1..(3 * BS).min(VOL - o))),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..6u8, range(), any::<u8>()).prop_map(|(dev, (off, len), val)| Op::Write { dev, off, len, val }),
        4 => (0..6u8, range()).prop_map(|(dev, (off, len))| Op::Read { dev, off, len }),
        2 => (0..6u8, range()).prop_map(|(dev, (off, len))| Op::Discard { dev, off, len }),
        1 => (0..6u8, range()).prop_map(|(dev, (off, len))| Op::Zero { dev, off, len }),
        1 => (0..6u8).prop_map(|id| Op::Create { id }),
        2 => (0..6u8, 0..6u8).prop_map(|(id, origin)| Op::Snap { id, origin }),
        1 => (0..6u8).prop_map(|id| Op::Delete { id }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

/// Model of one volume: bytes, and which physical identity each mapped block has.
#[derive(Clone)]
struct Vol {
    bytes: Vec<u8>,
    map: BTreeMap<u64, u64>,
}

struct Model {
    vols: HashMap<u8, Vol>,
    next_ident: u64,
    /// External origin contents (VOL bytes, zero past the origin's end), if any.
    origin: Option<Vec<u8>>,
    /// The pool deduplicates: blocks are identified by content.
    dedup: bool,
}

/// Byte `pos` (of the volume) of dedup content `c` (0: zeroes): a whole aligned block of
/// one content is the same bytes wherever it lands.
fn dedup_byte(c: u8, pos: u64) -> u8 {
    if c == 0 {
        return 0;
    }
    let p = pos % BS;
    (p.wrapping_mul(31) ^ (p >> 5) ^ (c as u64).wrapping_mul(0x9D)) as u8 | 1
}

impl Model {
    fn refs(&self, ident: u64) -> usize {
        self.vols
            .values()
            .map(|v| v.map.values().filter(|&&i| i == ident).count())
            .sum()
    }
    fn distinct(&self) -> usize {
        if self.dedup {
            let mut s = std::collections::HashSet::new();
            for v in self.vols.values() {
                for &b in v.map.keys() {
                    s.insert(&v.bytes[(b * BS) as usize..((b + 1) * BS) as usize]);
                }
            }
            return s.len();
        }
        let mut s = std::collections::HashSet::new();
        for v in self.vols.values() {
            s.extend(v.map.values().copied());
        }
        s.len()
    }
    /// A write touching block `b` of `dev`: provision or break sharing as the pool must.
    fn touch(&mut self, dev: u8, b: u64) {
        let cur = self.vols[&dev].map.get(&b).copied();
        let fresh = match cur {
            Some(i) if self.refs(i) == 1 => return,
            _ => {
                self.next_ident += 1;
                self.next_ident
            }
        };
        self.vols.get_mut(&dev).unwrap().map.insert(b, fresh);
    }
    fn write(&mut self, dev: u8, off: u64, data: &[u8]) {
        for b in off / BS..(off + data.len() as u64).div_ceil(BS) {
            self.touch(dev, b);
        }
        let v = self.vols.get_mut(&dev).unwrap();
        v.bytes[off as usize..off as usize + data.len()].copy_from_slice(data);
        if self.dedup && self.origin.is_none() {
            // All-zero blocks are unmapped (zero-block elimination).
            let bytes = &v.bytes;
            v.map.retain(|&b, _| {
                bytes[(b * BS) as usize..((b + 1) * BS) as usize]
                    .iter()
                    .any(|&x| x != 0)
            });
        }
    }
    fn unmap(&mut self, dev: u8, first: u64, end: u64) {
        let v = self.vols.get_mut(&dev).unwrap();
        for b in first..end {
            v.map.remove(&b);
            let r = (b * BS) as usize..((b + 1) * BS) as usize;
            match &self.origin {
                Some(o) => v.bytes[r.clone()].copy_from_slice(&o[r]),
                None => v.bytes[r].fill(0),
            }
        }
    }
}

struct Live {
    meta: DeviceRef,
    data: DeviceRef,
    pool: Arc<Pool>,
    devs: HashMap<u8, Arc<ThinDevice>>,
    origin: Option<DeviceRef>,
}

impl Live {
    fn dev(&mut self, id: u8) -> Arc<ThinDevice> {
        let pool = self.pool.clone();
        self.devs
            .entry(id)
            .or_insert_with(|| {
                pool.thin(ThinId(id as u32), Bytes(VOL), self.origin.clone())
                    .unwrap()
            })
            .clone()
    }
}

/// Origin image: shorter than a volume (the tail reads as zeroes), not block aligned.
const ORIGIN_LEN: u64 = VOL - 5000;

fn run_ops(ops: &[Op], with_origin: bool, dedup: bool) -> Result<(), TestCaseError> {
    let meta: DeviceRef = mem("meta", 2 * MIB);
    let data: DeviceRef = mem("data", 4 * MIB);
    let popts = PoolOptions { dedup, ..opts(8) };
    let pool = open(meta.clone(), data.clone(), popts.clone());
    let (origin_dev, origin) = if with_origin {
        let img: Vec<u8> = (0..ORIGIN_LEN).map(|i| (i % 253) as u8 + 1).collect();
        let d = mem("origin", ORIGIN_LEN);
        d.fill(0, &img);
        let mut full = img;
        full.resize(VOL as usize, 0);
        (Some(d as DeviceRef), Some(full))
    } else {
        (None, None)
    };
    let mut live = Live {
        meta,
        data,
        pool,
        devs: HashMap::new(),
        origin: origin_dev,
    };
    let mut model = Model {
        vols: HashMap::new(),
        next_ident: 0,
        origin,
        dedup,
    };
    run(async {
        for op in ops {
            match op.clone() {
                Op::Write { dev, off, len, val } if model.vols.contains_key(&dev) => {
                    let buf: Vec<u8> = if dedup {
                        (0..len).map(|i| dedup_byte(val % 5, off + i)).collect()
                    } else {
                        (0..len).map(|i| val.wrapping_add(i as u8)).collect()
                    };
                    // SAFETY: awaited here, in block_on: completed or dropped before the buffer
                    // goes.
                    unsafe { live.dev(dev).write(Bytes(off), &buf, WriteFlags::default()) }
                        .await
                        .unwrap();
                    model.write(dev, off, &buf);
                }
                Op::Read { dev, off, len } if model.vols.contains_key(&dev) => {
                    let mut buf = vec![0u8; len as usize];
                    // SAFETY: awaited here, in block_on: completed or dropped before the buffer
                    // goes.
                    unsafe { live.dev(dev).read(Bytes(off), &mut buf) }
                        .await
                        .unwrap();
                    let want = &model.vols[&dev].bytes[off as usize..(off + len) as usize];
                    prop_assert!(buf == want, "read {dev} {off}+{len} differs from the model");
                }
                Op::Discard { dev, off, len } if model.vols.contains_key(&dev) => {
                    live.dev(dev).discard(Bytes(off), Bytes(len)).await.unwrap();
                    model.unmap(
                        dev,
                        off.div_ceil(BS),
                        ((off + len) / BS).max(off.div_ceil(BS)),
                    );
                }
                Op::Zero { dev, off, len } if model.vols.contains_key(&dev) => {
                    live.dev(dev)
                        .write_zeroes(Bytes(off), Bytes(len), WriteFlags::default())
                        .await
                        .unwrap();
                    let (first, end) = (off.div_ceil(BS), (off + len) / BS);
                    if first >= end || model.origin.is_some() {
                        model.write(dev, off, &vec![0u8; len as usize]);
                    } else {
                        let head = first * BS - off;
                        if head > 0 {
                            model.write(dev, off, &vec![0u8; head as usize]);
                        }
                        model.unmap(dev, first, end);
                        let tail = off + len - end * BS;
                        if tail > 0 {
                            model.write(dev, end * BS, &vec![0u8; tail as usize]);
                        }
                    }
                }
                Op::Create { id } => {
                    let r = live.pool.create_thin(ThinId(id as u32));
                    prop_assert_eq!(r.is_ok(), !model.vols.contains_key(&id));
                    let init = model
                        .origin
                        .clone()
                        .unwrap_or_else(|| vec![0; VOL as usize]);
                    model.vols.entry(id).or_insert(Vol {
                        bytes: init,
                        map: BTreeMap::new(),
                    });
                }
                Op::Snap { id, origin } => {
                    let r = live
                        .pool
                        .create_snap(ThinId(id as u32), ThinId(origin as u32))
                        .await;
                    let ok = !model.vols.contains_key(&id) && model.vols.contains_key(&origin);
                    prop_assert_eq!(r.is_ok(), ok, "snap {} of {}: {:?}", id, origin, r);
                    if ok {
                        let v = model.vols[&origin].clone();
                        model.vols.insert(id, v);
                    }
                }
                Op::Delete { id } => {
                    live.devs.remove(&id);
                    let r = live.pool.delete(ThinId(id as u32));
                    prop_assert_eq!(r.is_ok(), model.vols.remove(&id).is_some());
                }
                Op::Flush => live.pool.commit().await.unwrap(),
                Op::Reopen => {
                    live.pool.commit().await.unwrap();
                    live.devs.clear();
                    let r = tools::check(&live.meta).await.unwrap();
                    prop_assert!(r.clean, "{:?}", r.errors);
                    prop_assert_eq!(r.data_used as usize, model.distinct());
                    live.pool = open(live.meta.clone(), live.data.clone(), popts.clone());
                    if dedup {
                        let d = live.pool.stats().dedup.unwrap();
                        prop_assert_eq!(d.index_entries, r.hash_records);
                        prop_assert_eq!(d.index_entries, r.data_used);
                        prop_assert_eq!((r.stale_hash_records, r.duplicate_hashes), (0, 0));
                    }
                }
                _ => {}
            }
            // Pending frees are not "used": the count tracks references only.
            prop_assert_eq!(
                live.pool.stats().data_used as usize,
                model.distinct(),
                "after {:?}",
                op
            );
        }
        if std::env::var("THIN_DEBUG").is_ok() {
            eprintln!(
                "ops {} vols {} distinct {}",
                ops.len(),
                model.vols.len(),
                model.distinct()
            );
        }
        // Final: everything reads as the model, check is clean.
        live.pool.commit().await.unwrap();
        let r = tools::check(&live.meta).await.unwrap();
        prop_assert!(r.clean, "{:?}", r.errors);
        let ids: Vec<u8> = model.vols.keys().copied().collect();
        for id in ids {
            let mut buf = vec![0u8; VOL as usize];
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { live.dev(id).read(Bytes(0), &mut buf) }
                .await
                .unwrap();
            prop_assert!(
                buf == model.vols[&id].bytes,
                "volume {id} differs at the end"
            );
            let (mapped, _) = live.dev(id).mapping_stats().unwrap();
            prop_assert_eq!(mapped as usize, model.vols[&id].map.len());
        }
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn pool_matches_model(ops in proptest::collection::vec(op(), 1..160)) {
        // Start with a couple of volumes so early ops have targets.
        let mut all = vec![Op::Create { id: 0 }, Op::Create { id: 1 }];
        all.extend(ops);
        run_ops(&all, false, false)?;
    }

    #[test]
    fn pool_with_external_origin_matches_model(ops in proptest::collection::vec(op(), 1..120)) {
        let mut all = vec![Op::Create { id: 0 }, Op::Create { id: 1 }];
        all.extend(ops);
        run_ops(&all, true, false)?;
    }

    #[test]
    fn dedup_pool_matches_model(ops in proptest::collection::vec(op(), 1..160)) {
        let mut all = vec![Op::Create { id: 0 }, Op::Create { id: 1 }];
        all.extend(ops);
        run_ops(&all, false, true)?;
    }

    #[test]
    fn dedup_pool_with_external_origin_matches_model(ops in proptest::collection::vec(op(), 1..120)) {
        let mut all = vec![Op::Create { id: 0 }, Op::Create { id: 1 }];
        all.extend(ops);
        run_ops(&all, true, true)?;
    }
}
