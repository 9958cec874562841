//! Every built-in target against a flat in-memory reference model: random reads, writes,
//! discards, write-zeroes and flushes that cross segment and chunk boundaries.

mod common;

use std::sync::Arc;

use common::*;
use proptest::prelude::*;
use tables::io::{read_blocking, write_blocking};
use tables::mem::MemDevice;
use tables::Bytes;

const S: u64 = 512;

fn linear_case(off_sectors: u64, len_sectors: u64, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut d = Devices::default();
    let mem = d.mem("m", (off_sectors + len_sectors + 8) * S);
    // Pre-existing contents: the model starts from what is at the offset.
    let init = pattern(0x5A, 0, ((off_sectors + len_sectors + 8) * S) as usize);
    mem.fill(0, &init);
    let dev = d.build(&format!("0 {len_sectors} linear m {off_sectors}"));
    let mut m = Model::new((len_sectors * S) as usize, true);
    m.data.copy_from_slice(
        &init[(off_sectors * S) as usize..((off_sectors + len_sectors) * S) as usize],
    );
    run_ops(dev.as_ref(), &mut m, &ops)?;
    // Nothing outside the window was touched.
    prop_assert_eq!(
        mem.snapshot(0, (off_sectors * S) as usize),
        &init[..(off_sectors * S) as usize]
    );
    let tail = ((off_sectors + len_sectors) * S) as usize;
    prop_assert_eq!(mem.snapshot(tail as u64, 8 * S as usize), &init[tail..]);
    Ok(())
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn linear_matches_model(off in 0u64..64, ops in ops(256 * S, 40)) {
        linear_case(off, 256, ops)?;
    }

    #[test]
    fn striped_over_mem_matches_model(
        ((n, chunk, rows), ops) in (1usize..5, 3u32..6, 1u64..6)
            .prop_map(|(n, sh, rows)| (n, 1u64 << sh, rows))
            .prop_flat_map(|p| (Just(p), ops(p.0 as u64 * p.1 * p.2 * S, 40))),
        seed in any::<u64>(),
    ) {
        let len = n as u64 * chunk * rows;
        let mut d = Devices::default();
        let mut args = String::new();
        for i in 0..n {
            let name = format!("m{i}");
            d.mem(&name, (len / n as u64 + 16) * S);
            args.push_str(&format!(" {name} {}", (i as u64 * 3 + seed) % 16));
        }
        let dev = d.build(&format!("0 {len} striped {n} {chunk}{args}"));
        let mut m = Model::new((len * S) as usize, true);
        run_ops(dev.as_ref(), &mut m, &ops)?;
    }

    #[test]
    fn striped_over_linear_over_mem_matches_model(
        ops in ops(3 * 4 * 16 * S, 40), o0 in 0u64..32, o1 in 0u64..32, o2 in 0u64..32,
    ) {
        // 3 legs, chunk 16 sectors, 4 rows; each leg a linear table over its own MemDevice.
        let mut d = Devices::default();
        let per_leg = 4 * 16;
        for (i, o) in [o0, o1, o2].into_iter().enumerate() {
            d.mem(&format!("m{i}"), (per_leg + 64) * S);
            let lin = d.build(&format!("0 {} linear m{i} {o}", per_leg + 8));
            d.add(&format!("l{i}"), lin);
        }
        let dev = d.build(&format!("0 {} striped 3 16 l0 8 l1 0 l2 3", 3 * per_leg));
        let mut m = Model::new((3 * per_leg * S) as usize, true);
        run_ops(dev.as_ref(), &mut m, &ops)?;
    }

    #[test]
    fn multi_segment_table_matches_model(ops in ops(200 * S, 50)) {
        // linear | striped | zero | linear | error-free tail: segment boundaries everywhere.
        let mut d = Devices::default();
        d.mem("a", 200 * S);
        d.mem("b", 200 * S);
        d.mem("c", 200 * S);
        let text = "\
0 40 linear a 7
40 64 striped 2 16 b 0 c 0
104 24 zero
128 72 linear c 100
";
        let dev = d.build(text);
        let mut m = Model::new((200 * S) as usize, true);
        m.region((104 * S) as usize, (24 * S) as usize, ReadB::Ok, WriteB::Ignore);
        run_ops(dev.as_ref(), &mut m, &ops)?;
        prop_assert_eq!(dev.status().lines().count(), 4);
    }

    #[test]
    fn table_with_error_segment_matches_model(ops in ops(96 * S, 40)) {
        let mut d = Devices::default();
        d.mem("a", 200 * S);
        let dev = d.build("0 32 linear a 0\n32 16 error\n48 48 linear a 64\n");
        // dm-error advertises no discard_zeroes, so the stack does not either.
        prop_assert!(!dev.limits().discard_zeroes);
        let mut m = Model::new((96 * S) as usize, false);
        m.region((32 * S) as usize, (16 * S) as usize, ReadB::Fail, WriteB::Fail);
        run_ops(dev.as_ref(), &mut m, &ops)?;
    }

    #[test]
    fn zero_matches_model(ops in ops(64 * S, 30)) {
        let d = Devices::default();
        let dev = d.build("0 64 zero");
        let mut m = Model::new((64 * S) as usize, true);
        m.region(0, (64 * S) as usize, ReadB::Ok, WriteB::Ignore);
        run_ops(dev.as_ref(), &mut m, &ops)?;
    }

    #[test]
    fn error_matches_model(ops in ops(64 * S, 30)) {
        let d = Devices::default();
        let dev = d.build("0 64 error");
        let mut m = Model::new((64 * S) as usize, false);
        m.region(0, (64 * S) as usize, ReadB::Fail, WriteB::Fail);
        run_ops(dev.as_ref(), &mut m, &ops)?;
    }

    #[test]
    fn flakey_always_up_is_linear(ops in ops(128 * S, 40), off in 0u64..16) {
        let mut d = Devices::default();
        d.mem("a", 160 * S);
        // down = 0: never down, whatever the features.
        let dev = d.build(&format!("0 128 flakey a {off} 1 0 1 error_writes"));
        let mut m = Model::new((128 * S) as usize, true);
        run_ops(dev.as_ref(), &mut m, &ops)?;
    }

    #[test]
    fn flakey_always_down_modes(ops in ops(128 * S, 40), mode in 0usize..4) {
        let mut d = Devices::default();
        let mem = d.mem("a", 160 * S);
        let init = pattern(0x33, 0, (160 * S) as usize);
        mem.fill(0, &init);
        // up = 0: always down.
        let (features, r, w) = [
            ("", ReadB::Fail, WriteB::Fail),
            (" 1 drop_writes", ReadB::Ok, WriteB::Ignore),
            (" 1 error_writes", ReadB::Ok, WriteB::Fail),
            (" 1 error_reads", ReadB::Fail, WriteB::Apply),
        ][mode];
        let dev = d.build(&format!("0 128 flakey a 16 0 5{features}"));
        let mut m = Model::new((128 * S) as usize, true);
        m.data.copy_from_slice(&init[(16 * S) as usize..(144 * S) as usize]);
        m.region(0, (128 * S) as usize, r, w);
        run_ops(dev.as_ref(), &mut m, &ops)?;
        if w != WriteB::Apply {
            // Dropped or failed writes never reached the device.
            prop_assert_eq!(mem.snapshot(0, (160 * S) as usize), init);
        }
    }

    #[test]
    fn delay_matches_model(ops in ops(64 * S, 12)) {
        let mut d = Devices::default();
        d.mem("a", 128 * S);
        // Three classes (read, write, flush) with their own delays, all on one device at one
        // offset, so reads see earlier writes.
        let dev = d.build("0 64 delay a 8 1 a 8 2 a 8 1");
        let mut m = Model::new((64 * S) as usize, true);
        run_ops(dev.as_ref(), &mut m, &ops)?;
    }
}

#[test]
fn delay_sends_writes_to_the_write_device_after_the_delay() {
    let mut d = Devices::default();
    let a = d.mem("a", 128 * S);
    let b = d.mem("b", 128 * S);
    a.fill(8 * S, &[1u8; 512]);
    let dev = d.build("0 64 delay a 8 0 b 16 200");
    iort::block_on(async {
        let t = std::time::Instant::now();
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { dev.write(Bytes(0), &[9u8; 512], Default::default()) }
            .await
            .unwrap();
        assert!(
            t.elapsed() >= std::time::Duration::from_millis(200),
            "{:?}",
            t.elapsed()
        );
        let t = std::time::Instant::now();
        let mut buf = [0u8; 512];
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { dev.read(Bytes(0), &mut buf) }.await.unwrap();
        assert!(
            t.elapsed() < std::time::Duration::from_millis(150),
            "reads are not delayed"
        );
        assert_eq!(buf, [1u8; 512], "reads come from a at offset 8");
    })
    .unwrap();
    assert_eq!(b.snapshot(16 * S, 512), vec![9u8; 512]);
    assert_eq!(a.snapshot(8 * S, 512), vec![1u8; 512]);
    assert_eq!(dev.status(), "0 64 delay 0 0 0");
}

#[test]
fn striped_pieces_run_concurrently() {
    // Four legs, each behind a 100 ms delay: a read spanning one chunk on each leg must take
    // about one delay, not four.
    let mut d = Devices::default();
    for i in 0..4 {
        d.mem(&format!("m{i}"), 64 * S);
        let leg = d.build(&format!("0 32 delay m{i} 0 100"));
        d.add(&format!("d{i}"), leg);
    }
    let dev = d.build("0 128 striped 4 8 d0 0 d1 0 d2 0 d3 0");
    iort::block_on(async {
        let mut buf = vec![0u8; 32 * S as usize];
        let t = std::time::Instant::now();
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { dev.read(Bytes(0), &mut buf) }.await.unwrap();
        let el = t.elapsed();
        assert!(el >= std::time::Duration::from_millis(100), "{el:?}");
        assert!(
            el < std::time::Duration::from_millis(300),
            "pieces ran serially: {el:?}"
        );
    })
    .unwrap();
}

#[test]
fn flakey_corrupt_bio_byte_on_reads_and_writes() {
    let mut d = Devices::default();
    let a = d.mem("a", 64 * S);
    a.fill(0, &[7u8; 4096]);
    let r = d.build("0 32 flakey a 0 0 1 5 corrupt_bio_byte 3 r 200 0");
    iort::block_on(async {
        let mut buf = [0u8; 1024];
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { r.read(Bytes(512), &mut buf) }.await.unwrap();
        let mut want = [7u8; 1024];
        want[2] = 200;
        assert_eq!(buf, want);
        // Requests shorter than N bytes are untouched.
        let mut small = [0u8; 2];
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { r.read(Bytes(0), &mut small) }.await.unwrap();
        assert_eq!(small, [7, 7]);
    })
    .unwrap();
    assert_eq!(
        a.snapshot(512, 1024),
        vec![7u8; 1024],
        "read corruption is not written back"
    );

    let w = d.build("0 32 flakey a 0 0 1 5 corrupt_bio_byte 1 w 0 0");
    let data = [5u8; 512];
    write_blocking(&*w, Bytes(2048), &data, Default::default()).unwrap();
    assert_eq!(data, [5u8; 512], "the caller's buffer is not modified");
    let got = a.snapshot(2048, 512);
    assert_eq!(got[0], 0);
    assert!(got[1..].iter().all(|&b| b == 5));
}

#[test]
fn flakey_random_corrupt_with_certainty_changes_at_most_one_byte() {
    let mut d = Devices::default();
    let a = d.mem("a", 64 * S);
    a.fill(0, &[0xAAu8; 8192]);
    let dev = d.build("0 16 flakey a 0 0 1 2 random_read_corrupt 1000000000");
    let mut changed = 0;
    iort::block_on(async {
        for _ in 0..50 {
            let mut buf = vec![0u8; 4096];
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { dev.read(Bytes(0), &mut buf) }.await.unwrap();
            let diff = buf.iter().filter(|&&b| b != 0xAA).count();
            assert!(diff <= 1);
            changed += diff;
        }
    })
    .unwrap();
    // A random value equals 0xAA 1 time in 256: 50 reads cannot all miss.
    assert!(changed > 40, "{changed}");
    // Probability 0 never corrupts, and normalizes away (the kernel prints nothing for it).
    let dev = d.build("0 16 flakey a 0 1 0 2 random_write_corrupt 0");
    write_blocking(&*dev, Bytes(0), &[1u8; 4096], Default::default()).unwrap();
    assert_eq!(a.snapshot(0, 4096), vec![1u8; 4096]);
}

#[test]
fn flakey_flush_passes_through_while_down() {
    let mut d = Devices::default();
    let a = d.mem("a", 64 * S);
    let dev = d.build("0 16 flakey a 0 0 1");
    iort::block_on(dev.flush()).unwrap().unwrap();
    assert_eq!(
        a.counters
            .flushes
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[test]
fn mapped_errors_name_line_and_offset() {
    let mut d = Devices::default();
    d.mem("a", 64 * S);
    let dev = d.build("# comment\n0 16 linear a 0\n16 16 error\n");
    let e = iort::block_on(async {
        let mut b = vec![0u8; 4096];
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { dev.read(Bytes(16 * S), &mut b) }.await
    })
    .unwrap()
    .unwrap_err();
    assert_eq!(e.errno, libc::EIO);
    assert!(e.msg.contains("line 3"), "{e}");
    assert!(e.msg.contains("8192"), "{e}");
    // Past the end: ENOSPC naming the device.
    let e = write_blocking(&*dev, Bytes(31 * S), &[0u8; 1024], Default::default()).unwrap_err();
    assert_eq!(e.errno, libc::ENOSPC);
}

#[test]
fn mapped_flush_reaches_every_segment_and_message_goes_to_sector_0() {
    let mut d = Devices::default();
    let a = d.mem("a", 64 * S);
    let b = d.mem("b", 64 * S);
    let dev = d.build("0 16 linear a 0\n16 16 linear b 0\n");
    iort::block_on(dev.flush()).unwrap().unwrap();
    for m in [&a, &b] {
        assert_eq!(
            m.counters
                .flushes
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }
    let e = iort::block_on(dev.message(&["hello".to_string()]))
        .unwrap()
        .unwrap_err();
    assert_eq!(e.errno, libc::EOPNOTSUPP);
    assert!(e.msg.contains("a"), "{e}");
    assert_eq!(dev.status(), "0 16 linear\n16 16 linear");
}

#[test]
fn striped_limits_and_status() {
    let mut d = Devices::default();
    d.mem("x", 64 * S);
    let m2 = Arc::new(
        MemDevice::new("y", Bytes(64 * S)).with_limits(tables::Limits {
            max_io: 65536,
            discard_zeroes: true,
            ..Default::default()
        }),
    );
    d.add("y", m2);
    let dev = d.build("0 64 striped 2 16 x 0 y 0");
    let l = dev.limits();
    assert_eq!(l.io_opt, 2 * 16 * 512);
    assert_eq!(l.max_io, 65536);
    assert_eq!(dev.status(), "0 64 striped 2 x y 1 AA");
}

#[test]
fn striped_concurrent_disjoint_requests() {
    // Several requests in flight at once on one thread, each spanning chunks.
    let mut d = Devices::default();
    for i in 0..3 {
        d.mem(&format!("m{i}"), 256 * S);
    }
    let dev = d.build("0 384 striped 3 8 m0 0 m1 0 m2 0");
    iort::block_on(async {
        let bufs: Vec<Vec<u8>> = (0..8)
            .map(|i| pattern(i as u8, i * 48 * S, 48 * S as usize))
            .collect();
        // SAFETY: the writes are joined (every one driven to its end) before `bufs` goes.
        let futs = bufs
            .iter()
            .enumerate()
            .map(|(i, b)| unsafe { dev.write(Bytes(i as u64 * 48 * S), b, Default::default()) });
        iort::try_join_all(futs.collect()).await.unwrap();
        let mut all = vec![0u8; 384 * S as usize];
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { dev.read(Bytes(0), &mut all) }.await.unwrap();
        assert_eq!(all, bufs.concat());
    })
    .unwrap();
}

proptest! {
    #![proptest_config(config(64))]

    /// Any offset and length, on every target: an error or success, never a panic, and
    /// out-of-range requests fail with ENOSPC.
    #[test]
    fn no_target_panics_on_any_range(
        off in prop_oneof![any::<u64>(), 0u64..70_000, (u64::MAX - 70_000)..=u64::MAX],
        len in prop_oneof![any::<u64>(), 0u64..70_000],
        buf_len in 0usize..5000,
        which in 0usize..7,
    ) {
        let mut d = Devices::default();
        d.mem("a", 256 * S);
        d.mem("b", 256 * S);
        let text = [
            "0 64 linear a 3",
            "0 64 striped 2 8 a 0 b 1",
            "0 64 zero",
            "0 64 error",
            "0 64 flakey a 0 0 1 5 corrupt_bio_byte 4000 r 1 0",
            "0 64 delay a 0 0 b 0 0",
            "0 16 linear a 0\n16 32 striped 2 8 a 16 b 0\n48 8 error\n56 8 zero",
        ][which];
        let dev = d.build(text);
        let size = dev.size().0;
        iort::block_on(async {
            let mut buf = vec![0u8; buf_len];
            for r in [
                // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
                unsafe { dev.read(Bytes(off), &mut buf) }.await,
                // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
                unsafe { dev.write(Bytes(off), &buf, Default::default()) }.await,
                dev.discard(Bytes(off), Bytes(len)).await,
                dev.write_zeroes(Bytes(off), Bytes(len), Default::default()).await,
            ] {
                if off > size {
                    prop_assert_eq!(r.map_err(|e| e.errno), Err(libc::ENOSPC));
                }
            }
            Ok(())
        })
        .unwrap()?;
    }
}

#[test]
fn constructors_with_huge_offsets_fail_cleanly() {
    use tables::targets::Linear;
    use tables::BlockDevice;
    use tables::Sectors;
    let a: tables::DeviceRef = Arc::new(MemDevice::new("a", Bytes(64 * S)));
    let l = Linear::new("l", a, Sectors(u64::MAX / 2), Sectors(64));
    let r = iort::block_on(async {
        let mut b = [0u8; 512];
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { l.read(Bytes(0), &mut b) }.await
    })
    .unwrap();
    assert!(r.is_err());
}

#[test]
fn flakey_alternates_up_and_down() {
    // up 1 s, down 1 s: writes work now, fail after the first second, work again after two.
    let mut d = Devices::default();
    d.mem("a", 64 * S);
    let dev = d.build("0 16 flakey a 0 1 1 1 error_writes");
    let f = tables::targets::FlakeyConfig::parse(
        tables::Sectors(16),
        &[
            "a".into(),
            "0".into(),
            "1".into(),
            "1".into(),
            "1".into(),
            "error_writes".into(),
        ],
    )
    .unwrap();
    assert!(f.error_writes && !f.error_reads);
    let t0 = std::time::Instant::now();
    let w =
        |dev: &tables::DeviceRef| write_blocking(&**dev, Bytes(0), &[1u8; 512], Default::default());
    assert!(w(&dev).is_ok());
    std::thread::sleep(std::time::Duration::from_millis(1100).saturating_sub(t0.elapsed()));
    let e = w(&dev).unwrap_err();
    assert_eq!(e.errno, libc::EIO);
    assert!(e.msg.contains("down"), "{e}");
    // Reads still work (error_writes only).
    let mut b = [0u8; 512];
    read_blocking(&*dev, Bytes(0), &mut b).unwrap();
    assert_eq!(b, [1u8; 512]);
}
