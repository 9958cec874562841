//! ublk device parameters computed from a table's size and [`Limits`].
//!
//! Kept apart from the server so the rules can be unit-tested without a kernel. The kernel
//! (`ublk_validate_params` and `blk_validate_limits`) rejects a start whose parameters break
//! its rules with a bare `EINVAL`; checking here first gives an error that names the device and
//! the offending field.

use libublk::sys;
use tables::{Bytes, Limits};

/// Largest discard / write-zeroes request we advertise: 1 GiB. Neither operation needs a data
/// buffer, so the value only bounds how much one target call has to do.
pub const MAX_DISCARD_BYTES: u32 = 1 << 30;

/// Why a device cannot be exported with these limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{dev}: cannot export over ublk: {field} {why}")]
pub struct ParamError {
    /// Device name.
    pub dev: String,
    /// The [`Limits`] field (or `size`) at fault.
    pub field: &'static str,
    /// What is wrong with it.
    pub why: String,
}

/// The ublk parameters for one device, plus what was adjusted on the way.
#[derive(Debug, Clone, Copy)]
pub struct UblkParams {
    /// What `UBLK_CMD_SET_PARAMS` sends.
    pub params: sys::ublk_params,
    /// Bytes at the end of the device that are not a whole logical block (not exported).
    pub dropped_tail: Bytes,
}

fn shift_of(v: u32) -> Option<u8> {
    if v.is_power_of_two() {
        Some(v.trailing_zeros() as u8)
    } else {
        None
    }
}

/// Computes the parameters of device `dev` (for messages) of `size` bytes with `limits`, served
/// with I/O buffers of `max_io_buf_bytes` (the value the kernel settled on at ADD_DEV).
///
/// Rules:
/// - logical block size: a power of two in 512..=4096 (ublk's range); physical block size
///   a power of two, at least the logical size (0 means "same as logical").
/// - `io_min` is the physical block size; `io_opt` is `limits.io_opt` when it is a power of
///   two, else its largest power-of-two divisor (a striped table's chunk size, for a
///   non-power-of-two stripe width; ublk can only express powers of two), else the physical
///   block size when the device has no preference.
/// - `max_sectors` is the smaller of the I/O buffer and `limits.max_io`.
/// - Discard is advertised only if `discard_granularity > 0`; write-zeroes only if the device
///   implements it natively (otherwise the kernel's own zero-page writes are just as good).
/// - Attributes: read-only, volatile write cache, and FUA (only meaningful with a cache).
/// - A size that is not a whole number of logical blocks is rounded down.
pub fn compute(
    dev: &str,
    size: Bytes,
    limits: &Limits,
    max_io_buf_bytes: u32,
) -> Result<UblkParams, ParamError> {
    let err = |field: &'static str, why: String| ParamError {
        dev: dev.to_string(),
        field,
        why,
    };
    let lbs = limits.logical_block_size;
    let lbs_shift = shift_of(lbs)
        .filter(|s| (9..=12).contains(s))
        .ok_or_else(|| {
            err(
                "logical_block_size",
                format!("is {lbs}; ublk needs a power of two from 512 to 4096"),
            )
        })?;
    let pbs = if limits.physical_block_size == 0 {
        lbs
    } else {
        limits.physical_block_size
    };
    let pbs_shift = shift_of(pbs).filter(|&s| s >= lbs_shift).ok_or_else(|| {
        err(
            "physical_block_size",
            format!(
                "is {pbs}; it must be a power of two no smaller than the logical block size {lbs}"
            ),
        )
    })?;
    let io_opt_shift = match limits.io_opt {
        0 => pbs_shift,
        v => (v.trailing_zeros() as u8).max(pbs_shift),
    };

    let max_io = max_io_buf_bytes.min(limits.max_io) / lbs * lbs;
    let max_sectors = max_io >> 9;
    if max_sectors == 0 {
        return Err(err(
            "max_io",
            format!("is {max_io} bytes (buffer {max_io_buf_bytes}); it must hold one logical block of {lbs}"),
        ));
    }
    // Whole logical blocks only: the last partial block would be unreachable anyway.
    let usable = size.0 - size.0 % u64::from(lbs);
    if usable == 0 {
        return Err(err(
            "size",
            format!("is {} bytes, less than one logical block of {lbs}", size.0),
        ));
    }

    let mut attrs = 0;
    if limits.read_only {
        attrs |= sys::UBLK_ATTR_READ_ONLY;
    }
    if limits.volatile_cache {
        attrs |= sys::UBLK_ATTR_VOLATILE_CACHE;
        if limits.fua {
            attrs |= sys::UBLK_ATTR_FUA;
        }
    }

    let mut params = sys::ublk_params {
        len: std::mem::size_of::<sys::ublk_params>() as u32,
        types: sys::UBLK_PARAM_TYPE_BASIC,
        basic: sys::ublk_param_basic {
            attrs,
            logical_bs_shift: lbs_shift,
            physical_bs_shift: pbs_shift,
            io_opt_shift,
            io_min_shift: pbs_shift,
            max_sectors,
            chunk_sectors: 0,
            dev_sectors: usable >> 9,
            virt_boundary_mask: 0,
        },
        ..Default::default()
    };

    let discard = limits.discard_granularity > 0 && !limits.read_only;
    let zeroes = limits.write_zeroes && !limits.read_only;
    if discard || zeroes {
        let gran = if discard {
            let g = limits.discard_granularity;
            if !g.is_multiple_of(lbs) {
                return Err(err(
                    "discard_granularity",
                    format!("is {g}; it must be a multiple of the logical block size {lbs}"),
                ));
            }
            g
        } else {
            // The kernel wants a granularity whenever the discard block is present.
            lbs
        };
        // Whole granules per request, so the kernel never splits mid-granule.
        let max_bytes = |unit: u32| (MAX_DISCARD_BYTES / unit * unit) >> 9;
        params.types |= sys::UBLK_PARAM_TYPE_DISCARD;
        params.discard = sys::ublk_param_discard {
            discard_alignment: 0,
            discard_granularity: gran,
            max_discard_sectors: if discard { max_bytes(gran) } else { 0 },
            max_write_zeroes_sectors: if zeroes { max_bytes(lbs) } else { 0 },
            max_discard_segments: 1,
            reserved0: 0,
        };
    }
    Ok(UblkParams {
        params,
        dropped_tail: Bytes(size.0 - usable),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lim() -> Limits {
        Limits::default()
    }

    #[test]
    fn defaults_give_basic_and_discard() {
        let p = compute("d", Bytes(1 << 30), &lim(), 512 << 10).unwrap();
        let b = p.params.basic;
        assert_eq!(b.logical_bs_shift, 9);
        assert_eq!(b.physical_bs_shift, 12);
        assert_eq!(b.io_min_shift, 12);
        assert_eq!(b.io_opt_shift, 12);
        assert_eq!(b.max_sectors, 1024);
        assert_eq!(b.dev_sectors, (1u64 << 30) >> 9);
        assert_eq!(b.attrs, sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA);
        assert_eq!(
            p.params.types,
            sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD
        );
        let d = p.params.discard;
        assert_eq!(d.discard_granularity, 4096);
        assert_eq!(d.max_discard_sectors, MAX_DISCARD_BYTES >> 9);
        assert_eq!(d.max_write_zeroes_sectors, MAX_DISCARD_BYTES >> 9);
        assert_eq!(d.max_discard_segments, 1);
        assert_eq!(p.dropped_tail, Bytes(0));
        assert_eq!(
            p.params.len as usize,
            std::mem::size_of::<sys::ublk_params>()
        );
    }

    #[test]
    fn max_io_is_the_smaller_of_buffer_and_device() {
        let mut l = lim();
        l.max_io = 128 << 10;
        let p = compute("d", Bytes(1 << 20), &l, 1 << 20).unwrap();
        assert_eq!(p.params.basic.max_sectors, 256);
        let p = compute("d", Bytes(1 << 20), &lim(), 64 << 10).unwrap();
        assert_eq!(p.params.basic.max_sectors, 128);
    }

    #[test]
    fn no_discard_and_no_native_zeroes_means_no_discard_block() {
        let mut l = lim();
        l.discard_granularity = 0;
        l.write_zeroes = false;
        let p = compute("d", Bytes(1 << 20), &l, 1 << 20).unwrap();
        assert_eq!(p.params.types, sys::UBLK_PARAM_TYPE_BASIC);
    }

    #[test]
    fn write_zeroes_without_discard_keeps_discard_off() {
        let mut l = lim();
        l.discard_granularity = 0;
        let p = compute("d", Bytes(1 << 20), &l, 1 << 20).unwrap();
        assert_ne!(p.params.types & sys::UBLK_PARAM_TYPE_DISCARD, 0);
        assert_eq!(p.params.discard.max_discard_sectors, 0);
        assert_eq!(p.params.discard.discard_granularity, 512);
        assert!(p.params.discard.max_write_zeroes_sectors > 0);
    }

    #[test]
    fn read_only_has_attribute_and_no_discard() {
        let mut l = lim();
        l.read_only = true;
        let p = compute("d", Bytes(1 << 20), &l, 1 << 20).unwrap();
        assert_ne!(p.params.basic.attrs & sys::UBLK_ATTR_READ_ONLY, 0);
        assert_eq!(p.params.types, sys::UBLK_PARAM_TYPE_BASIC);
    }

    #[test]
    fn no_cache_means_no_fua() {
        let mut l = lim();
        l.volatile_cache = false;
        let p = compute("d", Bytes(1 << 20), &l, 1 << 20).unwrap();
        assert_eq!(p.params.basic.attrs, 0);
        l.volatile_cache = true;
        l.fua = false;
        let p = compute("d", Bytes(1 << 20), &l, 1 << 20).unwrap();
        assert_eq!(p.params.basic.attrs, sys::UBLK_ATTR_VOLATILE_CACHE);
    }

    #[test]
    fn io_opt_powers_of_two_and_stripe_widths() {
        let mut l = lim();
        l.io_opt = 256 << 10;
        let p = compute("d", Bytes(1 << 20), &l, 1 << 20).unwrap();
        assert_eq!(p.params.basic.io_opt_shift, 18);
        // 3 legs x 64 KiB: ublk cannot say 192 KiB; the chunk size is the honest hint.
        l.io_opt = 3 * (64 << 10);
        let p = compute("d", Bytes(1 << 20), &l, 1 << 20).unwrap();
        assert_eq!(p.params.basic.io_opt_shift, 16);
        // Never below the physical block size.
        l.io_opt = 3 * 512;
        let p = compute("d", Bytes(1 << 20), &l, 1 << 20).unwrap();
        assert_eq!(p.params.basic.io_opt_shift, 12);
    }

    #[test]
    fn block_size_4k() {
        let mut l = lim();
        l.logical_block_size = 4096;
        l.discard_granularity = 4096;
        let p = compute("d", Bytes((1 << 20) + 1000), &l, 1 << 20).unwrap();
        assert_eq!(p.params.basic.logical_bs_shift, 12);
        assert_eq!(p.params.basic.physical_bs_shift, 12);
        assert_eq!(p.params.basic.dev_sectors, (1 << 20) >> 9);
        assert_eq!(p.dropped_tail, Bytes(1000));
    }

    #[test]
    fn bad_limits_are_named() {
        let mut l = lim();
        l.logical_block_size = 8192;
        l.physical_block_size = 8192;
        let e = compute("vol0", Bytes(1 << 20), &l, 1 << 20).unwrap_err();
        assert_eq!(e.field, "logical_block_size");
        assert!(e.to_string().contains("vol0"), "{e}");

        let mut l = lim();
        l.logical_block_size = 1000;
        assert_eq!(
            compute("d", Bytes(1 << 20), &l, 1 << 20).unwrap_err().field,
            "logical_block_size"
        );

        let mut l = lim();
        l.logical_block_size = 4096;
        l.physical_block_size = 512;
        assert_eq!(
            compute("d", Bytes(1 << 20), &l, 1 << 20).unwrap_err().field,
            "physical_block_size"
        );

        let mut l = lim();
        l.discard_granularity = 1000;
        assert_eq!(
            compute("d", Bytes(1 << 20), &l, 1 << 20).unwrap_err().field,
            "discard_granularity"
        );

        assert_eq!(
            compute("d", Bytes(100), &lim(), 1 << 20).unwrap_err().field,
            "size"
        );
        let mut l = lim();
        l.logical_block_size = 4096;
        assert_eq!(
            compute("d", Bytes(1 << 20), &l, 2048).unwrap_err().field,
            "max_io"
        );
    }

    #[test]
    fn physical_zero_means_logical() {
        let mut l = lim();
        l.physical_block_size = 0;
        let p = compute("d", Bytes(1 << 20), &l, 1 << 20).unwrap();
        assert_eq!(p.params.basic.physical_bs_shift, 9);
    }
}
