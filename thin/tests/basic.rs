//! Basic behaviour: provisioning, zero reads, partial writes, snapshots, discards, reopen,
//! status lines, messages, external origins, space exhaustion.

mod common;

use common::*;
use tables::io::{read_blocking, write_blocking, BlockDevice};
use tables::{Bytes, DeviceRef, WriteFlags};
use thin::{tools, DataBlock, ThinId, VBlock};

#[test]
fn provision_read_snapshot_discard_reopen() {
    let meta = mem("meta", 4 * MIB);
    let data = mem("data", 4 * MIB);
    let pool = open(meta.clone(), data.clone(), opts(16)); // 8 KiB blocks
    pool.create_thin(ThinId(1)).unwrap();
    let t = pool.thin(ThinId(1), Bytes(MIB), None).unwrap();
    run(async {
        let mut b = vec![1u8; 3000];
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { t.read(Bytes(100), &mut b) }.await.unwrap();
        assert!(b.iter().all(|&x| x == 0), "unprovisioned reads zero");
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { t.write(Bytes(8192 + 100), &[7u8; 1000], WriteFlags::default()) }
            .await
            .unwrap();
        let mut blk = vec![9u8; 8192];
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { t.read(Bytes(8192), &mut blk) }.await.unwrap();
        assert!(blk[..100].iter().all(|&x| x == 0));
        assert!(blk[100..1100].iter().all(|&x| x == 7));
        assert!(blk[1100..].iter().all(|&x| x == 0));
        assert_eq!(pool.stats().data_used, 1);
        pool.create_snap(ThinId(2), ThinId(1)).await.unwrap();
        let s = pool.thin(ThinId(2), Bytes(MIB), None).unwrap();
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { t.write(Bytes(8192), &[5u8; 10], WriteFlags::default()) }
            .await
            .unwrap();
        assert_eq!(pool.stats().data_used, 2, "write to shared block copies");
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { s.read(Bytes(8192), &mut blk) }.await.unwrap();
        assert!(blk[..100].iter().all(|&x| x == 0));
        assert!(blk[100..1100].iter().all(|&x| x == 7));
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { t.read(Bytes(8192), &mut blk) }.await.unwrap();
        assert!(blk[..10].iter().all(|&x| x == 5));
        assert!(blk[100..1100].iter().all(|&x| x == 7));
        assert_eq!(t.status(), "16 31");
        t.discard(Bytes(0), Bytes(3 * 8192)).await.unwrap();
        assert_eq!(t.status(), "0 -");
        t.flush().await.unwrap();
        assert_eq!(pool.stats().data_used, 1);
        let r = tools::check(&(meta.clone() as DeviceRef)).await.unwrap();
        assert!(r.clean, "{:?}", r.errors);
        assert_eq!(r.devices, 2);
    });
    drop((t, pool));
    let pool = open(meta.clone(), data.clone(), opts(16));
    let s = pool.thin(ThinId(2), Bytes(MIB), None).unwrap();
    run(async {
        let mut blk = vec![0u8; 8192];
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { s.read(Bytes(8192), &mut blk) }.await.unwrap();
        assert!(blk[100..1100].iter().all(|&x| x == 7));
    });
    assert!(
        pool.status_line().starts_with("0 "),
        "{}",
        pool.status_line()
    );
    assert!(
        pool.status_line().contains(" 1/512 - rw "),
        "{}",
        pool.status_line()
    );
}

#[test]
fn dump_restore_roundtrip_through_json() {
    let meta = mem("meta", 4 * MIB);
    let data = mem("data", 8 * MIB);
    let pool = open(meta.clone(), data.clone(), opts(8));
    run(async {
        pool.create_thin(ThinId(5)).unwrap();
        let t = pool.thin(ThinId(5), Bytes(4 * MIB), None).unwrap();
        for i in 0..300u64 {
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe {
                t.write(
                    Bytes((i * 7 % 1024) * 4096),
                    &[i as u8 | 1; 4096],
                    WriteFlags::default(),
                )
            }
            .await
            .unwrap();
        }
        pool.create_snap(ThinId(6), ThinId(5)).await.unwrap();
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { t.write(Bytes(0), &[0xEE; 4096], WriteFlags::default()) }
            .await
            .unwrap();
        pool.set_transaction_id(0, 9).unwrap();
        pool.commit().await.unwrap();
    });
    let md: DeviceRef = meta.clone();
    let d = run(tools::dump(&md)).unwrap();
    assert_eq!(d.transaction_id, 9);
    assert_eq!(d.devices.len(), 2);
    let text = d.to_string();
    assert!(text.starts_with("pool data_block_sectors=8 nr_data_blocks=2048 transaction_id=9\ndevice 5 mapped_blocks=300\n"), "{text}");
    let json = serde_json::to_string_pretty(&d).unwrap();
    let back: tools::Dump = serde_json::from_str(&json).unwrap();
    let out: DeviceRef = mem("meta2", 4 * MIB);
    run(tools::restore(&back, &out)).unwrap();
    let r = run(tools::check(&out)).unwrap();
    assert!(r.clean, "{:?}", r.errors);
    assert_eq!(run(tools::dump(&out)).unwrap(), d);
    // Same data through the restored metadata.
    let p2 = open(out, data.clone(), opts(8));
    let a = pool.thin(ThinId(6), Bytes(4 * MIB), None).unwrap();
    let b = p2.thin(ThinId(6), Bytes(4 * MIB), None).unwrap();
    run(async {
        let (mut x, mut y) = (vec![0u8; 4 * MIB as usize], vec![1u8; 4 * MIB as usize]);
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { a.read(Bytes(0), &mut x) }.await.unwrap();
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { b.read(Bytes(0), &mut y) }.await.unwrap();
        assert!(x == y);
    });
    // Restored counts: a block mapped by both devices has count 2.
    assert_eq!(p2.stats().data_used, pool.stats().data_used);
}

#[test]
fn external_origin_clones() {
    let meta = mem("meta", 4 * MIB);
    let data = mem("data", 8 * MIB);
    let origin = mem("image", 300 * KIB); // not a multiple of the block size
    let img: Vec<u8> = (0..300 * KIB).map(|i| (i * 7 % 251) as u8).collect();
    origin.fill(0, &img);
    let pool = open(meta, data, opts(16));
    let o: DeviceRef = origin.clone();
    let clones: Vec<_> = (0..10)
        .map(|i| {
            pool.create_thin(ThinId(i)).unwrap();
            pool.thin(ThinId(i), Bytes(MIB), Some(o.clone())).unwrap()
        })
        .collect();
    run(async {
        for (i, c) in clones.iter().enumerate() {
            // Partial write into an origin block: the rest of the block comes from the origin.
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { c.write(Bytes(8192 * 3 + 10), &[i as u8; 20], WriteFlags::default()) }
                .await
                .unwrap();
        }
        for (i, c) in clones.iter().enumerate() {
            let mut b = vec![0u8; MIB as usize];
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { c.read(Bytes(0), &mut b) }.await.unwrap();
            let mut want = img.clone();
            want.resize(MIB as usize, 0);
            want[8192 * 3 + 10..8192 * 3 + 30].fill(i as u8);
            assert!(b == want, "clone {i}");
        }
        // Discarding the written block falls back to the origin again.
        clones[0]
            .discard(Bytes(8192 * 3), Bytes(8192))
            .await
            .unwrap();
        let mut b = vec![0u8; 8192];
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { clones[0].read(Bytes(8192 * 3), &mut b) }
            .await
            .unwrap();
        assert!(b[..] == img[8192 * 3..8192 * 4]);
        // write_zeroes on a clone must read back zeroes, not the origin.
        clones[1]
            .write_zeroes(Bytes(0), Bytes(16384), WriteFlags::default())
            .await
            .unwrap();
        let mut z = vec![1u8; 16384];
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { clones[1].read(Bytes(0), &mut z) }.await.unwrap();
        assert!(z.iter().all(|&x| x == 0));
    });
    assert_eq!(pool.stats().data_used, 9 + 2);
    assert_eq!(
        origin
            .counters
            .writes
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[test]
fn out_of_space_errors_and_low_water() {
    let meta = mem("meta", 4 * MIB);
    let data = mem("data", 64 * KIB); // 16 blocks of 4 KiB
    let mut o = opts(8);
    o.low_water_blocks = 4;
    let pool = open(meta, data, o.clone());
    pool.create_thin(ThinId(1)).unwrap();
    let t = pool.thin(ThinId(1), Bytes(MIB), None).unwrap();
    run(async {
        for b in 0..16u64 {
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { t.write(Bytes(b * 4096), &[b as u8 + 1; 4096], WriteFlags::default()) }
                .await
                .unwrap();
        }
        assert_eq!(pool.stats().low_water_events, 1);
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        let e = unsafe { t.write(Bytes(16 * 4096), &[1; 4096], WriteFlags::default()) }
            .await
            .unwrap_err();
        assert_eq!(e.errno, libc::ENOSPC);
        assert!(pool.status_line().contains("out_of_data_space"));
        // Nothing was damaged.
        for b in 0..16u64 {
            let mut x = vec![0u8; 4096];
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { t.read(Bytes(b * 4096), &mut x) }.await.unwrap();
            assert!(x.iter().all(|&v| v == b as u8 + 1));
        }
        // Discard frees space (after the commit the allocator triggers by itself).
        t.discard(Bytes(0), Bytes(2 * 4096)).await.unwrap();
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { t.write(Bytes(16 * 4096), &[1; 4096], WriteFlags::default()) }
            .await
            .unwrap();
        assert_eq!(pool.stats().mode, "rw");
    });
    // Queue mode: waits, then fails after the timeout.
    let meta = mem("meta", 4 * MIB);
    let data = mem("data", 32 * KIB);
    o.error_if_no_space = false;
    o.no_space_timeout = std::time::Duration::from_millis(200);
    let pool = open(meta, data, o);
    pool.create_thin(ThinId(1)).unwrap();
    let t = pool.thin(ThinId(1), Bytes(MIB), None).unwrap();
    run(async {
        for b in 0..8u64 {
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { t.write(Bytes(b * 4096), &[1; 4096], WriteFlags::default()) }
                .await
                .unwrap();
        }
        // How long a write to a new block takes to fail with ENOSPC.
        let enospc_after = |block: u64| {
            let t = &t;
            async move {
                let start = std::time::Instant::now();
                // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
                let e = unsafe { t.write(Bytes(block * 4096), &[1; 4096], WriteFlags::default()) }
                    .await
                    .unwrap_err();
                assert_eq!(e.errno, libc::ENOSPC);
                start.elapsed()
            }
        };
        let timeout = std::time::Duration::from_millis(200);
        assert!(enospc_after(8).await >= timeout);
        // The timeout has run out for the pool, not just for that write: the next write
        // needing a block fails at once (dm-thin's error mode), while provisioned blocks
        // still take writes.
        assert!(enospc_after(9).await < std::time::Duration::from_millis(150));
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { t.write(Bytes(0), &[2; 4096], WriteFlags::default()) }
            .await
            .unwrap();
        // Space comes back: writes provision again, and running out later waits afresh.
        t.discard(Bytes(0), Bytes(4096)).await.unwrap();
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { t.write(Bytes(10 * 4096), &[1; 4096], WriteFlags::default()) }
            .await
            .unwrap();
        assert!(enospc_after(11).await >= timeout);
    });
}

#[test]
fn data_device_growth_is_taken_on_reopen() {
    let meta = mem("meta", 4 * MIB);
    let small = mem("data", 64 * KIB);
    let pool = open(meta.clone(), small.clone(), opts(8));
    pool.create_thin(ThinId(1)).unwrap();
    run(pool.commit()).unwrap();
    assert_eq!(pool.stats().data_total, 16);
    drop(pool);
    let big = mem("data", 256 * KIB);
    big.fill(0, &small.snapshot(0, 64 * KIB as usize));
    let pool = open(meta.clone(), big, opts(8));
    assert_eq!(pool.stats().data_total, 64);
    let r = run(tools::check(&(meta.clone() as DeviceRef))).unwrap();
    assert_eq!(r.data_total, 64);
    drop(pool);
    // Shrinking is refused with a clear error.
    let e = iort::block_on(thin::Pool::open(meta, small, opts(8)))
        .unwrap()
        .err()
        .unwrap();
    assert!(e.to_string().contains("shrinking"), "{e}");
}

#[test]
fn restore_refuses_hostile_runs_without_overflow() {
    use tools::{Dump, DumpDevice, DumpRun};
    let hostile = [
        (0, u64::MAX - 1, 5),    // data blocks past u64::MAX
        (u64::MAX - 1, 0, 5),    // virtual blocks past u64::MAX
        (0, 0, u64::MAX),        // a run that would loop for ever
        (u64::MAX / 4096, 0, 1), // a virtual block whose byte offset overflows
        (0, 1000, 25),           // past the pool's 1024 blocks
    ];
    for (v, d, len) in hostile {
        let dump = Dump {
            version: 1,
            data_block_sectors: 8,
            nr_data_blocks: 1024,
            transaction_id: 0,
            devices: vec![DumpDevice {
                id: ThinId(1),
                mapped_blocks: len,
                mappings: vec![DumpRun {
                    vblock: VBlock(v),
                    dblock: DataBlock(d),
                    len,
                }],
            }],
        };
        let out: DeviceRef = mem("out", 4 * MIB);
        let e = run(tools::restore(&dump, &out)).expect_err("hostile run restored");
        assert!(e.to_string().contains("beyond"), "{e}");
    }
}

#[test]
fn data_blocks_are_bounded_by_what_the_metadata_device_describes() {
    // 64 metadata blocks hold the superblock and at most 63 bitmaps of 4064 counts.
    let max = 63 * 4064u64;
    let meta = mem("meta", 64 * 4096);
    let too_big = mem("data", (max + 1) * 4096);
    let e = iort::block_on(thin::Pool::open(meta.clone(), too_big, opts(8)))
        .unwrap()
        .err()
        .expect("a data device the metadata cannot describe is refused");
    assert!(e.to_string().contains("describes at most"), "{e}");
    // Growing past the bound takes only what the metadata describes, and stays loadable.
    let data = mem("data", 4096 * 4096);
    let pool = open(meta.clone(), data, opts(8));
    drop(pool);
    let grown = mem("data", 2 * max * 4096);
    let pool = open(meta.clone(), grown, opts(8));
    assert_eq!(pool.stats().data_total, max);
    drop(pool);
    let r = run(tools::check(&(meta as DeviceRef))).unwrap();
    assert!(r.clean && r.data_total == max, "{r:?}");
}

#[test]
fn messages_and_targets_through_the_registry() {
    use std::collections::HashMap;
    use tables::registry::{BuildCtx, Registry};
    let mut reg = Registry::empty();
    thin::register(&mut reg);
    let meta = mem("/dev/meta", 4 * MIB);
    let data = mem("/dev/data", 8 * MIB);
    let img = mem("/img", 64 * KIB);
    img.fill(0, &[3u8; 4096]);
    let devs: std::sync::Mutex<HashMap<String, DeviceRef>> =
        std::sync::Mutex::new(HashMap::from([
            ("/dev/meta".to_string(), meta.clone() as DeviceRef),
            ("/dev/data".to_string(), data.clone() as DeviceRef),
            ("/img".to_string(), img.clone() as DeviceRef),
        ]));
    let resolver = |n: &str| {
        devs.lock()
            .unwrap()
            .get(n)
            .cloned()
            .ok_or_else(|| format!("no device {n}"))
    };
    let kind = reg.get("thin-pool").unwrap().clone();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let len = tables::Sectors(16384);
    assert!(kind
        .validate(len, &s(&["/dev/meta", "/dev/data", "100", "0"]))
        .is_err());
    assert!(kind
        .validate(len, &s(&["/dev/meta", "/dev/data", "4194304", "0"]))
        .is_err());
    let e = kind
        .validate(len, &s(&["m", "d", "128", "0", "1", "bogus"]))
        .unwrap_err();
    assert_eq!(e.arg, Some(6));
    assert!(kind
        .validate(len, &s(&["m", "d", "128", "0", "2", "read_only"]))
        .is_err());
    assert_eq!(
        kind.normalize(&s(&[
            "m",
            "d",
            "128",
            "10",
            "2",
            "skip_block_zeroing",
            "error_if_no_space"
        ])),
        s(&[
            "m",
            "d",
            "128",
            "10",
            "2",
            "skip_block_zeroing",
            "error_if_no_space"
        ])
    );
    assert_eq!(
        kind.normalize(&s(&["m", "d", "128", "10"])),
        s(&["m", "d", "128", "10", "0"])
    );
    let ctx = BuildCtx {
        line: 1,
        len,
        resolver: &resolver,
    };
    let pdev = kind
        .build(
            &ctx,
            &s(&["/dev/meta", "/dev/data", "8", "0", "1", "error_if_no_space"]),
        )
        .unwrap();
    devs.lock().unwrap().insert("pool".into(), pdev.clone());
    run(async {
        let m = |v: &[&str]| s(v);
        pdev.message(&m(&["create_thin", "1"])).await.unwrap();
        assert!(pdev.message(&m(&["create_thin", "1"])).await.is_err());
        assert!(pdev.message(&m(&["create_thin", "x"])).await.is_err());
        assert!(pdev.message(&m(&["frobnicate"])).await.is_err());
        pdev.message(&m(&["create_snap", "2", "1"])).await.unwrap();
        pdev.message(&m(&["create_thin", "3"])).await.unwrap();
        pdev.message(&m(&["set_transaction_id", "0", "5"]))
            .await
            .unwrap();
        assert!(pdev
            .message(&m(&["set_transaction_id", "0", "6"]))
            .await
            .is_err());
        pdev.message(&m(&["delete", "2"])).await.unwrap();
    });
    let tk = reg.get("thin").unwrap().clone();
    assert!(tk.validate(len, &s(&["pool"])).is_err());
    assert!(tk.validate(len, &s(&["pool", "99999999"])).is_err());
    let tctx = BuildCtx {
        line: 2,
        len: tables::Sectors(2048),
        resolver: &resolver,
    };
    let t = tk.build(&tctx, &s(&["pool", "1"])).unwrap();
    let c = tk.build(&tctx, &s(&["pool", "3", "/img"])).unwrap();
    assert!(
        tk.build(&tctx, &s(&["/dev/data", "1"])).is_err(),
        "not a pool"
    );
    assert!(
        tk.build(&tctx, &s(&["pool", "7"])).is_err(),
        "no such device"
    );
    run(async {
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { t.write(Bytes(0), &[9u8; 4096], WriteFlags::FUA) }
            .await
            .unwrap();
        let mut b = vec![0u8; 4096];
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { c.read(Bytes(0), &mut b) }.await.unwrap();
        assert!(b.iter().all(|&x| x == 3), "clone reads its origin");
        // Deleting an open device is refused.
        assert!(pdev.message(&s(&["delete", "1"])).await.is_err());
    });
    assert_eq!(t.status(), "8 7");
    assert!(pdev.status().starts_with("5 "), "{}", pdev.status());
    // A reload of the pool line finds the live pool instead of opening the metadata twice.
    let pdev2 = kind
        .build(&ctx, &s(&["/dev/meta", "/dev/data", "8", "0"]))
        .unwrap();
    assert!(pdev2.status().starts_with("5 "));
    assert!(pdev2.status().contains("queue_if_no_space"));
    drop((t, c));
    run(pdev2.message(&s(&["delete", "1"]))).unwrap();
}

#[test]
fn snapshot_waits_for_in_flight_origin_writes() {
    use std::sync::Arc;
    use tables::io::IoFuture;
    use tables::mem::MemDevice;
    /// A data device whose writes yield a few times before landing.
    struct Slow(MemDevice);
    impl BlockDevice for Slow {
        fn name(&self) -> String {
            self.0.name()
        }
        fn size(&self) -> Bytes {
            self.0.size()
        }
        unsafe fn read<'a>(&'a self, o: Bytes, b: &'a mut [u8]) -> IoFuture<'a> {
            self.0.read(o, b)
        }
        unsafe fn write<'a>(&'a self, o: Bytes, b: &'a [u8], f: WriteFlags) -> IoFuture<'a> {
            Box::pin(async move {
                for _ in 0..3 {
                    iort::yield_now().await;
                }
                self.0.write(o, b, f).await
            })
        }
        fn flush(&self) -> IoFuture<'_> {
            self.0.flush()
        }
        fn discard(&self, o: Bytes, l: Bytes) -> IoFuture<'_> {
            self.0.discard(o, l)
        }
        fn write_zeroes(&self, o: Bytes, l: Bytes, f: WriteFlags) -> IoFuture<'_> {
            self.0.write_zeroes(o, l, f)
        }
    }
    let meta = mem("meta", 4 * MIB);
    let data: DeviceRef = Arc::new(Slow(MemDevice::new("data", Bytes(8 * MIB))));
    let pool = open(meta, data, opts(8));
    pool.create_thin(ThinId(1)).unwrap();
    let t = pool.thin(ThinId(1), Bytes(MIB), None).unwrap();
    run(async {
        // Provision 16 blocks, so the next write goes in place (the dangerous case).
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { t.write(Bytes(0), &vec![1u8; 16 * 4096], WriteFlags::default()) }
            .await
            .unwrap();
        let big = vec![2u8; 16 * 4096];
        // SAFETY: joined below, in block_on: completed or dropped before `big` goes.
        let w = unsafe { t.write(Bytes(0), &big, WriteFlags::default()) };
        let snap = async {
            iort::yield_now().await;
            pool.create_snap(ThinId(2), ThinId(1)).await.unwrap();
        };
        let (r, ()) = futures::join!(w, snap);
        r.unwrap();
        // The snapshot was taken after the whole in-flight write: all 2s, never a mix.
        let s = pool.thin(ThinId(2), Bytes(MIB), None).unwrap();
        let mut b = vec![0u8; 16 * 4096];
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { s.read(Bytes(0), &mut b) }.await.unwrap();
        assert!(
            b.iter().all(|&x| x == 2),
            "snapshot saw a torn in-flight write"
        );
        // Later origin writes do not leak into the snapshot.
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { t.write(Bytes(0), &[3u8; 4096], WriteFlags::default()) }
            .await
            .unwrap();
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { s.read(Bytes(0), &mut b[..4096]) }.await.unwrap();
        assert!(b[..4096].iter().all(|&x| x == 2));
    });
}

#[test]
fn background_commit_makes_writes_durable_within_a_second() {
    use std::sync::Arc;
    use tables::mem::{CrashDevice, CutMode};
    let meta = Arc::new(CrashDevice::new("meta", Bytes(4 * MIB)));
    let data = Arc::new(CrashDevice::new("data", Bytes(8 * MIB)));
    let mut o = opts(8);
    o.commit_interval = Some(std::time::Duration::from_millis(200));
    let pool = open(meta.clone(), data.clone(), o);
    pool.create_thin(ThinId(1)).unwrap();
    let t = pool.thin(ThinId(1), Bytes(MIB), None).unwrap();
    write_blocking(&*t, Bytes(4096), &[8u8; 4096], WriteFlags::default()).unwrap();
    let before = pool.stats().commits;
    std::thread::sleep(std::time::Duration::from_millis(700));
    assert!(pool.stats().commits > before, "no periodic commit");
    drop((t, pool));
    meta.power_cut(CutMode::DropAll);
    data.power_cut(CutMode::DropAll);
    let pool = open(meta, data, opts(8));
    let t = pool.thin(ThinId(1), Bytes(MIB), None).unwrap();
    let mut b = vec![0u8; 4096];
    read_blocking(&*t, Bytes(4096), &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 8));
}

#[test]
fn many_snapshots_overflow_reference_counts() {
    // 300 snapshots each diverge from the origin's one leaf, so the shared block ends up
    // referenced by 301 leaves: past the one-byte bitmap count, into the overflow tree.
    let meta = mem("meta", 8 * MIB);
    let data = mem("data", 8 * MIB);
    let pool = open(meta.clone(), data.clone(), opts(8));
    pool.create_thin(ThinId(0)).unwrap();
    let t = pool.thin(ThinId(0), Bytes(MIB), None).unwrap();
    run(async {
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { t.write(Bytes(0), &[1u8; 4096], WriteFlags::default()) }
            .await
            .unwrap();
        for i in 1..=300u32 {
            pool.create_snap(ThinId(i), ThinId(0)).await.unwrap();
            let s = pool.thin(ThinId(i), Bytes(MIB), None).unwrap();
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { s.write(Bytes(4096), &[2u8; 4096], WriteFlags::default()) }
                .await
                .unwrap();
        }
        pool.commit().await.unwrap();
    });
    let md: DeviceRef = meta.clone();
    let r = run(tools::check(&md)).unwrap();
    assert!(r.clean, "{:?}", r.errors);
    assert_eq!(r.data_used, 301);
    drop((t, pool));
    let pool = open(meta.clone(), data, opts(8));
    run(async {
        for i in 1..=300u32 {
            pool.delete(ThinId(i)).unwrap();
        }
        pool.commit().await.unwrap();
    });
    assert_eq!(pool.stats().data_used, 1);
    let r = run(tools::check(&md)).unwrap();
    assert!(r.clean, "{:?}", r.errors);
}

#[test]
fn metadata_full_fails_writes_cleanly() {
    let meta = mem("meta", 64 * 4096); // the minimum: 64 metadata blocks
    let data = mem("data", 64 * MIB);
    let pool = open(meta.clone(), data.clone(), opts(8));
    pool.create_thin(ThinId(1)).unwrap();
    let t = pool.thin(ThinId(1), Bytes(64 * MIB), None).unwrap();
    let mut written = Vec::new();
    run(async {
        let mut err = None;
        for i in 0..16384u64 {
            let v = (i * 7919) % 16384;
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            match unsafe { t.write(Bytes(v * 4096), &[v as u8 | 1; 512], WriteFlags::default()) }
                .await
            {
                Ok(()) => written.push(v),
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        let e = err.expect("metadata never filled up");
        assert_eq!(e.errno, libc::ENOSPC, "{e}");
        assert!(e.msg.contains("metadata"), "{e}");
        pool.commit().await.unwrap();
        assert_eq!(pool.stats().mode, "rw");
    });
    let r = run(tools::check(&(meta.clone() as DeviceRef))).unwrap();
    assert!(r.clean, "{:?}", r.errors);
    assert_eq!(r.mapped_blocks, written.len() as u64);
    drop((t, pool));
    let pool = open(meta, data, opts(8));
    let t = pool.thin(ThinId(1), Bytes(64 * MIB), None).unwrap();
    run(async {
        for v in written {
            let mut b = vec![0u8; 512];
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { t.read(Bytes(v * 4096), &mut b) }.await.unwrap();
            assert!(b.iter().all(|&x| x == v as u8 | 1));
        }
    });
}

#[test]
fn threads_share_a_pool() {
    use std::sync::Arc;
    let meta = mem("meta", 8 * MIB);
    let data = mem("data", 32 * MIB);
    let pool = open(meta.clone(), data, opts(8));
    for i in 0..4 {
        pool.create_thin(ThinId(i)).unwrap();
    }
    let handles: Vec<_> = (0..4u32)
        .map(|i| {
            let pool: Arc<thin::Pool> = pool.clone();
            std::thread::spawn(move || {
                let t = pool.thin(ThinId(i), Bytes(4 * MIB), None).unwrap();
                iort::block_on(async {
                    for r in 0..3u8 {
                        for b in 0..256u64 {
                            let v = (b * 13 + i as u64) % 1024;
                            // SAFETY: awaited here, in block_on: completed or dropped before the
                            // buffer goes.
                            unsafe {
                                t.write(
                                    Bytes(v * 4096),
                                    &[r * 16 + i as u8; 4096],
                                    WriteFlags::default(),
                                )
                            }
                            .await
                            .unwrap();
                        }
                        if i == 0 {
                            pool.create_snap(ThinId(100 + r as u32), ThinId(1))
                                .await
                                .unwrap();
                        }
                        t.flush().await.unwrap();
                    }
                })
                .unwrap();
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    run(async {
        for i in 0..4u32 {
            let t = pool.thin(ThinId(i), Bytes(4 * MIB), None).unwrap();
            for b in 0..256u64 {
                let v = (b * 13 + i as u64) % 1024;
                let mut x = vec![0u8; 4096];
                // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
                unsafe { t.read(Bytes(v * 4096), &mut x) }.await.unwrap();
                assert!(x.iter().all(|&y| y == 2 * 16 + i as u8));
            }
        }
        pool.commit().await.unwrap();
    });
    let r = run(tools::check(&(meta as DeviceRef))).unwrap();
    assert!(r.clean, "{:?}", r.errors);
    assert_eq!(r.devices, 7);
}

#[test]
fn dropping_the_last_handle_commits() {
    use std::sync::Arc;
    use tables::mem::{CrashDevice, CutMode};
    let meta = Arc::new(CrashDevice::new("meta", Bytes(4 * MIB)));
    let data = Arc::new(CrashDevice::new("data", Bytes(8 * MIB)));
    let pool = open(meta.clone(), data.clone(), opts(8));
    pool.create_thin(ThinId(1)).unwrap();
    let t = pool.thin(ThinId(1), Bytes(MIB), None).unwrap();
    write_blocking(&*t, Bytes(0), &[4u8; 4096], WriteFlags::default()).unwrap();
    drop((t, pool));
    meta.power_cut(CutMode::DropAll);
    data.power_cut(CutMode::DropAll);
    let pool = open(meta, data, opts(8));
    let t = pool.thin(ThinId(1), Bytes(MIB), None).unwrap();
    let mut b = vec![0u8; 4096];
    read_blocking(&*t, Bytes(0), &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 4));
}

#[test]
fn online_grow_of_data_and_metadata_devices() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use tables::io::IoFuture;
    use tables::mem::MemDevice;
    /// A device whose visible size can be raised (an extended file or LV).
    struct Growable(MemDevice, AtomicU64);
    impl BlockDevice for Growable {
        fn name(&self) -> String {
            self.0.name()
        }
        fn size(&self) -> Bytes {
            Bytes(self.1.load(Ordering::SeqCst))
        }
        unsafe fn read<'a>(&'a self, o: Bytes, b: &'a mut [u8]) -> IoFuture<'a> {
            self.0.read(o, b)
        }
        unsafe fn write<'a>(&'a self, o: Bytes, b: &'a [u8], f: WriteFlags) -> IoFuture<'a> {
            self.0.write(o, b, f)
        }
        fn flush(&self) -> IoFuture<'_> {
            self.0.flush()
        }
        fn discard(&self, o: Bytes, l: Bytes) -> IoFuture<'_> {
            self.0.discard(o, l)
        }
        fn write_zeroes(&self, o: Bytes, l: Bytes, f: WriteFlags) -> IoFuture<'_> {
            self.0.write_zeroes(o, l, f)
        }
    }
    let meta = Arc::new(Growable(
        MemDevice::new("meta", Bytes(4 * MIB)),
        AtomicU64::new(256 * KIB),
    ));
    let data = Arc::new(Growable(
        MemDevice::new("data", Bytes(4 * MIB)),
        AtomicU64::new(64 * KIB),
    ));
    let pool = open(meta.clone(), data.clone(), opts(8));
    pool.create_thin(ThinId(1)).unwrap();
    let t = pool.thin(ThinId(1), Bytes(4 * MIB), None).unwrap();
    run(async {
        for b in 0..16u64 {
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { t.write(Bytes(b * 4096), &[b as u8; 4096], WriteFlags::default()) }
                .await
                .unwrap();
        }
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        let e = unsafe { t.write(Bytes(16 * 4096), &[1; 4096], WriteFlags::default()) }
            .await
            .unwrap_err();
        assert_eq!(e.errno, libc::ENOSPC);
        data.1.store(256 * KIB, Ordering::SeqCst);
        meta.1.store(MIB, Ordering::SeqCst);
        let s = pool.grow_to_devices().unwrap();
        assert_eq!((s.data_total, s.meta_total), (64, 256));
        for b in 16..64u64 {
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { t.write(Bytes(b * 4096), &[b as u8; 4096], WriteFlags::default()) }
                .await
                .unwrap();
        }
        pool.commit().await.unwrap();
    });
    let r = run(tools::check(&(meta.clone() as DeviceRef))).unwrap();
    assert!(
        r.clean && r.data_total == 64 && r.meta_total == 256,
        "{r:?}"
    );
    assert_eq!(r.data_used, 64);
}

#[test]
fn in_place_writes_never_touch_blocks_the_durable_metadata_shares() {
    // Data writes always land (MemDevice), metadata loses everything unflushed. After the
    // origin breaks sharing of a block, the snapshot is the block's only user *now*, but
    // the durable metadata still maps it from the origin too: the snapshot's write must not
    // go in place, or the origin would read the snapshot's data after a power cut.
    use std::sync::Arc;
    use tables::mem::{CrashDevice, CutMode};
    for case in 0..2 {
        let meta = Arc::new(CrashDevice::new("meta", Bytes(4 * MIB)));
        let data = mem("data", 8 * MIB);
        let pool = open(meta.clone(), data.clone(), opts(8));
        pool.create_thin(ThinId(1)).unwrap();
        let o = pool.thin(ThinId(1), Bytes(MIB), None).unwrap();
        run(async {
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { o.write(Bytes(0), &[0xA; 4096], WriteFlags::default()) }
                .await
                .unwrap();
            pool.create_snap(ThinId(2), ThinId(1)).await.unwrap();
            pool.commit().await.unwrap();
            let s = pool.thin(ThinId(2), Bytes(MIB), None).unwrap();
            match case {
                // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
                0 => unsafe { o.write(Bytes(0), &[0xB; 4096], WriteFlags::default()) }
                    .await
                    .unwrap(),
                _ => o.discard(Bytes(0), Bytes(4096)).await.unwrap(),
            }
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { s.write(Bytes(0), &[0xC; 4096], WriteFlags::default()) }
                .await
                .unwrap();
        });
        // Power cut before any commit: the metadata goes back to the snapshot commit.
        meta.power_cut(CutMode::DropAll);
        std::mem::forget(o);
        std::mem::forget(pool);
        let pool = open(meta, data, opts(8));
        let o = pool.thin(ThinId(1), Bytes(MIB), None).unwrap();
        let mut b = vec![0u8; 4096];
        read_blocking(&*o, Bytes(0), &mut b).unwrap();
        assert!(
            b.iter().all(|&x| x == 0xA),
            "case {case}: origin reads the snapshot's write"
        );
    }
}

#[test]
fn in_place_write_after_uncommitted_delete_is_safe() {
    use std::sync::Arc;
    use tables::mem::{CrashDevice, CutMode};
    let meta = Arc::new(CrashDevice::new("meta", Bytes(4 * MIB)));
    let data = mem("data", 8 * MIB);
    let pool = open(meta.clone(), data.clone(), opts(8));
    pool.create_thin(ThinId(1)).unwrap();
    run(async {
        let o = pool.thin(ThinId(1), Bytes(MIB), None).unwrap();
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { o.write(Bytes(0), &[0xA; 4096], WriteFlags::default()) }
            .await
            .unwrap();
        pool.create_snap(ThinId(2), ThinId(1)).await.unwrap();
        pool.commit().await.unwrap();
        drop(o);
        pool.delete(ThinId(1)).unwrap(); // not committed
        let s = pool.thin(ThinId(2), Bytes(MIB), None).unwrap();
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { s.write(Bytes(0), &[0xC; 4096], WriteFlags::default()) }
            .await
            .unwrap();
        std::mem::forget(s);
    });
    meta.power_cut(CutMode::DropAll);
    std::mem::forget(pool);
    let pool = open(meta, data, opts(8));
    let o = pool.thin(ThinId(1), Bytes(MIB), None).unwrap();
    let mut b = vec![0u8; 4096];
    read_blocking(&*o, Bytes(0), &mut b).unwrap();
    assert!(
        b.iter().all(|&x| x == 0xA),
        "the deleted origin came back with the snapshot's write"
    );
}

#[test]
fn failed_commit_is_rolled_forward_by_the_next() {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::sync::Arc;
    use tables::io::IoFuture;
    use tables::mem::MemDevice;
    use tables::IoError;
    /// Metadata device whose writes fail while `broken` is set (after `after` more writes).
    struct Flaky(MemDevice, AtomicBool, AtomicU32);
    impl BlockDevice for Flaky {
        fn name(&self) -> String {
            self.0.name()
        }
        fn size(&self) -> Bytes {
            self.0.size()
        }
        unsafe fn read<'a>(&'a self, o: Bytes, b: &'a mut [u8]) -> IoFuture<'a> {
            self.0.read(o, b)
        }
        unsafe fn write<'a>(&'a self, o: Bytes, b: &'a [u8], f: WriteFlags) -> IoFuture<'a> {
            if self.1.load(Ordering::SeqCst) && self.2.fetch_sub(1, Ordering::SeqCst) == 0 {
                self.2.store(0, Ordering::SeqCst);
                return tables::io::ready(Err(IoError::eio("injected")));
            }
            self.0.write(o, b, f)
        }
        fn flush(&self) -> IoFuture<'_> {
            self.0.flush()
        }
        fn discard(&self, o: Bytes, l: Bytes) -> IoFuture<'_> {
            self.0.discard(o, l)
        }
        fn write_zeroes(&self, o: Bytes, l: Bytes, f: WriteFlags) -> IoFuture<'_> {
            self.0.write_zeroes(o, l, f)
        }
    }
    let meta = Arc::new(Flaky(
        MemDevice::new("meta", Bytes(4 * MIB)),
        AtomicBool::new(false),
        AtomicU32::new(0),
    ));
    let data = mem("data", 8 * MIB);
    let pool = open(meta.clone(), data.clone(), opts(8));
    pool.create_thin(ThinId(1)).unwrap();
    let t = pool.thin(ThinId(1), Bytes(4 * MIB), None).unwrap();
    run(async {
        for b in 0..600u64 {
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { t.write(Bytes(b * 4096), &[b as u8; 512], WriteFlags::default()) }
                .await
                .unwrap();
        }
        pool.commit().await.unwrap();
        for b in 0..600u64 {
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe {
                t.write(
                    Bytes(b * 4096),
                    &[b as u8 ^ 0xFF; 512],
                    WriteFlags::default(),
                )
            }
            .await
            .unwrap();
        }
        t.discard(Bytes(0), Bytes(100 * 4096)).await.unwrap();
        // The commit fails after a few node writes...
        meta.2.store(2, Ordering::SeqCst);
        meta.1.store(true, Ordering::SeqCst);
        assert!(pool.commit().await.is_err());
        meta.1.store(false, Ordering::SeqCst);
        // ...more changes, then a commit that works must carry the failed one's blocks.
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { t.write(Bytes(700 * 4096), &[7; 512], WriteFlags::default()) }
            .await
            .unwrap();
        pool.commit().await.unwrap();
    });
    let md: DeviceRef = meta.clone();
    let r = run(tools::check(&md)).unwrap();
    assert!(r.clean, "{:?}", r.errors);
    drop((t, pool));
    let pool = open(meta, data, opts(8));
    let t = pool.thin(ThinId(1), Bytes(4 * MIB), None).unwrap();
    run(async {
        let mut x = vec![0u8; 512];
        for b in 0..600u64 {
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { t.read(Bytes(b * 4096), &mut x) }.await.unwrap();
            let want = if b < 100 { 0 } else { b as u8 ^ 0xFF };
            assert!(x.iter().all(|&y| y == want), "block {b}");
        }
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { t.read(Bytes(700 * 4096), &mut x) }.await.unwrap();
        assert!(x.iter().all(|&y| y == 7));
    });
}

#[test]
fn feature_flags() {
    use std::sync::atomic::Ordering;
    // skip_block_zeroing: a partial write to a new block leaves the rest as it was.
    for skip in [false, true] {
        let meta = mem("meta", 4 * MIB);
        let data = mem("data", MIB);
        data.fill(0, &vec![0xFF; MIB as usize]);
        let mut o = opts(8);
        o.skip_block_zeroing = skip;
        let pool = open(meta, data.clone(), o);
        pool.create_thin(ThinId(1)).unwrap();
        let t = pool.thin(ThinId(1), Bytes(MIB), None).unwrap();
        write_blocking(&*t, Bytes(100), &[1; 10], WriteFlags::default()).unwrap();
        let mut b = vec![0u8; 4096];
        read_blocking(&*t, Bytes(0), &mut b).unwrap();
        assert_eq!(
            b[0],
            if skip { 0xFF } else { 0 },
            "skip_block_zeroing={skip}"
        );
        assert_eq!(b[100], 1);
    }
    // Discard passdown happens after the commit, unless disabled; ignore_discard ignores.
    for (no_passdown, ignore) in [(false, false), (true, false), (false, true)] {
        let meta = mem("meta", 4 * MIB);
        let data = mem("data", MIB);
        let mut o = opts(8);
        o.no_discard_passdown = no_passdown;
        o.ignore_discard = ignore;
        let pool = open(meta, data.clone(), o);
        pool.create_thin(ThinId(1)).unwrap();
        let t = pool.thin(ThinId(1), Bytes(MIB), None).unwrap();
        run(async {
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { t.write(Bytes(0), &[1; 8192], WriteFlags::default()) }
                .await
                .unwrap();
            pool.commit().await.unwrap();
            t.discard(Bytes(0), Bytes(8192)).await.unwrap();
            assert_eq!(
                data.counters.discards.load(Ordering::Relaxed),
                0,
                "passdown waits for the commit"
            );
            pool.commit().await.unwrap();
        });
        let passed = data.counters.discards.load(Ordering::Relaxed);
        assert_eq!(
            passed > 0,
            !no_passdown && !ignore,
            "no_passdown={no_passdown} ignore={ignore}"
        );
        assert_eq!(pool.stats().data_used, if ignore { 2 } else { 0 });
        assert_eq!(
            t.limits().discard_granularity,
            if ignore { 0 } else { 4096 }
        );
    }
    // read_only: reads work, nothing changes.
    let meta = mem("meta", 4 * MIB);
    let data = mem("data", MIB);
    let pool = open(meta.clone(), data.clone(), opts(8));
    pool.create_thin(ThinId(1)).unwrap();
    let t = pool.thin(ThinId(1), Bytes(MIB), None).unwrap();
    write_blocking(&*t, Bytes(0), &[3; 4096], WriteFlags::FUA).unwrap();
    drop((t, pool));
    let mut o = opts(8);
    o.read_only = true;
    let pool = open(meta, data, o);
    let t = pool.thin(ThinId(1), Bytes(MIB), None).unwrap();
    run(async {
        let mut b = vec![0u8; 4096];
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { t.read(Bytes(0), &mut b) }.await.unwrap();
        assert!(b.iter().all(|&x| x == 3));
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        let e = unsafe { t.write(Bytes(8192), &[1; 4096], WriteFlags::default()) }
            .await
            .unwrap_err();
        assert_eq!(e.errno, libc::EROFS);
        assert!(pool.create_thin(ThinId(2)).is_err());
        t.flush().await.unwrap();
    });
    assert!(
        pool.status_line().contains(" ro "),
        "{}",
        pool.status_line()
    );
}

#[test]
fn large_blocks_copy_in_chunks() {
    // 4 MiB blocks (bigger than the 1 MiB copy chunk): partial writes to fresh blocks,
    // copy-on-write of a shared block and origin fill all build the block piecewise.
    let meta = mem("meta", 4 * MIB);
    let data = mem("data", 64 * MIB);
    let img = mem("img", 6 * MIB);
    let pattern: Vec<u8> = (0..6 * MIB).map(|i| (i % 241) as u8 + 1).collect();
    img.fill(0, &pattern);
    let pool = open(meta, data, opts(8192));
    pool.create_thin(ThinId(1)).unwrap();
    pool.create_thin(ThinId(3)).unwrap();
    let t = pool.thin(ThinId(1), Bytes(16 * MIB), None).unwrap();
    let c = pool
        .thin(ThinId(3), Bytes(16 * MIB), Some(img.clone()))
        .unwrap();
    run(async {
        let at = 4 * MIB + MIB + 100; // inside block 1, second chunk
                                      // SAFETY: awaited here, in block_on: completed or dropped
                                      // before the buffer goes.
        unsafe { t.write(Bytes(at), &[7u8; 3000], WriteFlags::default()) }
            .await
            .unwrap();
        let mut b = vec![1u8; 4 * MIB as usize];
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { t.read(Bytes(4 * MIB), &mut b) }.await.unwrap();
        let rel = (MIB + 100) as usize;
        assert!(b[..rel].iter().all(|&x| x == 0));
        assert!(b[rel..rel + 3000].iter().all(|&x| x == 7));
        assert!(b[rel + 3000..].iter().all(|&x| x == 0));
        pool.create_snap(ThinId(2), ThinId(1)).await.unwrap();
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { t.write(Bytes(4 * MIB + 3 * MIB), &[9u8; 10], WriteFlags::default()) }
            .await
            .unwrap();
        let s = pool.thin(ThinId(2), Bytes(16 * MIB), None).unwrap();
        let mut sb = vec![0u8; 4 * MIB as usize];
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { s.read(Bytes(4 * MIB), &mut sb) }.await.unwrap();
        assert!(sb == b, "snapshot keeps the old block");
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { t.read(Bytes(4 * MIB), &mut b) }.await.unwrap();
        assert!(
            b[rel..rel + 3000].iter().all(|&x| x == 7),
            "copy kept the old data"
        );
        assert!(b[3 * MIB as usize..3 * MIB as usize + 10]
            .iter()
            .all(|&x| x == 9));
        // Clone of an origin: block 1 straddles the origin's end (6 MiB).
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { c.write(Bytes(4 * MIB + 5), &[0xEE; 5], WriteFlags::default()) }
            .await
            .unwrap();
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { c.read(Bytes(4 * MIB), &mut b) }.await.unwrap();
        let mut want = pattern[4 * MIB as usize..].to_vec();
        want.resize(4 * MIB as usize, 0);
        want[5..10].fill(0xEE);
        assert!(b == want);
    });
    assert_eq!(pool.stats().data_used, 3);
}

#[test]
fn thin_finds_its_pool_through_a_wrapper() {
    use std::sync::Arc;
    use tables::io::IoFuture;
    use tables::registry::{BuildCtx, Registry};
    /// What a one-segment table looks like to the resolver: another device that forwards.
    struct Wrapper(DeviceRef);
    impl BlockDevice for Wrapper {
        fn name(&self) -> String {
            "wrapped-pool".into()
        }
        fn size(&self) -> Bytes {
            self.0.size()
        }
        unsafe fn read<'a>(&'a self, o: Bytes, b: &'a mut [u8]) -> IoFuture<'a> {
            self.0.read(o, b)
        }
        unsafe fn write<'a>(&'a self, o: Bytes, b: &'a [u8], f: WriteFlags) -> IoFuture<'a> {
            self.0.write(o, b, f)
        }
        fn flush(&self) -> IoFuture<'_> {
            self.0.flush()
        }
        fn discard(&self, o: Bytes, l: Bytes) -> IoFuture<'_> {
            self.0.discard(o, l)
        }
        fn write_zeroes(&self, o: Bytes, l: Bytes, f: WriteFlags) -> IoFuture<'_> {
            self.0.write_zeroes(o, l, f)
        }
        fn message<'a>(&'a self, a: &'a [String]) -> IoFuture<'a, String> {
            self.0.message(a)
        }
    }
    let mut reg = Registry::empty();
    thin::register(&mut reg);
    let meta: DeviceRef = mem("/m", 4 * MIB);
    let data: DeviceRef = mem("/d", 4 * MIB);
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let r1 = |n: &str| match n {
        "/m" => Ok(meta.clone()),
        "/d" => Ok(data.clone()),
        _ => Err(format!("no {n}")),
    };
    let ctx = BuildCtx {
        line: 1,
        len: tables::Sectors(8192),
        resolver: &r1,
    };
    let pdev = reg
        .get("thin-pool")
        .unwrap()
        .build(&ctx, &s(&["/m", "/d", "128", "0"]))
        .unwrap();
    let wrapped: DeviceRef = Arc::new(Wrapper(pdev.clone()));
    run(wrapped.message(&s(&["create_thin", "4"]))).unwrap();
    let r2 = |n: &str| {
        if n == "pool" {
            Ok(wrapped.clone())
        } else {
            Err(format!("no {n}"))
        }
    };
    let ctx2 = BuildCtx {
        line: 2,
        len: tables::Sectors(1024),
        resolver: &r2,
    };
    let t = reg
        .get("thin")
        .unwrap()
        .build(&ctx2, &s(&["pool", "4"]))
        .unwrap();
    write_blocking(&*t, Bytes(0), &[1; 512], WriteFlags::default()).unwrap();
    assert_eq!(t.status(), "128 127");
    // A wrong block size for an existing pool is refused with a clear error.
    drop(t);
    drop((pdev, wrapped));
    let e = reg
        .get("thin-pool")
        .unwrap()
        .build(&ctx, &s(&["/m", "/d", "256", "0"]))
        .err()
        .unwrap();
    assert!(e.msg.contains("128 sectors"), "{e}");
}

#[test]
fn metadata_snapshot_reserve_dump_release() {
    let meta = mem("meta", 4 * MIB);
    let data = mem("data", 8 * MIB);
    let pool = open(meta.clone(), data.clone(), opts(8));
    let pdev = thin::target::PoolDevice::register(pool.clone(), Bytes(8 * MIB));
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    run(async {
        pdev.message(&s(&["create_thin", "1"])).await.unwrap();
        let t = pool.thin(ThinId(1), Bytes(MIB), None).unwrap();
        for b in 0..10u64 {
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { t.write(Bytes(b * 4096), &[1; 4096], WriteFlags::default()) }
                .await
                .unwrap();
        }
        pdev.message(&s(&["reserve_metadata_snap"])).await.unwrap();
        assert!(pdev.message(&s(&["reserve_metadata_snap"])).await.is_err());
        let held: u64 = pdev.status().split(' ').nth(3).unwrap().parse().unwrap();
        assert!(held > 0);
        // Changes after the reservation copy around it (even in-place candidates).
        for b in 0..5u64 {
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { t.write(Bytes(b * 4096), &[2; 4096], WriteFlags::default()) }
                .await
                .unwrap();
        }
        t.discard(Bytes(5 * 4096), Bytes(5 * 4096)).await.unwrap();
        pdev.message(&s(&["create_thin", "2"])).await.unwrap();
        t.flush().await.unwrap();
        assert_eq!(pool.stats().data_used, 15);
        let md: DeviceRef = meta.clone();
        let snap = tools::dump_metadata_snap(&md).await.unwrap().unwrap();
        assert_eq!(snap.devices.len(), 1);
        assert_eq!(
            snap.devices[0].mappings.iter().map(|r| r.len).sum::<u64>(),
            10
        );
        let live = tools::dump(&md).await.unwrap();
        assert_eq!(live.devices.len(), 2);
        assert_eq!(live.devices[0].mapped_blocks, 5);
        // The held blocks still hold the old data.
        let r0 = &snap.devices[0].mappings[0];
        let mut b = vec![0u8; 4096];
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { data.read(Bytes(r0.dblock.0 * 4096), &mut b) }
            .await
            .unwrap();
        assert!(b.iter().all(|&x| x == 1));
        let r = tools::check(&md).await.unwrap();
        assert!(r.clean, "{:?}", r.errors);
        pdev.message(&s(&["release_metadata_snap"])).await.unwrap();
        assert!(pdev.message(&s(&["release_metadata_snap"])).await.is_err());
        assert!(pdev.status().contains(" - "), "{}", pdev.status());
        assert_eq!(pool.stats().data_used, 5);
        assert!(tools::dump_metadata_snap(&md).await.unwrap().is_none());
        let r = tools::check(&md).await.unwrap();
        assert!(r.clean, "{:?}", r.errors);
    });
}
