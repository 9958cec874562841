//! Free space: the extents of each PV that no segment area uses, and the part of them a
//! request may use (allocatable, present, selected PVs and ranges).

use std::collections::{HashMap, HashSet};
use std::ops::Range;

use super::{AllocError, PvSelection};
use crate::model::{PhysicalVolume, SegmentKind, VolumeGroup};
use crate::text::{Item, Value};

/// Extents of one PV used by an LV.
#[derive(Clone, Debug)]
pub(crate) struct Use {
    /// The extents (clipped to the PV).
    pub range: Range<u32>,
    /// The LV using them.
    pub lv: String,
}

/// The areas of each PV (by key) that segments use, sorted by start (they may overlap in an
/// invalid VG; everything here copes).
pub(crate) fn used(vg: &VolumeGroup) -> HashMap<&str, Vec<Use>> {
    let pe_count: HashMap<&str, u32> = vg
        .physical_volumes
        .iter()
        .map(|p| (p.key.as_str(), p.pe_count.0))
        .collect();
    let mut used: HashMap<&str, Vec<Use>> = HashMap::new();
    let mut add = |key: &str, start: u32, len: u64, lv: &str| {
        if let Some((&k, &count)) = pe_count.get_key_value(key) {
            let end = (u64::from(start) + len).min(u64::from(count));
            // `end` is at most `count`, a u32.
            let end = u32::try_from(end).unwrap_or(count);
            if start < end {
                used.entry(k).or_default().push(Use {
                    range: start..end,
                    lv: lv.to_string(),
                });
            }
        }
    };
    for lv in &vg.logical_volumes {
        for seg in &lv.segments {
            let count = u64::from(seg.extent_count.0);
            match &seg.kind {
                SegmentKind::Striped { stripes, .. } => {
                    let n = (stripes.len() as u64).max(1);
                    for a in stripes {
                        add(&a.volume, a.start.0, count / n, &lv.name);
                    }
                }
                SegmentKind::Other { .. } => {
                    // Any `"pvN", extent` pair list (mirror or raid areas on PVs, as old
                    // metadata has them): each area counted as the whole segment, which
                    // covers at least what lvm2 counts.
                    for (key, item) in &seg.extra {
                        let Item::Array(list) = item else { continue };
                        let Some(areas) = pv_pairs(list) else {
                            continue;
                        };
                        let n = (areas.len() as u64).max(1);
                        let len = if key == "stripes" { count / n } else { count };
                        for (pv, start) in areas {
                            add(pv, start, len, &lv.name);
                        }
                    }
                }
            }
        }
    }
    for list in used.values_mut() {
        list.sort_by_key(|u| (u.range.start, u.range.end));
    }
    used
}

/// `["pv0", 0, "pv1", 10]` as pairs; `None` if the list is not all such pairs.
fn pv_pairs(list: &[Value]) -> Option<Vec<(&str, u32)>> {
    if list.is_empty() || !list.len().is_multiple_of(2) {
        return None;
    }
    list.chunks_exact(2)
        .map(|pair| match pair {
            [Value::Str(v), Value::Int(n)] => u32::try_from(*n).ok().map(|n| (v.as_str(), n)),
            _ => None,
        })
        .collect()
}

/// The free runs of a PV of `pe_count` extents, given its used areas sorted by start.
pub(crate) fn free_runs(pe_count: u32, used: Option<&Vec<Use>>) -> Vec<Range<u32>> {
    let mut runs = Vec::new();
    let mut at = 0u32;
    for u in used.map(|v| v.as_slice()).unwrap_or_default() {
        if u.range.start > at {
            runs.push(at..u.range.start);
        }
        at = at.max(u.range.end);
    }
    if at < pe_count {
        runs.push(at..pe_count);
    }
    runs
}

/// The usable free runs of one PV.
#[derive(Clone, Debug)]
pub(crate) struct PvSpace {
    /// The PV's key.
    pub key: String,
    /// How to name it in messages: `pv0 (/dev/sdb)`.
    pub name: String,
    /// Free runs, sorted by start, disjoint, none empty.
    pub runs: Vec<Range<u32>>,
    /// Extents on the PV.
    pub pe_count: u32,
    /// What uses its other extents (for messages).
    pub used: Vec<Use>,
    /// The storage host it lives on ([`PhysicalVolume::host`]); `None`: its own domain.
    pub host: Option<String>,
}

impl PvSpace {
    /// Free extents.
    pub fn cap(&self) -> u64 {
        self.runs.iter().map(|r| u64::from(r.end - r.start)).sum()
    }

    /// The longest run (the first of equal ones).
    pub fn largest(&self) -> Option<&Range<u32>> {
        self.runs
            .iter()
            .reduce(|a, b| if len(b) > len(a) { b } else { a })
    }

    /// The run lvm2 2.03 takes on this PV for an area of `need` extents (its
    /// `_find_some_parallel_space` over one PV's areas, largest first): the largest run; if
    /// that holds `need`, the search goes on past every run longer than what would be left
    /// of it and takes the next run if that still holds `need`, and so on. So it is often,
    /// not always, the smallest run that holds `need`; among equal runs the order is by
    /// extent.
    pub fn lvm2_run(&self, need: u64) -> Option<&Range<u32>> {
        let mut sorted: Vec<&Range<u32>> = self.runs.iter().collect();
        sorted.sort_by_key(|r| (std::cmp::Reverse(len(r)), r.start));
        let mut i = 0;
        let mut cur = *sorted.first()?;
        loop {
            if len(cur) < need {
                return Some(cur);
            }
            let rest = len(cur) - need;
            // A run used whole is only marked reserved and the walk goes on to the next one;
            // a run used in part is moved after the runs at least as long as its rest, and
            // the walk goes on from there.
            let next = if rest == 0 {
                i + 1
            } else {
                (i + 1..sorted.len())
                    .find(|&j| len(sorted[j]) < rest)
                    .unwrap_or(sorted.len())
            };
            match sorted.get(next) {
                Some(r) if len(r) >= need => {
                    cur = r;
                    i = next;
                }
                _ => return Some(cur),
            }
        }
    }

    /// The run starting at `start`, if free.
    pub fn run_at(&self, start: u32) -> Option<&Range<u32>> {
        self.runs.iter().find(|r| r.start == start)
    }

    /// Marks `start..start+n` used; false (and nothing changed) unless it lies in one run.
    pub fn take(&mut self, start: u32, n: u32) -> bool {
        let Some(end) = start.checked_add(n) else {
            return false;
        };
        let Some(i) = self
            .runs
            .iter()
            .position(|r| r.start <= start && end <= r.end && n > 0)
        else {
            return false;
        };
        let r = self.runs.remove(i);
        if end < r.end {
            self.runs.insert(i, end..r.end);
        }
        if r.start < start {
            self.runs.insert(i, r.start..start);
        }
        true
    }
}

/// Length of a run.
pub(crate) fn len(r: &Range<u32>) -> u64 {
    u64::from(r.end.saturating_sub(r.start))
}

/// The PVs a request may use, in the selection's order (else the VG's), with why the others
/// were left out.
#[derive(Clone, Debug)]
pub(crate) struct Space {
    /// Usable PVs (possibly with no free extents).
    pub pvs: Vec<PvSpace>,
    /// PVs left out and why (`pv2 (/dev/sdc) is not allocatable`).
    pub skipped: Vec<String>,
}

impl Space {
    /// The failure domain of PV `i`: its host, else the PV itself. Raid images never share a
    /// domain under the `normal` and `contiguous` policies.
    pub fn domain(&self, i: usize) -> String {
        match &self.pvs[i].host {
            Some(h) => format!("host {h}"),
            None => format!("pv {}", self.pvs[i].key),
        }
    }

    /// Distinct failure domains among PVs with free space.
    pub fn domains_with_space(&self) -> usize {
        let set: HashSet<String> = (0..self.pvs.len())
            .filter(|&i| self.pvs[i].cap() > 0)
            .map(|i| self.domain(i))
            .collect();
        set.len()
    }

    /// Free extents of all usable PVs.
    pub fn total(&self) -> u64 {
        self.pvs.iter().map(PvSpace::cap).sum()
    }
}

/// `pv0 (/dev/sdb)`, or `pv0` when the metadata has no device hint; a PV whose host is
/// named by a tag (not by its URI) says so: `pv0 (/dev/sdb, host a)`.
pub(crate) fn pv_name(pv: &PhysicalVolume) -> String {
    let tagged = pv.host().filter(|h| {
        pv.device
            .as_deref()
            .and_then(crate::hosts::uri_host)
            .as_ref()
            != Some(h)
    });
    match (&pv.device, tagged) {
        (Some(d), Some(h)) => format!("{} ({d}, host {h})", pv.key),
        (Some(d), None) => format!("{} ({d})", pv.key),
        (None, Some(h)) => format!("{} (host {h})", pv.key),
        (None, None) => pv.key.clone(),
    }
}

/// The space a request may use: allocatable, present PVs of the selection (all PVs without
/// one), restricted to the selected extent ranges.
pub(crate) fn eligible(vg: &VolumeGroup, sel: Option<&PvSelection>) -> Result<Space, AllocError> {
    let used = used(vg);
    let mut order: Vec<(&PhysicalVolume, Option<Vec<Range<u32>>>)> = Vec::new();
    match sel {
        None => order.extend(vg.physical_volumes.iter().map(|p| (p, None))),
        Some(sel) => {
            let mut seen = HashSet::new();
            for s in &sel.pvs {
                let pv = vg.pv_by_key(&s.key).ok_or_else(|| AllocError::UnknownPv {
                    pv: s.key.clone(),
                    vg: vg.name.clone(),
                })?;
                if seen.insert(pv.key.as_str()) {
                    order.push((pv, sel.ranges_of(&pv.key)));
                }
            }
        }
    }
    let mut space = Space {
        pvs: Vec::new(),
        skipped: Vec::new(),
    };
    for (pv, ranges) in order {
        let name = pv_name(pv);
        if pv.is_missing() {
            space.skipped.push(format!("{name} is missing"));
            continue;
        }
        if !pv.status.has("ALLOCATABLE") {
            space.skipped.push(format!("{name} is not allocatable"));
            continue;
        }
        let uses = used.get(pv.key.as_str());
        let free = free_runs(pv.pe_count.0, uses);
        let runs = match ranges {
            None => free,
            Some(ranges) => intersect(&free, &ranges),
        };
        space.pvs.push(PvSpace {
            key: pv.key.clone(),
            name,
            runs,
            pe_count: pv.pe_count.0,
            used: uses.cloned().unwrap_or_default(),
            host: pv.host(),
        });
    }
    Ok(space)
}

/// The parts of sorted, disjoint `free` runs inside any of `ranges` (in any order, possibly
/// overlapping).
fn intersect(free: &[Range<u32>], ranges: &[Range<u32>]) -> Vec<Range<u32>> {
    let mut sorted: Vec<Range<u32>> = Vec::new();
    let mut by_start: Vec<&Range<u32>> = ranges.iter().filter(|r| r.start < r.end).collect();
    by_start.sort_by_key(|r| r.start);
    for r in by_start {
        match sorted.last_mut() {
            Some(last) if last.end >= r.start => last.end = last.end.max(r.end),
            _ => sorted.push(r.clone()),
        }
    }
    let mut out: Vec<Range<u32>> = Vec::new();
    for f in free {
        for r in &sorted {
            let (s, e) = (f.start.max(r.start), f.end.min(r.end));
            if s < e {
                // Adjacent selected ranges make one run.
                match out.last_mut() {
                    Some(last) if last.end == s => last.end = e,
                    _ => out.push(s..e),
                }
            }
        }
    }
    out
}

#[cfg(test)]
// Single ranges are what these tests mean.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    #[test]
    fn take_splits_runs() {
        let mut p = PvSpace {
            key: "pv0".into(),
            name: "pv0".into(),
            runs: vec![0..10, 20..30],
            pe_count: 30,
            used: Vec::new(),
            host: None,
        };
        assert!(p.take(22, 3));
        assert_eq!(p.runs, vec![0..10, 20..22, 25..30]);
        assert!(p.take(0, 10));
        assert_eq!(p.runs, vec![20..22, 25..30]);
        assert!(!p.take(21, 2), "crosses the end of a run");
        assert!(!p.take(25, 0));
        assert_eq!(p.runs, vec![20..22, 25..30]);
    }

    fn pv(runs: Vec<Range<u32>>) -> PvSpace {
        PvSpace {
            key: "pv0".into(),
            name: "pv0".into(),
            pe_count: runs.last().map_or(0, |r| r.end),
            runs,
            used: Vec::new(),
            host: None,
        }
    }

    #[test]
    fn lvm2_run_choices() {
        let p = pv(vec![0..5, 10..30, 40..48, 50..58]);
        // 20 at 10 leaves 12: the walk goes on at the first run shorter than 12 (8 at 40),
        // which holds 8 and is used whole, so on to the next (8 at 50), and 5 is too short.
        assert_eq!(p.lvm2_run(8), Some(&(50..58)));
        assert_eq!(p.lvm2_run(9), Some(&(10..30)));
        assert_eq!(p.lvm2_run(100), Some(&(10..30)));
        // Runs of 50, 30, 20, 8 and 10 wanted: 50 leaves 40, so 30; 30 leaves 20, so the
        // walk skips 20 and stops at 8. (lvm2 2.03.16 takes 30 here.)
        let p = pv(vec![0..50, 60..90, 100..120, 130..138]);
        assert_eq!(p.lvm2_run(10), Some(&(60..90)));
        // Equal runs used whole: the last one; used in part: the first.
        let p = pv(vec![0..10, 20..30]);
        assert_eq!(p.lvm2_run(10), Some(&(20..30)));
        assert_eq!(p.lvm2_run(5), Some(&(0..10)));
        // Checked against lvm2: free 5-10 and 16-23, 2 wanted: 16.
        let p = pv(vec![5..11, 16..24]);
        assert_eq!(p.lvm2_run(2), Some(&(16..24)));
    }

    #[test]
    fn intersect_selected_ranges() {
        assert_eq!(
            intersect(&[0..10, 20..30], &[25..40, 5..22]),
            vec![5..10, 20..22, 25..30]
        );
        assert_eq!(intersect(&[0..30], &[10..20, 0..10]), vec![0..20]);
        assert_eq!(intersect(&[0..30], &[0..10, 5..15]), vec![0..15]);
    }
}
