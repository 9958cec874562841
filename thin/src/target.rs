//! The `thin-pool` and `thin` table targets.
//!
//! `thin-pool <metadata dev> <data dev> <data block size (sectors)> <low water mark (blocks)>
//! [<#features> <feature>...]` and `thin <pool dev> <dev id> [<external origin dev>]`, as
//! dm-thin. Beyond dm-thin's features: `dedup`, `dedup_verify` (implies `dedup`) and the
//! pair `dedup_index_mb <MiB>` (two feature arguments); dedup needs 8-sector blocks.
//!
//! How a `thin` line finds its pool: every pool built by [`ThinPoolKind`] is recorded in a
//! process-wide registry (`POOLS`: pool id, metadata device name, address of the pool
//! device, weak pointer to the pool). The `thin` target resolves its pool argument through
//! the [`Resolver`](tables::registry::Resolver) like any device, then looks for a registry
//! entry whose pool device has the same address (`Arc::as_ptr`). If the resolver hands back
//! a wrapper (a whole table whose only segment is the pool), it asks the device for the
//! message `thin_pool_id` (which wrappers forward to their segment) and looks the id up.
//!
//! A live pool is also found by its metadata device name when a `thin-pool` line is built
//! again (a table reload): the same pool object is reconfigured instead of opening the
//! metadata twice, as dm-thin does.

use std::sync::{Arc, Mutex, MutexGuard, Weak};

use tables::io::{BlockDevice, IoFuture, Limits};
use tables::registry::{ArgError, BuildCtx, Registry, TargetKind};
use tables::{Bytes, DeviceRef, IoError, Sectors, WriteFlags};

use crate::pool::{pool_message, Pool, PoolOptions};
use crate::types::ThinId;

struct Entry {
    id: u64,
    meta_name: String,
    dev_addr: usize,
    pool: Weak<Pool>,
}

struct Pools {
    next: u64,
    entries: Vec<Entry>,
}

/// The process-wide registry of live pools (see the module docs).
static POOLS: Mutex<Pools> = Mutex::new(Pools {
    next: 1,
    entries: Vec::new(),
});

fn pools() -> MutexGuard<'static, Pools> {
    let mut g = POOLS.lock().unwrap_or_else(|e| e.into_inner());
    g.entries.retain(|e| e.pool.strong_count() > 0);
    g
}

fn dev_addr(d: &DeviceRef) -> usize {
    Arc::as_ptr(d) as *const () as usize
}

/// Finds the pool behind a device that a `thin` line names.
pub fn find_pool(dev: &DeviceRef) -> Option<Arc<Pool>> {
    let addr = dev_addr(dev);
    if let Some(p) = pools()
        .entries
        .iter()
        .find(|e| e.dev_addr == addr)
        .and_then(|e| e.pool.upgrade())
    {
        return Some(p);
    }
    let args = vec!["thin_pool_id".to_string()];
    let reply = futures::executor::block_on(dev.message(&args)).ok()?;
    let id: u64 = reply.trim().parse().ok()?;
    pools()
        .entries
        .iter()
        .find(|e| e.id == id)
        .and_then(|e| e.pool.upgrade())
}

/// The device a `thin-pool` line builds: a handle on the pool that takes messages and
/// reports status. Reads pass through to the data device (as dm-thin); writes are refused.
pub struct PoolDevice {
    pool: Arc<Pool>,
    size: Bytes,
    id: u64,
}

impl PoolDevice {
    /// The pool.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Registers a pool device and returns it as a table device.
    pub fn register(pool: Arc<Pool>, size: Bytes) -> DeviceRef {
        let mut g = pools();
        let id = g.next;
        g.next += 1;
        let dev: DeviceRef = Arc::new(PoolDevice {
            pool: pool.clone(),
            size,
            id,
        });
        g.entries.push(Entry {
            id,
            meta_name: pool.meta_dev().name(),
            dev_addr: dev_addr(&dev),
            pool: Arc::downgrade(&pool),
        });
        dev
    }
}

impl BlockDevice for PoolDevice {
    fn name(&self) -> String {
        self.pool.name()
    }
    fn size(&self) -> Bytes {
        self.size
    }
    fn limits(&self) -> Limits {
        Limits {
            discard_granularity: 0,
            write_zeroes: false,
            ..Limits::default()
        }
    }
    unsafe fn read<'a>(&'a self, offset: Bytes, buf: &'a mut [u8]) -> IoFuture<'a> {
        Box::pin(async move {
            tables::io::check_range(&self.name(), self.size, offset, Bytes(buf.len() as u64))?;
            let data = self.pool.data_dev();
            let end = data.size().0;
            let n = if offset.0 >= end {
                0
            } else {
                ((end - offset.0) as usize).min(buf.len())
            };
            if n > 0 {
                data.read(offset, &mut buf[..n]).await?;
            }
            buf[n..].fill(0);
            Ok(())
        })
    }
    unsafe fn write<'a>(&'a self, _offset: Bytes, _buf: &'a [u8], _f: WriteFlags) -> IoFuture<'a> {
        tables::io::ready(Err(IoError::unsupported(format!(
            "{}: a pool device is not writable; write to its thin volumes",
            self.name()
        ))))
    }
    fn flush(&self) -> IoFuture<'_> {
        Box::pin(self.pool.commit())
    }
    fn discard(&self, _offset: Bytes, _len: Bytes) -> IoFuture<'_> {
        tables::io::ready(Err(IoError::unsupported(format!(
            "{}: discard the thin volumes, not the pool",
            self.name()
        ))))
    }
    fn write_zeroes(&self, _offset: Bytes, _len: Bytes, _f: WriteFlags) -> IoFuture<'_> {
        tables::io::ready(Err(IoError::unsupported(format!(
            "{}: a pool device is not writable",
            self.name()
        ))))
    }
    fn status(&self) -> String {
        self.pool.status_line()
    }
    fn message<'a>(&'a self, args: &'a [String]) -> IoFuture<'a, String> {
        if args.len() == 1 && args[0] == "thin_pool_id" {
            return tables::io::ready(Ok(self.id.to_string()));
        }
        Box::pin(pool_message(&self.pool, args))
    }
}

const FEATURES: [&str; 8] = [
    "skip_block_zeroing",
    "ignore_discard",
    "no_discard_passdown",
    "read_only",
    "error_if_no_space",
    "dedup",
    "dedup_verify",
    "dedup_index_mb <MiB>",
];

/// Largest `dedup_index_mb`: 1 TiB of index (room for about 117 billion blocks, more than a
/// pool can have).
const MAX_INDEX_MB: u64 = 1 << 20;

/// Parses `thin-pool` arguments (everything but the devices) into options.
pub fn parse_pool_args(args: &[String]) -> Result<PoolOptions, ArgError> {
    if args.len() < 4 {
        return Err(ArgError::whole(
            "thin-pool takes <metadata dev> <data dev> <data block size> <low water mark> [<#features> <feature>...]",
        ));
    }
    let bs: u32 = args[2]
        .parse()
        .map_err(|_| ArgError::at(3, format!("'{}' is not a number of sectors", args[2])))?;
    if !bs.is_power_of_two() || !(8..=2_097_152).contains(&bs) {
        return Err(ArgError::at(
            3,
            format!("data block size {bs} sectors: must be a power of two from 8 (4 KiB) to 2097152 (1 GiB)"),
        ));
    }
    let lw: u64 = args[3]
        .parse()
        .map_err(|_| ArgError::at(4, format!("'{}' is not a number of blocks", args[3])))?;
    let mut o = PoolOptions {
        data_block_sectors: bs,
        low_water_blocks: lw,
        ..PoolOptions::default()
    };
    if args.len() > 4 {
        let n: usize = args[4]
            .parse()
            .map_err(|_| ArgError::at(5, format!("'{}' is not a feature count", args[4])))?;
        // `args.len() > 4` here; `5 + n` could overflow for a huge count.
        if args.len() - 5 != n {
            return Err(ArgError::at(
                5,
                format!("says {n} feature arguments but {} follow", args.len() - 5),
            ));
        }
        let mut feats = args[5..].iter().enumerate();
        while let Some((i, f)) = feats.next() {
            match f.as_str() {
                "skip_block_zeroing" => o.skip_block_zeroing = true,
                "ignore_discard" => o.ignore_discard = true,
                "no_discard_passdown" => o.no_discard_passdown = true,
                "read_only" => o.read_only = true,
                "error_if_no_space" => o.error_if_no_space = true,
                "dedup" => o.dedup = true,
                "dedup_verify" => {
                    o.dedup = true;
                    o.dedup_verify = true;
                }
                "dedup_index_mb" => {
                    // A parameter pair: it counts as two feature arguments.
                    let Some((j, n)) = feats.next() else {
                        return Err(ArgError::at(
                            6 + i,
                            "dedup_index_mb needs a size in MiB after it",
                        ));
                    };
                    let mb = n
                        .parse::<u64>()
                        .ok()
                        .filter(|m| (1..=MAX_INDEX_MB).contains(m))
                        .ok_or_else(|| {
                            ArgError::at(
                                6 + j,
                                format!(
                                    "dedup_index_mb '{n}': must be a number of MiB from 1 to {MAX_INDEX_MB}"
                                ),
                            )
                        })?;
                    o.dedup_index_bytes = Some(mb << 20);
                }
                _ => {
                    return Err(ArgError::at(
                        6 + i,
                        format!("unknown feature '{f}' (known: {})", FEATURES.join(", ")),
                    ))
                }
            }
        }
    }
    if o.dedup_index_bytes.is_some() && !o.dedup {
        return Err(ArgError::at(5, "dedup_index_mb without dedup"));
    }
    if o.dedup && bs != 8 {
        // One mapping per pool block: sharing 4 KiB pieces of larger blocks would need a
        // second mapping level.
        return Err(ArgError::at(
            3,
            format!("dedup needs a data block size of 8 sectors (4 KiB), got {bs}"),
        ));
    }
    Ok(o)
}

/// The segment's size in bytes: the table parser only passes lengths whose byte size fits
/// in 64 bits, but a kind may be called directly with any length.
fn segment_bytes(len: Sectors) -> Result<Bytes, ArgError> {
    len.0
        .checked_mul(tables::units::SECTOR_SIZE)
        .map(Bytes)
        .ok_or_else(|| {
            ArgError::whole(format!(
                "segment of {len} sectors: its byte size overflows 64 bits"
            ))
        })
}

/// The `thin-pool` target.
pub struct ThinPoolKind;

impl TargetKind for ThinPoolKind {
    fn name(&self) -> &'static str {
        "thin-pool"
    }
    fn device_args(&self, _args: &[String]) -> Vec<usize> {
        vec![0, 1]
    }
    fn validate(&self, len: Sectors, args: &[String]) -> Result<(), ArgError> {
        segment_bytes(len)?;
        parse_pool_args(args).map(|_| ())
    }
    fn normalize(&self, args: &[String]) -> Vec<String> {
        let mut out = args[..4.min(args.len())].to_vec();
        let mut feats: Vec<String> = FEATURES[..5]
            .iter()
            .filter(|f| args.iter().skip(5).any(|a| a == *f))
            .map(|f| f.to_string())
            .collect();
        if let Ok(o) = parse_pool_args(args) {
            if o.dedup {
                feats.push("dedup".into());
            }
            if o.dedup_verify {
                feats.push("dedup_verify".into());
            }
            if let Some(b) = o.dedup_index_bytes {
                feats.push("dedup_index_mb".into());
                feats.push((b >> 20).to_string());
            }
        }
        out.push(feats.len().to_string());
        out.extend(feats);
        out
    }
    fn build(&self, ctx: &BuildCtx<'_>, args: &[String]) -> Result<DeviceRef, ArgError> {
        self.validate(ctx.len, args)?;
        let size = segment_bytes(ctx.len)?;
        let opts = parse_pool_args(args)?;
        let meta = ctx
            .resolver
            .open(&args[0])
            .map_err(|e| ArgError::at(1, e))?;
        let data = ctx
            .resolver
            .open(&args[1])
            .map_err(|e| ArgError::at(2, e))?;
        let meta_name = meta.name();
        let live = pools()
            .entries
            .iter()
            .find(|e| e.meta_name == meta_name)
            .and_then(|e| e.pool.upgrade());
        let pool = match live {
            Some(p) => {
                let bs = p.block_bytes().0;
                if opts.data_block_sectors as u64 * 512 != bs {
                    return Err(ArgError::at(
                        3,
                        format!(
                            "the live pool on {meta_name} has blocks of {} sectors; a reload cannot change that",
                            bs / 512
                        ),
                    ));
                }
                p.reconfigure(data, opts).map_err(|e| ArgError::at(2, e))?;
                p
            }
            None => {
                // `build` is synchronous and may run inside a runtime's task: open the pool
                // on a thread of its own.
                let r = iort::run_on_io_thread(move || Pool::open(meta, data, opts))
                    .map_err(|e| ArgError::at(1, format!("{meta_name}: opening the pool: {e}")))?;
                r.map_err(|e| ArgError::at(1, format!("{meta_name}: {e}")))?
            }
        };
        Ok(PoolDevice::register(pool, size))
    }
}

/// The `thin` target.
pub struct ThinKind;

fn parse_thin_id(s: &str) -> Result<ThinId, ArgError> {
    s.parse::<u32>()
        .ok()
        .filter(|&v| v < (1 << 24))
        .map(ThinId)
        .ok_or_else(|| ArgError::at(2, format!("'{s}' is not a device id (0..16777215)")))
}

impl TargetKind for ThinKind {
    fn name(&self) -> &'static str {
        "thin"
    }
    fn device_args(&self, args: &[String]) -> Vec<usize> {
        // `<pool dev> <id> [<external origin>]`
        if args.len() > 2 {
            vec![0, 2]
        } else {
            vec![0]
        }
    }
    fn validate(&self, len: Sectors, args: &[String]) -> Result<(), ArgError> {
        segment_bytes(len)?;
        if !(2..=3).contains(&args.len()) {
            return Err(ArgError::whole(
                "thin takes <pool dev> <dev id> [<external origin dev>]",
            ));
        }
        parse_thin_id(&args[1]).map(|_| ())
    }
    fn build(&self, ctx: &BuildCtx<'_>, args: &[String]) -> Result<DeviceRef, ArgError> {
        self.validate(ctx.len, args)?;
        let id = parse_thin_id(&args[1])?;
        let pdev = ctx
            .resolver
            .open(&args[0])
            .map_err(|e| ArgError::at(1, e))?;
        let pool = find_pool(&pdev)
            .ok_or_else(|| ArgError::at(1, format!("{} is not a thin-pool device", args[0])))?;
        let origin = match args.get(2) {
            Some(o) => Some(ctx.resolver.open(o).map_err(|e| ArgError::at(3, e))?),
            None => None,
        };
        let t = pool
            .thin(id, segment_bytes(ctx.len)?, origin)
            .map_err(|e| ArgError::at(2, e.to_string()))?;
        Ok(t)
    }
}

/// Registers `thin-pool` and `thin`.
pub fn register(reg: &mut Registry) {
    reg.register(Arc::new(ThinPoolKind));
    reg.register(Arc::new(ThinKind));
}
