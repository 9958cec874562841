//! thin_dump's XML format (`thin::xml`): random dumps round trip through the XML, other
//! spellings of the same metadata read to the same canonical dump, the text is what
//! thin_dump 0.9 writes, and hostile documents are refused naming line, element and
//! attribute. (The real thin-provisioning-tools are exercised in the e2e tests.)

mod common;

use std::collections::BTreeMap;

use common::*;
use proptest::prelude::*;
use tables::DeviceRef;
use thin::disk::superblock::vblock_limit;
use thin::tools::{self, Dump, DumpDevice, DumpRun};
use thin::xml::{from_xml, to_xml, XmlError, XmlErrorKind};
use thin::{DataBlock, ThinId, VBlock};

/// Maximal runs of a device's mappings (as `tools::dump` makes them).
fn runs_of(maps: &BTreeMap<u64, u64>) -> Vec<DumpRun> {
    let mut out: Vec<DumpRun> = Vec::new();
    for (&v, &d) in maps {
        match out.last_mut() {
            Some(r) if r.vblock.0 + r.len == v && r.dblock.0 + r.len == d => r.len += 1,
            _ => out.push(DumpRun {
                vblock: VBlock(v),
                dblock: DataBlock(d),
                len: 1,
            }),
        }
    }
    out
}

/// A canonical dump: devices by id, runs maximal and in order, counts right. Runs are
/// generated as (start, data, length) pieces, block by block into a map (later pieces
/// overwrite), some near the top of the virtual address space.
fn arb_dump() -> impl Strategy<Value = Dump> {
    let dbs = prop::sample::select(vec![8u32, 128, 256, 2048, 2_097_152]);
    (dbs, 1u64..5000, any::<u64>()).prop_flat_map(|(dbs, nr, tid)| {
        let vmax = vblock_limit(dbs);
        let piece = (
            prop_oneof![0u64..10_000, (vmax - 100)..(vmax - 64)],
            0..nr,
            1u64..64,
        );
        let dev = (any::<u32>(), prop::collection::vec(piece, 0..12));
        prop::collection::vec(dev, 0..6).prop_map(move |devs| {
            let mut by_id: BTreeMap<u32, BTreeMap<u64, u64>> = BTreeMap::new();
            for (id, pieces) in devs {
                let m = by_id.entry(id).or_default();
                for (v, d, len) in pieces {
                    let len = len.min(nr - d);
                    for i in 0..len {
                        m.insert(v + i, d + i);
                    }
                }
            }
            Dump {
                version: 1,
                data_block_sectors: dbs,
                nr_data_blocks: nr,
                transaction_id: tid,
                devices: by_id
                    .into_iter()
                    .map(|(id, m)| DumpDevice {
                        id: ThinId(id),
                        mapped_blocks: m.len() as u64,
                        mappings: runs_of(&m),
                    })
                    .collect(),
            }
        })
    })
}

proptest! {
    #[test]
    fn random_dumps_round_trip(d in arb_dump()) {
        let xml = to_xml(&d);
        let back = from_xml(&xml).map_err(|e| TestCaseError::fail(format!("{e}\n{xml}")))?;
        prop_assert_eq!(back, d);
    }

    /// Devices and mappings in any order, runs cut into pieces, both element spellings:
    /// the same canonical dump.
    #[test]
    fn other_spellings_read_canonical(d in arb_dump(), seed in any::<u64>()) {
        let mut s = seed;
        let mut devs = d.devices.clone();
        shuffle(&mut devs, &mut s);
        let mut xml = format!(
            "<?xml version=\"1.0\"?>\n<!-- from somewhere -->\n<superblock nr_data_blocks=\"{}\" data_block_size=\"{}\" transaction=\"{}\" time=\"7\" uuid=\"x &amp; y\">",
            d.nr_data_blocks, d.data_block_sectors, d.transaction_id
        );
        for dev in &devs {
            let mut pieces = Vec::new();
            for r in &dev.mappings {
                // Cut each run at a random point (a single block as a single_mapping).
                let cut = if r.len > 1 { 1 + rng(&mut s) % (r.len - 1) } else { r.len };
                pieces.push((r.vblock.0, r.dblock.0, cut));
                if cut < r.len {
                    pieces.push((r.vblock.0 + cut, r.dblock.0 + cut, r.len - cut));
                }
            }
            shuffle(&mut pieces, &mut s);
            xml += &format!(
                "<device snap_time=\"3\" creation_time=\"2\" transaction=\"1\" mapped_blocks=\"{}\" dev_id=\"{}\">",
                dev.mapped_blocks, dev.id.0
            );
            for (v, b, len) in pieces {
                if len == 1 && rng(&mut s).is_multiple_of(2) {
                    xml += &format!("<single_mapping time=\"9\" data_block=\"{b}\" origin_block=\"{v}\"></single_mapping>\n");
                } else {
                    xml += &format!("\t<range_mapping time=\"0\" length=\"{len}\" data_begin=\"{b}\" origin_begin=\"{v}\"/>");
                }
            }
            xml += "</device>";
        }
        xml += "</superblock>\n";
        let back = from_xml(&xml).map_err(|e| TestCaseError::fail(format!("{e}\n{xml}")))?;
        prop_assert_eq!(back, d);
    }
}

fn shuffle<T>(v: &mut [T], s: &mut u64) {
    for i in (1..v.len()).rev() {
        let j = (rng(s) % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

/// The text thin_dump 0.9 wrote for the same metadata (restored with thin_restore from a
/// hand-written file, then dumped).
const THIN_DUMP_TEXT: &str = r#"<superblock uuid="" time="0" transaction="1" flags="0" version="2" data_block_size="128" nr_data_blocks="1000">
  <device dev_id="1" mapped_blocks="5" transaction="0" creation_time="0" snap_time="0">
    <range_mapping origin_begin="0" data_begin="10" length="3" time="0"/>
    <single_mapping origin_block="7" data_block="999" time="0"/>
    <single_mapping origin_block="100" data_block="500" time="0"/>
  </device>
  <device dev_id="5" mapped_blocks="0" transaction="0" creation_time="0" snap_time="0">
  </device>
</superblock>
"#;

#[test]
fn writes_what_thin_dump_writes() {
    let d = from_xml(THIN_DUMP_TEXT).unwrap();
    assert_eq!(d.transaction_id, 1);
    assert_eq!(d.data_block_sectors, 128);
    assert_eq!(d.nr_data_blocks, 1000);
    assert_eq!(d.devices.len(), 2);
    assert_eq!(
        d.devices[0].mappings,
        vec![
            DumpRun {
                vblock: VBlock(0),
                dblock: DataBlock(10),
                len: 3
            },
            DumpRun {
                vblock: VBlock(7),
                dblock: DataBlock(999),
                len: 1
            },
            DumpRun {
                vblock: VBlock(100),
                dblock: DataBlock(500),
                len: 1
            },
        ]
    );
    assert_eq!(to_xml(&d), THIN_DUMP_TEXT);
}

/// XML → restore → dump gives the same dump; the restored metadata checks clean.
#[test]
fn restored_metadata_dumps_the_same() {
    let mut xml = String::from(
        r#"<superblock uuid="" time="4" transaction="42" flags="0" version="2" data_block_size="128" nr_data_blocks="4096">
  <device dev_id="3" mapped_blocks="1003" transaction="1" creation_time="1" snap_time="2">
    <range_mapping origin_begin="0" data_begin="0" length="1000" time="1"/>
    <single_mapping origin_block="5000" data_block="7" time="2"/>
    <single_mapping origin_block="5001" data_block="7" time="2"/>
    <single_mapping origin_block="1000" data_block="1000" time="2"/>
  </device>
"#,
    );
    // A snapshot sharing most blocks, and a device with a leaf's worth of singles.
    xml += r#"  <device dev_id="4" mapped_blocks="1000" transaction="1" creation_time="1" snap_time="2">
    <range_mapping origin_begin="0" data_begin="0" length="1000" time="1"/>
  </device>
  <device dev_id="9" mapped_blocks="600" transaction="1" creation_time="1" snap_time="2">
"#;
    for i in 0..600u64 {
        xml += &format!(
            "    <single_mapping origin_block=\"{}\" data_block=\"{}\" time=\"0\"/>\n",
            i * 3,
            4095 - i
        );
    }
    xml += "  </device>\n</superblock>\n";
    let d = from_xml(&xml).unwrap();
    let meta = mem("meta", 4 * MIB);
    let m: DeviceRef = meta.clone();
    run(tools::restore(&d, &m)).unwrap();
    let r = run(tools::check(&m)).unwrap();
    assert!(r.clean, "{:?}", r.errors);
    assert_eq!(r.mapped_blocks, 1003 + 1000 + 600);
    // Blocks 0..1000 are shared by devices 3 and 4, block 7 twice within device 3.
    assert_eq!(r.data_used, 1001 + 600);
    assert_eq!(run(tools::dump(&m)).unwrap(), d);
}

/// `xml` must be refused; returns the error.
fn refuse(xml: &str) -> XmlError {
    match from_xml(xml) {
        Ok(d) => panic!("accepted {xml:?} as {d:?}"),
        Err(e) => {
            // Every message is short however long the file's names and values are.
            assert!(e.to_string().len() < 400, "long message: {e}");
            e
        }
    }
}

const SB: &str = r#"<superblock uuid="" time="0" transaction="1" flags="0" version="2" data_block_size="128" nr_data_blocks="1000">"#;
const DEV: &str =
    r#"<device dev_id="1" mapped_blocks="1" transaction="0" creation_time="0" snap_time="0">"#;

/// A document with `inner` in device 1 (which states 1 mapped block).
fn in_device(inner: &str) -> String {
    format!("{SB}\n{DEV}\n{inner}\n</device>\n</superblock>\n")
}

fn bad_value(e: &XmlError) -> (&'static str, &'static str) {
    match &e.kind {
        XmlErrorKind::BadValue {
            element, attribute, ..
        } => (element, attribute),
        k => panic!("not a bad value: {k:?} ({e})"),
    }
}

#[test]
fn refuses_hostile_numbers_naming_line_element_attribute() {
    let single = |v: &str, d: &str| {
        in_device(&format!(
            r#"<single_mapping origin_block="{v}" data_block="{d}" time="0"/>"#
        ))
    };
    for bad in [
        "-1",
        "+1",
        "1e3",
        "",
        "0x10",
        " 1",
        "18446744073709551616",
        "&#49;",
    ] {
        let e = refuse(&single(bad, "1"));
        assert_eq!((e.line, e.column), (3, 1), "{e}");
        assert_eq!(bad_value(&e), ("single_mapping", "origin_block"), "{e}");
        assert!(e.to_string().contains("not a decimal number"), "{e}");
    }
    // Data blocks beyond the pool.
    let e = refuse(&single("0", "1000"));
    assert_eq!(bad_value(&e), ("single_mapping", "data_block"));
    assert!(e.to_string().contains("1000 data blocks"), "{e}");
    // Huge and empty lengths, runs past the pool or the virtual address space.
    let range = |v: u64, d: u64, len: &str| {
        format!(r#"<range_mapping origin_begin="{v}" data_begin="{d}" length="{len}" time="0"/>"#)
    };
    for (v, d, len, attr) in [
        (0, 0, "18446744073709551615".to_string(), "length"),
        (0, 999, "2".to_string(), "length"),
        (0, 0, "1001".to_string(), "length"),
        (0, 5, "0".to_string(), "length"),
        (u64::MAX, 0, "2".to_string(), "length"),
        (vblock_limit(128) - 1, 0, "2".to_string(), "length"),
        (0, u64::MAX, "2".to_string(), "data_begin"),
    ] {
        let e = refuse(&in_device(&range(v, d, &len)));
        assert_eq!(e.line, 3, "{e}");
        assert_eq!(bad_value(&e), ("range_mapping", attr), "{v} {d} {len}: {e}");
    }
    let e = refuse(&single(&vblock_limit(128).to_string(), "0"));
    assert_eq!(bad_value(&e), ("single_mapping", "origin_block"), "{e}");
    // Superblock values.
    for (attr, val) in [
        ("data_block_size", "0"),
        ("data_block_size", "100"),
        ("data_block_size", "192"),
        ("data_block_size", "4"),
        ("data_block_size", "4194304"),
        ("data_block_size", "4294967296"),
        ("nr_data_blocks", "4294967297"),
        ("version", "3"),
        ("version", "0"),
        ("transaction", "-5"),
        ("time", "x"),
        ("flags", "99999999999"),
    ] {
        let sb = SB.replace(
            &format!(
                "{attr}=\"{}",
                SB.split(&format!("{attr}=\""))
                    .nth(1)
                    .unwrap()
                    .split('"')
                    .next()
                    .unwrap()
            ),
            &format!("{attr}=\"{val}"),
        );
        assert!(sb.contains(&format!("{attr}=\"{val}\"")), "{sb}");
        let e = refuse(&format!("\n{sb}</superblock>"));
        assert_eq!((e.line, e.column), (2, 1), "{e}");
        assert_eq!(bad_value(&e), ("superblock", attr), "{attr}={val}: {e}");
    }
    // A megabyte-long value is quoted shortened (checked in `refuse`).
    let e = refuse(&single(&"9".repeat(1 << 20), "0"));
    assert_eq!(bad_value(&e), ("single_mapping", "origin_block"));
}

#[test]
fn refuses_overlaps_duplicates_and_wrong_counts() {
    // Overlap in file order 2, 1: reported at the later line, naming the other.
    let dev2 = DEV.replace("mapped_blocks=\"1\"", "mapped_blocks=\"8\"");
    let xml = format!(
        "{SB}\n{dev2}\n<range_mapping origin_begin=\"10\" data_begin=\"0\" length=\"5\" time=\"0\"/>\n<range_mapping origin_begin=\"12\" data_begin=\"100\" length=\"3\" time=\"0\"/>\n</device>\n</superblock>"
    );
    let e = refuse(&xml);
    assert_eq!(
        e.kind,
        XmlErrorKind::Overlap {
            dev_id: 1,
            vblock: 12,
            other_line: 3
        },
        "{e}"
    );
    assert_eq!(e.line, 4, "{e}");
    let xml = format!(
        "{SB}\n{dev2}\n<range_mapping origin_begin=\"12\" data_begin=\"100\" length=\"3\" time=\"0\"/>\n<range_mapping origin_begin=\"10\" data_begin=\"0\" length=\"5\" time=\"0\"/>\n</device>\n</superblock>"
    );
    let e = refuse(&xml);
    assert!(
        matches!(
            e.kind,
            XmlErrorKind::Overlap {
                vblock: 12,
                other_line: 4,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(e.line, 4, "{e}");
    // The same virtual block twice as singles.
    let e = refuse(&in_device(
        "<single_mapping origin_block=\"3\" data_block=\"1\" time=\"0\"/>\n<single_mapping origin_block=\"3\" data_block=\"2\" time=\"0\"/>",
    ));
    assert!(
        matches!(e.kind, XmlErrorKind::Overlap { vblock: 3, .. }),
        "{e}"
    );
    // Two devices with one id.
    let xml = format!("{SB}\n{DEV}\n<single_mapping origin_block=\"3\" data_block=\"1\" time=\"0\"/>\n</device>\n  {DEV}</device>\n</superblock>");
    let e = refuse(&xml);
    assert_eq!(
        e.kind,
        XmlErrorKind::DuplicateDevice {
            dev_id: 1,
            first_line: 2
        }
    );
    assert_eq!((e.line, e.column), (5, 3), "{e}");
    // mapped_blocks says 1, the mappings cover 0 or 2.
    for inner in [
        "",
        "<range_mapping origin_begin=\"0\" data_begin=\"0\" length=\"2\" time=\"0\"/>",
    ] {
        let e = refuse(&in_device(inner));
        assert!(
            matches!(
                e.kind,
                XmlErrorKind::MappedCount {
                    dev_id: 1,
                    stated: 1,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(e.line, 2, "{e}");
    }
}

/// What a refusal must say.
type Expect = Box<dyn Fn(&XmlErrorKind) -> bool>;

#[test]
fn refuses_unknown_misplaced_and_missing() {
    let map = r#"<single_mapping origin_block="0" data_block="0" time="0"/>"#;
    let cases: Vec<(String, u64, Expect)> = vec![
        (
            in_device("<foo/>"),
            3,
            Box::new(|k| matches!(k, XmlErrorKind::UnknownElement(n) if n == "foo")),
        ),
        (
            in_device(r#"<ref name="1"/>"#),
            3,
            Box::new(|k| matches!(k, XmlErrorKind::SharedSubtree(n) if n == "ref")),
        ),
        (
            format!("{SB}\n<def name=\"0\"></def>\n</superblock>"),
            2,
            Box::new(|k| matches!(k, XmlErrorKind::SharedSubtree(n) if n == "def")),
        ),
        (
            in_device(r#"<single_mapping origin_block="0" data_block="0" time="0" color="red"/>"#),
            3,
            Box::new(|k| {
                matches!(k, XmlErrorKind::UnknownAttribute { element: "single_mapping", attribute } if attribute == "color")
            }),
        ),
        (
            in_device(r#"<single_mapping origin_block="0" data_block="0"/>"#),
            3,
            Box::new(|k| {
                matches!(k, XmlErrorKind::MissingAttribute { element: "single_mapping", attribute: "time" })
            }),
        ),
        (
            in_device(r#"<range_mapping origin_begin="0" data_begin="0" time="0"/>"#),
            3,
            Box::new(|k| {
                matches!(k, XmlErrorKind::MissingAttribute { element: "range_mapping", attribute: "length" })
            }),
        ),
        (
            format!("{SB}\n<device dev_id=\"1\" mapped_blocks=\"0\" transaction=\"0\" creation_time=\"0\"/></superblock>"),
            2,
            Box::new(|k| {
                matches!(k, XmlErrorKind::MissingAttribute { element: "device", attribute: "snap_time" })
            }),
        ),
        (
            "<superblock time=\"0\" transaction=\"1\" data_block_size=\"128\" nr_data_blocks=\"1\"/>".into(),
            1,
            Box::new(|k| {
                matches!(k, XmlErrorKind::MissingAttribute { element: "superblock", attribute: "uuid" })
            }),
        ),
        (
            format!("{SB}\n{map}\n</superblock>"),
            2,
            Box::new(|k| matches!(k, XmlErrorKind::Misplaced { element: "single_mapping", place } if place == "inside <superblock>")),
        ),
        (
            format!("{DEV}</device>"),
            1,
            Box::new(|k| matches!(k, XmlErrorKind::Misplaced { element: "device", place } if place == "outside <superblock>")),
        ),
        (
            in_device(&format!("{SB}</superblock>")),
            3,
            Box::new(|k| matches!(k, XmlErrorKind::Misplaced { element: "superblock", .. })),
        ),
        (
            in_device(&format!("<single_mapping origin_block=\"0\" data_block=\"0\" time=\"0\">{map}</single_mapping>")),
            3,
            Box::new(|k| matches!(k, XmlErrorKind::Misplaced { element: "single_mapping", place } if place == "inside <single_mapping>")),
        ),
        (
            format!("{SB}</superblock>\n{SB}</superblock>"),
            2,
            Box::new(|k| matches!(k, XmlErrorKind::Misplaced { element: "superblock", .. })),
        ),
        (
            format!("{SB}\n  {DEV}\n"),
            3,
            Box::new(|k| matches!(k, XmlErrorKind::Unterminated("device"))),
        ),
        (
            "\n\n".into(),
            3,
            Box::new(|k| matches!(k, XmlErrorKind::NoSuperblock)),
        ),
        (
            "<!DOCTYPE lol [<!ENTITY a \"aaaaaaaa\"><!ENTITY b \"&a;&a;&a;&a;\">]>\n<superblock/>".into(),
            1,
            Box::new(|k| matches!(k, XmlErrorKind::Markup("a DOCTYPE"))),
        ),
        (
            format!("{SB}\n<?php evil() ?></superblock>"),
            2,
            Box::new(|k| matches!(k, XmlErrorKind::Markup(_))),
        ),
        (
            format!("{SB}\n<![CDATA[x]]></superblock>"),
            2,
            Box::new(|k| matches!(k, XmlErrorKind::Markup("CDATA"))),
        ),
        (
            in_device(&format!("{map} some words")),
            3,
            Box::new(|k| matches!(k, XmlErrorKind::Text(t) if t == "some words")),
        ),
        (
            in_device("&lt;"),
            3,
            Box::new(|k| matches!(k, XmlErrorKind::Text(_))),
        ),
        (
            in_device("</superblock>"),
            3,
            Box::new(|k| matches!(k, XmlErrorKind::Syntax(_))),
        ),
        (
            format!("{SB}\n<device dev_id=\"1\" dev_id=\"2\" mapped_blocks=\"0\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\"/></superblock>"),
            2,
            Box::new(|k| matches!(k, XmlErrorKind::Syntax(_))),
        ),
        (
            format!("{SB}\n<device dev_id=\"1></superblock>"),
            2,
            Box::new(|k| matches!(k, XmlErrorKind::Syntax(_))),
        ),
    ];
    for (xml, line, ok) in cases {
        let e = refuse(&xml);
        assert!(ok(&e.kind), "{xml:?}: wrong error {e}");
        assert_eq!(e.line, line, "{xml:?}: {e}");
    }
    // Deep nesting of unknown elements stops at the first one.
    let deep = format!("{SB}{}", "<a>".repeat(100_000));
    let e = refuse(&deep);
    assert!(matches!(e.kind, XmlErrorKind::UnknownElement(_)), "{e}");
}

/// A device with no mappings, written empty either way; a held metadata snapshot and other
/// optional attributes are read and dropped.
#[test]
fn optional_and_dropped_attributes() {
    let xml = r#"<superblock uuid="abc" time="12" transaction="0" data_block_size="8" nr_data_blocks="0" metadata_snap="77">
  <device dev_id="4294967295" mapped_blocks="0" transaction="3" creation_time="5" snap_time="6"/>
</superblock>"#;
    let d = from_xml(xml).unwrap();
    assert_eq!(d.devices.len(), 1);
    assert_eq!(d.devices[0].id, ThinId(u32::MAX));
    assert!(d.devices[0].mappings.is_empty());
    let out = to_xml(&d);
    assert!(out.starts_with(r#"<superblock uuid="" time="0" transaction="0" flags="0" version="2" data_block_size="8" nr_data_blocks="0">"#), "{out}");
    assert!(out.contains(r#"<device dev_id="4294967295" mapped_blocks="0" transaction="0" creation_time="0" snap_time="0">"#), "{out}");
    // A byte order mark is skipped.
    assert_eq!(from_xml(&format!("\u{feff}{xml}")).unwrap(), d);
}
