//! Random and hostile table lines for the built-in targets are *built*, not only parsed: any
//! outcome is a device or an error, never a panic; a line that parses builds over devices that
//! are large enough (so `validate` saw every argument problem); and a built device answers
//! I/O at its edges without panicking.

mod common;

use common::Devices;
use proptest::prelude::*;
use tables::io::{read_blocking, write_blocking};
use tables::table::Table;
use tables::{Bytes, WriteFlags};

/// Mostly plausible numbers (so lines parse and build), sometimes ones that find overflows:
/// powers of two, just below them, huge, or not numbers at all.
fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop::sample::select(vec![0u64, 1, 2, 3, 8, 16, 64, 128, 1024, 2048, 65536])
            .prop_map(|n| n.to_string()),
        3 => (0u32..64).prop_map(|s| (1u64 << s).to_string()),
        1 => (1u32..64).prop_map(|s| ((1u64 << s) - 1).to_string()),
        1 => prop::sample::select(vec![
            u64::MAX.to_string(),
            (u64::MAX / 512).to_string(),
            "18446744073709551616".to_string(),
            "-1".to_string(),
            "0x10".to_string(),
        ]),
    ]
}

fn device() -> impl Strategy<Value = String> {
    prop_oneof![Just("big".to_string()), Just("small".to_string())]
}

/// The argument list of one of the built-in targets (or a wrong one).
fn args(target: &'static str) -> BoxedStrategy<Vec<String>> {
    match target {
        "linear" => (device(), number()).prop_map(|(d, o)| vec![d, o]).boxed(),
        "striped" => (
            number(),
            number(),
            prop::collection::vec((device(), number()), 0..5),
        )
            .prop_map(|(n, c, legs)| {
                let mut v = vec![n, c];
                for (d, o) in legs {
                    v.push(d);
                    v.push(o);
                }
                v
            })
            .boxed(),
        "flakey" => (
            device(),
            number(),
            number(),
            number(),
            prop::collection::vec(
                prop_oneof![
                    Just("drop_writes".to_string()),
                    Just("error_writes".to_string()),
                    Just("error_reads".to_string()),
                    Just("corrupt_bio_byte".to_string()),
                    Just("random_read_corrupt".to_string()),
                    Just("r".to_string()),
                    Just("w".to_string()),
                    number(),
                ],
                0..7,
            ),
        )
            .prop_map(|(d, o, up, down, feats)| {
                let mut v = vec![d, o, up, down, feats.len().to_string()];
                v.extend(feats);
                v
            })
            .boxed(),
        // Delays stay short (a valid 49-day delay would only make the test wait).
        "delay" => prop::collection::vec(
            (device(), number(), (0u32..3).prop_map(|m| m.to_string())),
            1..4,
        )
        .prop_map(|cls| cls.into_iter().flat_map(|(d, o, ms)| [d, o, ms]).collect())
        .boxed(),
        _ => prop::collection::vec(number(), 0..2).boxed(),
    }
}

fn line() -> impl Strategy<Value = (String, String, Vec<String>)> {
    prop_oneof![
        Just("linear"),
        Just("striped"),
        Just("flakey"),
        Just("delay"),
        Just("zero"),
        Just("error"),
    ]
    .prop_flat_map(|t| (number(), Just(t.to_string()), args(t)))
}

/// Big enough for any table that parses (sparse: nothing is allocated until written).
const BIG: u64 = 1 << 62;

proptest! {
    #![proptest_config(ProptestConfig { cases: 10000, ..ProptestConfig::default() })]

    #[test]
    fn built_in_lines_build_or_fail_cleanly((len, target, a) in line()) {
        let mut d = Devices::default();
        d.mem("big", BIG);
        d.mem("small", 64 << 10);
        let text = format!("0 {len} {target} {}\n", a.join(" "));
        let reg = common::registry();
        let Ok(t) = Table::parse(&text, &reg) else {
            return Ok(());
        };
        let uses_small = t.devices(&reg).iter().any(|x| x.name == "small");
        let resolver = d.resolver();
        let built = t.build(&reg, &resolver);
        match built {
            Ok(dev) => {
                // I/O at both edges of the device, and one past it, never panics.
                let size = dev.size().0;
                let mut buf = vec![0u8; 4096];
                let last = size.saturating_sub(4096);
                for off in [0, last, size] {
                    let _ = read_blocking(&*dev, Bytes(off), &mut buf);
                    let _ = write_blocking(&*dev, Bytes(off), &buf, WriteFlags::default());
                }
                let _ = futures::executor::block_on(dev.flush());
                let _ = futures::executor::block_on(dev.discard(Bytes(last), Bytes(size - last)));
            }
            Err(e) => {
                // Only a device's size may stop a line that parsed: everything about the
                // arguments alone was `validate`'s to refuse.
                let msg = e.to_string();
                prop_assert!(msg.contains("is too small"), "parsed but did not build: {text}: {e}");
                prop_assert!(uses_small || msg.contains("'big'"), "{text}: {e}");
            }
        }
    }
}
