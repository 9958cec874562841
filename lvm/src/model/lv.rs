//! LVs and their segments (`logical_volumes { lv { ... segment1 { ... } } }`).
//!
//! `striped` segments (LVM's linear and striped LVs) are typed; any other segment type is
//! kept whole, so writing the VG back never loses what LVM2 wrote.

use tables::Sectors;

use super::fields::{int, Flags, Reader};
use super::ModelError;
use crate::text::{Item, Section, Value};
use crate::units::Extents;
use crate::uuid::Uuid;

/// The segment type name of linear and striped segments.
pub const STRIPED: &str = "striped";

/// One area of a segment: `"pv0", 17` (a PV key and an extent on it) or an LV and an extent
/// of it (stacked LVs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Area {
    /// PV key (`pv0`) or LV name.
    pub volume: String,
    /// First extent on that PV or LV.
    pub start: Extents,
}

/// What a segment maps to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SegmentKind {
    /// `type = "striped"`: `stripe_count` areas, chunks of `stripe_size` sectors dealt round
    /// robin (one area: linear).
    Striped {
        /// `stripe_size`, needed with two or more stripes.
        stripe_size: Option<Sectors>,
        /// `stripes = [...]`; `stripe_count` is its length.
        stripes: Vec<Area>,
    },
    /// Any other type (`raid1`, `thin-pool`, `mirror`, ...): its keys stay in
    /// [`Segment::extra`] as they were.
    Other {
        /// The `type` string, as written (flags after `+` included).
        segtype: String,
    },
}

/// One `segmentN` section of an LV.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// `start_extent`: first LV extent this segment maps.
    pub start_extent: Extents,
    /// `extent_count`: LV extents this segment maps.
    pub extent_count: Extents,
    /// The mapping.
    pub kind: SegmentKind,
    /// Every other entry, in order.
    pub extra: Vec<(String, Item)>,
}

/// One entry of `logical_volumes`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogicalVolume {
    /// The section's key: the LV name.
    pub name: String,
    /// The LV's uuid.
    pub id: Uuid,
    /// `status` flags (`READ`, `WRITE`, `VISIBLE`, ...).
    pub status: Flags,
    /// `flags` (compatibility flags).
    pub flags: Flags,
    /// `creation_time`, seconds since the epoch.
    pub creation_time: Option<u64>,
    /// `creation_host`.
    pub creation_host: Option<String>,
    /// Segments, by `start_extent`.
    pub segments: Vec<Segment>,
    /// Every other entry (`tags`, `read_ahead`, `allocation_policy`, ...), in order.
    pub extra: Vec<(String, Item)>,
}

impl Segment {
    /// A linear segment: `count` extents from `start` of the PV `pv_key`.
    pub fn linear(
        start_extent: Extents,
        count: Extents,
        pv_key: &str,
        pv_start: Extents,
    ) -> Segment {
        Segment {
            start_extent,
            extent_count: count,
            kind: SegmentKind::Striped {
                stripe_size: None,
                stripes: vec![Area {
                    volume: pv_key.to_string(),
                    start: pv_start,
                }],
            },
            extra: Vec::new(),
        }
    }

    /// Extents each area of a striped segment holds (`extent_count / stripe_count`).
    pub fn area_len(&self) -> Option<Extents> {
        match &self.kind {
            SegmentKind::Striped { stripes, .. } if !stripes.is_empty() => {
                u32::try_from(stripes.len())
                    .ok()
                    .map(|n| Extents(self.extent_count.0 / n))
            }
            _ => None,
        }
    }

    fn from_section(path: &str, key: &str, s: &Section) -> Result<Segment, ModelError> {
        let mut r = Reader::new(format!("{path}/{key}"), s);
        let start_extent = r.extents("start_extent")?;
        let extent_count = r.extents("extent_count")?;
        let segtype = r.str("type")?;
        let kind = if segtype == STRIPED {
            let count = r.u32("stripe_count")?;
            let stripe_size = r.opt_u64("stripe_size")?.map(Sectors);
            let list = r.array("stripes")?;
            let stripes = areas(&r, "stripes", list)?;
            if stripes.len() != count as usize {
                return Err(r.err(
                    "stripes",
                    format!("has {} areas, stripe_count says {count}", stripes.len()),
                ));
            }
            SegmentKind::Striped {
                stripe_size,
                stripes,
            }
        } else {
            SegmentKind::Other { segtype }
        };
        Ok(Segment {
            start_extent,
            extent_count,
            kind,
            extra: r.rest(),
        })
    }

    fn to_section(&self, path: &str) -> Result<Section, ModelError> {
        let mut s = Section::new();
        s.push_int("start_extent", i64::from(self.start_extent.0));
        s.push_int("extent_count", i64::from(self.extent_count.0));
        match &self.kind {
            SegmentKind::Striped {
                stripe_size,
                stripes,
            } => {
                s.push_str("type", STRIPED);
                s.push_int("stripe_count", stripes.len() as i64);
                if let Some(sz) = stripe_size {
                    s.push_value("stripe_size", int(path, "stripe_size", sz.0)?);
                }
                let mut list = Vec::with_capacity(2 * stripes.len());
                for a in stripes {
                    list.push(Value::Str(a.volume.clone()));
                    list.push(Value::Int(i64::from(a.start.0)));
                }
                s.push("stripes", Item::Array(list));
            }
            SegmentKind::Other { segtype } => s.push_str("type", segtype.clone()),
        }
        s.entries.extend(self.extra.iter().cloned());
        Ok(s)
    }
}

/// `["pv0", 0, "pv1", 0]` as areas.
fn areas(r: &Reader<'_>, key: &str, list: &[Value]) -> Result<Vec<Area>, ModelError> {
    if !list.len().is_multiple_of(2) {
        return Err(r.err(key, "needs pairs of a volume name and an extent"));
    }
    list.chunks_exact(2)
        .enumerate()
        .map(|(i, pair)| match pair {
            [Value::Str(volume), Value::Int(n)] => u32::try_from(*n)
                .map(|start| Area {
                    volume: volume.clone(),
                    start: Extents(start),
                })
                .map_err(|_| r.err(key, format!("area {}: extent {n} out of range", i + 1))),
            _ => Err(r.err(
                key,
                format!("area {}: not a volume name and an extent", i + 1),
            )),
        })
        .collect()
}

impl LogicalVolume {
    /// A new visible LV (`READ`, `WRITE`, `VISIBLE`) with a fresh uuid, no creation stamp.
    pub fn new(name: &str, segments: Vec<Segment>) -> LogicalVolume {
        LogicalVolume {
            name: name.to_string(),
            id: Uuid::generate(),
            status: Flags::of(&["READ", "WRITE", "VISIBLE"]),
            flags: Flags::default(),
            creation_time: None,
            creation_host: None,
            segments,
            extra: Vec::new(),
        }
    }

    pub(crate) fn from_section(
        path: &str,
        name: &str,
        s: &Section,
    ) -> Result<LogicalVolume, ModelError> {
        let path = format!("{path}/{name}");
        let mut r = Reader::new(path.clone(), s);
        let id = r.uuid("id")?;
        let status = r.flags("status")?;
        let flags = r.opt_flags("flags")?.unwrap_or_default();
        let creation_time = r.opt_u64("creation_time")?;
        let creation_host = r.opt_str("creation_host")?;
        if creation_time.is_some() != creation_host.is_some() {
            // LVM2 refuses one without the other.
            return Err(r.err(
                "creation_time",
                "creation_time and creation_host go together",
            ));
        }
        let count = r.u32("segment_count")?;
        // Every subsection of an LV is a segment (as in LVM2), whatever its key.
        let mut segments = Vec::new();
        for (key, item) in &s.entries {
            if let Item::Section(seg) = item {
                segments.push(Segment::from_section(&path, key, seg)?);
            }
        }
        if segments.len() != count as usize {
            return Err(r.err(
                "segment_count",
                format!("is {count} but the LV has {} segments", segments.len()),
            ));
        }
        segments.sort_by_key(|g| g.start_extent);
        let extra = r
            .rest()
            .into_iter()
            .filter(|(_, i)| !matches!(i, Item::Section(_)))
            .collect();
        Ok(LogicalVolume {
            name: name.to_string(),
            id,
            status,
            flags,
            creation_time,
            creation_host,
            segments,
            extra,
        })
    }

    pub(crate) fn to_section(&self, path: &str) -> Result<Section, ModelError> {
        let path = format!("{path}/{}", self.name);
        let mut s = Section::new();
        s.push_str("id", self.id.to_string());
        s.push("status", self.status.item());
        s.push("flags", self.flags.item());
        if let (Some(t), Some(h)) = (self.creation_time, &self.creation_host) {
            s.push_value("creation_time", int(&path, "creation_time", t)?);
            s.push_str("creation_host", h.clone());
        }
        s.entries.extend(self.extra.iter().cloned());
        s.push_int("segment_count", self.segments.len() as i64);
        for (i, seg) in self.segments.iter().enumerate() {
            let key = format!("segment{}", i + 1);
            let sub = seg.to_section(&format!("{path}/{key}"))?;
            s.push(key, Item::Section(sub));
        }
        Ok(s)
    }

    /// Length in extents (the sum of its segments).
    pub fn extent_count(&self) -> Option<Extents> {
        self.segments
            .iter()
            .try_fold(Extents(0), |acc, s| acc.checked_add(s.extent_count))
    }

    /// Appends `seg` (whose `start_extent` must be this LV's end), merged into the last
    /// segment when it continues it on the same PVs (as LVM2 merges: a linear LV extended in
    /// place stays one segment). Returns `false`, changing nothing, when `seg` does not start
    /// at the end.
    pub fn push_segment(&mut self, seg: Segment) -> bool {
        if self.extent_count() != Some(seg.start_extent) {
            return false;
        }
        if let Some(last) = self.segments.last_mut() {
            if let Some(merged) = last.merged_with(&seg) {
                *last = merged;
                return true;
            }
        }
        self.segments.push(seg);
        true
    }
}

impl LogicalVolume {
    /// Cuts the LV down to its first `len` extents (lvreduce): later segments go, the last
    /// kept one is shortened (a striped one by whole rows: `len` must then leave a multiple of
    /// its stripe count in it). Refused, changing nothing, for a length of 0, one not below
    /// the current length, or a cut inside a segment that is not striped.
    pub fn reduce_to(&mut self, len: Extents) -> Result<(), String> {
        let cur = self.extent_count().ok_or("the LV's length overflows")?;
        if len.0 == 0 || len >= cur {
            return Err(format!(
                "new length {len} must be between 1 and {} extents",
                cur.0 - 1
            ));
        }
        let mut kept = self.segments.clone();
        kept.retain(|s| s.start_extent < len);
        let last = kept
            .last_mut()
            .ok_or("no segment starts below the new length")?;
        let keep = len.0 - last.start_extent.0;
        if keep < last.extent_count.0 {
            let SegmentKind::Striped { stripes, .. } = &last.kind else {
                return Err(format!(
                    "the cut falls inside a segment of a type that cannot be shortened \
                     (extents {}..{})",
                    last.start_extent.0,
                    last.start_extent.0 + last.extent_count.0
                ));
            };
            let n = u32::try_from(stripes.len()).unwrap_or(u32::MAX).max(1);
            if !keep.is_multiple_of(n) {
                return Err(format!(
                    "the cut leaves {keep} extents in a segment of {n} stripes: give a length \
                     that leaves a multiple of {n}"
                ));
            }
            last.extent_count = Extents(keep);
        }
        self.segments = kept;
        Ok(())
    }
}

impl Segment {
    /// `self` followed by `next` as one segment, when both are striped with the same stripe
    /// size and every area of `next` starts where the same area of `self` ends.
    fn merged_with(&self, next: &Segment) -> Option<Segment> {
        let (
            SegmentKind::Striped {
                stripe_size: a_size,
                stripes: a,
            },
            SegmentKind::Striped {
                stripe_size: b_size,
                stripes: b,
            },
        ) = (&self.kind, &next.kind)
        else {
            return None;
        };
        if a_size != b_size || a.len() != b.len() || !self.extra.is_empty() {
            return None;
        }
        let len = self.area_len()?;
        let continues = a
            .iter()
            .zip(b)
            .all(|(x, y)| x.volume == y.volume && x.start.checked_add(len) == Some(y.start));
        if !continues {
            return None;
        }
        Some(Segment {
            extent_count: self.extent_count.checked_add(next.extent_count)?,
            ..self.clone()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lv(segments: Vec<Segment>) -> LogicalVolume {
        LogicalVolume::new("a", segments)
    }

    #[test]
    fn segments_that_continue_merge_others_append() {
        let mut l = lv(vec![Segment::linear(
            Extents(0),
            Extents(10),
            "pv0",
            Extents(5),
        )]);
        // In place: one segment.
        assert!(l.push_segment(Segment::linear(Extents(10), Extents(4), "pv0", Extents(15))));
        assert_eq!(l.segments.len(), 1);
        assert_eq!(l.segments[0].extent_count, Extents(14));
        // Elsewhere on the same PV, or another PV: a new segment.
        assert!(l.push_segment(Segment::linear(Extents(14), Extents(2), "pv0", Extents(40))));
        assert!(l.push_segment(Segment::linear(Extents(16), Extents(2), "pv1", Extents(42))));
        assert_eq!(l.segments.len(), 3);
        // Not at the end: refused, nothing changed.
        assert!(!l.push_segment(Segment::linear(Extents(3), Extents(2), "pv1", Extents(0))));
        assert_eq!(l.extent_count(), Some(Extents(18)));
    }

    #[test]
    fn striped_segments_merge_only_when_every_area_continues() {
        let striped = |start: u32, count: u32, a: u32, b: u32| Segment {
            start_extent: Extents(start),
            extent_count: Extents(count),
            kind: SegmentKind::Striped {
                stripe_size: Some(Sectors(128)),
                stripes: vec![
                    Area {
                        volume: "pv0".into(),
                        start: Extents(a),
                    },
                    Area {
                        volume: "pv1".into(),
                        start: Extents(b),
                    },
                ],
            },
            extra: Vec::new(),
        };
        let mut l = lv(vec![striped(0, 8, 0, 10)]);
        assert!(l.push_segment(striped(8, 4, 4, 14)));
        assert_eq!(l.segments.len(), 1);
        assert_eq!(l.segments[0].area_len(), Some(Extents(6)));
        assert!(l.push_segment(striped(12, 4, 6, 30)));
        assert_eq!(l.segments.len(), 2);
    }

    #[test]
    fn reduce_drops_and_shortens_segments() {
        let mut l = lv(vec![
            Segment::linear(Extents(0), Extents(10), "pv0", Extents(0)),
            Segment::linear(Extents(10), Extents(10), "pv1", Extents(0)),
        ]);
        l.reduce_to(Extents(12)).unwrap();
        assert_eq!(l.segments.len(), 2);
        assert_eq!(l.extent_count(), Some(Extents(12)));
        l.reduce_to(Extents(10)).unwrap();
        assert_eq!(l.segments.len(), 1);
        assert!(l.reduce_to(Extents(10)).is_err());
        assert!(l.reduce_to(Extents(0)).is_err());
        let mut s = lv(vec![Segment {
            start_extent: Extents(0),
            extent_count: Extents(8),
            kind: SegmentKind::Striped {
                stripe_size: Some(Sectors(128)),
                stripes: vec![
                    Area {
                        volume: "pv0".into(),
                        start: Extents(0),
                    },
                    Area {
                        volume: "pv1".into(),
                        start: Extents(0),
                    },
                ],
            },
            extra: Vec::new(),
        }]);
        assert!(s.reduce_to(Extents(5)).is_err());
        s.reduce_to(Extents(6)).unwrap();
        assert_eq!(s.segments[0].area_len(), Some(Extents(3)));
    }
}
