//! Reference counts and allocation: data block counts (one byte each in RAM, 255 and more
//! in the overflow map), metadata block counts (derived at load, never stored), the free
//! block cursors and the metadata reserve, and folding the data space map into its bitmap
//! blocks, index tree and overflow tree when a commit is prepared.

use crate::disk::bitmap::{self, OVERFLOW, PER_BITMAP};
use crate::disk::node::Node;
use crate::disk::superblock::max_data_blocks;
use crate::error::{MetaError, MetaResult};
use crate::types::{DataBlock, MetaBlock};

use super::Metadata;

/// Metadata blocks kept back from tree operations so a commit can always complete.
fn meta_reserve(nr_meta: u64) -> u64 {
    (nr_meta / 32).clamp(16, 256)
}

impl Metadata {
    pub(super) fn recount_free(&mut self) {
        self.meta_used = self.mcount.as_slice().iter().filter(|&&c| c > 0).count() as u64;
        self.meta_free = self.sb.nr_meta_blocks - self.meta_used;
        self.data_used = self.dcount.as_slice().iter().filter(|&&c| c > 0).count() as u64;
        self.data_shared = self.dcount.as_slice().iter().filter(|&&c| c > 1).count() as u64;
        self.data_free = self.sb.nr_data_blocks - self.data_used;
    }

    // ---------------------------------------------------------------- space accounting

    /// Data blocks in use (count > 0).
    pub fn data_used(&self) -> u64 {
        self.data_used
    }
    /// Data blocks that can be allocated now (free and not awaiting a commit).
    pub fn data_free(&self) -> u64 {
        self.data_free
    }
    /// Data blocks freed in uncommitted transactions (allocatable after the next commit).
    pub fn data_pending(&self) -> usize {
        self.data_pending.len()
    }
    /// Metadata blocks in use.
    pub fn meta_used(&self) -> u64 {
        self.meta_used
    }
    /// Metadata blocks with a reference (the superblock, tree nodes, bitmaps).
    pub fn live_blocks(&self) -> Vec<MetaBlock> {
        (0..self.mcount.as_slice().len() as u64)
            .map(MetaBlock)
            .filter(|&b| self.mcount[b] > 0)
            .collect()
    }
    /// Whether anything changed since the last commit.
    pub fn is_dirty(&self) -> bool {
        self.dirty || !self.unwritten.is_empty()
    }
    /// Stored reference count of a data block.
    pub fn data_count(&self, d: DataBlock) -> u32 {
        match self.dcount.get(d) {
            Some(&OVERFLOW) => self.overflow.get(&d).copied().unwrap_or(OVERFLOW as u32),
            Some(&c) => c as u32,
            None => 0,
        }
    }

    fn set_data_count(&mut self, d: DataBlock, n: u32) {
        let was_overflow = self.dcount[d] == OVERFLOW;
        match (self.dcount[d] > 1, n > 1) {
            (false, true) => self.data_shared += 1,
            (true, false) => self.data_shared -= 1,
            _ => {}
        }
        if n >= OVERFLOW as u32 {
            self.dcount[d] = OVERFLOW;
            self.overflow.insert(d, n);
            self.dirty_overflow.insert(d);
        } else {
            self.dcount[d] = n as u8;
            if was_overflow {
                self.overflow.remove(&d);
                self.dirty_overflow.insert(d);
            }
        }
        self.dirty_bitmaps.insert(d.0 / PER_BITMAP as u64);
        self.dirty = true;
    }

    pub(super) fn check_data(&self, d: DataBlock, what: &str) -> MetaResult<()> {
        if d.0 >= self.sb.nr_data_blocks {
            return Err(MetaError::Invalid(format!(
                "{what}: {d} is beyond the pool's {} blocks",
                self.sb.nr_data_blocks
            )));
        }
        Ok(())
    }

    pub(super) fn inc_data(&mut self, d: DataBlock) -> MetaResult<()> {
        self.check_data(d, "increment")?;
        let c = self.data_count(d);
        if c == 0 {
            self.data_used += 1;
            if !self.data_reserved.remove(&d) && !self.data_pending.contains(&d) {
                self.data_free -= 1;
            }
        }
        self.set_data_count(d, c + 1);
        Ok(())
    }

    pub(super) fn dec_data(&mut self, d: DataBlock) -> MetaResult<()> {
        self.check_data(d, "decrement")?;
        let c = self.data_count(d);
        if c == 0 {
            return Err(MetaError::Internal(format!(
                "reference count of {d} would drop below zero"
            )));
        }
        self.set_data_count(d, c - 1);
        self.decremented.insert(d);
        if c == 1 {
            self.data_used -= 1;
            if self.data_pending.insert(d) {
                self.data_pending_list.push(d);
            }
            self.forget_block(d)?;
        }
        Ok(())
    }

    /// Reserves a free data block for an in-flight write; it gets its reference when the
    /// mapping is inserted ([`Metadata::map_insert`]) or goes back with [`Metadata::unreserve`].
    pub fn reserve_data(&mut self) -> Option<DataBlock> {
        if self.data_free == 0 {
            return None;
        }
        let n = self.sb.nr_data_blocks;
        for step in 0..n {
            let d = DataBlock((self.data_cursor.0 + step) % n);
            if self.dcount[d] == 0
                && !self.data_pending.contains(&d)
                && !self.data_reserved.contains(&d)
            {
                self.data_reserved.insert(d);
                self.data_free -= 1;
                self.data_cursor = DataBlock((d.0 + 1) % n);
                return Some(d);
            }
        }
        None
    }

    /// Returns a reserved block that was not used.
    pub fn unreserve(&mut self, d: DataBlock) {
        if self.data_reserved.remove(&d) {
            self.data_free += 1;
        }
    }

    // ---------------------------------------------------------------- metadata blocks

    fn reserve(&self) -> u64 {
        if self.commit_mode {
            0
        } else {
            meta_reserve(self.sb.nr_meta_blocks)
        }
    }

    pub(super) fn alloc_meta(&mut self) -> MetaResult<MetaBlock> {
        let reserve = self.reserve();
        if self.meta_free <= reserve {
            return Err(MetaError::NoSpace(format!(
                "metadata device is full ({} of {} blocks used)",
                self.meta_used, self.sb.nr_meta_blocks
            )));
        }
        let n = self.sb.nr_meta_blocks;
        for step in 0..n {
            let b = MetaBlock((self.meta_cursor.0 + step) % n);
            if b.0 != 0 && self.mcount[b] == 0 && !self.meta_pending.contains(&b) {
                self.mcount[b] = 1;
                self.meta_free -= 1;
                self.meta_used += 1;
                self.meta_cursor = MetaBlock(b.0 + 1);
                self.dirty = true;
                return Ok(b);
            }
        }
        Err(MetaError::NoSpace("metadata device is full".into()))
    }

    pub(super) fn new_node(&mut self, node: Node) -> MetaResult<MetaBlock> {
        let b = self.alloc_meta()?;
        self.nodes.insert(b, node);
        self.new_nodes.insert(b);
        Ok(b)
    }

    /// Called when a metadata block's count reached 0.
    pub(super) fn release_meta_block(&mut self, b: MetaBlock) {
        self.meta_used -= 1;
        self.nodes.remove(&b);
        if self.new_nodes.remove(&b) {
            // Never committed: nothing on disk refers to it.
            self.meta_free += 1;
        } else if self.meta_pending.insert(b) {
            self.meta_pending_list.push(b);
        }
        self.dirty = true;
    }

    /// Increments what a node references (it is being copied while shared).
    pub(super) fn inc_children(&mut self, node: &Node) -> MetaResult<()> {
        for b in node.meta_refs() {
            self.mcount[b] += 1;
        }
        for d in node.data_refs() {
            self.inc_data(d)?;
        }
        Ok(())
    }

    /// Drops one reference to metadata block `b` (a node or a bitmap), freeing it and what
    /// it references when the count reaches zero.
    pub(super) fn dec_meta(&mut self, b: MetaBlock) -> MetaResult<()> {
        let c = self.mcount.get(b).copied().unwrap_or(0);
        if c == 0 {
            return Err(MetaError::Internal(format!(
                "reference count of {b} would drop below zero"
            )));
        }
        self.mcount[b] = c - 1;
        if c > 1 {
            return Ok(());
        }
        if let Some(node) = self.nodes.get(&b).cloned() {
            for c in node.meta_refs() {
                self.dec_meta(c)?;
            }
            for d in node.data_refs() {
                self.dec_data(d)?;
            }
        }
        self.release_meta_block(b);
        Ok(())
    }

    /// Fails with `NoSpace` unless one tree operation on each of the trees at `roots` (plus
    /// what the next commit needs for the space map) can complete: an operation must never
    /// run out of blocks half way.
    pub(super) fn ensure_meta(&self, roots: &[MetaBlock]) -> MetaResult<()> {
        let mut need =
            self.reserve() + self.dirty_bitmaps.len() as u64 + 2 * self.dirty_overflow.len() as u64;
        for r in roots {
            let level = self.nodes.get(r).map(|n| n.level as u64).unwrap_or(0);
            need += 4 * (level + 3);
        }
        if self.meta_free < need {
            return Err(MetaError::NoSpace(format!(
                "metadata device is full ({} of {} blocks used, {} awaiting the next commit)",
                self.meta_used,
                self.sb.nr_meta_blocks,
                self.meta_pending.len()
            )));
        }
        Ok(())
    }

    /// Metadata blocks freed by uncommitted transactions.
    pub fn meta_pending(&self) -> usize {
        self.meta_pending.len()
    }

    /// Grows the data space map (the data device grew), as far as the metadata device can
    /// describe (grow the metadata first).
    pub fn grow_data(&mut self, nr_data_blocks: u64) {
        let max = max_data_blocks(self.sb.nr_meta_blocks);
        if nr_data_blocks > max {
            log::warn!(
                "{nr_data_blocks} data blocks: the metadata device ({} blocks) describes only {max}; using {max}",
                self.sb.nr_meta_blocks
            );
        }
        let nr_data_blocks = nr_data_blocks.min(max);
        if nr_data_blocks > self.sb.nr_data_blocks {
            let extra = nr_data_blocks - self.sb.nr_data_blocks;
            self.dcount.resize(nr_data_blocks as usize, 0);
            self.data_free += extra;
            self.sb.nr_data_blocks = nr_data_blocks;
            self.dirty = true;
            if let Err(e) = self.dedup_grown() {
                log::error!("rebuilding the dedup index after growing the pool: {e}");
            }
        }
    }

    /// Grows the metadata space (the metadata device grew).
    pub fn grow_meta(&mut self, nr_meta_blocks: u64) {
        if nr_meta_blocks > self.sb.nr_meta_blocks {
            let extra = nr_meta_blocks - self.sb.nr_meta_blocks;
            self.mcount.resize(nr_meta_blocks as usize, 0);
            self.meta_free += extra;
            self.sb.nr_meta_blocks = nr_meta_blocks;
            self.dirty = true;
        }
    }

    /// Folds the data space map changed in this transaction into its trees: overflow tree
    /// entries, then new bitmap blocks (their images appended to `blocks`) and index tree
    /// entries; all-zero bitmaps leave the index.
    pub(super) fn fold_space_map(
        &mut self,
        blocks: &mut Vec<(MetaBlock, Vec<u8>)>,
    ) -> MetaResult<()> {
        for d in std::mem::take(&mut self.dirty_overflow) {
            let c = self.data_count(d);
            let root = self.sb.overflow_root;
            let (r, _) = if c >= OVERFLOW as u32 {
                self.insert(root, d.0, [c as u64, 0])?
            } else {
                self.remove(root, d.0)?
            };
            self.sb.overflow_root = r;
        }
        for i in std::mem::take(&mut self.dirty_bitmaps) {
            let lo = i as usize * PER_BITMAP;
            let counts = self.dcount.as_slice();
            let hi = (lo + PER_BITMAP).min(counts.len());
            let root = self.sb.sm_index_root;
            if lo >= hi || counts[lo..hi].iter().all(|&c| c == 0) {
                let (r, old) = self.remove(root, i)?;
                self.sb.sm_index_root = r;
                if let Some(o) = old {
                    self.dec_meta(MetaBlock(o[0]))?;
                }
            } else {
                let nb = self.alloc_meta()?;
                blocks.push((nb, bitmap::pack(i, &self.dcount.as_slice()[lo..hi], nb)));
                let (r, old) = self.insert(root, i, [nb.0, 0])?;
                self.sb.sm_index_root = r;
                if let Some(o) = old {
                    self.dec_meta(MetaBlock(o[0]))?;
                }
            }
        }
        Ok(())
    }
}
