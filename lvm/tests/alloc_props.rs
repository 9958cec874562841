//! Property tests of the allocator: random VGs (2-8 small PVs, random existing LVs, some PVs
//! not allocatable or missing), random PV selections, random requests and policies.
//!
//! A placement must never overlap an existing area or another new one, stay on usable,
//! selected extents, have exactly the extents asked, keep raid images on disjoint PV sets
//! (and disjoint host sets, for the half of the VGs whose PVs name storage hosts) and
//! the stripes of a segment on distinct PVs (except `anywhere`), and give one run per stripe
//! or image under `contiguous`. A refusal must be right: a brute-force search over the same
//! VG, written independently of the allocator, finds no layout the policy allows, and the
//! error is the kind that says why (no space at all, or no layout). The brute force also
//! checks every success was possible.

use std::collections::{HashMap, HashSet};
use std::ops::Range;

mod common;

use lvm::alloc::{self, AllocError, Policy, PvSelection, Request};
use lvm::model::{Area, Flags, SegmentKind};
use lvm::{Extents, LogicalVolume, Segment, VolumeGroup};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tables::Sectors;

/// A random VG: PVs, their status, and linear LVs in random places.
fn random_vg(rng: &mut StdRng) -> VolumeGroup {
    let n = rng.gen_range(2..=8);
    let mut pvs = Vec::new();
    for i in 0..n {
        let mut status = Flags::default();
        if rng.gen_bool(0.85) {
            status.set("ALLOCATABLE");
        }
        if rng.gen_bool(0.08) {
            status.set("MISSING");
        }
        pvs.push(common::bare_pv(
            &format!("pv{i}"),
            rng.gen_range(1..=40),
            status,
        ));
    }
    // Half the VGs live on storage hosts: each PV on one of 1-4 hosts, named by a `host:`
    // tag or by the NBD/iSCSI URI the PV was found at.
    if rng.gen_bool(0.5) {
        let hosts = rng.gen_range(1..=4);
        for (i, pv) in pvs.iter_mut().enumerate() {
            let h = rng.gen_range(0..hosts);
            match rng.gen_range(0..3) {
                0 => pv.set_tags(&[format!("host:h{h}")]),
                1 => pv.device = Some(format!("nbd://h{h}:10809/e{i}")),
                _ => pv.device = Some(format!("iscsi://h{h}/iqn.2026-12.test:t{i}/0")),
            }
        }
    }
    let mut vg = lvm::vgcreate::new_vg("vg", Sectors(8192), pvs);
    let mut lvs = 0;
    for i in 0..n {
        let count = vg.physical_volumes[i].pe_count.0;
        let key = vg.physical_volumes[i].key.clone();
        let mut at = rng.gen_range(0..=count.min(8));
        while at < count && rng.gen_bool(0.6) {
            let len = rng.gen_range(1..=(count - at).min(12));
            vg.logical_volumes
                .push(common::linear_at(&format!("lv{lvs}"), &key, at, len));
            lvs += 1;
            at += len + rng.gen_range(0..=6);
        }
    }
    vg.validate().expect("random VG is valid");
    vg
}

fn lv(name: &str, segments: Vec<Segment>) -> LogicalVolume {
    LogicalVolume::new(name, segments)
}

/// A random selection: all PVs, or some of them, some with extent ranges.
fn random_selection(rng: &mut StdRng, vg: &VolumeGroup) -> Option<PvSelection> {
    if rng.gen_bool(0.6) {
        return None;
    }
    let mut sel = PvSelection::new();
    for pv in &vg.physical_volumes {
        if !rng.gen_bool(0.6) {
            continue;
        }
        let count = pv.pe_count.0;
        let spec = if rng.gen_bool(0.5) {
            None
        } else {
            let a = rng.gen_range(0..count);
            let b = rng.gen_range(a..count);
            Some(format!("{a}-{b}"))
        };
        sel.add(vg, &pv.key, spec.as_deref())
            .expect("valid selection");
    }
    Some(sel)
}

fn random_policy(rng: &mut StdRng) -> Policy {
    match rng.gen_range(0..3) {
        0 => Policy::Normal,
        1 => Policy::Contiguous,
        _ => Policy::Anywhere,
    }
}

// ---- the facts, computed independently of the allocator -------------------------------

/// Per PV (VG order): the extents a request may use (usable PV, selected, free).
fn usable(vg: &VolumeGroup, sel: Option<&PvSelection>) -> Vec<(String, HashSet<u32>)> {
    let mut used: HashMap<&str, HashSet<u32>> = HashMap::new();
    for lv in &vg.logical_volumes {
        for seg in &lv.segments {
            if let SegmentKind::Striped { stripes, .. } = &seg.kind {
                let len = seg.extent_count.0 / stripes.len() as u32;
                for a in stripes {
                    used.entry(a.volume.as_str())
                        .or_default()
                        .extend(a.start.0..a.start.0 + len);
                }
            }
        }
    }
    vg.physical_volumes
        .iter()
        .map(|pv| {
            let ok = pv.status.has("ALLOCATABLE")
                && !pv.status.has("MISSING")
                && sel.is_none_or(|s| s.contains(&pv.key));
            let mut set = HashSet::new();
            if ok {
                let ranges: Vec<Range<u32>> = sel
                    .and_then(|s| s.ranges_of(&pv.key))
                    .unwrap_or_else(|| std::iter::once(0..pv.pe_count.0).collect());
                for r in ranges {
                    for e in r {
                        if !used.get(pv.key.as_str()).is_some_and(|u| u.contains(&e)) {
                            set.insert(e);
                        }
                    }
                }
            }
            (pv.key.clone(), set)
        })
        .collect()
}

/// Longest run of consecutive extents in a set.
fn longest_run(set: &HashSet<u32>) -> u64 {
    let mut best = 0u64;
    for &e in set {
        if e > 0 && set.contains(&(e - 1)) {
            continue;
        }
        let mut l = 0u64;
        while set.contains(&(e + l as u32)) {
            l += 1;
        }
        best = best.max(l);
    }
    best
}

/// Whether `per` rounds can each take one extent from `n` distinct PVs (brute force with
/// memo over the sorted capacities).
fn stripes_fit(caps: &[u64], n: usize, per: u64) -> bool {
    fn go(caps: Vec<u64>, n: usize, rem: u64, memo: &mut HashMap<(Vec<u64>, u64), bool>) -> bool {
        if rem == 0 {
            return true;
        }
        let mut key: Vec<u64> = caps
            .iter()
            .map(|&c| c.min(rem))
            .filter(|&c| c > 0)
            .collect();
        key.sort_unstable();
        if let Some(&r) = memo.get(&(key.clone(), rem)) {
            return r;
        }
        let m = key.len();
        let mut ok = false;
        if m >= n {
            // Every n-subset of the PVs.
            let mut idx: Vec<usize> = (0..n).collect();
            'outer: loop {
                let mut next = key.clone();
                for &i in &idx {
                    next[i] -= 1;
                }
                if go(next, n, rem - 1, memo) {
                    ok = true;
                    break;
                }
                let mut i = n;
                while i > 0 {
                    i -= 1;
                    if idx[i] < m - n + i {
                        idx[i] += 1;
                        for j in i + 1..n {
                            idx[j] = idx[j - 1] + 1;
                        }
                        continue 'outer;
                    }
                }
                break;
            }
        }
        memo.insert((key, rem), ok);
        ok
    }
    go(caps.to_vec(), n, per, &mut HashMap::new())
}

/// Whether the PVs split into `n` disjoint sets of at least `need` each (every assignment).
fn legs_fit(caps: &[u64], n: usize, need: u64) -> bool {
    let m = caps.len();
    let mut assign = vec![0usize; m];
    loop {
        let mut sums = vec![0u64; n + 1];
        for (i, &a) in assign.iter().enumerate() {
            sums[a] += caps[i];
        }
        if sums[..n].iter().all(|&s| s >= need) {
            return true;
        }
        let mut i = 0;
        loop {
            if i == m {
                return false;
            }
            assign[i] += 1;
            if assign[i] <= n {
                break;
            }
            assign[i] = 0;
            i += 1;
        }
    }
}

/// The failure domain of PV `key`: its host, else itself.
fn domain(vg: &VolumeGroup, key: &str) -> String {
    match vg.pv_by_key(key).and_then(|p| p.host()) {
        Some(h) => format!("host {h}"),
        None => format!("pv {key}"),
    }
}

/// Free extents per failure domain, and the domains with a run of `need` on one PV.
fn by_domain(
    vg: &VolumeGroup,
    space: &[(String, HashSet<u32>)],
    need: u64,
) -> (Vec<u64>, HashSet<String>) {
    let mut caps: Vec<(String, u64)> = Vec::new();
    let mut runs = HashSet::new();
    for (key, set) in space {
        let d = domain(vg, key);
        if longest_run(set) >= need {
            runs.insert(d.clone());
        }
        match caps.iter_mut().find(|(x, _)| *x == d) {
            Some((_, c)) => *c += set.len() as u64,
            None => caps.push((d, set.len() as u64)),
        }
    }
    (caps.into_iter().map(|(_, c)| c).collect(), runs)
}

/// Whether a request could be placed under `policy`, by brute force. Raid images (`legs`)
/// never share a failure domain (a host, or a PV without one) except under `anywhere`.
fn feasible(
    vg: &VolumeGroup,
    space: &[(String, HashSet<u32>)],
    policy: Policy,
    areas: usize,
    legs: bool,
    per: u64,
    meta: u64,
) -> bool {
    let caps: Vec<u64> = space.iter().map(|(_, s)| s.len() as u64).collect();
    let total: u64 = caps.iter().sum();
    let need = per + meta;
    let (domain_caps, domain_runs) = by_domain(vg, space, need);
    let contiguous = if legs {
        domain_runs.len() >= areas
    } else {
        space.iter().filter(|(_, s)| longest_run(s) >= need).count() >= areas
    };
    let normal = if legs {
        contiguous || legs_fit(&domain_caps, areas, need)
    } else {
        stripes_fit(&caps, areas, per)
    };
    match policy {
        Policy::Contiguous => contiguous,
        Policy::Normal | Policy::Inherit => normal,
        Policy::Anywhere => total >= areas as u64 * need,
    }
}

// ---- checking a placement -------------------------------------------------------------

/// Every area of `segs` as (pv, extents).
fn extents_of(segs: &[Segment]) -> Vec<(String, Range<u32>)> {
    let mut out = Vec::new();
    for s in segs {
        let SegmentKind::Striped { stripes, .. } = &s.kind else {
            panic!("new segment is not striped: {s:?}");
        };
        let len = s.extent_count.0 / stripes.len() as u32;
        assert_eq!(len * stripes.len() as u32, s.extent_count.0, "{s:?}");
        assert!(len > 0, "empty segment {s:?}");
        for a in stripes {
            out.push((a.volume.clone(), a.start.0..a.start.0 + len));
        }
    }
    out
}

/// New areas are on usable extents and never overlap each other.
fn check_areas(space: &[(String, HashSet<u32>)], new: &[(String, Range<u32>)]) {
    let mut taken: HashSet<(String, u32)> = HashSet::new();
    for (pv, r) in new {
        let (_, free) = space
            .iter()
            .find(|(k, _)| k == pv)
            .unwrap_or_else(|| panic!("unknown PV {pv}"));
        for e in r.clone() {
            assert!(free.contains(&e), "{pv} extent {e} is not usable: {new:?}");
            assert!(
                taken.insert((pv.clone(), e)),
                "{pv} extent {e} used twice: {new:?}"
            );
        }
    }
}

/// Segments numbered from `start` without gaps.
fn check_numbering(segs: &[Segment], start: u32) -> u32 {
    let mut at = start;
    for s in segs {
        assert_eq!(s.start_extent.0, at, "{segs:?}");
        at += s.extent_count.0;
    }
    at - start
}

fn check_striped_segments(segs: &[Segment], stripes: usize, policy: Policy) {
    for s in segs {
        let SegmentKind::Striped { stripes: a, .. } = &s.kind else {
            unreachable!()
        };
        assert_eq!(a.len(), stripes, "{s:?}");
        if policy != Policy::Anywhere {
            let pvs: HashSet<&str> = a.iter().map(|x| x.volume.as_str()).collect();
            assert_eq!(
                pvs.len(),
                stripes,
                "two stripes of one segment on one PV: {s:?}"
            );
        }
    }
    if policy == Policy::Contiguous {
        assert_eq!(segs.len(), 1, "contiguous gave several segments: {segs:?}");
    }
}

/// One request on one VG, with every check.
fn run_create(rng: &mut StdRng) {
    let mut vg = random_vg(rng);
    let sel = random_selection(rng, &vg);
    let policy = random_policy(rng);
    let legs = if rng.gen_bool(0.35) {
        rng.gen_range(2..=3)
    } else {
        1
    };
    let stripes = if legs > 1 { 1 } else { rng.gen_range(1..=4) };
    let per = rng.gen_range(1..=30u32);
    let raid_meta = legs > 1 && rng.gen_bool(0.7);
    let req = Request {
        extents: Extents(per * stripes),
        stripes,
        stripe_size: None,
        legs,
        raid_meta,
        policy,
        pvs: sel.clone(),
        approx: false,
    };
    let space = usable(&vg, sel.as_ref());
    let areas = if legs > 1 { legs } else { stripes } as usize;
    let meta = u64::from(raid_meta);
    let total: u64 = space.iter().map(|(_, s)| s.len() as u64).sum();
    let needed = areas as u64 * (u64::from(per) + meta);
    let ok = feasible(&vg, &space, policy, areas, legs > 1, u64::from(per), meta);
    match alloc::allocate(&vg, &req) {
        Ok(a) => {
            assert!(
                ok,
                "allocated what brute force says is impossible: {req:?} {a:?}"
            );
            assert_eq!(a.extents, req.extents);
            assert_eq!(a.legs.len(), legs as usize);
            let mut new = Vec::new();
            let mut sets: Vec<HashSet<String>> = Vec::new();
            for (i, leg) in a.legs.iter().enumerate() {
                assert_eq!(check_numbering(leg, 0), req.extents.0, "{a:?}");
                check_striped_segments(leg, stripes as usize, policy);
                let mut areas = extents_of(leg);
                if raid_meta {
                    let m = extents_of(std::slice::from_ref(&a.meta[i]));
                    assert_eq!(m.len(), 1);
                    assert_eq!(m[0].1.len(), 1, "metadata is one extent");
                    if policy == Policy::Contiguous {
                        assert_eq!(
                            (m[0].0.clone(), m[0].1.end),
                            (areas[0].0.clone(), areas[0].1.start),
                            "contiguous: metadata right before its image"
                        );
                    }
                    areas.extend(m);
                }
                sets.push(areas.iter().map(|(p, _)| domain(&vg, p)).collect());
                new.extend(areas);
            }
            assert_eq!(a.meta.len(), if raid_meta { legs as usize } else { 0 });
            check_areas(&space, &new);
            if legs > 1 && policy != Policy::Anywhere {
                for i in 0..sets.len() {
                    for j in i + 1..sets.len() {
                        assert!(
                            sets[i].is_disjoint(&sets[j]),
                            "images {i} and {j} share a PV or host: {sets:?}"
                        );
                    }
                }
            }
            // The model agrees: adding the new LVs keeps the VG valid.
            for (i, leg) in a.legs.into_iter().enumerate() {
                vg.logical_volumes.push(lv(&format!("new{i}"), leg));
            }
            for (i, m) in a.meta.into_iter().enumerate() {
                vg.logical_volumes.push(lv(&format!("meta{i}"), vec![m]));
            }
            vg.validate().expect("the VG with the new LVs is valid");
        }
        Err(e) => {
            match &e {
                AllocError::InsufficientSpace {
                    needed: n,
                    available,
                    ..
                } => {
                    assert_eq!((*n, *available), (needed, total), "{e}");
                    assert!(total < needed, "{e}");
                }
                AllocError::TooManyStripes { stripes: s, pvs } => {
                    assert_ne!(policy, Policy::Anywhere);
                    assert!(*s as usize > *pvs, "{e}");
                    let expect = match &sel {
                        Some(_) => space.iter().filter(|(_, s)| !s.is_empty()).count(),
                        None => vg.physical_volumes.len(),
                    };
                    assert_eq!(*pvs, expect, "{e}");
                    return;
                }
                AllocError::TooManyLegs { pvs, .. } => {
                    assert_ne!(policy, Policy::Anywhere);
                    let with = space
                        .iter()
                        .filter(|(_, s)| !s.is_empty())
                        .map(|(k, _)| domain(&vg, k))
                        .collect::<HashSet<_>>()
                        .len();
                    assert_eq!(*pvs, with, "{e}");
                    assert!(with < legs as usize);
                }
                AllocError::NoPlacement {
                    contiguous, more, ..
                } => {
                    assert!(total >= needed, "{e}");
                    assert_eq!(*contiguous, policy == Policy::Contiguous, "{e}");
                    assert_eq!(*more, needed);
                }
                other => panic!("unexpected error for {req:?}: {other}"),
            }
            assert!(!ok, "refused a request brute force can place: {req:?}: {e}");
        }
    }
}

/// An existing striped LV extended by a random amount.
fn run_extend(rng: &mut StdRng) {
    let mut vg = random_vg(rng);
    // A striped LV on distinct PVs, each area at the start of a free run.
    let stripes = rng.gen_range(1..=3usize);
    let all = usable(&vg, None);
    let mut runs: Vec<(String, u32, u32)> = Vec::new();
    for (key, set) in &all {
        let mut starts: Vec<u32> = set
            .iter()
            .copied()
            .filter(|e| *e == 0 || !set.contains(&(e - 1)))
            .collect();
        starts.sort_unstable();
        if let Some(&s) = starts.first() {
            let mut l = 0;
            while set.contains(&(s + l)) {
                l += 1;
            }
            runs.push((key.clone(), s, l));
        }
    }
    if runs.len() < stripes {
        return;
    }
    let len = rng.gen_range(1..=runs[..stripes].iter().map(|r| r.2).min().unwrap_or(1));
    let areas: Vec<Area> = runs[..stripes]
        .iter()
        .map(|(k, s, _)| Area {
            volume: k.clone(),
            start: Extents(*s),
        })
        .collect();
    let count = len * stripes as u32;
    vg.logical_volumes.push(lv(
        "s",
        vec![Segment {
            start_extent: Extents(0),
            extent_count: Extents(count),
            kind: SegmentKind::Striped {
                stripe_size: (stripes > 1).then_some(Sectors(128)),
                stripes: areas.clone(),
            },
            extra: Vec::new(),
        }],
    ));
    vg.validate().expect("valid VG with the striped LV");
    let sel = random_selection(rng, &vg);
    let policy = random_policy(rng);
    let per = rng.gen_range(1..=20u32);
    let more = per * stripes as u32;
    let space = usable(&vg, sel.as_ref());
    let total: u64 = space.iter().map(|(_, s)| s.len() as u64).sum();
    let in_place = areas.iter().all(|a| {
        space
            .iter()
            .find(|(k, _)| *k == a.volume)
            .is_some_and(|(_, s)| (a.start.0 + len..a.start.0 + len + per).all(|e| s.contains(&e)))
    });
    let ok = match policy {
        Policy::Contiguous => in_place,
        _ => feasible(&vg, &space, policy, stripes, false, u64::from(per), 0),
    };
    match alloc::extend(&vg, "s", Extents(more), policy, sel.as_ref()) {
        Ok(segs) => {
            assert!(ok, "extended where brute force says impossible: {segs:?}");
            assert_eq!(check_numbering(&segs, count), more);
            check_striped_segments(&segs, stripes, policy);
            for s in &segs {
                let SegmentKind::Striped { stripe_size, .. } = &s.kind else {
                    unreachable!()
                };
                assert_eq!(*stripe_size, (stripes > 1).then_some(Sectors(128)));
            }
            if policy == Policy::Contiguous {
                let (_, a) = match &segs[0].kind {
                    SegmentKind::Striped { stripes, .. } => ((), stripes),
                    SegmentKind::Other { .. } => unreachable!(),
                };
                for (old, new) in areas.iter().zip(a) {
                    assert_eq!(new.volume, old.volume);
                    assert_eq!(new.start.0, old.start.0 + len, "not in place");
                }
            }
            check_areas(&space, &extents_of(&segs));
            let lv = vg
                .logical_volumes
                .iter_mut()
                .find(|l| l.name == "s")
                .unwrap();
            lv.segments.extend(segs);
            vg.validate().expect("the extended VG is valid");
        }
        Err(e) => {
            assert!(
                !ok,
                "refused an extension brute force can place ({policy}): {e}"
            );
            match &e {
                AllocError::InsufficientSpace { available, .. } => {
                    assert_eq!(*available, total);
                    assert!(total < u64::from(more));
                }
                AllocError::NoPlacement { lv, .. } => {
                    assert_eq!(lv.as_deref(), Some("s"));
                    assert!(total >= u64::from(more));
                }
                other => panic!("unexpected error: {other}"),
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn create_is_valid_or_rightly_refused(seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        for _ in 0..8 {
            run_create(&mut rng);
        }
    }

    #[test]
    fn extend_is_valid_or_rightly_refused(seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        for _ in 0..8 {
            run_extend(&mut rng);
        }
    }
}
