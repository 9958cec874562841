//! Power cuts at random points: the workload runs on CrashDevices through a wrapper that
//! kills both devices after a chosen number of mutating I/Os (so cuts land inside commits,
//! between the node writes and the superblock, right after a create_snap...). Then the power
//! is cut (unflushed writes dropped or kept at random, possibly torn), the pool is reopened
//! from the devices, `check` must be clean, and every block not written since the last
//! completed flush must read back as it was at that flush, on every device that existed
//! then and was not deleted since.
//!
//! The same with dedup on (writes drawn from 4 contents plus zeroes, half of them whole
//! aligned blocks, so blocks are shared by content): besides the above, every mapped block
//! must have a hash record and hash to it (a block is never shared by two different
//! contents).
//!
//! `THIN_CUTS` sets the number of cuts (default 500, for each of the two tests).

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use common::*;
use tables::io::{BlockDevice, IoFuture};
use tables::mem::{CrashDevice, CutMode};
use tables::{Bytes, DeviceRef, IoError, WriteFlags};
use thin::dedup::{hash, HashKind};
use thin::{tools, DataBlock, Pool, PoolOptions, ThinId};

const BS: u64 = 4096;
const VOL: u64 = 32 * BS;

/// Forwards to a CrashDevice; the mutating I/O that exhausts the shared budget kills every
/// device of the test first (so it and everything after it fails).
struct Cut {
    inner: Arc<CrashDevice>,
    budget: Arc<AtomicI64>,
    all: Vec<Arc<CrashDevice>>,
}

impl Cut {
    fn tick(&self) {
        if self.budget.fetch_sub(1, Ordering::SeqCst) == 1 {
            for d in &self.all {
                d.kill();
            }
        }
    }
}

impl BlockDevice for Cut {
    fn name(&self) -> String {
        self.inner.name()
    }
    fn size(&self) -> Bytes {
        self.inner.size()
    }
    unsafe fn read<'a>(&'a self, offset: Bytes, buf: &'a mut [u8]) -> IoFuture<'a> {
        self.inner.read(offset, buf)
    }
    unsafe fn write<'a>(&'a self, offset: Bytes, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a> {
        self.tick();
        self.inner.write(offset, buf, flags)
    }
    fn flush(&self) -> IoFuture<'_> {
        self.tick();
        self.inner.flush()
    }
    fn discard(&self, offset: Bytes, len: Bytes) -> IoFuture<'_> {
        self.tick();
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: Bytes, len: Bytes, flags: WriteFlags) -> IoFuture<'_> {
        self.tick();
        self.inner.write_zeroes(offset, len, flags)
    }
}

#[derive(Clone, Default)]
struct State {
    vols: HashMap<u32, Vec<u8>>,
}

/// Runs the seeded workload until it ends or an I/O fails. Returns the model at the last
/// completed flush, the (device, block) pairs written since, and the ids whose existence
/// changed since.
/// For each (device, block) touched since the last completed flush, every content the
/// block was about to get (recorded before the I/O is issued, so a half-done request is
/// covered).
type Dirty = HashMap<(u32, u64), Vec<Vec<u8>>>;

/// Byte at volume offset `pos` of a dedup workload's content `val` (4: zeroes); whole
/// aligned blocks of one content are identical wherever they land.
fn dedup_byte(val: u8, pos: u64) -> u8 {
    if val == 4 {
        0
    } else {
        val ^ (pos as u8)
    }
}

async fn workload(
    pool: &Arc<Pool>,
    seed: u64,
    ops: usize,
    dedup: bool,
) -> (State, Dirty, HashSet<u32>) {
    let mut s = seed;
    let mut cur = State::default();
    let mut durable = State::default();
    let mut dirty: Dirty = HashMap::new();
    let mut changed: HashSet<u32> = HashSet::new();
    let mut next_id = 3u32;
    let mut held = false;
    macro_rules! flushed {
        () => {{
            durable = cur.clone();
            dirty.clear();
            changed.clear();
        }};
    }
    macro_rules! try_io {
        ($e:expr) => {
            match $e {
                Ok(v) => v,
                Err(_) => return (durable, dirty, changed),
            }
        };
    }
    for id in 0..3 {
        try_io!(pool.create_thin(ThinId(id)));
        cur.vols.insert(id, vec![0; VOL as usize]);
        changed.insert(id);
    }
    try_io!(pool.commit().await);
    flushed!();
    for _ in 0..ops {
        let ids: Vec<u32> = {
            let mut v: Vec<u32> = cur.vols.keys().copied().collect();
            v.sort();
            v
        };
        if ids.is_empty() {
            break;
        }
        let id = ids[(rng(&mut s) % ids.len() as u64) as usize];
        let dev = try_io!(pool.thin(ThinId(id), Bytes(VOL), None));
        match rng(&mut s) % 20 {
            0..=10 => {
                let (off, len, buf) = if dedup {
                    let val = (rng(&mut s) % 5) as u8;
                    let (off, len) = if rng(&mut s).is_multiple_of(2) {
                        let b = rng(&mut s) % 32;
                        (b * BS, BS * (1 + rng(&mut s) % 3).min(32 - b))
                    } else {
                        let off = rng(&mut s) % VOL;
                        (off, 1 + rng(&mut s) % (3 * BS).min(VOL - off))
                    };
                    let buf: Vec<u8> = (0..len).map(|i| dedup_byte(val, off + i)).collect();
                    (off, len, buf)
                } else {
                    let off = rng(&mut s) % VOL;
                    let len = 1 + rng(&mut s) % (3 * BS).min(VOL - off);
                    let val = rng(&mut s) as u8;
                    let buf: Vec<u8> = (0..len).map(|i| val ^ (i as u8)).collect();
                    (off, len, buf)
                };
                let fua = rng(&mut s).is_multiple_of(10);
                let flags = if fua {
                    WriteFlags::FUA
                } else {
                    WriteFlags::default()
                };
                let mut next = cur.vols[&id].clone();
                next[off as usize..(off + len) as usize].copy_from_slice(&buf);
                for b in off / BS..(off + len).div_ceil(BS) {
                    let blk = next[(b * BS) as usize..((b + 1) * BS) as usize].to_vec();
                    dirty.entry((id, b)).or_default().push(blk);
                }
                // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
                try_io!(unsafe { dev.write(Bytes(off), &buf, flags) }.await);
                cur.vols.insert(id, next);
                if fua {
                    flushed!();
                }
            }
            11 | 12 => {
                let first = rng(&mut s) % 32;
                let n = 1 + rng(&mut s) % 4;
                let end = (first + n).min(32);
                for b in first..end {
                    dirty
                        .entry((id, b))
                        .or_default()
                        .push(vec![0u8; BS as usize]);
                }
                try_io!(
                    dev.discard(Bytes(first * BS), Bytes((end - first) * BS))
                        .await
                );
                cur.vols.get_mut(&id).unwrap()[(first * BS) as usize..(end * BS) as usize].fill(0);
            }
            13..=15 => {
                try_io!(dev.flush().await);
                flushed!();
            }
            16 | 17 => {
                let nid = next_id;
                next_id += 1;
                changed.insert(nid);
                drop(dev);
                try_io!(pool.create_snap(ThinId(nid), ThinId(id)).await);
                let v = cur.vols[&id].clone();
                cur.vols.insert(nid, v);
                if rng(&mut s).is_multiple_of(2) {
                    try_io!(pool.commit().await);
                    flushed!();
                }
            }
            19 => {
                // Toggle a held metadata snapshot (messages commit: a flush point).
                drop(dev);
                let msg = if held {
                    "release_metadata_snap"
                } else {
                    "reserve_metadata_snap"
                };
                try_io!(thin::pool::pool_message(pool, &[msg.to_string()]).await);
                held = !held;
                flushed!();
            }
            _ => {
                if cur.vols.len() > 2 {
                    drop(dev);
                    changed.insert(id);
                    try_io!(pool.delete(ThinId(id)));
                    cur.vols.remove(&id);
                }
            }
        }
    }
    try_io!(pool.commit().await);
    flushed!();
    (durable, dirty, changed)
}

fn devices(
    budget: i64,
) -> (
    Arc<CrashDevice>,
    Arc<CrashDevice>,
    DeviceRef,
    DeviceRef,
    Arc<AtomicI64>,
) {
    let meta = Arc::new(CrashDevice::new("meta", Bytes(MIB)));
    let data = Arc::new(CrashDevice::new("data", Bytes(2 * MIB)));
    let b = Arc::new(AtomicI64::new(budget));
    let all = vec![meta.clone(), data.clone()];
    let m: DeviceRef = Arc::new(Cut {
        inner: meta.clone(),
        budget: b.clone(),
        all: all.clone(),
    });
    let d: DeviceRef = Arc::new(Cut {
        inner: data.clone(),
        budget: b.clone(),
        all,
    });
    (meta, data, m, d, b)
}

fn pool_opts(dedup: bool) -> PoolOptions {
    PoolOptions { dedup, ..opts(8) }
}

/// Every mapped block of a dedup pool has a record, and its bytes hash to it.
async fn blocks_match_records(m: &DeviceRef, d: &DeviceRef, what: &str) {
    let records: HashMap<DataBlock, [u64; 2]> =
        tools::hash_records(m).await.unwrap().into_iter().collect();
    let dump = tools::dump(m).await.unwrap();
    let mut buf = vec![0u8; BS as usize];
    for dev in &dump.devices {
        for r in &dev.mappings {
            for i in 0..r.len {
                let b = DataBlock(r.dblock.0 + i);
                let rec = records
                    .get(&b)
                    .unwrap_or_else(|| panic!("{what}: mapped {b} has no hash record"));
                // SAFETY: awaited here: completed or dropped before the buffer goes.
                unsafe { d.read(Bytes(b.0 * BS), &mut buf) }.await.unwrap();
                assert_eq!(
                    hash(HashKind::Blake3, &buf),
                    *rec,
                    "{what}: {b} (thin {} block {}) does not hold the content of its record",
                    dev.id.0,
                    r.vblock.0 + i
                );
            }
        }
    }
}

fn one_cut(seed: u64, total: i64, cut_seed: u64, dedup: bool) {
    let mut cs = cut_seed;
    let point = 1 + (rng(&mut cs) % total as u64) as i64;
    let (meta, data, m, d, _) = devices(point);
    let (durable, dirty, changed) = run(async {
        let pool = Pool::open(m, d, pool_opts(dedup)).await;
        match pool {
            Ok(pool) => workload(&pool, seed, 120, dedup).await,
            Err(_) => (State::default(), HashMap::new(), HashSet::new()),
        }
    });
    let mode = if rng(&mut cs).is_multiple_of(3) {
        CutMode::DropAll
    } else {
        CutMode::Random {
            seed: rng(&mut cs),
            tear: true,
        }
    };
    meta.power_cut(mode);
    data.power_cut(mode);
    let (m, d): (DeviceRef, DeviceRef) = (meta.clone(), data.clone());
    run(async {
        let pool = match Pool::open(m.clone(), d.clone(), pool_opts(dedup)).await {
            Ok(p) => p,
            Err(e) => {
                // Only acceptable if the cut came before the very first commit finished.
                assert!(
                    durable.vols.is_empty(),
                    "seed {seed} cut {point}: reopen failed: {e}"
                );
                return;
            }
        };
        let r = tools::check(&m)
            .await
            .unwrap_or_else(|e| panic!("seed {seed} cut {point}: check: {e}"));
        assert!(r.clean, "seed {seed} cut {point}: {:?}", r.errors);
        if dedup {
            blocks_match_records(&m, &d, &format!("seed {seed} cut {point}")).await;
        }
        for (id, bytes) in &durable.vols {
            if changed.contains(id) {
                continue;
            }
            let dev = pool
                .thin(ThinId(*id), Bytes(VOL), None)
                .unwrap_or_else(|e| panic!("seed {seed} cut {point}: device {id} lost: {e}"));
            let mut buf = vec![0u8; VOL as usize];
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { dev.read(Bytes(0), &mut buf) }.await.unwrap();
            for b in 0..VOL / BS {
                let r = (b * BS) as usize..((b + 1) * BS) as usize;
                let got = &buf[r.clone()];
                let old = &bytes[r];
                match dirty.get(&(*id, b)) {
                    None => assert!(
                        got == old,
                        "seed {seed} cut {point}: device {id} block {b} lost flushed data"
                    ),
                    // Written since the flush: each byte is the flushed one or one this
                    // device wrote since (writes may be torn or lost), never anything else
                    // (another device's data, a stale block).
                    Some(hist) => {
                        for i in 0..BS as usize {
                            assert!(
                                got[i] == old[i] || hist.iter().any(|h| h[i] == got[i]),
                                "seed {seed} cut {point}: device {id} block {b} byte {i} is {:#x}: neither flushed nor written by it",
                                got[i]
                            );
                        }
                    }
                }
            }
        }
    });
}

#[test]
fn power_cuts_keep_flushed_writes() {
    power_cuts(false);
}

#[test]
fn power_cuts_keep_flushed_writes_with_dedup() {
    power_cuts(true);
}

fn power_cuts(dedup: bool) {
    let cuts: u64 = std::env::var("THIN_CUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let seeds = [11u64, 22, 33, 44, 55];
    for (i, &seed) in seeds.iter().enumerate() {
        // Count the workload's mutating I/Os without a cut.
        let (_, _, m, d, budget) = devices(i64::MAX);
        run(async {
            let pool = Pool::open(m, d, pool_opts(dedup)).await.unwrap();
            workload(&pool, seed, 120, dedup).await;
            if let Some(dd) = pool.stats().dedup {
                // Otherwise the dedup variant would test nothing new.
                assert!(
                    dd.shared_blocks > 0 && dd.zero_blocks > 0,
                    "seed {seed}: the workload shared nothing: {dd:?}"
                );
            }
        });
        let total = i64::MAX - budget.load(Ordering::SeqCst);
        assert!(total > 50, "workload too small ({total} I/Os)");
        let per_seed =
            cuts / seeds.len() as u64 + u64::from((i as u64) < cuts % seeds.len() as u64);
        for c in 0..per_seed {
            one_cut(seed, total, seed * 1_000_003 + c, dedup);
        }
    }
}

#[test]
fn killed_device_fails_cleanly() {
    // The data device vanishes mid-workload: every later I/O errors, nothing panics, and the
    // pool refuses further commits rather than writing a superblock over missing data.
    let (_meta, _data, m, d, _) = devices(40);
    run(async {
        let pool = Pool::open(m, d, opts(8)).await.unwrap();
        let _ = workload(&pool, 99, 60, false).await;
        assert!(pool.commit().await.is_err());
        let _: Option<IoError> = None;
    });
}
