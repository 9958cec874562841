//! Asynchronous replication of a thin volume to a pool on another host, snapshot by
//! snapshot (as RBD snapshot mirroring and `zfs send -i` do).
//!
//! - [`proto`]: the wire format (length-prefixed, versioned, checksummed frames).
//! - [`tls`]: the link (TLS with client certificates, or plain TCP with `--insecure`).
//! - [`primary`]: every interval a snapshot, the changed blocks since the last acknowledged
//!   one (`thin::meta::delta`), shipped; the old snapshot released on ACK.
//! - [`secondary`]: writes an interval into its copy volume and takes the matching snapshot
//!   only when all of it arrived and checks out, so it always holds a complete point in time.
//! - [`state`]: the crash-safe state file and the status both sides report.
//!
//! See the "Replication" section of ARCHITECTURE.md.

#![warn(missing_docs)]

pub mod error;
pub mod primary;
pub mod proto;
pub mod secondary;
pub mod state;
pub mod tls;

use std::future::Future;
use std::sync::{Mutex, MutexGuard};

pub use error::{ReplError, ReplResult};
pub use primary::{Primary, PrimaryConfig};
pub use secondary::{Secondary, SecondaryConfig};
pub use state::{Phase, State, Status};

/// Locks `m`, taking the data of a poisoned lock (a status stays readable after a panic).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs a pool operation to completion on this thread's runtime.
pub(crate) fn run_io<T>(f: impl Future<Output = tables::IoResult<T>>) -> ReplResult<T> {
    iort::block_on(f)
        .map_err(|e| ReplError::Io(format!("runtime: {e}")))?
        .map_err(ReplError::from)
}
