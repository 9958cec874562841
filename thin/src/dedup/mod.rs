//! Inline deduplication: content hashes and the RAM index of unique blocks.
//!
//! A dedup pool keeps, beside its mappings, a *hash tree* (data block -> first 128 bits of
//! the block's BLAKE3 hash, see `meta/dedup.rs`) and a RAM [`index::Index`] from hash to
//! block, rebuilt from the tree at open. A full-block write is hashed, looked up, and either
//! mapped to the block that already holds that content or written to a fresh block that
//! gets a record and an index entry. Hashed blocks are never overwritten in place, so a
//! record always describes its block's bytes. See ARCHITECTURE.md, "Deduplication".

pub mod index;

/// The first 128 bits of a block's hash, as two little-endian words.
pub type Hash128 = [u64; 2];

/// Which hash identifies block contents.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum HashKind {
    /// BLAKE3 (SIMD), first 128 bits.
    #[default]
    Blake3,
    /// One byte of entropy: different contents collide often. Only for tests that prove
    /// `dedup_verify` never shares different contents (and that sharing without it would).
    /// No table selects it.
    WeakForTests,
}

/// The hash of `block` under `kind`.
pub fn hash(kind: HashKind, block: &[u8]) -> Hash128 {
    let h = blake3::hash(block);
    let b = h.as_bytes();
    let mut lo = [0u8; 8];
    let mut hi = [0u8; 8];
    lo.copy_from_slice(&b[..8]);
    hi.copy_from_slice(&b[8..16]);
    match kind {
        HashKind::Blake3 => [u64::from_le_bytes(lo), u64::from_le_bytes(hi)],
        HashKind::WeakForTests => {
            // Spread the one byte over both words so slot and fingerprint both follow it.
            let x = (b[0] as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            [x, x.rotate_left(32)]
        }
    }
}

/// Whether every byte of `b` is zero.
pub fn is_zero(b: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: every bit pattern is a valid u64; align_to only splits off the unaligned
        // ends, which are checked byte by byte.
        unsafe { b.align_to::<u64>() }
    };
    head.iter().all(|&x| x == 0) && tail.iter().all(|&x| x == 0) && words.iter().all(|&w| w == 0)
}
