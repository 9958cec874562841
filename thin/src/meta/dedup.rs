//! The dedup side of the metadata: the hash tree (data block -> first 128 bits of its hash,
//! committed with everything else), the RAM index built from it, and forgetting a block
//! whose count drops to zero.
//!
//! A record exists for a live block written through the dedup path (or hashed by a scan).
//! When a block's count reaches 0 its index entry goes at once (so it is never matched
//! again) and its record is queued; the queue is drained (records removed from the tree)
//! at the end of the same metadata operation, as far as metadata space allows. A record
//! left behind (metadata device full) is *stale*: it counts only while its block's count
//! is > 0, is never in the index, is replaced if the block is written again, and is dropped
//! by a later drain or at the next open. `check` reports stale records as information.

use crate::dedup::index::{home_in, Index};
use crate::dedup::Hash128;
use crate::disk::node::{Node, TreeKind};
use crate::error::{MetaError, MetaResult};
use crate::types::{DataBlock, MetaBlock, ThinId, VBlock};

use super::Metadata;

/// How the index is sized.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum IndexSize {
    /// For every data block of the pool (grows with the pool).
    AllBlocks,
    /// At most this many bytes of slots (`dedup_index_mb`).
    Bytes(u64),
}

/// The dedup state of an open dedup pool (absent in plain pools and in tools).
pub(crate) struct DedupState {
    index: Index,
    size: IndexSize,
    /// Blocks whose count reached 0 and whose record is still in the tree.
    forget: Vec<DataBlock>,
    /// Records of blocks with count > 0.
    live_records: u64,
    /// Live records the index had no room for.
    left_out: u64,
}

/// Sizes of the dedup metadata, for status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DedupMetaStats {
    /// Index entries.
    pub index_entries: u64,
    /// Most entries the index takes.
    pub index_capacity: u64,
    /// RAM of the index slots in bytes.
    pub index_bytes: u64,
    /// Records of live blocks.
    pub live_records: u64,
    /// Live records that are not in the index (it was full).
    pub left_out: u64,
    /// Records of freed blocks still to be removed from the tree.
    pub forget_pending: u64,
    /// Data blocks with a count above 1.
    pub shared_blocks: u64,
}

impl Metadata {
    /// Whether this metadata deduplicates (the index is built).
    pub fn dedup_enabled(&self) -> bool {
        self.dedup.is_some()
    }

    /// Turns dedup on for an open pool: marks the superblock, creates an empty hash tree if
    /// there is none (a plain pool: its blocks stay unhashed until scanned), and builds the
    /// index from the records of live blocks. Needs 4 KiB data blocks.
    pub fn enable_dedup(&mut self, size: IndexSize) -> MetaResult<()> {
        if self.sb.data_block_sectors != 8 {
            return Err(MetaError::Invalid(format!(
                "dedup needs a data block size of 8 sectors (4 KiB), got {}",
                self.sb.data_block_sectors
            )));
        }
        if !self.sb.dedup || self.sb.hash_root.0 == 0 {
            self.ensure_meta(&[MetaBlock(0)])?;
            if self.sb.hash_root.0 == 0 {
                self.sb.hash_root = self.new_node(Node::empty_leaf(TreeKind::Hash))?;
            }
            self.sb.dedup = true;
            self.dirty = true;
        }
        self.dedup = Some(DedupState {
            index: Index::with_slots(1),
            size,
            forget: Vec::new(),
            live_records: 0,
            left_out: 0,
        });
        self.rebuild_index()?;
        self.drain_forget()
    }

    /// Rebuilds the index from the hash tree (at open, and when the pool grew).
    fn rebuild_index(&mut self) -> MetaResult<()> {
        let Some(st) = self.dedup.as_ref() else {
            return Ok(());
        };
        let mut index = match st.size {
            IndexSize::AllBlocks => Index::for_entries(self.sb.nr_data_blocks),
            IndexSize::Bytes(b) => Index::for_bytes(b),
        };
        let (mut live, mut left_out, mut forget) = (0u64, 0u64, Vec::new());
        let counts = &self.dcount;
        let overflow = &self.overflow;
        self.walk_leaves(self.sb.hash_root, &mut |k, v| {
            let d = DataBlock(k);
            let live_block = counts.get(d).is_some_and(|&c| c > 0) || overflow.contains_key(&d);
            if live_block {
                live += 1;
                if !index.insert(&[v[0], v[1]], d) {
                    left_out += 1;
                }
            } else {
                forget.push(d);
            }
        })?;
        if let Some(st) = self.dedup.as_mut() {
            st.index = index;
            st.live_records = live;
            st.left_out = left_out;
            st.forget = forget;
        }
        Ok(())
    }

    /// The pool grew: an index sized for every block is rebuilt larger.
    pub(super) fn dedup_grown(&mut self) -> MetaResult<()> {
        match self.dedup.as_ref().map(|s| s.size) {
            Some(IndexSize::AllBlocks) => self.rebuild_index(),
            _ => Ok(()),
        }
    }

    /// The record of block `d`, if it has one.
    pub fn hash_record(&self, d: DataBlock) -> MetaResult<Option<Hash128>> {
        if self.sb.hash_root.0 == 0 {
            return Ok(None);
        }
        Ok(self.lookup_path(self.sb.hash_root, d.0)?.map(|(v, _)| v))
    }

    /// Live blocks whose full record is `h` (index candidates confirmed against the tree).
    pub fn dedup_candidates(&self, h: &Hash128) -> MetaResult<Vec<DataBlock>> {
        let Some(st) = self.dedup.as_ref() else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for d in st.index.candidates(h) {
            if self.data_count(d) > 0 && self.hash_record(d)? == Some(*h) {
                out.push(d);
            }
        }
        Ok(out)
    }

    /// The first live block whose full record is `h`, other than `not` (what a write shares
    /// with; [`Metadata::dedup_candidates`] without collecting them all).
    pub fn dedup_first_candidate(
        &self,
        h: &Hash128,
        not: Option<DataBlock>,
    ) -> MetaResult<Option<DataBlock>> {
        let Some(st) = self.dedup.as_ref() else {
            return Ok(None);
        };
        for d in st.index.candidates(h) {
            if Some(d) != not && self.data_count(d) > 0 && self.hash_record(d)? == Some(*h) {
                return Ok(Some(d));
            }
        }
        Ok(None)
    }

    fn dedup_state(&mut self) -> MetaResult<&mut DedupState> {
        self.dedup
            .as_mut()
            .ok_or_else(|| MetaError::Internal("dedup operation on a plain pool".into()))
    }

    /// Gives live block `d` the record `h` and an index entry (if the index has room).
    fn add_record(&mut self, d: DataBlock, h: &Hash128) -> MetaResult<()> {
        let (r, _) = self.insert(self.sb.hash_root, d.0, *h)?;
        self.sb.hash_root = r;
        self.dirty = true;
        // `d` had no record, or a stale one (count 0 then), which did not count as live.
        let st = self.dedup_state()?;
        st.live_records += 1;
        if !st.index.insert(h, d) {
            st.left_out += 1;
        }
        Ok(())
    }

    /// Maps `v` of `id` to the freshly written block `d` (reserved, holding content `h`),
    /// with its record and index entry, in one metadata operation.
    pub fn dedup_map_unique(
        &mut self,
        id: ThinId,
        v: VBlock,
        d: DataBlock,
        h: &Hash128,
    ) -> MetaResult<()> {
        let dev = self
            .device(id)?
            .ok_or_else(|| MetaError::Invalid(format!("{id} does not exist")))?;
        let dr = self.sb.device_root;
        // Both trees' worst cases up front: the mapping must not go in without its record.
        self.ensure_meta(&[dev.root, dr, dr, self.sb.hash_root])?;
        self.map_insert(id, v, d)?;
        self.add_record(d, h)
    }

    /// Gives an existing live block without a record the record `h` (a scan hashed it).
    pub fn dedup_record(&mut self, d: DataBlock, h: &Hash128) -> MetaResult<()> {
        if self.data_count(d) == 0 {
            return Err(MetaError::Invalid(format!("{d} is not in use")));
        }
        if self.hash_record(d)?.is_some() {
            return Ok(());
        }
        self.ensure_meta(&[self.sb.hash_root])?;
        self.add_record(d, h)
    }

    /// `d`'s count reached 0: its index entry goes now, its record is queued for removal.
    pub(super) fn forget_block(&mut self, d: DataBlock) -> MetaResult<()> {
        if self.dedup.is_none() {
            return Ok(());
        }
        let Some(h) = self.hash_record(d)? else {
            return Ok(());
        };
        // The index is taken out while the homes of other entries are looked up in the tree.
        let Some(mut st) = self.dedup.take() else {
            return Ok(());
        };
        let removed = st.index.remove(&h, d, &mut |b, n| {
            self.hash_record(b).ok().flatten().map(|x| home_in(&x, n))
        });
        if !removed {
            // Not indexed: it was left out of a full index (or is stale already).
            st.left_out = st.left_out.saturating_sub(1);
        }
        st.live_records = st.live_records.saturating_sub(1);
        st.forget.push(d);
        self.dedup = Some(st);
        Ok(())
    }

    /// Removes the queued records of freed blocks from the tree, while metadata space
    /// lasts; what is left stays queued (stale, harmless) for the next operation.
    pub fn drain_forget(&mut self) -> MetaResult<()> {
        let Some(st) = self.dedup.as_mut() else {
            return Ok(());
        };
        let mut queue = std::mem::take(&mut st.forget);
        let mut done = 0;
        for &d in &queue {
            // Written again since (a stale record survived a commit and the block was
            // reused): its record is the new one.
            if self.data_count(d) > 0 {
                done += 1;
                continue;
            }
            match self.remove(self.sb.hash_root, d.0) {
                Ok((r, _)) => {
                    self.sb.hash_root = r;
                    self.dirty = true;
                    done += 1;
                }
                Err(MetaError::NoSpace(_)) => break,
                Err(e) => return Err(e),
            }
        }
        queue.drain(..done);
        if let Some(st) = self.dedup.as_mut() {
            queue.append(&mut st.forget);
            st.forget = queue;
        }
        Ok(())
    }

    /// Dedup sizes and counters; `None` for a plain pool.
    pub fn dedup_meta_stats(&self) -> Option<DedupMetaStats> {
        let st = self.dedup.as_ref()?;
        Some(DedupMetaStats {
            index_entries: st.index.len(),
            index_capacity: st.index.capacity(),
            index_bytes: st.index.bytes(),
            live_records: st.live_records,
            left_out: st.left_out,
            forget_pending: st.forget.len() as u64,
            shared_blocks: self.data_shared,
        })
    }

    /// Bumped whenever freed data blocks become allocatable again: a block read for
    /// `dedup_verify` is still the same content if it is live and has the same record both
    /// before and after, and no release happened in between.
    pub fn release_gen(&self) -> u64 {
        self.release_gen
    }
}
