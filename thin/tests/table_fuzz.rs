//! Table fuzzing that builds: `thin-pool` and `thin` lines with random, often hostile
//! arguments (block sizes, low water marks, feature counts and words, thin ids, origins,
//! segment lengths) over small in-memory devices, built through the registry both as table
//! text (`Table::parse` + `build`) and by calling the target kinds with the raw arguments.
//!
//! Every outcome must be `Ok` or a clean error (no panic), and a line `validate` accepted
//! may only fail to build for a reason outside its arguments: a device argument (missing,
//! too small, not a pool), or the state of the pool (an id it does not have, the block size
//! of the live pool a reload meets). With good devices it must build.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use common::*;
use proptest::prelude::*;
use tables::io::read_blocking;
use tables::registry::{ArgError, BuildCtx, Registry};
use tables::table::Table;
use tables::{DeviceRef, Sectors};

/// Device tokens the lines may name, and their sizes (`None`: the resolver fails).
const DEVICES: [(&str, Option<u64>); 12] = [
    ("meta_empty", Some(0)),
    ("meta_tiny", Some(4096)),
    ("meta_63", Some(63 * 4096)),
    ("meta_min", Some(64 * 4096)),
    ("meta_ok", Some(MIB)),
    ("data_empty", Some(0)),
    ("data_tiny", Some(512)),
    ("data_ok", Some(4 * MIB)),
    ("data_big", Some(16 * MIB)),
    ("origin", Some(MIB)),
    ("origin_empty", Some(0)),
    ("missing", None),
];

/// Thin ids the pool has (created by message once the pool is built).
const IDS: [u32; 2] = [1, 5];

/// Every case gets devices of its own name, so pools of different cases never meet in the
/// process-wide pool registry (which finds a live pool by its metadata device's name).
static CASE: AtomicU64 = AtomicU64::new(0);

struct Env {
    devs: HashMap<String, DeviceRef>,
}

impl Env {
    fn new() -> Env {
        let n = CASE.fetch_add(1, Ordering::Relaxed);
        let mut devs = HashMap::new();
        for (tok, size) in DEVICES {
            if let Some(size) = size {
                devs.insert(
                    tok.to_string(),
                    mem(&format!("{tok}#{n}"), size) as DeviceRef,
                );
            }
        }
        Env { devs }
    }
    fn open(&self, n: &str) -> Result<DeviceRef, String> {
        self.devs
            .get(n)
            .cloned()
            .ok_or_else(|| format!("no device {n}"))
    }
}

/// Numbers as a table would spell them, hostile ones included.
fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "0",
            "1",
            "7",
            "8",
            "9",
            "16",
            "128",
            "2097152",
            "4194304",
            "16777215",
            "16777216",
            "4294967295",
            "4294967296",
            "18446744073709551615",
            "18446744073709551616",
            "-1",
            "+8",
            "0x10",
            "1e3",
            "x",
            "",
        ])
        .prop_map(String::from),
        any::<u64>().prop_map(|v| v.to_string()),
        (0u32..64).prop_map(|s| (1u64 << s).to_string()),
    ]
}

fn feature() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::sample::select(vec![
            "skip_block_zeroing",
            "ignore_discard",
            "no_discard_passdown",
            "read_only",
            "error_if_no_space",
        ])
        .prop_map(String::from),
        1 => prop::sample::select(vec![
            "skip_block_zeroing",
            "ignore_discard",
            "no_discard_passdown",
            "read_only",
            "error_if_no_space",
            "bogus",
            "READ_ONLY",
        ])
        .prop_map(String::from),
        1 => number(),
    ]
}

fn token(prefix: &'static str) -> impl Strategy<Value = String> {
    prop::sample::select(
        DEVICES
            .iter()
            .map(|d| d.0)
            .filter(|t| t.starts_with(prefix) || *t == "missing")
            .collect::<Vec<_>>(),
    )
    .prop_map(String::from)
}

/// Segment lengths in sectors, including ones whose byte size overflows.
fn length() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 1u64..(1 << 30),
        1 => prop::sample::select(vec![
            1u64,
            8,
            2048,
            1 << 21,
            u64::MAX / 512,
            u64::MAX / 512 + 1,
            u64::MAX
        ]),
        1 => any::<u64>(),
    ]
}

/// `<meta> <data> <block size> <low water> [<n> <features>...]`, sometimes with the wrong
/// number of arguments.
fn pool_args() -> impl Strategy<Value = Vec<String>> {
    (
        prop_oneof![
            3 => prop::sample::select(vec!["meta_min", "meta_ok"]).prop_map(String::from),
            1 => token("meta"),
        ],
        token("data"),
        prop_oneof![
            3 => prop::sample::select(vec!["8", "16", "128", "2048"]).prop_map(String::from),
            2 => number()
        ],
        prop_oneof![3 => (0u64..10_000).prop_map(|v| v.to_string()), 1 => number()],
        prop::option::of((
            prop_oneof![1 => number(), 4 => Just("<count>".to_string())],
            prop::collection::vec(feature(), 0..4),
        )),
        0usize..24,
    )
        .prop_map(|(m, d, bs, lw, feats, cut)| {
            let mut a = vec![m, d, bs, lw];
            if let Some((n, words)) = feats {
                let n = if n == "<count>" {
                    words.len().to_string()
                } else {
                    n
                };
                a.push(n);
                a.extend(words);
            }
            // Now and then too few arguments.
            if cut < a.len() && cut < 4 {
                a.truncate(cut);
            }
            a
        })
}

/// `<pool> <id> [<origin>]`, sometimes with too few or too many.
fn thin_args() -> impl Strategy<Value = Vec<String>> {
    (
        prop_oneof![
            6 => Just("pool".to_string()),
            1 => prop::sample::select(vec!["data_ok", "missing"]).prop_map(String::from),
        ],
        prop_oneof![
            3 => prop::sample::select(vec!["1", "5"]).prop_map(String::from),
            1 => number()
        ],
        prop::option::of(prop_oneof![token("origin"), Just("pool".to_string())]),
        prop::collection::vec(number(), 0..2),
        0usize..6,
    )
        .prop_map(|(p, id, origin, extra, cut)| {
            let mut a = vec![p, id];
            a.extend(origin);
            if cut == 0 {
                a.extend(extra);
            }
            if cut == 1 {
                a.truncate(1);
            }
            a
        })
}

fn table_text(len: u64, target: &str, args: &[String]) -> String {
    // A field that is empty or has blanks cannot be written in table text.
    let args: Vec<&str> = args
        .iter()
        .map(|a| if a.is_empty() { "''" } else { a.as_str() })
        .collect();
    format!("0 {len} {target} {}\n", args.join(" "))
}

/// Field of a table error as the target's argument index.
fn arg_of(field: Option<usize>) -> Option<usize> {
    field.and_then(|f| f.checked_sub(3))
}

/// Whether the devices of a pool line are good enough that it must build (a read_only
/// pool cannot format a blank metadata device).
fn pool_env_good(args: &[String]) -> bool {
    args.len() >= 2
        && matches!(args[0].as_str(), "meta_min" | "meta_ok")
        && args[1].starts_with("data")
        && !args.iter().any(|a| a == "read_only")
}

/// What the test knows about the pool a line meets.
#[derive(Default)]
struct PoolState<'a> {
    /// The thin ids it has.
    ids: &'a [u32],
    /// The block size of the live pool a reload meets.
    live_bs: Option<&'a str>,
    /// The devices are good: a line that validates must build.
    must_build: bool,
}

/// What may make a line that validated fail to build: its device arguments, or the state
/// of the pool.
fn allowed_build_failure(target: &str, args: &[String], arg: Option<usize>, p: &PoolState) -> bool {
    match (target, arg) {
        ("thin-pool", Some(1 | 2)) => true,
        ("thin-pool", Some(3)) => p
            .live_bs
            .is_some_and(|bs| args.get(2).map(String::as_str) != Some(bs)),
        ("thin", Some(1 | 3)) => true,
        ("thin", Some(2)) => !args[1].parse::<u32>().is_ok_and(|id| p.ids.contains(&id)),
        _ => false,
    }
}

/// Validates and builds one line both ways (direct with the raw arguments and segment
/// length, and as table text); returns the device the table built, if any.
fn exercise(
    reg: &Registry,
    env: &Env,
    (target, len, args): (&str, u64, &[String]),
    p: &PoolState,
) -> Result<Option<DeviceRef>, TestCaseError> {
    let kind = reg.get(target).expect("registered").clone();
    let resolver = |n: &str| env.open(n);
    // Direct: the raw arguments, any length.
    let valid = kind.validate(Sectors(len), args);
    let ctx = BuildCtx {
        line: 1,
        len: Sectors(len),
        resolver: &resolver,
    };
    let built = kind.build(&ctx, args);
    match (&valid, &built) {
        (Err(_), Ok(_)) => {
            return Err(TestCaseError::fail(format!(
                "{target} {args:?} (len {len}): build accepted what validate refused: {valid:?}"
            )))
        }
        (Ok(()), Err(ArgError { arg, msg })) => {
            prop_assert!(
                allowed_build_failure(target, args, *arg, p),
                "{target} {args:?} (len {len}): validated but failed to build for argument {arg:?}: {msg}"
            );
            prop_assert!(!p.must_build, "{target} {args:?}: must build: {msg}");
        }
        _ => {}
    }
    drop(built);
    // Through the table text and the registry.
    let text = table_text(len, target, args);
    let table = match Table::parse(&text, reg) {
        Ok(t) => t,
        Err(e) => {
            // The table refuses what validate refuses, or what no table can hold.
            prop_assert!(
                valid.is_err()
                    || len.checked_mul(512).is_none()
                    || args.iter().any(String::is_empty),
                "{text:?}: validate accepted, parse refused: {e}"
            );
            return Ok(None);
        }
    };
    prop_assert!(
        valid.is_ok(),
        "{text:?}: parse accepted what validate refused"
    );
    match table.build(reg, &resolver) {
        Ok(dev) => Ok(Some(dev)),
        Err(e) => {
            prop_assert!(
                allowed_build_failure(target, args, arg_of(e.field), p),
                "{text:?}: parsed but failed to build: {e}"
            );
            prop_assert!(!p.must_build, "{text:?}: must build: {e}");
            Ok(None)
        }
    }
}

fn run_case(
    pool: Vec<String>,
    pool_len: u64,
    reload: Option<Vec<String>>,
    thins: Vec<(u64, Vec<String>)>,
) -> Result<(), TestCaseError> {
    let mut reg = Registry::empty();
    thin::register(&mut reg);
    let mut env = Env::new();
    let state = PoolState {
        must_build: pool_env_good(&pool),
        ..PoolState::default()
    };
    let pdev = exercise(&reg, &env, ("thin-pool", pool_len, &pool), &state)?;
    let Some(pdev) = pdev else {
        return Ok(());
    };
    let ids: Vec<u32> = IDS.to_vec();
    for id in &ids {
        run(pdev.message(&["create_thin".to_string(), id.to_string()]))
            .map_err(|e| TestCaseError::fail(format!("create_thin {id}: {e}")))?;
    }
    // Now a reload of the same pool (same metadata device) with other arguments.
    if let Some(args) = reload {
        let state = PoolState {
            live_bs: Some(&pool[2]),
            ..PoolState::default()
        };
        let _ = exercise(&reg, &env, ("thin-pool", pool_len, &args), &state)?;
    }
    env.devs.insert("pool".into(), pdev.clone());
    for (len, args) in thins {
        let state = PoolState {
            ids: &ids,
            live_bs: None,
            must_build: args.len() == 2
                && args[0] == "pool"
                && IDS.iter().any(|i| i.to_string() == args[1]),
        };
        let t = exercise(&reg, &env, ("thin", len, &args), &state)?;
        if let Some(t) = t {
            // A thin device that built serves I/O in range and refuses it out of range.
            let mut buf = [0u8; 512];
            let size = t.size().0;
            if size >= 512 {
                read_blocking(&*t, tables::Bytes(size - 512), &mut buf)
                    .map_err(|e| TestCaseError::fail(format!("{args:?}: read: {e}")))?;
            }
            prop_assert!(read_blocking(&*t, tables::Bytes(size), &mut buf).is_err());
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn random_table_lines_build_or_fail_cleanly(
        pool in pool_args(),
        pool_len in length(),
        reload in prop::option::of(pool_args()),
        thins in prop::collection::vec((length(), thin_args()), 0..4),
    ) {
        run_case(pool, pool_len, reload, thins)?;
    }
}

/// The arguments proptest found worth keeping an eye on, run every time.
#[test]
fn hostile_lines_that_once_panicked() {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    // A feature count of usize::MAX overflowed `5 + count`.
    run_case(
        s(&["meta_ok", "data_ok", "8", "0", "18446744073709551615"]),
        2048,
        None,
        vec![],
    )
    .unwrap();
    // A segment whose byte size overflows 64 bits, given straight to the kinds.
    run_case(s(&["meta_ok", "data_ok", "8", "0"]), u64::MAX, None, vec![]).unwrap();
    run_case(
        s(&["meta_ok", "data_ok", "8", "0"]),
        2048,
        None,
        vec![(u64::MAX / 256, s(&["pool", "1"]))],
    )
    .unwrap();
}

#[test]
fn reload_with_another_block_size_names_the_block_size() {
    let mut reg = Registry::empty();
    thin::register(&mut reg);
    let env = Env::new();
    let resolver = |n: &str| env.open(n);
    let t1 = Table::parse("0 2048 thin-pool meta_ok data_ok 8 0\n", &reg).unwrap();
    let pool = t1.build(&reg, &resolver).unwrap();
    let t2 = Table::parse("0 2048 thin-pool meta_ok data_ok 16 0\n", &reg).unwrap();
    let e = t2
        .build(&reg, &resolver)
        .err()
        .expect("the live pool has 8-sector blocks");
    assert_eq!(e.field, Some(3 + 3), "{e}");
    assert!(e.msg.contains("8 sectors"), "{e}");
    drop(pool);
}
