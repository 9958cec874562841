//! An NBD (Network Block Device) server exporting any [`tables::DeviceRef`].
//!
//! The server speaks fixed-newstyle negotiation with simple replies: `NBD_OPT_GO`,
//! `NBD_OPT_INFO` (export, name, description and block-size info), `NBD_OPT_LIST`,
//! `NBD_OPT_ABORT` and the old `NBD_OPT_EXPORT_NAME`; every other option is refused with
//! `NBD_REP_ERR_UNSUP` (structured replies included). In transmission it serves `READ`,
//! `WRITE`, `FLUSH`, `TRIM` (when the device discards), `WRITE_ZEROES` (with `NO_HOLE` and
//! `FAST_ZERO`) and `DISC`, honouring `NBD_CMD_FLAG_FUA`. It advertises `CAN_MULTI_CONN`
//! exactly when the device's [`tables::Limits::multi_conn_safe`] says so.
//!
//! # Threads and I/O
//!
//! A small pool of worker threads each runs its own [`iort::Runtime`]; worker 0 also runs the
//! accept loops and hands each connection to the least loaded worker. A connection lives on
//! one worker: its reader task decodes requests and starts a local task per request (so
//! pipelined requests run concurrently on the device); one writer task per connection
//! sends all queued replies with one `sendmsg` (header and read data together). Each
//! connection holds at most 64 requests / 64 MiB of buffers in flight; buffers are pooled
//! per connection and page-aligned. Accepted TCP sockets get `TCP_NODELAY`.
//!
//! # Errors on the wire
//!
//! Device errors become NBD errors (`EIO`, `ENOSPC`, `EPERM` for `EROFS`, `EINVAL`,
//! `EOVERFLOW`...) and the connection keeps serving. Requests past the end get `EINVAL`
//! (reads, trims) or `ENOSPC` (writes, write-zeroes); writes to a read-only export `EPERM`;
//! unknown commands or flags `EINVAL`; reads or writes over the 32 MiB maximum `EOVERFLOW`
//! (an oversized write's payload is skipped up to 64 MiB, beyond that the connection is
//! closed after the error reply). A bad request magic closes the connection after the
//! replies already due are sent. Unaligned requests are passed through: every device
//! handles any byte range.
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//! use tables::mem::MemDevice;
//! use tables::units::Bytes;
//!
//! let dev = Arc::new(MemDevice::new("ram0", Bytes(1 << 30)));
//! let server = nbd::Server::builder()
//!     .export("disk", "a RAM disk", dev)
//!     .threads(2)
//!     .build()?;
//! let handle = server.serve_tcp("127.0.0.1:10809")?;
//! println!("serving on {:?}", handle.local_addr());
//! // From a signal handler thread: handle.stopper().stop();
//! handle.shutdown()?; // or handle.wait()? to block until a Stopper fires
//! # Ok::<(), nbd::NbdError>(())
//! ```
//!
//! Shutdown stops accepting, shuts the read side of every connection so clients get
//! replies to everything they already sent, waits up to the grace period
//! ([`ServerBuilder::shutdown_grace`]) before cutting connections off, joins the workers and
//! flushes every export.

#![warn(missing_docs)]

mod conn;
mod handshake;
pub mod proto;
mod server;
mod sock;

pub use conn::{MAX_INFLIGHT, MAX_INFLIGHT_BYTES, MAX_PAYLOAD};
pub use server::{Listener, NbdError, Server, ServerBuilder, ServerHandle, Stopper};
