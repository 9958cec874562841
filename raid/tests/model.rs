//! Property tests: random I/O mixes against a flat model, with a leg failing at a random
//! point, degraded operation, replacement and rebuild interleaved with client I/O.

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
    Write { off: u64, len: usize, seed: u64 },
    Read { off: u64, len: usize },
    Concurrent(Vec<(u64, usize, u64)>),
    Flush,
    Steps(u8),
    Fail(usize),
    Replace(usize),
    Check,
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
    ]
}

struct Harness {
    devs: Devs,
    wraps: Vec<Arc<Leg>>,
    dev: Arc<RaidDevice>,
    model: Vec<u8>,
    gen: usize,
}

impl Harness {
    fn new(t: &str, n: usize, size: u64) -> Harness {
        let devs = Devs::default();
        let mut wraps = Vec::new();
        let mut line = match t {
            "raid1" => format!("raid1 3 0 region_size 32 {n}"),
            "raid10" => format!("raid10 5 8 region_size 32 raid10_copies 2 {n}"),
            _ => format!("{t} 3 8 region_size 32 {n}"),
        };
        for i in 0..n {
            let w = Leg::new(mem(&format!("d{i}"), LEG));
            w.yield_first.store(true, Ordering::Relaxed);
            devs.add(&format!("d{i}"), w.clone());
            devs.add(&format!("m{i}"), mem(&format!("m{i}"), 128 << 10));
            line.push_str(&format!(" m{i} d{i}"));
            wraps.push(w);
        }
        let dev = build(&devs, false, false, Sectors(size / 512), &line).unwrap();
        sync_all(&dev);
        Harness {
            devs,
            wraps,
            dev,
            model: vec![0u8; size as usize],
            gen: 0,
        }
    }

    fn all_healthy_except(&self, i: usize) -> bool {
        let st = self.dev.leg_states();
        (0..self.wraps.len()).all(|j| {
            j == i || (st[j] == LegState::InSync && !self.wraps[j].fail.load(Ordering::Relaxed))
        })
    }

    fn run(&mut self, op: &Op) {
        let dev = &*self.dev;
        match op {
            Op::Write { off, len, seed } => {
                if *len == 0 {
                    return;
                }
                let d = pattern(*seed, *len);
                wr(dev, *off, &d).unwrap_or_else(|e| panic!("write {off}+{len}: {e}"));
                self.model[*off as usize..*off as usize + len].copy_from_slice(&d);
            }
            Op::Read { off, len } => {
                if *len == 0 {
                    return;
                }
                let got = rd(dev, *off, *len).unwrap_or_else(|e| panic!("read {off}+{len}: {e}"));
                same(
                    &got,
                    &self.model[*off as usize..*off as usize + len],
                    "read vs model",
                );
            }
            Op::Concurrent(ws) => {
                // Keep only non-overlapping writes (they may share stripes and regions).
                let mut taken: Vec<(u64, u64)> = Vec::new();
                let mut batch = Vec::new();
                for &(o, l, s) in ws {
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
                    self.model[o as usize..o as usize + d.len()].copy_from_slice(&d);
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
                if self.all_healthy_except(*i) {
                    self.wraps[*i].fail.store(true, Ordering::Release);
                }
            }
            Op::Replace(i) => {
                if self.dev.leg_states()[*i] == LegState::Failed {
                    self.gen += 1;
                    let w = Leg::new(mem(&format!("r{i}.{}", self.gen), LEG));
                    w.yield_first.store(true, Ordering::Relaxed);
                    self.wraps[*i] = w.clone();
                    iort::block_on(self.dev.replace_leg(*i, w))
                        .unwrap()
                        .unwrap();
                }
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
        sync_all(&self.dev);
        assert!(
            self.dev.leg_states().iter().all(|s| *s == LegState::InSync),
            "{}",
            self.dev.status()
        );
        same(
            &rd(&*self.dev, 0, self.model.len()).unwrap(),
            &self.model,
            "final read",
        );
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
