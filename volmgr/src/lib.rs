//! Volume management: the target registry the CLI and daemon use, and the `volmgr` verbs.
//!
//! The thin pool lives in the `thin` crate, RAID in `raid`; this crate assembles them into one
//! [`Registry`] and implements the command line.

#![warn(missing_docs)]

use tables::registry::Registry;

/// Every target kind the product knows: the built-ins plus RAID and thin provisioning.
pub fn registry() -> Registry {
    tables::targets::builtin_registry()
}
