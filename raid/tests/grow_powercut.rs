//! Power cuts around a grow's metadata update.
//!
//! Legs are [`CrashDevice`]s whose space beyond the small array holds garbage that differs per
//! leg. The small array is written and flushed; then, on devices sharing a write budget (when
//! it runs out, power is off for every device), the array grows (half the runs as a reload of
//! the running array, half by assembling it from the larger table) and takes more writes and
//! flushes, anywhere. Every device then loses a random part of its unflushed writes, kept ones
//! possibly torn. After the restart:
//! - the old table assembles only if the grow did not commit; otherwise it is refused as a
//!   shrink naming both sizes;
//! - the larger table always assembles; once resynced, every sector flushed before the cut
//!   reads back as flushed or as a later write, and `check` finds no mismatch: no region the
//!   grow added was left marked in sync while its copies or parity disagree.
//!
//! `RAID_GROW_CUTS` sets the number of cuts (default 400).

mod common;
use common::*;
use std::sync::atomic::AtomicI64;
use std::sync::Arc;

use tables::io::{write_blocking, BlockDevice, WriteFlags};
use tables::mem::{CrashDevice, CutMode};
use tables::{Bytes, Sectors};

const LEG: u64 = 128 << 10;
const SECTOR: usize = 512;

/// Returns whether the grow committed before the cut (the old table was refused).
fn one_cut(t: &str, n: usize, big: u64, seed: u64) -> bool {
    let mut rng = Rng(seed);
    let small = big * (2 + rng.below(4)) / 8 / 512 * 512 + 512 * rng.below(9);
    let datas: Vec<Arc<CrashDevice>> = (0..n).map(|i| crash(&format!("d{i}"), LEG)).collect();
    let metas: Vec<Arc<CrashDevice>> = (0..n).map(|i| crash(&format!("m{i}"), 128 << 10)).collect();
    for (i, d) in datas.iter().enumerate() {
        let junk = pattern(seed ^ (i as u64 + 1) << 40, LEG as usize);
        write_blocking(&**d, Bytes(0), &junk, WriteFlags::default()).unwrap();
        flush(&**d).unwrap();
    }
    let line = line_for(t, n);
    let plain = Devs::default();
    for i in 0..n {
        plain.add(&format!("d{i}"), datas[i].clone());
        plain.add(&format!("m{i}"), metas[i].clone());
    }
    let mut written = Written::new(big as usize / SECTOR);
    {
        let dev = build(&plain, false, false, Sectors(small / 512), &line).unwrap();
        sync_all(&dev);
        let data = pattern(seed, small as usize);
        wr(&*dev, 0, &data).unwrap();
        flush(&*dev).unwrap();
        written.flushed(0, &data);
    }
    // Assembly and the grow take a few writes per leg: most cuts land in or near them.
    let budget = Arc::new(AtomicI64::new(1 + rng.below(8 * n as u64) as i64));
    let gated = gated(&datas, &metas, &budget);
    let grown = if rng.below(2) == 0 {
        // A reload: the running array gets a larger table; dropping the old one grows it.
        build(&gated, false, false, Sectors(small / 512), &line)
            .ok()
            .and_then(|old| {
                let new = build(&gated, false, false, Sectors(big / 512), &line).ok();
                drop(old);
                new
            })
            .filter(|d| matches!(iort::block_on(d.sync_step()), Ok(Ok(true))))
    } else {
        build(&gated, false, false, Sectors(big / 512), &line).ok()
    };
    if let Some(dev) = grown.filter(|d| d.array_size().0 == big) {
        written.random_io(&*dev, &mut rng, 30, 5);
    }
    for (i, d) in datas.iter().chain(metas.iter()).enumerate() {
        d.power_cut(CutMode::Random {
            seed: seed.wrapping_mul(31).wrapping_add(i as u64),
            tear: true,
        });
    }
    // The old table: it assembles only while the superblocks still say the old size.
    let committed = match build(&plain, false, false, Sectors(small / 512), &line) {
        Ok(_) => false,
        Err(e) => {
            assert!(
                e.contains("shrinking") && e.contains(&small.to_string()),
                "{t} seed {seed}: the old table failed otherwise: {e}"
            );
            true
        }
    };
    let dev = build(&plain, false, false, Sectors(big / 512), &line)
        .unwrap_or_else(|e| panic!("{t} seed {seed}: reassembly at the new size failed: {e}"));
    sync_all(&dev);
    let got = rd(&*dev, 0, big as usize).unwrap();
    written.verify(&got, &|| {
        format!("{t} seed {seed}: status {}", dev.status())
    });
    assert_eq!(
        check(&dev),
        0,
        "{t} seed {seed}: copies or parity disagree after the resync: a grown region was \
         taken as in sync"
    );
    committed
}

#[test]
fn power_cuts_around_a_grow_leave_the_old_size_or_the_new_one() {
    let total: u64 = std::env::var("RAID_GROW_CUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    let levels: [(&str, usize, u64); 4] = [
        ("raid1", 2, LEG),
        ("raid5_ls", 3, 2 * LEG),
        ("raid10", 4, 2 * LEG),
        ("raid4", 4, 3 * LEG),
    ];
    let mut committed = 0;
    for k in 0..total {
        let (t, n, big) = levels[(k % levels.len() as u64) as usize];
        committed += one_cut(t, n, big, 0x6120_0000 + k) as u64;
    }
    eprintln!("{total} cuts, {committed} after the grow committed");
    // Both sides of the commit must be reached often enough to test anything.
    assert!(
        committed * 5 >= total && committed * 5 <= total * 4,
        "{committed} of {total} cuts came after the commit"
    );
}
