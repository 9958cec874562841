//! The ublk front end: serves any [`BlockDevice`] (a whole table) as `/dev/ublkbN`.
//!
//! Threads: one control thread runs libublk's `run_target` (it adds the queue threads, starts
//! the device and waits for them), and one thread per hardware queue serves that queue's tags.
//! Nothing else: no thread per I/O.
//!
//! On a queue thread every tag is a local task on libublk's smol `LocalExecutor`, which owns
//! one buffer for the tag and loops FETCH → serve → COMMIT_AND_FETCH. Serving calls the
//! table's `read`/`write`/... futures right there. The thread installs an [`iort::Backend`]
//! that submits onto libublk's per-queue io_uring, so the table's targets (`iort::read_at`,
//! `iort::fsync`, ...) put their SQEs on the same ring as the ublk commands and one
//! `io_uring_enter` covers both.
//!
//! Limits of that arrangement, for target authors: on a queue thread there is no
//! `iort::Runtime`, so `iort::spawn` returns `NoRuntime` and `iort::block_on` must not be
//! called (it would wait on another ring). As on iort's own ring, an operation dropped while
//! in flight (a target panic caught by `serve`, a queue torn down mid-request) is cancelled
//! and waited for before its buffers are released (`ring`).
//!
//! Files: `options` (what to serve with, checks, errors), `server` (a device's lifecycle and
//! its control thread), `queue` (a queue thread: tag tasks, event loop), `ring` (the table's
//! I/O on the queue ring, and dropped operations waited for),
//! `dispatch` (one request onto [`BlockDevice`] calls), `zero_copy` (fixed buffers, mapped
//! copies, the step memory), `failure` (a dead queue thread fails and stops its device),
//! `teardown` (how a queue thread lets go of its queue, also when it died), `fault`
//! (test-only queue-thread faults, feature `fault-injection`).

#![warn(missing_docs)]

#[cfg(doc)]
use tables::io::BlockDevice;

mod dispatch;
mod failure;
#[cfg(feature = "fault-injection")]
mod fault;
mod options;
mod queue;
mod ring;
mod server;
mod teardown;
mod zero_copy;

pub use options::{UblkOptions, UblkTargetError};
pub use server::UblkServer;
