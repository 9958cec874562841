//! The partial parity log (PPL): what closes the write hole of a raid4/5 array that runs with
//! a leg missing.
//!
//! While any leg is not in sync, every stripe write that updates parity first writes one log
//! entry (FUA) to the metadata device of one in-sync leg, and only then touches data and
//! parity. The entry holds:
//! - the *partial parity* over the written parity range: the XOR of the data chunks the write
//!   does not modify (md's PPL idea). XORed with the modified chunks, whatever mix of old and
//!   new sectors they hold after a cut, it gives parity that matches them and still encodes
//!   the unmodified chunks — the missing leg's data included;
//! - the new contents of every written chunk whose leg is not in sync (it is written nowhere
//!   else: its data lives only in parity).
//!
//! At assembly, if a leg is missing, the valid entries are replayed in sequence order and each
//! stripe's parity is rewritten from them, before any client I/O.
//!
//! Layout after the superblock and bitmap pages on a metadata device (little-endian):
//! - one checkpoint block: magic, array UUID, segment size, and per segment of the log its
//!   generation (0 = nothing valid) and a random key, crc32c;
//! - a ring of [`SEGMENTS`] equal segments. Entries are appended to the current segment at
//!   4 KiB boundaries, each a 4 KiB header (magic, generation, key, sequence, stripe, range,
//!   per-chunk written ranges, logged chunks, payload checksum, header crc32c) followed by the
//!   partial parity and the logged chunks.
//!
//! Recovery scans each valid segment at every 4 KiB boundary and skips over the payload of each
//! entry it accepts. An entry counts only if its generation *and key* equal its segment's in the
//! newest valid checkpoint on any leg and both checksums hold: client data that happens to sit
//! in an old payload cannot pass for an entry without the key, which never leaves the metadata
//! device. A torn entry is ignored, which is safe: no data of its write moved before it was
//! durable. A segment is reused (given a new generation and key) only after every write logged
//! in it has completed and every leg was flushed, so every write that may not be durable has a
//! valid entry; entries are replayed in sequence order so the newest write to a byte decides it.

use std::borrow::Cow;

use crate::meta::{get_u32, get_u64, put_u32, put_u64, META_BLOCK};

const CP_MAGIC: &[u8; 8] = b"RPPLCKP1";
const ENT_MAGIC: &[u8; 8] = b"RPPLENT1";
const CRC_OFF: usize = META_BLOCK - 4;
/// An entry header's fields end before this; its crc32c covers only them (stored at
/// `HDR_USED - 4`) and the rest of its 4 KiB is zero.
const HDR_USED: usize = 1024;
const HDR_CRC: usize = HDR_USED - 4;
const RANGES_OFF: usize = 128;
/// Most data chunks per stripe an entry can describe (legs - 1).
pub const MAX_DATA_CHUNKS: usize = 63;
const LOGGED_OFF: usize = RANGES_OFF + MAX_DATA_CHUNKS * 8;
const _: () = assert!(LOGGED_OFF + MAX_LOGGED * 4 <= HDR_CRC);
/// Most chunks one entry logs in full (legs not in sync that a write touches).
pub const MAX_LOGGED: usize = 2;

/// Largest segment [`Geometry::fit`] makes.
pub const MAX_SEG_BYTES: u64 = 16 << 20;

/// Generations and sequence numbers count from 0 by one per segment switch or entry: one at
/// or above this was not written by this code (a forged or corrupt block), and could not be
/// counted on from.
pub const MAX_COUNTER: u64 = 1 << 62;

/// Segments in the ring. More than two, so the segment being reused was filled long enough
/// ago that its writes have completed and reuse does not wait for them.
pub const SEGMENTS: usize = 4;
const ALIGN: u64 = META_BLOCK as u64;

/// The largest entry for `chunk`-byte chunks: header, partial parity, two logged chunks.
pub fn max_entry_bytes(chunk: u64) -> u64 {
    META_BLOCK as u64 + (1 + MAX_LOGGED as u64) * chunk
}

/// Where the log lives on a metadata device and how big it is.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Byte offset of the checkpoint block.
    pub base: u64,
    /// Bytes per segment (a multiple of 4 KiB).
    pub seg_bytes: u64,
}

impl Geometry {
    /// The log that fits a metadata device of `dev_bytes` whose superblock and bitmap end at
    /// `base`; `None` if a segment could not hold the largest entry. Segments are capped at
    /// [`MAX_SEG_BYTES`].
    pub fn fit(base: u64, dev_bytes: u64, chunk: u64) -> Option<Geometry> {
        let room = dev_bytes.checked_sub(base.checked_add(META_BLOCK as u64)?)?;
        let seg = (room / SEGMENTS as u64 / ALIGN * ALIGN).min(MAX_SEG_BYTES);
        (seg >= max_entry_bytes(chunk)).then_some(Geometry {
            base,
            seg_bytes: seg,
        })
    }

    /// Byte offset of segment `seg`.
    pub fn seg_offset(&self, seg: usize) -> u64 {
        // Saturating: a geometry from disk is checked (`Checkpoint::problem`) before use.
        (seg as u64)
            .saturating_mul(self.seg_bytes)
            .saturating_add(self.base)
            .saturating_add(META_BLOCK as u64)
    }

    /// Bytes a metadata device needs for segments of `seg_bytes` (saturating).
    pub fn bytes_for(base: u64, seg_bytes: u64) -> u64 {
        Geometry { base, seg_bytes }.seg_offset(SEGMENTS)
    }
}

/// Space an entry of `len` encoded bytes takes in a segment.
pub fn aligned(len: usize) -> u64 {
    (len as u64).div_ceil(ALIGN) * ALIGN
}

/// The checkpoint: which generation (and key) each segment holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// Array identity.
    pub uuid: [u8; 16],
    /// Generation of each segment; 0 = the segment holds nothing valid.
    pub gens: [u64; SEGMENTS],
    /// Random key of each segment's generation, stamped into its entries.
    pub keys: [u64; SEGMENTS],
    /// Segment size when written (the device may have grown since).
    pub seg_bytes: u64,
}

impl Checkpoint {
    /// Encodes into one metadata block.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; META_BLOCK];
        b[0..8].copy_from_slice(CP_MAGIC);
        b[8..24].copy_from_slice(&self.uuid);
        put_u64(&mut b, 24, self.seg_bytes);
        put_u32(&mut b, 32, SEGMENTS as u32);
        for i in 0..SEGMENTS {
            put_u64(&mut b, 64 + i * 16, self.gens[i]);
            put_u64(&mut b, 72 + i * 16, self.keys[i]);
        }
        let crc = crc32c::crc32c(&b[..CRC_OFF]);
        put_u32(&mut b, CRC_OFF, crc);
        b
    }

    /// Decodes a block; `None` if blank, torn or not a checkpoint.
    pub fn decode(b: &[u8]) -> Option<Checkpoint> {
        if b.len() < META_BLOCK || &b[0..8] != CP_MAGIC {
            return None;
        }
        if crc32c::crc32c(&b[..CRC_OFF]) != get_u32(b, CRC_OFF)
            || get_u32(b, 32) as usize != SEGMENTS
        {
            return None;
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[8..24]);
        let mut gens = [0u64; SEGMENTS];
        let mut keys = [0u64; SEGMENTS];
        for i in 0..SEGMENTS {
            gens[i] = get_u64(b, 64 + i * 16);
            keys[i] = get_u64(b, 72 + i * 16);
        }
        Some(Checkpoint {
            uuid,
            gens,
            keys,
            seg_bytes: get_u64(b, 24),
        })
    }

    /// The newest generation named.
    pub fn max_gen(&self) -> u64 {
        self.gens.iter().copied().max().unwrap_or(0)
    }

    /// Why this checkpoint, read at `base` of a metadata device of `dev_bytes` bytes, cannot
    /// be one this code wrote (whatever its checksum says), or `None`: its segments must be
    /// whole 4 KiB blocks up to [`MAX_SEG_BYTES`] and fit the device, and its generations be
    /// below [`MAX_COUNTER`].
    pub fn problem(&self, base: u64, dev_bytes: u64) -> Option<String> {
        let s = self.seg_bytes;
        if s == 0 || !s.is_multiple_of(ALIGN) || s > MAX_SEG_BYTES {
            return Some(format!(
                "segment size {s} is not a multiple of {ALIGN} bytes up to {MAX_SEG_BYTES}"
            ));
        }
        let end = s
            .checked_mul(SEGMENTS as u64)
            .and_then(|x| x.checked_add(base))
            .and_then(|x| x.checked_add(META_BLOCK as u64));
        if end.is_none_or(|e| e > dev_bytes) {
            return Some(format!(
                "{SEGMENTS} segments of {s} bytes after byte {base} do not fit the \
                 {dev_bytes}-byte metadata device"
            ));
        }
        if let Some(g) = self.gens.iter().find(|&&g| g >= MAX_COUNTER) {
            return Some(format!("generation {g} is impossibly large"));
        }
        None
    }

    /// Whether any segment is valid (a log was being kept).
    pub fn active(&self) -> bool {
        self.gens.iter().any(|&g| g != 0)
    }
}

/// One log entry: a stripe write's partial parity and the chunks only parity will hold. On
/// the write path it borrows the caller's data; decoded entries own theirs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    /// Generation of the segment it was written in.
    pub gen: u64,
    /// That generation's key.
    pub key: u64,
    /// Global order of entries: replay goes from low to high.
    pub seq: u64,
    /// Stripe number.
    pub stripe: u64,
    /// Start and length of the parity range, in bytes within the chunk.
    pub plo: u64,
    /// Length of the parity range.
    pub plen: u64,
    /// Per data chunk (stripe order): the written range `[lo, hi)` in chunk bytes, if any.
    pub ranges: Vec<Option<(u64, u64)>>,
    /// Partial parity over the range: XOR of the chunks not written there. `None` when zero
    /// (every chunk written over the whole range): then it is not stored.
    pub pp: Option<Cow<'a, [u8]>>,
    /// `(data chunk index, new contents over its written range)` for written chunks whose leg
    /// was not in sync.
    pub logged: Vec<(usize, Cow<'a, [u8]>)>,
}

impl Entry<'_> {
    fn payload_len(&self) -> usize {
        self.pp.as_ref().map_or(0, |p| p.len())
            + self.logged.iter().map(|(_, d)| d.len()).sum::<usize>()
    }

    /// Length of [`encode`](Self::encode)'s output.
    pub fn encoded_len(&self) -> usize {
        (META_BLOCK + self.payload_len()).div_ceil(512) * 512
    }

    /// Encodes the header and payload as one write (whole sectors), stamped with `uuid`.
    pub fn encode(&self, uuid: &[u8; 16]) -> Vec<u8> {
        let payload = self.payload_len();
        let mut b = vec![0u8; self.encoded_len()];
        b[0..8].copy_from_slice(ENT_MAGIC);
        put_u64(&mut b, 8, self.gen);
        put_u64(&mut b, 16, self.seq);
        put_u64(&mut b, 24, self.stripe);
        put_u64(&mut b, 32, self.plo);
        put_u64(&mut b, 40, self.plen);
        put_u32(&mut b, 48, self.ranges.len() as u32);
        put_u32(&mut b, 52, self.logged.len() as u32);
        b[56..72].copy_from_slice(uuid);
        put_u32(&mut b, 80, self.pp.is_some() as u32);
        put_u64(&mut b, 88, self.key);
        for (i, r) in self.ranges.iter().enumerate() {
            let (lo, hi) = r.unwrap_or((0, 0));
            put_u32(&mut b, RANGES_OFF + i * 8, lo as u32);
            put_u32(&mut b, RANGES_OFF + i * 8 + 4, hi as u32);
        }
        let mut pos = META_BLOCK;
        if let Some(pp) = &self.pp {
            b[pos..pos + pp.len()].copy_from_slice(pp);
            pos += pp.len();
        }
        for (j, (idx, d)) in self.logged.iter().enumerate() {
            put_u32(&mut b, LOGGED_OFF + j * 4, *idx as u32);
            b[pos..pos + d.len()].copy_from_slice(d);
            pos += d.len();
        }
        let sum = payload_sum(self.seq, &b[META_BLOCK..META_BLOCK + payload]);
        put_u64(&mut b, 96, sum);
        let crc = crc32c::crc32c(&b[..HDR_CRC]);
        put_u32(&mut b, HDR_CRC, crc);
        b
    }

    /// Decodes the entry at the start of `b`. `None` for anything not a complete, intact
    /// entry of `uuid` (blank, torn header or payload, another array, impossible ranges).
    pub fn decode(b: &[u8], uuid: &[u8; 16], chunk: u64) -> Option<Entry<'static>> {
        if b.len() < META_BLOCK || &b[0..8] != ENT_MAGIC {
            return None;
        }
        if crc32c::crc32c(&b[..HDR_CRC]) != get_u32(b, HDR_CRC) || &b[56..72] != uuid {
            return None;
        }
        let plo = get_u64(b, 32);
        let plen = get_u64(b, 40);
        let k = get_u32(b, 48) as usize;
        let nlog = get_u32(b, 52) as usize;
        if k > MAX_DATA_CHUNKS || nlog > MAX_LOGGED || plo.checked_add(plen)? > chunk {
            return None;
        }
        if get_u64(b, 8) >= MAX_COUNTER || get_u64(b, 16) >= MAX_COUNTER {
            return None;
        }
        let mut ranges = Vec::with_capacity(k);
        for i in 0..k {
            let lo = get_u32(b, RANGES_OFF + i * 8) as u64;
            let hi = get_u32(b, RANGES_OFF + i * 8 + 4) as u64;
            if lo == hi {
                ranges.push(None);
            } else if lo < hi && lo >= plo && hi <= plo + plen {
                ranges.push(Some((lo, hi)));
            } else {
                return None;
            }
        }
        let mut pos = META_BLOCK;
        let pp = match get_u32(b, 80) {
            0 => None,
            _ => {
                let pp = b.get(pos..pos + plen as usize)?.to_vec();
                pos += plen as usize;
                Some(Cow::Owned(pp))
            }
        };
        let mut logged = Vec::with_capacity(nlog);
        for j in 0..nlog {
            let idx = get_u32(b, LOGGED_OFF + j * 4) as usize;
            let (lo, hi) = (*ranges.get(idx)?)?;
            let d = b.get(pos..pos + (hi - lo) as usize)?.to_vec();
            pos += d.len();
            logged.push((idx, Cow::Owned(d)));
        }
        if payload_sum(get_u64(b, 16), &b[META_BLOCK..pos]) != get_u64(b, 96) {
            return None;
        }
        Some(Entry {
            gen: get_u64(b, 8),
            key: get_u64(b, 88),
            seq: get_u64(b, 16),
            stripe: get_u64(b, 24),
            plo,
            plen,
            ranges,
            pp,
            logged,
        })
    }
}

/// Checksum of an entry's payload (up to 196 KiB per stripe write, so it must be cheap
/// everywhere: crc32c's instruction is fast on hardware but crawls under emulation, where it
/// took 44% of a degraded write's CPU). Four independent multiply-rotate lanes over 64-bit
/// words, seeded with the entry's sequence number; every word's position matters. It detects
/// torn payloads (stale sectors), which is all it is for; the header keeps crc32c.
pub fn payload_sum(seed: u64, data: &[u8]) -> u64 {
    const K: [u64; 4] = [
        0x9E37_79B9_7F4A_7C15,
        0xC2B2_AE3D_27D4_EB4F,
        0x1656_67B1_9E37_79F9,
        0x85EB_CA77_C2B2_AE63,
    ];
    let mut h = [seed ^ K[0], seed ^ K[1], seed ^ K[2], seed ^ K[3]];
    let mut chunks = data.chunks_exact(32);
    for c in &mut chunks {
        for (l, hl) in h.iter_mut().enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(&c[l * 8..l * 8 + 8]);
            *hl = (*hl ^ u64::from_le_bytes(w))
                .wrapping_mul(K[l])
                .rotate_left(31);
        }
    }
    let mut tail = [0u8; 32];
    let rest = chunks.remainder();
    tail[..rest.len()].copy_from_slice(rest);
    for (l, hl) in h.iter_mut().enumerate() {
        let mut w = [0u8; 8];
        w.copy_from_slice(&tail[l * 8..l * 8 + 8]);
        *hl = (*hl ^ u64::from_le_bytes(w))
            .wrapping_mul(K[l])
            .rotate_left(31);
    }
    let mut out = data.len() as u64;
    for (l, hl) in h.iter().enumerate() {
        out = (out ^ hl).wrapping_mul(K[(l + 1) % 4]).rotate_left(27);
    }
    out
}

/// The sources replay has for one data chunk of a stripe.
pub enum ChunkSource<'a> {
    /// Its leg is trusted: the bytes read from it over the entry's written range.
    Disk(&'a [u8]),
    /// Its leg is missing, but the entry logged its new contents.
    Logged(&'a [u8]),
    /// Its leg is missing and nothing was logged: parity for bytes it was writing cannot be
    /// made to match any version of it, so replay leaves them.
    Lost,
}

/// Computes the parity one entry dictates over its range. `src(i)` gives chunk `i`'s contents
/// over `ranges[i]`. Returns `(chunk offset, parity bytes)` runs; bytes a lost chunk was
/// being written at are left out (no parity can match a version of them).
pub fn replay_entry<'a>(
    e: &Entry<'_>,
    src: impl Fn(usize) -> ChunkSource<'a>,
) -> Vec<(u64, Vec<u8>)> {
    let end = e.plo + e.plen;
    let sources: Vec<Option<ChunkSource<'a>>> = e
        .ranges
        .iter()
        .enumerate()
        .map(|(i, r)| r.map(|_| src(i)))
        .collect();
    // Between consecutive range edges the set of written chunks is constant (writes need not
    // be sector aligned).
    let mut cuts: Vec<u64> = vec![e.plo, end];
    for (lo, hi) in e.ranges.iter().flatten() {
        cuts.push(*lo);
        cuts.push(*hi);
    }
    cuts.sort_unstable();
    cuts.dedup();
    let mut out: Vec<(u64, Vec<u8>)> = Vec::new();
    for win in cuts.windows(2) {
        let (a, b) = (win[0], win[1]);
        let mut p = match &e.pp {
            Some(pp) => pp[(a - e.plo) as usize..(b - e.plo) as usize].to_vec(),
            None => vec![0u8; (b - a) as usize],
        };
        let mut lost = false;
        for (i, r) in e.ranges.iter().enumerate() {
            let Some((lo, hi)) = *r else { continue };
            if a < lo || b > hi {
                continue;
            }
            match &sources[i] {
                Some(ChunkSource::Disk(d)) | Some(ChunkSource::Logged(d)) => {
                    let at = (a - lo) as usize;
                    for (x, y) in p.iter_mut().zip(&d[at..at + (b - a) as usize]) {
                        *x ^= y;
                    }
                }
                Some(ChunkSource::Lost) | None => {
                    lost = true;
                    break;
                }
            }
        }
        if lost {
            continue;
        }
        match out.last_mut() {
            Some((o, v)) if *o + v.len() as u64 == a => v.extend_from_slice(&p),
            _ => out.push((a, p)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry<'static> {
        Entry {
            gen: 3,
            key: 0xfeed,
            seq: 99,
            stripe: 12,
            plo: 1024,
            plen: 1536,
            ranges: vec![Some((1024, 2048)), None, Some((1536, 2560))],
            pp: Some(Cow::Owned((0..1536).map(|i| i as u8).collect())),
            logged: vec![(2, Cow::Owned(vec![7u8; 1024]))],
        }
    }

    #[test]
    fn entry_roundtrips_and_rejects_tears() {
        let u = [5u8; 16];
        let e = entry();
        let b = e.encode(&u);
        assert_eq!(b.len() % 512, 0);
        assert_eq!(Entry::decode(&b, &u, 4096), Some(e));
        assert_eq!(Entry::decode(&b, &[6u8; 16], 4096), None, "other array");
        let mut torn = b.clone();
        torn[META_BLOCK + 100] ^= 1;
        assert_eq!(Entry::decode(&torn, &u, 4096), None, "torn payload");
        let mut torn = b.clone();
        torn[20] ^= 1;
        assert_eq!(Entry::decode(&torn, &u, 4096), None, "torn header");
        let mut torn = b.clone();
        torn[RANGES_OFF + 4] ^= 1;
        assert_eq!(Entry::decode(&torn, &u, 4096), None, "torn ranges");
        assert_eq!(Entry::decode(&vec![0u8; b.len()], &u, 4096), None);
        assert_eq!(Entry::decode(&b, &u, 2048), None, "range past the chunk");
    }

    #[test]
    fn payload_sum_sees_every_word_and_its_place() {
        let mut x = 1u64;
        let base: Vec<u8> = (0..65536)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 56) as u8
            })
            .collect();
        let s0 = payload_sum(1, &base);
        assert_ne!(s0, payload_sum(2, &base), "seed");
        for at in [0usize, 7, 512, 4095, 40000, 65535] {
            let mut b = base.clone();
            b[at] ^= 0x10;
            assert_ne!(s0, payload_sum(1, &b), "byte {at}");
        }
        // A stale sector (two sectors' contents swapped) is seen too.
        let mut b = base.clone();
        let (x, y) = b.split_at_mut(1024);
        x[..512].swap_with_slice(&mut y[..512]);
        assert_ne!(s0, payload_sum(1, &b));
        assert_ne!(
            payload_sum(1, &[0u8; 40]),
            payload_sum(1, &[0u8; 48]),
            "length"
        );
    }

    #[test]
    fn zero_partial_parity_is_not_stored() {
        let u = [5u8; 16];
        let mut e = entry();
        e.pp = None;
        let b = e.encode(&u);
        assert_eq!(
            b.len(),
            META_BLOCK + 1024,
            "header and the logged chunk only"
        );
        assert_eq!(Entry::decode(&b, &u, 4096), Some(e));
    }

    #[test]
    fn checkpoint_roundtrips() {
        let c = Checkpoint {
            uuid: [1; 16],
            gens: [4, 5, 0, 3],
            keys: [9, 8, 7, 6],
            seg_bytes: 1 << 20,
        };
        let mut b = c.encode();
        assert_eq!(Checkpoint::decode(&b), Some(c.clone()));
        b[70] ^= 1;
        assert_eq!(Checkpoint::decode(&b), None);
        // Decodable, but not something this code writes.
        assert_eq!(c.problem(8192, 8 << 20), None);
        for (seg, why) in [(0, "multiple"), (4095, "multiple"), (32 << 20, "multiple")] {
            let bad = Checkpoint {
                seg_bytes: seg,
                ..c.clone()
            };
            assert!(bad.problem(8192, 8 << 20).unwrap().contains(why), "{seg}");
        }
        assert!(c.problem(8192, 4 << 20).unwrap().contains("do not fit"));
        assert!(c
            .problem(u64::MAX - 4096, u64::MAX)
            .unwrap()
            .contains("do not fit"));
        let bad = Checkpoint {
            gens: [0, u64::MAX, 0, 0],
            ..c.clone()
        };
        assert!(bad.problem(8192, 8 << 20).unwrap().contains("generation"));
    }

    #[test]
    fn geometry_fits_the_largest_entry_or_nothing() {
        let chunk = 65536;
        let g = Geometry::fit(8192, 4 << 20, chunk).unwrap();
        assert!(g.seg_bytes >= max_entry_bytes(chunk));
        assert!(Geometry::bytes_for(8192, g.seg_bytes) <= 4 << 20);
        assert_eq!(g.seg_bytes % 4096, 0);
        assert_eq!(Geometry::fit(8192, 512 << 10, chunk), None);
        assert_eq!(Geometry::fit(8192, 4096, chunk), None);
        assert_eq!(Geometry::fit(u64::MAX, u64::MAX, chunk), None);
        assert_eq!(Geometry::bytes_for(u64::MAX - 4096, 1 << 20), u64::MAX);
    }

    #[test]
    fn replay_recomputes_parity_and_skips_lost_bytes() {
        // Three data chunks; chunk 0 written over [0, 1024), chunk 1 missing and written over
        // [512, 1024) without a log, chunk 2 untouched.
        let d2 = vec![0x0fu8; 1024];
        let old1 = vec![0x22u8; 1024];
        let mut pp = vec![0u8; 1024];
        for (i, p) in pp.iter_mut().enumerate() {
            *p = d2[i] ^ if i < 512 { old1[i] } else { 0 };
        }
        let e = Entry {
            gen: 1,
            key: 1,
            seq: 1,
            stripe: 0,
            plo: 0,
            plen: 1024,
            ranges: vec![Some((0, 1024)), Some((512, 1024)), None],
            pp: Some(Cow::Owned(pp)),
            logged: vec![],
        };
        let new0 = vec![0x33u8; 1024];
        let out = replay_entry(&e, |i| match i {
            0 => ChunkSource::Disk(&new0),
            _ => ChunkSource::Lost,
        });
        assert_eq!(out.len(), 1, "the bytes written on the lost chunk are left");
        assert_eq!((out[0].0, out[0].1.len()), (0, 512));
        assert!(out[0].1.iter().all(|&b| b == 0x33 ^ 0x22 ^ 0x0f));
        let new1 = vec![0x44u8; 512];
        let out = replay_entry(&e, |i| match i {
            0 => ChunkSource::Disk(&new0),
            _ => ChunkSource::Logged(&new1),
        });
        assert_eq!((out.len(), out[0].1.len()), (1, 1024), "one coalesced run");
        assert!(out[0].1[512..].iter().all(|&b| b == 0x33 ^ 0x44 ^ 0x0f));
    }
}
