//! Extents, the unit of LVM allocation, next to [`tables::Sectors`] and [`tables::Bytes`].
//!
//! LVM2 stores extent counts and numbers as 32-bit values (`pe_count`, `start_extent`,
//! `extent_count`, stripe offsets), and an extent is `extent_size` sectors of its VG.

use std::fmt;

use tables::Sectors;

/// A count or index of extents of a VG.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Extents(pub u32);

impl Extents {
    /// The raw count.
    pub const fn get(self) -> u32 {
        self.0
    }
    /// Checked addition.
    pub fn checked_add(self, o: Extents) -> Option<Extents> {
        self.0.checked_add(o.0).map(Extents)
    }
    /// Checked subtraction.
    pub fn checked_sub(self, o: Extents) -> Option<Extents> {
        self.0.checked_sub(o.0).map(Extents)
    }
    /// This many extents of `extent_size` sectors, or `None` if that overflows 64 bits.
    pub fn to_sectors(self, extent_size: Sectors) -> Option<Sectors> {
        u64::from(self.0).checked_mul(extent_size.0).map(Sectors)
    }
}

impl fmt::Display for Extents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
