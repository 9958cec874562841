//! The changed-block walk on an open pool (see `meta/delta.rs`).

use tables::IoResult;

use super::{meta_io, Pool};
use crate::meta::Delta;
use crate::types::ThinId;

impl Pool {
    /// The blocks whose mapping differs between thin devices `base` and `new` of this pool
    /// (e.g. two replication snapshots of one volume; no base: every mapped block of `new`).
    /// Runs under the metadata lock; its cost grows with the difference, not the volume,
    /// since shared subtrees are skipped.
    pub fn delta(&self, base: Option<ThinId>, new: ThinId) -> IoResult<Delta> {
        let m = self.meta_for_io()?;
        match base {
            Some(b) => m.delta(b, new),
            None => m.delta_from_empty(new),
        }
        .map_err(meta_io)
    }

    /// Whether thin device `id` exists.
    pub fn has_thin(&self, id: ThinId) -> IoResult<bool> {
        Ok(self.meta_for_io()?.device(id).map_err(meta_io)?.is_some())
    }
}
