//! Snapshot creation time against volume size, and metadata bytes per mapped block.
//!
//! `cargo bench -p thin --bench snap`. The data device is a null device (writes dropped,
//! reads zero): only the metadata path is measured. Metadata lives on a MemDevice.
//! `THIN_BENCH_PROVISIONS` overrides the 1M provisions of the space measurement.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tables::io::{BlockDevice, IoFuture};
use tables::mem::MemDevice;
use tables::{Bytes, DeviceRef, WriteFlags};
use thin::{Pool, PoolOptions, ThinId};

struct Null(Bytes);

impl BlockDevice for Null {
    fn name(&self) -> String {
        "null".into()
    }
    fn size(&self) -> Bytes {
        self.0
    }
    unsafe fn read<'a>(&'a self, _o: Bytes, b: &'a mut [u8]) -> IoFuture<'a> {
        b.fill(0);
        tables::io::ready(Ok(()))
    }
    unsafe fn write<'a>(&'a self, _o: Bytes, _b: &'a [u8], _f: WriteFlags) -> IoFuture<'a> {
        tables::io::ready(Ok(()))
    }
    fn flush(&self) -> IoFuture<'_> {
        tables::io::ready(Ok(()))
    }
    fn discard(&self, _o: Bytes, _l: Bytes) -> IoFuture<'_> {
        tables::io::ready(Ok(()))
    }
    fn write_zeroes(&self, _o: Bytes, _l: Bytes, _f: WriteFlags) -> IoFuture<'_> {
        tables::io::ready(Ok(()))
    }
}

const GIB: u64 = 1 << 30;
const BS: u64 = 64 * 1024;

fn rng(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn opts() -> PoolOptions {
    PoolOptions {
        data_block_sectors: (BS / 512) as u32,
        commit_interval: None,
        error_if_no_space: true,
        ..PoolOptions::default()
    }
}

async fn pool(meta_bytes: u64, data_bytes: u64) -> Arc<Pool> {
    let meta: DeviceRef = Arc::new(MemDevice::new("meta", Bytes(meta_bytes)));
    let data: DeviceRef = Arc::new(Null(Bytes(data_bytes)));
    Pool::open(meta, data, opts()).await.expect("open")
}

/// Provisions `n` random blocks of a volume of `vsize`, committing every `every` writes
/// (as the once-a-second commit would).
async fn provision(pool: &Pool, t: &dyn BlockDevice, vsize: u64, n: u64, every: u64, seed: u64) {
    let buf = vec![0x5Au8; BS as usize];
    let mut s = seed;
    let blocks = vsize / BS;
    for i in 0..n {
        let v = rng(&mut s) % blocks;
        // SAFETY: the buffer belongs to this future and the call is awaited in it: completed,
        // dropped first (waiting for the kernel), or leaked with it.
        unsafe { t.write(Bytes(v * BS), &buf, WriteFlags::default()) }
            .await
            .expect("write");
        if (i + 1) % every == 0 {
            pool.commit().await.expect("commit");
        }
    }
    pool.commit().await.expect("commit");
}

fn main() {
    iort::block_on(async {
        println!("# thin snapshot creation time (64 KiB blocks, metadata on RAM, data on a null device)");
        println!("{:>10} {:>12} {:>14} {:>16} {:>18}", "virtual", "written", "create_snap", "snap+commit", "2nd snap (hot)");
        for (vsize, written) in [(GIB, 4096u64), (64 * GIB, 65_536), (4096 * GIB, 131_072)] {
            let p = pool(256 << 20, 64 * GIB).await;
            p.create_thin(ThinId(1)).expect("create");
            let t = p.thin(ThinId(1), Bytes(vsize), None).expect("thin");
            provision(&p, &*t, vsize, written, 10_000, vsize).await;
            let t0 = Instant::now();
            p.create_snap(ThinId(2), ThinId(1)).await.expect("snap");
            let snap = t0.elapsed();
            p.commit().await.expect("commit");
            let with_commit = t0.elapsed();
            let t1 = Instant::now();
            p.create_snap(ThinId(3), ThinId(1)).await.expect("snap");
            let hot = t1.elapsed();
            let mapped = t.mapping_stats().expect("stats").0;
            println!(
                "{:>8}GiB {:>12} {:>14?} {:>16?} {:>18?}",
                vsize / GIB,
                format!("{mapped} blk"),
                snap,
                with_commit,
                hot
            );
        }

        let n: u64 = std::env::var("THIN_BENCH_PROVISIONS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_000_000);
        let vsize = 1024 * GIB; // 16M virtual blocks: random provisions rarely repeat
        let p = pool(1 << 30, 2 * n * BS).await;
        p.create_thin(ThinId(1)).expect("create");
        let t = p.thin(ThinId(1), Bytes(vsize), None).expect("thin");
        let t0 = Instant::now();
        provision(&p, &*t, vsize, n, 50_000, 7).await;
        let el = t0.elapsed();
        let mapped = t.mapping_stats().expect("stats").0;
        let st = p.stats();
        let bytes = st.meta_used * 4096;
        println!();
        println!("# metadata space after {n} random 64 KiB provisions");
        println!(
            "mapped blocks {mapped}, metadata blocks {} ({} bytes): {:.1} bytes per mapped block (bar 48)",
            st.meta_used,
            bytes,
            bytes as f64 / mapped as f64
        );
        println!(
            "provisioning rate through the thin write path (null data device): {:.0} writes/s ({:?} total)",
            n as f64 / el.as_secs_f64().max(1e-9),
            el
        );
        let t1 = Instant::now();
        p.create_snap(ThinId(2), ThinId(1)).await.expect("snap");
        println!("create_snap of that volume: {:?}", t1.elapsed());
        p.commit().await.expect("commit");
        let meta = p.meta_dev();
        let data = p.data_dev();
        drop(t);
        drop(p);
        let t2 = Instant::now();
        let p = Pool::open(meta.clone(), data, opts()).await.expect("reopen");
        println!("reopen (loads and validates all metadata): {:?}", t2.elapsed());
        drop(p);
        let t3 = Instant::now();
        let r = thin::tools::check(&meta).await.expect("check");
        println!("check: {:?} (clean: {}, {} mapped blocks)", t3.elapsed(), r.clean, r.mapped_blocks);
        let _ = Duration::ZERO;
    })
    .expect("runtime");
}
