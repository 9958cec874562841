//! A thousand clients that ask for big reads and never read the replies: the server's
//! memory stays within its budget and a well-behaved client keeps being served.
//!
//! Alone in its own test binary because it measures the process's resident memory (the
//! server runs in-process). It needs about 2,100 file descriptors (both ends of 1,001
//! connections), so it raises RLIMIT_NOFILE's soft limit as far as the hard one allows.

mod common;

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nbd::proto::*;
use nbd::Limits;
use tables::mem::MemDevice;
use tables::units::Bytes;

const MIB: u64 = 1 << 20;
const HOSTILE: usize = 1000;
/// Reads each hostile connection sends (32 MiB each), all at once.
const READS_EACH: u64 = 8;
const BUDGET: u64 = 128 * MIB;
/// Allowed above the budget: the workers' idle buffer pools (a quarter of the budget), a
/// 16 KiB receive buffer and the task state of each of the 1,001 connections (~20 MiB), and
/// the allocator's slack.
const SLACK: u64 = BUDGET / 4 + 64 * MIB;
/// How long any one request of the good client may take while the attack goes on.
const BOUND: Duration = Duration::from_secs(2);

fn rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib * 1024
}

/// Raises the soft descriptor limit to at least `want` (up to the hard limit).
fn raise_nofile(want: u64) {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write a valid rlimit.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl), 0);
        if rl.rlim_cur < want {
            rl.rlim_cur = want.min(rl.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &rl), 0);
        }
    }
    assert!(
        rl.rlim_cur >= want,
        "RLIMIT_NOFILE hard limit {} is below the {want} descriptors this test needs",
        rl.rlim_max
    );
}

#[test]
fn clients_that_never_read_replies_stay_within_the_memory_budget() {
    raise_nofile(4096);
    let size = 16 << 30; // sparse: unwritten data reads as zeroes and costs nothing
    let dev = Arc::new(MemDevice::new("big", Bytes(size)));
    let limits = Limits {
        max_connections: 2 * HOSTILE,
        memory_budget_bytes: BUDGET,
        pressure_stall_timeout_ms: 300,
        ..Limits::default()
    };
    let h = serve_with(as_dev(&dev), limits);
    let addr = h.local_addr().unwrap();

    // An established client.
    let mut good = Client::go(tcp(addr), "disk");
    let data = pattern(1, 256 << 10);
    good.write(0, &data).unwrap();
    assert!(good.read(0, 256 << 10).unwrap() == data);

    let base = rss();
    let peak = Arc::new(AtomicU64::new(base));
    let over = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, over, stop) = (peak.clone(), over.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let r = rss();
                peak.fetch_max(r, Ordering::Relaxed);
                if r > base + 4 * BUDGET + SLACK {
                    // Far over: stop before the machine runs out of memory.
                    over.store(true, Ordering::SeqCst);
                    eprintln!("RSS grew by {} MiB: aborting", (r - base) >> 20);
                    std::process::abort();
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };

    let t0 = Instant::now();
    let mut hostile = Vec::with_capacity(HOSTILE);
    for i in 0..HOSTILE as u64 {
        let mut c = Client::go(tcp(addr), "disk");
        let mut reqs = Vec::new();
        for j in 0..READS_EACH {
            let off = ((i * READS_EACH + j) * 32 * MIB) % size;
            let r = Request {
                flags: 0,
                kind: CMD_READ,
                cookie: j,
                offset: off,
                len: 32 << 20,
            };
            reqs.extend_from_slice(&r.encode());
        }
        c.s.write_all(&reqs).unwrap();
        hostile.push(c);
    }
    eprintln!(
        "{HOSTILE} hostile clients connected in {:?}, {} connections open",
        t0.elapsed(),
        h.connections()
    );

    // The good client keeps being served, each request within the bound.
    let mut worst = Duration::ZERO;
    let t1 = Instant::now();
    let mut round = 0u64;
    while t1.elapsed() < Duration::from_secs(3) {
        let off = (round % 16) * MIB;
        let data = pattern(round, 256 << 10);
        let t = Instant::now();
        good.write(off, &data).unwrap();
        worst = worst.max(t.elapsed());
        let t = Instant::now();
        let back = good.read(off, 1 << 20).unwrap();
        worst = worst.max(t.elapsed());
        assert!(back[..data.len()] == data[..], "round {round}");
        round += 1;
    }
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let grew = peak.load(Ordering::Relaxed).saturating_sub(base);
    eprintln!(
        "{round} good rounds, worst request {worst:?}; RSS grew by at most {} MiB \
         (budget {} MiB + slack {} MiB); {} connections still open",
        grew >> 20,
        BUDGET >> 20,
        SLACK >> 20,
        h.connections()
    );
    assert!(!over.load(Ordering::SeqCst));
    assert!(
        grew <= BUDGET + SLACK,
        "RSS grew by {} MiB, over the budget plus slack",
        grew >> 20
    );
    assert!(worst <= BOUND, "a good request took {worst:?}");
    assert!(round >= 5, "only {round} good rounds in 3 s");
    // Memory pressure closed hostile connections whose replies made no progress (the
    // plain stall timeout, 60 s, cannot have fired yet).
    assert!(
        h.connections() < HOSTILE + 1,
        "no stalled connection was dropped"
    );

    let t2 = Instant::now();
    h.shutdown().unwrap();
    let took = t2.elapsed();
    assert!(took < Duration::from_secs(4), "shutdown took {took:?}");
    drop(hostile);
}
