//! An NBD (Network Block Device) server exporting any [`tables::DeviceRef`].
//!
//! The server speaks fixed-newstyle negotiation: `NBD_OPT_GO`, `NBD_OPT_INFO` (export,
//! name, description and block-size info), `NBD_OPT_LIST`, `NBD_OPT_ABORT`, the old
//! `NBD_OPT_EXPORT_NAME` and `NBD_OPT_STRUCTURED_REPLY` (reads are then answered with one
//! final `OFFSET_DATA` chunk, or an `ERROR` chunk; other commands keep simple replies, as the
//! spec allows; no metadata contexts, so no `BLOCK_STATUS`). Every other option is refused
//! with `NBD_REP_ERR_UNSUP`. In transmission it serves `READ`, `WRITE`, `FLUSH`, `TRIM`
//! (when the device discards), `WRITE_ZEROES` (with `NO_HOLE` and `FAST_ZERO`) and `DISC`,
//! honouring `NBD_CMD_FLAG_FUA` (emulated with a flush when the device's
//! [`tables::Limits::fua`] is false). It advertises `CAN_MULTI_CONN` exactly when the
//! device's [`tables::Limits::multi_conn_safe`] says so.
//!
//! # Threads and I/O
//!
//! A small pool of worker threads each runs its own [`iort::Runtime`]; a separate accept
//! thread accepts on every listener and hands each connection to the least loaded worker
//! that is alive and beating (a worker stuck in a blocking device call gets no new
//! connections). A connection lives on one worker: its reader task decodes requests and
//! starts a local task per request (so pipelined requests run concurrently on the
//! device); one writer task per connection sends all queued replies with one `sendmsg`
//! (header and read data together, many replies per call under load). Requests of 128 KiB
//! or more are spread over all workers (a big read's data is sent by the worker that read
//! it, under a per-connection send lock), so a single connection's large transfers use
//! every core. Buffers are page-aligned (`O_DIRECT`-ready) and pooled per worker. Accepted
//! TCP sockets get `TCP_NODELAY`.
//!
//! # Limits
//!
//! [`Limits`] (set with [`ServerBuilder::limits`]; serde-friendly, every field defaulted)
//! bounds what clients can take:
//!
//! - memory: payload buffers in flight across the server stay within
//!   [`Limits::memory_budget_bytes`]; a request that does not fit waits, and its connection
//!   stops reading (TCP pushes back). Connections on probation (no reply delivered yet, or
//!   a send stalled right now) may hold at most half of it, so clients that never read
//!   their replies cannot starve established ones. Per connection, at most
//!   [`Limits::max_requests_per_connection`] requests and
//!   [`Limits::max_bytes_per_connection`] of buffers are in flight.
//! - connections: beyond [`Limits::max_connections`] a client is closed before the
//!   handshake (logged, at most every 10 s with a count).
//! - time: the handshake must finish within [`Limits::handshake_timeout_ms`]; an idle
//!   connection is closed after [`Limits::idle_timeout_ms`] (off by default); a connection
//!   whose reply sending or write-payload receiving makes no progress is closed after
//!   [`Limits::stall_timeout_ms`], or after [`Limits::pressure_stall_timeout_ms`] while
//!   requests wait for memory.
//!
//! A target that panics fails only that request (`EIO`), like a device error.

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
//! flushes every export. It returns within the grace period plus a few seconds even when
//! clients are stuck; connections whose device requests never complete are left behind
//! and reported ([`NbdError::ShutdownTimedOut`]).

#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod conn;
mod handshake;
mod limits;
pub mod proto;
mod server;
mod sock;
mod supervisor;
mod tls;

pub use conn::{MAX_INFLIGHT, MAX_INFLIGHT_BYTES, MAX_PAYLOAD};
pub use limits::{Limits, DEFAULT_MEMORY_BUDGET};
pub use server::{Listener, NbdError, Server, ServerBuilder, ServerHandle, Stopper};
pub use sock::send_all_vectored;
pub use tls::{Tls, TlsMode};
