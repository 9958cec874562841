//! Transmission-phase messages: request headers out, reply headers in.

use nbd::proto::*;

/// A request header (28 bytes).
pub(crate) fn request_header(cmd: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut h = [0u8; REQUEST_LEN];
    h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&cmd.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..24].copy_from_slice(&offset.to_be_bytes());
    h[24..28].copy_from_slice(&len.to_be_bytes());
    h
}

/// Structured reply chunk: data hole (offset, hole length), zeroes to the client.
pub(crate) const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Structured reply chunk: block status (never asked for here).
pub(crate) const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Structured reply chunk: an error with the offset it applies to.
pub(crate) const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// Maps an NBD error value to a Linux errno (the protocol's values are Linux's for those it
/// defines; anything else is an I/O error).
pub(crate) fn errno_of(nbd_err: u32) -> i32 {
    match nbd_err {
        EPERM => libc::EPERM,
        EIO => libc::EIO,
        ENOMEM => libc::ENOMEM,
        EINVAL => libc::EINVAL,
        ENOSPC => libc::ENOSPC,
        EOVERFLOW => libc::EOVERFLOW,
        ENOTSUP => libc::EOPNOTSUPP,
        ESHUTDOWN => libc::ESHUTDOWN,
        _ => libc::EIO,
    }
}
