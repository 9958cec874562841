//! The changed-block walk on an open pool (see `meta/delta.rs`).

use tables::IoResult;

use super::{meta_io, Pool};
use crate::meta::Delta;
use crate::types::ThinId;

impl Pool {
    /// The blocks whose mapping differs between thin devices `base` and `new` of this pool
    /// (e.g. two replication snapshots of one volume). Runs under the metadata lock; its
    /// cost grows with the difference, not the volume, since shared subtrees are skipped.
    pub fn delta(&self, base: ThinId, new: ThinId) -> IoResult<Delta> {
        self.meta_for_io()?.delta(base, new).map_err(meta_io)
    }
}
