//! Wire constants and message layouts of the NBD protocol (fixed newstyle, simple replies).
//!
//! Everything on the wire is big-endian. Names follow the upstream specification
//! (`doc/proto.md` in the NetworkBlockDevice/nbd repository) so they can be looked up there.

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second server magic, and the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Structured reply flag: the last chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1;
/// Structured chunk: no payload (final chunk of a reply).
pub const REPLY_TYPE_NONE: u16 = 0;
/// Structured chunk: offset plus data.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Structured chunk: an error (error value, message length, message).
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zero padding after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Option: choose an export and enter transmission (old style, no error possible).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: end the handshake.
pub const OPT_ABORT: u32 = 2;
/// Option: list exports.
pub const OPT_LIST: u32 = 3;
/// Option: start TLS (`--tls on|require`).
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Option: structured replies (refused: simple replies only).
pub const OPT_STRUCTURED_REPLY: u32 = 8;

/// Option reply: success / end of a list.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of `NBD_OPT_LIST`.
pub const REP_SERVER: u32 = 2;
/// Option reply: one `NBD_INFO_*` item.
pub const REP_INFO: u32 = 3;
/// Error replies have bit 31 set.
pub const REP_ERR: u32 = 1 << 31;
/// Option unknown to this server.
pub const REP_ERR_UNSUP: u32 = REP_ERR + 1;
/// Option forbidden by policy.
pub const REP_ERR_POLICY: u32 = REP_ERR + 2;
/// Option syntactically invalid.
pub const REP_ERR_INVALID: u32 = REP_ERR + 3;
/// TLS must be negotiated first.
pub const REP_ERR_TLS_REQD: u32 = REP_ERR + 5;
/// No such export.
pub const REP_ERR_UNKNOWN: u32 = REP_ERR + 6;
/// The server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR + 7;
/// Option data too large.
pub const REP_ERR_TOO_BIG: u32 = REP_ERR + 9;

/// Info item: size and transmission flags (always sent).
pub const INFO_EXPORT: u16 = 0;
/// Info item: canonical export name.
pub const INFO_NAME: u16 = 1;
/// Info item: human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Info item: minimum / preferred / maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flag: the flags field is valid.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` supported.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_FLAG_FUA` supported.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: `NBD_CMD_TRIM` supported.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` supported.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: several connections see one consistent export.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: `NBD_CMD_FLAG_FAST_ZERO` supported.
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write (payload follows the header).
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect (no reply).
pub const CMD_DISC: u16 = 2;
/// Command: flush.
pub const CMD_FLUSH: u16 = 3;
/// Command: trim (discard).
pub const CMD_TRIM: u16 = 4;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;

/// Command flag: forced unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: write-zeroes must allocate (no hole).
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag: don't fragment (structured replies only).
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag: write-zeroes must be fast or fail with `ENOTSUP`.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// NBD error: operation not permitted (read-only export).
pub const EPERM: u32 = 1;
/// NBD error: I/O error.
pub const EIO: u32 = 5;
/// NBD error: out of memory.
pub const ENOMEM: u32 = 12;
/// NBD error: invalid argument.
pub const EINVAL: u32 = 22;
/// NBD error: no space / past the end (writes).
pub const ENOSPC: u32 = 28;
/// NBD error: value too large.
pub const EOVERFLOW: u32 = 75;
/// NBD error: not supported (fast zero).
pub const ENOTSUP: u32 = 95;
/// NBD error: server shutting down.
pub const ESHUTDOWN: u32 = 108;

/// Size of a request header on the wire.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header on the wire.
pub const REPLY_LEN: usize = 16;
/// Longest string (export name, description) the protocol allows.
pub const MAX_STRING: usize = 4096;

/// Maps a Linux errno from a device to one of the error values NBD allows.
pub fn nbd_errno(errno: i32) -> u32 {
    match errno {
        libc::EPERM | libc::EROFS | libc::EACCES => EPERM,
        libc::EIO => EIO,
        libc::ENOMEM => ENOMEM,
        libc::EINVAL => EINVAL,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ENOSPC,
        libc::EOVERFLOW => EOVERFLOW,
        // NBD_ENOTSUP is only meaningful for fast-zero; elsewhere "not supported" means the
        // request was not valid for this export.
        libc::EOPNOTSUPP => EINVAL,
        libc::ESHUTDOWN => ESHUTDOWN,
        _ => EIO,
    }
}

/// A decoded transmission request header.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Command type (`CMD_*`).
    pub kind: u16,
    /// Opaque cookie echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub len: u32,
}

impl Request {
    /// Decodes a header; `None` if the magic is wrong.
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Option<Request> {
        if be32(&b[0..4]) != REQUEST_MAGIC {
            return None;
        }
        Some(Request {
            flags: u16::from_be_bytes([b[4], b[5]]),
            kind: u16::from_be_bytes([b[6], b[7]]),
            cookie: be64(&b[8..16]),
            offset: be64(&b[16..24]),
            len: be32(&b[24..28]),
        })
    }

    /// Encodes a header (used by clients and tests).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// A reply header as it goes on the wire: a simple reply, or one structured chunk header
/// (plus the offset of an `OFFSET_DATA` chunk, or the body of an `ERROR` chunk).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ReplyHdr {
    buf: [u8; 32],
    len: usize,
}

impl ReplyHdr {
    /// The encoded bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// A simple reply (error 0 for success); read data, if any, follows it.
    pub fn simple(error: u32, cookie: u64) -> ReplyHdr {
        let mut buf = [0u8; 32];
        buf[..REPLY_LEN].copy_from_slice(&simple_reply(error, cookie));
        ReplyHdr {
            buf,
            len: REPLY_LEN,
        }
    }

    fn chunk(kind: u16, cookie: u64, payload_len: u32) -> ReplyHdr {
        let mut buf = [0u8; 32];
        buf[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        buf[4..6].copy_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
        buf[6..8].copy_from_slice(&kind.to_be_bytes());
        buf[8..16].copy_from_slice(&cookie.to_be_bytes());
        buf[16..20].copy_from_slice(&payload_len.to_be_bytes());
        ReplyHdr { buf, len: 20 }
    }

    /// The single, final data chunk of a structured read reply; `len` data bytes follow.
    /// A zero-length read gets a bare final `NONE` chunk instead (data chunks carry at
    /// least one byte).
    pub fn read_data(cookie: u64, offset: u64, len: u32) -> ReplyHdr {
        if len == 0 {
            return ReplyHdr::chunk(REPLY_TYPE_NONE, cookie, 0);
        }
        let mut h = ReplyHdr::chunk(REPLY_TYPE_OFFSET_DATA, cookie, len.saturating_add(8));
        h.buf[20..28].copy_from_slice(&offset.to_be_bytes());
        h.len = 28;
        h
    }

    /// The final error chunk of a structured reply (no message).
    pub fn structured_error(error: u32, cookie: u64) -> ReplyHdr {
        let mut h = ReplyHdr::chunk(REPLY_TYPE_ERROR, cookie, 6);
        h.buf[20..24].copy_from_slice(&error.to_be_bytes());
        // Message length 0 (bytes 24..26 stay zero).
        h.len = 26;
        h
    }
}

/// Encodes a simple reply header.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; REPLY_LEN] {
    let mut b = [0u8; REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// The big-endian `u16` at the start of `b` (which holds at least 2 bytes).
pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

/// The big-endian `u32` at the start of `b` (which holds at least 4 bytes).
pub fn be32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

/// The big-endian `u64` at the start of `b` (which holds at least 8 bytes).
pub fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_and_rejects_bad_magic() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            kind: CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            len: 4096,
        };
        let b = r.encode();
        assert_eq!(Request::parse(&b), Some(r));
        let mut bad = b;
        bad[0] ^= 1;
        assert_eq!(Request::parse(&bad), None);
    }

    #[test]
    fn errno_mapping_stays_inside_the_protocol_set() {
        assert_eq!(nbd_errno(libc::EROFS), EPERM);
        assert_eq!(nbd_errno(libc::EFBIG), ENOSPC);
        assert_eq!(nbd_errno(libc::ENODEV), EIO);
        assert_eq!(nbd_errno(libc::EOPNOTSUPP), EINVAL);
        let d = ReplyHdr::read_data(9, 4096, 512);
        assert_eq!(d.as_bytes().len(), 28);
        assert_eq!(be32(&d.as_bytes()[0..4]), STRUCTURED_REPLY_MAGIC);
        assert_eq!(be32(&d.as_bytes()[16..20]), 520);
        assert_eq!(be64(&d.as_bytes()[20..28]), 4096);
        let e = ReplyHdr::structured_error(EIO, 9);
        assert_eq!(e.as_bytes().len(), 26);
        assert_eq!(
            u16::from_be_bytes([e.as_bytes()[6], e.as_bytes()[7]]),
            REPLY_TYPE_ERROR
        );
        let reply = simple_reply(EIO, 7);
        assert_eq!(be32(&reply[0..4]), SIMPLE_REPLY_MAGIC);
        assert_eq!(be32(&reply[4..8]), EIO);
        assert_eq!(be64(&reply[8..16]), 7);
    }
}
