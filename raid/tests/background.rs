//! The background thread: a replaced leg rebuilds while client I/O goes on, with progress in
//! status, and the result equals the model.

mod common;
use common::*;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use raid::LegState;
use tables::io::BlockDevice;
use tables::Sectors;

const LEG: u64 = 8 << 20;

fn rebuild_under_io(t: &str, n: usize, size: u64) {
    let devs = Devs::default();
    let mut wraps = Vec::new();
    let mut line = match t {
        "raid1" => format!("raid1 5 0 region_size 128 max_recovery_rate 65536 {n}"),
        "raid10" => format!("raid10 5 8 region_size 128 max_recovery_rate 65536 {n}"),
        _ => format!("{t} 5 8 region_size 128 max_recovery_rate 65536 {n}"),
    };
    for i in 0..n {
        let w = Leg::new(mem(&format!("d{i}"), LEG));
        devs.add(&format!("d{i}"), w.clone());
        devs.add(&format!("m{i}"), mem(&format!("m{i}"), 64 << 10));
        line.push_str(&format!(" m{i} d{i}"));
        wraps.push(w);
    }
    let dev = build(&devs, false, true, Sectors(size / 512), &line).unwrap();
    assert!(
        dev.wait_idle(Duration::from_secs(60)),
        "initial resync: {}",
        dev.status()
    );
    let mut model = pattern(1, size as usize);
    wr(&*dev, 0, &model).unwrap();
    // Leg 1 dies mid-stream; writes continue degraded.
    wraps[1].fail.store(true, Ordering::Release);
    let mut seed = 100;
    let mut step = |dev: &raid::RaidDevice, model: &mut Vec<u8>| {
        seed += 1;
        let off = (seed * 7919 * 4096) % (size - 70_000);
        let d = pattern(seed, 65_536 + (seed as usize % 3000));
        wr(dev, off, &d).unwrap();
        model[off as usize..off as usize + d.len()].copy_from_slice(&d);
        let roff = (seed * 104_729) % (size - 10_000);
        same(
            &rd(dev, roff, 10_000).unwrap(),
            &model[roff as usize..roff as usize + 10_000],
            "read during rebuild",
        );
    };
    for _ in 0..20 {
        step(&dev, &mut model);
    }
    assert_eq!(dev.leg_states()[1], LegState::Failed);
    devs.add("fresh", mem("fresh", LEG));
    msg(&*dev, "rebuild 1 fresh").unwrap();
    // Client I/O continues while the rebuild runs; we must see progress part-way.
    let start = Instant::now();
    let mut saw_progress = false;
    let mut ios = 0;
    while dev.leg_states()[1] != LegState::InSync {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "rebuild stalled: {}",
            dev.status()
        );
        step(&dev, &mut model);
        ios += 1;
        let st = dev.status();
        if st.contains(" recover ") {
            let ratio = st.split_whitespace().nth(3).unwrap().to_string();
            let (a, b) = ratio.split_once('/').unwrap();
            let (a, b): (u64, u64) = (a.parse().unwrap(), b.parse().unwrap());
            if a > 0 && a < b {
                saw_progress = true;
            }
        }
    }
    assert!(
        saw_progress,
        "{t}: never saw partial recovery progress in status"
    );
    assert!(
        ios >= 5,
        "{t}: only {ios} client I/Os ran during the rebuild"
    );
    assert!(dev.wait_idle(Duration::from_secs(60)));
    same(
        &rd(&*dev, 0, size as usize).unwrap(),
        &model,
        "after rebuild",
    );
    msg(&*dev, "check").unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert!(dev.wait_idle(Duration::from_secs(60)));
    assert_eq!(dev.mismatch_count(), 0, "{}", dev.status());
    assert!(
        dev.status().contains(&format!(" {} ", "A".repeat(n))),
        "{}",
        dev.status()
    );
}

#[test]
fn raid5_rebuilds_in_background_under_io() {
    rebuild_under_io("raid5_ls", 4, 3 * LEG);
}

#[test]
fn raid1_rebuilds_in_background_under_io() {
    rebuild_under_io("raid1", 2, LEG);
}

#[test]
fn raid10_rebuilds_in_background_under_io() {
    rebuild_under_io("raid10", 4, 2 * LEG);
}
