//! Random valid tables: parse, print, parse again gives the same table; printing is stable.

mod common;

use proptest::prelude::*;
use tables::table::Table;
use tables::Sectors;

/// A number, sometimes written with leading zeros (normalization drops them).
fn num(v: u64) -> impl Strategy<Value = String> {
    (0usize..3).prop_map(move |z| format!("{}{v}", "0".repeat(if z == 2 { 2 } else { 0 })))
}

fn dev() -> impl Strategy<Value = String> {
    prop_oneof![
        (0u32..16, 0u32..64).prop_map(|(a, b)| format!("{a}:{b}")),
        "[a-z]{1,6}".prop_map(|s| format!("/dev/{s}")),
        "[a-z][a-z0-9_-]{0,8}",
    ]
}

/// (length in units, target args) for one segment; the length is fixed by the caller's
/// multiplier so striped lines stay divisible.
fn segment(len: u64) -> impl Strategy<Value = (String, Vec<String>)> {
    let linear = (dev(), 0u64..1_000_000).prop_flat_map(|(d, o)| {
        num(o).prop_map(move |o| ("linear".to_string(), vec![d.clone(), o]))
    });
    let striped = (1u64..5, 3u32..9).prop_flat_map(move |(n, sh)| {
        let legs = proptest::collection::vec((dev(), 0u64..10_000), n as usize);
        (Just(n), Just(1u64 << sh), legs).prop_map(|(n, c, legs)| {
            let mut a = vec![n.to_string(), c.to_string()];
            for (d, o) in legs {
                a.push(d);
                a.push(o.to_string());
            }
            ("striped".to_string(), a)
        })
    });
    let flakey = (
        dev(),
        0u64..1000,
        0u32..100,
        1u32..100,
        proptest::option::of(prop_oneof![
            Just(vec!["drop_writes".to_string()]),
            Just(vec!["ERROR_WRITES".to_string(), "error_reads".to_string()]),
            (1u32..4096, 0u32..256).prop_map(|(n, v)| vec![
                "corrupt_bio_byte".into(),
                n.to_string(),
                "r".into(),
                v.to_string(),
                "0".into()
            ]),
            (0u32..=1_000_000_000, 0u32..=1_000_000_000).prop_map(|(a, b)| vec![
                "random_write_corrupt".into(),
                a.to_string(),
                "random_read_corrupt".into(),
                b.to_string()
            ]),
        ]),
    )
        .prop_map(|(d, o, up, down, f)| {
            let mut a = vec![d, o.to_string(), up.to_string(), down.to_string()];
            if let Some(f) = f {
                a.push(f.len().to_string());
                a.extend(f);
            }
            ("flakey".to_string(), a)
        });
    let delay = (proptest::collection::vec((dev(), 0u64..1000, 0u32..1000), 1..4)).prop_map(|cl| {
        let mut a = Vec::new();
        for (d, o, ms) in cl {
            a.push(d);
            a.push(format!("0{o}"));
            a.push(ms.to_string());
        }
        ("delay".to_string(), a)
    });
    let _ = len;
    prop_oneof![
        linear,
        striped,
        flakey,
        delay,
        Just(("zero".to_string(), vec![])),
        Just(("error".to_string(), vec![])),
    ]
}

/// Table text with one segment per line (lengths are multiples of 4 × 256 sectors so any
/// striped line divides), separated by random whitespace.
fn table_text() -> impl Strategy<Value = String> {
    proptest::collection::vec((1u64..50, segment(0), "[ \t]{1,3}"), 1..8).prop_map(|segs| {
        let mut text = String::new();
        let mut start = 0u64;
        for (units, (target, args), ws) in segs {
            // 4 stripes × 256 chunk, times 3 so 3-stripe lines divide too.
            let len = units * 4 * 256 * 3;
            text.push_str(&format!("{start}{ws}{len}{ws}{target}"));
            for a in args {
                text.push_str(&ws);
                text.push_str(&a);
            }
            text.push('\n');
            start += len;
        }
        text
    })
}

proptest! {
    #![proptest_config(common::config(200))]

    #[test]
    fn print_parse_round_trip(text in table_text()) {
        let reg = common::registry();
        let t = Table::parse(&text, &reg).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        let printed = t.to_string();
        let again = Table::parse(&printed, &reg).map_err(|e| TestCaseError::fail(format!("{e}\n{printed}")))?;
        prop_assert_eq!(&again, &t);
        prop_assert_eq!(again.to_string(), printed);
        let total: u64 = t.segments.iter().map(|s| s.len.0).sum();
        prop_assert_eq!(t.size(), Sectors(total));
    }

    #[test]
    fn comments_and_blank_lines_do_not_change_the_table(text in table_text(), c in "[ -~]{0,20}") {
        let reg = common::registry();
        let t = Table::parse(&text, &reg).unwrap();
        let mut noisy = format!("# {c}\n\n");
        for l in text.lines() {
            noisy.push_str(&format!("  {l}   #{c}\n\t\n"));
        }
        let n = Table::parse(&noisy, &reg).map_err(|e| TestCaseError::fail(format!("{e}\n{noisy}")))?;
        prop_assert_eq!(n.to_string(), t.to_string());
        // Line numbers follow the text.
        for (i, s) in n.segments.iter().enumerate() {
            prop_assert_eq!(s.line, 3 + 2 * i);
        }
    }

    #[test]
    fn parse_never_panics(text in "[0-9a-z :#\t\n-]{0,200}") {
        let reg = common::registry();
        let _ = Table::parse(&text, &reg);
    }

    #[test]
    fn parse_never_panics_on_mutated_valid_tables(text in table_text(), pos in any::<usize>(), b in any::<u8>()) {
        let reg = common::registry();
        let mut bytes = text.into_bytes();
        let i = pos % bytes.len();
        bytes[i] = b;
        let s = String::from_utf8_lossy(&bytes);
        if let Ok(t) = Table::parse(&s, &reg) {
            // Whatever parses must round-trip too.
            let again = Table::parse(&t.to_string(), &reg).unwrap();
            prop_assert_eq!(again.to_string(), t.to_string());
        }
    }
}

#[test]
fn devices_lists_every_device_argument_and_map_devices_rewrites_only_those() {
    let reg = tables::targets::builtin_registry();
    let text = "0 100 linear a 0\n\
                100 208 striped 2 8 b 0 c 16\n\
                308 10 zero\n\
                318 10 flakey d 0 1 1\n\
                328 10 delay e 0 5 f 0 0 g 0 1\n";
    let mut t = tables::table::Table::parse(text, &reg).unwrap();
    let names: Vec<(usize, usize, String)> = t
        .devices(&reg)
        .into_iter()
        .map(|d| (d.line, d.arg, d.name))
        .collect();
    let want: Vec<(usize, usize, String)> = [
        (1, 0, "a"),
        (2, 2, "b"),
        (2, 4, "c"),
        (4, 0, "d"),
        (5, 0, "e"),
        (5, 3, "f"),
        (5, 6, "g"),
    ]
    .into_iter()
    .map(|(l, a, n)| (l, a, n.to_string()))
    .collect();
    assert_eq!(names, want);
    t.map_devices(&reg, |d| Ok::<_, ()>(format!("/abs/{d}")))
        .unwrap();
    assert_eq!(
        t.to_string(),
        "0 100 linear /abs/a 0\n\
         100 208 striped 2 8 /abs/b 0 /abs/c 16\n\
         308 10 zero\n\
         318 10 flakey /abs/d 0 1 1 2 error_reads error_writes\n\
         328 10 delay /abs/e 0 5 /abs/f 0 0 /abs/g 0 1\n"
    );
}
