//! Growing arrays: a table built again over the running array with a larger length (what the
//! daemon's reload does), and an array assembled from a larger table than its superblocks
//! record. The legs' new parts start out holding different garbage on every leg, so a region
//! that is not resynced shows as a mismatch.

mod common;
use common::*;
use std::sync::Arc;

use raid::layout::{raid5_stripe, Raid5Layout};
use raid::meta::{SbRead, Superblock, META_BLOCK};
use raid::{LegState, SyncAction};
use tables::io::BlockDevice;
use tables::mem::MemDevice;
use tables::Sectors;

const K: u64 = 1024;

/// Legs `d0..` of `leg` bytes whose bytes from `from` on are garbage, different per leg, and
/// metadata devices `m0..` of `meta` bytes.
fn legs(n: usize, leg: u64, from: u64, meta: u64) -> (Devs, Vec<Arc<MemDevice>>) {
    let devs = Devs::default();
    let mut datas = Vec::new();
    for i in 0..n {
        let d = mem(&format!("d{i}"), leg);
        d.fill(from, &pattern(1000 + i as u64, (leg - from) as usize));
        devs.add(&format!("d{i}"), d.clone());
        devs.add(&format!("m{i}"), mem(&format!("m{i}"), meta));
        datas.push(d);
    }
    (devs, datas)
}

fn line(head: &str, n: usize) -> String {
    let mut l = format!("{head} {n}");
    for i in 0..n {
        l.push_str(&format!(" m{i} d{i}"));
    }
    l
}

fn open(devs: &Devs, size: u64, line: &str) -> Result<Arc<raid::RaidDevice>, String> {
    build(devs, false, false, Sectors(size / 512), line)
}

/// The superblock on `m`.
fn superblock(m: &dyn BlockDevice) -> Superblock {
    match Superblock::decode(&rd(m, 0, META_BLOCK).unwrap()) {
        SbRead::Valid(sb) => sb,
        other => panic!("no superblock: {other:?}"),
    }
}

#[test]
fn raid1_grows_online_reads_the_primary_until_resynced_and_records_the_new_size() {
    let (small, big) = (512 * K, 1024 * K);
    let (devs, datas) = legs(2, big, small, 128 * K);
    let l = line("raid1 3 0 region_size 64", 2);
    let old = open(&devs, small, &l).unwrap();
    sync_all(&old);
    let data = pattern(7, small as usize);
    wr(&*old, 0, &data).unwrap();
    // The reload: a second handle on the running array, larger; nothing changes yet.
    let new = open(&devs, big, &l).unwrap();
    assert_eq!(new.size().0, big);
    assert_eq!(new.array_size().0, small);
    let st = new.status();
    assert!(st.contains(&format!(" 1024/{} resync", big / 512)), "{st}");
    assert!(old.status().contains(" 1024/1024 idle"), "{}", old.status());
    // The swap drops the old handle; the array grows to the one in use.
    drop(old);
    assert!(iort::block_on(new.sync_step()).unwrap().unwrap());
    assert_eq!(new.array_size().0, big);
    let sb = superblock(&*devs.open("m1").unwrap());
    assert_eq!((sb.array_bytes, sb.leg_bytes), (big, big));
    assert_eq!(new.sync_action(), SyncAction::Resync);
    // Before the resync the new part reads as the primary leg holds it, every time.
    let primary = datas[0].snapshot(small, (big - small) as usize);
    for _ in 0..3 {
        same(
            &rd(&*new, small, (big - small) as usize).unwrap(),
            &primary,
            "before resync",
        );
    }
    // Writes past the old end, then the resync copies the rest.
    let tail = pattern(8, 100_000);
    wr(&*new, small + 3000, &tail).unwrap();
    sync_all(&new);
    same(
        &datas[1].snapshot(small, (big - small) as usize),
        &datas[0].snapshot(small, (big - small) as usize),
        "legs after resync",
    );
    assert_eq!(check(&new), 0);
    same(&rd(&*new, 0, small as usize).unwrap(), &data, "old data");
    same(
        &rd(&*new, small + 3000, tail.len()).unwrap(),
        &tail,
        "new data",
    );
    flush(&*new).unwrap();
    drop(new);
    // The superblocks say 1 MiB: the old table is a shrink, the new one assembles clean.
    let e = open(&devs, small, &l).err().unwrap_or_default();
    assert!(
        e.contains("shrinking") && e.contains(&big.to_string()) && e.contains(&small.to_string()),
        "{e}"
    );
    let again = open(&devs, big, &l).unwrap();
    assert_eq!(again.sync_action(), SyncAction::Idle, "{}", again.status());
    same(
        &rd(&*again, 0, small as usize).unwrap(),
        &data,
        "after reassembly",
    );
}

/// Which leg holds array byte `off` of a raid5 array, and where.
fn raid5_place(layout: Raid5Layout, n: usize, chunk: u64, off: u64) -> (usize, u64) {
    let width = chunk * (n as u64 - 1);
    let (stripe, within) = (off / width, off % width);
    let map = raid5_stripe(layout, n, stripe);
    (
        map.data[(within / chunk) as usize],
        stripe * chunk + within % chunk,
    )
}

#[test]
fn raid5_writes_in_the_new_part_keep_parity_whole_before_the_resync() {
    // Five legs: a small write reads less by read-modify-write, which would carry the new
    // part's garbage parity on; a leg lost before the resync must still read back right.
    let (n, chunk) = (5usize, 4 * K);
    let (leg_small, leg_big) = (128 * K, 256 * K);
    let (small, big) = (leg_small * 4, leg_big * 4);
    let (devs, datas) = legs(n, leg_big, leg_small, 128 * K);
    let l = line("raid5_ls 3 8 region_size 32", n);
    let old = open(&devs, small, &l).unwrap();
    sync_all(&old);
    let data = pattern(3, small as usize);
    wr(&*old, 0, &data).unwrap();
    let new = open(&devs, big, &l).unwrap();
    drop(old);
    let at = small + 70_000;
    let bytes = pattern(4, 1500);
    wr(&*new, at, &bytes).unwrap();
    assert_eq!(new.sync_action(), SyncAction::Resync, "{}", new.status());
    let (leg, _) = raid5_place(Raid5Layout::LeftSymmetric, n, chunk, at);
    iort::block_on(new.fail_leg(leg)).unwrap().unwrap();
    same(
        &rd(&*new, at, bytes.len()).unwrap(),
        &bytes,
        "rebuilt from parity",
    );
    same(&rd(&*new, 0, small as usize).unwrap(), &data, "old part");
    let _ = datas;
}

#[test]
fn nosync_grow_takes_the_new_part_as_in_sync() {
    let (small, big) = (256 * K, 512 * K);
    let (devs, _datas) = legs(2, big, small, 128 * K);
    let old = open(&devs, small, &line("raid1 3 0 region_size 64", 2)).unwrap();
    sync_all(&old);
    let new = open(&devs, big, &line("raid1 4 0 nosync region_size 64", 2)).unwrap();
    assert!(new.status().contains(" 1024/1024 idle"), "{}", new.status());
    drop(old);
    iort::block_on(new.sync_step()).unwrap().unwrap();
    assert_eq!(new.array_size().0, big);
    assert_eq!(new.sync_action(), SyncAction::Idle);
    let st = new.status();
    assert!(st.contains(" bitmap:0/16"), "{st}");
}

#[test]
fn a_reload_that_is_never_used_leaves_the_array_as_it_was() {
    let (small, big) = (256 * K, 512 * K);
    let (devs, _datas) = legs(3, big, small, 128 * K);
    let l = line("raid5_ls 3 8 region_size 32", 3);
    let old = open(&devs, small, &l).unwrap();
    sync_all(&old);
    let new = open(&devs, big, &l).unwrap();
    // The reload failed after its build: the new handle goes, the old one stays.
    drop(new);
    iort::block_on(old.sync_step()).unwrap().unwrap();
    assert_eq!(old.array_size().0, small);
    flush(&*old).unwrap();
    drop(old);
    let sb = superblock(&*devs.open("m0").unwrap());
    assert_eq!(sb.array_bytes, small);
    open(&devs, small, &l).unwrap();
}

#[test]
fn an_array_assembled_from_a_larger_table_grows_and_resyncs_the_new_part() {
    let (small, big) = (384 * K, 1024 * K);
    for head in [
        "raid1 3 0 region_size 64",
        "raid10 3 8 region_size 64",
        "raid5_la 3 8 region_size 64",
    ] {
        let n = if head.starts_with("raid10") { 4 } else { 3 };
        let (devs, _datas) = legs(n, big, small / 2, 128 * K);
        let l = line(head, n);
        let data = pattern(5, small as usize);
        {
            let d = open(&devs, small, &l).unwrap();
            sync_all(&d);
            wr(&*d, 0, &data).unwrap();
            flush(&*d).unwrap();
        }
        let d = open(&devs, big / 2, &l).unwrap_or_else(|e| panic!("{head}: {e}"));
        assert_eq!(
            d.sync_action(),
            SyncAction::Resync,
            "{head}: {}",
            d.status()
        );
        same(&rd(&*d, 0, small as usize).unwrap(), &data, head);
        sync_all(&d);
        assert_eq!(check(&d), 0, "{head}: mismatches after the grow's resync");
        same(&rd(&*d, 0, small as usize).unwrap(), &data, head);
        let sb = superblock(&*devs.open("m0").unwrap());
        assert_eq!(sb.array_bytes, big / 2, "{head}");
    }
}

#[test]
fn grows_that_cannot_be_done_are_refused_naming_why() {
    let (small, big) = (512 * K, 1024 * K);
    let (devs, _datas) = legs(2, big, small, 128 * K);
    let l = line("raid1 3 0 region_size 64", 2);
    let dev = open(&devs, small, &l).unwrap();
    sync_all(&dev);
    // Legs too small.
    let e = open(&devs, 2 * big, &l).err().unwrap_or_default();
    assert!(
        e.contains("leg 0 (d0) has 1048576 bytes") && e.contains("2097152 bytes need"),
        "{e}"
    );
    // Shrinking.
    let e = open(&devs, small / 2, &l).err().unwrap_or_default();
    assert!(
        e.contains("shrinking") && e.contains("524288") && e.contains("262144"),
        "{e}"
    );
    // A region size the bitmap cannot keep (the default region doubles above 8 TiB).
    let e = open(&devs, 16 << 40, &line("raid1 1 0", 2)).err();
    assert!(e.is_some(), "a table with another region size");
    let dflt = line("raid1 1 0", 2);
    let (devs2, _) = legs(2, big, small, 128 * K);
    let d2 = open(&devs2, small, &dflt).unwrap();
    let e = open(&devs2, 16 << 40, &dflt).err().unwrap_or_default();
    assert!(
        e.contains("region") && e.contains("keeps its region size"),
        "{e}"
    );
    drop(d2);
    // Other arguments may not change with the size.
    let e = open(
        &devs,
        big,
        &line("raid1 5 0 region_size 64 max_recovery_rate 10", 2),
    )
    .err()
    .unwrap_or_default();
    assert!(e.contains("max_recovery_rate"), "{e}");
    // Not with a leg out of sync.
    iort::block_on(dev.fail_leg(1)).unwrap().unwrap();
    let e = open(&devs, big, &l).err().unwrap_or_default();
    assert!(e.contains("leg 1 (d1)") && e.contains("in sync"), "{e}");
    drop(dev);
    // Nor when assembling from a larger table with a leg out of sync.
    let e = open(&devs, big, &l).err().unwrap_or_default();
    assert!(e.contains("cannot grow") && e.contains("leg 1"), "{e}");
}

#[test]
fn a_grow_past_the_metadata_devices_bitmap_room_is_refused() {
    // 8 KiB metadata: the superblock and one bitmap page of 32512 regions of 512 bytes.
    let (small, big) = (8 << 20, 32 << 20);
    let devs = Devs::default();
    for i in 0..2 {
        devs.add(&format!("d{i}"), mem(&format!("d{i}"), big));
        devs.add(&format!("m{i}"), mem(&format!("m{i}"), 8 * K));
    }
    let l = line("raid1 4 0 nosync region_size 1", 2);
    let dev = open(&devs, small, &l).unwrap();
    let e = open(&devs, big, &l).err().unwrap_or_default();
    assert!(
        e.contains("metadata device of leg 0 (m0) has 8192 bytes; needs 16384"),
        "{e}"
    );
    drop(dev);
    let e = open(&devs, big, &l).err().unwrap_or_default();
    assert!(e.contains("metadata device of leg 0"), "{e}");
}

#[test]
fn raid5_moves_its_parity_log_past_a_longer_bitmap() {
    // Regions of one chunk: 16384 regions (one bitmap page) grow to 49152 (two pages), so the
    // log starts a page later. A degraded write after the grow is logged there and replayed.
    let (n, chunk) = (3usize, 4 * K);
    let (leg_small, leg_big) = (64u64 << 20, 192u64 << 20);
    let devs = Devs::default();
    let mut metas = Vec::new();
    for i in 0..n {
        devs.add(&format!("d{i}"), mem(&format!("d{i}"), leg_big));
        let m = mem(&format!("m{i}"), 256 * K);
        devs.add(&format!("m{i}"), m.clone());
        metas.push(m);
    }
    let l = line("raid5_ls 4 8 nosync region_size 8", n);
    let old = open(&devs, leg_small * 2, &l).unwrap();
    let new = open(&devs, leg_big * 2, &l).unwrap();
    drop(old);
    let at = leg_small * 2 + 5 * chunk + 100;
    let bytes = pattern(9, 3000);
    wr(&*new, at, &bytes).unwrap();
    let (leg, _) = raid5_place(Raid5Layout::LeftSymmetric, n, chunk, at);
    let other = (leg + 1) % n;
    iort::block_on(new.fail_leg(other)).unwrap().unwrap();
    let more = pattern(10, 3000);
    wr(&*new, at + 3000, &more).unwrap();
    assert!(new.status().contains(" ppl:active("), "{}", new.status());
    // The checkpoint is past the second bitmap page; the old one's place is that page now.
    let cp = |at: u64| metas.iter().any(|m| &m.snapshot(at, 8)[..] == b"RPPLCKP1");
    assert!(cp(3 * 4096), "no checkpoint after the bitmap");
    assert!(!cp(2 * 4096), "a checkpoint left where the bitmap grew");
    drop(new);
    let mut deg = format!("raid5_ls 4 8 nosync region_size 8 {n}");
    for i in 0..n {
        if i == other {
            deg.push_str(" - -");
        } else {
            deg.push_str(&format!(" m{i} d{i}"));
        }
    }
    let d = open(&devs, leg_big * 2, &deg).unwrap();
    assert!(d.status().contains("ppl_replayed:"), "{}", d.status());
    same(&rd(&*d, at, 3000).unwrap(), &bytes, "logged write");
    same(&rd(&*d, at + 3000, 3000).unwrap(), &more, "logged write 2");
    assert_eq!(d.leg_states()[other], LegState::Failed);
}

#[test]
fn raid5_grows_right_after_a_rebuild_that_left_its_parity_log_behind() {
    // The log kept while a leg was out is dropped by the next write; a grow comes first here.
    let (small, big) = (256 * K, 512 * K);
    let (devs, _datas) = legs(3, big, small, 128 * K);
    let l = line("raid5_ls 3 8 region_size 32", 3);
    let old = open(&devs, small, &l).unwrap();
    sync_all(&old);
    iort::block_on(old.fail_leg(1)).unwrap().unwrap();
    let data = pattern(12, 20_000);
    wr(&*old, 1000, &data).unwrap();
    assert!(old.status().contains(" ppl:active("), "{}", old.status());
    msg(&*old, "rebuild 1").unwrap();
    sync_all(&old);
    assert!(old.status().contains(" ppl:active("), "{}", old.status());
    let new = open(&devs, big, &l).unwrap();
    drop(old);
    assert!(
        iort::block_on(new.sync_step()).unwrap().unwrap(),
        "{}",
        new.status()
    );
    assert_eq!(new.array_size().0, big);
    assert!(new.status().contains(" ppl:idle("), "{}", new.status());
    sync_all(&new);
    assert_eq!(check(&new), 0);
    same(&rd(&*new, 1000, data.len()).unwrap(), &data, "data");
}

#[test]
fn superblocks_from_before_arrays_could_grow_grow_from_their_leg_size() {
    let (small, big) = (320 * K, 1024 * K);
    let (devs, datas) = legs(2, big, small, 128 * K);
    let l = line("raid1 3 0 region_size 64", 2);
    let data = pattern(13, small as usize);
    {
        let d = open(&devs, small, &l).unwrap();
        sync_all(&d);
        wr(&*d, 0, &data).unwrap();
        flush(&*d).unwrap();
    }
    // What the code before this field wrote: no array size.
    for i in 0..2 {
        let m = devs.open(&format!("m{i}")).unwrap();
        let mut sb = superblock(&*m);
        sb.array_bytes = 0;
        wr(&*m, 0, &sb.encode()).unwrap();
    }
    let d = open(&devs, big, &l).unwrap();
    assert_eq!(d.sync_action(), SyncAction::Resync, "{}", d.status());
    sync_all(&d);
    assert_eq!(check(&d), 0);
    same(&rd(&*d, 0, small as usize).unwrap(), &data, "old data");
    same(
        &datas[1].snapshot(0, big as usize),
        &datas[0].snapshot(0, big as usize),
        "legs",
    );
}
