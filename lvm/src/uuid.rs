//! LVM's identifiers (`lib/uuid/uuid.c`): 32 characters of a 64-character alphabet, stored raw
//! on disk (the PV label) and printed in the text with dashes in groups of 6-4-4-4-4-4-6.

use std::fmt;
use std::str::FromStr;

use rand::RngCore;

/// LVM's alphabet. New identifiers use only the first 62 characters (LVM1 compatibility);
/// `!` and `#` are valid when read.
const ALPHABET: &[u8; 64] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ!#";

/// Length of an identifier in characters (`ID_LEN`).
pub const ID_LEN: usize = 32;

/// Dash-separated group sizes of the printed form.
const GROUPS: [usize; 7] = [6, 4, 4, 4, 4, 4, 6];

/// Why a string or a raw field is not an LVM identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UuidError {
    /// Not 32 characters once dashes are removed.
    #[error("'{text}' has {len} characters without its dashes, an LVM uuid has 32")]
    Length {
        /// The text, shortened for the message.
        text: String,
        /// Characters counted.
        len: usize,
    },
    /// A character outside LVM's alphabet.
    #[error("'{text}' has a character outside LVM's uuid alphabet at position {pos}")]
    Character {
        /// The text, shortened for the message.
        text: String,
        /// Position of the character (dashes removed).
        pos: usize,
    },
}

/// An LVM identifier (PV, VG or LV uuid): 32 characters of LVM's alphabet.
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Uuid([u8; ID_LEN]);

fn shorten(s: &str) -> String {
    s.chars().take(64).collect()
}

impl Uuid {
    /// A new random identifier (as `id_create`: 62 characters, never `!` or `#`).
    pub fn generate() -> Uuid {
        let mut out = [0u8; ID_LEN];
        let mut rng = rand::rngs::OsRng;
        for c in out.iter_mut() {
            // Rejection sampling: 248 is the largest multiple of 62 under 256, so every
            // character is equally likely.
            *c = loop {
                let mut b = [0u8; 1];
                rng.fill_bytes(&mut b);
                if b[0] < 248 {
                    break ALPHABET[usize::from(b[0] % 62)];
                }
            };
        }
        Uuid(out)
    }

    /// The raw 32 bytes as they appear in a PV label, checked against the alphabet.
    pub fn from_raw(raw: &[u8; ID_LEN]) -> Result<Uuid, UuidError> {
        if let Some(pos) = raw.iter().position(|b| !ALPHABET.contains(b)) {
            return Err(UuidError::Character {
                text: shorten(&String::from_utf8_lossy(raw)),
                pos,
            });
        }
        Ok(Uuid(*raw))
    }

    /// The raw 32 bytes (the on-disk form, no dashes).
    pub fn as_raw(&self) -> &[u8; ID_LEN] {
        &self.0
    }

    /// The 32 characters without dashes.
    pub fn undashed(&self) -> &str {
        // Only alphabet bytes are ever stored, all ASCII.
        std::str::from_utf8(&self.0).unwrap_or("")
    }
}

/// Parses like `id_read_format`: dashes anywhere are ignored, 32 characters must remain.
impl FromStr for Uuid {
    type Err = UuidError;
    fn from_str(s: &str) -> Result<Uuid, UuidError> {
        let mut out = [0u8; ID_LEN];
        let mut n = 0usize;
        for (pos, b) in s.bytes().filter(|&b| b != b'-').enumerate() {
            if pos >= ID_LEN {
                n = pos + 1;
                continue;
            }
            if !ALPHABET.contains(&b) {
                return Err(UuidError::Character {
                    text: shorten(s),
                    pos,
                });
            }
            out[pos] = b;
            n = pos + 1;
        }
        if n != ID_LEN {
            return Err(UuidError::Length {
                text: shorten(s),
                len: n,
            });
        }
        Ok(Uuid(out))
    }
}

/// The dashed form LVM prints (`id_write_format`): `xxxxxx-xxxx-xxxx-xxxx-xxxx-xxxx-xxxxxx`.
impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.undashed();
        let mut at = 0;
        for (i, g) in GROUPS.iter().enumerate() {
            if i > 0 {
                f.write_str("-")?;
            }
            f.write_str(s.get(at..at + g).unwrap_or_default())?;
            at += g;
        }
        Ok(())
    }
}

impl fmt::Debug for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Uuid({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dashed_form_round_trips() {
        let u: Uuid = "W12uUO-sapk-EOtk-Y7wt-uArd-5WR7-MqaA2W".parse().unwrap();
        assert_eq!(u.undashed(), "W12uUOsapkEOtkY7wtuArd5WR7MqaA2W");
        assert_eq!(u.to_string(), "W12uUO-sapk-EOtk-Y7wt-uArd-5WR7-MqaA2W");
        let v: Uuid = "W12uUOsapkEOtkY7wtuArd5WR7MqaA2W".parse().unwrap();
        assert_eq!(u, v);
    }

    #[test]
    fn bad_ids_are_refused() {
        assert!(matches!(
            "abc".parse::<Uuid>(),
            Err(UuidError::Length { len: 3, .. })
        ));
        assert!(matches!(
            "W12uUOsapkEOtkY7wtuArd5WR7MqaA2W0".parse::<Uuid>(),
            Err(UuidError::Length { len: 33, .. })
        ));
        assert!(matches!(
            "W12uUOsapkEOtkY7wtuArd5WR7Mqa_2W".parse::<Uuid>(),
            Err(UuidError::Character { pos: 29, .. })
        ));
        assert!(Uuid::from_raw(&[0u8; 32]).is_err());
    }

    #[test]
    fn generated_ids_use_62_characters() {
        for _ in 0..50 {
            let u = Uuid::generate();
            assert!(u.undashed().bytes().all(|b| b.is_ascii_alphanumeric()));
            assert_eq!(u.to_string().parse::<Uuid>().unwrap(), u);
        }
    }
}
