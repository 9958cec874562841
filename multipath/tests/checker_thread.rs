//! The checker thread holds only a `Weak` to its device and ends when the device goes (its
//! own test binary: it counts the process's threads by name).

mod common;
use common::*;

use std::time::{Duration, Instant};

fn checker_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|c| c.trim() == "mpath-checker")
                })
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn the_checker_thread_ends_with_its_device() {
    // A long interval: dropping the device must not wait for it.
    let r = rig(2, 1 << 20, "0 0 1 1 round-robin 0 2 0 p0 p1", true);
    let t0 = Instant::now();
    while checker_threads() != 1 {
        assert!(t0.elapsed() < Duration::from_secs(5), "no checker thread");
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(r);
    let t0 = Instant::now();
    while checker_threads() != 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "the checker thread outlived its device"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}
