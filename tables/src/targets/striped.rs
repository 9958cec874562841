//! `striped <#stripes> <chunk_sectors> <dev1> <off1> ... <devN> <offN>`: RAID-0 placement
//! exactly as dm-stripe computes it.
//!
//! For a segment-relative sector `s`: `chunk = s / chunk_size`, `stripe = chunk % N`,
//! `chunk_on_dev = chunk / N`, and the sector on leg `stripe` is
//! `off_stripe + chunk_on_dev * chunk_size + s % chunk_size`. A request that spans chunks is
//! split at chunk boundaries and the pieces go to their legs concurrently.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::io::{
    check_range, copy_mapped_pieces, join_pieces, join_served, ready, BlockDevice, DeviceRef,
    FixedBuf, IoError, IoFuture, Limits, MappedCopy, Served, WriteFlags,
};
use crate::registry::{ArgError, BuildCtx, TargetKind};
use crate::units::{Bytes, Sectors, SECTOR_SIZE};

use super::common::{
    arg, arg_offset, arg_u64, at_least, check_fits, instance_name, norm_num, open,
};

const USAGE: &str = "striped <#stripes> <chunk_sectors> <dev1> <offset1> ... <devN> <offsetN>";

/// Smallest chunk accepted, in sectors (one 4 KiB page, as dm-stripe effectively needs).
pub const MIN_CHUNK: Sectors = Sectors(8);

/// The `striped` target kind.
pub struct StripedKind;

/// Checked arguments of a striped line.
struct StripedArgs {
    stripes: u64,
    chunk: Sectors,
    offsets: Vec<Sectors>,
}

fn parse(len: Sectors, args: &[String]) -> Result<StripedArgs, ArgError> {
    at_least(args, 2, USAGE)?;
    let stripes = arg_u64(args, 1)?;
    if stripes == 0 {
        return Err(ArgError::at(1, "the stripe count must be at least 1"));
    }
    let chunk = arg_u64(args, 2)?;
    if !chunk.is_power_of_two() {
        return Err(ArgError::at(2, format!("{chunk} is not a power of two")));
    }
    if chunk < MIN_CHUNK.0 {
        return Err(ArgError::at(
            2,
            format!("{chunk} sectors is below the minimum chunk size of {MIN_CHUNK} sectors"),
        ));
    }
    let pairs = args.len() - 2;
    let want = stripes.checked_mul(2);
    match want {
        Some(w) if (pairs as u64) < w => {
            return Err(ArgError::at(
                args.len() + 1,
                format!(
                    "missing: {stripes} stripes need {stripes} device/offset pairs, {} argument(s) given after the chunk size",
                    pairs
                ),
            ))
        }
        None => {
            return Err(ArgError::at(
                1,
                format!("{stripes} stripes is more than the line could list"),
            ))
        }
        Some(w) if (pairs as u64) > w => {
            let first_extra = 2 + w as usize + 1;
            return Err(ArgError::at(
                first_extra,
                format!(
                    "unexpected argument '{}': {stripes} stripes take {w} device/offset arguments, {pairs} given",
                    args[first_extra - 1]
                ),
            ));
        }
        Some(_) => {}
    }
    let width = stripes.checked_mul(chunk);
    match width {
        Some(w) if len.0.is_multiple_of(w) => {}
        _ => {
            return Err(ArgError::whole(format!(
            "segment length {len} is not a multiple of #stripes × chunk size = {stripes} × {chunk}"
        )))
        }
    }
    let per_leg = Sectors(len.0 / stripes);
    let mut offsets = Vec::with_capacity(stripes as usize);
    for k in 0..stripes as usize {
        arg(args, 3 + 2 * k)?;
        offsets.push(arg_offset(args, 4 + 2 * k, per_leg)?);
    }
    Ok(StripedArgs {
        stripes,
        chunk: Sectors(chunk),
        offsets,
    })
}

impl TargetKind for StripedKind {
    fn name(&self) -> &'static str {
        "striped"
    }
    fn device_args(&self, args: &[String]) -> Vec<usize> {
        // `#stripes chunk dev0 off0 dev1 off1 ...`
        (2..args.len()).step_by(2).collect()
    }
    fn validate(&self, len: Sectors, args: &[String]) -> Result<(), ArgError> {
        parse(len, args).map(|_| ())
    }
    fn normalize(&self, args: &[String]) -> Vec<String> {
        args.iter()
            .enumerate()
            .map(|(i, a)| {
                // Numbers at 1, 2 and every offset (even 1-based positions from 4).
                if i < 2 || (i >= 3 && i % 2 == 1) {
                    norm_num(a)
                } else {
                    a.clone()
                }
            })
            .collect()
    }
    fn arg_name(&self, args: &[String], arg: usize) -> Option<String> {
        let stripes = args
            .first()
            .and_then(|s| crate::table::parse_decimal(s).ok());
        if let Some(n) = stripes {
            if arg as u64 > n.saturating_mul(2).saturating_add(2) {
                return None; // past the last device/offset pair
            }
        }
        match arg {
            0 => None,
            1 => Some("stripe count".into()),
            2 => Some("chunk size".into()),
            n if n % 2 == 1 => Some(format!("stripe {} device", (n - 3) / 2)),
            n => Some(format!("stripe {} offset", (n - 4) / 2)),
        }
    }
    fn build(&self, ctx: &BuildCtx<'_>, args: &[String]) -> Result<DeviceRef, ArgError> {
        let p = parse(ctx.len, args)?;
        let per_leg = Sectors(ctx.len.0 / p.stripes);
        let mut legs = Vec::with_capacity(p.offsets.len());
        for (k, off) in p.offsets.iter().enumerate() {
            let dev = open(ctx, args, 3 + 2 * k)?;
            check_fits(&dev, args, 3 + 2 * k, *off, per_leg)?;
            legs.push(StripeLeg {
                label: args[2 + 2 * k].clone(),
                dev,
                offset: *off,
            });
        }
        Striped::new(instance_name("striped", ctx.line), legs, p.chunk, ctx.len)
            .map(|s| Arc::new(s) as DeviceRef)
            .map_err(ArgError::whole)
    }
}

/// One leg of a striped device.
pub struct StripeLeg {
    /// How the table named it (for status lines).
    pub label: String,
    /// The device.
    pub dev: DeviceRef,
    /// First sector used on the device.
    pub offset: Sectors,
}

struct Leg {
    label: String,
    dev: DeviceRef,
    offset: u64,
    errors: AtomicU64,
}

/// A striped (RAID-0) device over N legs.
pub struct Striped {
    name: String,
    legs: Vec<Leg>,
    /// Chunk size in bytes.
    chunk: u64,
    size: Bytes,
}

impl Striped {
    /// Stripes `len` sectors over `legs` in chunks of `chunk` sectors. `len` must be a multiple
    /// of legs × chunk, chunk a power of two of at least [`MIN_CHUNK`], and each leg must
    /// hold its offset plus `len / legs` sectors (so no placement can overflow).
    pub fn new(
        name: impl Into<String>,
        legs: Vec<StripeLeg>,
        chunk: Sectors,
        len: Sectors,
    ) -> Result<Striped, String> {
        let n = legs.len() as u64;
        if n == 0 {
            return Err("no stripes".into());
        }
        if !chunk.0.is_power_of_two() || chunk < MIN_CHUNK {
            return Err(format!("bad chunk size {chunk}"));
        }
        let (Some(chunk_b), Some(size)) = (
            chunk.0.checked_mul(SECTOR_SIZE),
            len.0.checked_mul(SECTOR_SIZE),
        ) else {
            return Err(format!(
                "chunk {chunk} or length {len} overflows 64 bits in bytes"
            ));
        };
        match n.checked_mul(chunk.0) {
            Some(w) if len.0.is_multiple_of(w) => {}
            _ => {
                return Err(format!(
                    "length {len} is not a multiple of {n} stripes × {chunk} sectors"
                ))
            }
        }
        let per_leg = len.0 / n;
        let mut out = Vec::with_capacity(legs.len());
        for (i, l) in legs.into_iter().enumerate() {
            let need = l
                .offset
                .0
                .checked_add(per_leg)
                .and_then(|s| s.checked_mul(SECTOR_SIZE));
            match need {
                Some(b) if b <= l.dev.size().0 => {}
                _ => {
                    return Err(format!(
                        "stripe {i} ({}) is {} bytes, too small for offset {} + {per_leg} sectors",
                        l.label,
                        l.dev.size().0,
                        l.offset
                    ))
                }
            }
            out.push(Leg {
                label: l.label,
                dev: l.dev,
                offset: l.offset.0 * SECTOR_SIZE,
                errors: AtomicU64::new(0),
            });
        }
        Ok(Striped {
            name: name.into(),
            legs: out,
            chunk: chunk_b,
            size: Bytes(size),
        })
    }

    /// Where byte `pos` of the device lives: (leg, byte on that leg, bytes left in the chunk).
    fn locate(&self, pos: u64) -> (usize, u64, u64) {
        let n = self.legs.len() as u64;
        let chunk = pos / self.chunk;
        let within = pos % self.chunk;
        let stripe = chunk % n;
        let chunk_on_dev = chunk / n;
        (
            stripe as usize,
            self.legs[stripe as usize].offset + chunk_on_dev * self.chunk + within,
            self.chunk - within,
        )
    }

    /// The byte on leg `i` (relative to its offset) where the leg's share of the striped range
    /// starting (or ending) at `pos` begins (ends): dm-stripe's range mapping for discards.
    fn leg_bound(&self, i: u64, pos: u64) -> u64 {
        let n = self.legs.len() as u64;
        let chunk = pos / self.chunk;
        let within = pos % self.chunk;
        let row = chunk / n;
        let stripe = chunk % n;
        match stripe.cmp(&i) {
            std::cmp::Ordering::Equal => row * self.chunk + within,
            std::cmp::Ordering::Greater => (row + 1) * self.chunk,
            std::cmp::Ordering::Less => row * self.chunk,
        }
    }

    fn leg_err(&self, i: usize, e: IoError) -> IoError {
        self.legs[i].errors.fetch_add(1, Ordering::Relaxed);
        e.context(format_args!(
            "{} stripe {} ({})",
            self.name, i, self.legs[i].label
        ))
    }

    /// Runs a ranged operation (discard or write-zeroes) as one contiguous range per leg.
    fn ranged<'a>(
        &'a self,
        offset: Bytes,
        len: Bytes,
        op: impl Fn(&'a DeviceRef, Bytes, Bytes) -> IoFuture<'a>,
    ) -> IoFuture<'a> {
        if let Err(e) = check_range(&self.name, self.size, offset, len) {
            return ready(Err(e));
        }
        let (start, end) = (offset.0, offset.0 + len.0);
        let mut futs: Vec<IoFuture<'a>> = Vec::new();
        for (i, leg) in self.legs.iter().enumerate() {
            let s = self.leg_bound(i as u64, start);
            let e = self.leg_bound(i as u64, end);
            if e > s {
                let f = op(&leg.dev, Bytes(leg.offset + s), Bytes(e - s));
                futs.push(Box::pin(
                    async move { f.await.map_err(|x| self.leg_err(i, x)) },
                ));
            }
        }
        join_pieces(futs)
    }
}

impl Striped {
    /// A fixed-buffer read or write split into chunk pieces, as `read` and `write` split.
    fn fixed<'a>(
        &'a self,
        offset: Bytes,
        buf: FixedBuf,
        op: impl Fn(&'a DeviceRef, Bytes, FixedBuf) -> IoFuture<'a, Served>,
    ) -> IoFuture<'a, Served> {
        if let Err(e) = check_range(&self.name, self.size, offset, Bytes(buf.len as u64)) {
            return ready(Err(e));
        }
        let mut futs: Vec<IoFuture<'a, Served>> = Vec::new();
        let mut at = 0usize;
        while at < buf.len {
            let (i, dev_off, room) = self.locate(offset.0 + at as u64);
            let n = room.min((buf.len - at) as u64) as usize;
            let f = op(&self.legs[i].dev, Bytes(dev_off), buf.slice(at, n));
            at += n;
            futs.push(Box::pin(
                async move { f.await.map_err(|e| self.leg_err(i, e)) },
            ));
        }
        join_served(futs)
    }
}

impl BlockDevice for Striped {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn size(&self) -> Bytes {
        self.size
    }
    fn limits(&self) -> Limits {
        let mut l = self.legs[0].dev.limits();
        for leg in &self.legs[1..] {
            l = l.stack(&leg.dev.limits());
        }
        let width = self.chunk.saturating_mul(self.legs.len() as u64);
        l.io_opt = u32::try_from(width).unwrap_or(0);
        l
    }
    unsafe fn read<'a>(&'a self, offset: Bytes, buf: &'a mut [u8]) -> IoFuture<'a> {
        if let Err(e) = check_range(&self.name, self.size, offset, Bytes(buf.len() as u64)) {
            return ready(Err(e));
        }
        let mut futs: Vec<IoFuture<'a>> = Vec::new();
        let mut rest: &'a mut [u8] = buf;
        let mut pos = offset.0;
        while !rest.is_empty() {
            let (i, dev_off, room) = self.locate(pos);
            let n = room.min(rest.len() as u64) as usize;
            let (piece, tail) = std::mem::take(&mut rest).split_at_mut(n);
            rest = tail;
            pos += n as u64;
            let f = self.legs[i].dev.read(Bytes(dev_off), piece);
            futs.push(Box::pin(
                async move { f.await.map_err(|e| self.leg_err(i, e)) },
            ));
        }
        join_pieces(futs)
    }
    unsafe fn write<'a>(&'a self, offset: Bytes, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a> {
        if let Err(e) = check_range(&self.name, self.size, offset, Bytes(buf.len() as u64)) {
            return ready(Err(e));
        }
        let mut futs: Vec<IoFuture<'a>> = Vec::new();
        let mut rest: &'a [u8] = buf;
        let mut pos = offset.0;
        while !rest.is_empty() {
            let (i, dev_off, room) = self.locate(pos);
            let n = room.min(rest.len() as u64) as usize;
            let (piece, tail) = rest.split_at(n);
            rest = tail;
            pos += n as u64;
            let f = self.legs[i].dev.write(Bytes(dev_off), piece, flags);
            futs.push(Box::pin(
                async move { f.await.map_err(|e| self.leg_err(i, e)) },
            ));
        }
        join_pieces(futs)
    }
    fn read_fixed(&self, offset: Bytes, buf: FixedBuf) -> IoFuture<'_, Served> {
        self.fixed(offset, buf, |d, o, b| d.read_fixed(o, b))
    }
    fn copy_mapped<'a>(
        &'a self,
        offset: Bytes,
        len: usize,
        write: Option<WriteFlags>,
        copy: MappedCopy<'a>,
    ) -> IoFuture<'a, Served> {
        Box::pin(async move {
            check_range(&self.name, self.size, offset, Bytes(len as u64))?;
            let mut pieces = Vec::new();
            let mut at = 0usize;
            while at < len {
                let (i, dev_off, room) = self.locate(offset.0 + at as u64);
                let n = room.min((len - at) as u64) as usize;
                pieces.push((i, &self.legs[i].dev, Bytes(dev_off), n));
                at += n;
            }
            copy_mapped_pieces(pieces, write, copy, |i, _, e| self.leg_err(i, e)).await
        })
    }
    fn write_fixed(&self, offset: Bytes, buf: FixedBuf, flags: WriteFlags) -> IoFuture<'_, Served> {
        self.fixed(offset, buf, move |d, o, b| d.write_fixed(o, b, flags))
    }
    fn flush(&self) -> IoFuture<'_> {
        let futs: Vec<IoFuture<'_>> = self
            .legs
            .iter()
            .enumerate()
            .map(|(i, leg)| {
                let f = leg.dev.flush();
                Box::pin(async move { f.await.map_err(|e| self.leg_err(i, e)) }) as IoFuture<'_>
            })
            .collect();
        join_pieces(futs)
    }
    fn discard(&self, offset: Bytes, len: Bytes) -> IoFuture<'_> {
        self.ranged(offset, len, |d, o, l| d.discard(o, l))
    }
    fn write_zeroes(&self, offset: Bytes, len: Bytes, flags: WriteFlags) -> IoFuture<'_> {
        self.ranged(offset, len, move |d, o, l| d.write_zeroes(o, l, flags))
    }
    /// dm-stripe's status: `<#stripes> <dev>... 1 <A|D per leg>` (D once a leg has failed I/O).
    fn status(&self) -> String {
        let mut s = format!("{}", self.legs.len());
        for l in &self.legs {
            s.push(' ');
            s.push_str(&l.label);
        }
        s.push_str(" 1 ");
        for l in &self.legs {
            s.push(if l.errors.load(Ordering::Relaxed) > 0 {
                'D'
            } else {
                'A'
            });
        }
        s
    }
}
