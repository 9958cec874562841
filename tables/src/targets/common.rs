//! Argument helpers shared by the built-in targets.

use crate::io::{DeviceRef, IoError, IoResult};
use crate::registry::{ArgError, BuildCtx};
use crate::table::parse_decimal;
use crate::units::{Bytes, Sectors};

/// Argument `i` (1-based) as an unsigned 64-bit number.
pub(crate) fn arg_u64(args: &[String], i: usize) -> Result<u64, ArgError> {
    let s = arg(args, i)?;
    parse_decimal(s).map_err(|m| ArgError::at(i, m))
}

/// Argument `i` (1-based) as a number in `min..=max` (the kernel's `dm_read_arg` ranges).
pub(crate) fn arg_range(args: &[String], i: usize, min: u64, max: u64) -> Result<u64, ArgError> {
    let v = arg_u64(args, i)?;
    if v < min || v > max {
        return Err(ArgError::at(
            i,
            format!("{v} is out of range ({min}..={max})"),
        ));
    }
    Ok(v)
}

/// Argument `i` (1-based), or a "missing" error naming it.
pub(crate) fn arg(args: &[String], i: usize) -> Result<&str, ArgError> {
    args.get(i - 1)
        .map(|s| s.as_str())
        .ok_or_else(|| ArgError::at(i, "missing"))
}

/// Rejects arguments past `max` (1-based count).
pub(crate) fn no_more(args: &[String], max: usize, usage: &str) -> Result<(), ArgError> {
    match args.get(max) {
        Some(a) => Err(ArgError::at(
            max + 1,
            format!(
                "unexpected argument '{a}' ({} argument(s) given; usage: {usage})",
                args.len()
            ),
        )),
        None => Ok(()),
    }
}

/// Missing-argument check with usage text: the first missing argument is reported.
pub(crate) fn at_least(args: &[String], min: usize, usage: &str) -> Result<(), ArgError> {
    if args.len() < min {
        return Err(ArgError::at(
            args.len() + 1,
            format!("missing ({} argument(s) given; usage: {usage})", args.len()),
        ));
    }
    Ok(())
}

/// A device offset argument: a sector number such that `offset + len` fits.
pub(crate) fn arg_offset(args: &[String], i: usize, len: Sectors) -> Result<Sectors, ArgError> {
    let v = arg_u64(args, i)?;
    match v.checked_add(len.0).and_then(|e| e.checked_mul(512)) {
        Some(_) => Ok(Sectors(v)),
        None => Err(ArgError::at(
            i,
            format!("offset {v} + segment length {len} overflows"),
        )),
    }
}

/// Canonical printed form of a validated number (drops leading zeros).
pub(crate) fn norm_num(s: &str) -> String {
    parse_decimal(s)
        .map(|v| v.to_string())
        .unwrap_or_else(|_| s.to_string())
}

/// Opens the device named by argument `i`.
pub(crate) fn open(ctx: &BuildCtx<'_>, args: &[String], i: usize) -> Result<DeviceRef, ArgError> {
    let name = arg(args, i)?;
    ctx.resolver
        .open(name)
        .map_err(|e| ArgError::at(i, format!("cannot open device '{name}': {e}")))
}

/// Checks that `dev` (named by argument `i`) holds `offset + len` sectors.
pub(crate) fn check_fits(
    dev: &DeviceRef,
    args: &[String],
    i: usize,
    offset: Sectors,
    len: Sectors,
) -> Result<(), ArgError> {
    let have = dev.size().sectors_floor();
    let need = offset.0.saturating_add(len.0);
    if have.0 < need {
        return Err(ArgError::at(
            i,
            format!(
                "device '{}' ({}) is too small: it has {} sectors, the segment needs offset {} + length {} = {} sectors",
                args.get(i - 1).map(|s| s.as_str()).unwrap_or("?"),
                dev.name(),
                have,
                offset,
                len,
                need
            ),
        ));
    }
    Ok(())
}

/// Name of a target instance for messages: `linear@line3`.
pub(crate) fn instance_name(kind: &str, line: usize) -> String {
    format!("{kind}@line{line}")
}

/// `base + off` on a lower device, or an error naming `name` if it does not fit in 64 bits.
pub(crate) fn shift(name: &str, base: Bytes, off: Bytes) -> IoResult<Bytes> {
    base.checked_add(off).ok_or_else(|| {
        IoError::invalid(format!(
            "{name}: byte {} past the device offset {} overflows 64 bits",
            off.0, base.0
        ))
    })
}
