//! The pool metadata in memory: copy-on-write B-trees, reference counts and the commit.
//!
//! Every metadata node is resident (decoded) once the pool is open; the metadata device is
//! the durable copy. A transaction modifies nodes by *shadowing*: a node that is part of the
//! last commit (or shared) is copied to a fresh block before it changes, so the committed
//! trees on disk stay intact until the next superblock points elsewhere. Blocks freed during
//! a transaction (metadata or data) are not reused before that transaction is durable, so a
//! power cut always finds the last committed trees and the data they map untouched.
//!
//! Reference counts:
//! - metadata blocks: number of references from parents (or from device details / the
//!   superblock). Derived by walking the trees on open (not stored), so the space map never
//!   has to describe itself.
//! - data blocks: number of mapping-tree *leaves* that reference the block (stored in bitmap
//!   blocks + overflow tree). A snapshot shares the origin's root (one increment); sharing is
//!   broken lazily: shadowing a shared node increments what it references, so counts become
//!   per-(device, block) exactly where the trees diverged.
//!
//! One file, one job:
//! - `btree.rs`: node storage, shadowing and the B-tree operations every tree uses.
//! - `space_map.rs`: reference counts of data and metadata blocks, allocation, and folding
//!   the data space map into its bitmaps, index tree and overflow tree at commit.
//! - `device_tree.rs`: thin devices (create, snapshot, delete, details) and their mappings.
//! - `commit.rs`: preparing, finishing and aborting a commit; the offline commit.
//! - `load.rs`: reading and validating the whole metadata at open.
//! - `dedup.rs`: the hash tree of dedup pools, its RAM index, forgetting freed blocks.
//! - `delta.rs`: the changed-block walk between two devices, skipping shared subtrees.

mod btree;
mod commit;
mod dedup;
mod delta;
mod device_tree;
mod load;
mod space_map;

use std::collections::{BTreeSet, HashMap, HashSet};

use crate::disk::node::{Node, TreeKind};
use crate::disk::superblock::{max_data_blocks, Superblock, MAX_DATA_BLOCKS, MIN_META_BLOCKS};
use crate::error::{MetaError, MetaResult};
use crate::types::{DataBlock, MetaBlock, PerBlock};

pub use commit::{commit_offline, write_block, Prepared};
pub use dedup::{DedupMetaStats, IndexSize};
pub use delta::{Delta, DeltaKind, DeltaRange};
pub use load::{load, read_superblock, LoadReport};

/// A leaf value: up to two words (mapping: `[data block, 0]`; device: `[root, mapped]`).
pub type Val = [u64; 2];

/// Device details as stored in the device tree.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Root of the device's mapping tree.
    pub root: MetaBlock,
    /// Number of mapped virtual blocks.
    pub mapped: u64,
}

/// Result of a lookup for I/O.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Lookup {
    /// Where the virtual block lives.
    pub block: DataBlock,
    /// Whether only this device references it (a write may go in place).
    pub exclusive: bool,
}

/// The resident metadata of one pool.
pub struct Metadata {
    /// Header fields (roots are kept current; written at commit).
    pub sb: Superblock,
    nodes: HashMap<MetaBlock, Node>,
    mcount: PerBlock<MetaBlock, u32>,
    new_nodes: HashSet<MetaBlock>,
    meta_pending: HashSet<MetaBlock>,
    meta_pending_list: Vec<MetaBlock>,
    meta_free: u64,
    meta_used: u64,
    meta_cursor: MetaBlock,
    dcount: PerBlock<DataBlock, u8>,
    overflow: HashMap<DataBlock, u32>,
    data_pending: HashSet<DataBlock>,
    data_pending_list: Vec<DataBlock>,
    data_reserved: HashSet<DataBlock>,
    data_free: u64,
    data_used: u64,
    data_cursor: DataBlock,
    /// Numbers of the bitmaps (not blocks) changed in this transaction.
    dirty_bitmaps: BTreeSet<u64>,
    dirty_overflow: BTreeSet<DataBlock>,
    unwritten: Vec<(MetaBlock, Vec<u8>)>,
    dirty: bool,
    commit_mode: bool,
    /// Data blocks whose count dropped in this transaction / in the one being committed.
    /// The last durable metadata may share them with another device, so a write must not
    /// go in place into them until a commit is durable.
    decremented: HashSet<DataBlock>,
    frozen_decremented: HashSet<DataBlock>,
    /// A device was deleted in this transaction / in the one being committed: sharing of
    /// whole subtrees may have dropped without any data count dropping, so no write goes in
    /// place until a commit is durable.
    deleted: bool,
    frozen_deleted: bool,
    /// Data blocks with a count above 1.
    data_shared: u64,
    /// Bumped when freed data blocks become allocatable (see [`Metadata::release_gen`]).
    release_gen: u64,
    /// Index and bookkeeping of a dedup pool (`None`: plain pool, or tools).
    dedup: Option<dedup::DedupState>,
}

impl Metadata {
    fn empty(sb: Superblock) -> Metadata {
        let nr_meta = sb.nr_meta_blocks as usize;
        let nr_data = sb.nr_data_blocks as usize;
        let mut mcount = PerBlock::new(nr_meta, 0u32);
        mcount[MetaBlock(0)] = 1;
        Metadata {
            sb,
            nodes: HashMap::new(),
            mcount,
            new_nodes: HashSet::new(),
            meta_pending: HashSet::new(),
            meta_pending_list: Vec::new(),
            meta_free: 0,
            meta_used: 0,
            meta_cursor: MetaBlock(1),
            dcount: PerBlock::new(nr_data, 0u8),
            overflow: HashMap::new(),
            data_pending: HashSet::new(),
            data_pending_list: Vec::new(),
            data_reserved: HashSet::new(),
            data_free: 0,
            data_used: 0,
            data_cursor: DataBlock(0),
            dirty_bitmaps: BTreeSet::new(),
            dirty_overflow: BTreeSet::new(),
            unwritten: Vec::new(),
            dirty: true,
            commit_mode: false,
            decremented: HashSet::new(),
            frozen_decremented: HashSet::new(),
            deleted: false,
            frozen_deleted: false,
            data_shared: 0,
            release_gen: 0,
            dedup: None,
        }
    }

    /// Fresh metadata for a pool of `nr_data_blocks` blocks of `data_block_sectors`, on a
    /// metadata device of `nr_meta_blocks` blocks. Nothing is written until the first commit.
    pub fn format(
        data_block_sectors: u32,
        nr_data_blocks: u64,
        nr_meta_blocks: u64,
    ) -> MetaResult<Metadata> {
        if nr_data_blocks > MAX_DATA_BLOCKS {
            return Err(MetaError::Invalid(format!(
                "{nr_data_blocks} data blocks: at most {MAX_DATA_BLOCKS} are supported (use a larger block size)"
            )));
        }
        if nr_meta_blocks < MIN_META_BLOCKS {
            return Err(MetaError::NoSpace(format!(
                "metadata device holds {nr_meta_blocks} blocks of 4 KiB, need at least {MIN_META_BLOCKS}"
            )));
        }
        let max_data = max_data_blocks(nr_meta_blocks);
        if nr_data_blocks > max_data {
            return Err(MetaError::NoSpace(format!(
                "a metadata device of {nr_meta_blocks} blocks of 4 KiB describes at most {max_data} data blocks, not {nr_data_blocks} (use a larger metadata device or block size)"
            )));
        }
        let sb = Superblock {
            data_block_sectors,
            nr_data_blocks,
            nr_meta_blocks,
            transaction_id: 0,
            generation: 0,
            device_root: MetaBlock(0),
            sm_index_root: MetaBlock(0),
            overflow_root: MetaBlock(0),
            held_root: MetaBlock(0),
            dedup: false,
            hash_root: MetaBlock(0),
        };
        let mut m = Metadata::empty(sb);
        m.recount_free();
        m.sb.device_root = m.new_node(Node::empty_leaf(TreeKind::Devices))?;
        m.sb.sm_index_root = m.new_node(Node::empty_leaf(TreeKind::SmIndex))?;
        m.sb.overflow_root = m.new_node(Node::empty_leaf(TreeKind::Overflow))?;
        Ok(m)
    }

    /// Sets the user transaction id.
    pub fn set_transaction_id(&mut self, old: u64, new: u64) -> MetaResult<()> {
        if self.sb.transaction_id != old {
            return Err(MetaError::Invalid(format!(
                "transaction id is {}, not {old}",
                self.sb.transaction_id
            )));
        }
        self.sb.transaction_id = new;
        self.dirty = true;
        Ok(())
    }
}
