//! The iSCSI extent, through libiscsi (Debian's `libiscsi-dev`): READ/WRITE(16) with FUA,
//! SYNCHRONIZE CACHE(16), UNMAP and WRITE SAME(16) where the LUN's VPD pages allow them,
//! READ CAPACITY(16) for size and block size, CHAP, and reconnection with resend.
//!
//! - `ffi`: the libiscsi functions we call, declared by hand;
//! - `scsi`: capacity and VPD pages parsed, sense data turned into errors;
//! - `secret`: the CHAP secret file (0600, owned by us) and a type that never prints it;
//! - `session`: one libiscsi context and its callbacks;
//! - `queue`: the request table shared by requesters and the connection thread;
//! - `conn`: the connection thread (io_uring polls, login, reconnect, issue);
//! - `extent`: [`IscsiExtent`], the [`tables::BlockDevice`].

mod conn;
mod extent;
mod ffi;
mod queue;
mod scsi;
mod secret;
mod session;

pub use extent::IscsiExtent;
