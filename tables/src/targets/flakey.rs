//! `flakey <dev> <offset> <up interval> <down interval> [<num_features> [<feature args>...]]`:
//! a linear mapping that misbehaves periodically, as dm-flakey.
//!
//! From target creation the device is up for `up` seconds, then down for `down` seconds, and
//! the cycle repeats (`up = 0` means always down, `down = 0` always up). While down:
//! - with no features (or none that changes behaviour) every read and write fails (EIO);
//! - `error_reads`: reads fail; `drop_writes`: writes are silently dropped (reported as done);
//!   `error_writes`: writes fail;
//! - `corrupt_bio_byte <Nth> <r|w> <value> <flags>`: byte N (1-based) of each matching request
//!   is replaced with `value` (reads after they complete, writes before they are issued, on a
//!   copy so the caller's buffer is untouched);
//! - `random_read_corrupt <p>` / `random_write_corrupt <p>`: with probability p / 1e9 one
//!   random byte of the request gets a random value.
//!
//! Discards and write-zeroes are writes without data: dropped or failed like writes.
//! Flushes always pass through. Requests carry no kernel bio flags here, so a
//! `corrupt_bio_byte` flags mask of 0 matches every request and any other mask matches none.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::io::{
    check_range, ready, BlockDevice, DeviceRef, IoError, IoFuture, Limits, WriteFlags,
};
use crate::registry::{ArgError, BuildCtx, TargetKind};
use crate::units::{Bytes, Sectors};

use super::common::{arg, arg_offset, arg_range, at_least, check_fits, instance_name, open, shift};

const USAGE: &str =
    "flakey <device> <offset> <up interval> <down interval> [<num_features> [<feature arguments>]]";

/// dm-flakey's probability unit: 1000000000 means always.
pub const PROBABILITY_BASE: u32 = 1_000_000_000;

/// Most feature words a line may carry (as the kernel).
pub const MAX_FEATURE_ARGS: u64 = 11;

const FEATURES: &str =
    "error_reads, drop_writes, error_writes, corrupt_bio_byte, random_read_corrupt, random_write_corrupt";

/// Which requests `corrupt_bio_byte` corrupts.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Reads (`r`).
    Read,
    /// Writes (`w`).
    Write,
}

/// `corrupt_bio_byte <Nth_byte> <direction> <value> <flags>`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct CorruptBioByte {
    /// 1-based byte of the request to replace.
    pub nth: u32,
    /// Reads or writes.
    pub dir: Direction,
    /// Value written into the byte.
    pub value: u8,
    /// Bio flags mask the request must carry (0: every request).
    pub flags: u32,
}

/// The effective configuration of a flakey line (what `dmsetup table` prints back).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlakeyConfig {
    /// First sector used on the device.
    pub offset: Sectors,
    /// Seconds up per cycle.
    pub up: u32,
    /// Seconds down per cycle.
    pub down: u32,
    /// Reads fail while down.
    pub error_reads: bool,
    /// Writes are dropped while down.
    pub drop_writes: bool,
    /// Writes fail while down.
    pub error_writes: bool,
    /// Fixed-byte corruption while down.
    pub corrupt: Option<CorruptBioByte>,
    /// Random read corruption probability (of [`PROBABILITY_BASE`]).
    pub random_read_corrupt: u32,
    /// Random write corruption probability (of [`PROBABILITY_BASE`]).
    pub random_write_corrupt: u32,
}

impl FlakeyConfig {
    /// Parses a flakey argument list (argument 1, the device, is not interpreted).
    pub fn parse(len: Sectors, args: &[String]) -> Result<FlakeyConfig, ArgError> {
        at_least(args, 4, USAGE)?;
        let offset = arg_offset(args, 2, len)?;
        let up = arg_range(args, 3, 0, u32::MAX as u64)?;
        let down = arg_range(args, 4, 0, u32::MAX as u64)?;
        if up + down == 0 {
            return Err(ArgError::at(4, "total (up + down) interval is zero"));
        }
        if up + down > u32::MAX as u64 {
            return Err(ArgError::at(4, "up + down interval overflows 32 bits"));
        }
        let mut c = FlakeyConfig {
            offset,
            up: up as u32,
            down: down as u32,
            error_reads: false,
            drop_writes: false,
            error_writes: false,
            corrupt: None,
            random_read_corrupt: 0,
            random_write_corrupt: 0,
        };
        if args.len() > 4 {
            let n = arg_range(args, 5, 0, MAX_FEATURE_ARGS)? as usize;
            let avail = args.len() - 5;
            if n > avail {
                return Err(ArgError::at(
                    args.len() + 1,
                    format!("missing: the feature count is {n} but only {avail} feature argument(s) follow"),
                ));
            }
            if avail > n {
                return Err(ArgError::at(
                    5 + n + 1,
                    format!(
                        "unexpected argument '{}' after the {n} feature argument(s) the count announces",
                        args[5 + n]
                    ),
                ));
            }
            c.parse_features(args, 6, 5 + n)?;
        }
        let any = c.error_reads
            || c.drop_writes
            || c.error_writes
            || c.corrupt.is_some()
            || c.random_read_corrupt > 0
            || c.random_write_corrupt > 0;
        if !any {
            // The kernel's default: while down, every I/O fails.
            c.error_reads = true;
            c.error_writes = true;
        }
        Ok(c)
    }

    /// Parses feature words `first..=last` (1-based argument positions).
    fn parse_features(
        &mut self,
        args: &[String],
        first: usize,
        last: usize,
    ) -> Result<(), ArgError> {
        let mut i = first;
        let mut seen_rr = false;
        let mut seen_rw = false;
        while i <= last {
            let word = arg(args, i)?.to_ascii_lowercase();
            let left = last - i; // parameters available to this feature within the group
            let dup = || ArgError::at(i, format!("feature {word} duplicated"));
            match word.as_str() {
                "error_reads" => {
                    if self.error_reads {
                        return Err(dup());
                    }
                    self.error_reads = true;
                }
                "drop_writes" => {
                    if self.drop_writes {
                        return Err(dup());
                    }
                    if self.error_writes {
                        return Err(ArgError::at(
                            i,
                            "feature drop_writes conflicts with feature error_writes",
                        ));
                    }
                    self.drop_writes = true;
                }
                "error_writes" => {
                    if self.error_writes {
                        return Err(dup());
                    }
                    if self.drop_writes {
                        return Err(ArgError::at(
                            i,
                            "feature error_writes conflicts with feature drop_writes",
                        ));
                    }
                    self.error_writes = true;
                }
                "corrupt_bio_byte" => {
                    if self.corrupt.is_some() {
                        return Err(dup());
                    }
                    if left < 4 {
                        return Err(ArgError::at(
                            i,
                            format!("corrupt_bio_byte needs 4 parameters (<Nth_byte> <direction> <value> <flags>), the feature count leaves {left}"),
                        ));
                    }
                    let nth = arg_range(args, i + 1, 1, u32::MAX as u64)? as u32;
                    let d = arg(args, i + 2)?;
                    let dir = match d.to_ascii_lowercase().as_str() {
                        "r" => Direction::Read,
                        "w" => Direction::Write,
                        _ => {
                            return Err(ArgError::at(
                                i + 2,
                                format!("invalid corrupt bio direction '{d}' (r or w)"),
                            ))
                        }
                    };
                    let value = arg_range(args, i + 3, 0, 255)? as u8;
                    let flags = arg_range(args, i + 4, 0, u32::MAX as u64)? as u32;
                    self.corrupt = Some(CorruptBioByte {
                        nth,
                        dir,
                        value,
                        flags,
                    });
                    i += 4;
                }
                "random_read_corrupt" | "random_write_corrupt" => {
                    let read = word == "random_read_corrupt";
                    let seen = if read { &mut seen_rr } else { &mut seen_rw };
                    if *seen {
                        return Err(dup());
                    }
                    *seen = true;
                    if left < 1 {
                        return Err(ArgError::at(
                            i,
                            format!("{word} needs a probability parameter, the feature count leaves none"),
                        ));
                    }
                    let p = arg_range(args, i + 1, 0, PROBABILITY_BASE as u64)? as u32;
                    if read {
                        self.random_read_corrupt = p;
                    } else {
                        self.random_write_corrupt = p;
                    }
                    i += 1;
                }
                _ => {
                    return Err(ArgError::at(
                        i,
                        format!(
                            "unknown flakey feature '{}' (known: {FEATURES})",
                            args[i - 1]
                        ),
                    ))
                }
            }
            i += 1;
        }
        let cw = matches!(self.corrupt, Some(c) if c.dir == Direction::Write);
        let cr = matches!(self.corrupt, Some(c) if c.dir == Direction::Read);
        if self.drop_writes && (cw || self.random_write_corrupt > 0) {
            return Err(ArgError::whole(
                "drop_writes is incompatible with random_write_corrupt or corrupt_bio_byte with direction w",
            ));
        }
        if self.error_writes && (cw || self.random_write_corrupt > 0) {
            return Err(ArgError::whole(
                "error_writes is incompatible with random_write_corrupt or corrupt_bio_byte with direction w",
            ));
        }
        if self.error_reads && (cr || self.random_read_corrupt > 0) {
            return Err(ArgError::whole(
                "error_reads is incompatible with random_read_corrupt or corrupt_bio_byte with direction r",
            ));
        }
        Ok(())
    }

    /// The arguments after the device, as dm-flakey prints its table line.
    pub fn to_args(&self) -> Vec<String> {
        let mut feats: Vec<String> = Vec::new();
        if self.error_reads {
            feats.push("error_reads".into());
        }
        if self.drop_writes {
            feats.push("drop_writes".into());
        } else if self.error_writes {
            feats.push("error_writes".into());
        }
        if let Some(c) = self.corrupt {
            feats.push("corrupt_bio_byte".into());
            feats.push(c.nth.to_string());
            feats.push(if c.dir == Direction::Write { "w" } else { "r" }.into());
            feats.push(c.value.to_string());
            feats.push(c.flags.to_string());
        }
        if self.random_read_corrupt > 0 {
            feats.push("random_read_corrupt".into());
            feats.push(self.random_read_corrupt.to_string());
        }
        if self.random_write_corrupt > 0 {
            feats.push("random_write_corrupt".into());
            feats.push(self.random_write_corrupt.to_string());
        }
        let mut v = vec![
            self.offset.to_string(),
            self.up.to_string(),
            self.down.to_string(),
            feats.len().to_string(),
        ];
        v.extend(feats);
        v
    }
}

/// The `flakey` target kind.
pub struct FlakeyKind;

impl TargetKind for FlakeyKind {
    fn name(&self) -> &'static str {
        "flakey"
    }
    fn device_args(&self, _args: &[String]) -> Vec<usize> {
        vec![0]
    }
    fn validate(&self, len: Sectors, args: &[String]) -> Result<(), ArgError> {
        FlakeyConfig::parse(len, args).map(|_| ())
    }
    fn normalize(&self, args: &[String]) -> Vec<String> {
        // Called on validated arguments; the length does not affect the printed form.
        match FlakeyConfig::parse(Sectors(0), args) {
            Ok(c) => {
                let mut v = vec![args[0].clone()];
                v.extend(c.to_args());
                v
            }
            Err(_) => args.to_vec(),
        }
    }
    fn arg_name(&self, args: &[String], arg: usize) -> Option<String> {
        let fixed = [
            "device",
            "offset",
            "up interval",
            "down interval",
            "feature count",
        ];
        if (1..=5).contains(&arg) {
            return Some(fixed[arg - 1].into());
        }
        // Walk the feature words so parameters are named after their feature.
        let mut i = 6;
        while i <= args.len().max(arg) {
            let word = args
                .get(i - 1)
                .map(|s| s.to_ascii_lowercase())
                .unwrap_or_default();
            let params: &[&str] = match word.as_str() {
                "corrupt_bio_byte" => &["Nth byte", "direction", "value", "flags"],
                "random_read_corrupt" | "random_write_corrupt" => &["probability"],
                _ => &[],
            };
            if arg == i {
                return Some("feature".into());
            }
            if arg > i && arg <= i + params.len() {
                return Some(format!("{word} {}", params[arg - i - 1]));
            }
            i += 1 + params.len();
        }
        None
    }
    fn build(&self, ctx: &BuildCtx<'_>, args: &[String]) -> Result<DeviceRef, ArgError> {
        let cfg = FlakeyConfig::parse(ctx.len, args)?;
        let dev = open(ctx, args, 1)?;
        check_fits(&dev, args, 1, cfg.offset, ctx.len)?;
        Ok(Arc::new(Flakey::new(
            instance_name("flakey", ctx.line),
            dev,
            cfg,
            ctx.len,
        )))
    }
}

/// A flakey device.
pub struct Flakey {
    name: String,
    dev: DeviceRef,
    cfg: FlakeyConfig,
    offset: Bytes,
    size: Bytes,
    start: Instant,
    rng: AtomicU64,
}

impl Flakey {
    /// A flakey window of `len` sectors over `dev`; the up/down clock starts now.
    pub fn new(name: impl Into<String>, dev: DeviceRef, cfg: FlakeyConfig, len: Sectors) -> Flakey {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x1234_5678);
        Flakey {
            name: name.into(),
            dev,
            offset: cfg.offset.bytes(),
            cfg,
            size: len.bytes(),
            start: Instant::now(),
            rng: AtomicU64::new(seed),
        }
    }

    /// The effective configuration.
    pub fn config(&self) -> &FlakeyConfig {
        &self.cfg
    }

    /// Whether the device is in a down period now.
    pub fn is_down(&self) -> bool {
        let cycle = self.cfg.up as u64 + self.cfg.down as u64;
        if cycle == 0 {
            return false;
        }
        self.start.elapsed().as_secs() % cycle >= self.cfg.up as u64
    }

    /// splitmix64 over a shared counter: cheap, lock-free, good enough for fault injection.
    fn random(&self) -> u64 {
        let mut z = self
            .rng
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn roll(&self, p: u32) -> bool {
        p > 0 && ((self.random() % PROBABILITY_BASE as u64) as u32) < p
    }

    fn corrupt_random(&self, buf: &mut [u8]) {
        if !buf.is_empty() {
            let i = (self.random() % buf.len() as u64) as usize;
            buf[i] = self.random() as u8;
        }
    }

    /// Whether `corrupt_bio_byte` applies to a request in direction `dir`.
    fn fixed_corrupt(&self, dir: Direction) -> Option<CorruptBioByte> {
        // No bio flags travel with our requests: only a zero mask matches.
        self.cfg.corrupt.filter(|c| c.dir == dir && c.flags == 0)
    }

    fn down_error(&self, what: &str, offset: Bytes, len: usize) -> IoError {
        IoError::eio(format!(
            "{}: {what} at byte {} length {len}: device is in a down interval (flakey)",
            self.name, offset.0
        ))
    }

    /// What a data-less write (discard, write-zeroes) does now: `Some(result)` to finish
    /// without touching the device.
    /// Checks a request's range and returns where it lands on the lower device.
    fn lower(&self, offset: Bytes, len: u64) -> Result<Bytes, IoError> {
        check_range(&self.name, self.size, offset, Bytes(len))?;
        shift(&self.name, self.offset, offset)
    }

    fn nodata_write(&self, what: &str, offset: Bytes, len: Bytes) -> Option<Result<(), IoError>> {
        if let Err(e) = check_range(&self.name, self.size, offset, len) {
            return Some(Err(e));
        }
        if self.is_down() {
            if self.cfg.drop_writes {
                return Some(Ok(()));
            }
            if self.cfg.error_writes {
                return Some(Err(self.down_error(what, offset, len.0 as usize)));
            }
        }
        None
    }
}

impl BlockDevice for Flakey {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn size(&self) -> Bytes {
        self.size
    }
    fn limits(&self) -> Limits {
        self.dev.limits()
    }
    unsafe fn read<'a>(&'a self, offset: Bytes, buf: &'a mut [u8]) -> IoFuture<'a> {
        let lo = match self.lower(offset, buf.len() as u64) {
            Ok(lo) => lo,
            Err(e) => return ready(Err(e)),
        };
        let down = self.is_down();
        if down && self.cfg.error_reads {
            return ready(Err(self.down_error("read", offset, buf.len())));
        }
        Box::pin(async move {
            self.dev.read(lo, &mut *buf).await?;
            if down {
                if let Some(c) = self.fixed_corrupt(Direction::Read) {
                    if let Some(b) = (c.nth as usize).checked_sub(1).and_then(|i| buf.get_mut(i)) {
                        *b = c.value;
                    }
                }
                if self.roll(self.cfg.random_read_corrupt) {
                    self.corrupt_random(buf);
                }
            }
            Ok(())
        })
    }
    unsafe fn write<'a>(&'a self, offset: Bytes, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a> {
        let lo = match self.lower(offset, buf.len() as u64) {
            Ok(lo) => lo,
            Err(e) => return ready(Err(e)),
        };
        if self.is_down() {
            if self.cfg.drop_writes {
                return ready(Ok(()));
            }
            if self.cfg.error_writes {
                return ready(Err(self.down_error("write", offset, buf.len())));
            }
            let fixed = self.fixed_corrupt(Direction::Write);
            let random = self.roll(self.cfg.random_write_corrupt);
            if fixed.is_some() || random {
                // Corrupt a copy: the caller's buffer is not ours to change.
                let mut copy = buf.to_vec();
                if let Some(c) = fixed {
                    if let Some(b) = (c.nth as usize)
                        .checked_sub(1)
                        .and_then(|i| copy.get_mut(i))
                    {
                        *b = c.value;
                    }
                }
                if random {
                    self.corrupt_random(&mut copy);
                }
                return Box::pin(async move { self.dev.write(lo, &copy, flags).await });
            }
        }
        self.dev.write(lo, buf, flags)
    }
    fn flush(&self) -> IoFuture<'_> {
        self.dev.flush()
    }
    fn discard(&self, offset: Bytes, len: Bytes) -> IoFuture<'_> {
        match self.nodata_write("discard", offset, len) {
            Some(r) => ready(r),
            None => match shift(&self.name, self.offset, offset) {
                Ok(lo) => self.dev.discard(lo, len),
                Err(e) => ready(Err(e)),
            },
        }
    }
    fn write_zeroes(&self, offset: Bytes, len: Bytes, flags: WriteFlags) -> IoFuture<'_> {
        match self.nodata_write("write-zeroes", offset, len) {
            Some(r) => ready(r),
            None => match shift(&self.name, self.offset, offset) {
                Ok(lo) => self.dev.write_zeroes(lo, len, flags),
                Err(e) => ready(Err(e)),
            },
        }
    }
}
