//! Errors of the replication engine.

use thiserror::Error;

/// What went wrong; each names the volume, snapshot, offset or file concerned.
#[derive(Debug, Error)]
pub enum ReplError {
    /// The connection failed (cut, reset, timed out).
    #[error("network: {0}")]
    Net(#[source] std::io::Error),
    /// The peer sent something malformed or out of order.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The peer is not the one this side was configured for (wrong volume, no common
    /// snapshot it accepts), or it reported an error.
    #[error("peer: {0}")]
    Peer(String),
    /// Local pool or volume I/O failed.
    #[error("local I/O: {0}")]
    Io(String),
    /// The state file or the TLS credentials.
    #[error("{0}")]
    Config(String),
}

/// Result of this crate.
pub type ReplResult<T> = Result<T, ReplError>;

impl From<tables::IoError> for ReplError {
    fn from(e: tables::IoError) -> Self {
        ReplError::Io(e.to_string())
    }
}
