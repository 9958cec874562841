//! Table lines: canonical round trips, every refusal (with the argument it names), and build
//! errors that name the path.

use std::collections::HashMap;
use std::sync::Arc;

use multipath::{MultipathKind, NoPathRetry, SelectorKind};
use tables::io::DeviceRef;
use tables::mem::MemDevice;
use tables::registry::{BuildCtx, Registry, TargetKind};
use tables::table::Table;
use tables::{Bytes, Sectors};

fn args(s: &str) -> Vec<String> {
    s.split_whitespace().map(String::from).collect()
}

fn registry() -> Registry {
    let mut r = tables::targets::builtin_registry();
    multipath::register(&mut r);
    r
}

/// The line printed back by `Table` (what `dev table` shows).
fn canonical(line_args: &str) -> String {
    let t = Table::parse(&format!("0 2048 multipath {line_args}\n"), &registry())
        .unwrap_or_else(|e| panic!("'{line_args}': {e}"));
    let s = t.to_string();
    s.trim_end()
        .strip_prefix("0 2048 multipath ")
        .unwrap_or(&s)
        .to_string()
}

#[test]
fn canonical_lines_print_back_unchanged() {
    for l in [
        "1 queue_if_no_path 0 2 1 round-robin 0 2 1 /dev/a 1000 /dev/b 1000 round-robin 0 1 1 /dev/c 1000",
        "0 0 1 0 queue-length 0 2 1 a 1 b 1",
        "0 1 alua 1 1 service-time 0 2 2 a 1 1 b 1 100",
        "0 3 alua x y 1 1 round-robin 0 1 1 a 1",
        "4 no_path_retry 12 checker_interval_ms 100 0 1 1 round-robin 0 1 1 a 3",
        "7 queue_if_no_path no_path_retry queue pg_init_retries 3 pg_init_delay_msecs 50 0 1 1 \
         round-robin 0 1 1 a 1",
        "3 retain_attached_hw_handler queue_mode bio 0 1 1 round-robin 0 1 1 a 1",
        "2 no_path_retry fail 0 1 1 round-robin 0 1 1 a 1",
    ] {
        let l = l.split_whitespace().collect::<Vec<_>>().join(" ");
        assert_eq!(canonical(&l), l);
    }
}

#[test]
fn lines_are_printed_in_canonical_form() {
    // Per-path defaults are spelled out, as dmsetup table prints them.
    assert_eq!(
        canonical("0 0 1 1 round-robin 0 2 0 a b"),
        "0 0 1 1 round-robin 0 2 1 a 1 b 1"
    );
    assert_eq!(
        canonical("0 0 1 1 service-time 0 2 1 a 5 b 7"),
        "0 0 1 1 service-time 0 2 2 a 5 1 b 7 1"
    );
    // Features in dm's order; default values dropped; leading zeros gone; 0 retries = fail.
    assert_eq!(
        canonical(
            "6 retain_attached_hw_handler pg_init_retries 0 queue_if_no_path no_path_retry 0 \
             0 01 1 queue-length 0 1 1 a 0010"
        ),
        "4 queue_if_no_path no_path_retry fail retain_attached_hw_handler 0 1 1 queue-length 0 1 1 a 10"
    );
    // rq/mq are dm's default and not printed.
    assert_eq!(
        canonical("2 queue_mode mq 0 1 0 round-robin 0 1 1 a 1"),
        "0 0 1 0 round-robin 0 1 1 a 1"
    );
}

#[test]
fn parsed_values() {
    let c = multipath::parse::parse(&args(
        "3 no_path_retry 4 queue_if_no_path 1 alua 2 2 round-robin 0 1 1 a 7 service-time 0 2 2 b 1 10 c 2 0",
    ))
    .unwrap();
    assert_eq!(c.features.no_path_retry, Some(NoPathRetry::Count(4)));
    assert!(c.features.queues_initially());
    assert_eq!(c.features.retry_limit(), Some(4));
    assert_eq!(c.hw_handler, Some(("alua".to_string(), vec![])));
    assert_eq!(c.initial_group, 2);
    assert_eq!(c.groups[0].selector, SelectorKind::RoundRobin);
    assert_eq!(c.groups[0].paths[0].repeat_count, 7);
    assert_eq!(c.groups[1].selector, SelectorKind::ServiceTime);
    assert_eq!(c.groups[1].paths[0].relative_throughput, 10);
    assert_eq!(c.groups[1].paths[1].relative_throughput, 0);
    let k = MultipathKind::new();
    let a = args("0 0 2 0 round-robin 0 2 1 a 1 b 1 queue-length 0 1 0 c");
    assert_eq!(k.device_args(&a), vec![8, 10, 16]);
    // no_path_retry without queue_if_no_path queues; fail does not.
    let q = |s: &str| {
        multipath::parse::parse(&args(s))
            .unwrap()
            .features
            .queues_initially()
    };
    assert!(q("2 no_path_retry queue 0 1 0 round-robin 0 1 0 a"));
    assert!(!q("2 no_path_retry fail 0 1 0 round-robin 0 1 0 a"));
    assert!(!q("0 0 1 0 round-robin 0 1 0 a"));
}

/// `validate` refuses `line` naming argument `at` (1-based; 0: the whole line) with a
/// message containing `why`.
#[track_caller]
fn refused(line: &str, at: usize, why: &str) {
    let k = MultipathKind::new();
    let e = k
        .validate(Sectors(2048), &args(line))
        .expect_err(&format!("accepted '{line}'"));
    assert!(e.msg.contains(why), "'{line}': {e}");
    assert_eq!(e.arg, (at != 0).then_some(at), "'{line}': {e}");
}

#[test]
fn every_refusal_names_the_argument() {
    refused("", 1, "missing #features");
    refused(
        "x 0 1 0 round-robin 0 1 0 a",
        1,
        "#features: 'x' is not a number",
    );
    refused("17", 1, "#features 17 is out of range (0..=16)");
    refused(
        "2 queue_if_no_path",
        1,
        "#features is 2 but only 1 arguments follow",
    );
    refused(
        "1 queue_if_no_pat 0 1 0 round-robin 0 1 0 a",
        2,
        "unknown feature 'queue_if_no_pat'",
    );
    refused(
        "1 pg_init_retries 0 1 0 round-robin 0 1 0 a",
        2,
        "'pg_init_retries' needs a value",
    );
    refused(
        "2 pg_init_retries 51 0 1 0 round-robin 0 1 0 a",
        3,
        "pg_init_retries 51 is out of range",
    );
    refused(
        "2 pg_init_delay_msecs 60001 0 1 0 round-robin 0 1 0 a",
        3,
        "out of range (0..=60000)",
    );
    refused(
        "2 no_path_retry often 0 1 0 round-robin 0 1 0 a",
        3,
        "no_path_retry (N, queue or fail): 'often' is not a number",
    );
    refused(
        "1 no_path_retry 0 1 0 round-robin 0 1 0 a",
        2,
        "'no_path_retry' needs a value",
    );
    refused(
        "2 queue_mode fast 0 1 0 round-robin 0 1 0 a",
        3,
        "queue_mode 'fast' is not bio, rq or mq",
    );
    refused(
        "2 checker_interval_ms 5 0 1 0 round-robin 0 1 0 a",
        3,
        "checker_interval_ms 5 is out of range (10..=3600000)",
    );
    refused(
        "0 3 alua",
        2,
        "#hw_handler_args is 3 but only 1 arguments follow",
    );
    refused("0 0", 3, "missing #pathgroups");
    refused("0 0 0 0", 3, "at least one path group");
    refused(
        "0 0 2 3 round-robin 0 1 0 a round-robin 0 1 0 b",
        4,
        "initial path group (0 = choose) 3 is out of range (0..=2)",
    );
    refused(
        "0 0 1 0 historical-service-time 0 1 0 a",
        5,
        "unknown path selector 'historical-service-time'",
    );
    refused(
        "0 0 1 0 round-robin 1 x 1 0 a",
        6,
        "takes no selector arguments",
    );
    refused(
        "0 0 1 0 round-robin 0 0 0",
        7,
        "group 1: #paths 0 is out of range (1..=1024)",
    );
    refused(
        "0 0 1 0 round-robin 0 1 2 a 1 1",
        8,
        "#per-path args of round-robin 2 is out of range (0..=1)",
    );
    refused(
        "0 0 1 0 service-time 0 1 3 a 1 1 1",
        8,
        "out of range (0..=2)",
    );
    refused(
        "0 0 1 0 round-robin 0 1 1 a 0",
        10,
        "path 1 (a) repeat_count 0 is out of range",
    );
    refused(
        "0 0 1 0 service-time 0 1 2 a 1 101",
        11,
        "relative_throughput 101 is out of range (0..=100)",
    );
    refused(
        "0 0 1 0 round-robin 0 1 1 a -1",
        10,
        "repeat_count: '-1' is negative",
    );
    refused(
        "0 0 2 0 round-robin 0 1 0 a round-robin 0 1 0 a",
        14,
        "device 'a' is already a path (argument 9)",
    );
    refused(
        "0 0 1 0 round-robin 0 1 0 a b",
        10,
        "unexpected argument 'b' after the last path group",
    );
    refused(
        "0 0 1 0 round-robin 0 2 0 a",
        10,
        "missing group 1: path 2 device",
    );
    refused(
        "0 0 2 0 round-robin 0 1 0 a",
        10,
        "missing path selector of group 2",
    );
}

#[test]
fn segment_length_zero_or_too_big_is_refused() {
    let k = MultipathKind::new();
    let a = args("0 0 1 0 round-robin 0 1 0 a");
    assert!(k.validate(Sectors(0), &a).is_err());
    assert!(k.validate(Sectors(u64::MAX), &a).is_err());
}

fn resolver(devs: HashMap<&'static str, u64>) -> impl Fn(&str) -> Result<DeviceRef, String> {
    move |d: &str| match devs.get(d) {
        Some(&n) => Ok(Arc::new(MemDevice::new(d, Bytes(n))) as DeviceRef),
        None => Err(format!("no such device '{d}'")),
    }
}

#[test]
fn build_refuses_short_and_missing_paths_naming_them() {
    let k = MultipathKind::new().with_background(false);
    let r = resolver(HashMap::from([("a", 1 << 20), ("short", 4096)]));
    let ctx = BuildCtx {
        line: 3,
        len: Sectors(2048),
        resolver: &r,
    };
    let e = k
        .build(
            &ctx,
            &args("0 0 2 0 round-robin 0 1 0 a round-robin 0 1 0 short"),
        )
        .err()
        .expect("a short path builds");
    assert!(
        e.msg
            .contains("path 'short' (group 2) has 4096 bytes, shorter than the table's 1048576"),
        "{e}"
    );
    assert!(e.msg.contains("multipath@line3"), "{e}");
    let e = k
        .build(&ctx, &args("0 0 1 0 round-robin 0 2 0 a gone"))
        .err()
        .expect("a missing path builds");
    assert!(
        e.msg.contains("group 1 path 'gone': no such device 'gone'"),
        "{e}"
    );
    let d = k
        .build(&ctx, &args("0 0 1 0 round-robin 0 1 0 a"))
        .expect("builds");
    assert_eq!(d.size(), Bytes(1 << 20));
}

#[test]
fn a_features_count_too_large_is_hinted() {
    refused(
        "2 queue_if_no_path 0 1 0 round-robin 0 1 0 a",
        3,
        "unknown feature '0' (is #features 2 right?)",
    );
}
