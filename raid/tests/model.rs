//! Property tests: random I/O mixes against a flat model, with a leg failing at a random
//! point, degraded operation, replacement and rebuild interleaved with client I/O, and the
//! array growing (its table built again, longer, over the running array, as a reload does)
//! into leg space that holds different garbage on every leg. Bytes nobody wrote are not
//! modelled; parity and copies are checked with `check` once in sync.

mod common;
use common::*;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use proptest::prelude::*;
use raid::{LegState, RaidDevice};
use tables::io::{BlockDevice, WriteFlags};
use tables::{Bytes, Sectors};

const LEG: u64 = 128 << 10;

#[derive(Clone, Debug)]
enum Op {
    Write {
        off: u64,
        len: usize,
        seed: u64,
    },
    Read {
        off: u64,
        len: usize,
    },
    Concurrent(Vec<(u64, usize, u64)>),
    Flush,
    Steps(u8),
    Fail(usize),
    Replace(usize),
    Check,
    /// Grow by this many quarters of what is left up to the full size.
    Grow(u8),
}

fn op(size: u64, legs: usize) -> impl Strategy<Value = Op> {
    let w = (0..size, 1usize..40_000, any::<u64>());
    prop_oneof![
        6 => w.clone().prop_map(move |(o, l, s)| Op::Write { off: o, len: l.min((size - o) as usize), seed: s }),
        3 => (0..size, 1usize..40_000).prop_map(move |(o, l)| Op::Read { off: o, len: l.min((size - o) as usize) }),
        2 => proptest::collection::vec(w, 2..6).prop_map(move |v| Op::Concurrent(
            v.into_iter().map(|(o, l, s)| (o, l.min((size - o) as usize).min(9000), s)).collect())),
        1 => Just(Op::Flush),
        3 => (1u8..12).prop_map(Op::Steps),
        1 => (0..legs).prop_map(Op::Fail),
        1 => (0..legs).prop_map(Op::Replace),
        1 => Just(Op::Check),
        2 => (1u8..5).prop_map(Op::Grow),
    ]
}

/// `off`/`len` drawn for the full size, folded into the current size `cur`.
fn fold(off: u64, len: usize, cur: u64) -> (u64, usize) {
    let off = off % cur;
    (off, len.min((cur - off) as usize))
}

struct Harness {
    devs: Devs,
    wraps: Vec<Arc<Leg>>,
    dev: Arc<RaidDevice>,
    line: String,
    /// Size the array may grow to.
    full: u64,
    model: Vec<u8>,
    /// Which bytes of `model` were written (the others hold whatever the legs held).
    known: Vec<bool>,
    gen: usize,
}

impl Harness {
    fn new(t: &str, n: usize, size: u64) -> Harness {
        // Starts at 3/7 of the full size (not on a region boundary), over legs full of
        // garbage that differs per leg: the initial resync makes the start consistent.
        let start = size * 3 / 7 / 512 * 512;
        let devs = Devs::default();
        let mut wraps = Vec::new();
        let mut line = match t {
            "raid1" => format!("raid1 3 0 region_size 32 {n}"),
            "raid10" => format!("raid10 5 8 region_size 32 raid10_copies 2 {n}"),
            _ => format!("{t} 3 8 region_size 32 {n}"),
        };
        for i in 0..n {
            let d = mem(&format!("d{i}"), LEG);
            d.fill(0, &pattern(500 + i as u64, LEG as usize));
            let w = Leg::new(d);
            w.yield_first.store(true, Ordering::Relaxed);
            devs.add(&format!("d{i}"), w.clone());
            devs.add(&format!("m{i}"), mem(&format!("m{i}"), 128 << 10));
            line.push_str(&format!(" m{i} d{i}"));
            wraps.push(w);
        }
        let dev = build(&devs, false, false, Sectors(start / 512), &line).unwrap();
        sync_all(&dev);
        Harness {
            devs,
            wraps,
            dev,
            line,
            full: size,
            model: vec![0u8; start as usize],
            known: vec![false; start as usize],
            gen: 0,
        }
    }

    fn put(&mut self, off: u64, d: &[u8]) {
        let r = off as usize..off as usize + d.len();
        self.model[r.clone()].copy_from_slice(d);
        self.known[r].fill(true);
    }

    /// Compares `got` (read at `off`) with the model where the model knows the bytes.
    fn compare(&self, off: u64, got: &[u8], what: &str) {
        let r = off as usize..off as usize + got.len();
        let want: Vec<u8> = got
            .iter()
            .zip(&self.model[r.clone()])
            .zip(&self.known[r])
            .map(|((g, m), k)| if *k { *m } else { *g })
            .collect();
        same(got, &want, what);
    }

    fn all_healthy_except(&self, i: usize) -> bool {
        let st = self.dev.leg_states();
        (0..self.wraps.len()).all(|j| {
            j == i || (st[j] == LegState::InSync && !self.wraps[j].fail.load(Ordering::Relaxed))
        })
    }

    fn run(&mut self, op: &Op) {
        let handle = self.dev.clone();
        let dev = &*handle;
        let cur = self.model.len() as u64;
        match op {
            Op::Write { off, len, seed } => {
                let (off, len) = fold(*off, *len, cur);
                if len == 0 {
                    return;
                }
                let d = pattern(*seed, len);
                wr(dev, off, &d).unwrap_or_else(|e| panic!("write {off}+{len}: {e}"));
                self.put(off, &d);
            }
            Op::Read { off, len } => {
                let (off, len) = fold(*off, *len, cur);
                if len == 0 {
                    return;
                }
                let got = rd(dev, off, len).unwrap_or_else(|e| panic!("read {off}+{len}: {e}"));
                self.compare(off, &got, "read vs model");
            }
            Op::Concurrent(ws) => {
                // Keep only non-overlapping writes (they may share stripes and regions).
                let mut taken: Vec<(u64, u64)> = Vec::new();
                let mut batch = Vec::new();
                for &(o, l, s) in ws {
                    let (o, l) = fold(o, l, cur);
                    let e = o + l as u64;
                    if l == 0 || taken.iter().any(|&(a, b)| o < b && a < e) {
                        continue;
                    }
                    taken.push((o, e));
                    batch.push((o, pattern(s, l)));
                }
                let futs: Vec<_> = batch
                    .iter()
                    // SAFETY: joined in block_on below: completed or dropped before the buffers go.
                    .map(|(o, d)| unsafe { dev.write(Bytes(*o), d, WriteFlags::default()) })
                    .collect();
                let rs = iort::block_on(futures::future::join_all(futs)).unwrap();
                for r in rs {
                    r.unwrap();
                }
                for (o, d) in batch {
                    self.put(o, &d);
                }
            }
            Op::Flush => flush(dev).unwrap(),
            Op::Steps(n) => {
                for _ in 0..*n {
                    if !iort::block_on(self.dev.sync_step()).unwrap().unwrap() {
                        break;
                    }
                }
            }
            Op::Fail(i) => {
                // Not while a grow waits to be applied: it would be refused (see `grow.rs`).
                if self.all_healthy_except(*i) && self.dev.array_size() == self.dev.size() {
                    self.wraps[*i].fail.store(true, Ordering::Release);
                }
            }
            Op::Replace(i) => {
                if self.dev.leg_states()[*i] == LegState::Failed {
                    self.gen += 1;
                    let w = Leg::new(mem(&format!("r{i}.{}", self.gen), LEG));
                    w.yield_first.store(true, Ordering::Relaxed);
                    // The table names the replacement from now on (what a grow builds).
                    self.devs.add(&format!("d{i}"), w.clone());
                    self.wraps[*i] = w.clone();
                    iort::block_on(self.dev.replace_leg(*i, w))
                        .unwrap()
                        .unwrap();
                }
            }
            Op::Grow(q) => {
                // Only with every leg in sync (anything else is refused, see `grow.rs`).
                if self.model.len() as u64 == self.full
                    || !self.dev.leg_states().iter().all(|s| *s == LegState::InSync)
                    || self.wraps.iter().any(|w| w.fail.load(Ordering::Relaxed))
                {
                    return;
                }
                let new = (cur + (self.full - cur) * u64::from(*q) / 4) / 512 * 512;
                if new <= cur {
                    return;
                }
                let bigger = build(&self.devs, false, false, Sectors(new / 512), &self.line)
                    .unwrap_or_else(|e| panic!("grow {cur} -> {new}: {e}"));
                // The reload swaps the new table in and drops the old one. The array grows
                // at the next background step (odd `q`: as the background thread does at
                // once), or at the first request past the old end.
                self.dev = bigger;
                drop(handle);
                if q % 2 == 1 {
                    assert!(iort::block_on(self.dev.sync_step()).unwrap().unwrap());
                    assert_eq!(self.dev.array_size().0, new);
                }
                self.model.resize(new as usize, 0);
                self.known.resize(new as usize, false);
            }
            Op::Check => {
                // Only meaningful when nothing is failed or being rebuilt.
                if self.dev.leg_states().iter().all(|s| *s == LegState::InSync)
                    && self.wraps.iter().all(|w| !w.fail.load(Ordering::Relaxed))
                    && self.dev.sync_action() == raid::SyncAction::Idle
                {
                    assert_eq!(check(&self.dev), 0, "check found mismatches mid-run");
                }
            }
        }
    }

    fn finish(&mut self) {
        // Replace whatever failed, rebuild, and compare every byte.
        for i in 0..self.wraps.len() {
            if self.wraps[i].fail.load(Ordering::Relaxed) {
                let _ = rd(&*self.dev, 0, self.model.len()); // let the failure be noticed
                if self.dev.leg_states()[i] != LegState::Failed {
                    iort::block_on(self.dev.fail_leg(i)).unwrap().unwrap();
                }
                self.run(&Op::Replace(i));
            }
        }
        // A grow not applied yet is applied by the first request past the old end.
        let end = self.model.len() as u64 - 1;
        rd(&*self.dev, end, 1).unwrap();
        assert_eq!(self.dev.array_size(), self.dev.size());
        sync_all(&self.dev);
        assert!(
            self.dev.leg_states().iter().all(|s| *s == LegState::InSync),
            "{}",
            self.dev.status()
        );
        let got = rd(&*self.dev, 0, self.model.len()).unwrap();
        self.compare(0, &got, "final read");
        assert_eq!(
            check(&self.dev),
            0,
            "mismatches after rebuild: {}",
            self.dev.status()
        );
        let _ = &self.devs;
    }
}

fn run_level(
    t: &'static str,
    n: usize,
    size: u64,
) -> impl Fn(Vec<Op>) -> Result<(), TestCaseError> {
    move |ops: Vec<Op>| {
        let mut h = Harness::new(t, n, size);
        for o in &ops {
            h.run(o);
        }
        h.finish();
        Ok(())
    }
}

fn cfg() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(64),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

macro_rules! level_test {
    ($name:ident, $t:expr, $n:expr, $size:expr) => {
        proptest! {
            #![proptest_config(cfg())]
            #[test]
            fn $name(ops in proptest::collection::vec(op($size, $n), 1..40)) {
                run_level($t, $n, $size)(ops)?;
            }
        }
    };
}

level_test!(raid1_3way_model, "raid1", 3, LEG);
level_test!(raid4_model, "raid4", 3, 2 * LEG);
level_test!(raid5_ls_model, "raid5_ls", 4, 3 * LEG);
level_test!(raid5_la_model, "raid5_la", 4, 3 * LEG);
level_test!(raid5_rs_model, "raid5_rs", 3, 2 * LEG);
level_test!(raid5_ra_model, "raid5_ra", 5, 4 * LEG);
level_test!(raid10_4leg_model, "raid10", 4, 2 * LEG);
level_test!(raid10_3leg_model, "raid10", 3, 3 * LEG / 2);
