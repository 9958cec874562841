//! The `multipath` target: one device reached through several paths (two NBD exports or
//! iSCSI portals of the same LUN, ...), in dm-multipath's table syntax.
//!
//! ```text
//! multipath <#features> [features...] <#hw_handler_args> [hw_handler [args...]]
//!     <#pathgroups> <initial pg (1-based; 0 = choose)>
//!     { <path selector> <#selector args> <#paths> <#per-path args> { <dev> [args] }... }...
//! 0 2097152 multipath 1 queue_if_no_path 0 2 1 round-robin 0 2 1 /dev/a 1000 /dev/b 1000 \
//!     round-robin 0 1 1 /dev/c 1000
//! ```
//!
//! # Model
//! - Path groups are in priority order. A request goes to the preferred group (the initial
//!   group, or the last `switch_group`) if it has an active path, else to the first enabled
//!   group that has one, else to a disabled one; inside the group the selector picks the path
//!   ([`selector`]: `round-robin`, `queue-length`, `service-time` as dm computes them). The
//!   group is chosen again for every request, so new I/O goes back to a higher-priority group
//!   as soon as one of its paths is active again: dm's (multipathd's) "immediate" failback.
//! - A path error (EIO, ETIMEDOUT, ENOTCONN, ECONNRESET, ENOLINK, ...: anything but
//!   [`is_target_error`]) fails the path (its fail count +1) and the whole request is issued
//!   again on the next path the selectors give: nothing is acknowledged before a path
//!   completed it entirely, and no request completes twice. Target errors (EINVAL, ENOSPC,
//!   EROFS, EOPNOTSUPP, ...) are returned as they are.
//! - No active path: with `queue_if_no_path` (or `no_path_retry` not yet used up) the request
//!   waits, as a parked future, until a path is reinstated; otherwise it fails with EIO naming
//!   the device, the request and the offset. The `fail_if_no_path` message releases waiting
//!   requests with EIO; `no_path_retry N` does after N checker intervals without a path.
//! - The checker ([`mod@checker`]) probes failed paths every `checker_interval_ms` (ours, not
//!   dm's; default 5 s) with a small direct read at sector 0 and reinstates those that answer,
//!   including paths failed by a `fail_path` message (as multipathd does).
//! - `hw_handler`, `retain_attached_hw_handler`, `pg_init_retries`, `pg_init_delay_msecs` and
//!   `queue_mode` are accepted, kept and printed back, and have no effect: there is no SCSI
//!   device handler and no path group initialisation here.
//! - Status and messages as dm-multipath ([`mod@status`]).

#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod checker;
pub mod device;
pub mod parse;
pub mod selector;
pub mod status;

use std::sync::Arc;

use tables::io::DeviceRef;
use tables::registry::{ArgError, BuildCtx, Registry, TargetKind};
use tables::Sectors;

pub use device::{is_target_error, MultipathDevice, OpenOptions};
pub use parse::{MultipathConfig, NoPathRetry, SelectorKind};

/// The `multipath` target kind.
pub struct MultipathKind {
    opts: OpenOptions,
}

impl Default for MultipathKind {
    fn default() -> MultipathKind {
        MultipathKind::new()
    }
}

impl MultipathKind {
    /// The kind, with the path checker thread on.
    pub fn new() -> MultipathKind {
        MultipathKind {
            opts: OpenOptions::default(),
        }
    }

    /// Whether built devices run their own path checker thread (default true).
    pub fn with_background(mut self, on: bool) -> MultipathKind {
        self.opts.background = on;
        self
    }

    /// Builds the device with its concrete type (tests call `check_paths` on it).
    pub fn build_multipath(
        &self,
        ctx: &BuildCtx<'_>,
        args: &[String],
    ) -> Result<Arc<MultipathDevice>, ArgError> {
        let cfg = parse::parse(args)?;
        let size = segment_bytes(ctx.len)?;
        let name = format!("multipath@line{}", ctx.line);
        let mut devs = Vec::new();
        for (g, p) in cfg.paths() {
            let d: DeviceRef = ctx.resolver.open(&p.dev).map_err(|e| {
                ArgError::whole(format!("{name}: group {} path '{}': {e}", g + 1, p.dev))
            })?;
            devs.push(d);
        }
        let dev =
            MultipathDevice::open(name, cfg, size, devs, self.opts).map_err(ArgError::whole)?;
        Ok(Arc::new(dev))
    }
}

fn segment_bytes(len: Sectors) -> Result<tables::Bytes, ArgError> {
    match len.checked_bytes() {
        Some(b) if len.0 != 0 => Ok(b),
        _ => Err(ArgError::whole(format!(
            "segment length {} sectors must be positive and fit in 64 bits as bytes",
            len.0
        ))),
    }
}

impl TargetKind for MultipathKind {
    fn name(&self) -> &'static str {
        "multipath"
    }
    fn validate(&self, len: Sectors, args: &[String]) -> Result<(), ArgError> {
        segment_bytes(len)?;
        parse::parse(args).map(|_| ())
    }
    fn normalize(&self, args: &[String]) -> Vec<String> {
        match parse::parse(args) {
            Ok(c) => c.to_args(),
            Err(_) => args.to_vec(),
        }
    }
    fn device_args(&self, args: &[String]) -> Vec<usize> {
        parse::parse_with_devices(args)
            .map(|(_, d)| d)
            .unwrap_or_default()
    }
    fn build(&self, ctx: &BuildCtx<'_>, args: &[String]) -> Result<DeviceRef, ArgError> {
        Ok(self.build_multipath(ctx, args)? as DeviceRef)
    }
}

/// Registers the `multipath` kind.
pub fn register(reg: &mut Registry) {
    reg.register(Arc::new(MultipathKind::new()));
}
