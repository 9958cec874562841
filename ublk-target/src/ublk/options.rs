//! How a device is served: [`UblkOptions`], their checks, and the errors of the front end.

use std::path::Path;

use libublk::{sys, UblkError};
use tables::io::DeviceRef;

use crate::ublk_params::{self, ParamError};

/// How to serve a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UblkOptions {
    /// Ask for `/dev/ublkbN` with this N; `None` lets the kernel choose.
    pub dev_id: Option<u32>,
    /// Hardware queues (one serving thread each).
    pub queues: u16,
    /// Requests in flight per queue.
    pub depth: u16,
    /// Largest request in bytes (the per-tag buffer size); the device's `limits().max_io`
    /// lowers it further.
    pub max_io_bytes: u32,
    /// Create the device with `UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE`, so it
    /// survives the server's death and waits for a new server. Re-attaching to such a device
    /// is not implemented yet (see the crate's report); only the creation flag is wired.
    pub user_recovery: bool,
    /// Keep each queue thread on the CPUs that submit to its queue (libublk's default).
    /// Off by default: then the submitter and the thread serving its queue share one CPU
    /// and take turns on it while the other CPUs idle; unpinned, the scheduler runs them
    /// side by side (measured in BENCHMARKS.md, ublk section).
    pub pin_queues: bool,
    /// Fault in every tag's buffer when its queue starts (`MADV_POPULATE_WRITE`), instead
    /// of on the request that first uses it: a fresh buffer costs a page fault and a page
    /// clear per 4 KiB inside the kernel's copy of that request (~18% of the serving
    /// thread in a 256 MiB sequential write in the VM). Costs queues x depth x max_io_bytes
    /// of resident memory up front (128 MiB at 2 x 128 x 512 KiB), which a busy device
    /// reaches anyway.
    pub prefault_buffers: bool,
    /// Microseconds a queue thread keeps polling its ring after the last completion before
    /// it sleeps (0: never poll). Saves a sleep and a wakeup per batch under load, for at
    /// most this much CPU after the last request; 4k random I/O gained 13-18% at 50 us in
    /// the VM benchmark. `VOLMGR_UBLK_SPIN_US` in the environment overrides it.
    pub poll_us: u32,
    /// Serve without copying request data where the kernel can (`UBLK_F_AUTO_BUF_REG`,
    /// Linux 6.16+): the driver lends each request's pages to the queue's io_uring, and
    /// tables whose every layer ends in file extents read and write them there directly
    /// (`READ_FIXED`/`WRITE_FIXED`). Anything that needs the bytes in memory (parity, thin
    /// zeroing, NBD, small requests to files in RAM) copies them in or out itself through
    /// `/dev/ublkcN` (`UBLK_F_USER_COPY`). Ignored where the driver lacks the feature;
    /// `VOLMGR_UBLK_ZERO_COPY=0|1` in the environment overrides it.
    pub zero_copy: bool,
}

impl Default for UblkOptions {
    fn default() -> UblkOptions {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        UblkOptions {
            dev_id: None,
            queues: cpus.clamp(1, 4) as u16,
            depth: 128,
            max_io_bytes: 512 << 10,
            user_recovery: false,
            pin_queues: false,
            prefault_buffers: true,
            poll_us: 50,
            zero_copy: true,
        }
    }
}

/// Why serving failed.
#[derive(Debug, thiserror::Error)]
pub enum UblkTargetError {
    /// The options are out of range.
    #[error("{dev}: ublk options: {msg}")]
    Options {
        /// Device name.
        dev: String,
        /// What is wrong.
        msg: String,
    },
    /// The device's size or limits cannot be expressed as ublk parameters.
    #[error(transparent)]
    Params(#[from] ParamError),
    /// A ublk control operation failed.
    #[error("{dev}: ublk {what} failed: {detail}")]
    Ublk {
        /// Device name.
        dev: String,
        /// The operation (add device, start, stop, delete).
        what: &'static str,
        /// The kernel's or libublk's answer.
        detail: String,
    },
    /// Something else failed while starting or stopping.
    #[error("{dev}: {msg}")]
    Failed {
        /// Device name.
        dev: String,
        /// What failed.
        msg: String,
    },
}

/// Human-readable text for a libublk error (its own Display drops the errno).
pub(super) fn describe(e: &UblkError) -> String {
    match e {
        UblkError::OtherError(n) | UblkError::UringIOError(n) => {
            format!(
                "{} (errno {})",
                std::io::Error::from_raw_os_error(n.abs()),
                n.abs()
            )
        }
        UblkError::IOError(io) => io.to_string(),
        other => format!("{other} ({other:?})"),
    }
}

/// The creation flags of the zero-copy data path ([`UblkOptions::zero_copy`]).
pub(super) const ZERO_COPY_FLAGS: u64 = (sys::UBLK_F_AUTO_BUF_REG | sys::UBLK_F_USER_COPY) as u64;

/// [`UblkOptions::zero_copy`], unless `VOLMGR_UBLK_ZERO_COPY` says otherwise.
pub(super) fn want_zero_copy(opts: &UblkOptions) -> bool {
    match std::env::var("VOLMGR_UBLK_ZERO_COPY").as_deref() {
        Ok("0") => false,
        Ok("1") => true,
        _ => opts.zero_copy,
    }
}

/// Validates `opts` for `dev` and returns the device id to ask for (-1: any).
pub(super) fn check_options(
    name: &str,
    dev: &DeviceRef,
    opts: &UblkOptions,
) -> Result<i32, UblkTargetError> {
    let bad = |msg: String| UblkTargetError::Options {
        dev: name.to_string(),
        msg,
    };
    if opts.queues == 0 || opts.queues > 64 {
        return Err(bad(format!("queues is {}; use 1 to 64", opts.queues)));
    }
    if opts.depth == 0 || opts.depth > 4096 {
        return Err(bad(format!("depth is {}; use 1 to 4096", opts.depth)));
    }
    if opts.max_io_bytes < 4096 || !opts.max_io_bytes.is_multiple_of(4096) {
        return Err(bad(format!(
            "max_io_bytes is {}; use a multiple of 4096",
            opts.max_io_bytes
        )));
    }
    let id = match opts.dev_id {
        None => -1,
        Some(n) => i32::try_from(n).map_err(|_| bad(format!("dev_id {n} is too large")))?,
    };
    // Refuse bad limits before the kernel sees anything (the kernel may still lower the
    // buffer size; the queue setup recomputes with its value).
    ublk_params::compute(name, dev.size(), &dev.limits(), opts.max_io_bytes)?;
    if !Path::new("/dev/ublk-control").exists() {
        return Err(UblkTargetError::Failed {
            dev: name.to_string(),
            msg: "/dev/ublk-control does not exist: this kernel has no ublk driver loaded \
                  (modprobe ublk_drv; CONFIG_BLK_DEV_UBLK)"
                .into(),
        });
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ublk::UblkServer;
    use std::sync::Arc;
    use tables::mem::MemDevice;
    use tables::Bytes;

    #[test]
    fn default_options_are_sensible() {
        let o = UblkOptions::default();
        assert!((1..=4).contains(&o.queues));
        assert_eq!(o.depth, 128);
        assert!(o.max_io_bytes >= 4096 && o.max_io_bytes % 4096 == 0);
        assert!(!o.user_recovery);
    }

    #[test]
    fn bad_options_are_refused_before_the_kernel() {
        let dev: DeviceRef = Arc::new(MemDevice::new("m", Bytes(1 << 20)));
        let mut o = UblkOptions {
            queues: 0,
            ..UblkOptions::default()
        };
        let e = UblkServer::start(dev.clone(), &o).unwrap_err();
        assert!(e.to_string().contains("queues"), "{e}");
        o.queues = 1;
        o.max_io_bytes = 1000;
        let e = UblkServer::start(dev.clone(), &o).unwrap_err();
        assert!(e.to_string().contains("max_io_bytes"), "{e}");
        o.max_io_bytes = 4096;
        o.dev_id = Some(u32::MAX);
        let e = UblkServer::start(dev, &o).unwrap_err();
        assert!(e.to_string().contains("dev_id"), "{e}");
    }
}
