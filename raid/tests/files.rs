//! A raid5 over real files (io_uring through `extents`): the assembly thread, the background
//! thread's own ring and the client's ring all drive the same legs; a failed leg is replaced by
//! name through the opener while client I/O goes on; a clean restart needs no resync.

mod common;
use common::*;
use std::sync::Arc;
use std::time::Duration;

use extents::FileResolver;
use raid::{LegState, RaidKind};
use tables::io::BlockDevice;
use tables::registry::{BuildCtx, Resolver};
use tables::Sectors;

const LEG: u64 = 4 << 20;

#[test]
fn raid5_over_files_fails_rebuilds_and_restarts_clean() {
    let dir = tempfile::tempdir().unwrap();
    let path = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
    for i in 0..4 {
        std::fs::File::create(path(&format!("d{i}")))
            .unwrap()
            .set_len(LEG)
            .unwrap();
        std::fs::File::create(path(&format!("m{i}")))
            .unwrap()
            .set_len(64 << 10)
            .unwrap();
    }
    std::fs::File::create(path("spare"))
        .unwrap()
        .set_len(LEG)
        .unwrap();
    let mut line = "raid5 3 16 region_size 256 4".to_string();
    for i in 0..4 {
        line.push_str(&format!(
            " {} {}",
            path(&format!("m{i}")),
            path(&format!("d{i}"))
        ));
    }
    let resolver = Arc::new(FileResolver::new(Default::default()));
    let r2 = resolver.clone();
    let kind = RaidKind::raid().with_opener(Arc::new(move |n: &str| r2.open(n)));
    let size = 3 * LEG;
    let ctx = BuildCtx {
        line: 1,
        len: Sectors(size / 512),
        resolver: &*resolver,
    };
    let dev = kind.build_raid(&ctx, &args(&line)).unwrap();
    assert!(dev.wait_idle(Duration::from_secs(60)), "{}", dev.status());
    let mut model = pattern(5, size as usize);
    wr(&*dev, 0, &model).unwrap();
    flush(&*dev).unwrap();
    msg(&*dev, "fail 2").unwrap();
    assert_eq!(dev.leg_states()[2], LegState::Failed);
    same(
        &rd(&*dev, 0, size as usize).unwrap(),
        &model,
        "degraded read over files",
    );
    msg(&*dev, &format!("rebuild 2 {}", path("spare"))).unwrap();
    for k in 0..50u64 {
        let off = (k * 1_234_567) % (size - 70_000);
        let d = pattern(100 + k, 65_000);
        wr(&*dev, off, &d).unwrap();
        model[off as usize..off as usize + d.len()].copy_from_slice(&d);
    }
    assert!(dev.wait_idle(Duration::from_secs(60)), "{}", dev.status());
    assert_eq!(dev.leg_states(), vec![LegState::InSync; 4]);
    same(
        &rd(&*dev, 0, size as usize).unwrap(),
        &model,
        "after rebuild over files",
    );
    msg(&*dev, "check").unwrap();
    assert!(dev.wait_idle(Duration::from_secs(60)));
    assert_eq!(dev.mismatch_count(), 0, "{}", dev.status());
    flush(&*dev).unwrap();
    drop(dev);

    // Restart with the spare in leg 2's place: clean, nothing to resync, same data.
    let old_line = line.clone();
    let line = line.replace(&path("d2"), &path("spare"));
    let kind = RaidKind::raid().with_background(false);
    let dev = kind.build_raid(&ctx, &args(&line)).unwrap();
    assert!(
        dev.status().starts_with("raid5_ls 4 AAAA "),
        "{}",
        dev.status()
    );
    assert!(
        dev.status().contains(" idle 0 0 - bitmap:0/"),
        "{}",
        dev.status()
    );
    same(
        &rd(&*dev, 0, size as usize).unwrap(),
        &model,
        "after restart",
    );
    drop(dev);

    // Putting the old, failed data device back with leg 2's metadata is detected: rebuilt,
    // never read.
    let dev = kind.build_raid(&ctx, &args(&old_line)).unwrap();
    assert_eq!(dev.leg_states()[2], LegState::Recovering);
    let why = dev.leg_errors()[2].clone().unwrap_or_default();
    assert!(why.contains("another data device"), "{why}");
    same(
        &rd(&*dev, 0, size as usize).unwrap(),
        &model,
        "old leg back in the table",
    );
}
