//! The built-in targets, each a [`TargetKind`](crate::registry::TargetKind) (argument checking
//! and construction) plus a [`BlockDevice`](crate::io::BlockDevice) (the I/O path), with the
//! semantics of the kernel's device-mapper targets of the same name:
//!
//! - [`linear`]: `linear <dev> <offset>`.
//! - [`striped`]: `striped <#stripes> <chunk_sectors> <dev1> <off1> ...`, dm-stripe placement.
//! - [`simple`]: `zero` and `error`.
//! - [`flakey`]: `flakey <dev> <offset> <up> <down> [<#features> <features...>]`.
//! - [`delay`]: `delay <dev> <offset> <ms> [<wdev> <woff> <wms> [<fdev> <foff> <fms>]]`.
//! - [`mapped`]: the segment map that makes a whole table one device.

use std::sync::Arc;

use crate::registry::Registry;

mod common;
pub mod delay;
pub mod flakey;
pub mod linear;
pub mod mapped;
pub mod simple;
pub mod striped;

pub use delay::{Delay, DelayKind};
pub use flakey::{Flakey, FlakeyConfig, FlakeyKind};
pub use linear::{Linear, LinearKind};
pub use mapped::{Mapped, MappedSegment};
pub use simple::{ErrorKind, ErrorTarget, Zero, ZeroKind};
pub use striped::{Striped, StripedKind};

/// A registry holding every built-in target kind.
pub fn builtin_registry() -> Registry {
    let mut r = Registry::empty();
    r.register(Arc::new(LinearKind))
        .register(Arc::new(StripedKind))
        .register(Arc::new(ZeroKind))
        .register(Arc::new(ErrorKind))
        .register(Arc::new(FlakeyKind))
        .register(Arc::new(DelayKind));
    r
}
