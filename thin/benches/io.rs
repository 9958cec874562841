//! Data path cost of a thin volume against the raw device under it (both in RAM, so this
//! measures the thin layer's CPU overhead, not a disk): 4 KiB random writes to
//! unprovisioned blocks, to provisioned blocks, 4 KiB random reads, 1 MiB sequential writes.
//! One thread, one request at a time. `cargo bench -p thin --bench io`.

use std::sync::Arc;
use std::time::Instant;

use tables::io::BlockDevice;
use tables::mem::MemDevice;
use tables::{Bytes, DeviceRef, WriteFlags};
use thin::{Pool, PoolOptions, ThinId};

const MIB: u64 = 1 << 20;
const VOL: u64 = 1024 * MIB;

fn rng(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

async fn rand_writes(d: &dyn BlockDevice, n: u64, seed: u64) -> f64 {
    let buf = vec![0x5Au8; 4096];
    let mut s = seed;
    let t = Instant::now();
    for _ in 0..n {
        let off = rng(&mut s) % (VOL / 4096) * 4096;
        // SAFETY: the buffer belongs to this future and the call is awaited in it: completed,
        // dropped first (waiting for the kernel), or leaked with it.
        unsafe { d.write(Bytes(off), &buf, WriteFlags::default()) }
            .await
            .expect("write");
    }
    n as f64 / t.elapsed().as_secs_f64()
}

async fn rand_reads(d: &dyn BlockDevice, n: u64, seed: u64) -> f64 {
    let mut buf = vec![0u8; 4096];
    let mut s = seed;
    let t = Instant::now();
    for _ in 0..n {
        let off = rng(&mut s) % (VOL / 4096) * 4096;
        // SAFETY: the buffer belongs to this future and the call is awaited in it: completed,
        // dropped first (waiting for the kernel), or leaked with it.
        unsafe { d.read(Bytes(off), &mut buf) }.await.expect("read");
    }
    n as f64 / t.elapsed().as_secs_f64()
}

async fn seq_writes(d: &dyn BlockDevice) -> f64 {
    let buf = vec![0x33u8; MIB as usize];
    let t = Instant::now();
    for i in 0..VOL / MIB {
        // SAFETY: the buffer belongs to this future and the call is awaited in it: completed,
        // dropped first (waiting for the kernel), or leaked with it.
        unsafe { d.write(Bytes(i * MIB), &buf, WriteFlags::default()) }
            .await
            .expect("write");
    }
    (VOL / MIB) as f64 / t.elapsed().as_secs_f64()
}

fn main() {
    iort::block_on(async {
        let n = 100_000;
        println!("# thin data path vs the raw RAM device (64 KiB blocks, 1 GiB volume, QD1)");
        println!("{:<34} {:>12} {:>12} {:>7}", "", "raw", "thin", "ratio");
        let raw: DeviceRef = Arc::new(MemDevice::new("raw", Bytes(VOL)));
        let meta: DeviceRef = Arc::new(MemDevice::new("meta", Bytes(64 * MIB)));
        let data: DeviceRef = Arc::new(MemDevice::new("data", Bytes(2 * VOL)));
        let opts = PoolOptions {
            data_block_sectors: 128,
            commit_interval: None,
            ..PoolOptions::default()
        };
        let pool = Pool::open(meta, data, opts).await.expect("open");
        pool.create_thin(ThinId(1)).expect("create");
        let t = pool.thin(ThinId(1), Bytes(VOL), None).expect("thin");
        let row = |name: &str, r: f64, th: f64, unit: &str| {
            println!(
                "{name:<34} {r:>10.0}{unit} {th:>10.0}{unit} {:>7.2}",
                th / r
            );
        };
        let r = rand_writes(&*raw, n, 1).await;
        let th = rand_writes(&*t, n, 1).await;
        row("4k randwrite, unprovisioned", r, th, "/s");
        pool.commit().await.expect("commit");
        let r = rand_writes(&*raw, n, 1).await;
        let th = rand_writes(&*t, n, 1).await;
        row("4k randwrite, provisioned", r, th, "/s");
        let r = rand_reads(&*raw, n, 2).await;
        let th = rand_reads(&*t, n, 2).await;
        row("4k randread", r, th, "/s");
        let pool2 = {
            let meta: DeviceRef = Arc::new(MemDevice::new("meta2", Bytes(64 * MIB)));
            let data: DeviceRef = Arc::new(MemDevice::new("data2", Bytes(2 * VOL)));
            let p = Pool::open(
                meta,
                data,
                PoolOptions {
                    commit_interval: None,
                    ..PoolOptions::default()
                },
            )
            .await
            .expect("open");
            p.create_thin(ThinId(1)).expect("create");
            p
        };
        let t2 = pool2.thin(ThinId(1), Bytes(VOL), None).expect("thin");
        let r = seq_writes(&*raw).await;
        let th = seq_writes(&*t2).await;
        row("1M seqwrite (MiB/s), unprovisioned", r, th, "  ");
    })
    .expect("runtime");
}
