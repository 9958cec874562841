//! Device-mapper style mapping tables and the mapping core.
//!
//! - [`units`]: sectors and bytes as distinct types.
//! - [`io`]: the [`BlockDevice`](io::BlockDevice) contract every target, extent and table meets.
//! - [`table`]: the text format (`start length target args...`), parsed, validated and printed.
//! - [`registry`]: target kinds by name, and how a table line becomes a device.
//! - [`targets`]: the built-in targets (linear, striped, zero, error, flakey, delay) and the
//!   segment map that routes a request to the segments it spans.
//! - [`mem`]: in-memory devices for tests, including the simulated power cut.

#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod buf;
pub mod io;
pub mod mem;
pub mod registry;
pub mod switch;
pub mod table;
pub mod targets;
pub mod units;

pub use io::{
    BlockDevice, DeviceRef, FixedBuf, IoError, IoFuture, IoResult, Limits, MappedCopy, Served,
    WriteFlags,
};
pub use units::{Bytes, Sectors};
