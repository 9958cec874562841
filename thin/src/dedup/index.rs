//! The RAM index of a dedup pool: hash -> data block, one `u64` per slot.
//!
//! Open addressing with linear probing. A slot packs a 32-bit *fingerprint* (bits of the hash
//! that do not choose the slot) and a 32-bit data block number (pools have at most 2^32
//! blocks); `u64::MAX` marks an empty slot, so a fingerprint is never all ones (it is folded
//! to `u32::MAX - 1`). The load factor is at most 0.85: about 9.4 bytes per unique block.
//! A fingerprint match is only a *candidate*: the caller confirms it against the block's
//! full 128-bit record in the hash tree. Deletion shifts the following entries of the
//! cluster back (no tombstones); the home slot of an entry comes from its block's record,
//! which the caller supplies, since the slot keeps only the fingerprint.

use super::Hash128;
use crate::types::DataBlock;

const EMPTY: u64 = u64::MAX;
/// Most entries per slot, in hundredths.
const LOAD_PERCENT: u64 = 85;

/// The index. Never grows by itself: an insert into a full index is refused (the caller
/// counts it and the block is simply not found as a duplicate later).
#[derive(Clone, Debug)]
pub struct Index {
    slots: Vec<u64>,
    len: u64,
    max: u64,
}

fn fingerprint(h: &Hash128) -> u64 {
    let f = h[1] >> 32;
    if f == u32::MAX as u64 {
        f - 1
    } else {
        f
    }
}

fn pack(h: &Hash128, d: DataBlock) -> u64 {
    (fingerprint(h) << 32) | (d.0 & 0xFFFF_FFFF)
}

impl Index {
    /// An index of `slots` slots (at least 1) holding at most 85% of them.
    pub fn with_slots(slots: u64) -> Index {
        let slots = slots.max(1);
        Index {
            slots: vec![EMPTY; slots as usize],
            len: 0,
            max: slots.saturating_mul(LOAD_PERCENT) / 100,
        }
    }

    /// An index able to hold `entries` entries.
    pub fn for_entries(entries: u64) -> Index {
        Index::with_slots(
            entries
                .saturating_mul(100)
                .div_ceil(LOAD_PERCENT)
                .saturating_add(1),
        )
    }

    /// An index using at most `bytes` of RAM for its slots.
    pub fn for_bytes(bytes: u64) -> Index {
        Index::with_slots(bytes / 8)
    }

    /// Entries held.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Most entries it takes.
    pub fn capacity(&self) -> u64 {
        self.max
    }
    /// Slots.
    pub fn slots(&self) -> u64 {
        self.slots.len() as u64
    }
    /// RAM of its slots in bytes.
    pub fn bytes(&self) -> u64 {
        self.slots.len() as u64 * 8
    }

    /// The home slot of hash `h` (the low word, scaled to the slot count).
    pub fn home(&self, h: &Hash128) -> usize {
        ((h[0] as u128 * self.slots.len() as u128) >> 64) as usize
    }

    fn next(&self, i: usize) -> usize {
        if i + 1 == self.slots.len() {
            0
        } else {
            i + 1
        }
    }

    /// Blocks whose entry has `h`'s fingerprint: candidates to confirm against their records.
    pub fn candidates(&self, h: &Hash128) -> impl Iterator<Item = DataBlock> + '_ {
        let fp = fingerprint(h);
        let mut i = self.home(h);
        // No allocation: this runs under the metadata lock on every dedup write.
        std::iter::from_fn(move || {
            // The index is never full (max < slots), so the probe meets an empty slot.
            while self.slots[i] != EMPTY {
                let s = self.slots[i];
                i = self.next(i);
                if s >> 32 == fp {
                    return Some(DataBlock(s & 0xFFFF_FFFF));
                }
            }
            None
        })
    }

    /// Adds `d` under `h`. `false` if the index is full or `d` does not fit 32 bits. Adding
    /// an entry that is already there changes nothing.
    pub fn insert(&mut self, h: &Hash128, d: DataBlock) -> bool {
        if d.0 > u32::MAX as u64 {
            return false;
        }
        let e = pack(h, d);
        let mut i = self.home(h);
        while self.slots[i] != EMPTY {
            if self.slots[i] == e {
                return true;
            }
            i = self.next(i);
        }
        if self.len >= self.max {
            return false;
        }
        self.slots[i] = e;
        self.len += 1;
        true
    }

    /// Removes the entry of `d` under `h`; `home_of(b)` must give the home slot of any other
    /// entry's block `b` (from its record), `None` if unknown (then that entry stays where
    /// it is, which can only hide it from later probes: a missed duplicate, never a wrong
    /// one). Returns whether the entry was there.
    pub fn remove(
        &mut self,
        h: &Hash128,
        d: DataBlock,
        home_of: &mut dyn FnMut(DataBlock, usize) -> Option<usize>,
    ) -> bool {
        if d.0 > u32::MAX as u64 {
            return false;
        }
        let e = pack(h, d);
        let mut i = self.home(h);
        loop {
            if self.slots[i] == EMPTY {
                return false;
            }
            if self.slots[i] == e {
                break;
            }
            i = self.next(i);
        }
        // Backward shift: move later entries of the cluster into the hole when the hole
        // lies between their home and their slot (cyclically).
        let n = self.slots.len();
        let mut hole = i;
        let mut j = self.next(i);
        while self.slots[j] != EMPTY {
            let b = DataBlock(self.slots[j] & 0xFFFF_FFFF);
            if let Some(home) = home_of(b, n) {
                // Distance from home to j and from home to the hole, cyclically.
                let dist_j = (j + n - home) % n;
                let dist_hole = (hole + n - home) % n;
                if dist_hole <= dist_j {
                    self.slots[hole] = self.slots[j];
                    hole = j;
                }
            }
            j = self.next(j);
        }
        self.slots[hole] = EMPTY;
        self.len -= 1;
        true
    }
}

/// The home slot of `h` in an index of `slots` slots (for [`Index::remove`]'s `home_of`).
pub fn home_in(h: &Hash128, slots: usize) -> usize {
    ((h[0] as u128 * slots as u128) >> 64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn h(x: u64) -> Hash128 {
        let a = x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        [a ^ (a >> 29), a.rotate_left(17) ^ x]
    }

    /// Random inserts and removes against a map; small index so clusters wrap around.
    #[test]
    fn matches_a_map_with_backward_shift() {
        let mut idx = Index::with_slots(64);
        let mut model: HashMap<u64, Hash128> = HashMap::new();
        let mut s = 1u64;
        for step in 0..20_000u64 {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let d = (s >> 33) % 100;
            if let Some(hh) = model.get(&d).copied() {
                let m = model.clone();
                assert!(idx.remove(&hh, DataBlock(d), &mut |b, n| m
                    .get(&b.0)
                    .map(|x| home_in(x, n))));
                model.remove(&d);
            } else {
                // Some hashes collide on purpose (same home and fingerprint).
                let hh = h(if step % 7 == 0 {
                    5
                } else {
                    d + 1000 * (step % 3)
                });
                if idx.insert(&hh, DataBlock(d)) {
                    model.insert(d, hh);
                } else {
                    assert_eq!(idx.len(), idx.capacity());
                }
            }
            assert_eq!(idx.len(), model.len() as u64);
            for (&d, hh) in &model {
                assert!(
                    idx.candidates(hh).any(|c| c == DataBlock(d)),
                    "step {step}: {d} lost"
                );
            }
        }
        assert_eq!(idx.capacity(), 54);
        assert_eq!(idx.bytes(), 512);
    }

    #[test]
    fn full_index_refuses_and_empty_pattern_is_never_an_entry() {
        let mut idx = Index::with_slots(10);
        let all_ones: Hash128 = [0, u64::MAX];
        assert!(idx.insert(&all_ones, DataBlock(u32::MAX as u64)));
        assert_eq!(
            idx.candidates(&all_ones).collect::<Vec<_>>(),
            vec![DataBlock(u32::MAX as u64)]
        );
        for d in 0..7 {
            assert!(idx.insert(&h(d), DataBlock(d)));
        }
        assert_eq!(idx.len(), 8);
        assert!(!idx.insert(&h(99), DataBlock(99)));
        assert!(!idx.insert(&h(1), DataBlock(1 << 32)));
        assert_eq!(idx.len(), 8);
    }
}
