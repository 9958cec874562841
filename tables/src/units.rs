//! Typed units: 512-byte sectors (the table format's unit) and bytes (the I/O unit).
//!
//! Mixing the two is the classic device-mapper bug, so they are distinct newtypes and every
//! conversion is explicit.

use std::fmt;
use std::ops::{Add, AddAssign, Div, Mul, Rem, Sub, SubAssign};
use std::str::FromStr;

/// Size of one sector in bytes. Device-mapper tables are always in 512-byte sectors.
pub const SECTOR_SIZE: u64 = 512;

macro_rules! unit {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub u64);

        impl $name {
            /// Zero of this unit.
            pub const ZERO: $name = $name(0);
            /// The raw count.
            pub const fn get(self) -> u64 {
                self.0
            }
            /// Checked addition.
            pub fn checked_add(self, o: $name) -> Option<$name> {
                self.0.checked_add(o.0).map($name)
            }
            /// Checked subtraction.
            pub fn checked_sub(self, o: $name) -> Option<$name> {
                self.0.checked_sub(o.0).map($name)
            }
            /// Saturating subtraction.
            pub fn saturating_sub(self, o: $name) -> $name {
                $name(self.0.saturating_sub(o.0))
            }
        }
        impl Add for $name {
            type Output = $name;
            fn add(self, o: $name) -> $name {
                $name(self.0 + o.0)
            }
        }
        impl AddAssign for $name {
            fn add_assign(&mut self, o: $name) {
                self.0 += o.0;
            }
        }
        impl Sub for $name {
            type Output = $name;
            fn sub(self, o: $name) -> $name {
                $name(self.0 - o.0)
            }
        }
        impl SubAssign for $name {
            fn sub_assign(&mut self, o: $name) {
                self.0 -= o.0;
            }
        }
        impl Mul<u64> for $name {
            type Output = $name;
            fn mul(self, o: u64) -> $name {
                $name(self.0 * o)
            }
        }
        impl Div<u64> for $name {
            type Output = $name;
            fn div(self, o: u64) -> $name {
                $name(self.0 / o)
            }
        }
        /// Ratio of two quantities of the same unit.
        impl Div for $name {
            type Output = u64;
            fn div(self, o: $name) -> u64 {
                self.0 / o.0
            }
        }
        impl Rem for $name {
            type Output = $name;
            fn rem(self, o: $name) -> $name {
                $name(self.0 % o.0)
            }
        }
        impl FromStr for $name {
            type Err = std::num::ParseIntError;
            fn from_str(s: &str) -> Result<$name, Self::Err> {
                s.parse::<u64>().map($name)
            }
        }
    };
}

unit!(
    /// A count or offset in 512-byte sectors (the unit of table lines).
    Sectors
);
unit!(
    /// A count or offset in bytes (the unit of the I/O path).
    Bytes
);

impl Sectors {
    /// This many sectors in bytes, saturating at `u64::MAX`: it never wraps to a small size.
    /// Sizes from tables and from disk are bounded when they are validated; use
    /// [`Sectors::checked_bytes`] where a value has not been.
    pub const fn bytes(self) -> Bytes {
        Bytes(self.0.saturating_mul(SECTOR_SIZE))
    }
    /// This many sectors in bytes, or `None` if that does not fit in 64 bits.
    pub const fn checked_bytes(self) -> Option<Bytes> {
        match self.0.checked_mul(SECTOR_SIZE) {
            Some(b) => Some(Bytes(b)),
            None => None,
        }
    }
}

impl Bytes {
    /// Whole sectors in this many bytes (rounded down).
    pub const fn sectors_floor(self) -> Sectors {
        Sectors(self.0 / SECTOR_SIZE)
    }
    /// Sectors covering this many bytes (rounded up).
    pub const fn sectors_ceil(self) -> Sectors {
        Sectors(self.0.div_ceil(SECTOR_SIZE))
    }
    /// Whether this is a whole number of sectors.
    pub const fn is_sector_aligned(self) -> bool {
        self.0.is_multiple_of(SECTOR_SIZE)
    }
    /// As a `usize` length (for buffers); saturates on 32-bit targets.
    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl From<Sectors> for Bytes {
    fn from(s: Sectors) -> Bytes {
        s.bytes()
    }
}

/// Sectors print as the bare number, as in table lines.
impl fmt::Display for Sectors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Bytes print in the largest binary unit that divides them exactly ("64MiB", "1536B"), so a
/// printed size parses back to the same value with [`parse_size`].
impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 5] = [
            ("PiB", 1 << 50),
            ("TiB", 1 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ];
        for (name, mul) in UNITS {
            if self.0 >= mul && self.0.is_multiple_of(mul) {
                return write!(f, "{}{}", self.0 / mul, name);
            }
        }
        write!(f, "{}B", self.0)
    }
}

/// Human-friendly size for reports: "1.50GiB" (rounded, for people, not for parsing).
pub fn human(b: Bytes) -> String {
    const UNITS: [(&str, u64); 5] = [
        ("PiB", 1 << 50),
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (name, mul) in UNITS {
        if b.0 >= mul {
            return format!("{:.2}{}", b.0 as f64 / mul as f64, name);
        }
    }
    format!("{}B", b.0)
}

/// Error from [`parse_size`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// Empty string.
    #[error("empty size")]
    Empty,
    /// The numeric part is not a number.
    #[error("bad number in size '{0}'")]
    BadNumber(String),
    /// Unknown unit suffix.
    #[error("unknown unit '{unit}' in size '{input}' (use B, s, K, M, G, T, P; KiB or KB alike mean 1024)")]
    BadUnit {
        /// The whole input.
        input: String,
        /// The suffix that was not understood.
        unit: String,
    },
    /// Does not fit in 64 bits.
    #[error("size '{0}' overflows 64 bits")]
    Overflow(String),
}

/// Parses a size with an optional unit, lvm style: `4096`, `512B`, `8s` (sectors), `4K`, `4k`,
/// `4KiB`, `4KB`, `1.5G`, `2T`. As in lvm, K/M/G/T/P are powers of 1024 whatever the spelling.
/// A bare number is bytes.
pub fn parse_size(input: &str) -> Result<Bytes, SizeError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(SizeError::Empty);
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    if num.is_empty() {
        return Err(SizeError::BadNumber(input.to_string()));
    }
    let mul: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "s" => SECTOR_SIZE,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        "p" | "pb" | "pib" => 1 << 50,
        _ => {
            return Err(SizeError::BadUnit {
                input: input.to_string(),
                unit: unit.to_string(),
            })
        }
    };
    if let Some((int, frac)) = num.split_once('.') {
        let int: u64 = if int.is_empty() {
            0
        } else {
            int.parse()
                .map_err(|_| SizeError::BadNumber(input.to_string()))?
        };
        if frac.is_empty() || !frac.chars().all(|c| c.is_ascii_digit()) || frac.len() > 9 {
            return Err(SizeError::BadNumber(input.to_string()));
        }
        let frac_v: u64 = frac
            .parse()
            .map_err(|_| SizeError::BadNumber(input.to_string()))?;
        let denom = 10u64.pow(frac.len() as u32);
        let whole = int
            .checked_mul(mul)
            .ok_or_else(|| SizeError::Overflow(input.to_string()))?;
        let part = (frac_v as u128 * mul as u128 / denom as u128) as u64;
        whole
            .checked_add(part)
            .map(Bytes)
            .ok_or_else(|| SizeError::Overflow(input.to_string()))
    } else {
        let v: u64 = num
            .parse()
            .map_err(|_| SizeError::BadNumber(input.to_string()))?;
        v.checked_mul(mul)
            .map(Bytes)
            .ok_or_else(|| SizeError::Overflow(input.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("4096").unwrap(), Bytes(4096));
        assert_eq!(parse_size("8s").unwrap(), Bytes(4096));
        assert_eq!(parse_size("4K").unwrap(), Bytes(4096));
        assert_eq!(parse_size("4kib").unwrap(), Bytes(4096));
        assert_eq!(parse_size("1.5G").unwrap(), Bytes(3 << 29));
        assert_eq!(parse_size("2T").unwrap(), Bytes(2 << 40));
        assert!(matches!(parse_size("12X"), Err(SizeError::BadUnit { .. })));
        assert!(matches!(parse_size("G"), Err(SizeError::BadNumber(_))));
        assert!(matches!(
            parse_size("99999999P"),
            Err(SizeError::Overflow(_))
        ));
        assert!(matches!(parse_size(""), Err(SizeError::Empty)));
    }

    #[test]
    fn bytes_display_round_trips() {
        for v in [0u64, 1, 512, 1024, 1536, 1 << 20, 3 << 30, (1 << 40) + 512] {
            let b = Bytes(v);
            assert_eq!(parse_size(&b.to_string()).unwrap(), b, "{b}");
        }
    }

    #[test]
    fn sector_conversions() {
        assert_eq!(Sectors(8).bytes(), Bytes(4096));
        assert_eq!(Sectors(8).checked_bytes(), Some(Bytes(4096)));
        assert_eq!(Sectors(u64::MAX / 512 + 1).checked_bytes(), None);
        assert_eq!(Bytes(4097).sectors_floor(), Sectors(8));
        assert_eq!(Bytes(4097).sectors_ceil(), Sectors(9));
        assert!(Bytes(1024).is_sector_aligned());
    }
}
