//! Inline deduplication: sharing by content, zero-block elimination, forgetting freed
//! blocks (index entries and hash records), the index rebuilt at open, a full index,
//! refusals, turning dedup on for a plain pool and the scan, and hash collisions under a
//! deliberately weak hash (`dedup_verify` never shares different contents).

mod common;

use std::sync::Arc;

use common::*;
use tables::io::BlockDevice;
use tables::registry::TargetKind;
use tables::{Bytes, DeviceRef, WriteFlags};
use thin::dedup::HashKind;
use thin::target::{parse_pool_args, ThinPoolKind};
use thin::{tools, Pool, PoolOptions, ThinDevice, ThinId};

const BS: u64 = 4096;
const VOL: u64 = 256 * BS;

fn dopts() -> PoolOptions {
    PoolOptions {
        dedup: true,
        ..opts(8)
    }
}

/// Block contents: `c` names one; 0 is all zeroes.
fn content(c: u64) -> Vec<u8> {
    if c == 0 {
        return vec![0; BS as usize];
    }
    let mut s = c.wrapping_mul(0x2545_F491_4F6C_DD1D);
    (0..BS).map(|_| rng(&mut s) as u8).collect()
}

fn write(t: &ThinDevice, block: u64, data: &[u8]) {
    // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
    run(async { unsafe { t.write(Bytes(block * BS), data, WriteFlags::default()) }.await })
        .unwrap();
}

fn read(t: &ThinDevice, block: u64) -> Vec<u8> {
    let mut buf = vec![0u8; BS as usize];
    // SAFETY: as in `write`.
    run(async { unsafe { t.read(Bytes(block * BS), &mut buf) }.await }).unwrap();
    buf
}

struct P {
    meta: DeviceRef,
    data: DeviceRef,
    pool: Arc<Pool>,
}

fn pool_with(o: PoolOptions) -> P {
    let meta: DeviceRef = mem("meta", 2 * MIB);
    let data: DeviceRef = mem("data", 4 * MIB);
    let pool = open(meta.clone(), data.clone(), o);
    P { meta, data, pool }
}

fn thin(p: &P, id: u32) -> Arc<ThinDevice> {
    if p.pool.devices().unwrap().iter().all(|(i, _)| i.0 != id) {
        p.pool.create_thin(ThinId(id)).unwrap();
    }
    p.pool.thin(ThinId(id), Bytes(VOL), None).unwrap()
}

fn check(p: &P) -> tools::CheckReport {
    run(p.pool.commit()).unwrap();
    let r = run(tools::check(&p.meta)).unwrap();
    assert!(r.clean, "{:?}", r.errors);
    r
}

#[test]
fn duplicates_share_and_zeroes_take_no_block() {
    let p = pool_with(dopts());
    let (a, b) = (thin(&p, 0), thin(&p, 1));
    write(&a, 0, &content(1));
    write(&b, 5, &content(1));
    write(&a, 1, &content(2));
    write(&a, 2, &content(3));
    assert_eq!(p.pool.stats().data_used, 3);
    // Zeroes over a mapped block unmap it; over an unmapped one they take nothing.
    write(&a, 2, &content(0));
    write(&a, 3, &content(0));
    // A partial write is merged (here with zeroes) and deduplicated as a whole block: the
    // same bytes written whole elsewhere share its block.
    write(&b, 7, &content(2)[..2048]);
    let mut want7 = content(2)[..2048].to_vec();
    want7.resize(BS as usize, 0);
    write(&b, 8, &want7);
    let s = p.pool.stats();
    assert_eq!(s.data_used, 3, "{s:?}");
    let d = s.dedup.clone().unwrap();
    assert_eq!(d.logical_blocks, 5);
    assert_eq!(d.shared_blocks, 2);
    assert_eq!(d.zero_blocks, 2);
    assert_eq!(d.index_entries, 3);
    assert!((d.ratio - 5.0 / 3.0).abs() < 1e-9);
    assert_eq!(read(&a, 0), content(1));
    assert_eq!(read(&b, 5), content(1));
    assert_eq!(read(&a, 1), content(2));
    assert_eq!(read(&a, 2), content(0));
    assert_eq!(read(&b, 7), want7);
    assert_eq!(read(&b, 8), want7);
    let line = p.pool.status_line();
    assert!(line.contains(" dedup 5/3 2 2 1.67 3/"), "{line}");
    let r = check(&p);
    assert!(r.dedup);
    assert_eq!(r.hash_records, 3);
    assert_eq!(r.duplicate_hashes, 0);
}

/// Index entries (status) and records (check) of a pool, after a commit.
fn entries_and_records(p: &P) -> (u64, u64) {
    let e = p.pool.stats().dedup.unwrap().index_entries;
    (e, check(p).hash_records)
}

#[test]
fn freed_blocks_are_forgotten_on_overwrite_discard_and_delete() {
    let p = pool_with(dopts());
    let a = thin(&p, 0);
    write(&a, 0, &content(1));
    write(&a, 1, &content(2));
    assert_eq!(entries_and_records(&p), (2, 2));
    // Overwrite: content 1's block is freed.
    write(&a, 0, &content(3));
    assert_eq!(entries_and_records(&p), (2, 2));
    // Content 1 again: a fresh block, not the freed one's stale entry.
    write(&a, 2, &content(1));
    assert_eq!(entries_and_records(&p), (3, 3));
    // Discard.
    run(a.discard(Bytes(0), Bytes(BS))).unwrap();
    assert_eq!(entries_and_records(&p), (2, 2));
    // Snapshot shares everything; deleting the origin frees nothing, the snapshot all.
    run(p.pool.create_snap(ThinId(1), ThinId(0))).unwrap();
    drop(a);
    p.pool.delete(ThinId(0)).unwrap();
    assert_eq!(entries_and_records(&p), (2, 2));
    p.pool.delete(ThinId(1)).unwrap();
    assert_eq!(entries_and_records(&p), (0, 0));
    assert_eq!(p.pool.stats().data_used, 0);
    // A freed content written again is stored again (nothing stale matched it).
    let b = thin(&p, 2);
    write(&b, 0, &content(2));
    assert_eq!(read(&b, 0), content(2));
    assert_eq!(entries_and_records(&p), (1, 1));
}

#[test]
fn reopen_rebuilds_the_index_from_the_hash_tree() {
    let p = pool_with(dopts());
    let a = thin(&p, 0);
    for i in 0..100 {
        write(&a, i, &content(i % 40 + 1));
    }
    drop(a);
    run(p.pool.commit()).unwrap();
    let used = p.pool.stats().data_used;
    assert_eq!(used, 40);
    drop(p.pool);
    let pool = open(p.meta.clone(), p.data.clone(), dopts());
    let s = pool.stats();
    let d = s.dedup.unwrap();
    assert_eq!((d.index_entries, d.unhashed_blocks), (40, 0));
    // The rebuilt index finds old contents from another volume.
    let p = P { pool, ..p };
    let b = thin(&p, 1);
    for i in 0..40 {
        write(&b, i, &content(i + 1));
    }
    assert_eq!(p.pool.stats().data_used, 40);
    assert_eq!(entries_and_records(&p), (40, 40));
}

#[test]
fn a_full_index_finds_fewer_duplicates_but_never_wrong_data() {
    // 8 slots: at most 6 entries.
    let p = pool_with(PoolOptions {
        dedup_index_bytes: Some(64),
        ..dopts()
    });
    let a = thin(&p, 0);
    for i in 0..20 {
        write(&a, i, &content(i + 1));
    }
    let d = p.pool.stats().dedup.unwrap();
    assert_eq!((d.index_entries, d.index_capacity), (6, 6));
    assert!(d.index_full);
    assert_eq!(d.index_left_out, 14);
    assert!(p.pool.status_line().contains(" index_full 14 "));
    // Duplicates of indexed contents are found, the others are stored again.
    for i in 0..20 {
        write(&a, 100 + i, &content(i + 1));
    }
    assert_eq!(p.pool.stats().data_used, 20 + 14);
    for i in 0..20 {
        assert_eq!(read(&a, i), content(i + 1));
        assert_eq!(read(&a, 100 + i), content(i + 1));
    }
    let r = check(&p);
    assert_eq!(r.duplicate_hashes, 14);
}

#[test]
fn refusals() {
    let args = |s: &str| -> Vec<String> { s.split_whitespace().map(String::from).collect() };
    let e = parse_pool_args(&args("m d 128 0 1 dedup"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("dedup needs a data block size of 8 sectors (4 KiB), got 128"),
        "{e}"
    );
    assert!(parse_pool_args(&args("m d 128 0 1 dedup_verify")).is_err());
    for bad in [
        "m d 8 0 2 dedup dedup_index_mb",
        "m d 8 0 3 dedup dedup_index_mb x",
        "m d 8 0 3 dedup dedup_index_mb 0",
        "m d 8 0 3 dedup dedup_index_mb -1",
        "m d 8 0 3 dedup dedup_index_mb 99999999999",
        "m d 8 0 2 dedup_index_mb 4",
    ] {
        let e = parse_pool_args(&args(bad)).unwrap_err().to_string();
        assert!(e.contains("dedup_index_mb"), "{bad}: {e}");
    }
    let o = parse_pool_args(&args(
        "m d 8 0 4 dedup_index_mb 16 error_if_no_space dedup_verify",
    ))
    .unwrap();
    assert!(o.dedup && o.dedup_verify);
    assert_eq!(o.dedup_index_bytes, Some(16 << 20));
    assert_eq!(
        ThinPoolKind
            .normalize(&args(
                "m d 8 0 4 dedup_index_mb 16 dedup_verify error_if_no_space"
            ))
            .join(" "),
        "m d 8 0 5 error_if_no_space dedup dedup_verify dedup_index_mb 16"
    );
    // The pool refuses it too, and a dedup pool opened without dedup.
    let meta: DeviceRef = mem("meta", 2 * MIB);
    let data: DeviceRef = mem("data", 4 * MIB);
    let e = run(Pool::open(
        meta.clone(),
        data.clone(),
        PoolOptions {
            dedup: true,
            ..opts(128)
        },
    ))
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("got 128"), "{e}");
    drop(open(meta.clone(), data.clone(), dopts()));
    let e = run(Pool::open(meta.clone(), data.clone(), opts(8)))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("the table must say dedup"), "{e}");
    drop(open(meta, data, dopts()));
}

#[test]
fn dedup_turned_on_for_a_plain_pool_and_the_scan_shares_old_blocks() {
    let p = pool_with(opts(8));
    let a = thin(&p, 0);
    for i in 0..30 {
        write(&a, i, &content(i % 10 + 1));
    }
    drop(a);
    run(p.pool.commit()).unwrap();
    drop(p.pool);
    let pool = open(p.meta.clone(), p.data.clone(), dopts());
    let p = P { pool, ..p };
    let d = p.pool.stats().dedup.unwrap();
    assert_eq!((d.used_blocks, d.unhashed_blocks), (30, 30));
    // Old blocks are not matched until scanned.
    let b = thin(&p, 1);
    write(&b, 0, &content(1));
    assert_eq!(p.pool.stats().data_used, 31);
    let mut steps = 0;
    loop {
        let s = run(p.pool.dedup_scan_step(7)).unwrap();
        assert!(s.visited <= 7);
        steps += 1;
        if s.pass_done {
            break;
        }
        assert!(steps < 100);
    }
    assert_eq!(p.pool.stats().data_used, 10);
    assert_eq!(p.pool.stats().dedup.unwrap().unhashed_blocks, 0);
    let a = thin(&p, 0);
    for i in 0..30 {
        assert_eq!(read(&a, i), content(i % 10 + 1));
    }
    assert_eq!(read(&b, 0), content(1));
    // The message form.
    let r = run(thin::pool::pool_message(
        &p.pool,
        &["dedup_scan".into(), "100".into()],
    ))
    .unwrap();
    assert!(r.starts_with("visited "), "{r}");
    // One client block write since the reopen (to b): the scan's caller throttles on it.
    assert!(r.ends_with(" writes 1"), "{r}");
    let r = check(&p);
    assert_eq!((r.hash_records, r.duplicate_hashes), (10, 0));
}

/// Writes `n` different contents to a pool with the weak hash; returns how many read back
/// wrong and the pool's verify mismatches.
fn weak_hash_run(verify: bool, n: u64) -> (u64, u64, u64) {
    let p = pool_with(PoolOptions {
        dedup_verify: verify,
        dedup_hash: HashKind::WeakForTests,
        ..dopts()
    });
    let a = thin(&p, 0);
    for i in 0..n {
        write(&a, i, &content(i + 1));
    }
    let wrong = (0..n).filter(|&i| read(&a, i) != content(i + 1)).count() as u64;
    let s = p.pool.stats();
    if verify {
        check(&p);
    }
    (wrong, s.data_used, s.dedup.unwrap().verify_mismatches)
}

#[test]
fn weak_hash_collisions_are_never_shared_with_verify() {
    // 1 byte of hash for 200 contents: collisions are certain.
    let (wrong, used, mismatches) = weak_hash_run(true, 200);
    assert_eq!(wrong, 0);
    assert_eq!(used, 200);
    assert!(
        mismatches > 0,
        "no collision happened: the test proves nothing"
    );
    // Without verify the same writes share colliding contents: wrong data, which is what
    // the test above would catch.
    let (wrong, used, _) = weak_hash_run(false, 200);
    assert!(wrong > 0 && used < 200, "{wrong} wrong, {used} used");
}
