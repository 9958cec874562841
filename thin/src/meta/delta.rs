//! The changed-block walk (`thin_delta`): the virtual blocks whose mapping differs between
//! two thin devices of one pool, found by walking both mapping trees together and skipping
//! every subtree whose node block is the same in both.
//!
//! A snapshot shares its origin's tree; a later write shadows only the path to the changed
//! leaf, so two snapshots of one volume share every node off the changed paths. A node block
//! present in both trees has the same entries in both, and since each side is walked in key
//! order, meeting the same block at the front of both walks means both sides hold exactly
//! the same entries for that key range: the subtree is skipped without being read. The cost
//! is therefore the nodes on changed paths (plus their siblings' headers), not the volume.
//!
//! Each side is a stack of pending items (a subtree or one leaf entry), its top being the
//! lowest key not yet consumed. The loop compares the two tops:
//! - same subtree block: pop both (shared);
//! - two leaf entries: merge by key;
//! - an entry below the other side's subtree lower bound: that key exists on one side only;
//! - otherwise expand the subtree with the lower lower bound (the taller one on a tie), so
//!   both sides descend to the same level and shared children meet at the tops together.
//!
//! Lower bounds are a node's own `keys[0]` (for internal nodes a lower bound of the
//! subtree's keys, see `disk/node.rs`), so a shared node has the same bound in both trees
//! even where the parents' keys differ.

use crate::error::{MetaError, MetaResult};
use crate::types::{DataBlock, MetaBlock, ThinId, VBlock};

use super::Metadata;

/// How a range of virtual blocks differs in the newer device.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeltaKind {
    /// Mapped in the newer device to another data block than in the base (or unmapped in
    /// the base): its data must be shipped.
    Changed,
    /// Mapped in the base, unmapped in the newer device (discarded).
    Unmapped,
}

/// A run of consecutive virtual blocks with one kind of difference.
#[derive(Copy, Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeltaRange {
    /// First virtual block.
    pub start: u64,
    /// Number of blocks (at least 1).
    pub len: u64,
    /// What differs.
    pub kind: DeltaKind,
}

/// Result of [`Metadata::delta`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    /// Differences in increasing block order; adjacent ranges of one kind are merged.
    pub ranges: Vec<DeltaRange>,
    /// Tree nodes read (expanded) by the walk.
    pub nodes_visited: u64,
    /// Subtrees skipped because both trees share their node block.
    pub shared_skipped: u64,
}

impl Delta {
    /// Blocks in `Changed` ranges.
    pub fn changed_blocks(&self) -> u64 {
        self.count(DeltaKind::Changed)
    }

    /// Blocks in `Unmapped` ranges.
    pub fn unmapped_blocks(&self) -> u64 {
        self.count(DeltaKind::Unmapped)
    }

    fn count(&self, kind: DeltaKind) -> u64 {
        self.ranges
            .iter()
            .filter(|r| r.kind == kind)
            .fold(0u64, |a, r| a.saturating_add(r.len))
    }

    fn push(&mut self, v: u64, kind: DeltaKind) {
        if let Some(last) = self.ranges.last_mut() {
            if last.kind == kind && last.start.checked_add(last.len) == Some(v) {
                last.len += 1;
                return;
            }
        }
        self.ranges.push(DeltaRange {
            start: v,
            len: 1,
            kind,
        });
    }
}

/// A pending item of one side's walk.
#[derive(Copy, Clone)]
enum Item {
    Node(MetaBlock),
    Entry(u64, DataBlock),
}

/// One side's walk: a stack whose top is the next item in key order.
struct Side {
    stack: Vec<Item>,
}

impl Metadata {
    /// The blocks whose mapping differs between device `base` and device `new` (typically
    /// an older and a newer snapshot of one volume): `Changed` where `new` maps a block to
    /// another data block than `base` or `base` does not map it, `Unmapped` where only
    /// `base` maps it. Cost grows with the difference: shared subtrees are skipped.
    pub fn delta(&self, base: ThinId, new: ThinId) -> MetaResult<Delta> {
        let root = |id: ThinId| {
            self.device(id)?
                .map(|i| i.root)
                .ok_or_else(|| MetaError::Invalid(format!("delta: {id} does not exist")))
        };
        self.tree_delta(root(base)?, root(new)?)
    }

    /// [`Metadata::delta`] of two mapping trees given by their roots.
    pub fn tree_delta(&self, base: MetaBlock, new: MetaBlock) -> MetaResult<Delta> {
        let mut d = Delta::default();
        let mut a = Side {
            stack: vec![Item::Node(base)],
        };
        let mut b = Side {
            stack: vec![Item::Node(new)],
        };
        loop {
            match (a.stack.last().copied(), b.stack.last().copied()) {
                (None, None) => return Ok(d),
                (Some(Item::Node(x)), Some(Item::Node(y))) if x == y => {
                    a.stack.pop();
                    b.stack.pop();
                    d.shared_skipped += 1;
                }
                (Some(Item::Entry(ka, da)), Some(Item::Entry(kb, db))) => {
                    if ka < kb {
                        d.push(ka, DeltaKind::Unmapped);
                        a.stack.pop();
                    } else if kb < ka {
                        d.push(kb, DeltaKind::Changed);
                        b.stack.pop();
                    } else {
                        if da != db {
                            d.push(kb, DeltaKind::Changed);
                        }
                        a.stack.pop();
                        b.stack.pop();
                    }
                }
                (Some(Item::Entry(ka, _)), top_b) => {
                    if self.entry_below(ka, top_b)? {
                        d.push(ka, DeltaKind::Unmapped);
                        a.stack.pop();
                    } else {
                        self.expand(&mut b, &mut d)?;
                    }
                }
                (top_a, Some(Item::Entry(kb, _))) => {
                    if self.entry_below(kb, top_a)? {
                        d.push(kb, DeltaKind::Changed);
                        b.stack.pop();
                    } else {
                        self.expand(&mut a, &mut d)?;
                    }
                }
                (Some(Item::Node(_)), None) => self.expand(&mut a, &mut d)?,
                (None, Some(Item::Node(_))) => self.expand(&mut b, &mut d)?,
                (Some(Item::Node(x)), Some(Item::Node(y))) => {
                    let (nx, ny) = (self.node(x)?, self.node(y)?);
                    let (lx, ly) = (nx.keys.first().copied(), ny.keys.first().copied());
                    // An empty node (an empty tree's root leaf) sorts first: expanding it
                    // costs nothing and removes it.
                    let expand_a = match (lx, ly) {
                        (None, _) => true,
                        (_, None) => false,
                        (Some(lx), Some(ly)) => lx < ly || (lx == ly && nx.level >= ny.level),
                    };
                    if expand_a {
                        self.expand(&mut a, &mut d)?;
                    } else {
                        self.expand(&mut b, &mut d)?;
                    }
                }
            }
        }
    }

    /// Whether leaf key `k` of one side sorts before everything the other side's top holds
    /// (so the other side has no entry `k`).
    fn entry_below(&self, k: u64, other: Option<Item>) -> MetaResult<bool> {
        Ok(match other {
            None => true,
            Some(Item::Entry(o, _)) => k < o,
            Some(Item::Node(n)) => match self.node(n)?.keys.first() {
                Some(&lb) => k < lb,
                // An empty subtree: expanding it is the cheapest way forward.
                None => false,
            },
        })
    }

    /// Replaces the node on top of `side` by its children (or its leaf entries).
    fn expand(&self, side: &mut Side, d: &mut Delta) -> MetaResult<()> {
        let Some(Item::Node(b)) = side.stack.pop() else {
            return Err(MetaError::Internal(
                "delta: expanding a leaf entry".to_string(),
            ));
        };
        d.nodes_visited += 1;
        let n = self.node(b)?;
        if n.is_leaf() {
            for i in (0..n.len()).rev() {
                let v = n.val(i).first().copied().ok_or_else(|| {
                    MetaError::Internal(format!("delta: mapping leaf {b} entry {i} has no value"))
                })?;
                side.stack.push(Item::Entry(n.keys[i], DataBlock(v)));
            }
        } else {
            for i in (0..n.len()).rev() {
                side.stack.push(Item::Node(n.child(i)));
            }
        }
        Ok(())
    }

    /// Every mapped block of device `new` as `Changed` (the delta from an empty device: a
    /// first full copy).
    pub fn delta_from_empty(&self, new: ThinId) -> MetaResult<Delta> {
        let root = self
            .device(new)?
            .map(|i| i.root)
            .ok_or_else(|| MetaError::Invalid(format!("delta: {new} does not exist")))?;
        let mut d = Delta::default();
        self.walk_leaves(root, &mut |k, _| d.push(k, DeltaKind::Changed))?;
        d.nodes_visited = self.tree_nodes(root)?;
        Ok(d)
    }

    /// Number of nodes of the tree at `root` (for measuring what a walk skipped).
    pub fn tree_nodes(&self, root: MetaBlock) -> MetaResult<u64> {
        let n = self.node(root)?;
        if n.is_leaf() {
            return Ok(1);
        }
        let mut total = 1u64;
        for c in n.meta_refs() {
            total = total.saturating_add(self.tree_nodes(c)?);
        }
        Ok(total)
    }

    /// Every mapping of device `id` in key order (brute force; for tests and checks).
    pub fn all_mappings(&self, id: ThinId) -> MetaResult<Vec<(VBlock, DataBlock)>> {
        self.map_range(id, VBlock(0), VBlock(u64::MAX), usize::MAX)
    }
}
