//! Extents: the devices a table names.
//!
//! - [`FileExtent`]: a regular file or block device as a [`tables::BlockDevice`], every I/O
//!   submitted on the calling thread's io_uring runtime (`iort`), direct I/O where the file
//!   system allows it.
//! - [`FileResolver`]: the [`tables::registry::Resolver`] that opens the paths and
//!   `major:minor` numbers of table lines, sharing one extent per underlying file; what a
//!   relative path means to it is a [`RelativePaths`] (a daemon refuses them).
//! - [`net`]: network extents named by URIs (`nbd://`, `nbd+unix://`), such as
//!   [`net::NbdExtent`], `iscsi://`, [`net::IscsiExtent`], and Ceph's `rbd:` and `rados:`,
//!   [`net::RbdExtent`] and [`net::RadosExtent`]; the resolver opens them too.
//! - [`create_sparse`]: makes a sparse backing file for tests and the CLI.

#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod file;
pub mod net;
mod resolver;
mod sys;

pub use file::{
    create_sparse, DirectMode, ExtentError, ExtentKind, FileExtent, IoMode, OpenOptions,
};
pub use resolver::{FileResolver, RelativePaths};
