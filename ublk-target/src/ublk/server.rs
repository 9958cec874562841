//! [`UblkServer`]: a device's lifecycle (start, recover, update_size, stop) and its control
//! thread, which runs libublk's `run_target`.

use std::os::fd::AsRawFd;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::{sys, UblkError, UblkFlags};
use tables::io::DeviceRef;

use super::failure::{panic_message, DeviceFailure};
use super::options::{check_options, describe, want_zero_copy, ZERO_COPY_FLAGS};
use super::queue::{queue_thread, QueueSetup};
use super::{UblkOptions, UblkTargetError};
use crate::ublk_params;

/// How long `start` waits for the kernel to bring the device up (TCG guests are slow).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long to wait for `/dev/ublkbN` to appear or vanish.
const NODE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `stop` waits for the queue threads after STOP_DEV.
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);

/// A device being served as `/dev/ublkbN`. Dropping it stops it too (errors are then only
/// logged); call [`UblkServer::stop`] to see them.
pub struct UblkServer {
    dev: DeviceRef,
    name: String,
    dev_id: u32,
    ctrl: Option<Arc<UblkCtrl>>,
    thread: Option<JoinHandle<Result<(), String>>>,
    failure: Arc<DeviceFailure>,
}

impl std::fmt::Debug for UblkServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UblkServer")
            .field("name", &self.name)
            .field("dev_id", &self.dev_id)
            .field("running", &self.ctrl.is_some())
            .field("failed", &self.failure.reason())
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
        let failure = Arc::new(DeviceFailure::new(name.clone(), Arc::downgrade(&ctrl)));
        let (tx, rx) = mpsc::channel::<Result<(), String>>();
        let thread = {
            let ctrl = ctrl.clone();
            let dev = dev.clone();
            let failure = failure.clone();
            std::thread::Builder::new()
                .name(format!("ublk{dev_id}-ctrl"))
                .spawn(move || run_device(ctrl, dev, tx, setup, failure))
        };
        let mut server = UblkServer {
            dev,
            name: name.clone(),
            dev_id,
            ctrl: Some(ctrl),
            thread: None,
            failure,
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

    /// Why the device failed while serving, if it did: one of its queue threads died (its
    /// event loop or a tag's commands failed, or it panicked). The device is then stopped
    /// (STOP_DEV, from a thread of its own) so that the kernel fails its outstanding and new
    /// I/O, which nobody would serve; what is left is to [`stop`](UblkServer::stop) it, which
    /// deletes it and returns this reason as its error.
    pub fn failed(&self) -> Option<String> {
        self.failure.reason()
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
        let failed = self.failure.reason();
        if let Some(why) = &failed {
            note(UblkTargetError::Failed {
                dev: self.name.clone(),
                msg: format!("{bdev} failed while serving: {why}"),
            });
        }

        // 1. Dirty pages of the block device, then a FLUSH through the queues to the table.
        //    Only while the server still runs (a failed start or a failed queue has no
        //    serving queues).
        if failed.is_none()
            && self.thread.as_ref().is_some_and(|t| !t.is_finished())
            && Path::new(&bdev).exists()
        {
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
        self.failure.mark_stopping();
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
        // 4. DEL_DEV (the control thread has dropped its reference by now, and so has the
        //    thread that stopped a failed device once it is done).
        if !self.failure.join_stopper(JOIN_TIMEOUT) {
            note(UblkTargetError::Failed {
                dev: self.name.clone(),
                msg: format!(
                    "stopping the failed device did not finish within {}s",
                    JOIN_TIMEOUT.as_secs()
                ),
            });
        }
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

impl Drop for UblkServer {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            log::error!("stopping ublk device on drop: {e}");
        }
    }
}

pub(super) fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
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
pub(super) fn ensure_ctrl_ring() -> Result<(), UblkError> {
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
    failure: Arc<DeviceFailure>,
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
    let q_failure = failure.clone();
    let q_fn = move |qid: u16, udev: &UblkDev| {
        name_thread(&format!("ublk{dev_id}-q{qid}"));
        if let Ok(mut t) = q_tids.lock() {
            // SAFETY: gettid has no preconditions.
            t.push(unsafe { libc::gettid() });
        }
        let served = std::panic::catch_unwind(AssertUnwindSafe(|| {
            queue_thread(qid, udev, qdev, setup, &q_failure)
        }));
        if let Err(panic) = served {
            let why = format!("the thread panicked: {}", panic_message(&*panic));
            q_failure.fail(&format!("ublk queue {qid}"), why);
        }
    };
    let tx = started.clone();
    let on_started = move |_: &UblkCtrl| {
        failure.mark_started();
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

/// Lets the threads `tids` run on every CPU this process may use.
fn unpin(tids: &[libc::pid_t]) {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it for this process.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: sched_getaffinity writes at most `size` bytes into `set`, which is ours.
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

#[cfg(test)]
mod tests {
    use super::*;
    use tables::mem::MemDevice;
    use tables::Bytes;

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
