//! Path selectors: round-robin honours repeat_count, queue-length prefers the idle path,
//! service-time weights by relative throughput.

mod common;
use common::*;

use std::sync::atomic::Ordering;

use futures::future::{join, join_all};
use tables::io::{write_blocking, BlockDevice, WriteFlags};
use tables::Bytes;

const SIZE: u64 = 1 << 20;

/// Which path (index) each of `n` sequential writes went to.
fn sequence(r: &Rig, n: usize) -> Vec<usize> {
    (0..n)
        .map(|_| {
            let before = r.dev.path_requests();
            write_blocking(&*r.dev, Bytes(0), &[1; 512], WriteFlags::default()).unwrap();
            let after = r.dev.path_requests();
            (0..before.len())
                .find(|&i| after[i] != before[i])
                .expect("some path took the write")
        })
        .collect()
}

#[test]
fn round_robin_spreads_evenly_and_honours_repeat_count() {
    let r = rig(3, SIZE, "0 0 1 1 round-robin 0 3 0 p0 p1 p2", false);
    assert_eq!(sequence(&r, 9), vec![0, 1, 2, 0, 1, 2, 0, 1, 2]);
    let r = rig(2, SIZE, "0 0 1 1 round-robin 0 2 1 p0 3 p1 2", false);
    assert_eq!(sequence(&r, 10), vec![0, 0, 0, 1, 1, 0, 0, 0, 1, 1]);
    // A failed path is skipped; the others keep their turns.
    let r = rig(3, SIZE, "0 0 1 1 round-robin 0 3 0 p0 p1 p2", false);
    message(&r.dev, "fail_path p1").unwrap();
    assert_eq!(sequence(&r, 4), vec![0, 2, 0, 2]);
}

#[test]
fn queue_length_prefers_the_idle_path() {
    let r = rig(2, SIZE, "0 0 1 1 queue-length 0 2 0 p0 p1", false);
    // p0 is slow: the first request stays in flight there while ten more are sent.
    r.paths[0].hold.store(true, Ordering::Release);
    let data = [1u8; 512];
    // SAFETY: driven to completion by `block_on` below.
    let slow = unsafe { r.dev.write(Bytes(0), &data, WriteFlags::default()) };
    let dev = &r.dev;
    let paths = &r.paths;
    let rest = async {
        for _ in 0..10 {
            // SAFETY: awaited at once; `data` outlives it.
            unsafe { dev.write(Bytes(512), &data, WriteFlags::default()) }
                .await
                .unwrap();
        }
        assert_eq!(path_status(dev, "p0"), "A 0 1", "{}", dev.status());
        paths[0].hold.store(false, Ordering::Release);
    };
    let (a, ()) = iort::block_on(join(slow, rest)).unwrap();
    a.unwrap();
    assert_eq!(r.paths[0].served.load(Ordering::Relaxed), 1);
    assert_eq!(r.paths[1].served.load(Ordering::Relaxed), 10);
    assert_eq!(path_status(&r.dev, "p0"), "A 0 0");

    // With both slow, concurrent requests spread evenly.
    for p in &r.paths {
        p.hold.store(true, Ordering::Release);
    }
    let futs: Vec<_> = (0..8)
        // SAFETY: driven to completion by `block_on` below.
        .map(|i| unsafe { r.dev.write(Bytes(i * 512), &data, WriteFlags::default()) })
        .collect();
    let check = async {
        iort::yield_now().await;
        assert_eq!(path_status(dev, "p0"), "A 0 4", "{}", dev.status());
        assert_eq!(path_status(dev, "p1"), "A 0 4", "{}", dev.status());
        for p in paths {
            p.hold.store(false, Ordering::Release);
        }
    };
    let (rs, ()) = iort::block_on(join(join_all(futs), check)).unwrap();
    assert!(rs.iter().all(Result::is_ok));
}

#[test]
fn service_time_weights_by_relative_throughput() {
    // p1 is three times as fast: with every request held in flight, it takes three of four
    // (dm's comparison of (in-flight bytes + request) / relative throughput).
    let r = rig(2, SIZE, "0 0 1 1 service-time 0 2 2 p0 1 1 p1 1 3", false);
    for p in &r.paths {
        p.hold.store(true, Ordering::Release);
    }
    let data = [1u8; 4096];
    let futs: Vec<_> = (0..8)
        // SAFETY: driven to completion by `block_on` below.
        .map(|i| unsafe { r.dev.write(Bytes(i * 4096), &data, WriteFlags::default()) })
        .collect();
    let (dev, paths) = (&r.dev, &r.paths);
    let check = async {
        iort::yield_now().await;
        // Status: in-flight bytes, relative throughput.
        assert_eq!(path_status(dev, "p0"), "A 0 8192 1", "{}", dev.status());
        assert_eq!(path_status(dev, "p1"), "A 0 24576 3", "{}", dev.status());
        assert!(dev.status().ends_with("p0 A 0 8192 1 p1 A 0 24576 3"));
        for p in paths {
            p.hold.store(false, Ordering::Release);
        }
    };
    let (rs, ()) = iort::block_on(join(join_all(futs), check)).unwrap();
    assert!(rs.iter().all(Result::is_ok));
    assert_eq!(r.dev.path_requests(), vec![2, 6]);

    // A path with relative throughput 0 is used only when it is the only one left.
    let r = rig(2, SIZE, "0 0 1 1 service-time 0 2 2 p0 1 0 p1 1 1", false);
    let seq: Vec<u64> = (0..4)
        .map(|_| {
            write_blocking(&*r.dev, Bytes(0), &data, WriteFlags::default()).unwrap();
            r.dev.path_requests()[0]
        })
        .collect();
    assert_eq!(seq, vec![0, 0, 0, 0]);
    message(&r.dev, "fail_path p1").unwrap();
    write_blocking(&*r.dev, Bytes(0), &data, WriteFlags::default()).unwrap();
    assert_eq!(r.dev.path_requests(), vec![1, 4]);
}
