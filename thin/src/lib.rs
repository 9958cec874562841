//! Thin provisioning: dm-thin compatible pools with crash-safe copy-on-write metadata,
//! reference-counted data blocks, O(1) snapshots and external origins.
//!
//! - [`types`]: typed block numbers.
//! - [`dedup`]: content hashes and the RAM index of dedup pools.
//! - [`disk`]: on-disk formats (superblock, B-tree node, space map bitmap), crc32c on all.
//! - [`meta`]: the resident metadata: copy-on-write B-trees, reference counts, commit.
//! - [`pool`]: the pool and thin volume devices (I/O path, commits, messages).
//! - [`target`]: the `thin-pool` and `thin` table targets.
//! - [`tools`]: check, dump, restore, repair.
//! - [`xml`]: dumps in thin-provisioning-tools' XML format (`thin_dump`/`thin_restore`).
//!
//! See the "Thin provisioning" section of ARCHITECTURE.md for the design and its crash-safety argument.

#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod dedup;
pub mod disk;
pub mod error;
pub mod meta;
pub mod pool;
pub mod sync;
pub mod target;
pub mod tools;
pub mod types;
pub mod xml;

#[cfg(test)]
mod fail_mode_tests;
#[cfg(test)]
pub(crate) mod fault;

pub use error::{MetaError, MetaResult, Structure};
pub use pool::{Pool, PoolOptions, PoolStats, ThinDevice};
pub use target::register;
pub use types::{DataBlock, MetaBlock, ThinId, VBlock};
