//! Placement: which runs of which PVs each stripe or raid image gets, under a policy (the
//! rules are in the module docs of [`super`]).

use std::cmp::Reverse;
use std::ops::Range;

use tables::Sectors;

use super::space::{len, PvSpace, Space};
use super::{AllocError, Allocation, Policy};
use crate::model::{Area, Segment, SegmentKind};
use crate::units::Extents;

/// Nodes the search for disjoint image PV sets may visit before giving up (VGs of a few
/// dozen PVs finish far below it).
const SEARCH_BUDGET: u64 = 1_000_000;

/// What is being placed.
#[derive(Copy, Clone, Debug)]
pub(crate) struct Shape {
    /// Parallel areas: stripes, or raid images.
    pub areas: u32,
    /// Raid images (disjoint PV sets, each its own segment list) rather than stripes.
    pub legs: bool,
    /// One metadata extent before each image.
    pub meta: bool,
}

/// One segment of a striped or linear LV: `len` extents on each area.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Round {
    /// Extents of each area.
    pub len: u32,
    /// (PV index in the space, first extent) of each stripe.
    pub areas: Vec<(usize, u32)>,
}

/// A run of extents on one PV.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) struct Piece {
    pub pv: usize,
    pub start: u32,
    pub len: u32,
}

/// A placement.
#[derive(Clone, Debug)]
pub(crate) enum Placed {
    /// Segments of a linear or striped LV.
    Rounds(Vec<Round>),
    /// Runs of each raid image.
    Legs {
        /// The runs, in order, of each image.
        pieces: Vec<Vec<Piece>>,
        /// Whether each image's first run starts with its metadata extent.
        meta: bool,
    },
}

fn internal(what: &str) -> String {
    format!("internal error: {what}")
}

/// Places `shape.areas` areas of `per` extents each (plus the metadata extents) in `sp`,
/// taking them from it. `prev` (extensions): the PV key and end extent of each stripe's last
/// area; `lv` names the LV in errors.
pub(crate) fn place(
    sp: &mut Space,
    shape: &Shape,
    per: u32,
    policy: Policy,
    prev: Option<&[(String, u32)]>,
    lv: Option<&str>,
) -> Result<Placed, AllocError> {
    let meta = u64::from(shape.meta && shape.legs);
    let n = shape.areas as usize;
    let needed = u64::from(shape.areas) * (u64::from(per) + meta);
    let available = sp.total();
    if needed > available {
        return Err(AllocError::InsufficientSpace {
            needed,
            available,
            why: sp.skipped.join("; "),
        });
    }
    let no_placement = |contiguous: bool, why: String| AllocError::NoPlacement {
        contiguous,
        lv: lv.map(str::to_string),
        more: needed,
        why,
    };
    let prev: Vec<Option<(usize, u32)>> = prev
        .map(|p| {
            p.iter()
                .map(|(key, end)| sp.pvs.iter().position(|s| &s.key == key).map(|i| (i, *end)))
                .collect()
        })
        .unwrap_or_default();
    let domains = sp.domains_with_space();
    if shape.legs && policy != Policy::Anywhere && domains < n {
        return Err(AllocError::TooManyLegs {
            legs: shape.areas,
            pvs: domains,
            hosts: sp.pvs.iter().any(|p| p.host.is_some()),
            why: describe(sp),
        });
    }
    let need = u64::from(per) + meta;
    match policy {
        Policy::Contiguous => {
            if shape.legs {
                contiguous(sp, n, need, true)
                    .map(|p| Placed::Legs {
                        pieces: p.into_iter().map(|p| vec![p]).collect(),
                        meta: meta > 0,
                    })
                    .map_err(|why| no_placement(true, why))
            } else if !prev.is_empty() {
                in_place(sp, &prev, per)
                    .map(|r| Placed::Rounds(vec![r]))
                    .map_err(|why| no_placement(true, why))
            } else {
                contiguous(sp, n, need, false)
                    .map(|p| {
                        Placed::Rounds(vec![Round {
                            len: per,
                            areas: p.iter().map(|p| (p.pv, p.start)).collect(),
                        }])
                    })
                    .map_err(|why| no_placement(true, why))
            }
        }
        Policy::Normal | Policy::Inherit => normal(sp, shape, per, need, meta > 0, &prev)
            .map_err(|why| no_placement(false, format!("normal policy: {why}"))),
        Policy::Anywhere => {
            let mut trial = sp.clone();
            match normal(&mut trial, shape, per, need, meta > 0, &prev) {
                Ok(p) => {
                    *sp = trial;
                    Ok(p)
                }
                Err(_) if shape.legs => legs_anywhere(sp, n, need)
                    .map(|pieces| Placed::Legs {
                        pieces,
                        meta: meta > 0,
                    })
                    .map_err(|why| no_placement(false, why)),
                Err(_) => anywhere(sp, n, per)
                    .map(Placed::Rounds)
                    .map_err(|why| no_placement(false, why)),
            }
        }
    }
}

fn normal(
    sp: &mut Space,
    shape: &Shape,
    per: u32,
    need: u64,
    meta: bool,
    prev: &[Option<(usize, u32)>],
) -> Result<Placed, String> {
    let n = shape.areas as usize;
    if shape.legs {
        legs_normal(sp, n, need).map(|pieces| Placed::Legs { pieces, meta })
    } else {
        rounds(sp, n, per, prev).map(Placed::Rounds)
    }
}

/// Each PV's free extents and largest run, and the PVs left out: the facts behind an error.
pub(crate) fn describe(sp: &Space) -> String {
    let mut parts: Vec<String> = sp
        .pvs
        .iter()
        .map(|p| match p.largest() {
            None => format!("{}: no free extents", p.name),
            Some(r) => format!(
                "{}: {} free, largest run {} (PE {}-{})",
                p.name,
                p.cap(),
                len(r),
                r.start,
                r.end - 1
            ),
        })
        .collect();
    parts.extend(sp.skipped.iter().cloned());
    if parts.is_empty() {
        "no usable PVs".into()
    } else {
        parts.join("; ")
    }
}

/// `n` runs of `need` extents on distinct PVs (raid images, `legs`: on distinct failure
/// domains, i.e. hosts): in PV order, the run lvm2 would take on each PV that has one
/// holding `need` ([`PvSpace::lvm2_run`]).
fn contiguous(sp: &mut Space, n: usize, need: u64, legs: bool) -> Result<Vec<Piece>, String> {
    let Ok(need32) = u32::try_from(need) else {
        return Err(format!("{need} extents do not fit a PV"));
    };
    let mut out = Vec::with_capacity(n);
    let mut taken = std::collections::HashSet::new();
    for (i, pv) in sp.pvs.iter().enumerate() {
        if out.len() == n {
            break;
        }
        if legs && taken.contains(&sp.domain(i)) {
            continue;
        }
        if let Some(r) = pv.lvm2_run(need).filter(|r| len(r) >= need) {
            if legs {
                taken.insert(sp.domain(i));
            }
            out.push(Piece {
                pv: i,
                start: r.start,
                len: need32,
            });
        }
    }
    if out.len() < n {
        let what = if n == 1 { "the area" } else { "each area" };
        let by_host = legs && sp.pvs.iter().any(|p| p.host.is_some());
        return Err(format!(
            "{what} needs a free run of {need} extents{}, and {} {} have one: {}",
            match (n > 1, by_host) {
                (false, _) => "",
                (true, false) => " on a PV of its own",
                (true, true) => " on a PV of its own host",
            },
            out.len(),
            if by_host { "host(s)" } else { "PV(s)" },
            describe(sp)
        ));
    }
    for p in &out {
        if !sp.pvs[p.pv].take(p.start, p.len) {
            return Err(internal("a chosen run is not free"));
        }
    }
    Ok(out)
}

/// Each stripe continues right after its last area (contiguous extension).
fn in_place(sp: &mut Space, prev: &[Option<(usize, u32)>], per: u32) -> Result<Round, String> {
    let mut areas = Vec::with_capacity(prev.len());
    for (i, p) in prev.iter().enumerate() {
        let stripe = if prev.len() > 1 {
            format!("stripe {} ", i + 1)
        } else {
            String::new()
        };
        let Some((pv, end)) = *p else {
            return Err(format!(
                "{stripe}must continue on its PV, which is not usable here (not allocatable, \
                 missing or not in the PV list): {}",
                describe(sp)
            ));
        };
        let s = &sp.pvs[pv];
        let fits = end
            .checked_add(per)
            .is_some_and(|e| s.runs.iter().any(|r| r.start <= end && e <= r.end));
        if !fits {
            return Err(format!(
                "{stripe}must continue at {} PE {end} with {per} extents: {}",
                s.name,
                blocked(s, end, per)
            ));
        }
        areas.push((pv, end));
    }
    for &(pv, start) in &areas {
        if !sp.pvs[pv].take(start, per) {
            return Err(internal("an in-place run is not free"));
        }
    }
    Ok(Round { len: per, areas })
}

/// Why `start..start+n` of `s` is not free.
fn blocked(s: &PvSpace, start: u32, n: u32) -> String {
    let end = u64::from(start) + u64::from(n);
    if end > u64::from(s.pe_count) {
        return format!("it has only {} extents", s.pe_count);
    }
    if let Some(u) = s
        .used
        .iter()
        .find(|u| u64::from(u.range.start) < end && u.range.end > start)
    {
        return format!(
            "PE {}-{} are used by LV {}",
            u.range.start.max(start),
            u.range.end - 1,
            u.lv
        );
    }
    "those extents are outside the selected PE ranges".into()
}

/// Striped (or linear) placement in segments whose areas are on distinct PVs.
///
/// Feasible exactly when the PVs, each counted up to `per` extents, hold `n * per`: each
/// segment takes one area from each of `n` distinct PVs, so a PV gives at most `per` in
/// total; conversely any layout keeping that condition true after each segment can always
/// continue (taking the `n` PVs with most space is such a step), so the loop below keeps it
/// true and only then prefers fewer segments (each stripe staying on its PV, in place).
fn rounds(
    sp: &mut Space,
    n: usize,
    per: u32,
    prev: &[Option<(usize, u32)>],
) -> Result<Vec<Round>, String> {
    let mut rem = u64::from(per);
    let nn = n as u64;
    let capped: u64 = sp.pvs.iter().map(|p| p.cap().min(rem)).sum();
    if capped < nn * rem {
        return Err(format!(
            "the {n} stripes of a segment must be on distinct PVs, so each PV can give at most \
             {rem} extents (one stripe's length); they can give {capped} of the {} needed: {}",
            nn * rem,
            describe(sp)
        ));
    }
    let mut last: Vec<Option<(usize, u32)>> = if prev.len() == n {
        prev.to_vec()
    } else {
        vec![None; n]
    };
    let mut out: Vec<Round> = Vec::new();
    while rem > 0 {
        let caps: Vec<u64> = sp.pvs.iter().map(PvSpace::cap).collect();
        let mut pick = None;
        if let Some(c) = preferred(sp, &caps, &last, rem) {
            let runs = runs_for(sp, &c, &last, rem);
            let l = max_len(&caps, &c, &runs, rem, nn);
            if l > 0 {
                pick = Some((c, runs, l));
            }
        }
        if pick.is_none() {
            let c = most_space(&caps, &last, rem).ok_or_else(|| internal("too few PVs"))?;
            let runs = runs_for(sp, &c, &last, rem);
            let l = max_len(&caps, &c, &runs, rem, nn);
            if l == 0 {
                return Err(internal("no progress"));
            }
            pick = Some((c, runs, l));
        }
        let Some((c, runs, l)) = pick else {
            return Err(internal("no choice"));
        };
        let l32 = u32::try_from(l).map_err(|_| internal("segment length"))?;
        let mut areas = Vec::with_capacity(n);
        for (i, (&p, r)) in c.iter().zip(&runs).enumerate() {
            if !sp.pvs[p].take(r.start, l32) {
                return Err(internal("a chosen run is not free"));
            }
            areas.push((p, r.start));
            last[i] = Some((p, r.start.saturating_add(l32)));
        }
        // A segment whose every area continues the previous one's is the same segment.
        match out.last_mut() {
            Some(prev)
                if prev.areas.iter().zip(&areas).all(|(a, b)| {
                    a.0 == b.0 && u64::from(a.1) + u64::from(prev.len) == u64::from(b.1)
                }) =>
            {
                prev.len = prev.len.saturating_add(l32);
            }
            _ => out.push(Round { len: l32, areas }),
        }
        rem -= l;
    }
    Ok(out)
}

/// Distinct PVs for the stripes: each stripe's previous PV if it has space, the rest by
/// largest usable run (capped at `rem`), then PV order.
fn preferred(
    sp: &Space,
    caps: &[u64],
    last: &[Option<(usize, u32)>],
    rem: u64,
) -> Option<Vec<usize>> {
    let mut c: Vec<Option<usize>> = vec![None; last.len()];
    let mut taken = vec![false; caps.len()];
    for (i, l) in last.iter().enumerate() {
        if let Some((p, _)) = *l {
            if caps[p] > 0 && !taken[p] {
                c[i] = Some(p);
                taken[p] = true;
            }
        }
    }
    let mut cands: Vec<usize> = (0..caps.len())
        .filter(|&p| caps[p] > 0 && !taken[p])
        .collect();
    cands.sort_by_key(|&p| {
        let usable = sp.pvs[p].lvm2_run(rem).map_or(0, |r| len(r).min(rem));
        (Reverse(usable), p)
    });
    let mut it = cands.into_iter();
    c.into_iter().map(|x| x.or_else(|| it.next())).collect()
}

/// The `n` PVs with the most space (capped at `rem`; PV order on ties), stripes keeping
/// their previous PV when it is among them.
fn most_space(caps: &[u64], last: &[Option<(usize, u32)>], rem: u64) -> Option<Vec<usize>> {
    let n = last.len();
    let mut cands: Vec<usize> = (0..caps.len()).filter(|&p| caps[p] > 0).collect();
    cands.sort_by_key(|&p| (Reverse(caps[p].min(rem)), p));
    if cands.len() < n {
        return None;
    }
    cands.truncate(n);
    let mut c: Vec<Option<usize>> = vec![None; n];
    let mut free = cands.clone();
    for (i, l) in last.iter().enumerate() {
        if let Some((p, _)) = *l {
            if let Some(k) = free.iter().position(|&q| q == p) {
                c[i] = Some(free.remove(k));
            }
        }
    }
    let mut it = free.into_iter();
    c.into_iter().map(|x| x.or_else(|| it.next())).collect()
}

/// The run each chosen PV gives its stripe: on the PV of the stripe's last area, the run
/// right after that area, else the largest (lvm2's contiguous, then cling); on another PV,
/// the run lvm2 would take ([`PvSpace::lvm2_run`]).
fn runs_for(sp: &Space, c: &[usize], last: &[Option<(usize, u32)>], rem: u64) -> Vec<Range<u32>> {
    c.iter()
        .zip(last)
        .map(|(&p, l)| {
            let s = &sp.pvs[p];
            let run = match *l {
                Some((q, end)) if q == p => s.run_at(end).or_else(|| s.largest()),
                _ => s.lvm2_run(rem),
            };
            run.cloned().unwrap_or(0..0)
        })
        .collect()
}

/// The longest segment (at most `rem` and each chosen run) after which the PVs, each counted
/// up to a stripe's remaining length, still hold all remaining stripes.
fn max_len(caps: &[u64], c: &[usize], runs: &[Range<u32>], rem: u64, n: u64) -> u64 {
    let limit = runs.iter().map(len).fold(rem, u64::min);
    let mut chosen = vec![false; caps.len()];
    for &p in c {
        chosen[p] = true;
    }
    let fixed: u64 = c.iter().map(|&p| caps[p].min(rem)).sum();
    let ok = |l: u64| {
        let others: u64 = (0..caps.len())
            .filter(|&p| !chosen[p])
            .map(|p| caps[p].min(rem - l))
            .sum();
        fixed + others >= n * rem
    };
    let (mut lo, mut hi) = (0u64, limit);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if ok(mid) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

/// Raid images on disjoint PV sets (disjoint host sets where PVs name hosts): one run each
/// if `contiguous` can, else a search for disjoint sets of PVs holding `need` extents each.
/// When PVs name hosts, the search (hosts with most free space first) goes first, so that
/// successive LVs spread over the hosts instead of filling the first ones in VG order; it
/// still takes one run per image where a PV of the chosen host has one.
fn legs_normal(sp: &mut Space, n: usize, need: u64) -> Result<Vec<Vec<Piece>>, String> {
    let by_host = sp.pvs.iter().any(|p| p.host.is_some());
    let mut trial = sp.clone();
    if !by_host {
        if let Ok(p) = contiguous(&mut trial, n, need, true) {
            *sp = trial;
            return Ok(p.into_iter().map(|p| vec![p]).collect());
        }
    }
    let sets = disjoint_sets(sp, n, need)?;
    sets.iter().map(|set| pieces(sp, set, need)).collect()
}

/// Disjoint sets of PVs (indices), each with at least `need` free extents; PVs with most
/// space first, each opening a new set before joining an unfinished one.
fn disjoint_sets(sp: &Space, n: usize, need: u64) -> Result<Vec<Vec<usize>>, String> {
    let all: Vec<usize> = (0..sp.pvs.len()).collect();
    let what = if sp.pvs.iter().any(|p| p.host.is_some()) {
        "PVs, no host in two of them,"
    } else {
        "PVs"
    };
    disjoint_sets_for(sp, &all, &vec![need; n]).map_err(|limit| {
        format!(
            "the {n} images need disjoint sets of {what} with {need} free extents each{limit}: {}",
            describe(sp)
        )
    })
}

/// Disjoint sets of the PVs `cands` (indices into `sp`), set `j` with at least `needs[j]`
/// free extents (an empty set for a need of 0), and no failure domain (host) in two sets:
/// the PVs of one host go to one set together. Hosts (and PVs without one) with most space
/// first, each opening a new set before joining an unfinished one, so successive raid LVs
/// spread over the hosts with most room. The error is empty, or says the search gave up.
pub(crate) fn disjoint_sets_for(
    sp: &Space,
    cands: &[usize],
    needs: &[u64],
) -> Result<Vec<Vec<usize>>, String> {
    // One entry per failure domain: its PVs (with space) and their total space.
    let mut groups: Vec<(String, Vec<usize>, u64)> = Vec::new();
    for &i in cands {
        let cap = sp.pvs[i].cap();
        if cap == 0 {
            continue;
        }
        let d = sp.domain(i);
        match groups.iter_mut().find(|g| g.0 == d) {
            Some(g) => {
                g.1.push(i);
                g.2 += cap;
            }
            None => groups.push((d, vec![i], cap)),
        }
    }
    let mut order: Vec<(Vec<usize>, u64)> = groups.into_iter().map(|(_, p, c)| (p, c)).collect();
    order.sort_by_key(|(p, c)| (Reverse(*c), p[0]));
    // suffix[k]: space of order[k..].
    let mut suffix = vec![0u64; order.len() + 1];
    for k in (0..order.len()).rev() {
        suffix[k] = suffix[k + 1] + order[k].1;
    }
    struct Search<'a> {
        order: &'a [(Vec<usize>, u64)],
        suffix: &'a [u64],
        needs: &'a [u64],
        sums: Vec<u64>,
        sets: Vec<Vec<usize>>,
        budget: u64,
    }
    impl Search<'_> {
        fn go(&mut self, k: usize) -> bool {
            let deficit: u64 = self
                .sums
                .iter()
                .zip(self.needs)
                .map(|(&s, &need)| need.saturating_sub(s))
                .sum();
            if deficit == 0 {
                return true;
            }
            if k == self.order.len() || self.suffix[k] < deficit || self.budget == 0 {
                return false;
            }
            self.budget -= 1;
            let (pvs, cap) = (&self.order[k].0, self.order[k].1);
            // Empty sets of equal need are interchangeable: try the first of each need only,
            // before partial sets.
            let mut tries: Vec<usize> = Vec::new();
            for j in 0..self.sums.len() {
                let need = self.needs[j];
                if self.sums[j] == 0
                    && need > 0
                    && !tries
                        .iter()
                        .any(|&t| self.sums[t] == 0 && self.needs[t] == need)
                {
                    tries.push(j);
                }
            }
            tries.extend(
                (0..self.sums.len()).filter(|&j| self.sums[j] > 0 && self.sums[j] < self.needs[j]),
            );
            for j in tries {
                self.sums[j] += cap;
                let before = self.sets[j].len();
                self.sets[j].extend_from_slice(pvs);
                if self.go(k + 1) {
                    return true;
                }
                self.sets[j].truncate(before);
                self.sums[j] -= cap;
            }
            self.go(k + 1)
        }
    }
    let mut s = Search {
        order: &order,
        suffix: &suffix,
        needs,
        sums: vec![0; needs.len()],
        sets: vec![Vec::new(); needs.len()],
        budget: SEARCH_BUDGET,
    };
    if s.go(0) {
        let mut sets = s.sets;
        for set in &mut sets {
            set.sort_unstable();
        }
        return Ok(sets);
    }
    Err(if s.budget == 0 {
        format!(" (gave up after {SEARCH_BUDGET} steps)")
    } else {
        String::new()
    })
}

/// Runs for `need` extents from the PVs `set`: the smallest run that holds what is left,
/// else the largest (whole), repeated.
fn pieces(sp: &mut Space, set: &[usize], need: u64) -> Result<Vec<Piece>, String> {
    let mut rem = need;
    let mut out = Vec::new();
    while rem > 0 {
        let runs = set
            .iter()
            .flat_map(|&p| sp.pvs[p].runs.iter().map(move |r| (p, r.clone())));
        let mut fit: Option<(usize, Range<u32>)> = None;
        let mut big: Option<(usize, Range<u32>)> = None;
        for (p, r) in runs {
            if len(&r) >= rem && fit.as_ref().is_none_or(|f| len(&r) < len(&f.1)) {
                fit = Some((p, r.clone()));
            }
            if big.as_ref().is_none_or(|b| len(&r) > len(&b.1)) {
                big = Some((p, r));
            }
        }
        let (p, r, take) = match (fit, big) {
            (Some((p, r)), _) => (p, r, rem),
            (None, Some((p, r))) => {
                let l = len(&r);
                (p, r, l)
            }
            (None, None) => return Err(internal("a PV set ran out of space")),
        };
        let t32 = u32::try_from(take).map_err(|_| internal("run length"))?;
        if t32 == 0 || !sp.pvs[p].take(r.start, t32) {
            return Err(internal("a chosen run is not free"));
        }
        out.push(Piece {
            pv: p,
            start: r.start,
            len: t32,
        });
        rem -= take;
    }
    Ok(out)
}

/// Raid images anywhere (`anywhere`, after `normal` failed): one after the other, from any
/// PV.
fn legs_anywhere(sp: &mut Space, n: usize, need: u64) -> Result<Vec<Vec<Piece>>, String> {
    let all: Vec<usize> = (0..sp.pvs.len()).collect();
    (0..n).map(|_| pieces(sp, &all, need)).collect()
}

/// Stripes anywhere (`anywhere`, after `normal` failed): segments as long as `n` areas of
/// that length can be cut from the free runs, largest runs first, several from one run if it
/// holds them.
fn anywhere(sp: &mut Space, n: usize, per: u32) -> Result<Vec<Round>, String> {
    let mut rem = u64::from(per);
    let nn = n as u64;
    let mut out = Vec::new();
    while rem > 0 {
        let mut runs: Vec<(usize, Range<u32>)> = sp
            .pvs
            .iter()
            .enumerate()
            .flat_map(|(p, s)| s.runs.iter().map(move |r| (p, r.clone())))
            .collect();
        runs.sort_by_key(|(p, r)| (Reverse(len(r)), *p, r.start));
        let areas_of = |l: u64| runs.iter().map(|(_, r)| len(r) / l).sum::<u64>();
        if areas_of(1) < nn {
            return Err(format!(
                "{} free extents for {n} stripes of {rem}: {}",
                sp.total(),
                describe(sp)
            ));
        }
        let (mut lo, mut hi) = (1u64, rem);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if areas_of(mid) >= nn {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        let l32 = u32::try_from(lo).map_err(|_| internal("segment length"))?;
        // One area per PV first (largest runs first), then more from the runs that hold
        // them.
        let mut used = vec![0u64; runs.len()];
        let mut on_pv = vec![false; sp.pvs.len()];
        let mut areas = Vec::with_capacity(n);
        for (k, (p, r)) in runs.iter().enumerate() {
            if areas.len() < n && !on_pv[*p] && len(r) >= lo {
                on_pv[*p] = true;
                used[k] = 1;
                areas.push((*p, r.start));
            }
        }
        for (k, (p, r)) in runs.iter().enumerate() {
            while areas.len() < n && (used[k] + 1) * lo <= len(r) {
                let at = u64::from(r.start) + used[k] * lo;
                areas.push((*p, u32::try_from(at).map_err(|_| internal("area start"))?));
                used[k] += 1;
            }
        }
        if areas.len() < n {
            return Err(internal("too few areas"));
        }
        for &(p, start) in &areas {
            if !sp.pvs[p].take(start, l32) {
                return Err(internal("a chosen run is not free"));
            }
        }
        out.push(Round { len: l32, areas });
        rem -= lo;
    }
    Ok(out)
}

impl Placed {
    /// The model's segments for this placement.
    pub(crate) fn into_allocation(
        self,
        sp: &Space,
        stripe_size: Option<Sectors>,
        extents: u32,
    ) -> Allocation {
        let key = |p: usize| sp.pvs[p].key.clone();
        match self {
            Placed::Rounds(rounds) => {
                let mut segs = Vec::with_capacity(rounds.len());
                let mut at = 0u32;
                for r in rounds {
                    let n = u32::try_from(r.areas.len()).unwrap_or(u32::MAX);
                    let count = r.len.saturating_mul(n);
                    segs.push(Segment {
                        start_extent: Extents(at),
                        extent_count: Extents(count),
                        kind: SegmentKind::Striped {
                            stripe_size: if n > 1 { stripe_size } else { None },
                            stripes: r
                                .areas
                                .iter()
                                .map(|&(p, s)| Area {
                                    volume: key(p),
                                    start: Extents(s),
                                })
                                .collect(),
                        },
                        extra: Vec::new(),
                    });
                    at = at.saturating_add(count);
                }
                Allocation {
                    legs: vec![segs],
                    meta: Vec::new(),
                    extents: Extents(extents),
                }
            }
            Placed::Legs {
                pieces: legs,
                meta: with_meta,
            } => {
                let mut out = Vec::with_capacity(legs.len());
                let mut meta = Vec::new();
                for pieces in legs {
                    let mut segs = Vec::new();
                    let mut at = 0u32;
                    for (i, mut p) in pieces.into_iter().enumerate() {
                        if i == 0 && with_meta && p.len > 0 {
                            // The first run starts with the metadata extent.
                            meta.push(Segment::linear(
                                Extents(0),
                                Extents(1),
                                &key(p.pv),
                                Extents(p.start),
                            ));
                            p.start = p.start.saturating_add(1);
                            p.len -= 1;
                        }
                        if p.len == 0 {
                            continue;
                        }
                        segs.push(Segment::linear(
                            Extents(at),
                            Extents(p.len),
                            &key(p.pv),
                            Extents(p.start),
                        ));
                        at = at.saturating_add(p.len);
                    }
                    out.push(segs);
                }
                Allocation {
                    legs: out,
                    meta,
                    extents: Extents(extents),
                }
            }
        }
    }
}
