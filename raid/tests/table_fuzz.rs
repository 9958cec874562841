//! Random `raid` and `mirror` lines, hostile numbers included, parsed, validated *and built*
//! over small in-memory devices: every outcome is a device or a clean error, never a panic; a
//! line `validate` accepts fails to build only for a reason of its devices, and a line it
//! refuses never builds.

mod common;
use common::*;

use proptest::prelude::*;
use raid::RaidKind;
use tables::io::BlockDevice;
use tables::registry::{BuildCtx, TargetKind};
use tables::Sectors;

/// Numbers worth trying: edges of every bound the code has, and overflow bait.
fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec![
            0u64, 1, 2, 3, 4, 7, 8, 16, 32, 64, 128, 4096, 1 << 17, (1 << 17) + 1, 1 << 22,
            i32::MAX as u64, (i32::MAX as u64) + 1, 1 << 32, 1 << 55, u64::MAX / 512,
            u64::MAX / 512 + 1, u64::MAX / 2, u64::MAX,
        ])
        .prop_map(|v| v.to_string()),
        2 => (0u64..300).prop_map(|v| v.to_string()),
        1 => prop::sample::select(vec!["-1", "x", "18446744073709551616", "1e3"])
            .prop_map(String::from),
    ]
}

/// Mostly a sensible value from `good`, sometimes a hostile one.
fn num(good: Vec<u64>) -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::sample::select(good).prop_map(|v| v.to_string()),
        1 => number(),
    ]
}

fn pow2(lo: u32, hi: u32) -> Vec<u64> {
    (lo..=hi).map(|e| 1u64 << e).collect()
}

/// The legs of a line: mostly all with metadata devices or all without, some missing
/// (`- -`), now and then a broken pair or a name that does not resolve.
fn legs() -> impl Strategy<Value = Vec<String>> {
    (
        prop_oneof![
            8 => proptest::collection::vec(0u8..40, 2..7),
            1 => proptest::collection::vec(0u8..40, 0..2),
        ],
        prop::bool::weighted(0.7),
    )
        .prop_map(|(ks, meta)| {
            ks.iter()
                .enumerate()
                .map(|(i, k)| match (k, meta) {
                    (0..=2, _) => "- -".to_string(),
                    (3, _) => format!("m{i} -"),
                    (4, _) => "nosuch d0".to_string(),
                    (5, true) => format!("- d{i}"),
                    (5, false) => format!("m{i} d{i}"),
                    (_, true) => format!("m{i} d{i}"),
                    (_, false) => format!("- d{i}"),
                })
                .collect()
        })
}

/// Optional parameters of a `raid` line; `raid10_copies` mostly for raid10 only.
fn raid_param(raid10: bool) -> impl Strategy<Value = String> {
    prop_oneof![
        4 => Just("sync".to_string()),
        4 => Just("nosync".to_string()),
        6 => num(vec![0, 1, 2, 3, 4, 5, 6]).prop_map(|v| format!("rebuild {v}")),
        12 => num(pow2(0, 14)).prop_map(|v| format!("region_size {v}")),
        if raid10 { 6 } else { 1 } => num(vec![1, 2, 3, 4])
            .prop_map(|v| format!("raid10_copies {v}")),
        2 => Just("raid10_format near".to_string()),
        1 => Just("raid10_format far".to_string()),
        4 => num(vec![0, 1, 1024, 65536]).prop_map(|v| format!("max_recovery_rate {v}")),
        2 => num(vec![0, 1000]).prop_map(|v| format!("daemon_sleep {v}")),
        1 => Just("journal_dev j".to_string()),
        1 => Just("bogus 1".to_string()),
    ]
}

/// The count arguments of a line: mostly right, so the checks past the counting are
/// reached; `junk` for count `miscount` when it names one.
fn counts(right: [usize; 2], miscount: u8, junk: String) -> [String; 2] {
    let pick = |i: usize| match miscount as usize == i {
        true => junk.clone(),
        false => right[i].to_string(),
    };
    [pick(0), pick(1)]
}

fn raid_line() -> impl Strategy<Value = String> {
    let ty = prop::sample::select(vec![
        "raid1", "raid1", "raid4", "raid5", "raid5_la", "raid5_ra", "raid5_ls", "raid5_rs",
        "raid5_n", "raid10", "raid10", "raid6",
    ]);
    ty.prop_flat_map(|ty| {
        (
            Just(ty),
            num(pow2(3, 8)),
            proptest::collection::vec(raid_param(ty == "raid10"), 0..3),
            legs(),
            0u8..12,
            number(),
        )
    })
    .prop_map(|(ty, chunk, params, legs, miscount, junk)| {
        let params = params.join(" ");
        let [np, nd] = counts(
            [1 + params.split_whitespace().count(), legs.len()],
            miscount,
            junk,
        );
        format!("{ty} {np} {chunk} {params} {nd} {}", legs.join(" "))
    })
}

fn mirror_line() -> impl Strategy<Value = String> {
    (
        prop_oneof![8 => Just("core"), 1 => Just("disk")],
        prop::sample::select(vec!["", "sync", "nosync"]),
        num(pow2(0, 14)),
        prop_oneof![
            6 => proptest::collection::vec((0usize..6, num(vec![0, 0, 8, 1024, 2048])), 2..5),
            1 => proptest::collection::vec((0usize..6, num(vec![0])), 0..2),
        ],
        prop_oneof![
            6 => Just(""),
            2 => Just("1 handle_errors"),
            1 => Just("2 handle_errors"),
            1 => Just("1 bogus"),
        ],
        0u8..12,
        number(),
    )
        .prop_map(|(log, flag, region, legs, feat, miscount, junk)| {
            let nlog = if flag.is_empty() { 1 } else { 2 };
            let [nlog, nd] = counts([nlog, legs.len()], miscount, junk);
            let legs: Vec<String> = legs.iter().map(|(i, o)| format!("d{i} {o}")).collect();
            format!(
                "{log} {nlog} {region} {flag} {nd} {} {feat}",
                legs.join(" ")
            )
        })
}

fn len() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => prop::sample::select(vec![1u64, 8, 64, 1024, 2048, 4096]),
        3 => 1u64..4096,
        1 => prop::sample::select(vec![0u64, 1 << 40, 1 << 55, u64::MAX / 512, u64::MAX]),
    ]
}

/// Data devices of 0 to 2 MiB and metadata devices of 4 KiB to 256 KiB: mostly all large
/// enough, sometimes each its own size.
fn sizes() -> impl Strategy<Value = Vec<(u64, u64)>> {
    let data = prop::sample::select(vec![0u64, 4096, 64 << 10, 1 << 20, 2 << 20]);
    let meta = prop::sample::select(vec![4096u64, 8192, 64 << 10, 256 << 10]);
    prop_oneof![
        3 => Just(vec![(2 << 20, 256 << 10); 6]),
        2 => proptest::collection::vec((data, meta), 6),
    ]
}

/// Build failures that depend on the devices, which `validate` cannot see.
const DEVICE_REASONS: &[&str] = &[
    "data device '",
    "metadata device '",
    "is past the end of",
    "; this array needs",
    "metadata device of leg",
];

fn check_line(mirror: bool, len: u64, line: &str, sizes: &[(u64, u64)]) {
    // The panic count is process-wide: cases take turns so the two tests do not mix theirs.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let kind = if mirror {
        RaidKind::mirror()
    } else {
        RaidKind::raid()
    }
    .with_background(false);
    let a = args(line);
    let before = panics();
    let valid = kind.validate(Sectors(len), &a);
    if valid.is_ok() {
        // What `table check` accepts prints back in a form it accepts again.
        let norm = kind.normalize(&a);
        assert_eq!(kind.normalize(&norm), norm, "'{line}'");
        kind.validate(Sectors(len), &norm)
            .unwrap_or_else(|e| panic!("'{line}' normalized to '{}': {e}", norm.join(" ")));
    }
    let devs = Devs::default();
    for (i, &(d, m)) in sizes.iter().enumerate() {
        devs.add(&format!("d{i}"), mem(&format!("d{i}"), d));
        devs.add(&format!("m{i}"), mem(&format!("m{i}"), m));
    }
    let resolver = |n: &str| devs.open(n);
    let ctx = BuildCtx {
        line: 1,
        len: Sectors(len),
        resolver: &resolver,
    };
    let built = kind.build_raid(&ctx, &a);
    assert_eq!(
        panics(),
        before,
        "'{line}' (len {len}): panicked while building"
    );
    match (&valid, &built) {
        (Err(v), Ok(_)) => panic!("'{line}' (len {len}) built, but validate said: {v}"),
        (Ok(()), Err(e)) => assert!(
            DEVICE_REASONS.iter().any(|r| e.msg.contains(r)),
            "'{line}' (len {len}) passed validate but failed to build for a reason it could \
             have seen: {e}"
        ),
        _ => {}
    }
    if let Ok(dev) = built {
        // A built array serves I/O at both ends and reports status.
        let size = dev.size().0;
        let n = 512.min(size as usize);
        let data = pattern(len, n);
        for off in [0, size - n as u64] {
            wr(&*dev, off, &data).unwrap();
            same(&rd(&*dev, off, n).unwrap(), &data, line);
        }
        flush(&*dev).unwrap();
        // Background work to the end (resync of whatever regions the line asked for).
        iort::block_on(dev.sync_all()).unwrap().unwrap();
        same(&rd(&*dev, 0, n).unwrap(), &data, line);
        assert!(!dev.status().is_empty());
    }
    assert_eq!(panics(), before, "'{line}' (len {len}): panicked");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn raid_lines_build_or_fail_cleanly(line in raid_line(), len in len(), sizes in sizes()) {
        check_line(false, len, &line, &sizes);
    }

    #[test]
    fn mirror_lines_build_or_fail_cleanly(line in mirror_line(), len in len(), sizes in sizes()) {
        check_line(true, len, &line, &sizes);
    }
}
