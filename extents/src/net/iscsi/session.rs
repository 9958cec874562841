//! [`Session`]: one libiscsi context (one TCP connection and login), owned by the extent's
//! connection thread, with the callbacks that hand results back.
//!
//! Callbacks run only inside the libiscsi calls this module makes ([`Session::service`],
//! dropping the session), on the thread that owns the session. Each command's callback runs
//! exactly once (answered, failed, or cancelled when the context is destroyed) and owns the
//! task from then on; the data it needs travels in a box leaked at issue and taken back there.

use std::cell::{Cell, RefCell};
use std::ffi::{c_int, c_void, CStr, CString};
use std::sync::Arc;

use super::ffi::{self, IscsiContext, ScsiTask};
use super::queue::{Cmd, Issue, Queue};
use super::scsi::{verdict, Verdict};
use super::secret::Secret;
use crate::net::uri::IscsiUri;

/// The initiator name we log in with.
const INITIATOR: &CStr = c"iqn.2026-12.org.volmgr:initiator";

/// One zero-filled block for WRITE SAME (the largest block size we take); the library reads
/// it while the command is sent, and a static outlives any command.
static ZERO_BLOCK: [u8; 4096] = [0u8; 4096];

thread_local! {
    /// Set by a command's callback when the connection it ran on broke; the connection thread
    /// reads and clears it after each call into the library.
    static LOST: Cell<bool> = const { Cell::new(false) };
    /// Read buffers for reuse: the library receives read data straight into one (no copies
    /// of its own), the callback copies it to the requester.
    static BUFS: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// Buffers kept for reuse, at most.
const POOL_BUFS: usize = 32;
/// Bytes kept for reuse, at most.
const POOL_BYTES: usize = 64 << 20;

/// A zeroed buffer of `n` bytes (reused when one fits), so no byte of an earlier read can
/// show through a reply that does not cover the whole range.
fn take_buf(n: usize) -> Vec<u8> {
    let reused = BUFS.with(|b| {
        let mut b = b.borrow_mut();
        let i = b
            .iter()
            .position(|v| v.capacity() >= n && v.capacity() <= n.saturating_mul(4))?;
        Some(b.swap_remove(i))
    });
    match reused {
        Some(mut v) => {
            v.clear();
            v.resize(n, 0);
            v
        }
        None => vec![0u8; n],
    }
}

fn give_buf(v: Vec<u8>) {
    BUFS.with(|b| {
        let mut b = b.borrow_mut();
        let held: usize = b.iter().map(Vec::capacity).sum();
        if b.len() < POOL_BUFS && held + v.capacity() <= POOL_BYTES {
            b.push(v);
        }
    });
}

/// Whether a callback saw the connection break since the last call (clears the flag).
pub(crate) fn take_lost() -> bool {
    LOST.with(|l| l.replace(false))
}

/// The result of a probing command (INQUIRY, READ CAPACITY): status, sense key, ASC+ASCQ and
/// the data.
pub(crate) type ProbeResult = (c_int, c_int, c_int, Vec<u8>);

/// A libiscsi context and what its callbacks write into. Not `Send`: it lives and dies on the
/// connection thread.
pub(crate) struct Session {
    ctx: *mut IscsiContext,
    lun: c_int,
    block_size: c_int,
    /// The login's status and libiscsi's error text then, once its callback ran (boxed:
    /// libiscsi holds its address).
    connected: Box<RefCell<Option<(c_int, String)>>>,
    /// The last probe's result (boxed: libiscsi holds its address).
    probe: Box<RefCell<Option<ProbeResult>>>,
}

impl Session {
    /// A context set up for `uri`'s target (no connection yet): normal session, no header
    /// digest, libiscsi's own reconnection off (the connection thread reconnects and resends
    /// itself), CHAP with `secret` when the URI names a user.
    pub(crate) fn new(uri: &IscsiUri, secret: Option<&Secret>) -> Result<Session, String> {
        let target = CString::new(uri.target.as_str())
            .map_err(|_| "the target name holds a NUL byte".to_string())?;
        // SAFETY: INITIATOR is a valid C string; the context is ours until destroyed in Drop.
        let ctx = unsafe { ffi::iscsi_create_context(INITIATOR.as_ptr()) };
        if ctx.is_null() {
            return Err("libiscsi could not create a context (out of memory)".into());
        }
        let s = Session {
            ctx,
            lun: c_int::from(uri.lun),
            block_size: 512,
            connected: Box::new(RefCell::new(None)),
            probe: Box::new(RefCell::new(None)),
        };
        // SAFETY: `ctx` is live and used by this thread only; the strings outlive the calls
        // (libiscsi copies them).
        let ok = unsafe {
            ffi::iscsi_set_targetname(ctx, target.as_ptr()) == 0
                && ffi::iscsi_set_session_type(ctx, ffi::ISCSI_SESSION_NORMAL) == 0
                && ffi::iscsi_set_header_digest(ctx, ffi::ISCSI_HEADER_DIGEST_NONE) == 0
        };
        if !ok {
            return Err(format!("cannot set up the session: {}", s.error()));
        }
        // SAFETY: as above.
        unsafe { ffi::iscsi_set_noautoreconnect(ctx, 1) };
        if let (Some(user), Some(secret)) = (&uri.user, secret) {
            let user = CString::new(user.as_str())
                .map_err(|_| "the CHAP user holds a NUL byte".to_string())?;
            // SAFETY: as above; libiscsi copies both strings into the context.
            if unsafe {
                ffi::iscsi_set_initiator_username_pwd(ctx, user.as_ptr(), secret.as_cstr().as_ptr())
            } != 0
            {
                return Err(format!("cannot set the CHAP user: {}", s.error()));
            }
        }
        Ok(s)
    }

    /// libiscsi's last error message (it never holds the CHAP secret).
    pub(crate) fn error(&self) -> String {
        // SAFETY: `ctx` is live and used by this thread only.
        unsafe { error_of(self.ctx) }
    }

    /// Starts connecting and logging in to `portal` (`host:port`); [`Session::login_status`]
    /// tells when it is done.
    pub(crate) fn start_login(&mut self, portal: &str) -> Result<(), String> {
        let portal = CString::new(portal).map_err(|_| "the portal holds a NUL byte".to_string())?;
        let pd = &*self.connected as *const RefCell<Option<(c_int, String)>> as *mut c_void;
        // SAFETY: `ctx` is live; `pd` points into a box this session owns, which outlives the
        // context (Drop destroys the context first), so the callback can always write it.
        let r = unsafe {
            ffi::iscsi_full_connect_async(self.ctx, portal.as_ptr(), self.lun, login_cb, pd)
        };
        if r != 0 {
            return Err(self.error());
        }
        Ok(())
    }

    /// The login's SCSI status and libiscsi's error text at that time, once its callback ran.
    pub(crate) fn login_status(&self) -> Option<(c_int, String)> {
        self.connected.borrow().clone()
    }

    /// The socket to poll, or -1.
    pub(crate) fn fd(&self) -> c_int {
        // SAFETY: `ctx` is live.
        unsafe { ffi::iscsi_get_fd(self.ctx) }
    }

    /// The poll events the library waits for.
    pub(crate) fn which_events(&self) -> c_int {
        // SAFETY: `ctx` is live.
        unsafe { ffi::iscsi_which_events(self.ctx) }
    }

    /// Lets the library read and write its socket (`revents` as poll(2) reports them); runs
    /// callbacks. Negative when the connection is unusable.
    pub(crate) fn service(&mut self, revents: c_int) -> c_int {
        // SAFETY: `ctx` is live and used by this thread only; callbacks it runs touch only
        // their own boxes, this session's cells and the queue (under its lock).
        unsafe { ffi::iscsi_service(self.ctx, revents) }
    }

    /// The logical block size commands are built with (from READ CAPACITY).
    pub(crate) fn set_block_size(&mut self, bs: u32) {
        self.block_size = c_int::try_from(bs).unwrap_or(512);
    }

    /// Starts INQUIRY (a VPD page when `page` is given) or READ CAPACITY(16) (`page` none and
    /// `capacity`); [`Session::take_probe`] gives the result.
    pub(crate) fn start_probe(&mut self, page: Option<u8>, capacity: bool) -> Result<(), String> {
        *self.probe.borrow_mut() = None;
        let pd = &*self.probe as *const RefCell<Option<ProbeResult>> as *mut c_void;
        // SAFETY: `ctx` is live; `pd` points into a box this session owns, which outlives the
        // context, so the callback can always write it.
        let t = unsafe {
            match (page, capacity) {
                (_, true) => ffi::iscsi_readcapacity16_task(self.ctx, self.lun, probe_cb, pd),
                (Some(p), false) => ffi::iscsi_inquiry_task(
                    self.ctx,
                    self.lun,
                    1,
                    c_int::from(p),
                    255,
                    probe_cb,
                    pd,
                ),
                (None, false) => {
                    ffi::iscsi_inquiry_task(self.ctx, self.lun, 0, 0, 255, probe_cb, pd)
                }
            }
        };
        if t.is_null() {
            return Err(self.error());
        }
        Ok(())
    }

    /// The probe's result once its callback ran.
    pub(crate) fn take_probe(&self) -> Option<ProbeResult> {
        self.probe.borrow_mut().take()
    }

    /// Issues one request of `queue`; its callback reports to the queue.
    pub(crate) fn issue(&mut self, queue: &Arc<Queue>, r: Issue) -> Result<(), String> {
        let payload = match &r.cmd {
            Cmd::Write { data, .. } => Some(data.clone()),
            _ => None,
        };
        // Bytes moved by a read or write (the others carry no data of that length). A request
        // the library cannot take as built fails alone; the session is fine.
        let bs = u64::try_from(self.block_size).unwrap_or(512);
        let datalen = match &r.cmd {
            Cmd::Read | Cmd::Write { .. } => u32::try_from(u64::from(r.blocks) * bs).ok(),
            _ => Some(0),
        };
        // The library reads `datalen` bytes of a write's payload: it must have that many.
        let fits = payload
            .as_ref()
            .is_none_or(|p| Some(p.len() as u64) == datalen.map(u64::from));
        let Some(datalen) = datalen.filter(|_| fits) else {
            let why = format!(
                "cannot be sent as one command ({} blocks of {bs} bytes, payload {:?} bytes)",
                r.blocks,
                payload.as_ref().map(|p| p.len())
            );
            queue.complete(r.id, Verdict::Fail(libc::EINVAL, why), None);
            return Ok(());
        };
        let fua = matches!(r.cmd, Cmd::Write { fua: true, .. });
        let cmd = r.cmd;
        let mut cb = Box::new(IoCb {
            queue: queue.clone(),
            id: r.id,
            rbuf: matches!(cmd, Cmd::Read).then(|| take_buf(datalen as usize)),
            _payload: payload,
        });
        let data_ptr = cb
            ._payload
            .as_ref()
            .map_or(std::ptr::null_mut(), |p| p.as_ptr() as *mut u8);
        // The vector's memory does not move with the box.
        let rbuf_ptr = cb.rbuf.as_mut().map(|b| b.as_mut_ptr());
        let pd = Box::into_raw(cb) as *mut c_void;
        let (ctx, lun, bs) = (self.ctx, self.lun, self.block_size);
        // SAFETY: `ctx` is live. `pd` is the box leaked above: the callback takes it back
        // (libiscsi calls it exactly once for a command it accepted), or we do below when the
        // command was refused. The write payload is kept alive by that box until the
        // callback, so the library may read it until then; it never writes to it. The zero
        // block is static. The UNMAP descriptor is copied by the library.
        let t = unsafe {
            match cmd {
                Cmd::Read => {
                    ffi::iscsi_read16_task(ctx, lun, r.lba, datalen, bs, 0, 0, 0, 0, 0, io_cb, pd)
                }
                Cmd::Write { .. } => ffi::iscsi_write16_task(
                    ctx,
                    lun,
                    r.lba,
                    data_ptr,
                    datalen,
                    bs,
                    0,
                    0,
                    c_int::from(fua),
                    0,
                    0,
                    io_cb,
                    pd,
                ),
                Cmd::Flush => ffi::iscsi_synchronizecache16_task(ctx, lun, 0, 0, 0, 0, io_cb, pd),
                Cmd::Unmap => {
                    let mut d = ffi::UnmapList {
                        lba: r.lba,
                        num: r.blocks,
                    };
                    ffi::iscsi_unmap_task(ctx, lun, 0, 0, &mut d, 1, io_cb, pd)
                }
                Cmd::WriteZeroes => ffi::iscsi_writesame16_task(
                    ctx,
                    lun,
                    r.lba,
                    ZERO_BLOCK.as_ptr() as *mut u8,
                    u32::try_from(bs).unwrap_or(512),
                    r.blocks,
                    0,
                    0,
                    0,
                    0,
                    io_cb,
                    pd,
                ),
            }
        };
        if t.is_null() {
            // SAFETY: the library refused the command, so it never calls the callback: the
            // box is still ours.
            drop(unsafe { Box::from_raw(pd as *mut IoCb) });
            return Err(self.error());
        }
        if let (Some(p), Ok(len)) = (rbuf_ptr, c_int::try_from(datalen)) {
            // SAFETY: `t` is the task just created; no reply has been read yet (replies are
            // read only inside `service`). The buffer, `datalen` bytes, belongs to the
            // callback's box, which is freed only after the task completes. Should this fail,
            // the data arrives in the task's own buffer instead, which the callback also takes.
            unsafe { ffi::scsi_task_add_data_in_buffer(t, len, p) };
        }
        Ok(())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // SAFETY: `ctx` is live and destroyed once; the callbacks it runs for cancelled
        // commands (SCSI_STATUS_CANCELLED) write only into boxes that are still alive (this
        // session's fields are dropped after this body) and into their own boxes.
        unsafe { ffi::iscsi_destroy_context(self.ctx) };
    }
}

/// What a command's callback needs: where to report, the buffer a read's data arrives in,
/// and the write payload to keep alive.
struct IoCb {
    queue: Arc<Queue>,
    id: u64,
    rbuf: Option<Vec<u8>>,
    _payload: Option<Arc<[u8]>>,
}

/// libiscsi's last error message on `ctx`.
///
/// # Safety
/// `ctx` is a live context used by the calling thread only.
unsafe fn error_of(ctx: *mut IscsiContext) -> String {
    // SAFETY: per the caller; the returned string is owned by the context and copied here
    // before any other call into it.
    let p = unsafe { ffi::iscsi_get_error(ctx) };
    if p.is_null() {
        return "unknown libiscsi error".into();
    }
    // SAFETY: a non-null result is a NUL-terminated string inside the context.
    let s = unsafe { CStr::from_ptr(p) }.to_string_lossy();
    let s = s.trim();
    if s.is_empty() {
        "unknown libiscsi error".into()
    } else {
        s.to_string()
    }
}

/// The login's callback: records the status, and the error text before later calls
/// overwrite it.
unsafe extern "C" fn login_cb(
    ctx: *mut IscsiContext,
    status: c_int,
    _data: *mut c_void,
    pd: *mut c_void,
) {
    // SAFETY: libiscsi passes the live context it is running the callback for.
    let why = unsafe { error_of(ctx) };
    // SAFETY: `pd` is the session's `connected` cell (see `start_login`), alive for as long as
    // the context; this runs on the session's thread, never while the cell is borrowed.
    let cell = unsafe { &*(pd as *const RefCell<Option<(c_int, String)>>) };
    if let Ok(mut c) = cell.try_borrow_mut() {
        *c = Some((status, why));
    }
}

/// Copies a task's sense and data and frees it.
///
/// # Safety
/// `task` is null or a task the library handed to a callback (ours to free).
unsafe fn take_task(task: *mut ScsiTask, want_data: bool) -> (c_int, c_int, Option<Vec<u8>>) {
    if task.is_null() {
        return (0, 0, None);
    }
    // SAFETY: the caller guarantees `task` is a live task; its `datain` is `size` bytes at
    // `data` when `data` is not null.
    let out = unsafe {
        let t = &*task;
        let data = (want_data && !t.datain.data.is_null())
            .then(|| {
                usize::try_from(t.datain.size)
                    .ok()
                    .map(|n| std::slice::from_raw_parts(t.datain.data, n).to_vec())
            })
            .flatten();
        (t.sense.key, t.sense.ascq, data)
    };
    // SAFETY: the task is ours to free, once.
    unsafe { ffi::scsi_free_scsi_task(task) };
    out
}

/// A probe's callback: records status, sense and data, frees the task.
unsafe extern "C" fn probe_cb(
    _ctx: *mut IscsiContext,
    status: c_int,
    data: *mut c_void,
    pd: *mut c_void,
) {
    // SAFETY: `data` is this command's task (or null), handed to us to free.
    let (key, ascq, bytes) = unsafe { take_task(data as *mut ScsiTask, true) };
    // SAFETY: `pd` is the session's `probe` cell (see `start_probe`), alive for as long as
    // the context; this runs on the session's thread, never while the cell is borrowed.
    let cell = unsafe { &*(pd as *const RefCell<Option<ProbeResult>>) };
    if let Ok(mut c) = cell.try_borrow_mut() {
        *c = Some((status, key, ascq, bytes.unwrap_or_default()));
    }
}

/// A request's callback: judges the result, copies read data into the requester's buffer
/// (under the queue's lock), frees the task, and only then lets go of the write payload.
unsafe extern "C" fn io_cb(
    _ctx: *mut IscsiContext,
    status: c_int,
    data: *mut c_void,
    pd: *mut c_void,
) {
    // SAFETY: `pd` is the box `Session::issue` leaked for this command; this callback runs
    // once per command, so the box is taken back once.
    let mut cb = unsafe { Box::from_raw(pd as *mut IoCb) };
    let task = data as *mut ScsiTask;
    let (key, ascq, data) = if task.is_null() {
        (0, 0, None)
    } else {
        // SAFETY: a non-null `data` is this command's live task; its `datain` is `size` bytes
        // at `data` when `data` is not null.
        unsafe {
            let t = &*task;
            let bytes = if status != ffi::SCSI_STATUS_GOOD {
                None
            } else if !t.datain.data.is_null() {
                usize::try_from(t.datain.size)
                    .ok()
                    .map(|n| std::slice::from_raw_parts(t.datain.data as *const u8, n))
            } else {
                // The data went into our buffer; an underflow leaves its tail unwritten.
                cb.rbuf.as_deref().map(|b| {
                    let short = if t.residual_status == ffi::SCSI_RESIDUAL_UNDERFLOW {
                        t.residual.min(b.len())
                    } else {
                        0
                    };
                    &b[..b.len() - short]
                })
            };
            (t.sense.key, t.sense.ascq, bytes)
        }
    };
    let v = if task.is_null() && status == ffi::SCSI_STATUS_GOOD {
        Verdict::Reconnect("a command completed without its task".into())
    } else {
        verdict(status, key, ascq)
    };
    if !cb.queue.complete(cb.id, v, data) {
        LOST.with(|l| l.set(true));
    }
    if !task.is_null() {
        // SAFETY: the task is ours to free, once; `data` (borrowed from it) is not used after.
        unsafe { ffi::scsi_free_scsi_task(task) };
    }
    if let Some(b) = cb.rbuf.take() {
        give_buf(b);
    }
    drop(cb);
}
