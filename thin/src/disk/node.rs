//! B-tree nodes. One layout serves every tree; the magic says which tree the node belongs
//! to (so a node reached from the wrong place is caught), `level` is 0 for leaves.
//!
//! Layout after the common header: `nr_entries (u32) | value_words (u8) | level (u8) |
//! reserved (10 bytes)`, then `cap` keys (u64) and `cap * value_words` value words (u64),
//! where `cap = (4096 - 32) / (8 * (1 + value_words))`. Internal nodes always have one value
//! word (the child's block number) and `keys[i]` is a lower bound of child `i`'s keys.

use super::{get_u32, get_u64, put_u32, put_u64, seal, verify};
use crate::error::{MetaError, MetaResult, Structure};
use crate::types::{DataBlock, MetaBlock, META_BLOCK_SIZE};

/// Bytes before the keys.
pub const NODE_HEADER: usize = 32;

/// Which tree a node belongs to; decides leaf value width and what leaf values reference.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum TreeKind {
    /// ThinId -> [mapping root, mapped block count].
    Devices,
    /// VBlock -> DataBlock.
    Mapping,
    /// Bitmap index -> bitmap MetaBlock.
    SmIndex,
    /// DataBlock -> reference count (only counts >= 255 live here).
    Overflow,
    /// DataBlock -> first 128 bits of the block's content hash (dedup pools). A record
    /// holds no reference to its block.
    Hash,
}

impl TreeKind {
    /// Magic of this tree's nodes.
    pub fn magic(self) -> u32 {
        match self {
            TreeKind::Devices => 0x5645_4454,  // "TDEV"
            TreeKind::Mapping => 0x5041_4D54,  // "TMAP"
            TreeKind::SmIndex => 0x584E_4954,  // "TINX"
            TreeKind::Overflow => 0x564F_5254, // "TROV"
            TreeKind::Hash => 0x4853_4854,     // "THSH"
        }
    }
    /// Value words of a leaf entry.
    pub fn leaf_words(self) -> usize {
        match self {
            TreeKind::Devices | TreeKind::Hash => 2,
            TreeKind::Mapping | TreeKind::SmIndex | TreeKind::Overflow => 1,
        }
    }
    /// Structure name for errors.
    pub fn structure(self) -> Structure {
        match self {
            TreeKind::Devices => Structure::DeviceTree,
            TreeKind::Mapping => Structure::MappingTree,
            TreeKind::SmIndex => Structure::SpaceMapIndex,
            TreeKind::Overflow => Structure::OverflowTree,
            TreeKind::Hash => Structure::HashTree,
        }
    }
}

/// Maximum entries of a node with `words` value words.
pub const fn capacity(words: usize) -> usize {
    (META_BLOCK_SIZE - NODE_HEADER) / (8 * (1 + words))
}

/// A decoded node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// Tree the node belongs to.
    pub kind: TreeKind,
    /// 0 for a leaf, else the height above the leaves.
    pub level: u8,
    /// Sorted keys.
    pub keys: Vec<u64>,
    /// `keys.len() * words()` value words.
    pub vals: Vec<u64>,
}

impl Node {
    /// An empty leaf.
    pub fn empty_leaf(kind: TreeKind) -> Node {
        Node {
            kind,
            level: 0,
            keys: Vec::new(),
            vals: Vec::new(),
        }
    }
    /// Whether this is a leaf.
    pub fn is_leaf(&self) -> bool {
        self.level == 0
    }
    /// Value words per entry.
    pub fn words(&self) -> usize {
        if self.is_leaf() {
            self.kind.leaf_words()
        } else {
            1
        }
    }
    /// Maximum entries.
    pub fn cap(&self) -> usize {
        capacity(self.words())
    }
    /// Number of entries.
    pub fn len(&self) -> usize {
        self.keys.len()
    }
    /// Whether the node has no entries.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
    /// Value words of entry `i`.
    pub fn val(&self, i: usize) -> &[u64] {
        let w = self.words();
        &self.vals[i * w..(i + 1) * w]
    }
    /// Child `i` of an internal node.
    pub fn child(&self, i: usize) -> MetaBlock {
        MetaBlock(self.vals[i])
    }
    /// Re-points child `i` of an internal node.
    pub fn set_child(&mut self, i: usize, b: MetaBlock) {
        self.vals[i] = b.0;
    }
    /// The metadata blocks this node references: its children, or from a leaf the mapping
    /// roots (device tree) or bitmap blocks (space map index).
    pub fn meta_refs(&self) -> Vec<MetaBlock> {
        if !self.is_leaf() {
            return self.vals.iter().map(|&b| MetaBlock(b)).collect();
        }
        match self.kind {
            TreeKind::Devices => (0..self.len()).map(|i| MetaBlock(self.val(i)[0])).collect(),
            TreeKind::SmIndex => self.vals.iter().map(|&b| MetaBlock(b)).collect(),
            TreeKind::Mapping | TreeKind::Overflow | TreeKind::Hash => Vec::new(),
        }
    }
    /// The data blocks this node references (the values of a mapping tree leaf).
    pub fn data_refs(&self) -> Vec<DataBlock> {
        match (self.is_leaf(), self.kind) {
            (true, TreeKind::Mapping) => self.vals.iter().map(|&d| DataBlock(d)).collect(),
            _ => Vec::new(),
        }
    }

    /// Packs into a 4 KiB block at `block`.
    pub fn pack(&self, block: MetaBlock) -> Vec<u8> {
        let mut b = vec![0u8; META_BLOCK_SIZE];
        let w = self.words();
        let cap = capacity(w);
        put_u32(&mut b, 16, self.keys.len() as u32);
        b[20] = w as u8;
        b[21] = self.level;
        for (i, k) in self.keys.iter().enumerate() {
            put_u64(&mut b, NODE_HEADER + 8 * i, *k);
        }
        let vbase = NODE_HEADER + 8 * cap;
        for (i, v) in self.vals.iter().enumerate() {
            put_u64(&mut b, vbase + 8 * i, *v);
        }
        seal(&mut b, self.kind.magic(), block);
        b
    }

    /// Unpacks and validates a node of tree `kind` read from `block`: checksum, magic,
    /// value width, entry count, key order.
    pub fn unpack(b: &[u8], block: MetaBlock, kind: TreeKind) -> MetaResult<Node> {
        let st = kind.structure();
        verify(b, block, st, &[kind.magic()])?;
        let n = get_u32(b, 16) as usize;
        let w = b[20] as usize;
        let level = b[21];
        let want_w = if level == 0 { kind.leaf_words() } else { 1 };
        if w != want_w {
            return Err(MetaError::corrupt(
                block,
                st,
                format!("value width {w} words, expected {want_w} at level {level}"),
            ));
        }
        if level > 16 {
            return Err(MetaError::corrupt(
                block,
                st,
                format!("level {level} is absurd"),
            ));
        }
        let cap = capacity(w);
        if n > cap {
            return Err(MetaError::corrupt(
                block,
                st,
                format!("{n} entries, capacity {cap}"),
            ));
        }
        let keys: Vec<u64> = (0..n).map(|i| get_u64(b, NODE_HEADER + 8 * i)).collect();
        if let Some(i) = keys.windows(2).position(|p| p[0] >= p[1]) {
            return Err(MetaError::corrupt(
                block,
                st,
                format!("keys out of order at entry {}", i + 1),
            ));
        }
        let vbase = NODE_HEADER + 8 * cap;
        let vals = (0..n * w).map(|i| get_u64(b, vbase + 8 * i)).collect();
        Ok(Node {
            kind,
            level,
            keys,
            vals,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_checks() {
        let mut n = Node::empty_leaf(TreeKind::Devices);
        n.keys = vec![1, 5, 9];
        n.vals = vec![10, 11, 50, 51, 90, 91];
        let b = n.pack(MetaBlock(7));
        assert_eq!(
            Node::unpack(&b, MetaBlock(7), TreeKind::Devices).unwrap(),
            n
        );
        assert!(Node::unpack(&b, MetaBlock(8), TreeKind::Devices).is_err());
        assert!(matches!(
            Node::unpack(&b, MetaBlock(7), TreeKind::Mapping),
            Err(MetaError::BadMagic { .. })
        ));
        assert_eq!(capacity(1), 254);
        assert_eq!(capacity(2), 169);
    }
}
