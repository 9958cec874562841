//! LVM2's checksum (`lib/misc/crc.c`): the reflected CRC-32 polynomial (0xEDB88320, as zlib),
//! but started from [`INITIAL_CRC`] and with no final inversion, so it is not zlib's crc32 of
//! the same bytes. Labels, metadata-area headers and the metadata text all use it.

/// The initial value LVM2 starts every checksum from (`INITIAL_CRC` in `crc.h`).
pub const INITIAL_CRC: u32 = 0xf597_a6cf;

/// The byte table for the reflected polynomial, built at compile time.
const TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut j = 0;
        while j < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            j += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// Continues a checksum over `buf` from `crc` (pass [`INITIAL_CRC`] to start one). Chaining
/// two calls gives the checksum of the concatenation, which is how LVM2 checks metadata text
/// that wraps around the end of its ring.
pub fn update(mut crc: u32, buf: &[u8]) -> u32 {
    for &b in buf {
        crc = TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

/// LVM2's checksum of `buf`: `calc_crc(INITIAL_CRC, buf, len)`.
pub fn crc(buf: &[u8]) -> u32 {
    update(INITIAL_CRC, buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_matches_lvm2s_first_entries() {
        // The first entries of crctab[] in lib/misc/crc.c.
        assert_eq!(
            &TABLE[..8],
            &[
                0x00000000, 0x77073096, 0xee0e612c, 0x990951ba, 0x076dc419, 0x706af48f, 0xe963a535,
                0x9e6495a3
            ]
        );
        assert_eq!(TABLE[255], 0x2d02ef8d);
    }

    #[test]
    fn chaining_is_concatenation() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
        for cut in [0, 1, 3, 4, 500, 999, 1000] {
            let (a, b) = data.split_at(cut);
            assert_eq!(update(update(INITIAL_CRC, a), b), crc(&data));
        }
    }

    #[test]
    fn not_zlib_crc32() {
        // zlib's crc32("123456789") is 0xcbf43926; LVM2's starts elsewhere and does not invert.
        assert_ne!(crc(b"123456789"), 0xcbf4_3926);
        assert_eq!(!update(!0, b"123456789"), 0xcbf4_3926);
    }
}
