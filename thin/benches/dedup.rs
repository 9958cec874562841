//! Dedup costs, one thread, one request at a time, everything in RAM (so these are CPU
//! figures of the pool layer, not a disk's):
//!
//! 1. 4 KiB writes into fresh volumes: plain thin pool (4 KiB blocks) vs a dedup pool with
//!    unique data, 50% duplicates, all duplicates and zeroes; beside BLAKE3 of 4 KiB in
//!    memory (the hashing limit) and a 4 KiB memcpy (the memory limit).
//! 2. Plain pools with 4 KiB vs 64 KiB blocks: metadata bytes per GiB mapped, 4 KiB random
//!    writes and 1 MiB sequential writes (the cost of the block size dedup needs).
//! 3. The index and hash tree at scale (metadata only, no data device): open time (load and
//!    validate every tree, then rebuild the index) and heap bytes per record at 1 and 10 million
//!    records (`DEDUP_BENCH_RECORDS=1000000,10000000`; default 1 million).
//!
//! `cargo bench -p thin --bench dedup`; `DEDUP_BENCH_SECTIONS=write` for section 1 only
//! (`benches/dedup.sh` runs it several times and prints medians).

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tables::io::BlockDevice;
use tables::mem::MemDevice;
use tables::{Bytes, DeviceRef, WriteFlags};
use thin::dedup::{hash, HashKind};
use thin::meta::{self, IndexSize, Metadata};
use thin::{DataBlock, Pool, PoolOptions, ThinId, VBlock};

const MIB: u64 = 1 << 20;
const BS: usize = 4096;

fn rng(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Counts live heap bytes (RSS cannot tell: freed memory stays in the allocator's lists).
struct Counting;

static LIVE: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as u64, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as u64, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as u64, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_sub(l.size() as u64, Ordering::Relaxed);
        LIVE.fetch_add(new as u64, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Live heap bytes.
fn rss_bytes() -> u64 {
    LIVE.load(Ordering::Relaxed)
}

fn pool(block_sectors: u32, dedup: bool, data_bytes: u64) -> Arc<Pool> {
    let meta: DeviceRef = Arc::new(MemDevice::new("meta", Bytes(256 * MIB)));
    let data: DeviceRef = Arc::new(MemDevice::new("data", Bytes(data_bytes)));
    let o = PoolOptions {
        data_block_sectors: block_sectors,
        commit_interval: None,
        error_if_no_space: true,
        dedup,
        ..PoolOptions::default()
    };
    iort::block_on(Pool::open(meta, data, o))
        .expect("runtime")
        .expect("open")
}

/// `n` sequential 4 KiB writes of `blocks[i % blocks.len()]`; blocks per second.
fn write_blocks(p: &Arc<Pool>, id: u32, blocks: &[Vec<u8>], n: usize) -> f64 {
    p.create_thin(ThinId(id)).expect("create");
    let t = p
        .thin(ThinId(id), Bytes((n * BS) as u64), None)
        .expect("thin");
    iort::block_on(async {
        let start = Instant::now();
        for i in 0..n {
            let b = &blocks[i % blocks.len()];
            // SAFETY: the buffer outlives the awaited call.
            unsafe { t.write(Bytes((i * BS) as u64), b, WriteFlags::default()) }
                .await
                .expect("write");
        }
        let r = n as f64 / start.elapsed().as_secs_f64();
        p.commit().await.expect("commit");
        r
    })
    .expect("runtime")
}

fn unique_blocks(n: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            (0..BS / 8)
                .flat_map(|_| rng(&mut s).to_le_bytes())
                .collect()
        })
        .collect()
}

fn section_write_path() {
    const N: usize = 32768; // 128 MiB of 4 KiB writes
    let data = (N as u64 + 1024) * BS as u64;
    let uniq = unique_blocks(N, 1);
    // 50% duplicates: each content twice, in order.
    let half: Vec<Vec<u8>> = (0..N).map(|i| uniq[i / 2].clone()).collect();
    let same = vec![uniq[0].clone()];
    let zero = vec![vec![0u8; BS]];
    let mib = |r: f64| r * BS as f64 / MIB as f64;
    // Plain twice first (the first run also pays for fresh memory) and once last.
    let plain = {
        let warm = write_blocks(&pool(8, false, data), 0, &uniq, N);
        warm.max(write_blocks(&pool(8, false, data), 0, &uniq, N))
    };
    let plain_first = plain;
    println!("4 KiB writes, {N} per row (blocks/s, MiB/s, ratio to plain thin):");
    println!(
        "  plain thin (4 KiB blocks)  {:>9.0}/s {:>7.0} MiB/s  1.00",
        plain,
        mib(plain)
    );
    for (name, blocks) in [
        ("dedup, unique", &uniq),
        ("dedup, 50% duplicates", &half),
        ("dedup, all duplicates", &same),
        ("dedup, zeroes", &zero),
    ] {
        let r = write_blocks(&pool(8, true, data), 0, blocks, N);
        println!(
            "  {name:<26} {:>9.0}/s {:>7.0} MiB/s  {:.2}",
            r,
            mib(r),
            r / plain
        );
    }
    let plain_last = write_blocks(&pool(8, false, data), 0, &uniq, N);
    println!("  plain thin again            {plain_last:>9.0}/s (first {plain_first:.0}/s)");
    let t = Instant::now();
    for b in &uniq {
        black_box(hash(HashKind::Blake3, black_box(b)));
    }
    let h = N as f64 / t.elapsed().as_secs_f64();
    let mut dst = vec![0u8; BS];
    let t = Instant::now();
    for _ in 0..8 {
        for b in &uniq {
            dst.copy_from_slice(black_box(b));
            black_box(&dst);
        }
    }
    let c = 8.0 * N as f64 / t.elapsed().as_secs_f64();
    println!(
        "  BLAKE3 of 4 KiB in memory  {:>9.0}/s {:>7.0} MiB/s  (dedup unique = {:.2}x of it)",
        h,
        mib(h),
        write_blocks(&pool(8, true, data), 0, &uniq, N) / h
    );
    println!(
        "  memcpy of 4 KiB            {:>9.0}/s {:>7.0} MiB/s",
        c,
        mib(c)
    );
}

fn section_block_size() {
    const VOL: u64 = 512 * MIB;
    println!(
        "plain pools, 4 KiB vs 64 KiB blocks ({} MiB volume):",
        VOL / MIB
    );
    for sectors in [8u32, 128] {
        let bs = sectors as u64 * 512;
        let p = pool(sectors, false, 2 * VOL + 64 * MIB);
        p.create_thin(ThinId(0)).expect("create");
        let t = p.thin(ThinId(0), Bytes(VOL), None).expect("thin");
        let big = vec![0x77u8; MIB as usize];
        let small = vec![0x55u8; BS];
        let (seq, meta_used, rnd) = iort::block_on(async {
            let start = Instant::now();
            for i in 0..VOL / MIB {
                // SAFETY: the buffer outlives the awaited call.
                unsafe { t.write(Bytes(i * MIB), &big, WriteFlags::default()) }
                    .await
                    .expect("write");
            }
            let seq = (VOL / MIB) as f64 / start.elapsed().as_secs_f64();
            p.commit().await.expect("commit");
            let meta_used = p.stats().meta_used;
            // 4 KiB random writes into a second, empty volume (provisioning).
            p.create_thin(ThinId(1)).expect("create");
            let t1 = p.thin(ThinId(1), Bytes(VOL), None).expect("thin");
            let mut s = 7u64;
            let n = 20000;
            let start = Instant::now();
            for _ in 0..n {
                let off = rng(&mut s) % (VOL / BS as u64) * BS as u64;
                // SAFETY: as above.
                unsafe { t1.write(Bytes(off), &small, WriteFlags::default()) }
                    .await
                    .expect("write");
            }
            (seq, meta_used, n as f64 / start.elapsed().as_secs_f64())
        })
        .expect("runtime");
        // Metadata blocks beyond the empty pool's few, per GiB mapped.
        let per_gib = (meta_used as f64 * 4096.0) / (VOL as f64 / 1024.0 / MIB as f64);
        println!(
            "  {:>2} KiB blocks: metadata {:>9.0} bytes per GiB mapped ({:.1} bytes per block), 1 MiB seq writes {:>6.0} MiB/s, 4 KiB random writes {:>7.0}/s",
            bs / 1024,
            per_gib,
            meta_used as f64 * 4096.0 / (VOL / bs) as f64,
            seq,
            rnd
        );
    }
}

/// RSS of a loaded plain pool's metadata with `n` mappings (to tell the hash tree's share).
fn plain_resident(n: u64) -> u64 {
    let nr_meta = (n / 40).max(1024) + 4096;
    let dev: DeviceRef = Arc::new(MemDevice::new("meta", Bytes(nr_meta * 4096)));
    let mut m = Metadata::format(8, n + 16, nr_meta).expect("format");
    m.create_thin(ThinId(0)).expect("create");
    for i in 0..n {
        m.map_insert(ThinId(0), VBlock(i), DataBlock(i))
            .expect("insert");
    }
    iort::block_on(meta::commit_offline(&*dev, &mut m))
        .expect("runtime")
        .expect("commit");
    drop(m);
    let rss0 = rss_bytes();
    let (m, _) = iort::block_on(meta::load(&*dev))
        .expect("runtime")
        .expect("load");
    let r = rss_bytes().saturating_sub(rss0);
    drop(m);
    r
}

fn section_index_scale(n: u64) {
    let plain = plain_resident(n);
    let nr_meta = (n / 40).max(1024) + 4096;
    let dev: DeviceRef = Arc::new(MemDevice::new("meta", Bytes(nr_meta * 4096)));
    let start = Instant::now();
    let mut m = Metadata::format(8, n + 16, nr_meta).expect("format");
    m.enable_dedup(IndexSize::AllBlocks).expect("dedup");
    m.create_thin(ThinId(0)).expect("create");
    for i in 0..n {
        let h = [rng(&mut (i + 1)), rng(&mut (i + 2))];
        m.dedup_map_unique(ThinId(0), VBlock(i), DataBlock(i), &h)
            .expect("insert");
    }
    iort::block_on(meta::commit_offline(&*dev, &mut m))
        .expect("runtime")
        .expect("commit");
    let built = start.elapsed();
    let used = m.meta_used();
    drop(m);
    let rss0 = rss_bytes();
    let t = Instant::now();
    let (mut m, _) = iort::block_on(meta::load(&*dev))
        .expect("runtime")
        .expect("load");
    let load = t.elapsed();
    let rss1 = rss_bytes();
    let t = Instant::now();
    m.enable_dedup(IndexSize::AllBlocks).expect("dedup");
    let rebuild = t.elapsed();
    let rss2 = rss_bytes();
    let s = m.dedup_meta_stats().expect("stats");
    let nf = n as f64;
    println!(
        "{n} records (built in {:.1} s): {used} metadata blocks ({:.1} bytes/record on disk for mapping + hash trees)",
        built.as_secs_f64(),
        used as f64 * 4096.0 / nf
    );
    println!(
        "  open: load+validate {:.2} s, index rebuild {:.2} s; heap: trees resident {:.1} bytes/record (mapping + hash tree), index {:.1} bytes/record ({} bytes of slots)",
        load.as_secs_f64(),
        rebuild.as_secs_f64(),
        rss1.saturating_sub(rss0) as f64 / nf,
        rss2.saturating_sub(rss1) as f64 / nf,
        s.index_bytes
    );
    println!(
        "  of which the hash tree {:.1} bytes/record (a plain pool with the same mappings: {:.1} bytes/mapping resident)",
        (rss1.saturating_sub(rss0) as f64 - plain as f64) / nf,
        plain as f64 / nf
    );
    println!(
        "  extrapolated to 1 TiB of 4 KiB blocks (268M records): open {:.0} s, RAM {:.1} GiB",
        (load + rebuild).as_secs_f64() * 268_435_456.0 / nf,
        rss2.saturating_sub(rss0) as f64 * 268_435_456.0 / nf / (1u64 << 30) as f64
    );
}

fn main() {
    // `DEDUP_BENCH_SECTIONS=write,blocks,index` (default: all) picks sections
    // (benches/dedup.sh runs only `write`, several times).
    let sections = std::env::var("DEDUP_BENCH_SECTIONS").unwrap_or_else(|_| "all".into());
    let on = |s: &str| sections == "all" || sections.split(',').any(|x| x.trim() == s);
    if on("write") {
        section_write_path();
    }
    if on("blocks") {
        section_block_size();
    }
    if !on("index") {
        return;
    }
    let counts = std::env::var("DEDUP_BENCH_RECORDS").unwrap_or_else(|_| "1000000".into());
    for n in counts
        .split(',')
        .filter_map(|x| x.trim().parse::<u64>().ok())
    {
        section_index_scale(n);
    }
}
