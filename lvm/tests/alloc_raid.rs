//! Extending volmgr raid LVs (`alloc::extend_raid`): hand-made cases for every rule, and a
//! property test over random VGs whose refusals are checked by a brute force written apart
//! from the allocator.

use std::collections::{HashMap, HashSet};

use lvm::alloc::{self, AllocError, Policy, PvSelection, Request};
use lvm::model::{Flags, PhysicalVolume, SegmentKind};
use lvm::segtypes::{RaidLevel, RaidSegment, VolmgrSegment};
use lvm::{Extents, LogicalVolume, Segment, VolumeGroup};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tables::Sectors;

mod common;

fn pv(key: &str, pe_count: u32, allocatable: bool) -> PhysicalVolume {
    let mut status = Flags::default();
    if allocatable {
        status.set("ALLOCATABLE");
    }
    common::bare_pv(key, pe_count, status)
}

fn vg(sizes: &[u32]) -> VolumeGroup {
    let pvs = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| pv(&format!("pv{i}"), n, true))
        .collect();
    lvm::vgcreate::new_vg("vg", Sectors(8192), pvs)
}

/// Creates raid LV `r` of `images` images of `per` extents each (as lvcreate does), on
/// `pvs` if given; `None` if it does not fit.
fn raid(
    vg: &mut VolumeGroup,
    level: RaidLevel,
    images: u32,
    per: u32,
    pvs: Option<PvSelection>,
) -> Option<()> {
    let placed = alloc::allocate(
        vg,
        &Request {
            extents: Extents(per),
            legs: images,
            raid_meta: true,
            pvs,
            ..Request::default()
        },
    )
    .ok()?;
    let mut pairs = Vec::new();
    for (i, (leg, meta)) in placed.legs.into_iter().zip(placed.meta).enumerate() {
        let (m, img) = (format!("r_rmeta_{i}"), format!("r_rimage_{i}"));
        vg.logical_volumes.push(LogicalVolume::new(&m, vec![meta]));
        vg.logical_volumes.push(LogicalVolume::new(&img, leg));
        pairs.push((m, img));
    }
    let lv_extents = per * level.data_images(images)?;
    let seg = VolmgrSegment::Raid(RaidSegment {
        level,
        region_size: Sectors(4096),
        stripe_size: (level != RaidLevel::Raid1).then_some(Sectors(128)),
        images: pairs,
    })
    .to_segment(Extents(0), Extents(lv_extents));
    vg.logical_volumes.push(LogicalVolume::new("r", vec![seg]));
    vg.validate().expect("valid VG");
    Some(())
}

fn linear(vg: &mut VolumeGroup, name: &str, pv: &str, start: u32, len: u32) {
    vg.logical_volumes
        .push(common::linear_at(name, pv, start, len));
    vg.validate().expect("valid VG");
}

/// `(pv, start, len)` of every area of `segs`.
fn areas(segs: &[Segment]) -> Vec<(String, u32, u32)> {
    segs.iter()
        .flat_map(|s| match &s.kind {
            SegmentKind::Striped { stripes, .. } => stripes
                .iter()
                .map(|a| (a.volume.clone(), a.start.0, s.extent_count.0))
                .collect(),
            SegmentKind::Other { .. } => Vec::new(),
        })
        .collect()
}

/// The PVs each image of raid LV `r` uses, its metadata extent included.
fn image_pvs(vg: &VolumeGroup) -> Vec<HashSet<String>> {
    let r = alloc::raid_segment(vg, "r").expect("the raid LV");
    r.images
        .iter()
        .map(|(m, i)| {
            areas(&vg.lv(m).unwrap().segments)
                .into_iter()
                .chain(areas(&vg.lv(i).unwrap().segments))
                .map(|a| a.0)
                .collect()
        })
        .collect()
}

/// Applies an extension to the VG as lvextend does (images, then the raid segment).
fn apply(vg: &mut VolumeGroup, x: &alloc::RaidExtension) {
    for (img, segs) in &x.images {
        let l = vg.lv_mut(img).expect("image");
        for s in segs {
            assert!(l.push_segment(s.clone()), "{img}: segment not at its end");
        }
    }
    let seg = VolmgrSegment::Raid(x.raid.clone()).to_segment(Extents(0), x.lv_extents);
    vg.lv_mut("r").expect("raid LV").segments = vec![seg];
    vg.validate().expect("valid VG after the extension");
}

#[test]
fn raid1_grows_in_place_on_its_own_pvs() {
    let mut g = vg(&[40, 40, 40]);
    raid(&mut g, RaidLevel::Raid1, 2, 10, None).unwrap();
    let x = alloc::extend_raid(&g, "r", Extents(5), Policy::Normal, None).unwrap();
    assert_eq!((x.image_extents.0, x.lv_extents.0), (15, 15));
    for (img, segs) in &x.images {
        assert_eq!(segs[0].start_extent.0, 10, "{img}");
        let a = areas(&segs[..]);
        let (pv, start, len) = &a[0];
        let old = areas(&g.lv(img).unwrap().segments);
        assert_eq!((pv, *start, *len), (&old[0].0, old[0].1 + 10, 5), "{img}");
    }
    apply(&mut g, &x);
    assert_eq!(
        g.lv("r_rimage_0").unwrap().segments.len(),
        1,
        "merged in place"
    );
}

#[test]
fn images_that_outgrow_their_pvs_take_pvs_no_other_image_uses() {
    // Images on pv0 and pv1 (11 extents each with the metadata); pv2 and pv3 free.
    let mut g = vg(&[11, 11, 30, 30]);
    raid(&mut g, RaidLevel::Raid1, 2, 10, None).unwrap();
    let x = alloc::extend_raid(&g, "r", Extents(20), Policy::Normal, None).unwrap();
    let pvs: Vec<HashSet<String>> = x
        .images
        .iter()
        .map(|(_, s)| areas(s).into_iter().map(|a| a.0).collect())
        .collect();
    assert!(pvs[0].is_disjoint(&pvs[1]), "{pvs:?}");
    assert!(
        !pvs[0].contains("pv1") && !pvs[1].contains("pv0"),
        "{pvs:?}"
    );
    apply(&mut g, &x);
    // One free PV for two images: refused in lvm2's words, naming what is short.
    let mut g = vg(&[11, 11, 60]);
    raid(&mut g, RaidLevel::Raid1, 2, 10, None).unwrap();
    let e = alloc::extend_raid(&g, "r", Extents(20), Policy::Normal, None).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, AllocError::NoPlacement { .. }), "{msg}");
    assert!(
        msg.starts_with(
            "Insufficient suitable allocatable extents for logical volume r: 40 more required"
        ) && msg.contains("r_rimage_0 20 more")
            && msg.contains("r_rimage_1 20 more"),
        "{msg}"
    );
    // --alloc anywhere lets them share it.
    let x = alloc::extend_raid(&g, "r", Extents(20), Policy::Anywhere, None).unwrap();
    for (_, s) in &x.images {
        assert!(areas(s).iter().all(|a| a.0 == "pv2"));
    }
    apply(&mut g, &x);
    // Nothing free at all.
    let e = alloc::extend_raid(&g, "r", Extents(40), Policy::Anywhere, None).unwrap_err();
    assert!(matches!(e, AllocError::InsufficientSpace { .. }), "{e}");
}

#[test]
fn another_images_metadata_extent_keeps_a_pv_off_limits() {
    // rmeta_1 sits on pv2 next to free space; image 0 must not grow there.
    let mut g = vg(&[11, 11, 40]);
    raid(&mut g, RaidLevel::Raid1, 2, 10, None).unwrap();
    let m1 = g.lv_mut("r_rmeta_1").unwrap();
    m1.segments = vec![Segment::linear(Extents(0), Extents(1), "pv2", Extents(0))];
    g.validate().unwrap();
    let e = alloc::extend_raid(&g, "r", Extents(5), Policy::Normal, None).unwrap_err();
    assert!(e.to_string().contains("r_rimage_0 5 more"), "{e}");
}

#[test]
fn pv_lists_and_contiguous_are_honoured() {
    let mut g = vg(&[30, 30, 30, 30]);
    raid(
        &mut g,
        RaidLevel::Raid1,
        2,
        10,
        Some(PvSelection::whole(["pv0", "pv1"])),
    )
    .unwrap();
    // Only pv3 named: one PV for two images.
    let sel = PvSelection::whole(["pv3"]);
    let e = alloc::extend_raid(&g, "r", Extents(5), Policy::Normal, Some(&sel)).unwrap_err();
    assert!(matches!(e, AllocError::NoPlacement { .. }), "{e}");
    let sel = PvSelection::whole(["pv2", "pv3"]);
    let x = alloc::extend_raid(&g, "r", Extents(5), Policy::Normal, Some(&sel)).unwrap();
    let used: Vec<String> = x
        .images
        .iter()
        .map(|(_, s)| areas(s)[0].0.clone())
        .collect();
    assert_eq!(used.len(), 2);
    assert_ne!(used[0], used[1]);
    assert!(used.iter().all(|p| p == "pv2" || p == "pv3"), "{used:?}");
    // Contiguous: in place, or refused when the next extents are taken.
    let x = alloc::extend_raid(&g, "r", Extents(5), Policy::Contiguous, None).unwrap();
    apply(&mut g, &x);
    assert_eq!(g.lv("r_rimage_1").unwrap().segments.len(), 1);
    linear(&mut g, "blocker", "pv1", 16, 2);
    let e = alloc::extend_raid(&g, "r", Extents(5), Policy::Contiguous, None).unwrap_err();
    assert!(
        e.to_string().starts_with(
            "Insufficient suitable contiguous allocatable extents for logical volume r"
        ),
        "{e}"
    );
}

#[test]
fn raid5_and_raid10_images_grow_by_their_share() {
    let mut g = vg(&[30, 30, 30, 30]);
    raid(&mut g, RaidLevel::Raid5, 3, 8, None).unwrap();
    // 16 LV extents over 2 data images.
    let x = alloc::extend_raid(&g, "r", Extents(6), Policy::Normal, None).unwrap();
    assert_eq!((x.image_extents.0, x.lv_extents.0), (11, 22));
    assert!(x
        .images
        .iter()
        .all(|(_, s)| areas(s).iter().map(|a| a.2).sum::<u32>() == 3));
    let e = alloc::extend_raid(&g, "r", Extents(3), Policy::Normal, None).unwrap_err();
    assert!(e.to_string().contains("do not divide evenly"), "{e}");
    // lvextend's size rounds up to whole rows first, as lvm2 rounds stripes.
    let size = alloc::parse_size("+3", true).unwrap();
    let (more, note) = size.to_extend_extents(&g, "r", None).unwrap();
    assert_eq!(more.0, 4);
    assert!(note.unwrap_or_default().contains("up to stripe boundary"));
    let mut g = vg(&[30, 30, 30, 30]);
    raid(&mut g, RaidLevel::Raid10, 4, 8, None).unwrap();
    let x = alloc::extend_raid(&g, "r", Extents(8), Policy::Normal, None).unwrap();
    assert_eq!((x.image_extents.0, x.lv_extents.0), (12, 24));
    apply(&mut g, &x);
}

#[test]
fn only_raid_lvs_are_extended_here() {
    let mut g = vg(&[30]);
    linear(&mut g, "lin", "pv0", 0, 4);
    let e = alloc::extend_raid(&g, "lin", Extents(4), Policy::Normal, None).unwrap_err();
    assert!(matches!(e, AllocError::NotExtendable { .. }), "{e}");
    let e = alloc::extend_raid(&g, "nope", Extents(4), Policy::Normal, None).unwrap_err();
    assert!(matches!(e, AllocError::UnknownLv { .. }), "{e}");
}

// ---- random VGs ------------------------------------------------------------------------

/// Free, selected, usable extents of each PV, computed from the segments directly.
fn free_extents(vg: &VolumeGroup, sel: Option<&PvSelection>) -> HashMap<String, Vec<bool>> {
    let mut free: HashMap<String, Vec<bool>> = vg
        .physical_volumes
        .iter()
        .map(|pv| {
            let ok = pv.status.has("ALLOCATABLE") && sel.is_none_or(|s| s.contains(&pv.key));
            let mut v = vec![ok; pv.pe_count.0 as usize];
            if let Some(r) = sel.and_then(|s| s.ranges_of(&pv.key)) {
                for (e, f) in v.iter_mut().enumerate() {
                    *f = *f && r.iter().any(|r| r.contains(&(e as u32)));
                }
            }
            (pv.key.clone(), v)
        })
        .collect();
    for lv in &vg.logical_volumes {
        for (p, start, len) in areas(&lv.segments) {
            if let Some(v) = free.get_mut(&p) {
                for e in start..start + len {
                    if let Some(f) = v.get_mut(e as usize) {
                        *f = false;
                    }
                }
            }
        }
    }
    free
}

/// Whether the extension could be placed under `normal` (brute force over which image, if
/// any, each PV no image uses goes to) or `contiguous` (in place after each image).
fn feasible(vg: &VolumeGroup, sel: Option<&PvSelection>, policy: Policy, grow: u64) -> bool {
    let free = free_extents(vg, sel);
    let cap = |p: &str| {
        free.get(p)
            .map_or(0, |v| v.iter().filter(|f| **f).count() as u64)
    };
    let r = alloc::raid_segment(vg, "r").expect("the raid LV");
    let used = image_pvs(vg);
    match policy {
        Policy::Contiguous => r.images.iter().all(|(_, img)| {
            let a = areas(&vg.lv(img).unwrap().segments);
            let (p, start, len) = a.last().unwrap().clone();
            let v = &free[&p];
            (start + len..start + len + grow as u32).all(|e| v.get(e as usize) == Some(&true))
        }),
        Policy::Anywhere => {
            let total: u64 = vg.physical_volumes.iter().map(|p| cap(&p.key)).sum();
            total >= grow * r.images.len() as u64
        }
        _ => {
            let n = used.len();
            let own: Vec<u64> = (0..n)
                .map(|i| {
                    used[i]
                        .iter()
                        .filter(|p| (0..n).all(|j| j == i || !used[j].contains(*p)))
                        .map(|p| cap(p))
                        .sum()
                })
                .collect();
            let fresh: Vec<u64> = vg
                .physical_volumes
                .iter()
                .filter(|p| used.iter().all(|u| !u.contains(&p.key)))
                .map(|p| cap(&p.key))
                .collect();
            // Every way of giving each fresh PV to an image or to none.
            let ways = (n as u64 + 1).pow(fresh.len() as u32);
            (0..ways).any(|mut w| {
                let mut got = own.clone();
                for &c in &fresh {
                    let to = (w % (n as u64 + 1)) as usize;
                    w /= n as u64 + 1;
                    if to < n {
                        got[to] += c;
                    }
                }
                got.iter().all(|&g| g >= grow)
            })
        }
    }
}

fn random_case(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let npv = rng.gen_range(2..=6);
    let pvs: Vec<PhysicalVolume> = (0..npv)
        .map(|i| pv(&format!("pv{i}"), rng.gen_range(4..=30), rng.gen_bool(0.9)))
        .collect();
    let mut g = lvm::vgcreate::new_vg("vg", Sectors(8192), pvs);
    for i in 0..npv {
        if rng.gen_bool(0.4) {
            let count = g.physical_volumes[i].pe_count.0;
            let start = rng.gen_range(0..count);
            let len = rng.gen_range(1..=(count - start).min(6));
            let key = g.physical_volumes[i].key.clone();
            linear(&mut g, &format!("l{i}"), &key, start, len);
        }
    }
    let (level, images) = match rng.gen_range(0..3) {
        0 => (RaidLevel::Raid1, rng.gen_range(2..=3)),
        1 => (RaidLevel::Raid5, 3),
        _ => (RaidLevel::Raid10, 4),
    };
    let per = rng.gen_range(1..=6);
    if raid(&mut g, level, images, per, None).is_none() {
        return;
    }
    let data = level.data_images(images).unwrap();
    let grow = rng.gen_range(1..=8u32);
    let sel = if rng.gen_bool(0.3) {
        let keys: Vec<String> = g
            .physical_volumes
            .iter()
            .filter(|_| rng.gen_bool(0.6))
            .map(|p| p.key.clone())
            .collect();
        (!keys.is_empty()).then(|| PvSelection::whole(keys))
    } else {
        None
    };
    let policy = match rng.gen_range(0..3) {
        0 => Policy::Normal,
        1 => Policy::Contiguous,
        _ => Policy::Anywhere,
    };
    let can = feasible(&g, sel.as_ref(), policy, u64::from(grow))
        || (policy == Policy::Anywhere
            && feasible(&g, sel.as_ref(), Policy::Normal, u64::from(grow)));
    match alloc::extend_raid(&g, "r", Extents(grow * data), policy, sel.as_ref()) {
        Ok(x) => {
            assert!(
                can,
                "seed {seed}: placed what the brute force says cannot be"
            );
            let free = free_extents(&g, sel.as_ref());
            let mut taken = HashSet::new();
            let mut pvs_of: Vec<HashSet<String>> = Vec::new();
            for (img, segs) in &x.images {
                let a = areas(segs);
                assert_eq!(
                    a.iter().map(|a| a.2).sum::<u32>(),
                    grow,
                    "seed {seed}: {img}"
                );
                for (p, start, len) in &a {
                    for e in *start..start + len {
                        assert!(free[p][e as usize], "seed {seed}: {img} on used {p}:{e}");
                        assert!(taken.insert((p.clone(), e)), "seed {seed}: {p}:{e} twice");
                    }
                }
                pvs_of.push(a.into_iter().map(|a| a.0).collect());
            }
            apply(&mut g, &x);
            if policy != Policy::Anywhere {
                // Images (with their metadata extents) on pairwise disjoint PV sets.
                let all = image_pvs(&g);
                for (i, new) in pvs_of.iter().enumerate() {
                    for (j, other) in all.iter().enumerate().filter(|(j, _)| *j != i) {
                        let shared: Vec<_> = new.intersection(other).collect();
                        assert!(
                            shared.is_empty(),
                            "seed {seed}: image {i} grew onto {shared:?}, which image {j} uses"
                        );
                    }
                }
            }
        }
        Err(e) => {
            assert!(
                matches!(
                    e,
                    AllocError::NoPlacement { .. } | AllocError::InsufficientSpace { .. }
                ),
                "seed {seed}: {e}"
            );
            assert!(
                !can,
                "seed {seed}: refused what the brute force can place: {e}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]
    #[test]
    fn random_raid_extensions_keep_images_apart_and_refuse_only_the_impossible(seed in any::<u64>()) {
        random_case(seed);
    }
}

// ---- storage hosts ----------------------------------------------------------------------

/// A VG of PVs `(size, host)`: the host named by a `host:` tag.
fn vg_on_hosts(pvs: &[(u32, &str)]) -> VolumeGroup {
    let pvs = pvs
        .iter()
        .enumerate()
        .map(|(i, &(n, h))| {
            let mut p = pv(&format!("pv{i}"), n, true);
            p.set_tags(&[format!("host:{h}")]);
            p
        })
        .collect();
    lvm::vgcreate::new_vg("vg", Sectors(8192), pvs)
}

/// The hosts each image of `r` uses.
fn image_hosts(vg: &VolumeGroup) -> Vec<HashSet<String>> {
    image_pvs(vg)
        .into_iter()
        .map(|s| {
            s.iter()
                .map(|k| vg.pv_by_key(k).and_then(|p| p.host()).expect("a host"))
                .collect()
        })
        .collect()
}

#[test]
fn images_never_share_a_host_even_on_different_pvs() {
    // Two PVs on host a, one on b: a raid1 of two images must use a and b, never both a PVs.
    let mut g = vg_on_hosts(&[(50, "a"), (50, "a"), (20, "b")]);
    raid(&mut g, RaidLevel::Raid1, 2, 10, None).unwrap();
    let h = image_hosts(&g);
    assert!(h[0].is_disjoint(&h[1]), "{h:?}");
    // Three images over two hosts: refused, saying hosts.
    let g2 = vg_on_hosts(&[(50, "a"), (50, "a"), (20, "b")]);
    let e = alloc::allocate(
        &g2,
        &Request {
            extents: Extents(5),
            legs: 3,
            raid_meta: true,
            ..Request::default()
        },
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, AllocError::TooManyLegs { pvs: 2, .. }) && msg.contains("hosts"),
        "{msg}"
    );
    // --alloc anywhere allows it.
    assert!(alloc::allocate(
        &g2,
        &Request {
            extents: Extents(5),
            legs: 3,
            raid_meta: true,
            policy: Policy::Anywhere,
            ..Request::default()
        },
    )
    .is_ok());
    // Growing: image on host b outgrows pv2 and may not move onto host a's spare PV.
    let e = alloc::extend_raid(&g, "r", Extents(20), Policy::Normal, None).unwrap_err();
    assert!(matches!(e, AllocError::NoPlacement { .. }), "{e}");
}

#[test]
fn an_image_grows_onto_another_pv_of_its_own_host() {
    // Image 0 on host a (pv0 full after it), image 1 on host b; pv1 is a's second disk.
    let mut g = vg_on_hosts(&[(11, "a"), (40, "a"), (40, "b")]);
    raid(
        &mut g,
        RaidLevel::Raid1,
        2,
        10,
        Some(PvSelection::whole(["pv0", "pv2"])),
    )
    .unwrap();
    let x = alloc::extend_raid(&g, "r", Extents(20), Policy::Normal, None).unwrap();
    apply(&mut g, &x);
    // Each image still on one host, the two apart; the a image took pv1 (pv0 was full).
    let h = image_hosts(&g);
    assert!(h[0].len() == 1 && h[1].len() == 1 && h[0] != h[1], "{h:?}");
    assert!(image_pvs(&g).iter().any(|p| p.contains("pv1")));
}

#[test]
fn successive_three_way_mirrors_spread_over_four_hosts() {
    // VastSky's pool: four hosts, raid1 -m2 LVs one after the other. Each takes the three
    // hosts with most free space, so after four LVs every host carries three images.
    let mut g = vg_on_hosts(&[(100, "h1"), (100, "h2"), (100, "h3"), (100, "h4")]);
    let mut per_host: HashMap<String, u32> = HashMap::new();
    for n in 0..4 {
        let placed = alloc::allocate(
            &g,
            &Request {
                extents: Extents(10),
                legs: 3,
                raid_meta: true,
                ..Request::default()
            },
        )
        .unwrap();
        let mut hosts = HashSet::new();
        for (i, (leg, meta)) in placed.legs.into_iter().zip(placed.meta).enumerate() {
            for (pvk, _, _) in areas(&leg) {
                let h = g.pv_by_key(&pvk).and_then(|p| p.host()).unwrap();
                hosts.insert(h.clone());
                *per_host.entry(h).or_default() += 1;
            }
            g.logical_volumes
                .push(LogicalVolume::new(&format!("m{n}_{i}"), vec![meta]));
            g.logical_volumes
                .push(LogicalVolume::new(&format!("i{n}_{i}"), leg));
        }
        assert_eq!(hosts.len(), 3, "LV {n}: three images on three hosts");
        g.validate().expect("valid VG");
    }
    let counts: Vec<u32> = per_host.values().copied().collect();
    assert_eq!(counts, vec![3; 4], "{per_host:?}");
}

/// Flags PV `key` missing, as a repair does when its host is gone.
fn mark_missing(g: &mut VolumeGroup, key: &str) {
    let pv = g
        .physical_volumes
        .iter_mut()
        .find(|p| p.key == key)
        .unwrap();
    pv.flags.set("MISSING");
}

#[test]
fn a_failed_image_is_replaced_on_a_host_no_survivor_uses() {
    let mut g = vg_on_hosts(&[(40, "h1"), (40, "h2"), (40, "h3"), (40, "h4")]);
    raid(
        &mut g,
        RaidLevel::Raid1,
        3,
        10,
        Some(PvSelection::whole(["pv0", "pv1", "pv2"])),
    )
    .unwrap();
    // The host of image 1 dies: its PV is flagged missing.
    let dead = image_pvs(&g)[1].iter().next().unwrap().clone();
    mark_missing(&mut g, &dead);
    let reps = alloc::replace_images(&g, "r", &[1], Policy::Normal).unwrap();
    assert_eq!(reps.len(), 1);
    assert_eq!(reps[0].index, 1);
    alloc::apply_replacements(&mut g, &reps).unwrap();
    g.validate().expect("valid VG after the repair");
    let h = image_hosts(&g);
    assert_eq!(h[1], HashSet::from(["h4".to_string()]), "{h:?}");
    for i in 0..3 {
        for j in i + 1..3 {
            assert!(h[i].is_disjoint(&h[j]), "{h:?}");
        }
    }
    // Another host dies and no spare is left: refused, naming why each PV was left out.
    let dead = image_pvs(&g)[2].iter().next().unwrap().clone();
    mark_missing(&mut g, &dead);
    let e = alloc::replace_images(&g, "r", &[2], Policy::Normal).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("surviving image"), "{msg}");
    // Every image failed: nothing to rebuild from.
    let e = alloc::replace_images(&g, "r", &[0, 1, 2], Policy::Anywhere).unwrap_err();
    assert!(e.to_string().contains("every image"), "{e}");
}
