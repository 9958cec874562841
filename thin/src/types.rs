//! Typed block numbers: a metadata block, a pool data block, a thin device id and a virtual
//! block of a thin device are all integers on disk, and mixing them up is the classic bug.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! newtype {
    ($(#[$m:meta])* $name:ident($t:ty), $prefix:literal) => {
        $(#[$m])*
        #[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
        #[serde(transparent)]
        pub struct $name(pub $t);
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }
    };
}

newtype!(
    /// A 4 KiB block of the metadata device (block 0 is the superblock).
    MetaBlock(u64), "meta block "
);
newtype!(
    /// A block of the pool's data device, `data_block_size` long.
    DataBlock(u64), "data block "
);
newtype!(
    /// A thin device id, as in `create_thin <id>` (24 bits in dm-thin; we allow 32).
    ThinId(u32), "thin "
);
newtype!(
    /// A block of a thin device's virtual address space.
    VBlock(u64), "virtual block "
);

/// Size of every metadata block in bytes.
pub const META_BLOCK_SIZE: usize = 4096;

/// A block number that indexes a per-block table.
pub(crate) trait BlockNo: Copy {
    /// Position in the table.
    fn index(self) -> usize;
}

impl BlockNo for MetaBlock {
    fn index(self) -> usize {
        self.0 as usize
    }
}

impl BlockNo for DataBlock {
    fn index(self) -> usize {
        self.0 as usize
    }
}

/// One entry per block, indexed only by its own kind of block number: the metadata
/// reference counts cannot be indexed with a data block, nor the data counts with a
/// metadata block.
#[derive(Clone, Debug)]
pub(crate) struct PerBlock<B, T> {
    v: Vec<T>,
    _kind: std::marker::PhantomData<fn(B)>,
}

impl<B: BlockNo, T: Clone> PerBlock<B, T> {
    /// `n` entries of `x`.
    pub(crate) fn new(n: usize, x: T) -> Self {
        PerBlock {
            v: vec![x; n],
            _kind: std::marker::PhantomData,
        }
    }
    /// The entry of `b`, if the table has one.
    pub(crate) fn get(&self, b: B) -> Option<&T> {
        self.v.get(b.index())
    }
    /// Grows (or shrinks) to `n` entries, new ones `x`.
    pub(crate) fn resize(&mut self, n: usize, x: T) {
        self.v.resize(n, x);
    }
    /// Every entry, in block order.
    pub(crate) fn as_slice(&self) -> &[T] {
        &self.v
    }
    /// Every entry, in block order, writable (for loading whole bitmaps).
    pub(crate) fn as_mut_slice(&mut self) -> &mut [T] {
        &mut self.v
    }
}

impl<B: BlockNo, T> std::ops::Index<B> for PerBlock<B, T> {
    type Output = T;
    fn index(&self, b: B) -> &T {
        &self.v[b.index()]
    }
}

impl<B: BlockNo, T> std::ops::IndexMut<B> for PerBlock<B, T> {
    fn index_mut(&mut self, b: B) -> &mut T {
        &mut self.v[b.index()]
    }
}
