//! Volume management: the target registry the CLI and daemon use, and the `volmgr` verbs.
//!
//! The thin pool lives in the `thin` crate, RAID in `raid`, multipath in `multipath`; this crate
//! assembles them into one
//! [`Registry`] and implements the command line.

#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

use std::sync::Arc;

use tables::registry::{Registry, Resolver};
use tables::table::Table;

/// Every target kind the product knows: the built-ins plus RAID, thin provisioning and
/// multipath.
///
/// RAID's `rebuild IDX DEVICE` message opens the replacement leg by path (or `major:minor`)
/// long after the table was built, so it gets its own file resolver.
pub fn registry() -> Registry {
    let mut reg = tables::targets::builtin_registry();
    let files = Arc::new(extents::FileResolver::default());
    raid::register_with_opener(&mut reg, Arc::new(move |dev: &str| files.open(dev)));
    thin::register(&mut reg);
    multipath::register(&mut reg);
    reg
}

/// Makes every relative path a table names absolute against `cwd` (the daemon does not share
/// the caller's working directory and refuses relative paths). Absolute paths, `major:minor`
/// device numbers and the daemon's own `/dev/volmgr/NAME` names are left as they are; only
/// arguments that name devices are touched (a target's offsets and options never are).
pub fn absolute_paths(table: &mut Table, reg: &Registry, cwd: &std::path::Path) {
    let _ = table.map_devices(reg, |dev| {
        let devnum = dev
            .split_once(':')
            .is_some_and(|(a, b)| is_digits(a) && is_digits(b));
        let keep = dev.starts_with('/')
            || devnum
            || dev.is_empty()
            || extents::net::NetUri::is_network(dev);
        Ok::<_, std::convert::Infallible>(if keep {
            dev.to_string()
        } else {
            cwd.join(dev).to_string_lossy().into_owned()
        })
    });
}

fn is_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_extents_are_not_relative_paths() {
        let reg = registry();
        let mut t = Table::parse(
            "0 2048 linear nbd://127.0.0.1:10809/disk 0\n2048 2048 linear rel/file 0\n",
            &reg,
        )
        .unwrap();
        absolute_paths(&mut t, &reg, std::path::Path::new("/base"));
        let names: Vec<String> = t.devices(&reg).into_iter().map(|d| d.name).collect();
        assert_eq!(names, ["nbd://127.0.0.1:10809/disk", "/base/rel/file"]);
    }

    #[test]
    fn device_args_of_raid_and_thin_lines() {
        let reg = registry();
        let t = Table::parse(
            "0 2048 raid raid1 1 0 3 m0 d0 m1 d1 m2 d2\n\
             2048 2048 raid raid1 1 0 2 - f0 - f1\n\
             4096 2048 mirror core 1 1024 2 e0 0 e1 8\n\
             6144 2048 thin-pool pm pd 128 0 0\n\
             8192 2048 thin /dev/volmgr/pool 1 origin\n\
             10240 2048 thin /dev/volmgr/pool 2\n",
            &reg,
        )
        .unwrap();
        let names: Vec<String> = t.devices(&reg).into_iter().map(|d| d.name).collect();
        assert_eq!(
            names,
            [
                "m0",
                "d0",
                "m1",
                "d1",
                "m2",
                "d2",
                "f0",
                "f1",
                "e0",
                "e1",
                "pm",
                "pd",
                "/dev/volmgr/pool",
                "origin",
                "/dev/volmgr/pool"
            ]
        );
    }

    #[test]
    fn relative_paths_become_absolute_and_nothing_else_changes() {
        let reg = registry();
        let mut t = Table::parse(
            "0 64 linear img/a.img 8\n\
             64 64 striped 2 8 /abs/b 0 7:3 16\n\
             128 64 linear /dev/volmgr/base 0\n",
            &reg,
        )
        .unwrap();
        absolute_paths(&mut t, &reg, std::path::Path::new("/work/dir"));
        assert_eq!(
            t.to_string(),
            "0 64 linear /work/dir/img/a.img 8\n\
             64 64 striped 2 8 /abs/b 0 7:3 16\n\
             128 64 linear /dev/volmgr/base 0\n"
        );
    }
}
