//! The changed-block walk (`Metadata::delta`, what replication ships from) against volume
//! size: N mapped blocks, a snapshot, then a change rewritten in runs of 256 blocks at
//! pseudo-random places; the walk between the snapshot and the volume is timed, beside a walk
//! of the whole volume (`delta_from_empty`, what a walk that cannot skip shared subtrees
//! costs). Two changes per size: 1% of the blocks, and a fixed 25,600 blocks.
//!
//! `cargo bench -p thin --bench delta`; `THIN_DELTA_SIZES=1000000,10000000` picks the sizes
//! (default 1M, 10M, 100M mapped blocks). Metadata only, in memory: no device is involved.

use std::time::Instant;

use thin::meta::Metadata;
use thin::{DataBlock, ThinId, VBlock};

const RUN: u64 = 256;

fn main() {
    let sizes: Vec<u64> = std::env::var("THIN_DELTA_SIZES")
        .unwrap_or_else(|_| "1000000,10000000,100000000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    println!("| mapped blocks | change (blocks) | walk ms | nodes visited | shared skipped | whole-volume walk ms | walk / whole |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for n in sizes {
        for change in [n / 100, 25_600] {
            if let Err(e) = one(n, change) {
                eprintln!("{n} blocks, change {change}: {e}");
            }
        }
    }
}

fn one(n: u64, change: u64) -> Result<(), thin::MetaError> {
    let runs = (change / RUN).max(1);
    let nr_data = n + runs * RUN + 1024;
    // Room for the volume's tree, the snapshot's copies of changed paths and the space maps.
    let nr_meta = (n / 100).max(4096) * 2 + 65_536;
    let mut m = Metadata::format(128, nr_data, nr_meta)?;
    let (vol, snap) = (ThinId(1), ThinId(2));
    m.create_thin(vol)?;
    let t = Instant::now();
    for v in 0..n {
        m.map_insert(vol, VBlock(v), DataBlock(v))?;
    }
    let build = t.elapsed();
    m.create_snap(snap, vol)?;
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ n;
    let mut next = n;
    for _ in 0..runs {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let start = x % (n - RUN);
        for i in 0..RUN {
            m.map_insert(vol, VBlock(start + i), DataBlock(next))?;
            next += 1;
        }
    }
    let t = Instant::now();
    let d = m.delta(snap, vol)?;
    let walk = t.elapsed();
    let t = Instant::now();
    let full = m.delta_from_empty(vol)?;
    let whole = t.elapsed();
    assert!(d.changed_blocks() <= runs * RUN && d.changed_blocks() > 0);
    assert_eq!(full.changed_blocks(), n);
    eprintln!("{n} mapped: built in {build:?}");
    println!(
        "| {n} | {} | {:.2} | {} | {} | {:.1} | {:.4} |",
        d.changed_blocks(),
        walk.as_secs_f64() * 1e3,
        d.nodes_visited,
        d.shared_skipped,
        whole.as_secs_f64() * 1e3,
        walk.as_secs_f64() / whole.as_secs_f64()
    );
    Ok(())
}
