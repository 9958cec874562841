//! Power cuts in the middle of stripe and mirror updates.
//!
//! Every leg (data and metadata) is a [`CrashDevice`] behind a wrapper sharing one "write
//! budget": when it runs out, power is off and no further I/O reaches any disk, possibly in the
//! middle of a request (data written, parity not, bitmap set but data not...). Then every
//! device loses a random subset of its unflushed writes, and kept ones may be torn. The array
//! is rebuilt from the same devices, resynced, and then:
//! - every sector written before the last completed flush reads back as written;
//! - every other sector holds either its value at that flush or a value written after it;
//! - `check` finds no mismatch (mirrors and parity consistent).
//!
//! Some runs fail a leg first: mirrors have no write hole while degraded; raid4/5 close it
//! with the partial parity log, so the missing leg's data (only in parity) must survive too.
//! Half of the runs cut the power a second time during the resync or replay after the
//! restart.
//!
//! `RAID_CUTS` sets the total number of cut points (default 3000).

mod common;
use common::*;
use std::sync::atomic::AtomicI64;
use std::sync::Arc;

use tables::io::BlockDevice;
use tables::mem::{CrashDevice, CutMode};
use tables::Sectors;

const LEG: u64 = 128 << 10;
const SECTOR: usize = 512;

/// Returns whether the cut came while I/O was still being issued (not after the last op).
fn one_cut(t: &str, n: usize, size: u64, degraded: bool, seed: u64) -> bool {
    let mut rng = Rng(seed);
    let datas: Vec<Arc<CrashDevice>> = (0..n).map(|i| crash(&format!("d{i}"), LEG)).collect();
    // Room for the superblock, the bitmap and a partial parity log of a few slots per half
    // (few, so runs switch halves often). `RAID_PPL_META` shrinks it to show what the log is
    // for: with no room for it, degraded parity runs lose data.
    let meta_bytes = std::env::var("RAID_PPL_META")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(128 << 10);
    let metas: Vec<Arc<CrashDevice>> = (0..n)
        .map(|i| crash(&format!("m{i}"), meta_bytes))
        .collect();
    let line = line_for(t, n);
    let sectors = size as usize / SECTOR;
    // Phase 0: create (nosync is not used: the initial resync runs for real), make durable.
    let plain = Devs::default();
    for i in 0..n {
        plain.add(&format!("d{i}"), datas[i].clone());
        plain.add(&format!("m{i}"), metas[i].clone());
    }
    {
        let dev = build(&plain, false, false, Sectors(size / 512), &line).unwrap();
        sync_all(&dev);
        flush(&*dev).unwrap();
    }
    // Phase 1: random I/O until the budget runs out.
    let budget = Arc::new(AtomicI64::new(1 + rng.below(120) as i64));
    let gated = gated(&datas, &metas, &budget);
    let mut written = Written::new(sectors);
    written.flushed(0, &vec![0u8; size as usize]);
    let mut cut_mid_io = true;
    if let Ok(dev) = build(&gated, false, false, Sectors(size / 512), &line) {
        if degraded {
            // A leg fails first: mirrors keep their guarantee while degraded by construction,
            // parity arrays through the partial parity log.
            let _ = iort::block_on(dev.fail_leg(rng.below(n as u64) as usize));
        }
        written.random_io(&*dev, &mut rng, 60, 6);
        cut_mid_io = budget.load(std::sync::atomic::Ordering::Relaxed) <= 0;
        drop(dev);
    }
    // The cut.
    for (i, d) in datas.iter().chain(metas.iter()).enumerate() {
        d.power_cut(CutMode::Random {
            seed: seed.wrapping_mul(31).wrapping_add(i as u64),
            tear: true,
        });
    }
    // Half the time, power fails again part-way through the resync/recovery after restart.
    if rng.below(2) == 0 {
        let budget = Arc::new(AtomicI64::new(1 + rng.below(40) as i64));
        let gated = common::gated(&datas, &metas, &budget);
        if let Ok(dev) = build(&gated, false, false, Sectors(size / 512), &line) {
            while let Ok(Ok(true)) = iort::block_on(dev.sync_step()) {}
        }
        for (i, d) in datas.iter().chain(metas.iter()).enumerate() {
            d.power_cut(CutMode::Random {
                seed: seed.wrapping_mul(77).wrapping_add(i as u64),
                tear: true,
            });
        }
    }
    // Restart from the same devices and resync.
    let dev = build(&plain, false, false, Sectors(size / 512), &line)
        .unwrap_or_else(|e| panic!("{t} seed {seed}: reassembly failed: {e}"));
    sync_all(&dev);
    let got = rd(&*dev, 0, size as usize).unwrap();
    written.verify(&got, &|| {
        format!("{t} seed {seed}: status {}", dev.status())
    });
    assert_eq!(check(&dev), 0, "{t} seed {seed}: mismatches after resync");
    cut_mid_io
}

#[test]
fn power_cuts_mid_update_lose_nothing_flushed() {
    let total: u64 = std::env::var("RAID_CUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let levels: [(&str, usize, u64, bool); 10] = [
        ("raid1", 2, LEG, false),
        ("raid5_ls", 4, 3 * LEG, false),
        ("raid4", 3, 2 * LEG, false),
        ("raid5_ra", 3, 2 * LEG, false),
        ("raid10", 4, 2 * LEG, false),
        ("raid1", 3, LEG, true),
        ("raid10", 4, 2 * LEG, true),
        ("raid5_ls", 4, 3 * LEG, true),
        ("raid4", 3, 2 * LEG, true),
        ("raid5_la", 5, 4 * LEG, true),
    ];
    let mut mid = 0;
    for k in 0..total {
        let (t, n, size, degraded) = levels[(k % levels.len() as u64) as usize];
        mid += one_cut(t, n, size, degraded, 0xC0FFEE + k) as u64;
    }
    eprintln!("{total} cuts, {mid} of them while I/O was in flight");
    assert!(
        mid * 2 >= total,
        "most cuts must land mid-I/O to test anything ({mid}/{total})"
    );
}
