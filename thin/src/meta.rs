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

use std::collections::{BTreeSet, HashMap, HashSet};

use tables::io::BlockDevice;
use tables::{Bytes, WriteFlags};

use crate::disk::bitmap::{self, OVERFLOW, PER_BITMAP};
use crate::disk::node::{Node, TreeKind};
use crate::disk::superblock::Superblock;
use crate::error::{MetaError, MetaResult, Structure};
use crate::types::{DataBlock, MetaBlock, ThinId, VBlock, META_BLOCK_SIZE};

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

/// What a commit must write, prepared atomically under the metadata lock.
pub struct Prepared {
    /// Node and bitmap images to write before the superblock.
    pub blocks: Vec<(MetaBlock, Vec<u8>)>,
    /// The new superblock image.
    pub superblock: Vec<u8>,
    /// Metadata blocks freed by this transaction (reusable once it is durable).
    pub freed_meta: Vec<u64>,
    /// Data blocks freed by this transaction.
    pub freed_data: Vec<u64>,
}

/// Metadata blocks kept back from tree operations so a commit can always complete.
fn meta_reserve(nr_meta: u64) -> u64 {
    (nr_meta / 32).clamp(16, 256)
}

/// The resident metadata of one pool.
pub struct Metadata {
    /// Header fields (roots are kept current; written at commit).
    pub sb: Superblock,
    nodes: HashMap<u64, Node>,
    mcount: Vec<u32>,
    new_nodes: HashSet<u64>,
    meta_pending: HashSet<u64>,
    meta_pending_list: Vec<u64>,
    meta_free: u64,
    meta_used: u64,
    meta_cursor: u64,
    dcount: Vec<u8>,
    overflow: HashMap<u64, u32>,
    data_pending: HashSet<u64>,
    data_pending_list: Vec<u64>,
    data_reserved: HashSet<u64>,
    data_free: u64,
    data_used: u64,
    data_cursor: u64,
    dirty_bitmaps: BTreeSet<u64>,
    dirty_overflow: BTreeSet<u64>,
    unwritten: Vec<(MetaBlock, Vec<u8>)>,
    dirty: bool,
    commit_mode: bool,
    /// Data blocks whose count dropped in this transaction / in the one being committed.
    /// The last durable metadata may share them with another device, so a write must not
    /// go in place into them until a commit is durable.
    decremented: HashSet<u64>,
    frozen_decremented: HashSet<u64>,
    /// A device was deleted in this transaction / in the one being committed: sharing of
    /// whole subtrees may have dropped without any data count dropping, so no write goes in
    /// place until a commit is durable.
    deleted: bool,
    frozen_deleted: bool,
}

/// What loading found besides the metadata itself (for `check`).
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    /// Data blocks whose stored count exceeds the references found (leaked space).
    pub leaked: Vec<(DataBlock, u32, u32)>,
    /// Devices whose stored mapped count differs from their tree.
    pub bad_mapped_counts: Vec<(ThinId, u64, u64)>,
}

impl Metadata {
    fn empty(sb: Superblock) -> Metadata {
        let nr_meta = sb.nr_meta_blocks as usize;
        let nr_data = sb.nr_data_blocks as usize;
        let mut mcount = vec![0u32; nr_meta];
        mcount[0] = 1;
        Metadata {
            sb,
            nodes: HashMap::new(),
            mcount,
            new_nodes: HashSet::new(),
            meta_pending: HashSet::new(),
            meta_pending_list: Vec::new(),
            meta_free: 0,
            meta_used: 0,
            meta_cursor: 1,
            dcount: vec![0u8; nr_data],
            overflow: HashMap::new(),
            data_pending: HashSet::new(),
            data_pending_list: Vec::new(),
            data_reserved: HashSet::new(),
            data_free: 0,
            data_used: 0,
            data_cursor: 0,
            dirty_bitmaps: BTreeSet::new(),
            dirty_overflow: BTreeSet::new(),
            unwritten: Vec::new(),
            dirty: true,
            commit_mode: false,
            decremented: HashSet::new(),
            frozen_decremented: HashSet::new(),
            deleted: false,
            frozen_deleted: false,
        }
    }

    fn recount_free(&mut self) {
        self.meta_used = self.mcount.iter().filter(|&&c| c > 0).count() as u64;
        self.meta_free = self.sb.nr_meta_blocks - self.meta_used;
        self.data_used = self.dcount.iter().filter(|&&c| c > 0).count() as u64;
        self.data_free = self.sb.nr_data_blocks - self.data_used;
    }

    /// Fresh metadata for a pool of `nr_data_blocks` blocks of `data_block_sectors`, on a
    /// metadata device of `nr_meta_blocks` blocks. Nothing is written until the first commit.
    pub fn format(
        data_block_sectors: u32,
        nr_data_blocks: u64,
        nr_meta_blocks: u64,
    ) -> MetaResult<Metadata> {
        if nr_data_blocks > crate::disk::superblock::MAX_DATA_BLOCKS {
            return Err(MetaError::Invalid(format!(
                "{nr_data_blocks} data blocks: at most {} are supported (use a larger block size)",
                crate::disk::superblock::MAX_DATA_BLOCKS
            )));
        }
        if nr_meta_blocks < 64 {
            return Err(MetaError::NoSpace(format!(
                "metadata device holds {nr_meta_blocks} blocks of 4 KiB, need at least 64"
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
        };
        let mut m = Metadata::empty(sb);
        m.recount_free();
        m.sb.device_root = m.new_node(Node::empty_leaf(TreeKind::Devices))?;
        m.sb.sm_index_root = m.new_node(Node::empty_leaf(TreeKind::SmIndex))?;
        m.sb.overflow_root = m.new_node(Node::empty_leaf(TreeKind::Overflow))?;
        Ok(m)
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
        (0..self.mcount.len() as u64)
            .filter(|&b| self.mcount[b as usize] > 0)
            .map(MetaBlock)
            .collect()
    }
    /// Whether anything changed since the last commit.
    pub fn is_dirty(&self) -> bool {
        self.dirty || !self.unwritten.is_empty()
    }
    /// Stored reference count of a data block.
    pub fn data_count(&self, d: DataBlock) -> u32 {
        match self.dcount.get(d.0 as usize) {
            Some(&OVERFLOW) => self.overflow.get(&d.0).copied().unwrap_or(OVERFLOW as u32),
            Some(&c) => c as u32,
            None => 0,
        }
    }

    fn set_data_count(&mut self, d: u64, n: u32) {
        let was_overflow = self.dcount[d as usize] == OVERFLOW;
        if n >= OVERFLOW as u32 {
            self.dcount[d as usize] = OVERFLOW;
            self.overflow.insert(d, n);
            self.dirty_overflow.insert(d);
        } else {
            self.dcount[d as usize] = n as u8;
            if was_overflow {
                self.overflow.remove(&d);
                self.dirty_overflow.insert(d);
            }
        }
        self.dirty_bitmaps.insert(d / PER_BITMAP as u64);
        self.dirty = true;
    }

    fn check_data(&self, d: u64, what: &str) -> MetaResult<()> {
        if d >= self.sb.nr_data_blocks {
            return Err(MetaError::Invalid(format!(
                "{what}: data block {d} is beyond the pool's {} blocks",
                self.sb.nr_data_blocks
            )));
        }
        Ok(())
    }

    fn inc_data(&mut self, d: u64) -> MetaResult<()> {
        self.check_data(d, "increment")?;
        let c = self.data_count(DataBlock(d));
        if c == 0 {
            self.data_used += 1;
            if !self.data_reserved.remove(&d) && !self.data_pending.contains(&d) {
                self.data_free -= 1;
            }
        }
        self.set_data_count(d, c + 1);
        Ok(())
    }

    fn dec_data(&mut self, d: u64) -> MetaResult<()> {
        self.check_data(d, "decrement")?;
        let c = self.data_count(DataBlock(d));
        if c == 0 {
            return Err(MetaError::Internal(format!(
                "reference count of data block {d} would drop below zero"
            )));
        }
        self.set_data_count(d, c - 1);
        self.decremented.insert(d);
        if c == 1 {
            self.data_used -= 1;
            if self.data_pending.insert(d) {
                self.data_pending_list.push(d);
            }
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
            let d = (self.data_cursor + step) % n;
            if self.dcount[d as usize] == 0
                && !self.data_pending.contains(&d)
                && !self.data_reserved.contains(&d)
            {
                self.data_reserved.insert(d);
                self.data_free -= 1;
                self.data_cursor = (d + 1) % n;
                return Some(DataBlock(d));
            }
        }
        None
    }

    /// Returns a reserved block that was not used.
    pub fn unreserve(&mut self, d: DataBlock) {
        if self.data_reserved.remove(&d.0) {
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

    fn alloc_meta(&mut self) -> MetaResult<u64> {
        let reserve = self.reserve();
        if self.meta_free <= reserve {
            return Err(MetaError::NoSpace(format!(
                "metadata device is full ({} of {} blocks used)",
                self.meta_used, self.sb.nr_meta_blocks
            )));
        }
        let n = self.sb.nr_meta_blocks;
        for step in 0..n {
            let b = (self.meta_cursor + step) % n;
            if b != 0 && self.mcount[b as usize] == 0 && !self.meta_pending.contains(&b) {
                self.mcount[b as usize] = 1;
                self.meta_free -= 1;
                self.meta_used += 1;
                self.meta_cursor = b + 1;
                self.dirty = true;
                return Ok(b);
            }
        }
        Err(MetaError::NoSpace("metadata device is full".into()))
    }

    fn new_node(&mut self, node: Node) -> MetaResult<MetaBlock> {
        let b = self.alloc_meta()?;
        self.nodes.insert(b, node);
        self.new_nodes.insert(b);
        Ok(MetaBlock(b))
    }

    /// Called when a metadata block's count reached 0.
    fn release_meta_block(&mut self, b: u64) {
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

    fn node(&self, b: u64) -> MetaResult<&Node> {
        self.nodes.get(&b).ok_or_else(|| {
            MetaError::Internal(format!("metadata block {b} is not a resident tree node"))
        })
    }

    fn node_mut(&mut self, b: u64) -> MetaResult<&mut Node> {
        self.nodes.get_mut(&b).ok_or_else(|| {
            MetaError::Internal(format!("metadata block {b} is not a resident tree node"))
        })
    }

    /// Increments what a node references (it is being copied while shared).
    fn inc_children(&mut self, node: &Node) -> MetaResult<()> {
        if !node.is_leaf() {
            for &c in &node.vals {
                self.mcount[c as usize] += 1;
            }
            return Ok(());
        }
        match node.kind {
            TreeKind::Mapping => {
                for &d in &node.vals {
                    self.inc_data(d)?;
                }
            }
            TreeKind::Devices => {
                for i in 0..node.len() {
                    self.mcount[node.val(i)[0] as usize] += 1;
                }
            }
            TreeKind::SmIndex => {
                for &b in &node.vals {
                    self.mcount[b as usize] += 1;
                }
            }
            TreeKind::Overflow => {}
        }
        Ok(())
    }

    /// Drops one reference to metadata block `b` (a node or a bitmap), freeing it and what
    /// it references when the count reaches zero.
    fn dec_meta(&mut self, b: u64) -> MetaResult<()> {
        let c = self.mcount.get(b as usize).copied().unwrap_or(0);
        if c == 0 {
            return Err(MetaError::Internal(format!(
                "reference count of metadata block {b} would drop below zero"
            )));
        }
        self.mcount[b as usize] = c - 1;
        if c > 1 {
            return Ok(());
        }
        if let Some(node) = self.nodes.get(&b).cloned() {
            if !node.is_leaf() {
                for &c in &node.vals {
                    self.dec_meta(c)?;
                }
            } else {
                match node.kind {
                    TreeKind::Mapping => {
                        for &d in &node.vals {
                            self.dec_data(d)?;
                        }
                    }
                    TreeKind::Devices => {
                        for i in 0..node.len() {
                            self.dec_meta(node.val(i)[0])?;
                        }
                    }
                    TreeKind::SmIndex => {
                        for &c in &node.vals {
                            self.dec_meta(c)?;
                        }
                    }
                    TreeKind::Overflow => {}
                }
            }
        }
        self.release_meta_block(b);
        Ok(())
    }

    /// Frees a node whose entries were moved elsewhere (its references go with them).
    fn free_shallow(&mut self, b: u64) {
        self.mcount[b as usize] = 0;
        self.release_meta_block(b);
    }

    /// Makes node `b` writable in this transaction: returns `b` itself if it is new and
    /// unshared, else a fresh copy (the caller re-points the parent).
    fn shadow(&mut self, b: u64) -> MetaResult<u64> {
        let count = self.mcount[b as usize];
        if count == 1 && self.new_nodes.contains(&b) {
            return Ok(b);
        }
        let node = self.node(b)?.clone();
        let nb = self.alloc_meta()?;
        if count > 1 {
            self.inc_children(&node)?;
            self.mcount[b as usize] -= 1;
        } else {
            self.mcount[b as usize] = 0;
            self.release_meta_block(b);
        }
        self.nodes.insert(nb, node);
        self.new_nodes.insert(nb);
        Ok(nb)
    }

    /// Fails with `NoSpace` unless one tree operation on each of the trees at `roots` (plus
    /// what the next commit needs for the space map) can complete: an operation must never
    /// run out of blocks half way.
    fn ensure_meta(&self, roots: &[u64]) -> MetaResult<()> {
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

    // ---------------------------------------------------------------- B-tree operations

    fn child_index(node: &Node, key: u64) -> usize {
        match node.keys.binary_search(&key) {
            Ok(i) => i,
            Err(0) => 0,
            Err(i) => i - 1,
        }
    }

    /// Looks `key` up in the tree at `root`; also says whether every node on the path has a
    /// single reference.
    fn lookup_path(&self, root: u64, key: u64) -> MetaResult<Option<(Val, bool)>> {
        let mut cur = root;
        let mut exclusive = true;
        loop {
            exclusive &= self.mcount[cur as usize] == 1;
            let n = self.node(cur)?;
            if n.is_leaf() {
                return Ok(n.keys.binary_search(&key).ok().map(|i| {
                    let v = n.val(i);
                    ([v[0], v.get(1).copied().unwrap_or(0)], exclusive)
                }));
            }
            if n.is_empty() || key < n.keys[0] {
                return Ok(None);
            }
            cur = n.vals[Self::child_index(n, key)];
        }
    }

    fn split_child(&mut self, parent: u64, i: usize) -> MetaResult<()> {
        let child = self.node(parent)?.vals[i];
        let right = self.alloc_meta()?;
        let c = self.node_mut(child)?;
        let w = c.words();
        let mid = c.len() / 2;
        let rk = c.keys.split_off(mid);
        let rv = c.vals.split_off(mid * w);
        let first = rk[0];
        let rnode = Node {
            kind: c.kind,
            level: c.level,
            keys: rk,
            vals: rv,
        };
        self.nodes.insert(right, rnode);
        self.new_nodes.insert(right);
        let p = self.node_mut(parent)?;
        p.keys.insert(i + 1, first);
        p.vals.insert(i + 1, right);
        Ok(())
    }

    /// Inserts or replaces `key`; returns the new root and the replaced value.
    fn insert(&mut self, root: u64, key: u64, val: Val) -> MetaResult<(u64, Option<Val>)> {
        if !self.commit_mode {
            self.ensure_meta(&[root])?;
        }
        let mut root = self.shadow(root)?;
        let (full, level, kind, first) = {
            let n = self.node(root)?;
            (n.len() >= n.cap(), n.level, n.kind, n.keys.first().copied())
        };
        if full {
            let nr = self.new_node(Node {
                kind,
                level: level + 1,
                keys: vec![first.unwrap_or(0)],
                vals: vec![root],
            })?;
            self.split_child(nr.0, 0)?;
            root = nr.0;
        }
        let mut cur = root;
        loop {
            let n = self.node_mut(cur)?;
            let w = n.words();
            if n.is_leaf() {
                return Ok(match n.keys.binary_search(&key) {
                    Ok(i) => {
                        let mut old = [0u64; 2];
                        old[..w].copy_from_slice(&n.vals[i * w..(i + 1) * w]);
                        n.vals[i * w..(i + 1) * w].copy_from_slice(&val[..w]);
                        (root, Some(old))
                    }
                    Err(i) => {
                        n.keys.insert(i, key);
                        for (j, v) in val[..w].iter().enumerate() {
                            n.vals.insert(i * w + j, *v);
                        }
                        (root, None)
                    }
                });
            }
            if n.is_empty() {
                return Err(MetaError::Internal(format!(
                    "internal node {cur} of a {:?} tree is empty",
                    n.kind
                )));
            }
            if key < n.keys[0] {
                n.keys[0] = key;
            }
            let mut i = Self::child_index(n, key);
            let child = n.vals[i];
            let c2 = self.shadow(child)?;
            self.node_mut(cur)?.vals[i] = c2;
            let cfull = {
                let c = self.node(c2)?;
                c.len() >= c.cap()
            };
            if cfull {
                self.split_child(cur, i)?;
                if key >= self.node(cur)?.keys[i + 1] {
                    i += 1;
                }
            }
            cur = self.node(cur)?.vals[i];
        }
    }

    /// Removes `key`; returns the new root and the removed value.
    fn remove(&mut self, root: u64, key: u64) -> MetaResult<(u64, Option<Val>)> {
        if self.lookup_path(root, key)?.is_none() {
            return Ok((root, None));
        }
        if !self.commit_mode {
            self.ensure_meta(&[root])?;
        }
        let mut root = self.shadow(root)?;
        let old = self.remove_rec(root, key)?;
        loop {
            let n = self.node(root)?;
            if n.is_leaf() {
                break;
            }
            if n.len() == 1 {
                let child = n.vals[0];
                self.free_shallow(root);
                root = child;
            } else if n.is_empty() {
                let kind = n.kind;
                self.free_shallow(root);
                root = self.new_node(Node::empty_leaf(kind))?.0;
            } else {
                break;
            }
        }
        Ok((root, old))
    }

    fn remove_rec(&mut self, cur: u64, key: u64) -> MetaResult<Option<Val>> {
        let n = self.node_mut(cur)?;
        let w = n.words();
        if n.is_leaf() {
            return Ok(match n.keys.binary_search(&key) {
                Ok(i) => {
                    n.keys.remove(i);
                    let mut old = [0u64; 2];
                    for (o, v) in old.iter_mut().zip(n.vals.drain(i * w..(i + 1) * w)) {
                        *o = v;
                    }
                    Some(old)
                }
                Err(_) => None,
            });
        }
        if n.is_empty() || key < n.keys[0] {
            return Ok(None);
        }
        let i = Self::child_index(n, key);
        let child = n.vals[i];
        let c2 = self.shadow(child)?;
        self.node_mut(cur)?.vals[i] = c2;
        let old = self.remove_rec(c2, key)?;
        let (clen, ccap) = {
            let c = self.node(c2)?;
            (c.len(), c.cap())
        };
        if clen == 0 {
            let p = self.node_mut(cur)?;
            p.keys.remove(i);
            p.vals.remove(i);
            self.free_shallow(c2);
        } else if clen < ccap / 4 {
            self.maybe_merge(cur, i)?;
        }
        Ok(old)
    }

    /// Merges child `i` of `parent` with a neighbour when both fit comfortably in one node.
    fn maybe_merge(&mut self, parent: u64, i: usize) -> MetaResult<()> {
        let p = self.node(parent)?;
        if p.len() < 2 {
            return Ok(());
        }
        let (l, r) = if i + 1 < p.len() {
            (i, i + 1)
        } else {
            (i - 1, i)
        };
        let (lb, rb) = (p.vals[l], p.vals[r]);
        let (ll, rl, cap) = {
            let a = self.node(lb)?;
            (a.len(), self.node(rb)?.len(), a.cap())
        };
        if ll + rl > cap * 3 / 4 {
            return Ok(());
        }
        let lb2 = self.shadow(lb)?;
        self.node_mut(parent)?.vals[l] = lb2;
        let rb2 = self.shadow(rb)?;
        self.node_mut(parent)?.vals[r] = rb2;
        let rnode = self.node(rb2)?.clone();
        let ln = self.node_mut(lb2)?;
        ln.keys.extend_from_slice(&rnode.keys);
        ln.vals.extend_from_slice(&rnode.vals);
        let p = self.node_mut(parent)?;
        p.keys.remove(r);
        p.vals.remove(r);
        self.free_shallow(rb2);
        Ok(())
    }

    /// Entries with keys in `[lo, hi)`, in order, at most `limit`.
    fn range(
        &self,
        root: u64,
        lo: u64,
        hi: u64,
        limit: usize,
        out: &mut Vec<(u64, Val)>,
    ) -> MetaResult<()> {
        if out.len() >= limit {
            return Ok(());
        }
        let n = self.node(root)?;
        if n.is_leaf() {
            let start = n.keys.partition_point(|&k| k < lo);
            for i in start..n.len() {
                if n.keys[i] >= hi || out.len() >= limit {
                    break;
                }
                let v = n.val(i);
                out.push((n.keys[i], [v[0], v.get(1).copied().unwrap_or(0)]));
            }
            return Ok(());
        }
        for i in 0..n.len() {
            let start = n.keys[i];
            let end = n.keys.get(i + 1).copied().unwrap_or(u64::MAX);
            if end <= lo || start >= hi {
                continue;
            }
            self.range(n.vals[i], lo, hi, limit, out)?;
            if out.len() >= limit {
                break;
            }
        }
        Ok(())
    }

    // ---------------------------------------------------------------- devices

    /// Details of device `id`, if it exists.
    pub fn device(&self, id: ThinId) -> MetaResult<Option<DeviceInfo>> {
        Ok(self
            .lookup_path(self.sb.device_root.0, id.0 as u64)?
            .map(|(v, _)| DeviceInfo {
                root: MetaBlock(v[0]),
                mapped: v[1],
            }))
    }

    fn device_or_err(&self, id: ThinId) -> MetaResult<DeviceInfo> {
        self.device(id)?
            .ok_or_else(|| MetaError::Invalid(format!("{id} does not exist")))
    }

    /// Makes the device-tree path to `id` private before its mapping tree changes: if a
    /// held metadata snapshot shares that path, shadowing it gives the mapping root its
    /// second reference, so the mapping tree is then copied rather than changed under the
    /// snapshot.
    fn device_for_write(&mut self, id: ThinId, info: DeviceInfo) -> MetaResult<DeviceInfo> {
        let exclusive = self
            .lookup_path(self.sb.device_root.0, id.0 as u64)?
            .map(|(_, e)| e)
            .unwrap_or(true);
        if !exclusive {
            self.set_device(id, info)?;
        }
        Ok(info)
    }

    fn set_device(&mut self, id: ThinId, info: DeviceInfo) -> MetaResult<()> {
        let (r, _) = self.insert(
            self.sb.device_root.0,
            id.0 as u64,
            [info.root.0, info.mapped],
        )?;
        self.sb.device_root = MetaBlock(r);
        self.dirty = true;
        Ok(())
    }

    /// All device ids with their details.
    pub fn devices(&self) -> MetaResult<Vec<(ThinId, DeviceInfo)>> {
        let mut out = Vec::new();
        self.range(self.sb.device_root.0, 0, u64::MAX, usize::MAX, &mut out)?;
        Ok(out
            .into_iter()
            .map(|(k, v)| {
                (
                    ThinId(k as u32),
                    DeviceInfo {
                        root: MetaBlock(v[0]),
                        mapped: v[1],
                    },
                )
            })
            .collect())
    }

    /// `create_thin`: a new empty device.
    pub fn create_thin(&mut self, id: ThinId) -> MetaResult<()> {
        if self.device(id)?.is_some() {
            return Err(MetaError::Invalid(format!("{id} already exists")));
        }
        self.ensure_meta(&[self.sb.device_root.0, 0])?;
        let root = self.new_node(Node::empty_leaf(TreeKind::Mapping))?;
        self.set_device(id, DeviceInfo { root, mapped: 0 })
    }

    /// `create_snap`: device `id` shares `origin`'s mapping root. O(1).
    pub fn create_snap(&mut self, id: ThinId, origin: ThinId) -> MetaResult<()> {
        if self.device(id)?.is_some() {
            return Err(MetaError::Invalid(format!("{id} already exists")));
        }
        let o = self.device_or_err(origin)?;
        self.ensure_meta(&[self.sb.device_root.0])?;
        self.mcount[o.root.0 as usize] += 1;
        if let Err(e) = self.set_device(id, o) {
            self.mcount[o.root.0 as usize] -= 1;
            return Err(e);
        }
        Ok(())
    }

    /// `delete`: drops the device; frees every block nothing else references.
    pub fn delete(&mut self, id: ThinId) -> MetaResult<()> {
        self.deleted = true;
        let (r, old) = self.remove(self.sb.device_root.0, id.0 as u64)?;
        self.sb.device_root = MetaBlock(r);
        match old {
            Some(v) => self.dec_meta(v[0]),
            None => Err(MetaError::Invalid(format!("{id} does not exist"))),
        }
    }

    /// Where virtual block `v` of device `id` lives, and whether a write may go in place:
    /// only if no other device references the block now *and* none can in the last durable
    /// metadata (no count of it dropped and no device was deleted since; a power cut would
    /// bring that sharing back).
    pub fn map_lookup(&self, id: ThinId, v: VBlock) -> MetaResult<Option<Lookup>> {
        let (val, dev_path_excl) = self
            .lookup_path(self.sb.device_root.0, id.0 as u64)?
            .ok_or_else(|| MetaError::Invalid(format!("{id} does not exist")))?;
        let dev = DeviceInfo {
            root: MetaBlock(val[0]),
            mapped: val[1],
        };
        // A held metadata snapshot shares the device tree: then every mapping is shared.
        let quiet = !self.deleted && !self.frozen_deleted && dev_path_excl;
        Ok(self.lookup_path(dev.root.0, v.0)?.map(|(val, path_excl)| {
            let d = val[0];
            Lookup {
                block: DataBlock(d),
                exclusive: path_excl
                    && quiet
                    && self.data_count(DataBlock(d)) == 1
                    && !self.decremented.contains(&d)
                    && !self.frozen_decremented.contains(&d),
            }
        }))
    }

    /// Maps `v` of device `id` to `d` (a block from [`Metadata::reserve_data`], or any block
    /// to share it), dropping the reference of the block it replaces.
    pub fn map_insert(&mut self, id: ThinId, v: VBlock, d: DataBlock) -> MetaResult<()> {
        let dev = self.device_or_err(id)?;
        self.check_data(d.0, "map")?;
        let dr = self.sb.device_root.0;
        self.ensure_meta(&[dev.root.0, dr, dr])?;
        let mut dev = self.device_for_write(id, dev)?;
        let (root, old) = self.insert(dev.root.0, v.0, [d.0, 0])?;
        self.inc_data(d.0)?;
        dev.root = MetaBlock(root);
        match old {
            Some(o) => self.dec_data(o[0])?,
            None => dev.mapped += 1,
        }
        self.set_device(id, dev)
    }

    /// Unmaps `v` of device `id`; returns the block it was mapped to.
    pub fn map_remove(&mut self, id: ThinId, v: VBlock) -> MetaResult<Option<DataBlock>> {
        let dev = self.device_or_err(id)?;
        if self.lookup_path(dev.root.0, v.0)?.is_none() {
            return Ok(None);
        }
        let dr = self.sb.device_root.0;
        self.ensure_meta(&[dev.root.0, dr, dr])?;
        let mut dev = self.device_for_write(id, dev)?;
        let (root, old) = self.remove(dev.root.0, v.0)?;
        dev.root = MetaBlock(root);
        if let Some(o) = old {
            dev.mapped -= 1;
            self.dec_data(o[0])?;
            self.set_device(id, dev)?;
        }
        Ok(old.map(|o| DataBlock(o[0])))
    }

    /// Mappings of device `id` with virtual blocks in `[lo, hi)`, at most `limit`.
    pub fn map_range(
        &self,
        id: ThinId,
        lo: VBlock,
        hi: VBlock,
        limit: usize,
    ) -> MetaResult<Vec<(VBlock, DataBlock)>> {
        let dev = self.device_or_err(id)?;
        let mut out = Vec::new();
        self.range(dev.root.0, lo.0, hi.0, limit, &mut out)?;
        Ok(out
            .into_iter()
            .map(|(k, v)| (VBlock(k), DataBlock(v[0])))
            .collect())
    }

    /// Highest mapped virtual block of device `id`.
    pub fn highest_mapped(&self, id: ThinId) -> MetaResult<Option<VBlock>> {
        let dev = self.device_or_err(id)?;
        let mut cur = dev.root.0;
        loop {
            let n = self.node(cur)?;
            if n.is_leaf() {
                return Ok(n.keys.last().map(|&k| VBlock(k)));
            }
            match n.vals.last() {
                Some(&c) => cur = c,
                None => return Ok(None),
            }
        }
    }

    /// Grows the data space map (the data device grew).
    pub fn grow_data(&mut self, nr_data_blocks: u64) {
        let nr_data_blocks = nr_data_blocks.min(crate::disk::superblock::MAX_DATA_BLOCKS);
        if nr_data_blocks > self.sb.nr_data_blocks {
            let extra = nr_data_blocks - self.sb.nr_data_blocks;
            self.dcount.resize(nr_data_blocks as usize, 0);
            self.data_free += extra;
            self.sb.nr_data_blocks = nr_data_blocks;
            self.dirty = true;
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

    /// `reserve_metadata_snap`: keeps the current device tree (and through it every
    /// mapping tree and the data they map) alive and readable by tools until released. O(1):
    /// the root gains a reference and later changes shadow around it.
    pub fn reserve_metadata_snap(&mut self) -> MetaResult<MetaBlock> {
        if self.sb.held_root.0 != 0 {
            return Err(MetaError::Invalid(format!(
                "a metadata snapshot is already held at block {}",
                self.sb.held_root.0
            )));
        }
        self.ensure_meta(&[self.sb.device_root.0])?;
        let r = self.sb.device_root;
        self.mcount[r.0 as usize] += 1;
        self.sb.held_root = r;
        self.dirty = true;
        Ok(r)
    }

    /// `release_metadata_snap`: drops the held snapshot; what only it referenced is freed.
    pub fn release_metadata_snap(&mut self) -> MetaResult<()> {
        let r = self.sb.held_root;
        if r.0 == 0 {
            return Err(MetaError::Invalid("no metadata snapshot is held".into()));
        }
        // Like a delete, this unshares whole subtrees without data counts dropping.
        self.deleted = true;
        self.sb.held_root = MetaBlock(0);
        self.dirty = true;
        self.dec_meta(r.0)
    }

    /// The held metadata snapshot's devices, if one is held.
    pub fn held_devices(&self) -> MetaResult<Option<Vec<(ThinId, DeviceInfo)>>> {
        let r = self.sb.held_root.0;
        if r == 0 {
            return Ok(None);
        }
        let mut out = Vec::new();
        self.range(r, 0, u64::MAX, usize::MAX, &mut out)?;
        Ok(Some(
            out.into_iter()
                .map(|(k, v)| {
                    (
                        ThinId(k as u32),
                        DeviceInfo {
                            root: MetaBlock(v[0]),
                            mapped: v[1],
                        },
                    )
                })
                .collect(),
        ))
    }

    /// Mappings in `[lo, hi)` of the tree rooted at `root` (a root from [`DeviceInfo`]).
    pub fn tree_range(
        &self,
        root: MetaBlock,
        lo: VBlock,
        hi: VBlock,
    ) -> MetaResult<Vec<(VBlock, DataBlock)>> {
        let mut out = Vec::new();
        self.range(root.0, lo.0, hi.0, usize::MAX, &mut out)?;
        Ok(out
            .into_iter()
            .map(|(k, v)| (VBlock(k), DataBlock(v[0])))
            .collect())
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

    // ---------------------------------------------------------------- commit

    /// Prepares a commit: folds the space map into its trees, encodes every block written in
    /// this transaction and the new superblock, and starts the next transaction. The caller
    /// writes `blocks`, flushes, writes `superblock` with FUA, then calls
    /// [`Metadata::finish_commit`] (or [`Metadata::abort_commit`] on failure).
    pub fn prepare_commit(&mut self) -> MetaResult<Prepared> {
        // The metadata reserve exists for exactly this.
        self.commit_mode = true;
        let r = self.prepare_commit_inner();
        self.commit_mode = false;
        r
    }

    fn prepare_commit_inner(&mut self) -> MetaResult<Prepared> {
        let mut blocks = Vec::new();
        for d in std::mem::take(&mut self.dirty_overflow) {
            let c = self.data_count(DataBlock(d));
            let root = self.sb.overflow_root.0;
            let (r, _) = if c >= OVERFLOW as u32 {
                self.insert(root, d, [c as u64, 0])?
            } else {
                self.remove(root, d)?
            };
            self.sb.overflow_root = MetaBlock(r);
        }
        for i in std::mem::take(&mut self.dirty_bitmaps) {
            let lo = i as usize * PER_BITMAP;
            let hi = (lo + PER_BITMAP).min(self.dcount.len());
            let root = self.sb.sm_index_root.0;
            if lo >= hi || self.dcount[lo..hi].iter().all(|&c| c == 0) {
                let (r, old) = self.remove(root, i)?;
                self.sb.sm_index_root = MetaBlock(r);
                if let Some(o) = old {
                    self.dec_meta(o[0])?;
                }
            } else {
                let nb = self.alloc_meta()?;
                blocks.push((
                    MetaBlock(nb),
                    bitmap::pack(i, &self.dcount[lo..hi], MetaBlock(nb)),
                ));
                let (r, old) = self.insert(root, i, [nb, 0])?;
                self.sb.sm_index_root = MetaBlock(r);
                if let Some(o) = old {
                    self.dec_meta(o[0])?;
                }
            }
        }
        for &b in &self.new_nodes {
            if let Some(n) = self.nodes.get(&b) {
                blocks.push((MetaBlock(b), n.pack(MetaBlock(b))));
            }
        }
        blocks.append(&mut self.unwritten);
        self.frozen_decremented = std::mem::take(&mut self.decremented);
        self.frozen_deleted = std::mem::take(&mut self.deleted);
        self.sb.generation += 1;
        let superblock = self.sb.pack();
        self.new_nodes.clear();
        self.dirty = false;
        Ok(Prepared {
            blocks,
            superblock,
            freed_meta: std::mem::take(&mut self.meta_pending_list),
            freed_data: std::mem::take(&mut self.data_pending_list),
        })
    }

    /// The commit is durable: metadata blocks it freed become allocatable. Returns the
    /// data blocks it freed; hand them to [`Metadata::release_data`] once they are
    /// discarded on the data device (so a new write can never race the discard).
    pub fn finish_commit(&mut self, p: Prepared) -> Vec<DataBlock> {
        self.frozen_decremented.clear();
        self.frozen_deleted = false;
        for b in p.freed_meta {
            if self.meta_pending.remove(&b) && self.mcount[b as usize] == 0 {
                self.meta_free += 1;
            }
        }
        p.freed_data
            .into_iter()
            .filter(|&d| self.data_pending.contains(&d))
            .map(DataBlock)
            .collect()
    }

    /// Makes data blocks freed by a durable commit allocatable.
    pub fn release_data(&mut self, blocks: &[DataBlock]) {
        for d in blocks {
            if self.data_pending.remove(&d.0) && self.data_count(*d) == 0 {
                self.data_free += 1;
            }
        }
    }

    /// The commit failed: its blocks are written again with the next one, and what it freed
    /// stays pending until a commit succeeds.
    pub fn abort_commit(&mut self, p: Prepared) {
        let frozen = std::mem::take(&mut self.frozen_decremented);
        self.decremented.extend(frozen);
        self.deleted |= std::mem::take(&mut self.frozen_deleted);
        self.unwritten = p.blocks;
        self.meta_pending_list.extend(p.freed_meta);
        self.data_pending_list.extend(p.freed_data);
        self.sb.generation -= 1;
    }
}

// -------------------------------------------------------------------- loading

async fn read_block(dev: &dyn BlockDevice, b: u64) -> MetaResult<Vec<u8>> {
    let mut buf = vec![0u8; META_BLOCK_SIZE];
    dev.read(Bytes(b * META_BLOCK_SIZE as u64), &mut buf)
        .await
        .map_err(|e| e.context(format!("reading metadata block {b}")))?;
    Ok(buf)
}

/// Reads and validates the superblock of `dev`; `Ok(None)` if block 0 is all zeroes (a
/// never-formatted metadata device).
pub async fn read_superblock(dev: &dyn BlockDevice) -> MetaResult<Option<Superblock>> {
    let buf = read_block(dev, 0).await?;
    if buf.iter().all(|&x| x == 0) {
        return Ok(None);
    }
    Superblock::unpack(&buf).map(Some)
}

/// Writes one metadata block image.
pub async fn write_block(
    dev: &dyn BlockDevice,
    b: MetaBlock,
    buf: &[u8],
    fua: bool,
) -> MetaResult<()> {
    let flags = if fua {
        WriteFlags::FUA
    } else {
        WriteFlags::default()
    };
    dev.write(Bytes(b.0 * META_BLOCK_SIZE as u64), buf, flags)
        .await
        .map_err(|e| MetaError::Io(e.context(format!("writing metadata {b}"))))
}

/// Loads the whole metadata of `dev`: walks every tree from the superblock, validating
/// every block (checksum, magic, position, level, key order and bounds), derives metadata
/// reference counts, reads the data space map and recounts every data reference.
pub async fn load(dev: &dyn BlockDevice) -> MetaResult<(Metadata, LoadReport)> {
    let sb = read_superblock(dev).await?.ok_or_else(|| {
        MetaError::corrupt(
            MetaBlock(0),
            Structure::Superblock,
            "all zeroes (never formatted)",
        )
    })?;
    let dev_blocks = dev.size().0 / META_BLOCK_SIZE as u64;
    if sb.nr_meta_blocks > dev_blocks {
        return Err(MetaError::corrupt(
            MetaBlock(0),
            Structure::Superblock,
            format!(
                "{} metadata blocks but the device holds {dev_blocks}",
                sb.nr_meta_blocks
            ),
        ));
    }
    let mut m = Metadata::empty(sb.clone());
    let nr_meta = sb.nr_meta_blocks;
    let nr_data = sb.nr_data_blocks;
    let mut kinds: HashMap<u64, TreeKind> = HashMap::new();
    let mut recount: Vec<u32> = vec![0; nr_data as usize];
    let mut bitmaps: Vec<(u64, u64, MetaBlock)> = Vec::new(); // (index, block, referenced from)
                                                              // Work item: (block, tree, expected level, lower bound, upper bound, referenced from).
    let mut stack: Vec<(u64, TreeKind, Option<u8>, u64, u64, u64)> = vec![
        (sb.device_root.0, TreeKind::Devices, None, 0, u64::MAX, 0),
        (sb.sm_index_root.0, TreeKind::SmIndex, None, 0, u64::MAX, 0),
        (sb.overflow_root.0, TreeKind::Overflow, None, 0, u64::MAX, 0),
    ];
    if sb.held_root.0 != 0 {
        stack.push((sb.held_root.0, TreeKind::Devices, None, 0, u64::MAX, 0));
    }
    while let Some((b, kind, level, lo, hi, from)) = stack.pop() {
        let st = kind.structure();
        if b == 0 || b >= nr_meta {
            return Err(MetaError::corrupt(
                MetaBlock(from),
                m.nodes
                    .get(&from)
                    .map(|n| n.kind.structure())
                    .unwrap_or(Structure::Superblock),
                format!("refers to block {b}, outside 1..{nr_meta}"),
            ));
        }
        let node = if m.mcount[b as usize] > 0 {
            if kinds.get(&b) != Some(&kind) {
                return Err(MetaError::corrupt(
                    MetaBlock(b),
                    st,
                    format!(
                        "block is referenced as two different structures (also from block {from})"
                    ),
                ));
            }
            m.mcount[b as usize] += 1;
            m.node(b)?.clone()
        } else {
            let buf = read_block(dev, b).await?;
            let node = Node::unpack(&buf, MetaBlock(b), kind)?;
            m.mcount[b as usize] = 1;
            kinds.insert(b, kind);
            m.nodes.insert(b, node.clone());
            if node.is_leaf() {
                match kind {
                    TreeKind::Mapping => {
                        for &d in &node.vals {
                            if d >= nr_data {
                                return Err(MetaError::corrupt(
                                    MetaBlock(b),
                                    st,
                                    format!("maps to data block {d}, beyond the pool's {nr_data}"),
                                ));
                            }
                            recount[d as usize] += 1;
                        }
                    }
                    TreeKind::Devices => {
                        for i in 0..node.len() {
                            let v = node.val(i);
                            if node.keys[i] > u32::MAX as u64 {
                                return Err(MetaError::corrupt(
                                    MetaBlock(b),
                                    st,
                                    format!("device id {} out of range", node.keys[i]),
                                ));
                            }
                            stack.push((v[0], TreeKind::Mapping, None, 0, u64::MAX, b));
                        }
                    }
                    TreeKind::SmIndex => {
                        for i in 0..node.len() {
                            bitmaps.push((node.keys[i], node.vals[i], MetaBlock(b)));
                        }
                    }
                    TreeKind::Overflow => {}
                }
            } else {
                for i in 0..node.len() {
                    let clo = node.keys[i];
                    let chi = node.keys.get(i + 1).copied().unwrap_or(hi);
                    stack.push((node.vals[i], kind, Some(node.level - 1), clo, chi, b));
                }
                if node.is_empty() {
                    return Err(MetaError::corrupt(
                        MetaBlock(b),
                        st,
                        "internal node has no entries",
                    ));
                }
            }
            node
        };
        if let Some(l) = level {
            if node.level != l {
                return Err(MetaError::corrupt(
                    MetaBlock(b),
                    st,
                    format!("level {} where block {from} expects {l}", node.level),
                ));
            }
        }
        if let (Some(&f), Some(&l)) = (node.keys.first(), node.keys.last()) {
            if f < lo || l >= hi {
                return Err(MetaError::corrupt(
                    MetaBlock(b),
                    st,
                    format!("keys {f}..={l} outside the range [{lo}, {hi}) its parent block {from} gives"),
                ));
            }
        }
    }
    let nr_bitmaps = nr_data.div_ceil(PER_BITMAP as u64);
    for (index, b, from) in bitmaps {
        if b == 0 || b >= nr_meta {
            return Err(MetaError::corrupt(
                from,
                Structure::SpaceMapIndex,
                format!("bitmap at block {b}, outside 1..{nr_meta}"),
            ));
        }
        if index >= nr_bitmaps {
            return Err(MetaError::corrupt(
                from,
                Structure::SpaceMapIndex,
                format!("bitmap number {index} but the pool needs only {nr_bitmaps}"),
            ));
        }
        if m.mcount[b as usize] > 0 {
            return Err(MetaError::corrupt(
                MetaBlock(b),
                Structure::Bitmap,
                "bitmap block is referenced twice or is also a tree node",
            ));
        }
        m.mcount[b as usize] = 1;
        let buf = read_block(dev, b).await?;
        let counts = bitmap::unpack(&buf, MetaBlock(b), index)?;
        let lo = index as usize * PER_BITMAP;
        let hi = (lo + PER_BITMAP).min(nr_data as usize);
        m.dcount[lo..hi].copy_from_slice(&counts[..hi - lo]);
        if counts[hi - lo..].iter().any(|&c| c != 0) {
            return Err(MetaError::corrupt(
                MetaBlock(b),
                Structure::Bitmap,
                "counts for blocks beyond the pool",
            ));
        }
    }
    let mut ov = Vec::new();
    m.range(sb.overflow_root.0, 0, u64::MAX, usize::MAX, &mut ov)?;
    for (d, v) in ov {
        if d >= nr_data
            || m.dcount[d as usize] != OVERFLOW
            || v[0] < OVERFLOW as u64
            || v[0] > u32::MAX as u64
        {
            return Err(MetaError::Invalid(format!(
                "refcount overflow tree: entry for data block {d} (count {}) does not match the bitmap",
                v[0]
            )));
        }
        m.overflow.insert(d, v[0] as u32);
    }
    let mut report = LoadReport::default();
    for d in 0..nr_data {
        let stored = m.data_count(DataBlock(d));
        let found = recount[d as usize];
        if stored == OVERFLOW as u32 && !m.overflow.contains_key(&d) {
            return Err(MetaError::Invalid(format!(
                "data block {d}: bitmap says overflow but the overflow tree has no entry"
            )));
        }
        if found > stored {
            return Err(MetaError::Invalid(format!(
                "data block {d} is referenced by {found} mapping leaves but its stored count is {stored} (the block could be handed out twice)"
            )));
        }
        if found < stored {
            report.leaked.push((DataBlock(d), stored, found));
        }
    }
    // Mapped counts per device, memoized over shared subtrees.
    let mut memo: HashMap<u64, u64> = HashMap::new();
    for (id, info) in m.devices()? {
        let n = count_entries(&m, info.root.0, &mut memo)?;
        if n != info.mapped {
            report.bad_mapped_counts.push((id, info.mapped, n));
        }
    }
    m.recount_free();
    m.dirty = false;
    Ok((m, report))
}

fn count_entries(m: &Metadata, b: u64, memo: &mut HashMap<u64, u64>) -> MetaResult<u64> {
    if let Some(&n) = memo.get(&b) {
        return Ok(n);
    }
    let node = m.node(b)?;
    let n = if node.is_leaf() {
        node.len() as u64
    } else {
        let mut s = 0;
        for &c in &node.vals.clone() {
            s += count_entries(m, c, memo)?;
        }
        s
    };
    memo.insert(b, n);
    Ok(n)
}

/// Commits `m` to `dev` offline (tools: restore, repair): writes every changed block,
/// flushes, writes the superblock with FUA, flushes.
pub async fn commit_offline(dev: &dyn BlockDevice, m: &mut Metadata) -> MetaResult<()> {
    let p = m.prepare_commit()?;
    for (b, buf) in &p.blocks {
        write_block(dev, *b, buf, false).await?;
    }
    dev.flush().await?;
    write_block(dev, MetaBlock(0), &p.superblock, true).await?;
    dev.flush().await?;
    let freed = m.finish_commit(p);
    m.release_data(&freed);
    Ok(())
}
