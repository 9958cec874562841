//! Node storage, shadowing and the B-tree operations shared by every tree: lookup, top-down
//! insert with pre-emptive split, remove with empty-node removal, merge of underfull
//! siblings and root collapse, and range walks.

use crate::disk::node::Node;
use crate::error::{MetaError, MetaResult};
use crate::types::MetaBlock;

use super::{Metadata, Val};

impl Metadata {
    pub(super) fn node(&self, b: MetaBlock) -> MetaResult<&Node> {
        self.nodes
            .get(&b)
            .ok_or_else(|| MetaError::Internal(format!("{b} is not a resident tree node")))
    }

    fn node_mut(&mut self, b: MetaBlock) -> MetaResult<&mut Node> {
        self.nodes
            .get_mut(&b)
            .ok_or_else(|| MetaError::Internal(format!("{b} is not a resident tree node")))
    }

    /// Frees a node whose entries were moved elsewhere (its references go with them).
    fn free_shallow(&mut self, b: MetaBlock) {
        self.mcount[b] = 0;
        self.release_meta_block(b);
    }

    /// Makes node `b` writable in this transaction: returns `b` itself if it is new and
    /// unshared, else a fresh copy (the caller re-points the parent).
    fn shadow(&mut self, b: MetaBlock) -> MetaResult<MetaBlock> {
        let count = self.mcount[b];
        if count == 1 && self.new_nodes.contains(&b) {
            return Ok(b);
        }
        let node = self.node(b)?.clone();
        let nb = self.alloc_meta()?;
        if count > 1 {
            self.inc_children(&node)?;
            self.mcount[b] -= 1;
        } else {
            self.mcount[b] = 0;
            self.release_meta_block(b);
        }
        self.nodes.insert(nb, node);
        self.new_nodes.insert(nb);
        Ok(nb)
    }

    fn child_index(node: &Node, key: u64) -> usize {
        match node.keys.binary_search(&key) {
            Ok(i) => i,
            Err(0) => 0,
            Err(i) => i - 1,
        }
    }

    /// Looks `key` up in the tree at `root`; also says whether every node on the path has a
    /// single reference.
    pub(super) fn lookup_path(&self, root: MetaBlock, key: u64) -> MetaResult<Option<(Val, bool)>> {
        let mut cur = root;
        let mut exclusive = true;
        loop {
            exclusive &= self.mcount[cur] == 1;
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
            cur = n.child(Self::child_index(n, key));
        }
    }

    fn split_child(&mut self, parent: MetaBlock, i: usize) -> MetaResult<()> {
        let child = self.node(parent)?.child(i);
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
        p.vals.insert(i + 1, right.0);
        Ok(())
    }

    /// Inserts or replaces `key`; returns the new root and the replaced value.
    pub(super) fn insert(
        &mut self,
        root: MetaBlock,
        key: u64,
        val: Val,
    ) -> MetaResult<(MetaBlock, Option<Val>)> {
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
                vals: vec![root.0],
            })?;
            self.split_child(nr, 0)?;
            root = nr;
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
            let child = n.child(i);
            let c2 = self.shadow(child)?;
            self.node_mut(cur)?.set_child(i, c2);
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
            cur = self.node(cur)?.child(i);
        }
    }

    /// Removes `key`; returns the new root and the removed value.
    pub(super) fn remove(
        &mut self,
        root: MetaBlock,
        key: u64,
    ) -> MetaResult<(MetaBlock, Option<Val>)> {
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
                let child = n.child(0);
                self.free_shallow(root);
                root = child;
            } else if n.is_empty() {
                let kind = n.kind;
                self.free_shallow(root);
                root = self.new_node(Node::empty_leaf(kind))?;
            } else {
                break;
            }
        }
        Ok((root, old))
    }

    fn remove_rec(&mut self, cur: MetaBlock, key: u64) -> MetaResult<Option<Val>> {
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
        let child = n.child(i);
        let c2 = self.shadow(child)?;
        self.node_mut(cur)?.set_child(i, c2);
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
    fn maybe_merge(&mut self, parent: MetaBlock, i: usize) -> MetaResult<()> {
        let p = self.node(parent)?;
        if p.len() < 2 {
            return Ok(());
        }
        let (l, r) = if i + 1 < p.len() {
            (i, i + 1)
        } else {
            (i - 1, i)
        };
        let (lb, rb) = (p.child(l), p.child(r));
        let (ll, rl, cap) = {
            let a = self.node(lb)?;
            (a.len(), self.node(rb)?.len(), a.cap())
        };
        if ll + rl > cap * 3 / 4 {
            return Ok(());
        }
        let lb2 = self.shadow(lb)?;
        self.node_mut(parent)?.set_child(l, lb2);
        let rb2 = self.shadow(rb)?;
        self.node_mut(parent)?.set_child(r, rb2);
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
    pub(super) fn range(
        &self,
        root: MetaBlock,
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
            self.range(n.child(i), lo, hi, limit, out)?;
            if out.len() >= limit {
                break;
            }
        }
        Ok(())
    }

    /// Calls `f(key, value words)` for every leaf entry of the tree at `root`, in key order,
    /// without collecting them (trees may hold hundreds of millions of entries).
    pub(crate) fn walk_leaves(
        &self,
        root: MetaBlock,
        f: &mut dyn FnMut(u64, &[u64]),
    ) -> MetaResult<()> {
        let n = self.node(root)?;
        if n.is_leaf() {
            for i in 0..n.len() {
                f(n.keys[i], n.val(i));
            }
            return Ok(());
        }
        for c in n.meta_refs() {
            self.walk_leaves(c, f)?;
        }
        Ok(())
    }
}
