//! Network extents: remote exports that a table uses exactly like a file.
//!
//! - `uri`: the names ([`NetUri`]) and their options ([`NetOptions`]);
//! - `nbd`: [`NbdExtent`], an NBD export;
//! - `sock`: socket I/O on the io_uring runtime.

pub mod nbd;
mod sock;
pub mod uri;

pub use self::nbd::NbdExtent;
pub use uri::{IscsiUri, NbdAddr, NbdUri, NetOptions, NetUri, UriError};

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

/// Opens the network extent `dev` names.
pub fn open(dev: &str) -> Result<std::sync::Arc<NbdExtent>, NetError> {
    match NetUri::parse(dev)? {
        NetUri::Nbd(u) => Ok(std::sync::Arc::new(NbdExtent::open(u)?)),
        NetUri::Iscsi(u) => Err(NetError::Unsupported {
            uri: u.to_string(),
            msg: "iSCSI extents are not built yet".into(),
        }),
    }
}
