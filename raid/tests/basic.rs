//! Failure handling, metadata trust, status and messages, read balancing.

mod common;
use common::*;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use raid::LegState;
use tables::io::BlockDevice;
use tables::mem::MemDevice;
use tables::{Bytes, Sectors};

const MIB: u64 = 1 << 20;

/// Legs named m{i} (metadata, 64 KiB) and d{i} (data), wrapped in failable [`Leg`]s.
fn legs(devs: &Devs, n: usize, size: u64) -> (Vec<Arc<Leg>>, Vec<Arc<MemDevice>>) {
    let mut ws = Vec::new();
    let mut raw = Vec::new();
    for i in 0..n {
        let d = mem(&format!("d{i}"), size);
        let w = Leg::new(d.clone());
        devs.add(&format!("d{i}"), w.clone());
        devs.add(&format!("m{i}"), mem(&format!("m{i}"), 64 << 10));
        ws.push(w);
        raw.push(d);
    }
    (ws, raw)
}

fn pairs(n: usize, meta: bool) -> String {
    (0..n)
        .map(|i| {
            if meta {
                format!("m{i} d{i}")
            } else {
                format!("- d{i}")
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn raid1_balances_reads_and_survives_a_failing_leg() {
    let devs = Devs::default();
    let (w, raw) = legs(&devs, 3, MIB);
    let line = format!("raid1 3 0 region_size 64 3 {}", pairs(3, true));
    let dev = build(&devs, false, false, Sectors(MIB / 512), &line).unwrap();
    sync_all(&dev);
    let data = pattern(1, 256 << 10);
    wr(&*dev, 4096, &data).unwrap();
    let before: Vec<u64> = raw
        .iter()
        .map(|d| d.counters.reads.load(Ordering::Relaxed))
        .collect();
    for _ in 0..30 {
        same(&rd(&*dev, 4096, data.len()).unwrap(), &data, "read back");
    }
    for (i, d) in raw.iter().enumerate() {
        let n = d.counters.reads.load(Ordering::Relaxed) - before[i];
        assert!(n >= 5, "leg {i} served only {n} of 30 reads: not balanced");
    }
    // Leg 1 starts failing: reads and writes go on without an error.
    w[1].fail.store(true, Ordering::Release);
    for _ in 0..6 {
        same(&rd(&*dev, 4096, data.len()).unwrap(), &data, "read back");
    }
    let data2 = pattern(2, 64 << 10);
    wr(&*dev, 0, &data2).unwrap();
    flush(&*dev).unwrap();
    assert_eq!(dev.leg_states()[1], LegState::Failed);
    assert!(dev.status().starts_with("raid1 3 ADA "), "{}", dev.status());
    same(&rd(&*dev, 0, data2.len()).unwrap(), &data2, "read back");
    // All legs failing: the client sees EIO.
    w[0].fail.store(true, Ordering::Release);
    w[2].fail.store(true, Ordering::Release);
    assert!(rd(&*dev, 0, 4096).is_err());
    assert!(wr(&*dev, 0, &[1u8; 512]).is_err());
}

#[test]
fn raid5_two_failed_legs_give_eio_never_garbage() {
    for t in ["raid5_ls", "raid5_la", "raid4"] {
        let devs = Devs::default();
        let (w, _) = legs(&devs, 4, MIB);
        let line = format!("{t} 2 8 nosync 4 {}", pairs(4, true));
        let size = 3 * MIB;
        let dev = build(&devs, false, false, Sectors(size / 512), &line).unwrap();
        let data = pattern(3, size as usize);
        wr(&*dev, 0, &data).unwrap();
        w[2].fail.store(true, Ordering::Release);
        // Degraded: everything still reads back (reconstructed), writes keep working.
        same(&rd(&*dev, 0, size as usize).unwrap(), &data, "read back");
        let d2 = pattern(4, 100_000);
        wr(&*dev, 12345, &d2).unwrap();
        let mut model = data.clone();
        model[12345..12345 + d2.len()].copy_from_slice(&d2);
        same(&rd(&*dev, 0, size as usize).unwrap(), &model, "read back");
        // Second leg: every read that needs either missing leg fails cleanly.
        w[0].fail.store(true, Ordering::Release);
        let mut errors = 0;
        for c in 0..(size / 4096) {
            match rd(&*dev, c * 4096, 4096) {
                Ok(b) => assert_eq!(b, &model[(c * 4096) as usize..((c + 1) * 4096) as usize]),
                Err(e) => {
                    assert_eq!(e.errno, libc::EIO);
                    errors += 1;
                }
            }
        }
        assert!(
            errors > 0,
            "{t}: reads with two legs gone cannot all succeed"
        );
        assert!(wr(&*dev, 0, &pattern(5, 3 * 4096)).is_err());
    }
}

#[test]
fn stale_and_foreign_legs_are_not_trusted() {
    let devs = Devs::default();
    let (w, raw) = legs(&devs, 3, MIB);
    let line = format!("raid5 3 8 region_size 64 3 {}", pairs(3, true));
    let size = 2 * MIB;
    let dev = build(&devs, false, false, Sectors(size / 512), &line).unwrap();
    sync_all(&dev);
    let uuid = dev.uuid();
    let data = pattern(7, size as usize);
    wr(&*dev, 0, &data).unwrap();
    flush(&*dev).unwrap();
    // Leg 1 fails; writes continue; the failure is in the survivors' superblocks.
    w[1].fail.store(true, Ordering::Release);
    let d2 = pattern(8, 300_000);
    wr(&*dev, 1000, &d2).unwrap();
    flush(&*dev).unwrap();
    drop(dev);
    // Leg 1 "comes back" with its old contents: it must be rebuilt, not read.
    w[1].fail.store(false, Ordering::Release);
    let dev = build(&devs, false, false, Sectors(size / 512), &line).unwrap();
    assert_eq!(dev.uuid(), uuid);
    assert_eq!(
        dev.leg_states()[1],
        LegState::Recovering,
        "{:?}",
        dev.leg_errors()
    );
    assert!(
        dev.status().starts_with("raid5_ls 3 AaA "),
        "{}",
        dev.status()
    );
    let mut model = data.clone();
    model[1000..1000 + d2.len()].copy_from_slice(&d2);
    same(&rd(&*dev, 0, size as usize).unwrap(), &model, "read back");
    sync_all(&dev);
    assert_eq!(dev.leg_states(), vec![LegState::InSync; 3]);
    assert_eq!(check(&dev), 0);
    same(&rd(&*dev, 0, size as usize).unwrap(), &model, "read back");
    drop(dev);

    // A leg from another array: its superblock has another UUID.
    let other = Devs::default();
    let (_, _) = legs(&other, 3, MIB);
    let o = build(&other, false, false, Sectors(size / 512), &line).unwrap();
    drop(o);
    let foreign_meta = other.open("m2").unwrap();
    devs.add("m2", foreign_meta);
    raw[2].fill(0, &[0xEE; 65536]);
    let dev = build(&devs, false, false, Sectors(size / 512), &line).unwrap();
    assert_eq!(dev.leg_states()[2], LegState::Recovering);
    assert!(dev.leg_errors()[2]
        .as_ref()
        .unwrap()
        .contains("belongs to array"));
    same(&rd(&*dev, 0, size as usize).unwrap(), &model, "read back");
    sync_all(&dev);
    assert_eq!(check(&dev), 0);

    // Geometry that disagrees with the metadata is refused with a clear error.
    let bad = format!("raid5 3 16 region_size 64 3 {}", pairs(3, true));
    drop(dev);
    let e = build(&devs, false, false, Sectors(size / 512), &bad)
        .err()
        .unwrap();
    assert!(e.contains("chunk"), "{e}");
}

#[test]
fn check_counts_and_repair_fixes_mismatches() {
    for (t, n) in [("raid1", 2usize), ("raid5", 4), ("raid10", 4)] {
        let devs = Devs::default();
        let (_, raw) = legs(&devs, n, MIB);
        let chunk = if t == "raid1" { 0 } else { 8 };
        let line = format!("{t} 3 {chunk} region_size 64 {n} {}", pairs(n, true));
        let size = match t {
            "raid1" => MIB,
            "raid5" => 3 * MIB,
            _ => 2 * MIB,
        };
        let dev = build(&devs, false, false, Sectors(size / 512), &line).unwrap();
        sync_all(&dev);
        wr(&*dev, 0, &pattern(9, size as usize)).unwrap();
        flush(&*dev).unwrap();
        assert_eq!(check(&dev), 0, "{t}");
        // Corrupt 3 sectors behind the array's back.
        raw[1].fill(8192, &[0xAB; 1536]);
        let m = check(&dev);
        assert_eq!(m, 3, "{t}: check should find 3 bad sectors, found {m}");
        assert!(dev.status().contains(" idle 3 "), "{t}: {}", dev.status());
        msg(&*dev, "repair").unwrap();
        sync_all(&dev);
        assert_eq!(check(&dev), 0, "{t}: repair left mismatches");
    }
}

#[test]
fn bitmap_limits_resync_to_dirty_regions_and_no_metadata_means_full() {
    let devs = Devs::default();
    let (_, raw) = legs(&devs, 2, 4 * MIB);
    let line = format!("raid1 3 0 region_size 128 2 {}", pairs(2, true));
    let dev = build(&devs, false, false, Sectors(4 * MIB / 512), &line).unwrap();
    sync_all(&dev);
    flush(&*dev).unwrap();
    assert!(dev.status().ends_with("bitmap:0/64"), "{}", dev.status());
    wr(&*dev, 5 * 65536 + 100, &[1u8; 1000]).unwrap();
    assert!(dev.status().ends_with("bitmap:1/64"), "{}", dev.status());
    // Unclean stop (no flush): reopen; only that region is resynced.
    drop(dev);
    let dev = build(&devs, false, false, Sectors(4 * MIB / 512), &line).unwrap();
    assert!(dev.status().contains(" resync "), "{}", dev.status());
    let w0 = raw[1].counters.bytes_written.load(Ordering::Relaxed);
    sync_all(&dev);
    let copied = raw[1].counters.bytes_written.load(Ordering::Relaxed) - w0;
    assert!(
        copied <= 65536,
        "resync copied {copied} bytes; only one 64 KiB region was dirty"
    );
    assert!(
        dev.status().starts_with("raid1 2 AA 8192/8192 idle 0"),
        "{}",
        dev.status()
    );
    // Clean after flush: nothing to resync at the next start.
    flush(&*dev).unwrap();
    drop(dev);
    let dev = build(&devs, false, false, Sectors(4 * MIB / 512), &line).unwrap();
    assert!(dev.status().contains(" idle "), "{}", dev.status());
    drop(dev);

    // No metadata: full resync at every start, and status says so.
    let line = format!("raid1 1 0 2 {}", pairs(2, false));
    let dev = build(&devs, false, false, Sectors(4 * MIB / 512), &line).unwrap();
    assert!(dev.status().contains("bitmap:none"), "{}", dev.status());
    assert!(dev.status().contains(" resync "), "{}", dev.status());
    sync_all(&dev);
    drop(dev);
    let dev = build(&devs, false, false, Sectors(4 * MIB / 512), &line).unwrap();
    assert!(dev.status().contains(" resync "), "{}", dev.status());
}

#[test]
fn mirror_line_is_raid1() {
    let devs = Devs::default();
    let a = mem("a", 2 * MIB);
    let b = mem("b", 2 * MIB);
    devs.add("a", a.clone());
    devs.add("b", b.clone());
    let dev = build(
        &devs,
        true,
        false,
        Sectors(1024),
        "core 2 64 nosync 2 a 0 b 2048",
    )
    .unwrap();
    let data = pattern(11, 512 * 1024);
    wr(&*dev, 0, &data).unwrap();
    assert_eq!(a.snapshot(0, data.len()), data);
    assert_eq!(b.snapshot(2048 * 512, data.len()), data);
    same(&rd(&*dev, 0, data.len()).unwrap(), &data, "read back");
    assert!(dev.status().starts_with("raid1 2 AA"), "{}", dev.status());
}

#[test]
fn messages_and_replace_via_opener() {
    let devs = Devs::default();
    let (w, _) = legs(&devs, 3, MIB);
    let line = format!("raid5 3 8 region_size 64 3 {}", pairs(3, true));
    let dev = build(&devs, false, false, Sectors(2 * MIB / 512), &line).unwrap();
    sync_all(&dev);
    let data = pattern(12, 2 * MIB as usize);
    wr(&*dev, 0, &data).unwrap();
    w[0].fail.store(true, Ordering::Release);
    same(&rd(&*dev, 0, data.len()).unwrap(), &data, "read back");
    assert!(
        dev.status().starts_with("raid5_ls 3 DAA "),
        "{}",
        dev.status()
    );
    assert!(msg(&*dev, "rebuild 0 nosuch").is_err());
    devs.add("new0", mem("new0", MIB));
    msg(&*dev, "rebuild 0 new0").unwrap();
    assert!(
        dev.status().starts_with("raid5_ls 3 aAA 0/4096 recover"),
        "{}",
        dev.status()
    );
    msg(&*dev, "frozen").unwrap();
    assert!(!iort::block_on(dev.sync_step()).unwrap().unwrap());
    msg(&*dev, "idle").unwrap();
    sync_all(&dev);
    assert_eq!(dev.leg_states(), vec![LegState::InSync; 3]);
    assert_eq!(check(&dev), 0);
    same(&rd(&*dev, 0, data.len()).unwrap(), &data, "read back");
    assert!(msg(&*dev, "bogus").is_err());
    let _ = Bytes(0);
}

#[test]
fn threads_share_stripes_without_corrupting_parity() {
    let devs = Devs::default();
    let (w, _) = legs(&devs, 4, MIB);
    for l in &w {
        l.yield_first.store(true, Ordering::Relaxed);
    }
    let line = format!("raid5_ls 3 8 region_size 64 4 {}", pairs(4, true));
    let size = 3 * MIB;
    let dev = build(&devs, false, false, Sectors(size / 512), &line).unwrap();
    sync_all(&dev);
    // Each thread owns every other 1 KiB piece: neighbours always share a stripe.
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let dev = dev.clone();
            std::thread::spawn(move || {
                for round in 0..3u64 {
                    let futs: Vec<_> = (0..(size / 1024))
                        .filter(|p| p % 4 == t)
                        .map(|p| (p, pattern(p * 10 + round, 1024)))
                        .collect();
                    let writes: Vec<_> = futs
                        .iter()
                        // SAFETY: joined in block_on below: completed or dropped before the buffers
                        // go.
                        .map(|(p, d)| unsafe { dev.write(Bytes(p * 1024), d, Default::default()) })
                        .collect();
                    for r in iort::block_on(futures::future::join_all(writes)).unwrap() {
                        r.unwrap();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut model = vec![0u8; size as usize];
    for p in 0..size / 1024 {
        model[(p * 1024) as usize..((p + 1) * 1024) as usize]
            .copy_from_slice(&pattern(p * 10 + 2, 1024));
    }
    same(
        &rd(&*dev, 0, size as usize).unwrap(),
        &model,
        "after concurrent writers",
    );
    assert_eq!(check(&dev), 0, "parity updates interleaved");
}

#[test]
fn a_leg_that_vanishes_mid_write_is_survived() {
    use tables::mem::CrashDevice;
    for t in ["raid1", "raid5_rs", "raid10"] {
        let devs = Devs::default();
        let n = 4;
        let crashes: Vec<Arc<CrashDevice>> = (0..n).map(|i| crash(&format!("d{i}"), MIB)).collect();
        for (i, c) in crashes.iter().enumerate() {
            devs.add(&format!("d{i}"), c.clone());
            devs.add(&format!("m{i}"), mem(&format!("m{i}"), 64 << 10));
        }
        let chunk = if t == "raid1" { 0 } else { 8 };
        let size = match t {
            "raid1" => MIB,
            "raid10" => 2 * MIB,
            _ => 3 * MIB,
        };
        let line = format!("{t} 3 {chunk} region_size 64 {n} {}", pairs(n, true));
        let dev = build(&devs, false, false, Sectors(size / 512), &line).unwrap();
        sync_all(&dev);
        let mut model = vec![0u8; size as usize];
        for k in 0..40u64 {
            if k == 17 {
                crashes[1].kill();
            }
            let off = (k * 77_777) % (size - 50_000);
            let d = pattern(k, 30_000 + k as usize * 13);
            wr(&*dev, off, &d).unwrap_or_else(|e| panic!("{t}: write {k} failed: {e}"));
            model[off as usize..off as usize + d.len()].copy_from_slice(&d);
        }
        assert_eq!(dev.leg_states()[1], LegState::Failed, "{t}");
        same(&rd(&*dev, 0, size as usize).unwrap(), &model, t);
        iort::block_on(dev.replace_leg(1, mem("new", MIB)))
            .unwrap()
            .unwrap();
        sync_all(&dev);
        same(&rd(&*dev, 0, size as usize).unwrap(), &model, t);
        assert_eq!(check(&dev), 0, "{t}");
    }
}

#[test]
fn registry_validates_normalizes_and_table_rebuild_param_works() {
    let mut reg = tables::registry::Registry::empty();
    raid::register(&mut reg);
    assert!(reg.names().contains(&"raid") && reg.names().contains(&"mirror"));
    let k = reg.get("raid").unwrap();
    let e = k
        .validate(Sectors(8), &args("raid5 1 7 3 - a - b - c"))
        .unwrap_err();
    assert_eq!(e.arg, Some(3), "{e}");
    assert_eq!(
        k.normalize(&args("raid5 1 128 3 - a - b - c")).join(" "),
        "raid5_ls 1 128 3 - a - b - c"
    );
    assert!(reg
        .get("mirror")
        .unwrap()
        .validate(Sectors(8), &args("core 1 64 2 a 0 b 0"))
        .is_ok());

    // `rebuild 1` in the table rebuilds leg 1 even though its metadata is current.
    let devs = Devs::default();
    let (_, raw) = legs(&devs, 3, MIB);
    let line = format!("raid1 3 0 region_size 64 3 {}", pairs(3, true));
    let dev = build(&devs, false, false, Sectors(MIB / 512), &line).unwrap();
    sync_all(&dev);
    let data = pattern(21, MIB as usize);
    wr(&*dev, 0, &data).unwrap();
    flush(&*dev).unwrap();
    drop(dev);
    raw[1].fill(0, &[0x5A; 8192]);
    let line2 = format!("raid1 5 0 region_size 64 rebuild 1 3 {}", pairs(3, true));
    let dev = build(&devs, false, false, Sectors(MIB / 512), &line2).unwrap();
    assert_eq!(dev.leg_states()[1], LegState::Recovering);
    for _ in 0..50 {
        same(
            &rd(&*dev, 0, 8192).unwrap(),
            &data[..8192],
            "reads skip the leg being rebuilt",
        );
    }
    sync_all(&dev);
    assert_eq!(dev.leg_states(), vec![LegState::InSync; 3]);
    same(&raw[1].snapshot(0, MIB as usize), &data, "rebuilt leg");
    assert_eq!(check(&dev), 0);
}

#[test]
fn write_strategies_read_the_minimum() {
    let devs = Devs::default();
    let (_, raw) = legs(&devs, 5, MIB);
    let line = format!("raid5_ls 2 8 nosync 5 {}", pairs(5, true));
    let dev = build(&devs, false, false, Sectors(4 * MIB / 512), &line).unwrap();
    let read_bytes = || -> u64 {
        raw.iter()
            .map(|d| d.counters.bytes_read.load(Ordering::Relaxed))
            .sum()
    };
    // Full stripes (4 data chunks of 4 KiB): no reads at all.
    let r0 = read_bytes();
    wr(&*dev, 0, &pattern(1, 8 * 16384)).unwrap();
    assert_eq!(read_bytes() - r0, 0, "full-stripe writes must not read");
    // One sector in one chunk: read-modify-write reads old data + old parity (1 KiB) rather
    // than the three other chunks (1.5 KiB).
    let r0 = read_bytes();
    wr(&*dev, 4096 + 512, &pattern(2, 512)).unwrap();
    assert_eq!(read_bytes() - r0, 1024);
    // Three of four chunks rewritten: reconstruct-write reads the fourth (4 KiB) instead of
    // old data + parity (16 KiB).
    let r0 = read_bytes();
    wr(&*dev, 16384, &pattern(3, 3 * 4096)).unwrap();
    assert_eq!(read_bytes() - r0, 4096);
    let mut model = pattern(1, 8 * 16384);
    model[4096 + 512..4096 + 1024].copy_from_slice(&pattern(2, 512));
    model[16384..16384 + 3 * 4096].copy_from_slice(&pattern(3, 3 * 4096));
    same(&rd(&*dev, 0, model.len()).unwrap(), &model, "strategies");
    assert_eq!(check(&dev), 0);
}

#[test]
fn raid5_unclean_start_while_degraded_is_flagged() {
    let devs = Devs::default();
    let (w, _) = legs(&devs, 3, MIB);
    let line = format!("raid5 3 8 region_size 64 3 {}", pairs(3, true));
    let dev = build(&devs, false, false, Sectors(2 * MIB / 512), &line).unwrap();
    sync_all(&dev);
    flush(&*dev).unwrap();
    w[0].fail.store(true, Ordering::Release);
    wr(&*dev, 0, &pattern(1, 5000)).unwrap();
    assert_eq!(dev.leg_states()[0], LegState::Failed);
    drop(dev); // no flush: unclean
    let dev = build(&devs, false, false, Sectors(2 * MIB / 512), &line).unwrap();
    assert!(
        dev.status().contains("dirty_degraded_start:1_regions"),
        "{}",
        dev.status()
    );
    let _ = rd(&*dev, 0, 5000).unwrap();
}

/// The write hole of a degraded raid5, made to happen: leg 0 is gone, a partial-stripe write
/// lands on its data leg but its parity update is lost in a power cut. Leg 0's data lives only
/// in parity, so without the partial parity log it comes back wrong (and the start is
/// flagged); with the log, replay at assembly restores parity and leg 0's data reads back.
#[test]
fn raid5_degraded_write_hole_is_closed_by_the_log() {
    use tables::mem::{CrashDevice, CutMode};
    const CHUNK: usize = 4096;
    for (meta_bytes, log) in [(128u64 << 10, true), (16 << 10, false)] {
        let devs = Devs::default();
        let datas: Vec<Arc<CrashDevice>> = (0..3).map(|i| crash(&format!("d{i}"), MIB)).collect();
        let mut legs = Vec::new();
        for (i, d) in datas.iter().enumerate() {
            let l = Leg::new(d.clone());
            devs.add(&format!("d{i}"), l.clone());
            devs.add(&format!("m{i}"), crash(&format!("m{i}"), meta_bytes));
            legs.push(l);
        }
        let line = format!("raid5 3 8 region_size 64 3 {}", pairs(3, true));
        let size = 2 * MIB;
        let dev = build(&devs, false, false, Sectors(size / 512), &line).unwrap();
        sync_all(&dev);
        let data = pattern(1, size as usize);
        wr(&*dev, 0, &data).unwrap();
        flush(&*dev).unwrap();
        // Stripe 0 of raid5_ls over 3 legs: parity on leg 2, data chunks on legs 0 and 1.
        iort::block_on(dev.fail_leg(0)).unwrap().unwrap();
        let new = pattern(2, 1024);
        wr(&*dev, CHUNK as u64 + 512, &new).unwrap();
        // The data leg's write reaches the platter, the parity leg's does not.
        iort::block_on(datas[1].flush()).unwrap().unwrap();
        drop(dev);
        for d in &datas {
            d.power_cut(CutMode::DropAll);
        }
        let dev = build(&devs, false, false, Sectors(size / 512), &line).unwrap();
        let st = dev.status();
        let got = rd(&*dev, 0, CHUNK).unwrap();
        if log {
            assert!(st.contains("ppl_replayed:1_entries"), "{st}");
            assert!(!st.contains("dirty_degraded_start"), "{st}");
            same(&got, &data[..CHUNK], "leg 0's chunk, rebuilt from parity");
            let mut want = data[CHUNK..2 * CHUNK].to_vec();
            want[512..1536].copy_from_slice(&new);
            same(&rd(&*dev, CHUNK as u64, CHUNK).unwrap(), &want, "the write");
            sync_all(&dev);
            same(
                &rd(&*dev, 0, CHUNK).unwrap(),
                &data[..CHUNK],
                "after rebuild",
            );
        } else {
            assert!(st.contains("ppl:none(metadata_device_too_small)"), "{st}");
            assert!(st.contains("dirty_degraded_start:1_regions"), "{st}");
            assert_ne!(
                &got[512..1536],
                &data[512..1536],
                "the hole is real without a log"
            );
        }
    }
}
