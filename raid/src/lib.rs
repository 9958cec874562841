//! RAID targets: `raid` (raid1, raid4, raid5 with md's four layouts, raid10 near) and `mirror`
//! (dm-mirror syntax, core log, as raid1), in device-mapper table syntax.
//!
//! ```text
//! raid <raid_type> <#raid_params> <chunk_size> [sync|nosync] [rebuild <idx>]
//!      [region_size <sectors>] [raid10_copies <n>] [raid10_format near]
//!      [max_recovery_rate <KiB/s>] <#raid_devs> <metadata_dev|-> <data_dev|-> ...
//! mirror core <#log_args> <region_size> [sync|nosync] <#devs> <dev> <offset> ...
//! ```
//!
//! A leg given as `- -` is missing: the array runs without it until `rebuild <idx> <device>`.
//!
//! # Model
//! - Legs are [`DeviceRef`]s. Each leg may have a metadata device holding a superblock
//!   (magic, version, array UUID, leg index, event counter, failed-legs mask, clean flag,
//!   data-device identity, crc32c) and a copy of the write-intent bitmap ([`meta`]).
//! - A failed leg is recorded in the superblocks of the surviving legs (event counter bumped)
//!   before any write that skipped it completes; at assembly a leg whose superblock is
//!   invalid or blank, whose UUID, index or data device disagrees, or that the newest
//!   superblock marks as failed, is never read: it is rebuilt. A leg whose only difference is
//!   an older event count (a superblock round cut short by a crash) cannot have missed an
//!   acknowledged write, so it is kept, but the whole array is resynced with that leg never
//!   used as the source.
//! - **Write hole: write-intent bitmap + resync of dirty regions on a healthy array; a
//!   partial parity log while a raid4/5 leg is missing.** Before any data of a write moves,
//!   the bits of the regions it touches are set and written with FUA to every in-sync metadata
//!   device; bits are cleared lazily after a flush completes with no write in flight to the
//!   region. After an unclean stop, every region whose bit is set is resynced (mirrors copied
//!   from the first in-sync copy, parity recomputed from the data). Reads in a region awaiting
//!   resync use that same first copy, so they never flip. With a leg missing, parity cannot be
//!   recomputed, so each raid4/5 stripe write first logs its partial parity (and any chunk only
//!   parity will hold) to a metadata device ([`ppl`]); assembly replays the log into parity.
//!   See the RAID section of ARCHITECTURE.md.
//! - Without metadata devices (`-`, or a `mirror` line) there is no bitmap: every start is
//!   treated as unclean and does a full resync unless `nosync`; `status` shows
//!   `bitmap:none(full-resync-on-start)`.
//! - **Growing**: a table built again over a running array (a reload) reaches that array
//!   instead of assembling it a second time; a larger length grows it once the new table is in
//!   use (the new regions resynced unless `nosync`, the new size in the superblocks so that a
//!   power cut leaves the old size or the new one), a smaller one is refused. An array whose
//!   superblocks record a smaller size than its table is grown at assembly. See [`mod@array`] and
//!   the RAID section of ARCHITECTURE.md.
//! - Background work (resync, recovery, check, repair) runs one region (mirror) or one stripe
//!   (parity recovery) at a time on a thread the device owns, with its own io_uring runtime,
//!   backing off whenever client I/O arrived during a step and honouring `max_recovery_rate`.
//!   Tests open with [`OpenOptions`] `{ background: false }` and drive
//!   [`RaidDevice::sync_step`] themselves.

#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod array;
pub mod geometry;
pub mod layout;
pub mod lock;
pub mod meta;
pub mod missing;
pub mod offset;
pub mod parse;
pub mod ppl;
pub mod scratch;
pub mod xor;

use std::sync::Arc;

use tables::io::{DeviceRef, IoError};
use tables::registry::{ArgError, BuildCtx, Registry, TargetKind};
use tables::{Bytes, Sectors};

pub use array::{LegOpener, LegState, OpenOptions, RaidDevice, SyncAction};
pub use parse::{Level, RaidConfig, SyncMode};

/// Errors assembling an array.
#[derive(Debug, thiserror::Error)]
pub enum RaidError {
    /// Leg sizes, counts or metadata geometry do not fit the table.
    #[error("geometry: {0}")]
    Geometry(String),
    /// Superblocks are unusable.
    #[error("metadata: {0}")]
    Metadata(String),
    /// Not enough trustworthy legs to assemble.
    #[error("{0}")]
    Assemble(String),
    /// An I/O error while assembling.
    #[error("I/O: {0}")]
    Io(IoError),
}

/// The `raid` or `mirror` target kind.
pub struct RaidKind {
    mirror: bool,
    background: bool,
    opener: Option<LegOpener>,
}

impl RaidKind {
    /// The `raid` kind.
    pub fn raid() -> RaidKind {
        RaidKind {
            mirror: false,
            background: true,
            opener: None,
        }
    }
    /// The `mirror` kind.
    pub fn mirror() -> RaidKind {
        RaidKind {
            mirror: true,
            background: true,
            opener: None,
        }
    }
    /// Gives built devices an opener for `rebuild <idx> <device>` messages.
    pub fn with_opener(mut self, opener: LegOpener) -> RaidKind {
        self.opener = Some(opener);
        self
    }
    /// Whether built devices run their own background sync thread (default true).
    pub fn with_background(mut self, on: bool) -> RaidKind {
        self.background = on;
        self
    }

    fn parse(&self, args: &[String]) -> Result<RaidConfig, ArgError> {
        if self.mirror {
            parse::parse_mirror(args)
        } else {
            parse::parse_raid(args)
        }
    }

    /// Every check of a line that needs no device: the arguments, and the sizes they make
    /// with the segment length `len`. Build runs it first, so a line `table check` accepts
    /// fails to build only because of its devices.
    fn check(&self, len: Sectors, args: &[String]) -> Result<(RaidConfig, Bytes), ArgError> {
        let cfg = self.parse(args)?;
        let size = match len.checked_bytes() {
            Some(b) if len.0 != 0 => b,
            _ => {
                return Err(ArgError::whole(format!(
                    "segment length {} sectors must be positive and fit in 64 bits as bytes",
                    len.0
                )))
            }
        };
        geometry::sizing(&cfg, size).map_err(ArgError::whole)?;
        Ok((cfg, size))
    }

    /// Builds the device with its concrete type (for callers that want `sync_step`,
    /// `replace_leg`...).
    pub fn build_raid(
        &self,
        ctx: &BuildCtx<'_>,
        args: &[String],
    ) -> Result<Arc<RaidDevice>, ArgError> {
        let (cfg, size) = self.check(ctx.len, args)?;
        let name = format!("{}@line{}", self.name(), ctx.line);
        let mut legs = Vec::with_capacity(cfg.legs.len());
        for (i, l) in cfg.legs.iter().enumerate() {
            let Some(data_name) = &l.data else {
                // `- -`: the array assembles without it.
                legs.push((None, Arc::new(missing::MissingLeg::new(i)) as DeviceRef));
                continue;
            };
            let meta = match &l.meta {
                Some(m) => Some(ctx.resolver.open(m).map_err(|e| {
                    ArgError::whole(format!("{name}: leg {i} metadata device '{m}': {e}"))
                })?),
                None => None,
            };
            let mut data: DeviceRef = ctx.resolver.open(data_name).map_err(|e| {
                ArgError::whole(format!("{name}: leg {i} data device '{data_name}': {e}"))
            })?;
            if self.mirror {
                // `check` made sure the offset fits in bytes.
                let start = l.offset.checked_bytes().unwrap_or(Bytes(u64::MAX));
                let avail = data.size().0.checked_sub(start.0).ok_or_else(|| {
                    ArgError::whole(format!(
                        "{name}: leg {i} offset {} sectors is past the end of '{}'",
                        l.offset.0, data_name
                    ))
                })?;
                data = Arc::new(offset::OffsetDevice::new(data, start, Bytes(avail)));
            }
            legs.push((meta, data));
        }
        // A reload: the array these legs belong to is running already.
        if let Some(dev) = array::live::reuse(&cfg, size, &legs)
            .map_err(|e| ArgError::whole(format!("{name}: {e}")))?
        {
            if let Some(o) = &self.opener {
                dev.set_opener(o.clone());
            }
            return Ok(Arc::new(dev));
        }
        let dev = RaidDevice::open(
            name.clone(),
            cfg,
            size,
            legs,
            OpenOptions {
                background: self.background,
            },
        )
        .map_err(|e| ArgError::whole(format!("{name}: {e}")))?;
        if let Some(o) = &self.opener {
            dev.set_opener(o.clone());
        }
        Ok(Arc::new(dev))
    }
}

impl TargetKind for RaidKind {
    fn name(&self) -> &'static str {
        if self.mirror {
            "mirror"
        } else {
            "raid"
        }
    }
    fn device_args(&self, args: &[String]) -> Vec<usize> {
        let num = |i: usize| args.get(i).and_then(|s| s.parse::<usize>().ok());
        // raid: `<type> <#params> <params>... <#devs> (<meta> <data>)...`;
        // mirror: `core <#log args> <log args>... <#devs> (<dev> <offset>)...`.
        let Some(first) = num(1).and_then(|n| n.checked_add(2)) else {
            return Vec::new();
        };
        let Some(devs) = num(first) else {
            return Vec::new();
        };
        let (per_leg, names) = if self.mirror { (2, 1) } else { (2, 2) };
        (0..devs)
            .flat_map(|leg| (0..names).map(move |k| (leg, k)))
            .map_while(|(leg, k)| {
                let i = leg.checked_mul(per_leg)?.checked_add(first + 1 + k)?;
                (i < args.len()).then_some(i)
            })
            .filter(|&i| args[i] != "-")
            .collect()
    }
    fn without_devices(&self, args: &[String], gone: &[usize]) -> Option<Vec<String>> {
        let mut cfg = self.parse(args).ok()?;
        // Legs start after `<#params> <params>...` (raid) or `<#log args> <log args>...`
        // (mirror) and `#devs`; two arguments per leg either way.
        let first = args.get(1)?.parse::<usize>().ok()?.checked_add(3)?;
        for &i in gone {
            let leg = i.checked_sub(first)? / 2;
            let l = cfg.legs.get_mut(leg)?;
            l.meta = None;
            l.data = None;
            // A missing leg cannot be rebuilt from the table (dm-raid refuses it too).
            cfg.rebuild.retain(|&r| r != leg);
        }
        cfg.check().ok()?;
        Some(cfg.to_args())
    }
    fn validate(&self, len: Sectors, args: &[String]) -> Result<(), ArgError> {
        self.check(len, args).map(|_| ())
    }
    fn normalize(&self, args: &[String]) -> Vec<String> {
        match self.parse(args) {
            Ok(c) => c.to_args(),
            Err(_) => args.to_vec(),
        }
    }
    fn build(&self, ctx: &BuildCtx<'_>, args: &[String]) -> Result<DeviceRef, ArgError> {
        Ok(self.build_raid(ctx, args)? as DeviceRef)
    }
}

/// Registers the `raid` and `mirror` kinds.
pub fn register(reg: &mut Registry) {
    reg.register(Arc::new(RaidKind::raid()));
    reg.register(Arc::new(RaidKind::mirror()));
}

/// Registers the kinds with an opener for `rebuild <idx> <device>` messages (the volume
/// daemon passes one that resolves its device names).
pub fn register_with_opener(reg: &mut Registry, opener: LegOpener) {
    reg.register(Arc::new(RaidKind::raid().with_opener(opener.clone())));
    reg.register(Arc::new(RaidKind::mirror().with_opener(opener)));
}
