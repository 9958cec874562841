//! Ceph extents, through Debian's `librbd-dev` and `librados-dev` (Ceph 16.2):
//!
//! - `rbd:POOL/IMAGE[@SNAP]`: [`RbdExtent`], an RBD image (a snapshot read-only);
//! - `rados:POOL/PREFIX?object_size=…&size=…`: [`RadosExtent`], a volume stored as the RADOS
//!   objects `PREFIX.%016x` with no header.
//!
//! - `ffi`: the library functions we call, declared by hand;
//! - `cluster`: a connected librados handle and pool context (conf, id, private keyring,
//!   timeouts);
//! - `table`: the requests in the library, their completion callbacks, deadlines and health;
//! - `rbd`, `rados`: the extents.

mod cluster;
mod ffi;
mod rados;
mod rbd;
mod table;

pub use rados::RadosExtent;
pub use rbd::RbdExtent;
