//! Failover, failback, queueing while no path is usable, target errors, messages and status.

mod common;
use common::*;

use std::cell::Cell;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::future::join;
use tables::io::{read_blocking, write_blocking, BlockDevice, WriteFlags};
use tables::Bytes;

const SIZE: u64 = 1 << 20;

#[test]
fn a_failed_path_is_failed_and_the_request_retried_on_the_other() {
    let r = rig(2, SIZE, "0 0 1 1 round-robin 0 2 0 p0 p1", false);
    r.paths[0].kill();
    for i in 0..4u64 {
        write_blocking(
            &*r.dev,
            Bytes(i * 4096),
            &[i as u8 + 1; 4096],
            WriteFlags::default(),
        )
        .expect("a write with one path left");
    }
    assert_eq!(path_status(&r.dev, "p0"), "F 1");
    assert_eq!(path_status(&r.dev, "p1"), "A 0");
    assert_eq!(r.paths[0].served.load(Ordering::Relaxed), 0);
    let mut b = vec![0u8; 4096];
    for i in 0..4u64 {
        read_blocking(&*r.dev, Bytes(i * 4096), &mut b).unwrap();
        assert!(b.iter().all(|&x| x == i as u8 + 1));
    }
    // Every path dead and no queueing: EIO naming the device, the request and the offset.
    r.paths[1].kill();
    let e = write_blocking(&*r.dev, Bytes(8192), &[9; 512], WriteFlags::default()).unwrap_err();
    assert_eq!(e.errno, libc::EIO, "{e}");
    assert!(
        e.msg
            .contains("multipath@line1: no usable path for the write at byte 8192 (length 512)"),
        "{e}"
    );
    assert!(e.msg.contains("injected path failure"), "{e}");
    assert_eq!(path_status(&r.dev, "p1"), "F 1");
    // The failed write did not land.
    assert_eq!(r.mem.snapshot(8192, 512), vec![3u8; 512]);
}

#[test]
fn path_errors_fail_over_target_errors_do_not() {
    for errno in [
        libc::ETIMEDOUT,
        libc::ENOTCONN,
        libc::ECONNRESET,
        libc::ENOLINK,
    ] {
        let r = rig(2, SIZE, "0 0 1 1 round-robin 0 2 0 p0 p1", false);
        r.paths[0].errno.store(errno, Ordering::Relaxed);
        r.paths[0].kill();
        write_blocking(&*r.dev, Bytes(0), &[1; 512], WriteFlags::default())
            .unwrap_or_else(|e| panic!("errno {errno} was not failed over: {e}"));
        assert_eq!(path_status(&r.dev, "p0"), "F 1");
    }
    for errno in [libc::EINVAL, libc::ENOSPC, libc::EROFS, libc::EOPNOTSUPP] {
        let r = rig(2, SIZE, "0 0 1 1 round-robin 0 2 0 p0 p1", false);
        r.paths[0].errno.store(errno, Ordering::Relaxed);
        r.paths[0].kill();
        let e = write_blocking(&*r.dev, Bytes(0), &[1; 512], WriteFlags::default())
            .expect_err("a target error was retried");
        assert_eq!(e.errno, errno, "{e}");
        assert!(e.msg.contains("write at byte 0 through path p0"), "{e}");
        assert_eq!(path_status(&r.dev, "p0"), "A 0");
        assert_eq!(r.paths[1].served.load(Ordering::Relaxed), 0);
    }
    // Out of range: refused before any path sees it.
    let r = rig(2, SIZE, "0 0 1 1 round-robin 0 2 0 p0 p1", false);
    let e = write_blocking(
        &*r.dev,
        Bytes(SIZE - 512),
        &[1; 1024],
        WriteFlags::default(),
    )
    .unwrap_err();
    assert_eq!(e.errno, libc::ENOSPC, "{e}");
    assert_eq!(r.dev.path_requests(), vec![0, 0]);
}

#[test]
fn flush_discard_and_write_zeroes_fail_over_too() {
    let r = rig(2, SIZE, "0 0 1 1 round-robin 0 2 0 p0 p1", false);
    r.mem.fill(0, &[7; 8192]);
    r.paths[0].kill();
    iort::block_on(r.dev.flush()).unwrap().unwrap();
    assert_eq!(path_status(&r.dev, "p0"), "F 1");
    message(&r.dev, "reinstate_path p0").unwrap();
    iort::block_on(
        r.dev
            .write_zeroes(Bytes(0), Bytes(4096), WriteFlags::default()),
    )
    .unwrap()
    .unwrap();
    message(&r.dev, "reinstate_path p0").unwrap();
    iort::block_on(r.dev.discard(Bytes(4096), Bytes(4096)))
        .unwrap()
        .unwrap();
    assert_eq!(r.mem.snapshot(0, 8192), vec![0u8; 8192]);
    assert_eq!(path_status(&r.dev, "p0"), "F 3");
}

/// Runs `fut` (a request that must wait) together with `then`, which runs once the request
/// is parked: checks that it is still pending, then does what releases it.
fn while_waiting<T>(
    dev: &multipath::MultipathDevice,
    fut: impl std::future::Future<Output = T>,
    then: impl FnOnce(),
) -> T {
    let done = Cell::new(false);
    let (v, ()) = iort::block_on(join(
        async {
            let v = fut.await;
            done.set(true);
            v
        },
        async {
            for _ in 0..20 {
                iort::yield_now().await;
            }
            assert!(!done.get(), "the request did not wait for a path");
            assert_eq!(dev.waiting(), 1);
            assert!(dev.status().starts_with("2 1 0 0 "), "{}", dev.status());
            then();
        },
    ))
    .unwrap();
    v
}

#[test]
fn queue_if_no_path_holds_io_until_a_path_is_reinstated() {
    let r = rig(
        2,
        SIZE,
        "1 queue_if_no_path 0 1 1 round-robin 0 2 0 p0 p1",
        false,
    );
    r.mem.fill(4096, &[5; 4096]);
    for p in &r.paths {
        p.kill();
    }
    let mut b = vec![0u8; 4096];
    // SAFETY: the future is driven to completion inside `while_waiting`.
    let read = unsafe { r.dev.read(Bytes(4096), &mut b) };
    let res = while_waiting(&r.dev, read, || {
        r.paths[1].heal();
        iort::block_on(r.dev.check_paths()).unwrap();
    });
    res.expect("the queued read");
    assert!(b.iter().all(|&x| x == 5));
    assert_eq!(path_status(&r.dev, "p1"), "A 1");
    assert_eq!(path_status(&r.dev, "p0"), "F 1", "a dead path stays failed");
    assert_eq!(r.dev.waiting(), 0);

    // A queued write lands once a path is back (reinstated by message this time).
    r.paths[1].kill();
    let data = [6u8; 4096];
    // SAFETY: as above.
    let write = unsafe { r.dev.write(Bytes(0), &data, WriteFlags::default()) };
    let res = while_waiting(&r.dev, write, || {
        r.paths[0].heal();
        message(&r.dev, "reinstate_path p0").unwrap();
    });
    res.expect("the queued write");
    assert_eq!(r.mem.snapshot(0, 4096), data.to_vec());
    assert_eq!(r.dev.queued_total(), 2);
}

#[test]
fn fail_if_no_path_releases_queued_io_with_eio() {
    let r = rig(
        1,
        SIZE,
        "1 queue_if_no_path 0 1 1 round-robin 0 1 0 p0",
        false,
    );
    r.paths[0].kill();
    let data = [1u8; 512];
    // SAFETY: driven to completion inside `while_waiting`.
    let write = unsafe { r.dev.write(Bytes(512), &data, WriteFlags::default()) };
    let e = while_waiting(&r.dev, write, || {
        message(&r.dev, "fail_if_no_path").unwrap();
    })
    .expect_err("released with an error");
    assert_eq!(e.errno, libc::EIO);
    assert!(
        e.msg.contains("no usable path for the write at byte 512"),
        "{e}"
    );
    assert!(r.dev.status().starts_with("2 0 0 0 "), "{}", r.dev.status());
    assert_eq!(r.dev.waiting(), 0);
    // And new requests fail at once until queue_if_no_path is set again.
    let e = write_blocking(&*r.dev, Bytes(0), &data, WriteFlags::default()).unwrap_err();
    assert_eq!(e.errno, libc::EIO);
    message(&r.dev, "queue_if_no_path").unwrap();
    assert!(r.dev.status().starts_with("2 1 0 0 "), "{}", r.dev.status());
}

#[test]
fn no_path_retry_fails_queued_io_after_n_checker_intervals() {
    let r = rig(
        1,
        SIZE,
        "2 no_path_retry 2 0 1 1 round-robin 0 1 0 p0",
        false,
    );
    r.paths[0].kill();
    let mut b = [0u8; 512];
    // SAFETY: driven to completion inside `while_waiting`.
    let read = unsafe { r.dev.read(Bytes(0), &mut b) };
    let e = while_waiting(&r.dev, read, || {
        iort::block_on(r.dev.check_paths()).unwrap();
        assert_eq!(r.dev.waiting(), 1, "released after one interval of two");
        iort::block_on(r.dev.check_paths()).unwrap();
    })
    .expect_err("released with an error after two intervals");
    assert!(
        e.msg.contains("no usable path for the read at byte 0"),
        "{e}"
    );
    // A path that comes back resets the count: requests queue again.
    r.paths[0].heal();
    iort::block_on(r.dev.check_paths()).unwrap();
    assert!(r.dev.status().starts_with("2 1 0 0 "), "{}", r.dev.status());
}

#[test]
fn failover_to_group_two_and_failback_to_group_one() {
    let r = rig(
        3,
        SIZE,
        "0 0 2 1 round-robin 0 1 0 p0 round-robin 0 2 0 p1 p2",
        false,
    );
    let w = |off: u64| write_blocking(&*r.dev, Bytes(off), &[1; 512], WriteFlags::default());
    w(0).unwrap();
    assert_eq!(r.dev.path_requests(), vec![1, 0, 0]);
    assert_eq!(
        r.dev.status(),
        "2 0 0 0 2 1 A 0 1 0 p0 A 0 E 0 2 0 p1 A 0 p2 A 0"
    );
    r.paths[0].kill();
    for i in 0..4 {
        w(i * 512).unwrap();
    }
    assert_eq!(r.dev.path_requests(), vec![2, 2, 2]);
    assert_eq!(
        r.dev.status(),
        "2 0 0 0 2 2 E 0 1 0 p0 F 1 A 0 2 0 p1 A 0 p2 A 0"
    );
    // The path comes back; the checker reinstates it and new I/O goes back to group 1.
    r.paths[0].heal();
    iort::block_on(r.dev.check_paths()).unwrap();
    assert_eq!(
        r.dev.status(),
        "2 0 0 0 2 1 A 0 1 0 p0 A 1 E 0 2 0 p1 A 0 p2 A 0"
    );
    w(0).unwrap();
    assert_eq!(r.dev.path_requests(), vec![3, 2, 2]);
}

#[test]
fn the_checker_thread_reinstates_a_path_that_came_back() {
    let r = rig(
        2,
        SIZE,
        "2 checker_interval_ms 20 0 2 1 round-robin 0 1 0 p0 round-robin 0 1 0 p1",
        true,
    );
    r.paths[0].kill();
    write_blocking(&*r.dev, Bytes(0), &[1; 512], WriteFlags::default()).unwrap();
    assert_eq!(path_status(&r.dev, "p0"), "F 1");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        path_status(&r.dev, "p0"),
        "F 1",
        "a dead path was reinstated"
    );
    r.paths[0].heal();
    let t0 = Instant::now();
    while path_status(&r.dev, "p0") != "A 1" {
        assert!(t0.elapsed() < Duration::from_secs(5), "{}", r.dev.status());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(r.dev.status().contains(" 2 1 A "), "{}", r.dev.status());
}

#[test]
fn the_checker_thread_releases_queued_io() {
    // A request parked on a ublk or NBD thread is woken from the checker thread.
    let r = rig(
        1,
        SIZE,
        "3 queue_if_no_path checker_interval_ms 20 0 1 1 round-robin 0 1 0 p0",
        true,
    );
    r.mem.fill(0, &[8; 512]);
    r.paths[0].kill();
    let dev = r.dev.clone();
    let reader = std::thread::spawn(move || {
        let mut b = [0u8; 512];
        read_blocking(&*dev, Bytes(0), &mut b).map(|()| b)
    });
    let t0 = Instant::now();
    while r.dev.waiting() == 0 {
        assert!(t0.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(60));
    assert!(!reader.is_finished());
    r.paths[0].heal();
    let b = reader.join().unwrap().expect("the queued read");
    assert_eq!(b, [8u8; 512]);
}

#[test]
fn messages_switch_disable_and_enable_groups() {
    let r = rig(
        2,
        SIZE,
        "0 0 2 0 round-robin 0 1 0 p0 round-robin 0 1 0 p1",
        false,
    );
    let w = || write_blocking(&*r.dev, Bytes(0), &[1; 512], WriteFlags::default()).unwrap();
    message(&r.dev, "switch_group 2").unwrap();
    w();
    assert_eq!(r.dev.path_requests(), vec![0, 1]);
    assert!(
        r.dev.status().starts_with("2 0 0 0 2 2 E "),
        "{}",
        r.dev.status()
    );
    message(&r.dev, "disable_group 2").unwrap();
    w();
    assert_eq!(r.dev.path_requests(), vec![1, 1]);
    assert!(
        r.dev.status().starts_with("2 0 0 0 2 1 A 0 1 0 p0 A 0 D "),
        "{}",
        r.dev.status()
    );
    // A disabled group is still used when no enabled group has a path.
    message(&r.dev, "fail_path p0").unwrap();
    w();
    assert_eq!(r.dev.path_requests(), vec![1, 2]);
    message(&r.dev, "reinstate_path p0").unwrap();
    message(&r.dev, "enable_group 2").unwrap();
    message(&r.dev, "switch_group 2").unwrap();
    w();
    assert_eq!(r.dev.path_requests(), vec![1, 3]);
    // switch_group enables every group again.
    message(&r.dev, "disable_group 1").unwrap();
    message(&r.dev, "switch_group 1").unwrap();
    assert!(
        r.dev.status().starts_with("2 0 0 0 2 1 A 0 1 0 p0 A 1 E "),
        "{}",
        r.dev.status()
    );
}

#[test]
fn bad_messages_are_refused_clearly() {
    let r = rig(2, SIZE, "0 0 1 1 round-robin 0 2 0 p0 p1", false);
    for (m, why) in [
        ("fail_path p9", "fail_path: no path 'p9' (paths: p0, p1)"),
        ("reinstate_path", "unknown message 'reinstate_path'"),
        (
            "switch_group 0",
            "switch_group: '0' is not a path group (1..=1)",
        ),
        (
            "disable_group 2",
            "disable_group: '2' is not a path group (1..=1)",
        ),
        ("enable_group x", "enable_group: 'x' is not a path group"),
        ("frobnicate", "unknown message 'frobnicate' (fail_path DEV"),
    ] {
        let e = message(&r.dev, m).expect_err(m);
        assert_eq!(e.errno, libc::EINVAL, "{e}");
        assert!(e.msg.contains(why), "{m}: {e}");
        assert!(e.msg.starts_with("multipath@line1: "), "{e}");
    }
    assert_eq!(message(&r.dev, "fail_path p1").unwrap(), "");
    assert_eq!(path_status(&r.dev, "p1"), "F 1");
    // Failing a failed path again does not count twice.
    message(&r.dev, "fail_path p1").unwrap();
    assert_eq!(path_status(&r.dev, "p1"), "F 1");
}

#[test]
fn status_prints_selector_fields_as_dm() {
    let r = rig(
        3,
        SIZE,
        "0 0 3 0 round-robin 0 1 1 p0 2 queue-length 0 1 0 p1 service-time 0 1 2 p2 1 7",
        false,
    );
    assert_eq!(
        r.dev.status(),
        "2 0 0 0 3 1 A 0 1 0 p0 A 0 E 0 1 1 p1 A 0 0 E 0 1 2 p2 A 0 0 7"
    );
}

#[test]
fn a_checker_round_takes_as_long_as_its_probes() {
    // Not as long as the probe deadline (1 s here): an early answer ends the round.
    let r = rig(
        2,
        SIZE,
        "2 checker_interval_ms 100 0 1 1 round-robin 0 2 0 p0 p1",
        false,
    );
    // The probe answers after a yield, so the deadline is running meanwhile.
    r.paths[0].yield_first.store(true, Ordering::Relaxed);
    message(&r.dev, "fail_path p0").unwrap();
    let t0 = Instant::now();
    iort::block_on(r.dev.check_paths()).unwrap();
    assert!(
        t0.elapsed() < Duration::from_millis(500),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(path_status(&r.dev, "p0"), "A 1");
    // A probe that does not answer in time leaves the path failed.
    r.paths[0].hold.store(true, Ordering::Release);
    message(&r.dev, "fail_path p0").unwrap();
    let t0 = Instant::now();
    iort::block_on(r.dev.check_paths()).unwrap();
    let t = t0.elapsed();
    assert!(
        t >= Duration::from_secs(1) && t < Duration::from_secs(3),
        "{t:?}"
    );
    assert_eq!(path_status(&r.dev, "p0"), "F 2");
}
