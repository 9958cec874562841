//! The PVs named on a command line (`lvcreate ... /dev/sdb /dev/sdc:100-199`), as lvm2's
//! `create_pv_list` reads them: a PV, optionally followed by `:`-separated extent ranges
//! (`PE`, `PE-PE`, `PE-`, `-PE`, `PE+COUNT`).

use std::ops::Range;

use super::AllocError;
use crate::model::VolumeGroup;

/// One PV of a selection and the extents of it that may be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SelectedPv {
    /// The PV's key in the VG (`pv0`).
    pub key: String,
    /// Extent ranges (end exclusive); empty: the whole PV.
    pub ranges: Vec<Range<u32>>,
}

/// The PVs (and extent ranges) an allocation may use, in command-line order (which is the
/// order the allocator considers them in, as lvm2 does).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PvSelection {
    /// One entry per PV.
    pub pvs: Vec<SelectedPv>,
}

impl PvSelection {
    /// An empty selection (add PVs with [`PvSelection::add`]).
    pub fn new() -> PvSelection {
        PvSelection::default()
    }

    /// The whole of each PV in `keys`.
    pub fn whole<S: Into<String>>(keys: impl IntoIterator<Item = S>) -> PvSelection {
        PvSelection {
            pvs: keys
                .into_iter()
                .map(|k| SelectedPv {
                    key: k.into(),
                    ranges: Vec::new(),
                })
                .collect(),
        }
    }

    /// Splits a command-line argument `PATH[:RANGES]` at the first colon that is not escaped
    /// as `\:` (device paths may contain colons); `\:` and `\@` in the path are unescaped, as
    /// lvm2's `dm_unescape_colons_and_at_signs` does. Returns the path and the text after the
    /// colon.
    ///
    /// A network extent's URI (`nbd://HOST:PORT/EXPORT`, `iscsi://HOST/IQN/LUN`) has colons
    /// of its own: its ranges are the text after the first colon that is inside
    /// the path (after the first `/` past `://`) and the rest is a range list.
    pub fn split_arg(arg: &str) -> (String, Option<String>) {
        if extents::net::NetUri::is_network(arg) {
            let path_at = arg
                .find("://")
                .and_then(|s| arg[s + 3..].find('/').map(|p| s + 3 + p));
            let is_ranges = |t: &str| {
                !t.is_empty()
                    && t.chars()
                        .all(|c| c.is_ascii_digit() || c == '-' || c == ':')
                    && t.starts_with(|c: char| c.is_ascii_digit())
            };
            let split = path_at.and_then(|p| {
                arg.char_indices()
                    .find(|&(c, ch)| ch == ':' && c > p && is_ranges(&arg[c + 1..]))
                    .map(|(c, _)| c)
            });
            return match split {
                Some(c) => (arg[..c].to_string(), Some(arg[c + 1..].to_string())),
                None => (arg.to_string(), None),
            };
        }
        let mut path = String::new();
        let mut chars = arg.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' if matches!(chars.peek(), Some((_, ':' | '@'))) => {
                    if let Some((_, e)) = chars.next() {
                        path.push(e);
                    }
                }
                ':' => return (path, Some(arg[i + 1..].to_string())),
                c => path.push(c),
            }
        }
        (path, None)
    }

    /// Adds PV `key` of `vg` with the ranges of `spec` (the text after the path's colon:
    /// `0-99:200-299`; `None`: the whole PV). A PV given twice gets both sets of ranges;
    /// overlapping ranges are refused, as lvm2 does.
    pub fn add(
        &mut self,
        vg: &VolumeGroup,
        key: &str,
        spec: Option<&str>,
    ) -> Result<(), AllocError> {
        let pv = vg.pv_by_key(key).ok_or_else(|| AllocError::UnknownPv {
            pv: key.to_string(),
            vg: vg.name.clone(),
        })?;
        let name = pv.device.clone().unwrap_or_else(|| pv.key.clone());
        let at = match self.pvs.iter().position(|p| p.key == key) {
            Some(at) => at,
            None => {
                self.pvs.push(SelectedPv {
                    key: key.to_string(),
                    ranges: Vec::new(),
                });
                self.pvs.len() - 1
            }
        };
        let new = parse_ranges(spec, pv.pe_count.0)?;
        let ranges = &mut self.pvs[at].ranges;
        for r in new {
            if let Some(o) = ranges
                .iter()
                .find(|o| o.start < o.end && r.start < o.end && o.start < r.end)
            {
                return Err(AllocError::Invalid(format!(
                    "Overlapping PE ranges specified ({}-{}, {}-{}) on {name}.",
                    r.start,
                    r.end.saturating_sub(1),
                    o.start,
                    o.end.saturating_sub(1)
                )));
            }
            ranges.push(r);
        }
        Ok(())
    }

    /// Whether PV `key` is selected.
    pub fn contains(&self, key: &str) -> bool {
        self.pvs.iter().any(|p| p.key == key)
    }

    /// The selected ranges of PV `key` (all entries for it together); `None`: the whole PV
    /// (or an entry without ranges).
    pub fn ranges_of(&self, key: &str) -> Option<Vec<Range<u32>>> {
        let mut out = Vec::new();
        for p in self.pvs.iter().filter(|p| p.key == key) {
            if p.ranges.is_empty() {
                return None;
            }
            out.extend(p.ranges.iter().cloned());
        }
        Some(out)
    }
}

/// lvm2's `_parse_pes` over `:SPEC` for a PV of `size` extents; `None` is the whole PV.
fn parse_ranges(spec: Option<&str>, size: u32) -> Result<Vec<Range<u32>>, AllocError> {
    let Some(spec) = spec else {
        return Ok((size > 0).then_some(0..size).into_iter().collect());
    };
    let text = format!(":{spec}");
    let b = text.as_bytes();
    let err = |i: usize| {
        AllocError::Invalid(format!(
            "Physical extent parsing error at {}.",
            text.get(i..).unwrap_or("")
        ))
    };
    // The number at `i` (digits only), and where it ends.
    let number = |i: usize| -> Result<(u32, usize), AllocError> {
        let end = b[i..]
            .iter()
            .position(|c| !c.is_ascii_digit())
            .map_or(b.len(), |n| i + n);
        text[i..end]
            .parse::<u32>()
            .map(|n| (n, end))
            .map_err(|_| err(i))
    };
    let last = size.checked_sub(1);
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b':' {
            return Err(err(i));
        }
        i += 1;
        if i == b.len() || b[i] == b':' {
            return Err(err(i));
        }
        let mut start = 0u32;
        // lvm2 computes `size - 1` unsigned; a PV without extents fails the range check.
        let mut end = last.unwrap_or(u32::MAX);
        if b[i].is_ascii_digit() {
            let (n, j) = number(i)?;
            start = n;
            i = j;
            if i == b.len() || b[i] == b':' {
                end = start;
            }
        }
        if i < b.len() && b[i] == b'-' {
            i += 1;
            if i < b.len() && b[i].is_ascii_digit() {
                let (n, j) = number(i)?;
                end = n;
                i = j;
            }
        } else if i < b.len() && b[i] == b'+' {
            i += 1;
            if i < b.len() && b[i].is_ascii_digit() {
                let (n, j) = number(i)?;
                // Wraps as lvm2's unsigned sum does (then fails the range check).
                end = start.wrapping_add(n.saturating_sub(1));
                i = j;
            }
        }
        if i < b.len() && b[i] != b':' {
            return Err(err(i));
        }
        match last {
            Some(last) if start <= end && end <= last => out.push(start..end + 1),
            _ => {
                return Err(AllocError::Invalid(format!(
                    "PE range error: start extent {start} to end extent {end}."
                )))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
// Single ranges are what these tests mean.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    #[test]
    fn ranges_as_lvm2_reads_them() {
        assert_eq!(parse_ranges(None, 100).unwrap(), vec![0..100]);
        assert_eq!(parse_ranges(Some("5"), 100).unwrap(), vec![5..6]);
        assert_eq!(parse_ranges(Some("5-9"), 100).unwrap(), vec![5..10]);
        assert_eq!(parse_ranges(Some("90-"), 100).unwrap(), vec![90..100]);
        assert_eq!(parse_ranges(Some("-9"), 100).unwrap(), vec![0..10]);
        assert_eq!(parse_ranges(Some("10+5"), 100).unwrap(), vec![10..15]);
        assert_eq!(parse_ranges(Some("10+0"), 100).unwrap(), vec![10..11]);
        assert_eq!(
            parse_ranges(Some("0-9:20-29"), 100).unwrap(),
            vec![0..10, 20..30]
        );
    }

    #[test]
    fn bad_ranges_say_where() {
        let e = |s: &str| parse_ranges(Some(s), 100).unwrap_err().to_string();
        assert_eq!(
            e("5-200"),
            "PE range error: start extent 5 to end extent 200."
        );
        assert_eq!(e("9-5"), "PE range error: start extent 9 to end extent 5.");
        assert_eq!(e("5x"), "Physical extent parsing error at x.");
        assert_eq!(e(""), "Physical extent parsing error at .");
        assert_eq!(e("1::2"), "Physical extent parsing error at :2.");
        assert_eq!(
            e("99999999999"),
            "Physical extent parsing error at 99999999999."
        );
        assert_eq!(
            e("1+4294967295"),
            "PE range error: start extent 1 to end extent 4294967295."
        );
        assert_eq!(
            e("2+4294967295"),
            "PE range error: start extent 2 to end extent 0."
        );
    }

    #[test]
    fn split_arg_honours_escaped_colons() {
        assert_eq!(
            PvSelection::split_arg("/dev/sdb:0-9"),
            ("/dev/sdb".to_string(), Some("0-9".to_string()))
        );
        assert_eq!(
            PvSelection::split_arg(r"/dev/disk/by-path/pci-0000\:00\:1f.2:5"),
            (
                "/dev/disk/by-path/pci-0000:00:1f.2".to_string(),
                Some("5".to_string())
            )
        );
        assert_eq!(
            PvSelection::split_arg("/dev/sdb"),
            ("/dev/sdb".into(), None)
        );
    }

    #[test]
    fn split_arg_leaves_a_uris_own_colons() {
        let s = |a: &str| PvSelection::split_arg(a);
        assert_eq!(s("nbd://h:10809/x"), ("nbd://h:10809/x".into(), None));
        assert_eq!(s("nbd://h:10809"), ("nbd://h:10809".into(), None));
        assert_eq!(
            s("nbd://h:10809/x?timeout=5:0-9:20-"),
            ("nbd://h:10809/x?timeout=5".into(), Some("0-9:20-".into()))
        );
        assert_eq!(
            s("iscsi://h/iqn.2026-12.x:t/1"),
            ("iscsi://h/iqn.2026-12.x:t/1".into(), None)
        );
        assert_eq!(
            s("iscsi://h/iqn.2026-12.x:t/1:7"),
            ("iscsi://h/iqn.2026-12.x:t/1".into(), Some("7".into()))
        );
    }
}
