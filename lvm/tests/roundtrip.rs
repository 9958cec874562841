//! Property tests of every format this crate writes, each read back to what was written:
//! random VGs (PVs, LVs, striped and unknown segments, unknown keys at every level) through
//! the text in both layouts; random config trees (odd keys and strings) through the writer
//! and parser; labels and metadata area headers through their sectors; and the metadata
//! ring: random text sizes written one after another (wrapping around its end), where each
//! new copy must read back whole and must never touch the committed copy before it.

use std::sync::Arc;

use lvm::label::{DiskArea, Label, PvExtension};
use lvm::mda::{self, MdaHeader, RawLocn, MDA_HEADER_SIZE};
use lvm::model::{Area, Flags, Metadata};
use lvm::text::{self, Item, Section, Style, Value};
use lvm::{Extents, LogicalVolume, PhysicalVolume, Segment, SegmentKind, Uuid, VolumeGroup};
use proptest::prelude::*;
use tables::mem::MemDevice;
use tables::{Bytes, DeviceRef, Sectors};

fn uuid() -> impl Strategy<Value = Uuid> {
    const A: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ!#";
    proptest::array::uniform32(0usize..64).prop_map(|idx| {
        let raw: [u8; 32] = idx.map(|i| A[i]);
        Uuid::from_raw(&raw).unwrap()
    })
}

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::Int),
        // Any text without NUL: quotes, backslashes, newlines, '#', braces, unicode.
        "[^\u{0}]{0,12}".prop_map(Value::Str),
        (any::<u16>(), any::<u16>(), any::<bool>())
            .prop_map(|(a, b, neg)| Value::Float(format!("{}{a}.{b}", if neg { "-" } else { "" }))),
    ]
}

fn item(depth: u32) -> BoxedStrategy<Item> {
    let leaf = prop_oneof![
        scalar().prop_map(Item::Value),
        proptest::collection::vec(scalar(), 0..4).prop_map(Item::Array),
    ];
    if depth == 0 {
        return leaf.boxed();
    }
    prop_oneof![
        3 => leaf,
        1 => section(depth - 1).prop_map(Item::Section),
    ]
    .boxed()
}

/// Keys: anything without '/' or NUL, so quoting is exercised.
fn any_key() -> impl Strategy<Value = String> {
    "[^/\u{0}]{1,8}"
}

fn section(depth: u32) -> BoxedStrategy<Section> {
    proptest::collection::vec((any_key(), item(depth)), 0..5)
        .prop_map(|entries| Section { entries })
        .boxed()
}

/// Unknown entries for a typed level: keys no typed field uses.
fn extra(sections: bool) -> BoxedStrategy<Vec<(String, Item)>> {
    let it = if sections { item(2) } else { item(0) };
    proptest::collection::vec(("x_[a-z]{1,6}", it), 0..3).boxed()
}

fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9+_][a-zA-Z0-9+_.-]{0,10}"
}

fn flags() -> impl Strategy<Value = Flags> {
    proptest::collection::vec(
        prop_oneof![
            Just("READ".to_string()),
            Just("WRITE".to_string()),
            Just("VISIBLE".to_string()),
            "[A-Z_]{1,10}"
        ],
        0..4,
    )
    .prop_map(Flags)
}

/// A segment plan: how many stripes and extents, or an unknown type.
#[derive(Clone, Debug)]
enum SegPlan {
    Striped {
        stripes: Vec<usize>,
        per: u32,
        size: u64,
    },
    Other {
        segtype: String,
    },
}

fn seg_plan() -> impl Strategy<Value = (SegPlan, u32, Vec<(String, Item)>)> {
    let striped = (
        proptest::collection::vec(0usize..4, 1..4),
        1u32..20,
        1u64..2048,
    )
        .prop_map(|(stripes, per, size)| SegPlan::Striped { stripes, per, size });
    let other = prop_oneof![
        Just("raid1".to_string()),
        Just("thin-pool".to_string()),
        Just("mirror".to_string()),
        Just("cache+METADATA_FORMAT".to_string()),
        "[a-z][a-z0-9-]{0,10}".prop_filter("not striped", |s| s != "striped"),
    ]
    .prop_map(|segtype| SegPlan::Other { segtype });
    (prop_oneof![2 => striped, 1 => other], 1u32..30, extra(true))
}

prop_compose! {
    fn vg()(
        vg_name in name(),
        id in uuid(),
        seqno in any::<u32>(),
        extent_size in 1u64..100_000,
        max in (any::<u32>(), any::<u32>(), proptest::option::of(any::<u32>())),
        status in flags(),
        vg_extra in extra(true),
        pvs in proptest::collection::vec(
            (uuid(), proptest::option::of("[^\u{0}]{0,16}"), flags(), any::<bool>(), 1u64..4096, extra(true)),
            1..5,
        ),
        lvs in proptest::collection::vec(
            (name(), uuid(), flags(), proptest::option::of((any::<u32>(), "[a-z]{1,8}")),
             proptest::collection::vec(seg_plan(), 1..4), extra(false)),
            0..5,
        ),
        slack in 0u32..50,
    ) -> Metadata {
        // Lay the striped areas out one after another on each PV, then size the PVs to fit.
        let mut next = vec![0u32; pvs.len()];
        let mut logical_volumes = Vec::new();
        let mut seen_names = std::collections::HashSet::new();
        let mut seen_ids = std::collections::HashSet::new();
        for (lname, lid, lstatus, created, plans, lextra) in lvs {
            if !seen_names.insert(lname.clone()) || !seen_ids.insert(lid) || lname == "." || lname == ".." {
                continue;
            }
            let mut segments = Vec::new();
            let mut start = 0u32;
            for (plan, count, sextra) in plans {
                let (kind, extent_count) = match plan {
                    SegPlan::Striped { stripes, per, size } => {
                        let stripes: Vec<Area> = stripes
                            .iter()
                            .map(|&p| {
                                let p = p % pvs.len();
                                let a = Area { volume: format!("pv{p}"), start: Extents(next[p]) };
                                next[p] += per;
                                a
                            })
                            .collect();
                        let n = stripes.len() as u32;
                        let stripe_size = (n > 1).then_some(Sectors(size));
                        (SegmentKind::Striped { stripe_size, stripes }, per * n)
                    }
                    SegPlan::Other { segtype } => (SegmentKind::Other { segtype }, count),
                };
                segments.push(Segment {
                    start_extent: Extents(start),
                    extent_count: Extents(extent_count),
                    kind,
                    extra: sextra,
                });
                start += extent_count;
            }
            logical_volumes.push(LogicalVolume {
                name: lname,
                id: lid,
                status: lstatus,
                flags: Flags::default(),
                creation_time: created.as_ref().map(|c| u64::from(c.0)),
                creation_host: created.map(|c| c.1),
                segments,
                extra: lextra,
            });
        }
        let mut physical_volumes = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, (pid, device, pstatus, sized, pe_start, pextra)) in pvs.into_iter().enumerate() {
            // Duplicate uuids are invalid; vary the last character to keep them unique.
            let mut pid = pid;
            while !seen.insert(pid) {
                pid = Uuid::generate();
            }
            let pe_count = next[i] + slack;
            let end = pe_start + u64::from(pe_count) * extent_size;
            physical_volumes.push(PhysicalVolume {
                key: format!("pv{i}"),
                id: pid,
                device,
                status: pstatus,
                flags: Flags::default(),
                dev_size: sized.then_some(Sectors(end + 7)),
                pe_start: Sectors(pe_start),
                pe_count: Extents(pe_count),
                extra: pextra,
            });
        }
        let vg = VolumeGroup {
            name: vg_name,
            id,
            seqno,
            format: Some("lvm2".into()),
            status,
            flags: Flags::default(),
            extent_size: Sectors(extent_size),
            max_lv: max.0,
            max_pv: max.1,
            metadata_copies: max.2,
            physical_volumes,
            logical_volumes,
            extra: vg_extra,
        };
        Metadata {
            vg,
            description: "property test \"quoted\" \\ back".into(),
            creation_host: "host".into(),
            creation_time: 1_700_000_000,
            extra: Vec::new(),
        }
    }
}

fn area() -> impl Strategy<Value = DiskArea> {
    (1u64..1 << 40, 0u64..1 << 30).prop_map(|(o, s)| DiskArea {
        offset: Bytes(o),
        size: Bytes(s),
    })
}

prop_compose! {
    fn label()(
        sector in 0u64..4,
        pv_uuid in uuid(),
        device_size in any::<u64>(),
        data_areas in proptest::collection::vec(area(), 0..4),
        mdas in proptest::collection::vec((1u64..1000, 2u64..1000), 0..3),
        ext in proptest::option::of((1u32..5, any::<u32>(), proptest::collection::vec(area(), 0..3))),
    ) -> Label {
        // Metadata areas: whole sectors, past the label sectors, not overlapping.
        let mut at = 2048u64;
        let metadata_areas = mdas
            .into_iter()
            .map(|(gap, len)| {
                let a = DiskArea { offset: Bytes(at + gap * 512), size: Bytes(len * 512) };
                at = a.offset.0 + a.size.0;
                a
            })
            .collect();
        Label {
            sector,
            pv_uuid,
            device_size: Bytes(device_size),
            data_areas,
            metadata_areas,
            extension: ext.map(|(version, flags, bootloader_areas)| PvExtension {
                version,
                flags,
                bootloader_areas,
            }),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn vg_text_round_trip(md in vg()) {
        prop_assert!(md.vg.validate().is_ok(), "{:?}", md.vg.validate());
        for style in [Style::Disk, Style::File] {
            let t = md.to_text(style).unwrap();
            let back = Metadata::from_text(t.as_bytes());
            prop_assert_eq!(back.as_ref(), Ok(&md), "{}", t);
        }
    }

    #[test]
    fn tree_round_trip(root in section(3)) {
        for style in [Style::Disk, Style::File] {
            let t = text::write(&root, style).unwrap();
            let back = text::parse(t.as_bytes());
            prop_assert_eq!(back.as_ref(), Ok(&root), "{}", t);
        }
    }

    #[test]
    fn label_round_trip(l in label()) {
        // Areas always fit a device of 2^41 bytes.
        match l.to_sector() {
            Ok(s) => {
                let back = Label::from_sector(&s, l.sector, Bytes(1 << 41), "d").unwrap();
                prop_assert_eq!(back, Some(l));
            }
            // Only when the lists do not fit the sector.
            Err(e) => prop_assert!(
                32 + 40 + 8 + 16 * (l.data_areas.len() + l.metadata_areas.len()
                    + l.extension.as_ref().map_or(0, |e| e.bootloader_areas.len()) + 3) > 512,
                "{e}"
            ),
        }
    }

    #[test]
    fn header_round_trip(
        start in 4u64..1 << 30,
        size in 2u64..1 << 20,
        slots in proptest::array::uniform2((any::<bool>(), 1u64..1 << 20, 1u64..1 << 20, any::<u32>(), any::<u32>())),
    ) {
        let area = DiskArea { offset: Bytes(start * 512), size: Bytes(size * 512) };
        let mut h = MdaHeader::new(&area);
        let ring = area.size.0 - 512;
        let slot = |(used, o, s, c, f): (bool, u64, u64, u32, u32)| {
            if !used {
                return RawLocn::default();
            }
            RawLocn { offset: 512 + o % ring, size: 1 + s % ring, checksum: c, flags: f }
        };
        h.committed = slot(slots[0]);
        h.precommitted = slot(slots[1]);
        let back = MdaHeader::from_sector(&h.to_sector(), &area, "d").unwrap();
        prop_assert_eq!(back, h);
    }

    #[test]
    fn ring_keeps_the_committed_copy(
        sectors in 3u64..40,
        sizes in proptest::collection::vec((1usize..10_000, any::<u8>()), 1..40),
    ) {
        let area = DiskArea { offset: Bytes(8192), size: Bytes(sectors * 512) };
        let dev: DeviceRef = Arc::new(MemDevice::new("ring", Bytes(1 << 20)));
        let mut h = MdaHeader::new(&area);
        let max = h.max_text() as usize;
        let mut committed: Option<Vec<u8>> = None;
        for (size, fill) in sizes {
            if max == 0 {
                break;
            }
            let n = 1 + size % max;
            let mut text: Vec<u8> = (0..n - 1).map(|i| fill.wrapping_add(i as u8) | 1).collect();
            text.push(0);
            let locn = mda::write_text(dev.as_ref(), &h, &text).unwrap();
            prop_assert!(locn.offset >= MDA_HEADER_SIZE as u64 && locn.offset.is_multiple_of(512));
            prop_assert!(locn.offset <= area.size.0 - 512);
            // The committed copy is untouched by the new one.
            if let Some(old) = &committed {
                prop_assert_eq!(&mda::read_text(dev.as_ref(), &h, &h.committed).unwrap(), old);
            }
            h.committed = locn;
            prop_assert_eq!(&mda::read_text(dev.as_ref(), &h, &h.committed).unwrap(), &text);
            committed = Some(text);
        }
    }
}

#[test]
fn ring_wraps_where_lvm2_wraps() {
    // A 4 KiB area: ring of 3584 bytes, copies up to 1280 bytes.
    let area = DiskArea {
        offset: Bytes(8192),
        size: Bytes(4096),
    };
    let dev: DeviceRef = Arc::new(MemDevice::new("ring", Bytes(1 << 20)));
    let mut h = MdaHeader::new(&area);
    assert_eq!(h.max_text(), 1280);
    let mut offsets = Vec::new();
    let mut wrapped = 0;
    for k in 0..12u8 {
        // 1200 bytes with the NUL.
        let mut text = vec![b'a' + k; 1199];
        text.push(0);
        let locn = mda::write_text(dev.as_ref(), &h, &text).unwrap();
        if locn.offset + locn.size > area.size.0 {
            wrapped += 1;
        }
        offsets.push(locn.offset);
        h.committed = locn;
        assert_eq!(
            mda::read_text(dev.as_ref(), &h, &h.committed).unwrap(),
            text
        );
    }
    // Each copy starts on the sector after the previous one's end; the one at 3584 has 512
    // bytes before the end, so it starts there and wraps, and the next follows its tail.
    assert_eq!(&offsets[..5], &[512, 2048, 3584, 1536, 3072]);
    assert!(wrapped >= 3, "{offsets:?}");
}
