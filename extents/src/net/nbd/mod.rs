//! The NBD client extent: fixed-newstyle handshake with `NBD_OPT_GO` and structured replies,
//! requests on the caller's ring, one reply-reading thread per connection, reconnection with
//! resend, per-request timeouts, multi-conn.
//!
//! - `handshake`: connecting and negotiating (blocking, with a deadline);
//! - `wire`: request and reply encodings;
//! - `link`: one connection slot and its table of requests;
//! - `reader`: a link's thread (reconnects, reads and checks replies);
//! - `tls`: rustls sessions for `nbds://`;
//! - `extent`: [`NbdExtent`], the [`tables::BlockDevice`].

mod extent;
mod handshake;
pub(crate) mod link;
mod reader;
pub(crate) mod tls;
mod wire;

pub use extent::NbdExtent;
