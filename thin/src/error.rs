//! Metadata errors: every one names the block and the structure it was found in.

use tables::IoError;

use crate::types::MetaBlock;

/// Which on-disk structure a block was read as.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Structure {
    /// The superblock (block 0).
    Superblock,
    /// A node of the device-details tree.
    DeviceTree,
    /// A node of a thin device's mapping tree.
    MappingTree,
    /// A node of the data space map's index tree.
    SpaceMapIndex,
    /// A node of the reference-count overflow tree.
    OverflowTree,
    /// A data space map bitmap block.
    Bitmap,
    /// A node of the dedup hash tree.
    HashTree,
}

impl std::fmt::Display for Structure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Structure::Superblock => "superblock",
            Structure::DeviceTree => "device tree node",
            Structure::MappingTree => "mapping tree node",
            Structure::SpaceMapIndex => "space map index node",
            Structure::OverflowTree => "refcount overflow node",
            Structure::Bitmap => "space map bitmap",
            Structure::HashTree => "hash tree node",
        })
    }
}

/// Errors of the pool metadata.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    /// The block's checksum does not match its contents.
    #[error("{block} ({structure}): checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum {
        /// Where.
        block: MetaBlock,
        /// What it was read as.
        structure: Structure,
        /// Checksum in the block.
        stored: u32,
        /// Checksum of the contents.
        computed: u32,
    },
    /// The block is not of the expected type.
    #[error("{block} ({structure}): bad magic {found:#010x}")]
    BadMagic {
        /// Where.
        block: MetaBlock,
        /// What it was read as.
        structure: Structure,
        /// Magic found.
        found: u32,
    },
    /// The block is well-formed but its contents are inconsistent.
    #[error("{block} ({structure}): {what}")]
    Corrupt {
        /// Where.
        block: MetaBlock,
        /// What it was read as.
        structure: Structure,
        /// What is wrong.
        what: String,
    },
    /// A block reached through a reference is wrong (so the referencing block may be the
    /// damaged one: a pointer into another structure or out of its tree).
    #[error("{source}, referenced from {from}")]
    Referenced {
        /// The block holding the reference (block 0: the superblock).
        from: MetaBlock,
        /// What is wrong with the referenced block.
        source: Box<MetaError>,
    },
    /// The metadata device could not be read or written.
    #[error("metadata I/O: {0}")]
    Io(#[from] IoError),
    /// Not enough metadata or data space for the operation.
    #[error("{0}")]
    NoSpace(String),
    /// A request that does not make sense (unknown device id, id in use...).
    #[error("{0}")]
    Invalid(String),
    /// The in-memory metadata contradicts itself (a bug or undetected corruption); the
    /// pool stops changing its metadata.
    #[error("metadata inconsistency: {0}")]
    Internal(String),
}

impl MetaError {
    /// Shorthand for [`MetaError::Corrupt`].
    pub fn corrupt(block: MetaBlock, structure: Structure, what: impl Into<String>) -> MetaError {
        MetaError::Corrupt {
            block,
            structure,
            what: what.into(),
        }
    }

    /// Names `from` as the block whose reference led here (I/O errors stay as they are).
    pub fn referenced_from(self, from: MetaBlock) -> MetaError {
        match self {
            e @ (MetaError::Checksum { .. }
            | MetaError::BadMagic { .. }
            | MetaError::Corrupt { .. }) => MetaError::Referenced {
                from,
                source: Box::new(e),
            },
            e => e,
        }
    }
}

impl From<MetaError> for IoError {
    fn from(e: MetaError) -> IoError {
        match e {
            MetaError::Io(e) => e,
            MetaError::NoSpace(m) => IoError::nospc(m),
            MetaError::Invalid(m) => IoError::invalid(m),
            e => IoError::new(libc::EUCLEAN, e.to_string()),
        }
    }
}

/// Result of metadata operations.
pub type MetaResult<T> = Result<T, MetaError>;
