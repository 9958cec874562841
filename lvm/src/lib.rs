//! LVM2's on-disk format, so that a volume group is readable and writable by both this
//! project and the real lvm2 tools.
//!
//! - [`crc`]: LVM2's crc32 (its own initial value, no final inversion).
//! - [`uuid`]: LVM identifiers (32 characters, printed 6-4-4-4-4-4-6).
//! - [`units`]: [`Extents`](units::Extents), next to `tables`' sectors and bytes.
//! - [`label`]: the PV label in one of sectors 0-3 (`LABELONE`, `LVM2 001`, PV header and
//!   extension).
//! - [`mda`]: metadata area headers and the ring buffer of metadata text.
//! - [`text`]: LVM's config text format: lexer, parser, writer, tree.
//! - [`model`]: typed VG / PV / LV / segment structures to and from the tree.
//! - [`scan`]: find PVs on devices, read every metadata copy, group by VG, pick the newest
//!   valid copy and report every other finding.
//! - [`commit`]: write a new VG version to every PV (text, precommit, commit).
//! - [`pvcreate`]: format a device as a PV with LVM2's default layout.
//! - [`vgcreate`]: the first version of a VG (PV entries, defaults, LVM's name rules).
//! - [`alloc`]: the extent allocator (free space, lvcreate/lvextend placement under LVM's
//!   policies, size arguments).
//! - [`vgextend`], [`vgreduce`], [`vgrename`], [`pvresize`]: PVs joining and leaving a VG, a
//!   new VG name, a PV's new size, each as the VG's next version.
//! - [`orphan`]: a PV leaving its VG becomes an orphan (empty metadata areas, label unused).
//! - [`repair`]: `vgck --updatemetadata` (every copy rewritten, damaged headers replaced
//!   where safe, outdated PVs wiped).
//! - [`restore`]: `vgcfgrestore` from a backup file, also when every copy is damaged.
//! - [`activate`]: an LV's segments as a device-mapper table for the daemon.
//! - [`segtypes`]: volmgr's own raid and thin segment types, and why lvm2 keeps off them.
//! - [`hosts`]: the storage host a PV lives on (its `host:` tag or its URI), for placement.
//! - [`io`]: the one module that reads and writes devices.
//!
//! The API is synchronous: device I/O is driven with `iort::block_on` inside [`io`], so it
//! must not be called from inside an `iort` task.

#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod activate;
pub mod alloc;
pub mod commit;
pub mod crc;
pub mod hosts;
pub mod io;
pub mod label;
mod le;
pub mod mda;
pub mod model;
pub mod orphan;
pub mod paths;
pub mod pvcreate;
pub mod pvresize;
pub mod repair;
pub mod restore;
pub mod scan;
pub mod segtypes;
pub mod text;
pub mod units;
pub mod uuid;
pub mod vgcreate;
pub mod vgextend;
pub mod vgreduce;
pub mod vgrename;

pub use label::Label;
pub use model::{LogicalVolume, Metadata, PhysicalVolume, Segment, SegmentKind, VolumeGroup};
pub use units::Extents;
pub use uuid::Uuid;

/// Any failure of this crate's operations that touch devices.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// A device failed.
    #[error(transparent)]
    Io(#[from] io::DevIoError),
    /// A label is damaged or cannot be written.
    #[error(transparent)]
    Label(#[from] label::LabelError),
    /// A metadata area is damaged or full.
    #[error(transparent)]
    Mda(#[from] mda::MdaError),
    /// Metadata text does not parse or is not a valid VG.
    #[error(transparent)]
    Metadata(#[from] model::MetadataError),
    /// A commit was refused before anything was written.
    #[error(transparent)]
    Commit(#[from] commit::CommitError),
    /// A device cannot be laid out as a PV.
    #[error(transparent)]
    Layout(#[from] pvcreate::LayoutError),
    /// PVs cannot join the VG.
    #[error(transparent)]
    Extend(#[from] vgextend::ExtendError),
    /// PVs cannot leave the VG.
    #[error(transparent)]
    Reduce(#[from] vgreduce::ReduceError),
    /// The VG cannot take the new name.
    #[error(transparent)]
    Rename(#[from] vgrename::RenameError),
    /// The PV cannot take the new size.
    #[error(transparent)]
    Resize(#[from] pvresize::ResizeError),
    /// The backup cannot be restored.
    #[error(transparent)]
    Restore(#[from] restore::RestoreError),
    /// A network extent (NBD export, iSCSI LUN) could not be opened.
    #[error(transparent)]
    OpenRemote(std::sync::Arc<extents::net::NetError>),
    /// A device could not be opened.
    #[error("opening {}: {source}", path.display())]
    Open {
        /// The path.
        path: std::path::PathBuf,
        /// Why (shared: the extent error is not `Clone`).
        source: std::sync::Arc<extents::ExtentError>,
    },
    /// Two paths of one device entry (`PATH1|PATH2`) show different devices.
    #[error(
        "{group}: the paths are not one device: {first} shows {first_shows}, {other} shows \
         {other_shows} (checked by comparing the PV uuids read through each path)"
    )]
    PathsDiffer {
        /// The whole entry.
        group: String,
        /// The first path that could be read.
        first: String,
        /// What it shows (`PV <uuid>`, `no PV label`, ...).
        first_shows: String,
        /// The path that differs.
        other: String,
        /// What it shows.
        other_shows: String,
    },
    /// No path of a device entry (`PATH1|PATH2`) could be opened and read.
    #[error("{group}: no path works: {}", paths::describe(errors))]
    NoPath {
        /// The whole entry.
        group: String,
        /// Each path with why it failed.
        errors: std::sync::Arc<Vec<(String, Error)>>,
    },
}

impl From<label::FindLabelError> for Error {
    fn from(e: label::FindLabelError) -> Error {
        match e {
            label::FindLabelError::Io(e) => Error::Io(e),
            label::FindLabelError::Label(e) => Error::Label(e),
        }
    }
}

impl From<mda::MdaIoError> for Error {
    fn from(e: mda::MdaIoError) -> Error {
        match e {
            mda::MdaIoError::Io(e) => Error::Io(e),
            mda::MdaIoError::Mda(e) => Error::Mda(e),
        }
    }
}

impl From<model::ModelError> for Error {
    fn from(e: model::ModelError) -> Error {
        Error::Metadata(e.into())
    }
}
