//! The wire format: length-prefixed, versioned frames with a checksum, every field checked.
//!
//! Frame: `magic "RPL1" (u32 LE) | version (u16) | type (u8) | 0 (u8) | payload length (u32) |
//! payload | crc32c of everything before it (u32)`. A frame whose magic, version, type,
//! reserved byte, length, checksum or payload fields do not check out is refused before any
//! of it is acted on, and the connection is dropped.

use std::io::{Read, Write};
use std::sync::Mutex;

use tables::buf::AlignedBuf;

use crate::error::{ReplError, ReplResult};

/// `"RPL1"`.
pub const MAGIC: u32 = 0x314C_5052;
/// Protocol version; a peer speaking another one is refused.
pub const VERSION: u16 = 3;
/// Largest DATA payload (bytes of volume data in one frame).
pub const MAX_DATA: usize = 1 << 20;
/// Most block hashes in one HASHES message (1 MiB of 512-byte blocks).
pub const MAX_HASHES: usize = MAX_DATA / 512;
/// Longest volume uuid / error text.
pub const MAX_TEXT: usize = 256;
const HEADER: usize = 12;
const MAX_PAYLOAD: usize = MAX_DATA + 8;

/// The bytes of a DATA message, page-aligned: the pool's file extents then read and write
/// them with O_DIRECT as they are, instead of through a zeroed bounce buffer and a copy
/// (which cost the replication half its speed). Full-size buffers are recycled: a fresh MiB
/// costs 256 page faults and the kernel's zeroing, which then dominated its CPU time.
pub struct Payload {
    buf: Option<AlignedBuf>,
    len: usize,
}

/// Freed full-size ([`MAX_DATA`]) payload buffers, for reuse.
static SPARE: Mutex<Vec<AlignedBuf>> = Mutex::new(Vec::new());
/// At most this many spare buffers are kept (64 MiB).
const MAX_SPARE: usize = 64;
/// Payloads at least this long take a full-size, recycled buffer.
const RECYCLED_FROM: usize = 64 << 10;

fn spare() -> std::sync::MutexGuard<'static, Vec<AlignedBuf>> {
    SPARE.lock().unwrap_or_else(|e| e.into_inner())
}

impl Payload {
    /// `len` bytes to be filled by the caller (initialized, but not necessarily zero: a
    /// recycled buffer holds an earlier message's bytes).
    pub fn for_filling(len: usize) -> ReplResult<Payload> {
        if len > MAX_DATA {
            return Err(ReplError::Protocol(format!(
                "a payload of {len} bytes, at most {MAX_DATA}"
            )));
        }
        let buf = if len >= RECYCLED_FROM {
            match spare().pop() {
                Some(b) => b,
                None => AlignedBuf::page_aligned(MAX_DATA)?,
            }
        } else {
            AlignedBuf::page_aligned(len)?
        };
        Ok(Payload {
            buf: Some(buf),
            len,
        })
    }

    /// A copy of `b`.
    pub fn copy_of(b: &[u8]) -> ReplResult<Payload> {
        let mut p = Payload::for_filling(b.len())?;
        p.copy_from_slice(b);
        Ok(p)
    }
}

impl Drop for Payload {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            if b.len() == MAX_DATA {
                let mut s = spare();
                if s.len() < MAX_SPARE {
                    s.push(b);
                }
            }
        }
    }
}

impl std::ops::Deref for Payload {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.buf.as_ref().map_or(&[][..], |b| &b[..self.len])
    }
}

impl std::ops::DerefMut for Payload {
    fn deref_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        self.buf.as_mut().map_or(&mut [][..], |b| &mut b[..len])
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Payload) -> bool {
        self[..] == other[..]
    }
}

impl Eq for Payload {}

/// The length only: a message printed in an error must not carry a MiB of bytes.
impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<{} bytes>", self.len())
    }
}

/// What one frame adds to an interval's chained checksum: its own crc32c (the four bytes
/// that end it), without keeping its bytes, so DATA goes from and to the wire without being
/// copied into a frame. The COMMIT checksum is crc32c chained over these four bytes of every
/// DATA/UNMAP/HASHES frame in order (protocol version 3): each frame's bytes are already
/// checked by its own crc32c, the chain checks that every frame arrived, once, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameSum(u32);

impl FrameSum {
    /// The sum of a whole frame (its last four bytes).
    pub fn of(frame: &[u8]) -> FrameSum {
        let n = frame.len();
        FrameSum(if n >= 4 { u32_at(frame, n - 4) } else { 0 })
    }

    /// `crc` (the checksum chained over the frames before) continued over this frame.
    pub fn chain(self, crc: u32) -> u32 {
        crc32c::crc32c_append(crc, &self.0.to_le_bytes())
    }
}

/// One protocol message.
#[derive(Debug, PartialEq, Eq)]
pub enum Msg {
    /// Primary -> secondary, first: which volume, and the last snapshot the primary knows
    /// the secondary completed (0: none).
    Hello {
        /// The replicated volume's uuid (configured on both sides).
        volume: String,
        /// Last common snapshot id as the primary knows it.
        last_common: u64,
    },
    /// Start of one interval's changes.
    Begin {
        /// Snapshot id this interval produces.
        snapshot: u64,
        /// Snapshot id the changes apply to (0: none, a full copy follows).
        base: u64,
        /// Volume size in bytes.
        volume_size: u64,
        /// When the primary took the snapshot (seconds since the epoch).
        taken_at: u64,
    },
    /// Bytes at a byte offset of the volume.
    Data {
        /// Byte offset.
        offset: u64,
        /// The bytes (at most [`MAX_DATA`]).
        bytes: Payload,
    },
    /// A byte range that reads as zeroes (unmapped) in the snapshot.
    Unmap {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// End of an interval: how many DATA/UNMAP messages and their checksum.
    Commit {
        /// Snapshot id of the interval.
        snapshot: u64,
        /// DATA and UNMAP messages sent in it.
        count: u64,
        /// crc32c chained over those messages' frame checksums ([`FrameSum`]).
        checksum: u32,
    },
    /// Secondary -> primary: the snapshot it holds complete (reply to HELLO and COMMIT).
    Ack {
        /// Snapshot id.
        snapshot: u64,
    },
    /// Either side: why it gives up on the connection.
    Error {
        /// Reason.
        text: String,
    },
    /// Primary -> secondary between intervals: the link is alive (each side gives up on a
    /// peer silent for longer than the link timeout, so a long interval needs these).
    Ping,
    /// Primary -> secondary between intervals: it stops replicating on purpose (stopped or
    /// demoted), so the secondary may be promoted without `--force`. A primary that dies
    /// just closes the connection.
    Bye,
    /// Secondary -> primary, right after its ACK to HELLO: the block size its pool takes as
    /// hash references ([`Msg::Hashes`]), 0 when it takes none (not a dedup pool, or one
    /// that compares bytes).
    Caps {
        /// Block size in bytes (0: no references).
        dedup_block: u64,
    },
    /// Primary -> secondary inside an interval: the BLAKE3 hashes (first 128 bits) of
    /// consecutive blocks of `dedup_block` bytes from `offset`. The secondary maps the ones
    /// its pool holds and answers [`Msg::Have`]; the others follow as DATA.
    Hashes {
        /// Byte offset of the first block.
        offset: u64,
        /// One hash per block.
        hashes: Vec<[u64; 2]>,
    },
    /// Secondary -> primary: which blocks of the last HASHES it mapped (true: no bytes
    /// needed).
    Have {
        /// Byte offset of the first block (as in the HASHES).
        offset: u64,
        /// One flag per block.
        held: Vec<bool>,
    },
}

impl Msg {
    fn kind(&self) -> u8 {
        match self {
            Msg::Hello { .. } => 1,
            Msg::Begin { .. } => 2,
            Msg::Data { .. } => DATA_KIND,
            Msg::Unmap { .. } => 4,
            Msg::Commit { .. } => 5,
            Msg::Ack { .. } => 6,
            Msg::Error { .. } => 7,
            Msg::Ping => 8,
            Msg::Bye => 9,
            Msg::Caps { .. } => 10,
            Msg::Hashes { .. } => 11,
            Msg::Have { .. } => 12,
        }
    }

    fn payload(&self) -> ReplResult<Vec<u8>> {
        let mut p = Vec::new();
        let text = |p: &mut Vec<u8>, s: &str| -> ReplResult<()> {
            if s.len() > MAX_TEXT {
                return Err(ReplError::Protocol(format!(
                    "text of {} bytes, at most {MAX_TEXT}",
                    s.len()
                )));
            }
            p.extend_from_slice(s.as_bytes());
            Ok(())
        };
        match self {
            Msg::Hello {
                volume,
                last_common,
            } => {
                p.extend_from_slice(&last_common.to_le_bytes());
                text(&mut p, volume)?;
            }
            Msg::Begin {
                snapshot,
                base,
                volume_size,
                taken_at,
            } => {
                for v in [snapshot, base, volume_size, taken_at] {
                    p.extend_from_slice(&v.to_le_bytes());
                }
            }
            Msg::Data { offset, bytes } => {
                if bytes.is_empty() || bytes.len() > MAX_DATA {
                    return Err(ReplError::Protocol(format!(
                        "DATA of {} bytes at {offset}",
                        bytes.len()
                    )));
                }
                p.extend_from_slice(&offset.to_le_bytes());
                p.extend_from_slice(bytes);
            }
            Msg::Unmap { offset, len } => {
                p.extend_from_slice(&offset.to_le_bytes());
                p.extend_from_slice(&len.to_le_bytes());
            }
            Msg::Commit {
                snapshot,
                count,
                checksum,
            } => {
                p.extend_from_slice(&snapshot.to_le_bytes());
                p.extend_from_slice(&count.to_le_bytes());
                p.extend_from_slice(&checksum.to_le_bytes());
            }
            Msg::Ack { snapshot } => p.extend_from_slice(&snapshot.to_le_bytes()),
            Msg::Error { text: t } => text(&mut p, t)?,
            Msg::Ping | Msg::Bye => {}
            Msg::Caps { dedup_block } => p.extend_from_slice(&dedup_block.to_le_bytes()),
            Msg::Hashes { offset, hashes } => {
                if hashes.is_empty() || hashes.len() > MAX_HASHES {
                    return Err(ReplError::Protocol(format!(
                        "HASHES of {} blocks at {offset}",
                        hashes.len()
                    )));
                }
                p.extend_from_slice(&offset.to_le_bytes());
                for h in hashes {
                    p.extend_from_slice(&h[0].to_le_bytes());
                    p.extend_from_slice(&h[1].to_le_bytes());
                }
            }
            Msg::Have { offset, held } => {
                if held.is_empty() || held.len() > MAX_HASHES {
                    return Err(ReplError::Protocol(format!(
                        "HAVE of {} blocks at {offset}",
                        held.len()
                    )));
                }
                p.extend_from_slice(&offset.to_le_bytes());
                p.extend_from_slice(&(held.len() as u64).to_le_bytes());
                let mut bits = vec![0u8; held.len().div_ceil(8)];
                for (i, h) in held.iter().enumerate() {
                    if *h {
                        bits[i / 8] |= 1 << (i % 8);
                    }
                }
                p.extend_from_slice(&bits);
            }
        }
        Ok(p)
    }

    /// The whole frame.
    pub fn encode(&self) -> ReplResult<Vec<u8>> {
        let payload = self.payload()?;
        let len = u32::try_from(payload.len())
            .map_err(|_| ReplError::Protocol("payload too long".into()))?;
        let mut f = Vec::with_capacity(HEADER + payload.len() + 4);
        f.extend_from_slice(&MAGIC.to_le_bytes());
        f.extend_from_slice(&VERSION.to_le_bytes());
        f.push(self.kind());
        f.push(0);
        f.extend_from_slice(&len.to_le_bytes());
        f.extend_from_slice(&payload);
        let crc = crc32c::crc32c(&f);
        f.extend_from_slice(&crc.to_le_bytes());
        Ok(f)
    }

    /// Decodes one frame's type and payload (header and checksum already checked).
    fn decode(kind: u8, p: &[u8]) -> ReplResult<Msg> {
        let bad = |what: &str| ReplError::Protocol(format!("{what}: payload of {} bytes", p.len()));
        let word = |i: usize| -> ReplResult<u64> {
            let s = p
                .get(i * 8..i * 8 + 8)
                .ok_or_else(|| bad("short message"))?;
            let mut b = [0u8; 8];
            b.copy_from_slice(s);
            Ok(u64::from_le_bytes(b))
        };
        let exact = |n: usize, what: &str| -> ReplResult<()> {
            if p.len() == n {
                Ok(())
            } else {
                Err(bad(what))
            }
        };
        let text = |b: &[u8], what: &str| -> ReplResult<String> {
            if b.len() > MAX_TEXT {
                return Err(bad(what));
            }
            let s = std::str::from_utf8(b).map_err(|_| bad(what))?;
            if s.chars().any(|c| c.is_control()) {
                return Err(bad(what));
            }
            Ok(s.to_string())
        };
        Ok(match kind {
            1 => {
                let last_common = word(0)?;
                let volume = text(p.get(8..).unwrap_or_default(), "HELLO volume")?;
                if volume.is_empty() {
                    return Err(bad("HELLO without a volume"));
                }
                Msg::Hello {
                    volume,
                    last_common,
                }
            }
            2 => {
                exact(32, "BEGIN")?;
                Msg::Begin {
                    snapshot: word(0)?,
                    base: word(1)?,
                    volume_size: word(2)?,
                    taken_at: word(3)?,
                }
            }
            3 => {
                let offset = word(0)?;
                let b = p.get(8..).unwrap_or_default();
                if b.is_empty() || b.len() > MAX_DATA {
                    return Err(bad("DATA"));
                }
                Msg::Data {
                    offset,
                    bytes: Payload::copy_of(b)?,
                }
            }
            4 => {
                exact(16, "UNMAP")?;
                Msg::Unmap {
                    offset: word(0)?,
                    len: word(1)?,
                }
            }
            5 => {
                exact(20, "COMMIT")?;
                let mut c = [0u8; 4];
                c.copy_from_slice(p.get(16..20).ok_or_else(|| bad("COMMIT"))?);
                Msg::Commit {
                    snapshot: word(0)?,
                    count: word(1)?,
                    checksum: u32::from_le_bytes(c),
                }
            }
            6 => {
                exact(8, "ACK")?;
                Msg::Ack { snapshot: word(0)? }
            }
            7 => Msg::Error {
                text: text(p, "ERROR text")?,
            },
            8 => {
                exact(0, "PING")?;
                Msg::Ping
            }
            9 => {
                exact(0, "BYE")?;
                Msg::Bye
            }
            10 => {
                exact(8, "CAPS")?;
                Msg::Caps {
                    dedup_block: word(0)?,
                }
            }
            11 => {
                let offset = word(0)?;
                let rest = p.get(8..).unwrap_or_default();
                if rest.is_empty() || !rest.len().is_multiple_of(16) || rest.len() / 16 > MAX_HASHES
                {
                    return Err(bad("HASHES"));
                }
                let hashes = rest
                    .chunks_exact(16)
                    .map(|c| {
                        let mut a = [0u8; 8];
                        let mut b = [0u8; 8];
                        a.copy_from_slice(&c[..8]);
                        b.copy_from_slice(&c[8..]);
                        [u64::from_le_bytes(a), u64::from_le_bytes(b)]
                    })
                    .collect();
                Msg::Hashes { offset, hashes }
            }
            12 => {
                let offset = word(0)?;
                let n = word(1)?;
                if n == 0 || n > MAX_HASHES as u64 {
                    return Err(bad("HAVE count"));
                }
                let n = n as usize;
                let bits = p.get(16..).unwrap_or_default();
                if bits.len() != n.div_ceil(8) {
                    return Err(bad("HAVE"));
                }
                // Bits past the count must be clear (one encoding per message).
                if !n.is_multiple_of(8) && bits[n / 8] >> (n % 8) != 0 {
                    return Err(bad("HAVE padding"));
                }
                let held = (0..n).map(|i| bits[i / 8] & (1 << (i % 8)) != 0).collect();
                Msg::Have { offset, held }
            }
            k => return Err(ReplError::Protocol(format!("unknown message type {k}"))),
        })
    }
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[i..i + 4]);
    u32::from_le_bytes(w)
}

/// Writes one message; returns what its frame adds to the interval checksum. DATA is
/// written from its payload as it is (the same bytes as [`Msg::encode`], without the copy).
pub fn send(w: &mut impl Write, m: &Msg) -> ReplResult<FrameSum> {
    if let Msg::Data { offset, bytes } = m {
        if bytes.is_empty() || bytes.len() > MAX_DATA {
            return Err(ReplError::Protocol(format!(
                "DATA of {} bytes at {offset}",
                bytes.len()
            )));
        }
        let mut head = [0u8; HEADER + 8];
        head[..4].copy_from_slice(&MAGIC.to_le_bytes());
        head[4..6].copy_from_slice(&VERSION.to_le_bytes());
        head[6] = m.kind();
        // The payload: the offset and at most MAX_DATA bytes, well inside u32.
        head[8..12].copy_from_slice(&((8 + bytes.len()) as u32).to_le_bytes());
        head[12..].copy_from_slice(&offset.to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&head), bytes);
        let tail = crc.to_le_bytes();
        w.write_all(&head).map_err(ReplError::Net)?;
        w.write_all(bytes).map_err(ReplError::Net)?;
        w.write_all(&tail).map_err(ReplError::Net)?;
        return Ok(FrameSum(crc));
    }
    let f = m.encode()?;
    w.write_all(&f).map_err(ReplError::Net)?;
    Ok(FrameSum::of(&f))
}

/// Reads one message and checks every field; returns it with what its frame adds to the
/// interval checksum.
pub fn recv(r: &mut impl Read) -> ReplResult<(Msg, FrameSum)> {
    let mut h = [0u8; HEADER];
    r.read_exact(&mut h).map_err(ReplError::Net)?;
    let magic = u32_at(&h, 0);
    if magic != MAGIC {
        return Err(ReplError::Protocol(format!(
            "bad magic {magic:#010x} (not a replication peer)"
        )));
    }
    let version = u16::from_le_bytes([h[4], h[5]]);
    if version != VERSION {
        return Err(ReplError::Protocol(format!(
            "protocol version {version}, this side speaks {VERSION}"
        )));
    }
    if h[7] != 0 {
        return Err(ReplError::Protocol(format!("reserved byte is {}", h[7])));
    }
    let len = u32_at(&h, 8) as usize;
    if len > MAX_PAYLOAD {
        return Err(ReplError::Protocol(format!(
            "payload of {len} bytes, at most {MAX_PAYLOAD}"
        )));
    }
    if h[6] == DATA_KIND && len > 8 {
        return recv_data(r, &h, len);
    }
    let mut f = vec![0u8; HEADER + len + 4];
    f[..HEADER].copy_from_slice(&h);
    r.read_exact(&mut f[HEADER..]).map_err(ReplError::Net)?;
    let crc = u32_at(&f, HEADER + len);
    let want = crc32c::crc32c(&f[..HEADER + len]);
    if crc != want {
        return Err(ReplError::Protocol(format!(
            "frame checksum {crc:#010x}, computed {want:#010x}"
        )));
    }
    let m = Msg::decode(h[6], &f[HEADER..HEADER + len])?;
    Ok((m, FrameSum::of(&f)))
}

/// The type byte of DATA.
const DATA_KIND: u8 = 3;

/// The rest of a DATA frame after its checked header `h` (payload `len` > 8, at most
/// `MAX_PAYLOAD`): the bytes go straight into a [`Payload`], then the checksum is checked.
fn recv_data(r: &mut impl Read, h: &[u8; HEADER], len: usize) -> ReplResult<(Msg, FrameSum)> {
    let mut off = [0u8; 8];
    r.read_exact(&mut off).map_err(ReplError::Net)?;
    let mut bytes = Payload::for_filling(len - 8)?;
    r.read_exact(&mut bytes).map_err(ReplError::Net)?;
    let mut tail = [0u8; 4];
    r.read_exact(&mut tail).map_err(ReplError::Net)?;
    let want = crc32c::crc32c_append(crc32c::crc32c_append(crc32c::crc32c(h), &off), &bytes);
    let crc = u32::from_le_bytes(tail);
    if crc != want {
        return Err(ReplError::Protocol(format!(
            "frame checksum {crc:#010x}, computed {want:#010x}"
        )));
    }
    let sum = FrameSum(crc);
    let offset = u64::from_le_bytes(off);
    Ok((Msg::Data { offset, bytes }, sum))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Msg> {
        vec![
            Msg::Hello {
                volume: "vol-1".into(),
                last_common: 7,
            },
            Msg::Begin {
                snapshot: 8,
                base: 7,
                volume_size: 1 << 30,
                taken_at: 1_700_000_000,
            },
            Msg::Data {
                offset: 4096,
                bytes: Payload::copy_of(&[1, 2, 3]).unwrap(),
            },
            Msg::Unmap {
                offset: 0,
                len: 65536,
            },
            Msg::Commit {
                snapshot: 8,
                count: 2,
                checksum: 0xdead_beef,
            },
            Msg::Ack { snapshot: 8 },
            Msg::Error { text: "no".into() },
            Msg::Ping,
            Msg::Bye,
            Msg::Caps { dedup_block: 4096 },
            Msg::Hashes {
                offset: 8192,
                hashes: vec![[1, 2], [u64::MAX, 0]],
            },
            Msg::Have {
                offset: 8192,
                held: vec![true, false, false, true, true, false, true, false, true],
            },
        ]
    }

    #[test]
    fn round_trip() {
        for m in all() {
            let f = m.encode().unwrap();
            let (back, sum) = recv(&mut &f[..]).unwrap();
            assert_eq!(back, m);
            assert_eq!(sum, FrameSum::of(&f));
            // What `send` writes is exactly the frame; its sum is the frame's own crc32c.
            let mut out = Vec::new();
            let sent = send(&mut out, &m).unwrap();
            assert_eq!(out, f);
            assert_eq!(sent, sum);
            assert_eq!(sum, FrameSum(crc32c::crc32c(&f[..f.len() - 4])));
        }
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        for m in all() {
            let f = m.encode().unwrap();
            for i in 0..f.len() {
                let mut g = f.clone();
                g[i] ^= 0x40;
                assert!(recv(&mut &g[..]).is_err(), "{m:?} byte {i} flipped");
            }
            // Truncated frames too.
            for n in 0..f.len() {
                assert!(recv(&mut &f[..n]).is_err(), "{m:?} cut at {n}");
            }
        }
    }

    #[test]
    fn bad_fields_with_good_checksums_are_refused() {
        let frame = |kind: u8, p: &[u8]| {
            let mut f = Vec::new();
            f.extend_from_slice(&MAGIC.to_le_bytes());
            f.extend_from_slice(&VERSION.to_le_bytes());
            f.push(kind);
            f.push(0);
            f.extend_from_slice(&(p.len() as u32).to_le_bytes());
            f.extend_from_slice(p);
            let c = crc32c::crc32c(&f);
            f.extend_from_slice(&c.to_le_bytes());
            f
        };
        for (kind, p) in [
            (13u8, vec![0u8; 8]),    // unknown type
            (8, vec![0u8; 1]),       // PING with a payload
            (9, vec![0u8; 8]),       // BYE with a payload
            (10, vec![0u8; 4]),      // short CAPS
            (11, vec![0u8; 8]),      // HASHES without a hash
            (11, vec![0u8; 8 + 15]), // HASHES with a partial hash
            (
                12,
                [vec![0u8; 8], 3u64.to_le_bytes().to_vec(), vec![0xf8]].concat(),
            ), // HAVE padding set
            (12, [vec![0u8; 8], 0u64.to_le_bytes().to_vec()].concat()), // HAVE of nothing
            (
                12,
                [vec![0u8; 8], 9u64.to_le_bytes().to_vec(), vec![0]].concat(),
            ), // HAVE short bitmap
            (2, vec![0u8; 31]),      // short BEGIN
            (3, vec![0u8; 8]),       // DATA without bytes
            (6, vec![0u8; 9]),       // long ACK
            (1, vec![0u8; 8]),       // HELLO without a volume
            (1, [0u8; 9].to_vec()),  // HELLO with a control character
            (7, vec![0xff, 0xfe]),   // ERROR not UTF-8
        ] {
            assert!(
                recv(&mut &frame(kind, &p)[..]).is_err(),
                "type {kind} {p:?}"
            );
        }
    }
}
