//! What the LUN says about itself (READ CAPACITY(16), the Block Limits and Logical Block
//! Provisioning VPD pages), parsed from the raw bytes SBC-3 defines, and SCSI sense data
//! turned into errors with an errno.

use std::ffi::CStr;

use super::ffi;

/// The LUN's geometry and abilities, from READ CAPACITY(16) and the VPD pages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct LunInfo {
    /// Logical block size in bytes.
    pub block_size: u32,
    /// Number of logical blocks.
    pub blocks: u64,
    /// Logical blocks per physical block, as a power of two.
    pub phys_exp: u8,
    /// Largest transfer in blocks (Block Limits), 0 = not reported.
    pub max_transfer: u32,
    /// Optimal transfer in blocks (Block Limits), 0 = not reported.
    pub opt_transfer: u32,
    /// Largest UNMAP range in blocks, 0 = not reported.
    pub max_unmap: u32,
    /// Optimal unmap granularity in blocks, 0 = not reported.
    pub unmap_granularity: u32,
    /// Largest WRITE SAME in blocks, 0 = not reported.
    pub max_write_same: u64,
    /// UNMAP is supported (LBPU, with LBPME).
    pub unmap: bool,
    /// WRITE SAME(16) is supported (LBPWS).
    pub write_same: bool,
}

impl LunInfo {
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.blocks.saturating_mul(u64::from(self.block_size))
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|x| x.try_into().ok())
        .map(u32::from_be_bytes)
        .unwrap_or(0)
}

fn be64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|x| x.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

/// READ CAPACITY(16) parameter data: (blocks, block size, physical exponent, LBPME).
pub(crate) fn parse_capacity16(d: &[u8]) -> Result<(u64, u32, u8, bool), String> {
    if d.len() < 32 {
        return Err(format!(
            "READ CAPACITY(16) returned {} bytes, expected 32",
            d.len()
        ));
    }
    let last = be64(d, 0);
    let bs = be32(d, 8);
    let blocks = last
        .checked_add(1)
        .ok_or_else(|| "READ CAPACITY(16): the last LBA is 2^64-1".to_string())?;
    Ok((blocks, bs, d[13] & 0x0f, d[14] & 0x80 != 0))
}

/// The page codes a Supported VPD Pages page (0x00) lists.
pub(crate) fn parse_supported_pages(d: &[u8]) -> Vec<u8> {
    if d.len() < 4 || d[1] != 0 {
        return Vec::new();
    }
    let n = usize::from(d[3]);
    d.get(4..(4 + n).min(d.len()))
        .map(<[u8]>::to_vec)
        .unwrap_or_default()
}

/// Fills the Block Limits (0xB0) fields of `info`.
pub(crate) fn parse_block_limits(d: &[u8], info: &mut LunInfo) {
    if d.len() < 16 || d[1] != 0xb0 {
        return;
    }
    info.max_transfer = be32(d, 8);
    info.opt_transfer = be32(d, 12);
    if d.len() >= 36 {
        info.max_unmap = be32(d, 20);
        info.unmap_granularity = be32(d, 28);
    }
    if d.len() >= 44 {
        info.max_write_same = be64(d, 36);
    }
}

/// Fills the Logical Block Provisioning (0xB2) fields of `info`; `lbpme` is READ
/// CAPACITY(16)'s "logical block provisioning management enabled".
pub(crate) fn parse_provisioning(d: &[u8], lbpme: bool, info: &mut LunInfo) {
    if d.len() < 6 || d[1] != 0xb2 {
        return;
    }
    info.unmap = lbpme && d[5] & 0x80 != 0;
    info.write_same = d[5] & 0x40 != 0;
}

/// What a command's SCSI status and sense mean for the request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The command worked.
    Good,
    /// Send it again (UNIT ATTENTION, BUSY, TASK SET FULL, a task the target aborted).
    Retry(String),
    /// Send it again on a new connection: this one broke (libiscsi cancelled the task or hit
    /// a protocol error).
    Reconnect(String),
    /// Final failure: errno and the reason (sense key, ASC/ASCQ).
    Fail(i32, String),
}

/// The sense key's name as SPC spells it.
pub(crate) fn sense_key_name(key: i32) -> &'static str {
    match key {
        0x0 => "NO SENSE",
        0x1 => "RECOVERED ERROR",
        0x2 => "NOT READY",
        0x3 => "MEDIUM ERROR",
        0x4 => "HARDWARE ERROR",
        0x5 => "ILLEGAL REQUEST",
        0x6 => "UNIT ATTENTION",
        0x7 => "DATA PROTECT",
        0x8 => "BLANK CHECK",
        0x9 => "VENDOR SPECIFIC",
        0xa => "COPY ABORTED",
        0xb => "ABORTED COMMAND",
        0xd => "VOLUME OVERFLOW",
        0xe => "MISCOMPARE",
        _ => "UNKNOWN SENSE KEY",
    }
}

/// ASC/ASCQ as `0xAA/0xQQ`, with libiscsi's description when it has one.
fn asc_text(ascq: i32) -> String {
    let (asc, q) = ((ascq >> 8) & 0xff, ascq & 0xff);
    // SAFETY: scsi_sense_ascq_str returns a pointer to a static string (or NULL); it reads
    // no state shared with any context.
    let p = unsafe { ffi::scsi_sense_ascq_str(ascq) };
    let name = if p.is_null() {
        String::new()
    } else {
        // SAFETY: non-null pointers from scsi_sense_ascq_str are NUL-terminated statics.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    };
    if name.is_empty() || name.eq_ignore_ascii_case("unknown") {
        format!("ASC/ASCQ {asc:#04x}/{q:#04x}")
    } else {
        format!("ASC/ASCQ {asc:#04x}/{q:#04x} ({name})")
    }
}

/// Judges a completed command from its status and sense key / ASC+ASCQ.
pub(crate) fn verdict(status: i32, key: i32, ascq: i32) -> Verdict {
    use ffi::*;
    match status {
        SCSI_STATUS_GOOD => Verdict::Good,
        SCSI_STATUS_CHECK_CONDITION => {
            let what = format!("{} {}", sense_key_name(key), asc_text(ascq));
            let asc = (ascq >> 8) & 0xff;
            match key {
                // Recovered: the data is good.
                0x1 => Verdict::Good,
                0x6 => Verdict::Retry(what),
                // Becoming ready, or a transient condition.
                0x2 if ascq == 0x0401 || ascq == 0x0407 => Verdict::Retry(what),
                0xb => Verdict::Retry(what),
                0x5 => {
                    let errno = match asc {
                        0x21 => libc::ENOSPC,     // LBA out of range
                        0x20 => libc::EOPNOTSUPP, // invalid command operation code
                        _ => libc::EINVAL,        // invalid field in CDB / parameter list
                    };
                    Verdict::Fail(errno, what)
                }
                0x7 => {
                    let errno = if ascq == 0x2707 {
                        libc::ENOSPC // space allocation failed write protect
                    } else {
                        libc::EROFS
                    };
                    Verdict::Fail(errno, what)
                }
                0xd => Verdict::Fail(libc::ENOSPC, what),
                0xe => Verdict::Fail(libc::EILSEQ, what),
                _ => Verdict::Fail(libc::EIO, what),
            }
        }
        SCSI_STATUS_BUSY => Verdict::Retry("BUSY".into()),
        SCSI_STATUS_TASK_SET_FULL => Verdict::Retry("TASK SET FULL".into()),
        SCSI_STATUS_TASK_ABORTED => Verdict::Retry("TASK ABORTED".into()),
        SCSI_STATUS_RESERVATION_CONFLICT => Verdict::Fail(libc::EIO, "RESERVATION CONFLICT".into()),
        SCSI_STATUS_CANCELLED => Verdict::Reconnect("cancelled: the connection broke".into()),
        SCSI_STATUS_ERROR => Verdict::Reconnect("iSCSI protocol error".into()),
        SCSI_STATUS_TIMEOUT => Verdict::Reconnect("timed out in libiscsi".into()),
        s => Verdict::Fail(libc::EIO, format!("SCSI status {s:#x}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_and_vpd_pages() {
        let mut d = [0u8; 32];
        d[0..8].copy_from_slice(&16383u64.to_be_bytes());
        d[8..12].copy_from_slice(&4096u32.to_be_bytes());
        d[13] = 3;
        d[14] = 0x80;
        assert_eq!(parse_capacity16(&d), Ok((16384, 4096, 3, true)));
        assert!(parse_capacity16(&d[..20]).unwrap_err().contains("20 bytes"));
        d[0..8].copy_from_slice(&u64::MAX.to_be_bytes());
        assert!(parse_capacity16(&d).is_err());

        assert_eq!(
            parse_supported_pages(&[0, 0, 0, 3, 0x00, 0xb0, 0xb2]),
            vec![0, 0xb0, 0xb2]
        );
        // A length past the data is cut to the data.
        assert_eq!(parse_supported_pages(&[0, 0, 0, 9, 0xb0]), vec![0xb0]);
        assert!(parse_supported_pages(&[0, 0x80, 0, 1, 0]).is_empty());

        let mut b0 = [0u8; 64];
        b0[1] = 0xb0;
        b0[8..12].copy_from_slice(&2048u32.to_be_bytes());
        b0[12..16].copy_from_slice(&64u32.to_be_bytes());
        b0[20..24].copy_from_slice(&1000u32.to_be_bytes());
        b0[28..32].copy_from_slice(&8u32.to_be_bytes());
        b0[36..44].copy_from_slice(&65536u64.to_be_bytes());
        let mut info = LunInfo::default();
        parse_block_limits(&b0, &mut info);
        assert_eq!(
            (
                info.max_transfer,
                info.opt_transfer,
                info.max_unmap,
                info.unmap_granularity,
                info.max_write_same
            ),
            (2048, 64, 1000, 8, 65536)
        );
        // A short page fills what it has.
        let mut short = LunInfo::default();
        parse_block_limits(&b0[..16], &mut short);
        assert_eq!((short.max_transfer, short.max_unmap), (2048, 0));

        let mut b2 = [0u8; 8];
        b2[1] = 0xb2;
        b2[5] = 0xc0;
        parse_provisioning(&b2, true, &mut info);
        assert!(info.unmap && info.write_same);
        parse_provisioning(&b2, false, &mut info);
        assert!(!info.unmap, "UNMAP needs LBPME");
    }

    #[test]
    fn sense_becomes_errno_and_names_the_key() {
        use ffi::*;
        let fail = |key, ascq| match verdict(SCSI_STATUS_CHECK_CONDITION, key, ascq) {
            Verdict::Fail(e, m) => (e, m),
            v => panic!("{v:?}"),
        };
        let (e, m) = fail(3, 0x1100);
        assert_eq!(e, libc::EIO);
        assert!(m.starts_with("MEDIUM ERROR ASC/ASCQ 0x11/0x00"), "{m}");
        let (e, m) = fail(5, 0x2100);
        assert_eq!(e, libc::ENOSPC);
        assert!(m.starts_with("ILLEGAL REQUEST"), "{m}");
        assert_eq!(fail(5, 0x2400).0, libc::EINVAL);
        assert_eq!(fail(5, 0x2000).0, libc::EOPNOTSUPP);
        assert_eq!(fail(7, 0x2700).0, libc::EROFS);
        assert_eq!(fail(7, 0x2707).0, libc::ENOSPC);
        assert_eq!(fail(4, 0x4400).0, libc::EIO);
        assert!(matches!(
            verdict(SCSI_STATUS_CHECK_CONDITION, 6, 0x2900),
            Verdict::Retry(_)
        ));
        assert_eq!(verdict(SCSI_STATUS_CHECK_CONDITION, 1, 0), Verdict::Good);
        assert!(matches!(verdict(SCSI_STATUS_BUSY, 0, 0), Verdict::Retry(_)));
        assert!(matches!(
            verdict(SCSI_STATUS_CANCELLED, 0, 0),
            Verdict::Reconnect(_)
        ));
        assert_eq!(verdict(SCSI_STATUS_GOOD, 0, 0), Verdict::Good);
    }
}
