//! Corruption: flip random bits in metadata blocks. A flip in a live block must make open
//! and check fail with an error naming the block; a flip anywhere must never panic.
//! Repair salvages what is readable into a clean new metadata device.

mod common;

use std::sync::Arc;

use common::*;
use tables::io::BlockDevice;
use tables::mem::MemDevice;
use tables::{Bytes, DeviceRef, WriteFlags};
use thin::disk::node::TreeKind;
use thin::{tools, Pool, ThinId};

const META: u64 = 2 * MIB;

/// A pool with several devices, snapshots and enough mappings for multi-level trees.
fn build() -> (Arc<MemDevice>, Arc<MemDevice>) {
    let meta = mem("meta", META);
    let data = mem("data", 64 * MIB);
    let pool = open(meta.clone(), data.clone(), opts(8));
    run(async {
        pool.create_thin(ThinId(1)).unwrap();
        let t = pool.thin(ThinId(1), Bytes(64 * MIB), None).unwrap();
        let mut s = 1u64;
        for i in 0..1500u64 {
            let b = rng(&mut s) % 16384;
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { t.write(Bytes(b * 4096), &[i as u8; 512], WriteFlags::default()) }
                .await
                .unwrap();
        }
        pool.create_snap(ThinId(2), ThinId(1)).await.unwrap();
        for i in 0..300u64 {
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe {
                t.write(
                    Bytes((i * 37 % 16384) * 4096),
                    &[1; 512],
                    WriteFlags::default(),
                )
            }
            .await
            .unwrap();
        }
        pool.create_thin(ThinId(3)).unwrap();
        pool.commit().await.unwrap();
    });
    (meta, data)
}

fn copy(src: &MemDevice) -> Arc<MemDevice> {
    copy_mem("meta-copy", src, META)
}

#[test]
fn bit_flips_in_live_blocks_are_reported() {
    let (meta, data) = build();
    let live = run(tools::live_blocks(&(meta.clone() as DeviceRef))).unwrap();
    assert!(live.len() > 20, "{} live blocks", live.len());
    let mut s = 42u64;
    let flips = std::env::var("THIN_FLIPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    for _ in 0..flips {
        let c = copy(&meta);
        let b = live[(rng(&mut s) % live.len() as u64) as usize];
        let bit = rng(&mut s) % (4096 * 8);
        let off = b.0 * 4096 + bit / 8;
        let mut byte = c.snapshot(off, 1);
        byte[0] ^= 1 << (bit % 8);
        c.fill(off, &byte);
        let cd: DeviceRef = c.clone();
        let r = run(tools::check(&cd));
        let e = r.expect_err(&format!("flip of bit {bit} in {b} went unnoticed"));
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("block {}", b.0)),
            "error does not name {b}: {msg}"
        );
        let o = run(Pool::open(cd, data.clone(), opts(8)));
        assert!(o.is_err(), "open accepted a flip in {b}");
    }
}

#[test]
fn random_damage_never_panics_and_repair_salvages() {
    let (meta, data) = build();
    let mut s = 7u64;
    for round in 0..60 {
        let c = copy(&meta);
        // Several flips anywhere in the first 600 blocks, sometimes a zeroed block.
        for _ in 0..1 + round % 4 {
            let off = rng(&mut s) % (600 * 4096);
            if rng(&mut s).is_multiple_of(5) {
                c.fill(off / 4096 * 4096, &[0u8; 4096]);
            } else {
                let mut byte = c.snapshot(off, 1);
                byte[0] ^= 1 << (rng(&mut s) % 8);
                c.fill(off, &byte);
            }
        }
        let cd: DeviceRef = c.clone();
        let _ = run(tools::check(&cd));
        let _ = run(tools::dump(&cd));
        let _ = run(Pool::open(cd.clone(), data.clone(), opts(8)));
        let out: DeviceRef = mem("meta-out", META);
        if let Ok(rep) = run(tools::repair(&cd, &out)) {
            let r = run(tools::check(&out)).expect("repaired metadata must load");
            assert!(r.clean, "{:?}", r.errors);
            assert_eq!(r.devices, rep.devices);
            assert_eq!(r.mapped_blocks, rep.mappings);
        }
    }
}

#[test]
fn repair_of_a_damaged_leaf_keeps_the_rest() {
    let (meta, data) = build();
    let md: DeviceRef = meta.clone();
    let before = run(tools::dump(&md)).unwrap();
    let total: u64 = before.devices.iter().map(|d| d.mapped_blocks).sum();
    // Damage one live block that is neither the superblock nor the device tree root.
    let live = run(tools::live_blocks(&md)).unwrap();
    let victim = live[live.len() / 2];
    let c = copy(&meta);
    c.fill(victim.0 * 4096 + 100, &[0xAA; 8]);
    let cd: DeviceRef = c.clone();
    assert!(run(tools::check(&cd)).is_err());
    let out: DeviceRef = mem("meta-out", META);
    let rep = run(tools::repair(&cd, &out)).unwrap();
    assert!(!rep.problems.is_empty());
    assert!(rep.lost_anything(), "{rep:?}");
    assert!(
        rep.mappings <= total && rep.mappings > total / 2,
        "{} of {total}",
        rep.mappings
    );
    let r = run(tools::check(&out)).unwrap();
    assert!(r.clean, "{:?}", r.errors);
    // The repaired pool opens and serves.
    let p = run(Pool::open(out, data, opts(8))).unwrap();
    assert_eq!(p.devices().unwrap().len(), 3);
}

#[test]
fn repair_report_says_what_was_lost() {
    let (meta, _data) = build();
    let md: DeviceRef = meta.clone();
    let before = run(tools::dump(&md)).unwrap();
    let total: u64 = before.devices.iter().map(|d| d.mapped_blocks).sum();
    // Undamaged metadata: nothing lost.
    let out: DeviceRef = mem("meta-out", META);
    let rep = run(tools::repair(&md, &out)).unwrap();
    assert!(rep.is_complete() && !rep.lost_anything(), "{rep:?}");
    assert_eq!(
        (rep.devices, rep.mappings, rep.mappings_lost),
        (3, total, 0)
    );
    // A damaged mapping leaf: its subtree is lost, and the device details (intact) say
    // exactly how many mappings it held.
    let leaf = run(tools::live_blocks(&md))
        .unwrap()
        .into_iter()
        .find(|b| {
            let h = meta.snapshot(b.0 * 4096, 32);
            h[4..8] == TreeKind::Mapping.magic().to_le_bytes() && h[21] == 0
        })
        .expect("a mapping leaf");
    let c = copy(&meta);
    c.fill(leaf.0 * 4096 + 100, &[0xAA; 8]);
    let cd: DeviceRef = c.clone();
    let out: DeviceRef = mem("meta-out", META);
    let rep = run(tools::repair(&cd, &out)).unwrap();
    assert!(rep.lost_anything() && !rep.is_complete(), "{rep:?}");
    assert!(rep.unreadable_subtrees >= 1, "{rep:?}");
    assert!(rep.mappings_lost > 0, "{rep:?}");
    assert_eq!(rep.mappings + rep.mappings_lost, total, "{rep:?}");
    assert_eq!((rep.devices, rep.devices_lost), (3, 0));
}
