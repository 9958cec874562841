//! Hostile table values: `validate` (what `table check` runs) refuses them, and building them
//! is a clean error, never a panic or a hang.

mod common;
use common::*;

use std::time::{Duration, Instant};

use raid::RaidKind;
use tables::io::BlockDevice;
use tables::registry::TargetKind;
use tables::Sectors;

const MIB: u64 = 1 << 20;

fn devs(n: usize) -> Devs {
    let devs = Devs::default();
    for i in 0..n {
        devs.add(&format!("d{i}"), mem(&format!("d{i}"), MIB));
        devs.add(&format!("m{i}"), mem(&format!("m{i}"), 64 << 10));
    }
    devs
}

/// `validate` refuses the line with a message containing `why`, and building it over real
/// devices is an error too (a panic fails the test).
#[track_caller]
fn refused(mirror: bool, len: u64, line: &str, why: &str) {
    let kind = if mirror {
        RaidKind::mirror()
    } else {
        RaidKind::raid()
    };
    let e = kind
        .validate(Sectors(len), &args(line))
        .expect_err(&format!("validate accepted '{line}'"));
    assert!(e.to_string().contains(why), "'{line}': {e}");
    let r = build(&devs(4), mirror, false, Sectors(len), line);
    assert!(r.is_err(), "'{line}' built");
}

#[test]
fn the_reported_region_size_is_refused_not_a_panic() {
    refused(
        false,
        65536,
        "raid1 3 0 region_size 36028797018963968 2 - d0 - d1",
        "larger than the array",
    );
}

#[test]
fn hostile_values_are_refused_by_validate_and_build() {
    let cases: &[(bool, u64, &str, &str)] = &[
        (
            false,
            2048,
            "raid1 3 0 region_size 4096 2 - d0 - d1",
            "larger than the array",
        ),
        (
            false,
            1 << 40,
            "raid1 3 0 region_size 1 2 - d0 - d1",
            "bitmap regions",
        ),
        (
            false,
            2048,
            "raid5 1 36028797018963968 3 - d0 - d1 - d2",
            "chunk_size",
        ),
        (false, 2048, "raid5 1 262144 3 - d0 - d1 - d2", "chunk_size"),
        (
            false,
            2048,
            "raid1 18446744073709551615 0 2 - d0 - d1",
            "#raid_params",
        ),
        (
            false,
            2048,
            "raid1 1 0 9223372036854775808 - d0 - d1",
            "#raid_devs",
        ),
        (
            false,
            2048,
            "raid10 3 8 raid10_copies 18446744073709551615 2 - d0 - d1",
            "raid10",
        ),
        (
            false,
            2048,
            "raid10 3 8 raid10_copies 3 2 - d0 - d1",
            "at least 3 legs",
        ),
        (
            false,
            2048,
            "raid1 3 0 max_recovery_rate 18446744073709551615 2 - d0 - d1",
            "max_recovery_rate",
        ),
        (false, 2048, "raid1 3 0 rebuild 7 2 - d0 - d1", "rebuild 7"),
        (
            false,
            2048,
            "raid1 5 0 rebuild 0 rebuild 1 2 - d0 - d1",
            "cannot rebuild",
        ),
        (
            false,
            2048,
            "raid10 5 8 rebuild 0 rebuild 1 4 - d0 - d1 - d2 - d3",
            "cannot rebuild",
        ),
        (
            true,
            2048,
            "core 1 1024 2 d0 0 d1 36028797018963967",
            "offset",
        ),
        (
            true,
            2048,
            "core 1 1024 9223372036854775808 d0 0 d1 0",
            "#devs",
        ),
        (
            true,
            2048,
            "core 1 1024 2 d0 0 d1 0 18446744073709551615",
            "feature count",
        ),
        (
            true,
            2048,
            "core 1 36028797018963968 2 d0 0 d1 0",
            "64 bits",
        ),
        (
            false,
            36028797018963968,
            "raid1 1 0 2 - d0 - d1",
            "segment length",
        ),
        (false, 0, "raid1 1 0 2 - d0 - d1", "segment length"),
        // One device for two legs: no redundancy, and resync copies over data.
        (false, 2048, "raid1 1 0 2 - d0 - d0", "leg 1 names 'd0'"),
        (
            false,
            2048,
            "raid5 1 8 3 m0 d0 m1 d1 m2 m0",
            "leg 2 names 'm0'",
        ),
        (true, 2048, "core 1 64 2 d0 0 d0 1024", "overlap"),
    ];
    for &(mirror, len, line, why) in cases {
        refused(mirror, len, line, why);
    }
    // raid10 may rebuild legs that do not share a chunk.
    let ok = "raid10 5 8 rebuild 0 rebuild 2 4 - d0 - d1 - d2 - d3";
    RaidKind::raid().validate(Sectors(2048), &args(ok)).unwrap();
    build(&devs(4), false, false, Sectors(2048), ok).unwrap();
    // Mirror legs may share a device at disjoint offsets.
    let ok = "core 1 64 2 d0 0 d0 1024";
    RaidKind::mirror()
        .validate(Sectors(1024), &args(ok))
        .unwrap();
    build(&devs(1), true, false, Sectors(1024), ok).unwrap();
}

#[test]
fn dropping_a_slowly_throttled_array_does_not_wait_for_the_throttle() {
    // 1 KiB/s over 64 KiB regions asks for a minute between background steps.
    let devs = devs(2);
    let line = "raid1 5 0 region_size 128 max_recovery_rate 1 2 m0 d0 m1 d1";
    let dev = build(&devs, false, true, Sectors(2048), line).unwrap();
    // Wait until the thread has done a step and is pausing.
    let t = Instant::now();
    while dev.status().contains(" 0/2048 ") && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(!dev.status().contains(" 0/2048 "), "{}", dev.status());
    let t = Instant::now();
    drop(dev);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "drop took {:?}",
        t.elapsed()
    );
}
