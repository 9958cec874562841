//! The ublk front end: serves any [`BlockDevice`] (a whole table) as `/dev/ublkbN`.
//!
//! Threads: one control thread runs libublk's `run_target` (it adds the queue threads, starts
//! the device and waits for them), and one thread per hardware queue serves that queue's tags.
//! Nothing else: no thread per I/O.
//!
//! On a queue thread every tag is a local task on libublk's smol `LocalExecutor`, which owns
//! one buffer for the tag and loops FETCH → serve → COMMIT_AND_FETCH. Serving calls the
//! table's `read`/`write`/... futures right there. The thread installs an [`iort::Backend`]
//! that submits onto libublk's per-queue io_uring, so the table's targets (`iort::read_at`,
//! `iort::fsync`, ...) put their SQEs on the same ring as the ublk commands and one
//! `io_uring_enter` covers both.
//!
//! Limits of that arrangement, for target authors: on a queue thread there is no
//! `iort::Runtime`, so `iort::spawn` returns `NoRuntime` and `iort::block_on` must not be
//! called (it would wait on another ring). A target future dropped while one of its
//! operations is in flight does not wait for the kernel (libublk's op futures do not), so
//! targets must drive their operations to completion (`iort::try_join_all` does).

#![warn(missing_docs)]

use std::future::Future;
use std::os::fd::AsRawFd;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures::FutureExt;
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::{sys, BufDesc, UblkError, UblkFlags, UblkUringData};
use tables::io::{BlockDevice, DeviceRef, FixedBuf, IoError, Served, WriteFlags};
use tables::Bytes;

use crate::ublk_params::{self, ParamError};

/// How long `start` waits for the kernel to bring the device up (TCG guests are slow).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long to wait for `/dev/ublkbN` to appear or vanish.
const NODE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `stop` waits for the queue threads after STOP_DEV.
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Seconds of no I/O after which a queue goes idle (libublk then releases buffer pages).
const IDLE_SECS: u64 = 20;

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
fn describe(e: &UblkError) -> String {
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

/// A device being served as `/dev/ublkbN`. Dropping it stops it too (errors are then only
/// logged); call [`UblkServer::stop`] to see them.
pub struct UblkServer {
    dev: DeviceRef,
    name: String,
    dev_id: u32,
    ctrl: Option<Arc<UblkCtrl>>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl std::fmt::Debug for UblkServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UblkServer")
            .field("name", &self.name)
            .field("dev_id", &self.dev_id)
            .field("running", &self.ctrl.is_some())
            .finish()
    }
}

impl UblkServer {
    /// Adds a ublk device for `dev`, starts its queue threads, and returns once
    /// `/dev/ublkbN` exists.
    pub fn start(dev: DeviceRef, opts: &UblkOptions) -> Result<UblkServer, UblkTargetError> {
        let name = dev.name();
        let id = check_options(&name, &dev, opts)?;
        let mut ctrl_flags = 0u64;
        if opts.user_recovery {
            ctrl_flags |= u64::from(sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE);
        }
        if want_zero_copy(opts) && Self::can_zero_copy() {
            ctrl_flags |= ZERO_COPY_FLAGS;
        }
        let ctrl = UblkCtrlBuilder::default()
            .name("volmgr")
            .id(id)
            .nr_queues(opts.queues)
            .depth(opts.depth)
            .io_buf_bytes(opts.max_io_bytes)
            .ctrl_flags(ctrl_flags)
            .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
            .build()
            .map_err(|e| UblkTargetError::Ublk {
                dev: name.clone(),
                what: "add device",
                detail: describe(&e),
            })?;
        Self::launch(dev, name, ctrl, false, opts)
    }

    /// Re-attaches to `/dev/ublkb<dev_id>`, left behind by a server that died while serving
    /// it with [`UblkOptions::user_recovery`] set: the kernel kept the device (and any
    /// filesystem mounted on it) waiting, and re-issues the requests the dead server had not
    /// completed once this one serves. `dev` must be the same table (same size); the queue
    /// count, depth and buffer size are the device's own (`opts.dev_id`, `queues`, `depth`
    /// and `max_io_bytes` are ignored).
    ///
    /// If recovery fails the device is left as it was (not deleted), so it can be retried.
    pub fn recover(
        dev: DeviceRef,
        dev_id: u32,
        opts: &UblkOptions,
    ) -> Result<UblkServer, UblkTargetError> {
        let name = dev.name();
        let opts = UblkOptions {
            dev_id: Some(dev_id),
            ..opts.clone()
        };
        let id = check_options(&name, &dev, &opts)?;
        let fail = |msg: String| UblkTargetError::Failed {
            dev: name.clone(),
            msg: format!("recovering /dev/ublkb{dev_id}: {msg}"),
        };
        // A plain handle first: the device's own queue count, depth and buffer size decide
        // how the recovering control must be built.
        let probe = UblkCtrl::new_simple(id)
            .map_err(|e| fail(format!("no such device? {}", describe(&e))))?;
        let info = probe.dev_info();
        if info.flags & u64::from(sys::UBLK_F_USER_RECOVERY) == 0 {
            return Err(fail("it was not created with user recovery".into()));
        }
        if u32::from(info.state) != sys::UBLK_S_DEV_QUIESCED {
            let state = match u32::from(info.state) {
                sys::UBLK_S_DEV_LIVE => "live (another server is serving it)".to_string(),
                sys::UBLK_S_DEV_DEAD => "dead (stopped)".to_string(),
                s => format!("in state {s}"),
            };
            return Err(fail(format!("it is {state}, not waiting for a server")));
        }
        let mut params = sys::ublk_params {
            len: std::mem::size_of::<sys::ublk_params>() as u32,
            types: sys::UBLK_PARAM_TYPE_BASIC,
            ..Default::default()
        };
        probe
            .get_params(&mut params)
            .map_err(|e| fail(format!("reading its parameters: {}", describe(&e))))?;
        let want = ublk_params::compute(&name, dev.size(), &dev.limits(), info.max_io_buf_bytes)?;
        if params.basic.dev_sectors != want.params.basic.dev_sectors {
            return Err(fail(format!(
                "it has {} sectors but the table has {}",
                params.basic.dev_sectors, want.params.basic.dev_sectors
            )));
        }
        // Waits (up to 30 s, in libublk) for the dead server's last references to go.
        probe
            .start_user_recover()
            .map_err(|e| fail(format!("START_USER_RECOVERY: {}", describe(&e))))?;
        drop(probe);
        let ctrl = UblkCtrlBuilder::default()
            .name("volmgr")
            .id(id)
            .nr_queues(info.nr_hw_queues)
            .depth(info.queue_depth)
            .io_buf_bytes(info.max_io_buf_bytes)
            // The device keeps the data path it was created with.
            .ctrl_flags(
                info.flags
                    & (u64::from(
                        sys::UBLK_F_USER_RECOVERY
                            | sys::UBLK_F_USER_RECOVERY_REISSUE
                            | sys::UBLK_F_USER_RECOVERY_FAIL_IO,
                    ) | ZERO_COPY_FLAGS),
            )
            .dev_flags(UblkFlags::UBLK_DEV_F_RECOVER_DEV)
            .build()
            .map_err(|e| fail(describe(&e)))?;
        Self::launch(dev, name, ctrl, true, &opts)
    }

    /// Runs the control thread for an added (or recovering) device and waits until it serves.
    fn launch(
        dev: DeviceRef,
        name: String,
        ctrl: UblkCtrl,
        recovering: bool,
        opts: &UblkOptions,
    ) -> Result<UblkServer, UblkTargetError> {
        let setup = QueueSetup::from(opts);
        let dev_id = ctrl.dev_info().dev_id;
        let ctrl = Arc::new(ctrl);
        let (tx, rx) = mpsc::channel::<Result<(), String>>();
        let thread = {
            let ctrl = ctrl.clone();
            let dev = dev.clone();
            std::thread::Builder::new()
                .name(format!("ublk{dev_id}-ctrl"))
                .spawn(move || run_device(ctrl, dev, tx, setup))
        };
        let mut server = UblkServer {
            dev,
            name: name.clone(),
            dev_id,
            ctrl: Some(ctrl),
            thread: None,
        };
        match thread {
            Ok(t) => server.thread = Some(t),
            Err(e) => {
                if recovering {
                    server.abandon();
                }
                // Otherwise dropping the server deletes the added device.
                return Err(UblkTargetError::Failed {
                    dev: name,
                    msg: format!("cannot spawn the control thread: {e}"),
                });
            }
        }

        let started = match rx.recv_timeout(START_TIMEOUT) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(msg)) => Err(msg),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(format!(
                "the device did not start within {}s",
                START_TIMEOUT.as_secs()
            )),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err("the control thread ended before the device started".into())
            }
        };
        let node = started.and_then(|()| {
            if wait_until(NODE_TIMEOUT, || Path::new(&server.bdev_path()).exists()) {
                Ok(())
            } else {
                Err(format!(
                    "{} did not appear within {}s of starting",
                    server.bdev_path(),
                    NODE_TIMEOUT.as_secs()
                ))
            }
        });
        if let Err(msg) = node {
            let e = UblkTargetError::Failed {
                dev: name,
                msg: format!("starting /dev/ublkb{dev_id}: {msg}"),
            };
            if recovering {
                server.abandon();
            } else if let Err(e2) = server.shutdown() {
                log::warn!("cleanup after a failed start: {e2}");
            }
            return Err(e);
        }
        log::info!(
            "{}: serving as {}{}",
            server.name,
            server.bdev_path(),
            if recovering { " (recovered)" } else { "" }
        );
        Ok(server)
    }

    /// Gives up on a device without stopping or deleting it (a failed recovery must not
    /// destroy what a later attempt could still recover). The control thread is detached.
    fn abandon(&mut self) {
        if let Some(ctrl) = self.ctrl.take() {
            ctrl.disown();
        }
        self.thread.take();
    }

    /// The N of `/dev/ublkbN`.
    pub fn dev_id(&self) -> u32 {
        self.dev_id
    }

    /// `/dev/ublkbN`.
    pub fn bdev_path(&self) -> String {
        format!("/dev/ublkb{}", self.dev_id)
    }

    /// Whether the loaded ublk driver can change a live device's size
    /// (`UBLK_U_CMD_UPDATE_SIZE`, Linux 6.16+); asked once per process.
    pub fn can_update_size() -> bool {
        static V: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *V.get_or_init(|| {
            UblkCtrl::get_features().is_some_and(|f| f & u64::from(sys::UBLK_F_UPDATE_SIZE) != 0)
        })
    }

    /// Whether the loaded ublk driver can lend request pages to the server's ring
    /// (`UBLK_F_AUTO_BUF_REG`, Linux 6.16+) and let it copy the rest itself
    /// (`UBLK_F_USER_COPY`); asked once per process.
    pub fn can_zero_copy() -> bool {
        static V: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *V.get_or_init(|| {
            UblkCtrl::get_features().is_some_and(|f| f & ZERO_COPY_FLAGS == ZERO_COPY_FLAGS)
        })
    }

    /// Whether this device was created with the zero-copy data path.
    pub fn zero_copy(&self) -> bool {
        self.ctrl
            .as_ref()
            .is_some_and(|c| c.dev_info().flags & ZERO_COPY_FLAGS == ZERO_COPY_FLAGS)
    }

    /// Tells the kernel the device's new size (after a table reload that grew it). Needs
    /// `UBLK_U_CMD_UPDATE_SIZE`, which kernels before 6.16 do not have: there the error says so
    /// and the device keeps its old size.
    pub fn update_size(&self, size: tables::Bytes) -> Result<(), UblkTargetError> {
        let ctrl = self.ctrl.as_ref().ok_or_else(|| UblkTargetError::Failed {
            dev: self.name.clone(),
            msg: "device is stopped".into(),
        })?;
        ctrl.update_size(size.0)
            .map(|_| ())
            .map_err(|e| UblkTargetError::Ublk {
                dev: self.name.clone(),
                what: "update size (needs Linux 6.16 or later)",
                detail: describe(&e),
            })
    }

    /// Whether a ublk device with this id exists in the kernel (a server died and left it for
    /// recovery, or another server runs it).
    pub fn exists(dev_id: u32) -> bool {
        std::path::Path::new(&format!("/sys/class/ublk-char/ublkc{dev_id}")).exists()
            || std::path::Path::new(&format!("/dev/ublkc{dev_id}")).exists()
    }

    /// Flushes the device (the kernel's dirty pages, then the table), stops and deletes the
    /// ublk device, and joins the threads. Every step runs even if an earlier one failed; the
    /// first error is returned.
    pub fn stop(mut self) -> Result<(), UblkTargetError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), UblkTargetError> {
        let Some(ctrl) = self.ctrl.take() else {
            return Ok(());
        };
        let mut first: Option<UblkTargetError> = None;
        let mut note = |e: UblkTargetError| {
            log::warn!("{e}");
            first.get_or_insert(e);
        };
        let bdev = self.bdev_path();

        // 1. Dirty pages of the block device, then a FLUSH through the queues to the table.
        //    Only while the server still runs (a failed start has no serving queues).
        if self.thread.as_ref().is_some_and(|t| !t.is_finished()) && Path::new(&bdev).exists() {
            if let Err(e) = fsync_path(&bdev) {
                note(UblkTargetError::Failed {
                    dev: self.name.clone(),
                    msg: format!("flushing {bdev}: {e}"),
                });
            }
        }
        if let Err(e) = ensure_ctrl_ring() {
            note(UblkTargetError::Ublk {
                dev: self.name.clone(),
                what: "control ring setup",
                detail: describe(&e),
            });
        }
        // 2. STOP_DEV: the kernel removes the disk and aborts the queues' fetch commands,
        //    which ends every tag task and so every queue thread.
        if let Err(e) = ctrl.kill_dev() {
            note(UblkTargetError::Ublk {
                dev: self.name.clone(),
                what: "stop device",
                detail: describe(&e),
            });
        }
        // 3. The control thread returns once the queue threads are joined. A thread wedged
        //    in a failed start may never return: it is detached rather than waited for.
        if let Some(t) = self.thread.take() {
            if !wait_until(JOIN_TIMEOUT, || t.is_finished()) {
                note(UblkTargetError::Failed {
                    dev: self.name.clone(),
                    msg: format!(
                        "the ublk threads did not exit within {}s of STOP_DEV; detached",
                        JOIN_TIMEOUT.as_secs()
                    ),
                });
            } else {
                match t.join() {
                    Ok(Ok(())) => {}
                    Ok(Err(msg)) => note(UblkTargetError::Failed {
                        dev: self.name.clone(),
                        msg,
                    }),
                    Err(_) => note(UblkTargetError::Failed {
                        dev: self.name.clone(),
                        msg: "the ublk control thread panicked".into(),
                    }),
                }
            }
        }
        // 4. DEL_DEV (the control thread has dropped its reference by now).
        match Arc::try_unwrap(ctrl) {
            Ok(ctrl) => {
                if let Err(e) = ctrl.del_dev() {
                    note(UblkTargetError::Ublk {
                        dev: self.name.clone(),
                        what: "delete device",
                        detail: describe(&e),
                    });
                }
            }
            Err(_) => note(UblkTargetError::Failed {
                dev: self.name.clone(),
                msg: "the ublk control is still shared; device not deleted".into(),
            }),
        }
        // 5. The table itself: a last flush with no kernel in between.
        match iort::block_on(self.dev.flush()) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => note(UblkTargetError::Failed {
                dev: self.name.clone(),
                msg: format!("final flush: {e}"),
            }),
            Err(e) => note(UblkTargetError::Failed {
                dev: self.name.clone(),
                msg: format!("final flush: no io_uring runtime: {e}"),
            }),
        }
        if !wait_until(NODE_TIMEOUT, || !Path::new(&bdev).exists()) {
            note(UblkTargetError::Failed {
                dev: self.name.clone(),
                msg: format!("{bdev} still exists after the device was deleted"),
            });
        }
        match first {
            None => {
                log::info!("{}: {} stopped and deleted", self.name, bdev);
                Ok(())
            }
            Some(e) => Err(e),
        }
    }
}

/// The creation flags of the zero-copy data path ([`UblkOptions::zero_copy`]).
const ZERO_COPY_FLAGS: u64 = (sys::UBLK_F_AUTO_BUF_REG | sys::UBLK_F_USER_COPY) as u64;

/// [`UblkOptions::zero_copy`], unless `VOLMGR_UBLK_ZERO_COPY` says otherwise.
fn want_zero_copy(opts: &UblkOptions) -> bool {
    match std::env::var("VOLMGR_UBLK_ZERO_COPY").as_deref() {
        Ok("0") => false,
        Ok("1") => true,
        _ => opts.zero_copy,
    }
}

/// Validates `opts` for `dev` and returns the device id to ask for (-1: any).
fn check_options(name: &str, dev: &DeviceRef, opts: &UblkOptions) -> Result<i32, UblkTargetError> {
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

impl Drop for UblkServer {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            log::error!("stopping ublk device on drop: {e}");
        }
    }
}

fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if t0.elapsed() >= limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// libublk sends control commands through a thread-local ring that only its constructor
/// sets up; every other thread that stops or deletes the device needs its own.
fn ensure_ctrl_ring() -> Result<(), UblkError> {
    libublk::ublk_init_ctrl_task_ring(|ring| {
        if ring.is_none() {
            *ring = Some(
                iort::io_uring::IoUring::<iort::io_uring::squeue::Entry128>::builder()
                    .build(32)
                    .map_err(UblkError::IOError)?,
            );
        }
        Ok(())
    })
}

/// `fsync` on a block device writes back its page cache and sends a FLUSH down.
fn fsync_path(path: &str) -> std::io::Result<()> {
    let f = std::fs::File::open(path)?;
    // SAFETY: plain syscall on an fd we own for the duration of the call.
    if unsafe { libc::fsync(f.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The control thread: libublk's `run_target` adds the queue threads, starts the device
/// (reporting through `started`), and returns after the queues have stopped.
fn run_device(
    ctrl: Arc<UblkCtrl>,
    dev: DeviceRef,
    started: mpsc::Sender<Result<(), String>>,
    setup: QueueSetup,
) -> Result<(), String> {
    let name = dev.name();
    if let Err(e) = ensure_ctrl_ring() {
        let msg = format!("ublk control ring setup failed: {}", describe(&e));
        let _ = started.send(Err(msg.clone()));
        return Err(msg);
    }
    let size = dev.size();
    let limits = dev.limits();
    let mut param_error: Option<String> = None;
    let tgt_init = |udev: &mut UblkDev| -> Result<(), UblkError> {
        match ublk_params::compute(&name, size, &limits, udev.dev_info.max_io_buf_bytes) {
            Ok(p) => {
                if p.dropped_tail.0 > 0 {
                    log::warn!(
                        "{name}: last {} bytes are not a whole logical block and are not exported",
                        p.dropped_tail.0
                    );
                }
                udev.tgt.dev_size = p.params.basic.dev_sectors << 9;
                udev.tgt.params = p.params;
                Ok(())
            }
            Err(e) => {
                param_error = Some(e.to_string());
                Err(UblkError::InvalidVal)
            }
        }
    };
    let qdev = dev.clone();
    // Queue thread ids, for undoing libublk's pinning once it is done (it pins every
    // queue thread before starting the device, so after the start nothing re-pins them).
    let tids = Arc::new(Mutex::new(Vec::new()));
    let q_tids = tids.clone();
    let dev_id = ctrl.dev_info().dev_id;
    let q_fn = move |qid: u16, udev: &UblkDev| {
        name_thread(&format!("ublk{dev_id}-q{qid}"));
        if let Ok(mut t) = q_tids.lock() {
            // SAFETY: gettid has no preconditions.
            t.push(unsafe { libc::gettid() });
        }
        queue_thread(qid, udev, qdev, setup)
    };
    let tx = started.clone();
    let on_started = move |_: &UblkCtrl| {
        if !setup.pin_queues {
            if let Ok(t) = tids.lock() {
                unpin(&t);
            }
        }
        let _ = tx.send(Ok(()));
    };
    let r = ctrl.run_target(tgt_init, q_fn, on_started);
    drop(ctrl);
    match r {
        Ok(_) => Ok(()),
        Err(e) => {
            let msg = match param_error {
                Some(p) => p,
                None => format!("ublk device setup failed: {}", describe(&e)),
            };
            // Only read if the device never started; otherwise the error is the result.
            let _ = started.send(Err(msg.clone()));
            Err(msg)
        }
    }
}

/// Names the calling thread (shown by ps, top and perf; 15 bytes at most).
fn name_thread(name: &str) {
    let mut b = [0u8; 16];
    let n = name.len().min(15);
    b[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes; b is one.
    unsafe { libc::prctl(libc::PR_SET_NAME, b.as_ptr() as libc::c_ulong, 0, 0, 0) };
}

/// Faults in `buf`'s pages for writing (best effort: kernels before 5.14 lack
/// `MADV_POPULATE_WRITE`, and then the pages fault in on first use as before).
fn populate(buf: &mut [u8]) {
    const MADV_POPULATE_WRITE: libc::c_int = 23;
    // SAFETY: the range is our own live allocation; populating does not change contents.
    let r = unsafe { libc::madvise(buf.as_mut_ptr().cast(), buf.len(), MADV_POPULATE_WRITE) };
    if r != 0 {
        log::debug!(
            "prefaulting a {}-byte tag buffer: {}",
            buf.len(),
            std::io::Error::last_os_error()
        );
    }
}

/// Lets the threads `tids` run on every CPU this process may use.
fn unpin(tids: &[libc::pid_t]) {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it for this process.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::cpu_set_t>();
    if unsafe { libc::sched_getaffinity(0, size, &mut set) } != 0 {
        return;
    }
    // The control thread's own mask is the process's (libublk never pins it).
    for &tid in tids {
        // SAFETY: set is a valid cpu_set_t of `size` bytes; a stale tid only fails.
        if unsafe { libc::sched_setaffinity(tid, size, &set) } != 0 {
            log::debug!(
                "unpinning queue thread {tid}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Submits the table's SQEs onto libublk's ring for this queue thread.
struct QueueRingBackend;

impl iort::Backend for QueueRingBackend {
    unsafe fn submit(
        &self,
        sqe: iort::io_uring::squeue::Entry,
    ) -> Pin<Box<dyn Future<Output = i32>>> {
        Box::pin(async move {
            // The Target bit tells libublk this CQE is ours, not a ublk command's.
            ublk_submit_sqe_async(sqe, UblkUringData::Target as u64)
                .await
                .unwrap_or(-libc::EIO)
        })
    }
}

/// One hardware queue: a local task per tag, all driven by libublk's event loop.
fn queue_thread(qid: u16, udev: &UblkDev, dev: DeviceRef, setup: QueueSetup) {
    let q = match UblkQueue::new(qid, udev) {
        Ok(q) => Rc::new(q),
        Err(e) => {
            log::error!(
                "{}: ublk queue {qid} setup failed: {}",
                dev.name(),
                describe(&e)
            );
            // start_dev waits for every queue to register its buffers: a failure report
            // (the mlock-failed flag is the public way to send one) makes it fail instead.
            udev.notify_buffer_registration_complete(true);
            return;
        }
    };
    iort::set_backend(Some(Rc::new(QueueRingBackend)));
    let buf_bytes = udev.dev_info.max_io_buf_bytes as usize;
    // The device's own flags decide (a recovered device keeps the path it was created with).
    let zc = (udev.dev_info.flags & ZERO_COPY_FLAGS == ZERO_COPY_FLAGS).then(|| ZeroCopy {
        cdev: udev.tgt.fds[0],
        qid,
    });
    let exe = Rc::new(smol::LocalExecutor::new());
    // Wakes from other threads (locks the other queue released) must end the ring's wait.
    let kick = match crate::kick::Kick::new() {
        Ok(k) => Some(k),
        Err(e) => {
            log::warn!(
                "{}: ublk queue {qid}: no eventfd for cross-thread wakeups ({e}); \
                 a request waiting on the other queue may wait for the next completion",
                dev.name()
            );
            None
        }
    };
    if let Some(k) = &kick {
        exe.spawn(k.clone().serve()).detach();
    }
    let mut tasks = Vec::new();
    for tag in q.tags() {
        let q = q.clone();
        let dev = dev.clone();
        let task = async move {
            match tag_task(&q, tag, &*dev, buf_bytes, setup.prefault, zc).await {
                Ok(()) | Err(UblkError::QueueIsDown) => {}
                Err(e) => log::error!(
                    "{}: ublk queue {qid} tag {tag} failed: {}",
                    dev.name(),
                    describe(&e)
                ),
            }
        };
        tasks.push(match &kick {
            Some(k) => exe.spawn(crate::kick::Kicked::new(task, k.clone()).boxed_local()),
            None => exe.spawn(task.boxed_local()),
        });
    }
    let ticker = exe.clone();
    let res = smol::block_on(exe.run(async {
        let run_ops = || while ticker.try_tick() {};
        let done = || tasks.iter().all(|t| t.is_finished());
        event_loop(&q, setup.spin, run_ops, done).await
    }));
    if let Err(e) = res {
        log::error!(
            "{}: ublk queue {qid} event loop: {}",
            dev.name(),
            describe(&e)
        );
    }
    iort::set_backend(None);
}

/// The [`UblkOptions`] the queue threads act on.
#[derive(Clone, Copy)]
struct QueueSetup {
    pin_queues: bool,
    prefault: bool,
    /// How long a queue thread keeps polling after its last completion before it sleeps.
    spin: Duration,
}

impl From<&UblkOptions> for QueueSetup {
    fn from(o: &UblkOptions) -> QueueSetup {
        // VOLMGR_UBLK_SPIN_US, if set, overrides poll_us (benchmark A/B runs).
        let us = std::env::var("VOLMGR_UBLK_SPIN_US")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(o.poll_us);
        QueueSetup {
            pin_queues: o.pin_queues,
            prefault: o.prefault_buffers,
            spin: Duration::from_micros(u64::from(us)),
        }
    }
}

/// libublk's `wait_and_handle_io_events`, plus optional polling: for `spin` after the
/// last completion, the thread enters the kernel without waiting (which submits, runs the
/// ublk driver's task work and returns), so a request arriving then is picked up without a
/// sleep and a wakeup.
async fn event_loop(
    q: &UblkQueue<'_>,
    spin: Duration,
    run_ops: impl Fn(),
    done: impl Fn() -> bool,
) -> Result<(), UblkError> {
    use libublk::uring_async::{
        run_uring_tasks, ublk_reap_io_events_with_update_queue, ublk_wake_task, uring_poll_io_fn,
    };
    let last_busy = std::cell::Cell::new(Instant::now());
    let poll_uring = || {
        let polling = !spin.is_zero() && last_busy.get().elapsed() < spin;
        async move {
            if polling {
                uring_poll_io_fn::<iort::io_uring::squeue::Entry>(q, None, 0)
            } else {
                let t = iort::io_uring::types::Timespec::new().sec(IDLE_SECS);
                uring_poll_io_fn::<iort::io_uring::squeue::Entry>(q, Some(t), 1)
            }
        }
    };
    let reap = |timed_out| {
        let mut n = 0u32;
        let r = ublk_reap_io_events_with_update_queue(q, timed_out, None, |cqe| {
            n += 1;
            ublk_wake_task(cqe.user_data(), cqe)
        });
        if n > 0 {
            last_busy.set(Instant::now());
        }
        r
    };
    run_uring_tasks(poll_uring, reap, run_ops, done).await
}

/// The steps of a zero-copy request, in the order they are tried.
const STEP_FIXED: u8 = 0;
const STEP_MAPPED: u8 = 1;
const STEP_MEMORY: u8 = 2;
/// Every this many requests a queue thread tries the fixed step first again.
const REPROBE: u32 = 64;

/// Which step last served a request on this queue thread, per direction (read, write), so
/// the next request starts there. A table over files in RAM then skips the fixed attempt,
/// and thin writes to new blocks skip both (instead of allocating a block for an attempt that
/// hands it back). The periodic re-probe notices a reloaded table or a different workload.
#[derive(Default)]
struct Steps {
    first: [std::cell::Cell<u8>; 2],
    count: std::cell::Cell<u32>,
}

thread_local! {
    static STEPS: Steps = Steps::default();
}

/// A zero-copy queue's way to the request data: the request's pages are registered in the
/// queue ring's buffer table at the tag's index, and `/dev/ublkcN` reads and writes them for
/// the fallback copy.
#[derive(Clone, Copy)]
struct ZeroCopy {
    cdev: std::os::fd::RawFd,
    qid: u16,
}

/// The request of one tag on a zero-copy queue.
#[derive(Clone, Copy)]
struct ZcRequest {
    zc: ZeroCopy,
    tag: u16,
}

impl ZcRequest {
    /// The request's pages as a registered buffer (the kernel registers it at index `tag`,
    /// addressed from 0).
    fn fixed(self, len: usize) -> FixedBuf {
        FixedBuf {
            index: self.tag,
            base: 0,
            offset: 0,
            len,
        }
    }

    /// Copies between `buf` and the request's pages through `/dev/ublkcN` (`to_request`:
    /// a read's data going out; otherwise a write's data coming in). Inline: these are the
    /// requests a target needs in memory, and the copy costs what the driver's own would.
    fn copy(self, buf: &mut [u8], to_request: bool) -> Result<(), IoError> {
        self.copy_raw(buf.as_mut_ptr(), 0, buf.len(), to_request)
    }

    /// Copies `len` bytes between `ptr` and the request from byte `at` on, with pread/pwrite
    /// on `/dev/ublkcN`. `ptr` is only handed to the kernel: it may be a mapping whose pages
    /// are gone (then the error is `EFAULT`).
    fn copy_raw(
        self,
        ptr: *mut u8,
        at: usize,
        len: usize,
        to_request: bool,
    ) -> Result<(), IoError> {
        let mut done = 0usize;
        while done < len {
            let pos = libublk::io::UblkIOCtx::ublk_user_copy_pos(
                self.zc.qid,
                self.tag,
                (at + done) as u32,
            );
            let p = ptr.wrapping_add(done);
            // SAFETY: pread/pwrite between caller-provided memory (live, or a mapping the
            // kernel checks) and the driver's descriptor, which lives as long as the queue.
            let r = unsafe {
                if to_request {
                    libc::pwrite(self.zc.cdev, p.cast_const().cast(), len - done, pos as i64)
                } else {
                    libc::pread(self.zc.cdev, p.cast(), len - done, pos as i64)
                }
            };
            if r <= 0 {
                let e = if r == 0 {
                    std::io::Error::from_raw_os_error(libc::EIO)
                } else {
                    std::io::Error::last_os_error()
                };
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(IoError::new(
                    e.raw_os_error().unwrap_or(libc::EIO),
                    format!(
                        "copying {len} bytes {} the request at byte {at} through /dev/ublkc: {e}",
                        if to_request { "into" } else { "out of" }
                    ),
                ));
            }
            done += r as usize;
        }
        Ok(())
    }

    /// Moves the request's `n` bytes between the device and the request's pages without a
    /// buffer of ours: a fixed-buffer operation, or a single copy to or from a file in RAM.
    /// Starts at the step that served the last request in this direction on this queue
    /// thread ([`STEPS`]).
    async fn direct(
        self,
        dev: &dyn BlockDevice,
        off: u64,
        n: usize,
        write: bool,
        flags: WriteFlags,
    ) -> Result<Served, IoError> {
        let dir = usize::from(write);
        let first = STEPS.with(|s| {
            let c = s.count.get().wrapping_add(1);
            s.count.set(c);
            if c % REPROBE == 0 {
                STEP_FIXED
            } else {
                s.first[dir].get()
            }
        });
        let record = |step: u8| STEPS.with(|s| s.first[dir].set(step));
        if first == STEP_FIXED {
            let fixed = if write {
                dev.write_fixed(Bytes(off), self.fixed(n), flags).await?
            } else {
                dev.read_fixed(Bytes(off), self.fixed(n)).await?
            };
            if fixed == Served::Done {
                record(STEP_FIXED);
                return Ok(fixed);
            }
        }
        if first <= STEP_MAPPED {
            // A write's bytes go from the request into the mapping, a read's the other way.
            let copy = move |p: *mut u8, at: usize, k: usize| self.copy_raw(p, at, k, !write);
            let mapped = dev
                .copy_mapped(Bytes(off), n, write.then_some(flags), &copy)
                .await?;
            if mapped == Served::Done {
                record(STEP_MAPPED);
                return Ok(mapped);
            }
        }
        record(STEP_MEMORY);
        Ok(Served::NeedsMemory)
    }
}

/// One tag: fetch a request, serve it from the tag's buffer, commit the result, repeat until
/// the queue goes down.
async fn tag_task(
    q: &UblkQueue<'_>,
    tag: u16,
    dev: &dyn BlockDevice,
    buf_bytes: usize,
    prefault: bool,
    zc: Option<ZeroCopy>,
) -> Result<(), UblkError> {
    let mut buf = IoBuf::<u8>::new(buf_bytes);
    if prefault {
        populate(buf.as_mut_slice());
    }
    let Some(zc) = zc else {
        q.submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf))
            .await?;
        loop {
            let iod = *q.get_iod(tag);
            let res = serve(dev, &iod, buf.as_mut_slice(), None).await;
            q.submit_io_commit_cmd(tag, BufDesc::Slice(buf.as_slice()), res)
                .await?;
        }
    };
    // The driver registers each request's pages at index `tag` before handing it over, and
    // unregisters them at the commit.
    let reg = sys::ublk_auto_buf_reg {
        index: tag,
        ..Default::default()
    };
    let req = ZcRequest { zc, tag };
    q.submit_io_prep_cmd(tag, BufDesc::AutoReg(reg), 0, None)
        .await?;
    loop {
        let iod = *q.get_iod(tag);
        let res = serve(dev, &iod, buf.as_mut_slice(), Some(req)).await;
        q.submit_io_commit_cmd(tag, BufDesc::AutoReg(reg), res)
            .await?;
    }
}

/// Serves one request: the ublk result (bytes for reads and writes, 0 otherwise, or a
/// negative errno). A target error or panic fails only this request. `buf` holds the data
/// (copy mode) or is scratch for the fallback (zero-copy mode, `zc` set).
async fn serve(
    dev: &dyn BlockDevice,
    iod: &sys::ublksrv_io_desc,
    buf: &mut [u8],
    zc: Option<ZcRequest>,
) -> i32 {
    match AssertUnwindSafe(execute(dev, iod, buf, zc))
        .catch_unwind()
        .await
    {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => {
            log::warn!("{}: {e}", dev.name());
            if e.errno > 0 {
                -e.errno
            } else {
                -libc::EIO
            }
        }
        Err(_) => {
            log::error!(
                "{}: target panicked serving op {} at sector {} (+{}); failing the request",
                dev.name(),
                iod.op_flags & 0xff,
                iod.start_sector,
                iod.nr_sectors
            );
            -libc::EIO
        }
    }
}

/// ublk's operation codes and flags, mapped onto the [`BlockDevice`] calls.
async fn execute(
    dev: &dyn BlockDevice,
    iod: &sys::ublksrv_io_desc,
    buf: &mut [u8],
    zc: Option<ZcRequest>,
) -> Result<i32, IoError> {
    let op = iod.op_flags & 0xff;
    if op == sys::UBLK_IO_OP_FLUSH {
        // A flush carries no range (the kernel leaves its sector at -1).
        return dev.flush().await.map(|()| 0);
    }
    // ublk always counts in 512-byte sectors, whatever the logical block size.
    let off = iod
        .start_sector
        .checked_mul(512)
        .ok_or_else(|| IoError::invalid(format!("sector {} overflows", iod.start_sector)))?;
    let len = u64::from(iod.nr_sectors) << 9;
    let flags = if iod.op_flags & sys::UBLK_IO_F_FUA != 0 {
        WriteFlags::FUA
    } else {
        WriteFlags::default()
    };
    let data_len = || -> Result<usize, IoError> {
        usize::try_from(len)
            .ok()
            .filter(|&n| n <= buf.len() && n <= i32::MAX as usize)
            .ok_or_else(|| {
                IoError::invalid(format!(
                    "request of {len} bytes at byte {off} exceeds the {}-byte buffer",
                    buf.len()
                ))
            })
    };
    match op {
        sys::UBLK_IO_OP_READ => {
            let n = data_len()?;
            if let Some(z) = zc {
                if z.direct(dev, off, n, false, flags).await? == Served::Done {
                    return Ok(n as i32);
                }
            }
            dev.read(Bytes(off), &mut buf[..n]).await?;
            if let Some(z) = zc {
                z.copy(&mut buf[..n], true)
                    .map_err(|e| e.context(format_args!("read at byte {off}")))?;
            }
            Ok(n as i32)
        }
        sys::UBLK_IO_OP_WRITE => {
            let n = data_len()?;
            if let Some(z) = zc {
                if z.direct(dev, off, n, true, flags).await? == Served::Done {
                    return Ok(n as i32);
                }
                z.copy(&mut buf[..n], false)
                    .map_err(|e| e.context(format_args!("write at byte {off}")))?;
            }
            dev.write(Bytes(off), &buf[..n], flags).await?;
            Ok(n as i32)
        }
        sys::UBLK_IO_OP_DISCARD => dev.discard(Bytes(off), Bytes(len)).await.map(|()| 0),
        sys::UBLK_IO_OP_WRITE_ZEROES => dev
            .write_zeroes(Bytes(off), Bytes(len), flags)
            .await
            .map(|()| 0),
        other => Err(IoError::unsupported(format!(
            "ublk operation {other} at byte {off} is not supported"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tables::mem::MemDevice;

    fn iod(op: u32, sector: u64, sectors: u32) -> sys::ublksrv_io_desc {
        sys::ublksrv_io_desc {
            op_flags: op,
            nr_sectors: sectors,
            start_sector: sector,
            addr: 0,
        }
    }

    #[test]
    fn default_options_are_sensible() {
        let o = UblkOptions::default();
        assert!((1..=4).contains(&o.queues));
        assert_eq!(o.depth, 128);
        assert!(o.max_io_bytes >= 4096 && o.max_io_bytes % 4096 == 0);
        assert!(!o.user_recovery);
    }

    #[test]
    fn requests_map_onto_the_device() {
        let dev = MemDevice::new("m", Bytes(1 << 20));
        let mut buf = vec![0u8; 64 << 10];
        iort::block_on(async {
            buf[..4096].fill(7);
            let w = iod(sys::UBLK_IO_OP_WRITE | sys::UBLK_IO_F_FUA, 8, 8);
            assert_eq!(serve(&dev, &w, &mut buf, None).await, 4096);
            buf.fill(0);
            assert_eq!(
                serve(&dev, &iod(sys::UBLK_IO_OP_READ, 8, 8), &mut buf, None).await,
                4096
            );
            assert!(buf[..4096].iter().all(|&b| b == 7));
            // The kernel's flushes carry sector -1.
            let f = iod(sys::UBLK_IO_OP_FLUSH, u64::MAX, 0);
            assert_eq!(serve(&dev, &f, &mut buf, None).await, 0);
            assert_eq!(
                serve(
                    &dev,
                    &iod(sys::UBLK_IO_OP_WRITE_ZEROES, 8, 8),
                    &mut buf,
                    None
                )
                .await,
                0
            );
            assert_eq!(
                serve(&dev, &iod(sys::UBLK_IO_OP_READ, 8, 8), &mut buf, None).await,
                4096
            );
            assert!(buf[..4096].iter().all(|&b| b == 0));
            assert_eq!(
                serve(&dev, &iod(sys::UBLK_IO_OP_DISCARD, 0, 16), &mut buf, None).await,
                0
            );
        })
        .unwrap();
    }

    #[test]
    fn errors_become_negative_errnos() {
        let dev = MemDevice::new("m", Bytes(1 << 20));
        let mut buf = vec![0u8; 8192];
        iort::block_on(async {
            // Past the end: the device's ENOSPC.
            let r = serve(&dev, &iod(sys::UBLK_IO_OP_READ, 2048, 8), &mut buf, None).await;
            assert_eq!(r, -libc::ENOSPC);
            // Larger than the tag buffer.
            let r = serve(&dev, &iod(sys::UBLK_IO_OP_READ, 0, 64), &mut buf, None).await;
            assert_eq!(r, -libc::EINVAL);
            // Unknown operation.
            let r = serve(
                &dev,
                &iod(sys::UBLK_IO_OP_ZONE_APPEND, 0, 8),
                &mut buf,
                None,
            )
            .await;
            assert_eq!(r, -libc::EOPNOTSUPP);
        })
        .unwrap();
    }

    /// A device whose reads panic: the request fails, the server does not.
    struct Panicky;
    impl BlockDevice for Panicky {
        fn name(&self) -> String {
            "panicky".into()
        }
        fn size(&self) -> Bytes {
            Bytes(1 << 20)
        }
        fn read<'a>(&'a self, _: Bytes, _: &'a mut [u8]) -> tables::IoFuture<'a> {
            Box::pin(async { panic!("target bug") })
        }
        fn write<'a>(&'a self, _: Bytes, _: &'a [u8], _: WriteFlags) -> tables::IoFuture<'a> {
            tables::io::ready(Ok(()))
        }
        fn flush(&self) -> tables::IoFuture<'_> {
            tables::io::ready(Ok(()))
        }
        fn discard(&self, _: Bytes, _: Bytes) -> tables::IoFuture<'_> {
            tables::io::ready(Ok(()))
        }
        fn write_zeroes(&self, _: Bytes, _: Bytes, _: WriteFlags) -> tables::IoFuture<'_> {
            tables::io::ready(Ok(()))
        }
    }

    #[test]
    fn a_panicking_target_fails_the_request() {
        let mut buf = vec![0u8; 4096];
        let r = iort::block_on(serve(
            &Panicky,
            &iod(sys::UBLK_IO_OP_READ, 0, 8),
            &mut buf,
            None,
        ))
        .unwrap();
        assert_eq!(r, -libc::EIO);
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

    #[test]
    fn missing_driver_is_reported_clearly() {
        if Path::new("/dev/ublk-control").exists() {
            return; // a ublk host: covered by the VM/host guest scripts
        }
        let dev: DeviceRef = Arc::new(MemDevice::new("m", Bytes(1 << 20)));
        let e = UblkServer::start(dev.clone(), &UblkOptions::default()).unwrap_err();
        assert!(e.to_string().contains("/dev/ublk-control"), "{e}");
        let e = UblkServer::recover(dev, 0, &UblkOptions::default()).unwrap_err();
        assert!(e.to_string().contains("/dev/ublk-control"), "{e}");
    }
}
