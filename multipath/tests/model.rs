//! Property test against a reference model: a multipath over three paths that are the same
//! in-memory device behind per-path fault wrappers. Batches of concurrent reads, writes,
//! flushes and write-zeroes run while paths die, come back, are failed and reinstated by
//! message, probed by the checker, and groups are switched and disabled, all interleaved
//! with the requests. Every completed read returns the model's bytes, every acknowledged
//! write is in the model, every request completes exactly once, and the only error is "no
//! usable path", only without queueing, and never while some path stayed healthy.

mod common;
use common::*;

use std::cell::Cell;

use futures::future::{join, join_all};
use proptest::prelude::*;
use tables::io::{BlockDevice, IoResult, WriteFlags};
use tables::Bytes;

const SLOT: u64 = 4096;
const SLOTS: u64 = 16;
const SIZE: u64 = SLOT * SLOTS;
const NPATHS: usize = 3;

#[derive(Clone, Debug)]
enum Io {
    Read { slot: u64, n: u64 },
    Write { slot: u64, n: u64, seed: u8 },
    Zero { slot: u64, n: u64 },
    Flush,
}

#[derive(Clone, Debug)]
enum Event {
    Kill(usize),
    Heal(usize),
    FailMsg(usize),
    ReinstateMsg(usize),
    Check,
    Switch(usize),
    Disable(usize),
    Enable(usize),
}

#[derive(Clone, Debug)]
struct Batch {
    ios: Vec<Io>,
    /// Each event after that many yields.
    events: Vec<(u8, Event)>,
}

fn io() -> impl Strategy<Value = Io> {
    prop_oneof![
        4 => (0..SLOTS, 1..3u64).prop_map(|(slot, n)| Io::Read { slot, n }),
        4 => (0..SLOTS, 1..3u64, any::<u8>()).prop_map(|(slot, n, seed)| Io::Write { slot, n, seed }),
        1 => (0..SLOTS, 1..3u64).prop_map(|(slot, n)| Io::Zero { slot, n }),
        1 => Just(Io::Flush),
    ]
}

fn event(groups: usize) -> impl Strategy<Value = Event> {
    prop_oneof![
        3 => (0..NPATHS).prop_map(Event::Kill),
        3 => (0..NPATHS).prop_map(Event::Heal),
        1 => (0..NPATHS).prop_map(Event::FailMsg),
        2 => (0..NPATHS).prop_map(Event::ReinstateMsg),
        2 => Just(Event::Check),
        1 => (0..groups).prop_map(Event::Switch),
        1 => (0..groups).prop_map(Event::Disable),
        1 => (0..groups).prop_map(Event::Enable),
    ]
}

fn batch(groups: usize) -> impl Strategy<Value = Batch> {
    (
        prop::collection::vec(io(), 1..7),
        prop::collection::vec((0..6u8, event(groups)), 0..4),
    )
        .prop_map(|(ios, events)| Batch { ios, events })
}

/// Table lines over p0, p1, p2: one group or two, with each selector; and whether they queue.
const LINES: &[(&str, usize)] = &[
    ("0 0 1 1 round-robin 0 3 0 p0 p1 p2", 1),
    ("0 0 1 0 queue-length 0 3 0 p0 p1 p2", 1),
    ("0 0 1 1 service-time 0 3 2 p0 1 1 p1 1 2 p2 1 3", 1),
    (
        "0 0 2 1 round-robin 0 1 1 p0 2 round-robin 0 2 1 p1 1 p2 3",
        2,
    ),
    ("0 0 2 2 queue-length 0 2 0 p0 p1 service-time 0 1 0 p2", 2),
];

fn pattern(seed: u8, off: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            seed.wrapping_add(((off as usize + i) / 512) as u8)
                .wrapping_mul(31)
                ^ 0x5a
        })
        .collect()
}

/// Which slots an I/O touches (flushes: none).
fn slots(io: &Io) -> std::ops::Range<u64> {
    match *io {
        Io::Read { slot, n } | Io::Write { slot, n, .. } | Io::Zero { slot, n } => {
            slot..(slot + n).min(SLOTS)
        }
        Io::Flush => 0..0,
    }
}

fn run(line_idx: usize, queue: bool, batches: Vec<Batch>) -> Result<(), TestCaseError> {
    let (line, _) = LINES[line_idx];
    let line = if queue {
        line.replacen("0 0 ", "1 queue_if_no_path 0 ", 1)
    } else {
        line.to_string()
    };
    let r = rig(NPATHS, SIZE, &line, false);
    // The model: None where a failed write may or may not have landed.
    let mut model: Vec<Option<u8>> = vec![Some(0); SIZE as usize];
    for p in &r.paths {
        p.yield_first
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
    for b in batches {
        // Requests in one batch touch disjoint slots, so their order does not matter.
        let mut used = vec![false; SLOTS as usize];
        let ios: Vec<Io> = b
            .ios
            .into_iter()
            .filter(|io| {
                let s = slots(io);
                if s.clone().any(|i| used[i as usize]) {
                    return false;
                }
                s.for_each(|i| used[i as usize] = true);
                true
            })
            .collect();
        // A path healthy and active at the start that no event kills or fails.
        let safe = (0..NPATHS).any(|i| {
            !r.paths[i].dead.load(std::sync::atomic::Ordering::Acquire)
                && r.dev.path_active(&format!("p{i}")) == Some(true)
                && !b
                    .events
                    .iter()
                    .any(|(_, e)| matches!(e, Event::Kill(j) | Event::FailMsg(j) if *j == i))
        });
        let bufs: Vec<Vec<u8>> = ios
            .iter()
            .map(|io| match *io {
                Io::Write { slot, n, seed } => {
                    let s = slots(&Io::Read { slot, n });
                    pattern(seed, s.start * SLOT, ((s.end - s.start) * SLOT) as usize)
                }
                Io::Read { slot, n } => {
                    let s = slots(&Io::Read { slot, n });
                    vec![0u8; ((s.end - s.start) * SLOT) as usize]
                }
                _ => Vec::new(),
            })
            .collect();
        let mut bufs = bufs;
        let pending = Cell::new(ios.len());
        let completions = Cell::new(0usize);
        let dev = &r.dev;
        let futs: Vec<_> = ios
            .iter()
            .zip(bufs.iter_mut())
            .map(|(io, buf)| {
                let s = slots(io);
                let off = Bytes(s.start * SLOT);
                let len = (s.end - s.start) * SLOT;
                let (pending, completions) = (&pending, &completions);
                async move {
                    let r: IoResult<()> = match io {
                        // SAFETY: awaited here; the buffer outlives the batch.
                        Io::Read { .. } => unsafe { dev.read(off, buf) }.await,
                        // SAFETY: as above.
                        Io::Write { .. } => {
                            unsafe { dev.write(off, buf, WriteFlags::default()) }.await
                        }
                        Io::Zero { .. } => {
                            dev.write_zeroes(off, Bytes(len), WriteFlags::default())
                                .await
                        }
                        Io::Flush => dev.flush().await,
                    };
                    pending.set(pending.get() - 1);
                    completions.set(completions.get() + 1);
                    r
                }
            })
            .collect();
        let paths = &r.paths;
        let events = async {
            for (delay, e) in &b.events {
                for _ in 0..*delay {
                    iort::yield_now().await;
                }
                match *e {
                    Event::Kill(i) => paths[i].kill(),
                    Event::Heal(i) => paths[i].heal(),
                    Event::FailMsg(i) => {
                        message(dev, &format!("fail_path p{i}")).unwrap();
                    }
                    Event::ReinstateMsg(i) => {
                        message(dev, &format!("reinstate_path p{i}")).unwrap();
                    }
                    Event::Check => dev.check_paths().await,
                    Event::Switch(g) => {
                        message(dev, &format!("switch_group {}", g + 1)).unwrap();
                    }
                    Event::Disable(g) => {
                        message(dev, &format!("disable_group {}", g + 1)).unwrap();
                    }
                    Event::Enable(g) => {
                        message(dev, &format!("enable_group {}", g + 1)).unwrap();
                    }
                }
            }
            // Queued requests wait for a path: bring one back, as the checker would.
            for _ in 0..50 {
                iort::yield_now().await;
            }
            if pending.get() > 0 {
                prop_assert!(queue, "requests hang without queue_if_no_path");
                paths[0].heal();
                dev.check_paths().await;
            }
            Ok(())
        };
        let (results, ev) = iort::block_on(join(join_all(futs), events)).unwrap();
        ev?;
        prop_assert_eq!(completions.get(), ios.len());
        for ((io, buf), res) in ios.iter().zip(&bufs).zip(&results) {
            let s = slots(io);
            let (a, z) = ((s.start * SLOT) as usize, (s.end * SLOT) as usize);
            match res {
                Ok(()) => match io {
                    Io::Read { .. } => {
                        for (k, m) in model[a..z].iter().enumerate() {
                            if let Some(m) = m {
                                prop_assert_eq!(buf[k], *m, "read at byte {} ({:?})", a + k, io);
                            }
                        }
                    }
                    Io::Write { .. } => {
                        for (k, m) in model[a..z].iter_mut().enumerate() {
                            *m = Some(buf[k]);
                        }
                    }
                    Io::Zero { .. } => model[a..z].iter_mut().for_each(|m| *m = Some(0)),
                    Io::Flush => {}
                },
                Err(e) => {
                    prop_assert!(!queue, "an error while queueing: {}", e);
                    prop_assert!(!safe, "an error while a path stayed healthy: {}", e);
                    prop_assert_eq!(e.errno, libc::EIO);
                    prop_assert!(e.msg.contains("no usable path"), "{}", e);
                    if matches!(io, Io::Write { .. } | Io::Zero { .. }) {
                        model[a..z].iter_mut().for_each(|m| *m = None);
                    }
                }
            }
        }
        prop_assert_eq!(r.dev.waiting(), 0);
    }
    // Whatever the paths went through, the shared device holds what was acknowledged.
    let mem = r.mem.snapshot(0, SIZE as usize);
    for (k, m) in model.iter().enumerate() {
        if let Some(m) = m {
            prop_assert_eq!(mem[k], *m, "byte {} of the device", k);
        }
    }
    Ok(())
}

fn case() -> impl Strategy<Value = (usize, bool, Vec<Batch>)> {
    (0..LINES.len(), any::<bool>()).prop_flat_map(|(line, queue)| {
        (
            Just(line),
            Just(queue),
            prop::collection::vec(batch(LINES[line].1), 1..8),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn multipath_matches_the_model((line, queue, batches) in case()) {
        run(line, queue, batches)?;
    }
}
