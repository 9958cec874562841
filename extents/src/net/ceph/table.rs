//! [`Requests`]: the requests of one Ceph extent in flight in librbd or librados, and the
//! [`Job`] each of them hands to the library.
//!
//! A requester registers a slot (for a read, its buffer as a [`DstBuf`]) and submits a
//! [`Job`] that owns the bytes the library touches: the bounce buffer a read lands in, or the
//! copy of a write's payload. The library calls back on one of its own threads; the callback
//! takes the job back, copies read data into the requester's buffer *under this table's
//! lock* if the slot still holds it, records the outcome and wakes the requester, then frees
//! the job. A requester whose future is dropped withdraws its buffer under the same lock, so
//! the library never writes into its memory and nothing the library still uses is freed: the
//! job stays with the library until the callback.
//!
//! Reconnection is librados's: it resends operations as monitors and OSDs come and go, for
//! up to `rados_osd_op_timeout` (timeout plus reconnect-delay). Each request also has that
//! deadline here; past it the request fails with EIO and the extent is `failed`: new
//! requests fail at once with EIO while a probe goes out every second, until an operation
//! succeeds again (then [`Requests::generation`] grows, which raid takes as "back").

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tables::io::errno_name;
use tables::registry::ExtentHealth;
use tables::{IoError, IoResult};

use crate::net::lend::{DstBuf, Outcomes, SlotWait};
use crate::net::uri::NetOptions;

/// `EIO (Input/output error)`-style text for a librados/librbd result (a negative errno).
pub(crate) fn errno_text(ret: i64) -> String {
    let e = i32::try_from(ret.unsigned_abs()).unwrap_or(libc::EIO);
    let name = match errno_name(e) {
        "errno" => match e {
            libc::ENOENT => "ENOENT".to_string(),
            libc::EPERM => "EPERM".to_string(),
            libc::EACCES => "EACCES".to_string(),
            libc::ENOTCONN => "ENOTCONN".to_string(),
            libc::ESHUTDOWN => "ESHUTDOWN".to_string(),
            libc::EDQUOT => "EDQUOT".to_string(),
            _ => format!("errno {e}"),
        },
        n => n.to_string(),
    };
    format!("{name} ({})", crate::sys::errno_text(e))
}

/// What a job does, for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OpKind {
    Read,
    Write {
        fua: bool,
    },
    Flush,
    Discard,
    WriteZeroes,
    /// A `rados:` object removal (a discard of a whole object).
    Remove,
    /// An operation checking that the cluster answers again (no requester).
    Probe,
}

impl OpKind {
    fn name(self) -> &'static str {
        match self {
            OpKind::Read => "read",
            OpKind::Write { fua: false } => "write",
            OpKind::Write { fua: true } => "write (FUA)",
            OpKind::Flush => "flush",
            OpKind::Discard => "discard",
            OpKind::WriteZeroes => "write-zeroes",
            OpKind::Remove => "remove",
            OpKind::Probe => "probe",
        }
    }
}

/// Where a request is, for messages: the operation, the byte range of the extent, and for
/// `rados:` the object.
#[derive(Clone, Debug)]
pub(crate) struct Where {
    pub kind: OpKind,
    pub offset: u64,
    pub len: u64,
    pub object: Option<String>,
}

impl std::fmt::Display for Where {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            OpKind::Flush | OpKind::Probe => f.write_str(self.kind.name())?,
            k => write!(
                f,
                "{} at byte {} length {}",
                k.name(),
                self.offset,
                self.len
            )?,
        }
        if let Some(o) = &self.object {
            write!(f, " (object {o})")?;
        }
        Ok(())
    }
}

struct Slot {
    at: Where,
    /// Where read data goes: present exactly while the requester waits for an outcome.
    dst: Option<DstBuf>,
    started: Instant,
    deadline: Instant,
    outcome: Option<IoResult<()>>,
    waker: Option<Waker>,
}

impl Slot {
    fn settle(&mut self, r: IoResult<()>) {
        if self.outcome.is_none() {
            self.outcome = Some(r);
            self.dst = None;
            if let Some(w) = self.waker.take() {
                w.wake();
            }
        }
    }
}

struct State {
    /// Requests whose requester still waits (slots leave when the requester does).
    slots: HashMap<u64, Slot>,
    next_id: u64,
    /// A request went unanswered past its deadline: requests fail at once until an
    /// operation succeeds.
    failed: bool,
    failed_since: Option<Instant>,
    /// 1, plus one per recovery from `failed`.
    gen: u64,
    last_error: Option<String>,
    /// Jobs the library holds (their callbacks have not run), requester or not.
    with_library: u64,
    /// When the last probe went out.
    probed: Option<Instant>,
    /// A probe is with the library.
    probe_out: bool,
}

/// Counters for status.
#[derive(Default)]
pub(crate) struct Stats {
    /// Requests that failed.
    pub errors: AtomicU64,
    /// Requests that ran past their deadline.
    pub timeouts: AtomicU64,
    /// Smoothed latency of completed operations, microseconds.
    pub latency_us: AtomicU64,
}

/// The request table of one extent.
pub(crate) struct Requests {
    /// The extent's name (its URI, which holds no secret), for messages.
    pub name: String,
    pub opts: NetOptions,
    st: Mutex<State>,
    pub stats: Stats,
    stop: AtomicBool,
}

impl Requests {
    pub(crate) fn new(name: String, opts: NetOptions) -> Requests {
        Requests {
            name,
            opts,
            st: Mutex::new(State {
                slots: HashMap::new(),
                next_id: 1,
                failed: false,
                failed_since: None,
                gen: 1,
                last_error: None,
                with_library: 0,
                probed: None,
                probe_out: false,
            }),
            stats: Stats::default(),
            stop: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How long the library may take over one operation (and a request may wait).
    pub(crate) fn op_window(&self) -> Duration {
        self.opts.timeout + self.opts.reconnect_delay
    }

    /// Registers a request; EIO at once while the extent is failed.
    pub(crate) fn register(&self, at: Where, dst: Option<DstBuf>) -> IoResult<u64> {
        let mut st = self.lock();
        if st.failed {
            let since = st
                .failed_since
                .map(|t| format!(" for {:.1} s", t.elapsed().as_secs_f64()))
                .unwrap_or_default();
            let why = st.last_error.clone().unwrap_or_default();
            drop(st);
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            return Err(IoError::eio(format!(
                "{}: {at}: the cluster has not answered{since} (failed): {why}",
                self.name
            )));
        }
        let id = st.next_id;
        st.next_id = st.next_id.wrapping_add(1).max(1);
        let now = Instant::now();
        st.slots.insert(
            id,
            Slot {
                at,
                dst,
                started: now,
                deadline: now + self.op_window(),
                outcome: None,
                waker: None,
            },
        );
        Ok(id)
    }

    /// A job was handed to the library.
    fn handed(&self) {
        self.lock().with_library += 1;
    }

    /// Jobs the library still holds.
    pub(crate) fn with_library(&self) -> u64 {
        self.lock().with_library
    }

    /// The library took a job back (its callback ran, or the submission failed): `ret` is
    /// its result, `data` the bytes a read got (`n` of them valid, the rest zeroes).
    fn finish(&self, id: u64, kind: OpKind, ret: i64, data: Option<(&[u8], usize)>) {
        let mut st = self.lock();
        st.with_library = st.with_library.saturating_sub(1);
        if kind == OpKind::Probe {
            st.probe_out = false;
        }
        let ok = ret >= 0;
        if ret == -i64::from(libc::ETIMEDOUT) && !st.failed {
            log::error!(
                "{}: librados gave up on an operation after timeout plus reconnect-delay: \
                 requests fail with EIO until the cluster answers",
                self.name
            );
            st.failed = true;
            st.failed_since = Some(Instant::now());
            st.last_error = Some(format!("{} timed out in librados", kind.name()));
        }
        if ok && st.failed {
            st.failed = false;
            st.failed_since = None;
            st.gen += 1;
            log::warn!("{}: the cluster answers again", self.name);
        }
        let now = Instant::now();
        let Some(s) = st.slots.get_mut(&id) else {
            return; // a probe, or a requester that left
        };
        let lat = now.saturating_duration_since(s.started);
        let r = if ok {
            match (s.dst, data) {
                (Some(d), Some((src, n))) => {
                    let n = n.min(src.len()).min(d.len());
                    // SAFETY: we hold the table's lock and the slot still holds `d` (its
                    // requester withdraws it under this lock before its buffer can go).
                    let copied = unsafe {
                        d.write_at(0, Some(&src[..n]), 0) && d.write_at(n, None, d.len() - n)
                    };
                    if copied {
                        Ok(())
                    } else {
                        Err(IoError::eio(format!(
                            "{}: {}: the reply does not fit the buffer",
                            self.name, s.at
                        )))
                    }
                }
                _ => Ok(()),
            }
        } else {
            let errno = i32::try_from(ret.unsigned_abs()).unwrap_or(libc::EIO);
            // librados gave up after its op timeout: a request's time is up (EIO, as NBD).
            let (errno, why) = if errno == libc::ETIMEDOUT {
                (
                    libc::EIO,
                    format!(
                        "no answer within timeout plus reconnect-delay ({:.1} s): {}",
                        self.op_window().as_secs_f64(),
                        errno_text(ret)
                    ),
                )
            } else {
                (errno, errno_text(ret))
            };
            let msg = format!("{}: {}: {why}", self.name, s.at);
            Err(IoError::new(errno, msg))
        };
        if let Err(e) = &r {
            log::debug!("{e}");
        }
        s.settle(r);
        drop(st);
        let us = lat.as_micros().min(u128::from(u32::MAX)) as u64;
        let old = self.stats.latency_us.load(Ordering::Relaxed);
        let new = if old == 0 { us } else { (old * 7 + us) / 8 };
        self.stats.latency_us.store(new, Ordering::Relaxed);
    }

    /// Periodic check: requests past their deadline fail with EIO and make the extent
    /// failed. Returns whether a probe should go out now (failed, none for a second).
    pub(crate) fn tick(&self, now: Instant) -> bool {
        let mut st = self.lock();
        let mut expired = 0;
        let mut why = None;
        for s in st.slots.values_mut() {
            if s.outcome.is_none() && now >= s.deadline {
                expired += 1;
                let msg = format!(
                    "{}: {}: no answer within timeout plus reconnect-delay ({:.1} s)",
                    self.name,
                    s.at,
                    self.op_window().as_secs_f64()
                );
                why.get_or_insert_with(|| msg.clone());
                s.settle(Err(IoError::eio(msg)));
            }
        }
        if expired > 0 {
            // (Counted in `errors` when their requesters take them.)
            self.stats.timeouts.fetch_add(expired, Ordering::Relaxed);
            if !st.failed {
                log::error!(
                    "{}: the cluster did not answer within timeout plus reconnect-delay: \
                     requests fail with EIO until it does",
                    self.name
                );
                st.failed = true;
                st.failed_since = Some(now);
            }
            st.last_error = why;
        }
        let probe = st.failed
            && !st.probe_out
            && !self.stopped()
            && st
                .probed
                .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1));
        if probe {
            st.probed = Some(now);
            st.probe_out = true;
        }
        probe
    }

    /// `up`, `reconnecting` (a request has waited longer than `timeout`: librados is
    /// resending it), or `failed`.
    fn state(&self, st: &State) -> &'static str {
        if st.failed {
            "failed"
        } else if st
            .slots
            .values()
            .any(|s| s.outcome.is_none() && s.started.elapsed() > self.opts.timeout)
        {
            "reconnecting"
        } else {
            "up"
        }
    }

    /// 1, plus one for each time the extent came back from `failed`.
    pub(crate) fn generation(&self) -> u64 {
        self.lock().gen
    }

    /// The health fields this table knows (state, in flight, timeouts, latency, last error).
    pub(crate) fn health(&self, server: String) -> ExtentHealth {
        let st = self.lock();
        let state = self.state(&st);
        ExtentHealth {
            state: state.to_string(),
            server,
            connections_up: u32::from(state != "failed"),
            connections: 1,
            inflight: st.slots.values().filter(|s| s.outcome.is_none()).count() as u64,
            reconnects: st.gen - 1,
            timeouts: self.stats.timeouts.load(Ordering::Relaxed),
            dropped: 0,
            rtt_us: self.stats.latency_us.load(Ordering::Relaxed),
            last_error: st.last_error.clone(),
        }
    }

    pub(crate) fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// Waits until the library holds no job (bounded by `limit`); false if some remain.
    pub(crate) fn drain(&self, limit: Duration) -> bool {
        let until = Instant::now() + limit;
        while self.with_library() > 0 {
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }
}

impl Outcomes for Requests {
    type Outcome = IoResult<()>;

    fn poll_outcome(&self, cx: &mut Context<'_>, id: u64) -> Poll<IoResult<()>> {
        let mut st = self.lock();
        let Some(s) = st.slots.get_mut(&id) else {
            return Poll::Ready(Err(IoError::eio(format!(
                "{}: request {id} lost",
                self.name
            ))));
        };
        match s.outcome.take() {
            Some(r) => {
                st.slots.remove(&id);
                if r.is_err() {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                }
                Poll::Ready(r)
            }
            None => {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    /// The requester leaves: its slot (and so its buffer) is gone; the job stays with the
    /// library, and its callback finds no slot.
    fn withdraw(&self, id: u64) {
        self.lock().slots.remove(&id);
    }
}

/// Which library a job's completion belongs to (they are released differently).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lib {
    Rbd,
    Rados,
}

/// One operation handed to librbd or librados: everything it touches until its callback.
pub(crate) struct Job {
    pub req: Arc<Requests>,
    pub id: u64,
    pub kind: OpKind,
    /// A read's bounce buffer or a write's payload (owned here, never a requester's).
    pub buf: Vec<u8>,
    /// `rados:` object name (the library copies it, but it lives here until the end anyway).
    pub oid: Option<std::ffi::CString>,
    /// Which library holds it. For librados a read's result is the bytes the object had (the
    /// rest reads as zeroes), and a missing object (ENOENT) is a hole, not an error.
    pub lib: Lib,
    /// `rados_aio_stat`'s outputs (probes).
    pub stat: (u64, libc::time_t),
}

impl Job {
    pub(crate) fn new(
        lib: Lib,
        req: &Arc<Requests>,
        id: u64,
        kind: OpKind,
        buf: Vec<u8>,
    ) -> Box<Job> {
        Box::new(Job {
            req: req.clone(),
            id,
            kind,
            buf,
            oid: None,
            lib,
            stat: (0, 0),
        })
    }

    fn done(self, ret: i64) {
        let rados = self.lib == Lib::Rados;
        let ret = if rados && ret == -i64::from(libc::ENOENT) {
            0
        } else {
            ret
        };
        let data = (self.kind == OpKind::Read).then(|| {
            let n = if rados {
                usize::try_from(ret).unwrap_or(0) // librados: the bytes the object had
            } else {
                self.buf.len() // librbd: all of them, or an error
            };
            (&self.buf[..], n)
        });
        self.req.finish(self.id, self.kind, ret, data);
    }

    /// Hands the job to the library: `issue` gets the job's address (for the completion's
    /// argument) and issues the operation, returning the library's immediate result. If that
    /// is an error the library will not call back: the job is finished here with it.
    ///
    /// # Safety
    /// `issue` must hand the pointer it gets to exactly one completion whose callback is
    /// [`rbd_done`] (for [`Lib::Rbd`]) or [`rados_done`], and on a negative return must have
    /// released that completion (or never created it).
    pub(crate) unsafe fn hand_over(self: Box<Job>, issue: impl FnOnce(*mut Job) -> i64) {
        let req = self.req.clone();
        req.handed();
        let p = Box::into_raw(self);
        let r = issue(p);
        if r < 0 {
            // SAFETY: the library refused the operation, so no callback will take `p` back
            // (the caller's promise); it is ours again.
            let job = unsafe { Box::from_raw(p) };
            (*job).done(r);
        }
    }
}

/// librbd's completion callback: takes the job back, finishes it, releases the completion.
pub(crate) extern "C" fn rbd_done(c: super::ffi::rbd_completion_t, arg: *mut c_void) {
    // SAFETY: `arg` is the job leaked by `hand_over` for this completion alone; librbd calls
    // back exactly once, so the job is taken back once.
    let job = unsafe { Box::from_raw(arg.cast::<Job>()) };
    // SAFETY: `c` is the live completion this callback is for.
    let ret = unsafe { super::ffi::rbd_aio_get_return_value(c) } as i64;
    // SAFETY: as above; nothing uses `c` after this (qemu's driver releases it here too).
    unsafe { super::ffi::rbd_aio_release(c) };
    (*job).done(ret);
}

/// librados's completion callback: as [`rbd_done`].
pub(crate) extern "C" fn rados_done(c: super::ffi::rados_completion_t, arg: *mut c_void) {
    // SAFETY: as in `rbd_done`.
    let job = unsafe { Box::from_raw(arg.cast::<Job>()) };
    // SAFETY: `c` is the live completion this callback is for.
    let ret = i64::from(unsafe { super::ffi::rados_aio_get_return_value(c) });
    // SAFETY: librados holds its own reference while the callback runs.
    unsafe { super::ffi::rados_aio_release(c) };
    (*job).done(ret);
}

/// An extent's side of the table: how it hands a job to its library.
pub(crate) trait Issuer: Send + Sync {
    /// The library its jobs go to.
    const LIB: Lib;
    /// Its request table.
    fn requests(&self) -> &Arc<Requests>;
    /// Issues `job` as `at` says (an [`OpKind::Probe`]: some harmless operation that needs
    /// the cluster to answer), through [`Job::hand_over`].
    fn issue(&self, job: Box<Job>, at: &Where);
}

/// One request, waited for: registered (with `dst`, a read's destination), handed to the
/// library with `buf` (a read's bounce buffer of `at.len` bytes, or a write's payload).
///
/// # Safety
/// The memory behind `dst` is lent to the library's callback thread: keep the
/// [lending contract](tables::io#the-lending-contract) for the returned future.
pub(crate) async unsafe fn request<I: Issuer>(
    iss: &I,
    at: Where,
    dst: Option<DstBuf>,
    buf: Vec<u8>,
) -> IoResult<()> {
    let req = iss.requests();
    let id = req.register(at.clone(), dst)?;
    // Waiting starts before the job is handed over, so a callback that runs at once finds
    // the slot, and a future dropped from here on withdraws it.
    let wait = SlotWait::new(&**req, id);
    iss.issue(Job::new(I::LIB, req, id, at.kind, buf), &at);
    wait.await
}

/// The extent's watchdog thread: deadlines, and probes while failed. Ends when the extent
/// is dropped.
pub(crate) fn spawn_watchdog<I: Issuer + 'static>(
    p: Weak<I>,
    req: Arc<Requests>,
) -> Result<(), String> {
    let tick = (req.opts.timeout / 10).clamp(Duration::from_millis(20), Duration::from_millis(250));
    std::thread::Builder::new()
        .name("ceph-watchdog".into())
        .spawn(move || {
            while !req.stopped() {
                std::thread::sleep(tick);
                if req.tick(Instant::now()) {
                    let Some(p) = p.upgrade() else { break };
                    let at = Where {
                        kind: OpKind::Probe,
                        offset: 0,
                        len: 0,
                        object: None,
                    };
                    p.issue(Job::new(I::LIB, &req, 0, OpKind::Probe, Vec::new()), &at);
                }
            }
        })
        .map(|_| ())
        .map_err(|e| format!("cannot start the watchdog thread: {e}"))
}

/// Ends an extent's use of its library handles: stops the watchdog and waits (up to the
/// operation window plus 5 s) until the library has called back for every job. True if the
/// handles may be closed; false if jobs remain, when they must be leaked instead (closing
/// them under a job the library still runs would be unsound).
pub(crate) fn retire(req: &Requests) -> bool {
    req.stop();
    let ok = req.drain(req.op_window() + Duration::from_secs(5));
    if !ok {
        log::error!(
            "{}: {} operations still in the library at close: its handles are leaked",
            req.name,
            req.with_library()
        );
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::uri::NetUri;

    fn table(opts: &str) -> Requests {
        let NetUri::Rbd(u) = NetUri::parse(&format!("rbd:p/i{opts}")).unwrap() else {
            panic!()
        };
        Requests::new(u.to_string(), u.opts)
    }

    fn at(kind: OpKind) -> Where {
        Where {
            kind,
            offset: 4096,
            len: 4,
            object: None,
        }
    }

    fn poll(r: &Requests, id: u64) -> Poll<IoResult<()>> {
        r.poll_outcome(&mut Context::from_waker(Waker::noop()), id)
    }

    #[test]
    fn read_data_reaches_only_a_buffer_still_lent() {
        let r = table("");
        let mut buf = [9u8; 4];
        let id = r
            .register(at(OpKind::Read), Some(DstBuf::new(&mut buf)))
            .unwrap();
        assert!(poll(&r, id).is_pending());
        // Two bytes came (a short RADOS object): the rest reads as zeroes.
        r.finish(id, OpKind::Read, 2, Some((&[1, 2, 3, 4], 2)));
        assert!(matches!(poll(&r, id), Poll::Ready(Ok(()))));
        assert_eq!(buf, [1, 2, 0, 0]);

        let mut gone = [9u8; 4];
        let id = r
            .register(at(OpKind::Read), Some(DstBuf::new(&mut gone)))
            .unwrap();
        r.withdraw(id);
        r.finish(id, OpKind::Read, 4, Some((&[5, 5, 5, 5], 4)));
        assert_eq!(gone, [9u8; 4], "a withdrawn buffer was written");

        let id = r.register(at(OpKind::Write { fua: true }), None).unwrap();
        r.finish(
            id,
            OpKind::Write { fua: true },
            -i64::from(libc::ENOSPC),
            None,
        );
        let Poll::Ready(Err(e)) = poll(&r, id) else {
            panic!()
        };
        assert_eq!(e.errno, libc::ENOSPC);
        assert!(
            e.msg
                .contains("rbd:p/i: write (FUA) at byte 4096 length 4: ENOSPC"),
            "{e}"
        );
    }

    #[test]
    fn past_the_deadline_eio_then_failed_until_an_operation_succeeds() {
        let r = table("?timeout=0.05&reconnect-delay=0.05");
        let t0 = Instant::now();
        let id = r.register(at(OpKind::Flush), None).unwrap();
        assert!(!r.tick(t0));
        assert!(poll(&r, id).is_pending(), "within the window it waits");
        // Past timeout + reconnect-delay: EIO, failed, new requests fail at once, a probe.
        assert!(r.tick(t0 + Duration::from_millis(200)));
        let Poll::Ready(Err(e)) = poll(&r, id) else {
            panic!()
        };
        assert_eq!(e.errno, libc::EIO);
        assert!(e.msg.contains("flush: no answer within"), "{e}");
        assert_eq!(r.health(String::new()).state, "failed");
        let e = r.register(at(OpKind::Read), None).unwrap_err();
        assert!(e.errno == libc::EIO && e.msg.contains("failed"), "{e}");
        assert!(!r.tick(t0 + Duration::from_secs(5)), "one probe at a time");
        // The late answer of the first request, then the probe: up again, counted.
        r.finish(id, OpKind::Flush, 0, None);
        r.finish(0, OpKind::Probe, 0, None);
        assert_eq!(r.health(String::new()).state, "up");
        assert_eq!(r.generation(), 2);
        assert_eq!(r.stats.errors.load(Ordering::Relaxed), 2);
        assert!(r.register(at(OpKind::Read), None).is_ok());
    }
}
