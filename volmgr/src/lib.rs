//! Volume management: the target registry the CLI and daemon use, and the `volmgr` verbs.
//!
//! The thin pool lives in the `thin` crate, RAID in `raid`; this crate assembles them into one
//! [`Registry`] and implements the command line.

#![warn(missing_docs)]

use std::sync::Arc;

use tables::registry::{Registry, Resolver};

/// Every target kind the product knows: the built-ins plus RAID and thin provisioning.
///
/// RAID's `rebuild IDX DEVICE` message opens the replacement leg by path (or `major:minor`)
/// long after the table was built, so it gets its own file resolver.
pub fn registry() -> Registry {
    let mut reg = tables::targets::builtin_registry();
    let files = Arc::new(extents::FileResolver::default());
    raid::register_with_opener(&mut reg, Arc::new(move |dev: &str| files.open(dev)));
    thin::register(&mut reg);
    reg
}
