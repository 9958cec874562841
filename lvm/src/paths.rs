//! PVs reached through several paths: one device entry `PATH1|PATH2[|...]`.
//!
//! lvm2 sees a PV with several paths through a dm-multipath device the kernel built; there is
//! none here, so the group of paths *is* the device: `--devices`, the devices file, the
//! command line (`pvcreate 'nbd://10.0.1.2/d|nbd://10.0.2.2/d'`) and the PV's `device` hint
//! all carry the whole group. Each path is a network extent's URI or a file/disk path.
//!
//! Opening a group ([`open_group`]) opens every path and reads the PV label through each:
//! the paths are the same device only if they show the same PV (checked by comparing the PV
//! uuids read through each path; two blank devices also agree). A difference is refused,
//! naming both paths and what each shows. A path that cannot be opened or read is skipped
//! (reported in [`GroupOpen::skipped`]) while another path works. The scan's metadata I/O
//! then goes through the first working path: all paths are the same bytes, and activation
//! builds the real multipath device (a `multipath` table over every path) in the daemon.

use std::path::Path;
use std::sync::Arc;

use tables::DeviceRef;

use crate::label::{self, FindLabelError};

/// What separates the paths of one device entry.
pub const PATH_SEPARATOR: char = '|';

/// Whether a device entry names several paths.
pub fn is_group(entry: &str) -> bool {
    entry.contains(PATH_SEPARATOR)
}

/// The paths of a device entry, in order (one for a plain path; empty parts dropped).
pub fn group_paths(entry: &str) -> Vec<&str> {
    entry
        .split(PATH_SEPARATOR)
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect()
}

/// The first path of a device entry (the entry itself when it is not a group).
pub fn first_path(entry: &str) -> &str {
    group_paths(entry).into_iter().next().unwrap_or(entry)
}

/// A group of paths opened: the device used and the paths that were skipped.
pub struct GroupOpen {
    /// The first path that could be opened and read.
    pub device: DeviceRef,
    /// Its path.
    pub used: String,
    /// Paths that could not be opened or read, with why.
    pub skipped: Vec<(String, crate::Error)>,
}

/// What a path shows at its label sectors, to compare paths by.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Shows {
    Pv(crate::Uuid),
    Blank,
    Damaged(String),
}

impl std::fmt::Display for Shows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Shows::Pv(id) => write!(f, "PV {id}"),
            Shows::Blank => write!(f, "no PV label"),
            Shows::Damaged(e) => write!(f, "a damaged label ({e})"),
        }
    }
}

/// Opens every path of `entry` with `open_one` and checks they show the same PV (see the
/// module docs). Fails with [`crate::Error::PathsDiffer`] when two paths differ, and with the
/// first path's error when none works.
pub fn open_group(
    entry: &str,
    open_one: &dyn Fn(&Path) -> Result<DeviceRef, crate::Error>,
) -> Result<GroupOpen, crate::Error> {
    let mut first: Option<(String, DeviceRef, Shows)> = None;
    let mut skipped = Vec::new();
    for path in group_paths(entry) {
        let dev = match open_one(Path::new(path)) {
            Ok(d) => d,
            Err(e) => {
                skipped.push((path.to_string(), e));
                continue;
            }
        };
        let shows = match label::find(dev.as_ref()) {
            Ok(Some(l)) => Shows::Pv(l.pv_uuid),
            Ok(None) => Shows::Blank,
            Err(FindLabelError::Label(e)) => Shows::Damaged(e.to_string()),
            Err(FindLabelError::Io(e)) => {
                skipped.push((path.to_string(), crate::Error::Io(e)));
                continue;
            }
        };
        match &first {
            None => first = Some((path.to_string(), dev, shows)),
            Some((p0, _, s0)) if *s0 != shows => {
                return Err(crate::Error::PathsDiffer {
                    group: entry.to_string(),
                    first: p0.clone(),
                    first_shows: s0.to_string(),
                    other: path.to_string(),
                    other_shows: shows.to_string(),
                })
            }
            Some(_) => {}
        }
    }
    match first {
        Some((used, device, _)) => Ok(GroupOpen {
            device,
            used,
            skipped,
        }),
        None => Err(crate::Error::NoPath {
            group: entry.to_string(),
            errors: Arc::new(skipped),
        }),
    }
}

/// `path: error; path: error`, for messages.
pub fn describe(errors: &[(String, crate::Error)]) -> String {
    let list: Vec<String> = errors.iter().map(|(p, e)| format!("{p}: {e}")).collect();
    list.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_split_at_the_bar() {
        assert!(!is_group("nbd://a/d"));
        assert!(is_group("nbd://a/d|nbd://b/d"));
        assert_eq!(
            group_paths("nbd://a/d | /dev/sdb|"),
            vec!["nbd://a/d", "/dev/sdb"]
        );
        assert_eq!(first_path("/dev/sdb"), "/dev/sdb");
        assert_eq!(first_path("nbd://a:1/d?x=1|nbd://b/d"), "nbd://a:1/d?x=1");
    }

    /// A file of 8 MiB, with a PV on it when `pv`.
    fn file(dir: &Path, name: &str, pv: bool) -> String {
        let p = dir.join(name);
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(8 << 20).unwrap();
        if pv {
            let d = crate::scan::open_device(&p, false, false).unwrap();
            crate::pvcreate::pvcreate(d.as_ref(), &Default::default()).unwrap();
        }
        p.display().to_string()
    }

    #[test]
    fn a_group_of_two_paths_to_one_pv_scans_as_that_pv() {
        let d = tempfile::tempdir().unwrap();
        let a = file(d.path(), "a", true);
        // A second path to the same bytes.
        let b = d.path().join("b").display().to_string();
        std::os::unix::fs::symlink(&a, &b).unwrap();
        let want = crate::scan::scan_paths(&[&a]).unwrap().devices[0]
            .label
            .as_ref()
            .unwrap()
            .pv_uuid;
        let r = crate::scan::scan_paths(&[format!("{a}|{b}")]).unwrap();
        assert_eq!(r.devices.len(), 1);
        assert_eq!(r.devices[0].label.as_ref().unwrap().pv_uuid, want);
        assert!(r.problems.is_empty(), "{:?}", r.problems);
    }

    #[test]
    fn paths_showing_different_pvs_are_refused_naming_both() {
        let d = tempfile::tempdir().unwrap();
        let a = file(d.path(), "a", true);
        let b = file(d.path(), "b", true);
        let id = |p: &str| {
            crate::scan::scan_paths(&[p]).unwrap().devices[0]
                .label
                .as_ref()
                .unwrap()
                .pv_uuid
                .to_string()
        };
        let e = crate::scan::scan_paths(&[format!("{a}|{b}")])
            .expect_err("two different PVs accepted as one")
            .to_string();
        for want in [a.clone(), b.clone(), id(&a), id(&b)] {
            assert!(e.contains(&want), "{e} does not name {want}");
        }
        assert!(e.contains("comparing the PV uuids"), "{e}");
        // A PV behind one path and a blank device behind the other differ too.
        let c = file(d.path(), "c", false);
        let e = crate::scan::scan_paths(&[format!("{a}|{c}")])
            .expect_err("a PV and a blank device accepted as one")
            .to_string();
        assert!(e.contains("no PV label"), "{e}");
    }

    #[test]
    fn a_path_that_does_not_open_is_skipped_while_another_works() {
        let d = tempfile::tempdir().unwrap();
        let a = file(d.path(), "a", true);
        let gone = d.path().join("gone").display().to_string();
        let r = crate::scan::scan_paths(&[format!("{gone}|{a}")]).unwrap();
        assert!(r.devices[0].label.is_some());
        let g = open_group(&format!("{gone}|{a}"), &|p| {
            crate::scan::open_device(p, true, false)
        })
        .unwrap();
        assert_eq!(g.used, a);
        assert_eq!(g.skipped.len(), 1);
        assert_eq!(g.skipped[0].0, gone);
        // No path at all: an error naming each.
        let e = crate::scan::scan_paths(&[format!("{gone}|{gone}2")])
            .expect_err("a group without a working path opened")
            .to_string();
        assert!(e.contains(&gone) && e.contains(&format!("{gone}2")), "{e}");
    }
}
