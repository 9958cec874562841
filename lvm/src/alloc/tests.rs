//! Unit tests of the allocator and the size arithmetic on hand-made VGs.

use tables::Sectors;

use super::*;
use crate::model::{Area, Flags, PhysicalVolume};
use crate::uuid::Uuid;

/// 4 MiB extents.
const ES: Sectors = Sectors(8192);

fn pv(key: &str, pe_count: u32) -> PhysicalVolume {
    PhysicalVolume {
        key: key.into(),
        id: Uuid::generate(),
        device: Some(format!("/dev/{key}")),
        status: Flags::of(&["ALLOCATABLE"]),
        flags: Flags::default(),
        dev_size: None,
        pe_start: Sectors(2048),
        pe_count: Extents(pe_count),
        extra: Vec::new(),
    }
}

fn vg(sizes: &[u32]) -> VolumeGroup {
    let pvs = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| pv(&format!("pv{i}"), n))
        .collect();
    crate::vgcreate::new_vg("vg", ES, pvs)
}

fn add_lv(vg: &mut VolumeGroup, name: &str, segments: Vec<Segment>) {
    vg.logical_volumes.push(LogicalVolume::new(name, segments));
    vg.validate().expect("test VG is valid");
}

/// A linear LV of `count` extents at `start` of `pv`.
fn add_linear(vg: &mut VolumeGroup, name: &str, pv: &str, start: u32, count: u32) {
    add_lv(
        vg,
        name,
        vec![Segment::linear(
            Extents(0),
            Extents(count),
            pv,
            Extents(start),
        )],
    );
}

/// `(pv, start)` of each area of a striped segment, and its extent count.
fn areas(s: &Segment) -> (Vec<(String, u32)>, u32) {
    match &s.kind {
        SegmentKind::Striped { stripes, .. } => (
            stripes
                .iter()
                .map(|a| (a.volume.clone(), a.start.0))
                .collect(),
            s.extent_count.0,
        ),
        SegmentKind::Other { segtype } => panic!("unexpected segment type {segtype}"),
    }
}

fn req(extents: u32) -> Request {
    Request {
        extents: Extents(extents),
        ..Request::default()
    }
}

fn area(pv: &str, start: u32) -> (String, u32) {
    (pv.to_string(), start)
}

// ---- policies and PV selections -------------------------------------------------------

#[test]
fn policy_names() {
    for (s, p) in [
        ("normal", Policy::Normal),
        ("contiguous", Policy::Contiguous),
        ("anywhere", Policy::Anywhere),
        ("inherit", Policy::Inherit),
    ] {
        assert_eq!(s.parse::<Policy>().unwrap(), p);
        assert_eq!(p.to_string(), s);
    }
    assert_eq!("cling".parse::<Policy>().unwrap(), Policy::Normal);
    assert_eq!(
        "sideways".parse::<Policy>().unwrap_err().to_string(),
        "Unrecognised allocation policy sideways"
    );
}

#[test]
fn inherit_takes_the_vg_policy() {
    let mut g = vg(&[100]);
    assert_eq!(Policy::Inherit.resolve(&g), Policy::Normal);
    g.extra.push((
        "allocation_policy".into(),
        Item::Value(Value::Str("contiguous".into())),
    ));
    assert_eq!(Policy::Inherit.resolve(&g), Policy::Contiguous);
    assert_eq!(Policy::Anywhere.resolve(&g), Policy::Anywhere);
}

// ---- free space ------------------------------------------------------------------------

#[test]
fn free_report_counts_every_segment_area() {
    let mut g = vg(&[100, 50]);
    add_linear(&mut g, "a", "pv0", 10, 20);
    let mut raid = Segment::linear(Extents(0), Extents(5), "pv1", Extents(0));
    raid.kind = SegmentKind::Other {
        segtype: "mirror".into(),
    };
    raid.extra.push((
        "mirrors".into(),
        Item::Array(vec![Value::Str("pv1".into()), Value::Int(40)]),
    ));
    add_lv(&mut g, "m", vec![raid]);
    let r = free_report(&g);
    assert_eq!(r[0].key, "pv0");
    assert_eq!(r[0].free, Extents(80));
    assert_eq!(r[0].runs, vec![0..10, 30..100]);
    assert_eq!(r[1].free, Extents(45));
    assert_eq!(r[1].runs, vec![0..40, 45..50]);
}

// ---- lvcreate -------------------------------------------------------------------------

#[test]
fn linear_goes_to_the_first_pv_that_holds_it() {
    let mut g = vg(&[100, 100]);
    add_linear(&mut g, "a", "pv0", 0, 10);
    let a = allocate(&g, &req(10)).unwrap();
    assert_eq!(a.legs.len(), 1);
    assert_eq!(a.legs[0].len(), 1);
    assert_eq!(areas(&a.legs[0][0]), (vec![area("pv0", 10)], 10));
    assert_eq!(a.legs[0][0].start_extent, Extents(0));
    assert_eq!(a.extents, Extents(10));
    assert!(a.meta.is_empty());
}

#[test]
fn linear_takes_the_smallest_run_that_holds_it() {
    let mut g = vg(&[100]);
    add_linear(&mut g, "a", "pv0", 30, 10);
    add_linear(&mut g, "b", "pv0", 50, 10);
    // Free: 0-29 (30), 40-49 (10), 60-99 (40).
    let a = allocate(&g, &req(10)).unwrap();
    assert_eq!(areas(&a.legs[0][0]).0, vec![area("pv0", 40)]);
    let a = allocate(&g, &req(35)).unwrap();
    assert_eq!(areas(&a.legs[0][0]).0, vec![area("pv0", 60)]);
}

#[test]
fn linear_spills_over_staying_on_its_pv() {
    let mut g = vg(&[50, 100]);
    add_linear(&mut g, "a", "pv0", 20, 10);
    add_linear(&mut g, "b", "pv1", 0, 70);
    // pv0: 0-19, 30-49 (40 free); pv1: 70-99 (30 free). 45 extents: the largest run (pv1's
    // 30), then the rest on the same PV? pv1 has no more: pv0 gives 15 from its smallest
    // run that holds them (0-19).
    let a = allocate(&g, &req(45)).unwrap();
    let segs: Vec<_> = a.legs[0].iter().map(areas).collect();
    assert_eq!(
        segs,
        vec![(vec![area("pv1", 70)], 30), (vec![area("pv0", 0)], 15)]
    );
    assert_eq!(a.legs[0][1].start_extent, Extents(30));
}

#[test]
fn striped_over_distinct_pvs() {
    let mut g = vg(&[100, 100, 100]);
    add_linear(&mut g, "a", "pv0", 0, 10);
    let r = Request {
        stripes: 2,
        stripe_size: Some(Sectors(128)),
        ..req(20)
    };
    let a = allocate(&g, &r).unwrap();
    assert_eq!(a.legs[0].len(), 1);
    let s = &a.legs[0][0];
    assert_eq!(areas(s), (vec![area("pv0", 10), area("pv1", 0)], 20));
    match &s.kind {
        SegmentKind::Striped { stripe_size, .. } => assert_eq!(*stripe_size, Some(Sectors(128))),
        SegmentKind::Other { .. } => unreachable!(),
    }
}

#[test]
fn striped_default_stripe_size_and_divisibility() {
    let g = vg(&[100, 100]);
    let r = Request {
        stripes: 2,
        ..req(20)
    };
    let a = allocate(&g, &r).unwrap();
    match &a.legs[0][0].kind {
        SegmentKind::Striped { stripe_size, .. } => {
            assert_eq!(*stripe_size, Some(DEFAULT_STRIPE_SIZE))
        }
        SegmentKind::Other { .. } => unreachable!(),
    }
    let e = allocate(
        &g,
        &Request {
            stripes: 2,
            ..req(21)
        },
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "Number of extents requested (21) needs to be divisible by 2."
    );
}

#[test]
fn too_many_stripes() {
    let g = vg(&[100, 100]);
    let e = allocate(
        &g,
        &Request {
            stripes: 3,
            ..req(30)
        },
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "Number of stripes (3) must not exceed number of physical volumes (2)"
    );
    // anywhere may put stripes on one PV.
    let a = allocate(
        &g,
        &Request {
            stripes: 3,
            policy: Policy::Anywhere,
            ..req(30)
        },
    )
    .unwrap();
    let (a0, n) = areas(&a.legs[0][0]);
    assert_eq!(n, 30);
    // Distinct PVs first, then a second area on the largest run.
    assert_eq!(a0, vec![area("pv0", 0), area("pv1", 0), area("pv0", 10)]);
}

#[test]
fn insufficient_space_says_how_much() {
    let mut g = vg(&[100, 100, 60]);
    g.physical_volumes[2].status = Flags::default();
    add_linear(&mut g, "a", "pv0", 0, 50);
    let e = allocate(&g, &req(300)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Insufficient free space: 300 extents needed, but only 150 available \
         (pv2 (/dev/pv2) is not allocatable)"
    );
}

#[test]
fn contiguous_needs_one_run_normal_splits() {
    let mut g = vg(&[100]);
    add_linear(&mut g, "a", "pv0", 40, 10);
    // Free: 0-39, 50-99: 90 extents, no run of 60.
    let r = Request {
        policy: Policy::Contiguous,
        ..req(60)
    };
    let e = allocate(&g, &r).unwrap_err();
    assert!(
        e.to_string().starts_with(
            "Insufficient suitable contiguous allocatable extents: 60 more required \
             (the area needs a free run of 60 extents, and 0 PV(s) have one: pv0 (/dev/pv0): \
             90 free, largest run 50 (PE 50-99)"
        ),
        "{e}"
    );
    let a = allocate(&g, &req(60)).unwrap();
    let segs: Vec<_> = a.legs[0].iter().map(areas).collect();
    assert_eq!(
        segs,
        vec![(vec![area("pv0", 50)], 50), (vec![area("pv0", 0)], 10)]
    );
}

#[test]
fn striped_normal_cuts_segments_so_stripes_never_share_a_pv() {
    // Two stripes of 15 on three PVs of 10: only possible by moving stripes between PVs.
    let g = vg(&[10, 10, 10]);
    let a = allocate(
        &g,
        &Request {
            stripes: 2,
            ..req(30)
        },
    )
    .unwrap();
    let segs = &a.legs[0];
    let total: u32 = segs.iter().map(|s| s.extent_count.0).sum();
    assert_eq!(total, 30);
    for s in segs {
        let (a, _) = areas(s);
        assert_ne!(
            a[0].0, a[1].0,
            "two stripes of one segment on one PV: {segs:?}"
        );
    }
    assert_eq!(segs.len(), 3);
    // And where even that cannot work, the error says why.
    let g = vg(&[20, 3, 3]);
    let e = allocate(
        &g,
        &Request {
            stripes: 2,
            ..req(24)
        },
    )
    .unwrap_err();
    assert!(
        e.to_string().contains(
            "each PV can give at most 12 extents (one stripe's length); they can give 18 of \
             the 24 needed"
        ),
        "{e}"
    );
}

#[test]
fn pv_selection_and_ranges() {
    let g = vg(&[100, 100]);
    let mut sel = PvSelection::new();
    sel.add(&g, "pv1", Some("20-29:50-59")).unwrap();
    let r = Request {
        pvs: Some(sel.clone()),
        ..req(15)
    };
    let a = allocate(&g, &r).unwrap();
    let segs: Vec<_> = a.legs[0].iter().map(areas).collect();
    assert_eq!(
        segs,
        vec![(vec![area("pv1", 20)], 10), (vec![area("pv1", 50)], 5)]
    );
    let e = allocate(
        &g,
        &Request {
            pvs: Some(sel.clone()),
            ..req(21)
        },
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "Insufficient free space: 21 extents needed, but only 20 available"
    );
    assert_eq!(
        sel.add(&g, "pv1", Some("25")).unwrap_err().to_string(),
        "Overlapping PE ranges specified (25-25, 20-29) on /dev/pv1."
    );
    assert_eq!(
        PvSelection::new()
            .add(&g, "pv7", None)
            .unwrap_err()
            .to_string(),
        "Physical Volume \"pv7\" not found in Volume Group \"vg\"."
    );
}

#[test]
fn stripes_count_the_selected_pvs() {
    let g = vg(&[100, 100, 100]);
    let e = allocate(
        &g,
        &Request {
            stripes: 2,
            pvs: Some(PvSelection::whole(["pv2"])),
            ..req(20)
        },
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "Number of stripes (2) must not exceed number of physical volumes (1)"
    );
}

// ---- raid images ----------------------------------------------------------------------

#[test]
fn raid_images_with_metadata_before_them() {
    let mut g = vg(&[100, 100, 100]);
    add_linear(&mut g, "a", "pv0", 0, 10);
    let r = Request {
        legs: 2,
        raid_meta: true,
        ..req(20)
    };
    let a = allocate(&g, &r).unwrap();
    assert_eq!(a.legs.len(), 2);
    assert_eq!(a.meta.len(), 2);
    assert_eq!(areas(&a.meta[0]), (vec![area("pv0", 10)], 1));
    assert_eq!(areas(&a.legs[0][0]), (vec![area("pv0", 11)], 20));
    assert_eq!(areas(&a.meta[1]), (vec![area("pv1", 0)], 1));
    assert_eq!(areas(&a.legs[1][0]), (vec![area("pv1", 1)], 20));
}

#[test]
fn raid_images_span_pvs_but_never_share_one() {
    // 65 extents per image (64 + metadata): no PV holds one alone; {60,30} and {40,35} do.
    let g = vg(&[60, 40, 35, 30]);
    let r = Request {
        legs: 2,
        raid_meta: true,
        ..req(64)
    };
    let a = allocate(&g, &r).unwrap();
    let mut sets = Vec::new();
    for (i, leg) in a.legs.iter().enumerate() {
        let total: u32 = leg.iter().map(|s| s.extent_count.0).sum();
        assert_eq!(total, 64);
        let mut pvs: Vec<String> = leg.iter().map(|s| areas(s).0[0].0.clone()).collect();
        pvs.push(areas(&a.meta[i]).0[0].0.clone());
        pvs.sort();
        pvs.dedup();
        sets.push(pvs);
    }
    assert!(
        sets[0].iter().all(|p| !sets[1].contains(p)),
        "images share a PV: {sets:?}"
    );
    // The metadata extent comes right before the image on the same PV.
    for (i, leg) in a.legs.iter().enumerate() {
        let (m, _) = areas(&a.meta[i]);
        let (first, _) = areas(&leg[0]);
        assert_eq!(first[0], (m[0].0.clone(), m[0].1 + 1));
    }
    // Three images of 64: not enough disjoint space.
    let e = allocate(
        &g,
        &Request {
            legs: 3,
            raid_meta: true,
            ..req(40)
        },
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("the 3 images need disjoint sets of PVs with 41 free extents each"),
        "{e}"
    );
    let e = allocate(&g, &Request { legs: 5, ..req(1) }).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("5 images need 5 physical volumes with free space, only 4 usable"),
        "{e}"
    );
}

#[test]
fn approx_takes_what_fits() {
    // raid1 -l 100%FREE: 200 free, 100 per image, but the metadata extents need 2 more.
    let g = vg(&[100, 100]);
    let size = parse_size("100%FREE", true).unwrap();
    let (e, _) = size.to_image_extents(&g, None, 1, 2).unwrap();
    assert_eq!(e, Extents(100));
    let r = Request {
        legs: 2,
        raid_meta: true,
        approx: size.is_approximate(),
        ..req(e.0)
    };
    let a = allocate(&g, &r).unwrap();
    assert_eq!(a.extents, Extents(99));
    assert_eq!(a.legs[0][0].extent_count, Extents(99));
    let exact = Request { approx: false, ..r };
    assert!(matches!(
        allocate(&g, &exact),
        Err(AllocError::InsufficientSpace { needed: 202, .. })
    ));
}

// ---- lvextend -------------------------------------------------------------------------

fn striped_lv(g: &mut VolumeGroup) {
    add_lv(
        g,
        "s",
        vec![Segment {
            start_extent: Extents(0),
            extent_count: Extents(20),
            kind: SegmentKind::Striped {
                stripe_size: Some(Sectors(128)),
                stripes: vec![
                    Area {
                        volume: "pv0".into(),
                        start: Extents(0),
                    },
                    Area {
                        volume: "pv1".into(),
                        start: Extents(5),
                    },
                ],
            },
            extra: Vec::new(),
        }],
    );
}

#[test]
fn extend_contiguous_in_place() {
    let mut g = vg(&[100, 100, 100]);
    striped_lv(&mut g);
    let segs = extend(&g, "s", Extents(10), Policy::Contiguous, None).unwrap();
    assert_eq!(segs.len(), 1);
    assert_eq!(segs[0].start_extent, Extents(20));
    assert_eq!(
        areas(&segs[0]),
        (vec![area("pv0", 10), area("pv1", 15)], 10)
    );
    match &segs[0].kind {
        SegmentKind::Striped { stripe_size, .. } => assert_eq!(*stripe_size, Some(Sectors(128))),
        SegmentKind::Other { .. } => unreachable!(),
    }
}

#[test]
fn extend_contiguous_blocked_names_the_lv() {
    let mut g = vg(&[100, 100, 100]);
    striped_lv(&mut g);
    add_linear(&mut g, "wall", "pv1", 18, 4);
    let e = extend(&g, "s", Extents(10), Policy::Contiguous, None).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Insufficient suitable contiguous allocatable extents for logical volume s: 10 more \
         required (stripe 2 must continue at pv1 (/dev/pv1) PE 15 with 5 extents: PE 18-21 are \
         used by LV wall)"
    );
    let e = extend(&g, "s", Extents(200), Policy::Contiguous, None).unwrap_err();
    assert!(e.to_string().contains("it has only 100 extents"), "{e}");
}

#[test]
fn extend_normal_continues_in_place_then_elsewhere() {
    let mut g = vg(&[100, 100, 100]);
    striped_lv(&mut g);
    add_linear(&mut g, "wall", "pv1", 18, 4);
    let segs = extend(&g, "s", Extents(10), Policy::Normal, None).unwrap();
    let got: Vec<_> = segs.iter().map(|s| (s.start_extent.0, areas(s))).collect();
    // Stripe 2 has 3 extents in place (15-17), then goes on in pv1's largest run, as lvm2's
    // cling does.
    assert_eq!(
        got,
        vec![
            (20, (vec![area("pv0", 10), area("pv1", 15)], 6)),
            (26, (vec![area("pv0", 13), area("pv1", 22)], 4)),
        ]
    );
}

#[test]
fn extend_linear_and_inherit_uses_the_lv_policy() {
    let mut g = vg(&[100, 100]);
    add_linear(&mut g, "a", "pv0", 0, 10);
    add_linear(&mut g, "b", "pv0", 10, 10);
    g.logical_volumes[0].extra.push((
        "allocation_policy".into(),
        Item::Value(Value::Str("contiguous".into())),
    ));
    g.validate().unwrap();
    let e = extend(&g, "a", Extents(5), Policy::Inherit, None).unwrap_err();
    assert!(
        matches!(
            e,
            AllocError::NoPlacement {
                contiguous: true,
                ..
            }
        ),
        "{e}"
    );
    let segs = extend(&g, "a", Extents(5), Policy::Normal, None).unwrap();
    assert_eq!(segs[0].start_extent, Extents(10));
    assert_eq!(areas(&segs[0]), (vec![area("pv0", 20)], 5));
    let segs = extend(&g, "b", Extents(5), Policy::Inherit, None).unwrap();
    assert_eq!(areas(&segs[0]), (vec![area("pv0", 20)], 5));
    assert_eq!(
        extend(&g, "zz", Extents(5), Policy::Normal, None)
            .unwrap_err()
            .to_string(),
        "Logical volume zz not found in volume group vg."
    );
}

// ---- sizes ----------------------------------------------------------------------------

fn sectors(arg: &str) -> u64 {
    match parse_size(arg, false).unwrap().amount {
        Amount::Sectors(s) => s.0,
        a => panic!("{arg}: {a:?}"),
    }
}

#[test]
fn size_units() {
    assert_eq!(sectors("1G"), 2 << 20);
    assert_eq!(sectors("1g"), 2 << 20);
    assert_eq!(sectors("1GiB"), 2 << 20);
    assert_eq!(sectors("100m"), 100 * 2048);
    assert_eq!(sectors("100"), 100 * 2048);
    assert_eq!(sectors("1.5g"), 3 << 20);
    assert_eq!(sectors(".5k"), 1);
    assert_eq!(sectors("1.5k"), 3);
    assert_eq!(sectors("0.3m"), 614);
    assert_eq!(sectors("512b"), 1);
    assert_eq!(sectors("8s"), 8);
    assert_eq!(sectors("1t"), 2 << 30);
    assert_eq!(sectors("1e"), 1 << 51);
    assert_eq!(sectors("1e3"), 1000 * 2048);
    let s = parse_size("+1G", false).unwrap();
    assert_eq!(s.sign, Sign::Plus);
    let err = |a: &str| parse_size(a, false).unwrap_err().to_string();
    assert_eq!(err("x"), "Size requires number argument.");
    assert_eq!(err("1x"), "Can't parse size argument.");
    assert_eq!(err("+-1"), "Multiple sign symbols detected.");
    assert_eq!(
        err("1000b"),
        "Size is not a multiple of 512. Try using 512 or 1024."
    );
    assert_eq!(err("16e"), "Size is too big (>=16EiB).");
}

#[test]
fn extent_arguments() {
    let p = |a: &str| parse_size(a, true).unwrap().amount;
    assert_eq!(p("10"), Amount::Extents(Extents(10)));
    assert_eq!(
        p("50%FREE"),
        Amount::Percent {
            percent: 50,
            of: PercentOf::Free
        }
    );
    assert_eq!(
        p("100%vg"),
        Amount::Percent {
            percent: 100,
            of: PercentOf::Vg
        }
    );
    assert_eq!(
        p("10%P"),
        Amount::Percent {
            percent: 10,
            of: PercentOf::Pvs
        }
    );
    let err = |a: &str| parse_size(a, true).unwrap_err().to_string();
    assert_eq!(err("10%X"), "Specified %X is unknown.");
    assert_eq!(err("10k"), "Invalid argument for --extents: 10k");
    assert_eq!(
        err("4294967295%VG"),
        "Percentage is too big (>=4294967295%)."
    );
}

#[test]
fn lvcreate_sizes_round_as_lvm2() {
    let mut g = vg(&[100, 100]);
    add_linear(&mut g, "a", "pv0", 0, 20);
    let ext = |a: &str, ext: bool, stripes: u32| {
        parse_size(a, ext)
            .unwrap()
            .to_extents(&g, None, stripes)
            .unwrap()
    };
    assert_eq!(ext("1G", false, 1), (Extents(256), None));
    assert_eq!(ext("100m", false, 1), (Extents(25), None));
    assert_eq!(
        ext("10m", false, 1),
        (
            Extents(3),
            Some("Rounding up size to full physical extent 12.00 MiB".into())
        )
    );
    assert_eq!(ext("50%FREE", true, 1), (Extents(90), None));
    assert_eq!(
        ext("100%VG", true, 1),
        (
            Extents(180),
            Some("Reducing 100%VG to remaining free space 720.00 MiB in VG.".into())
        )
    );
    assert_eq!(ext("100%PVS", true, 1), (Extents(200), None));
    assert_eq!(
        ext("11", true, 2),
        (
            Extents(12),
            Some(
                "Rounding size 44.00 MiB (11 extents) up to stripe boundary size 48.00 MiB \
                 (12 extents)."
                    .into()
            )
        )
    );
    let mut sel = PvSelection::new();
    sel.add(&g, "pv0", None).unwrap();
    let (e, _) = parse_size("50%PVS", true)
        .unwrap()
        .to_extents(&g, Some(&sel), 1)
        .unwrap();
    assert_eq!(e, Extents(40));
    let err = |a: &str, ext: bool| {
        parse_size(a, ext)
            .unwrap()
            .to_extents(&g, None, 1)
            .unwrap_err()
            .to_string()
    };
    assert_eq!(err("+1G", false), "Size may not be relative/signed.");
    assert_eq!(err("0", false), "--size may not be zero.");
    assert_eq!(err("0", true), "--extents may not be zero.");
    assert_eq!(
        err("10%LV", true),
        "Please express size as %FREE, %PVS or %VG."
    );
    let tiny = vg(&[50]);
    assert_eq!(
        parse_size("1%FREE", true)
            .unwrap()
            .to_extents(&tiny, None, 1)
            .unwrap_err()
            .to_string(),
        "Calculated size of logical volume is 0 extents. Needs to be larger."
    );
}

#[test]
fn percent_rounds_down_to_stripes_when_space_is_short() {
    let mut g = vg(&[100, 100]);
    add_linear(&mut g, "a", "pv0", 0, 19);
    // 181 free: 100%FREE over 2 stripes cannot round up.
    let (e, note) = parse_size("100%FREE", true)
        .unwrap()
        .to_extents(&g, None, 2)
        .unwrap();
    assert_eq!(e, Extents(180));
    assert_eq!(
        note.as_deref(),
        Some("Rounding size (181 extents) down to stripe boundary size (180 extents)")
    );
}

#[test]
fn lvextend_sizes() {
    let mut g = vg(&[100, 100]);
    striped_lv(&mut g);
    let more = |a: &str, ext: bool| parse_size(a, ext).unwrap().to_extend_extents(&g, "s", None);
    assert_eq!(more("+10", true).unwrap(), (Extents(10), None));
    assert_eq!(
        more("+9", true).unwrap(),
        (
            Extents(10),
            Some(
                "Rounding size (29 extents) up to stripe boundary size for segment (30 extents)."
                    .into()
            )
        )
    );
    assert_eq!(
        more("+10m", false).unwrap(),
        (
            Extents(4),
            Some(
                "Rounding size to boundary between physical extents: 12.00 MiB.\n\
                 Rounding size (23 extents) up to stripe boundary size for segment (24 extents)."
                    .into()
            )
        )
    );
    assert_eq!(more("30", true).unwrap(), (Extents(10), None));
    assert_eq!(more("+50%LV", true).unwrap(), (Extents(10), None));
    assert_eq!(
        more("10", true).unwrap_err().to_string(),
        "New size given (10 extents) not larger than existing size (20 extents)"
    );
    assert_eq!(
        more("20", true).unwrap_err().to_string(),
        "New size (20 extents) matches existing size (20 extents)."
    );
}

#[test]
fn stripe_size_rules() {
    let g = vg(&[100, 100]);
    assert_eq!(
        stripe_size(&g, 2, None).unwrap(),
        (
            Some(Sectors(128)),
            Some("Using default stripesize 64.00 KiB.".into())
        )
    );
    assert_eq!(
        stripe_size(&g, 2, Some(Sectors(16))).unwrap(),
        (Some(Sectors(16)), None)
    );
    assert_eq!(
        stripe_size(&g, 1, Some(Sectors(16))).unwrap(),
        (
            None,
            Some("Ignoring stripesize argument with single stripe.".into())
        )
    );
    let err = |s: u64| {
        stripe_size(&g, 2, Some(Sectors(s)))
            .unwrap_err()
            .to_string()
    };
    assert_eq!(err(96), "Invalid stripe size 48.00 KiB.");
    assert_eq!(err(4), "Invalid stripe size 2.00 KiB.");
    let mut small = g.clone();
    small.extent_size = Sectors(16);
    assert_eq!(
        stripe_size(&small, 2, Some(Sectors(128))).unwrap(),
        (
            Some(Sectors(16)),
            Some(
                "Reducing requested stripe size 64.00 KiB to maximum, physical extent size \
                 8.00 KiB."
                    .into()
            )
        )
    );
    assert_eq!(
        stripe_size(&g, 129, None).unwrap_err().to_string(),
        "Number of stripes (129) must be between 1 and 128."
    );
}

#[test]
fn sizes_display_as_lvm2() {
    assert_eq!(display_size(8192), "4.00 MiB");
    assert_eq!(display_size(128), "64.00 KiB");
    assert_eq!(display_size(2043 * 2048), "<2.00 GiB");
    assert_eq!(display_size(1), "512 B");
    assert_eq!(display_size(3 << 20), "1.50 GiB");
}

#[test]
fn one_image_with_its_metadata_extent() {
    // lvconvert -m 1 adds one image and its rmeta, away from the PV the LV is on.
    let mut g = vg(&[100, 100]);
    add_linear(&mut g, "a", "pv0", 0, 20);
    let r = Request {
        legs: 1,
        raid_meta: true,
        pvs: Some(PvSelection::whole(["pv1"])),
        ..req(20)
    };
    let a = allocate(&g, &r).unwrap();
    assert_eq!((a.legs.len(), a.meta.len()), (1, 1));
    assert_eq!(areas(&a.meta[0]), (vec![area("pv1", 0)], 1));
    assert_eq!(areas(&a.legs[0][0]), (vec![area("pv1", 1)], 20));
    let striped = Request { stripes: 2, ..r };
    assert!(allocate(&g, &striped).is_err());
}
