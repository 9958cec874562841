//! Network extents: remote exports that a table uses exactly like a file.
//!
//! - `uri`: the names ([`NetUri`]) and their options ([`NetOptions`]);
//! - `nbd`: [`NbdExtent`], an NBD export;
//! - `iscsi`: [`IscsiExtent`], an iSCSI logical unit (through libiscsi);
//! - `ceph`: [`RbdExtent`], an RBD image, and [`RadosExtent`], a volume of RADOS objects
//!   (through librbd and librados);
//! - `private`: the check that a file holding a secret is private to us;
//! - `lend`: how a requester lends its read buffer to a receiving thread;
//! - `sock`: socket I/O on the io_uring runtime.
//!
//! [`open`] opens either kind as a [`NetExtent`].

use std::sync::{Arc, Weak};

use tables::registry::ExtentHealth;
use tables::DeviceRef;

pub mod ceph;
pub mod iscsi;
mod lend;
pub mod nbd;
mod private;
mod sock;
pub mod uri;

pub use self::ceph::{RadosExtent, RbdExtent};
pub use self::iscsi::IscsiExtent;
pub use self::nbd::NbdExtent;
pub use uri::{
    CephClient, IscsiUri, NbdAddr, NbdUri, NetOptions, NetUri, RadosUri, RbdUri, UriError,
};

/// Why a network extent could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The name does not parse.
    #[error(transparent)]
    Uri(#[from] UriError),
    /// The server could not be reached or refused the export.
    #[error("{uri}: {msg}")]
    Connect {
        /// The URI.
        uri: String,
        /// What went wrong.
        msg: String,
    },
    /// This kind of extent cannot be opened by this build.
    #[error("{uri}: {msg}")]
    Unsupported {
        /// The URI.
        uri: String,
        /// Why.
        msg: String,
    },
}

/// An open network extent of any kind.
#[derive(Clone, Debug)]
pub enum NetExtent {
    /// An NBD export.
    Nbd(Arc<NbdExtent>),
    /// An iSCSI logical unit.
    Iscsi(Arc<IscsiExtent>),
    /// An RBD image.
    Rbd(Arc<RbdExtent>),
    /// A volume of RADOS objects.
    Rados(Arc<RadosExtent>),
}

impl NetExtent {
    /// How the extent is doing (connections, requests in flight, errors).
    pub fn health(&self) -> ExtentHealth {
        match self {
            NetExtent::Nbd(e) => e.health(),
            NetExtent::Iscsi(e) => e.health(),
            NetExtent::Rbd(e) => e.health(),
            NetExtent::Rados(e) => e.health(),
        }
    }

    /// The extent as a device for tables.
    pub fn device(&self) -> DeviceRef {
        match self {
            NetExtent::Nbd(e) => e.clone(),
            NetExtent::Iscsi(e) => e.clone(),
            NetExtent::Rbd(e) => e.clone(),
            NetExtent::Rados(e) => e.clone(),
        }
    }

    /// A reference that does not keep the extent open (the resolver's cache holds these).
    pub fn downgrade(&self) -> WeakNetExtent {
        match self {
            NetExtent::Nbd(e) => WeakNetExtent::Nbd(Arc::downgrade(e)),
            NetExtent::Iscsi(e) => WeakNetExtent::Iscsi(Arc::downgrade(e)),
            NetExtent::Rbd(e) => WeakNetExtent::Rbd(Arc::downgrade(e)),
            NetExtent::Rados(e) => WeakNetExtent::Rados(Arc::downgrade(e)),
        }
    }
}

/// A [`NetExtent`] that does not keep it open.
#[derive(Clone, Debug)]
pub enum WeakNetExtent {
    /// An NBD export.
    Nbd(Weak<NbdExtent>),
    /// An iSCSI logical unit.
    Iscsi(Weak<IscsiExtent>),
    /// An RBD image.
    Rbd(Weak<RbdExtent>),
    /// A volume of RADOS objects.
    Rados(Weak<RadosExtent>),
}

impl WeakNetExtent {
    /// The extent, if it is still open.
    pub fn upgrade(&self) -> Option<NetExtent> {
        match self {
            WeakNetExtent::Nbd(w) => w.upgrade().map(NetExtent::Nbd),
            WeakNetExtent::Iscsi(w) => w.upgrade().map(NetExtent::Iscsi),
            WeakNetExtent::Rbd(w) => w.upgrade().map(NetExtent::Rbd),
            WeakNetExtent::Rados(w) => w.upgrade().map(NetExtent::Rados),
        }
    }

    /// Whether the extent is still open.
    pub fn alive(&self) -> bool {
        match self {
            WeakNetExtent::Nbd(w) => w.strong_count() > 0,
            WeakNetExtent::Iscsi(w) => w.strong_count() > 0,
            WeakNetExtent::Rbd(w) => w.strong_count() > 0,
            WeakNetExtent::Rados(w) => w.strong_count() > 0,
        }
    }
}

/// Opens the network extent `dev` names (connecting, and for iSCSI logging in, now).
pub fn open(dev: &str) -> Result<NetExtent, NetError> {
    Ok(match NetUri::parse(dev)? {
        NetUri::Nbd(u) => NetExtent::Nbd(Arc::new(NbdExtent::open(u)?)),
        NetUri::Iscsi(u) => NetExtent::Iscsi(Arc::new(IscsiExtent::open(u)?)),
        NetUri::Rbd(u) => NetExtent::Rbd(Arc::new(RbdExtent::open(u)?)),
        NetUri::Rados(u) => NetExtent::Rados(Arc::new(RadosExtent::open(u)?)),
    })
}
