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
