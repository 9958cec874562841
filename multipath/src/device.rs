//! The multipath device: the request path (select, send, fail the path and retry on
//! another on a path error, queue while no path is usable), path state changes and the
//! waiters they release.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Poll, Waker};
use std::time::Duration;

use tables::io::{
    check_range, BlockDevice, DeviceRef, FixedBuf, IoError, IoFuture, IoResult, Limits, Served,
    WriteFlags,
};
use tables::Bytes;

use crate::parse::MultipathConfig;
use crate::selector::{Group, InFlight, Path};

/// How a built device runs.
#[derive(Copy, Clone, Debug)]
pub struct OpenOptions {
    /// Whether the device runs its own path checker thread (default true). Tests turn it
    /// off and call [`MultipathDevice::check_paths`] themselves.
    pub background: bool,
}

impl Default for OpenOptions {
    fn default() -> OpenOptions {
        OpenOptions { background: true }
    }
}

/// Errors that are the device's answer, not the path's: returned as they are, without
/// failing the path or trying another (dm's `blk_path_error` is false for these).
pub fn is_target_error(errno: i32) -> bool {
    matches!(
        errno,
        libc::EINVAL
            | libc::ENOSPC
            | libc::EROFS
            | libc::EOPNOTSUPP
            | libc::EFBIG
            | libc::EILSEQ
            | libc::ENODATA
            | libc::EREMOTEIO
            | libc::EBADE
            | libc::ENOMEM
            | libc::EDQUOT
    )
}

/// What may change while requests wait for a path.
pub(crate) struct State {
    /// `queue_if_no_path` as last set (table, then messages).
    pub queue_if_no_path: bool,
    /// `no_path_retry N`: checker intervals without a usable path before queued I/O fails.
    pub retry_limit: Option<u32>,
    /// Checker intervals in a row that found no usable path.
    pub no_path_checks: u32,
    /// Requests waiting for a path, by waiter id.
    pub waiters: BTreeMap<u64, Waker>,
    next_waiter: u64,
}

impl State {
    /// Whether a request with no usable path waits (rather than failing).
    pub fn queueing(&self) -> bool {
        self.queue_if_no_path && self.retry_limit.is_none_or(|n| self.no_path_checks < n)
    }

    /// Wakes every waiting request (it looks at the paths again).
    pub fn wake_all(&mut self) {
        for (_, w) in std::mem::take(&mut self.waiters) {
            w.wake();
        }
    }
}

/// Shared by the device and its checker thread (which holds a `Weak`).
pub(crate) struct Inner {
    pub name: String,
    pub size: Bytes,
    pub cfg: MultipathConfig,
    pub paths: Vec<Path>,
    pub groups: Vec<Group>,
    /// `switch_group` / the initial group: tried first (0-based; `usize::MAX`: none).
    pub preferred: AtomicUsize,
    pub state: Mutex<State>,
    pub limits: Limits,
    pub checker_interval: Duration,
    /// Requests that found no usable path and waited (for tests and status).
    pub queued_total: AtomicU64,
}

/// Stops the checker thread when the device goes.
pub(crate) struct Stop {
    pub stop: AtomicBool,
    pub wake: (Mutex<()>, Condvar),
}

/// A multipath device: one device reached through several paths, grouped by priority.
pub struct MultipathDevice {
    pub(crate) inner: Arc<Inner>,
    stop: Arc<Stop>,
}

/// One request, reissued whole on another path after a path error.
enum Op<'b> {
    Read(&'b mut [u8]),
    Write(&'b [u8], WriteFlags),
    ReadFixed(FixedBuf),
    WriteFixed(FixedBuf, WriteFlags),
    Flush,
    Discard(Bytes),
    WriteZeroes(Bytes, WriteFlags),
}

impl Op<'_> {
    fn len(&self) -> u64 {
        match self {
            Op::Read(b) => b.len() as u64,
            Op::Write(b, _) => b.len() as u64,
            Op::ReadFixed(f) | Op::WriteFixed(f, _) => f.len as u64,
            Op::Flush => 0,
            Op::Discard(l) | Op::WriteZeroes(l, _) => l.0,
        }
    }

    fn what(&self) -> &'static str {
        match self {
            Op::Read(_) | Op::ReadFixed(_) => "read",
            Op::Write(..) | Op::WriteFixed(..) => "write",
            Op::Flush => "flush",
            Op::Discard(_) => "discard",
            Op::WriteZeroes(..) => "write-zeroes",
        }
    }
}

impl MultipathDevice {
    /// A device over opened paths (`paths[i]` is the device of the i-th path of `cfg` in
    /// table order) of `size` bytes. Every path must hold at least `size` bytes.
    pub fn open(
        name: String,
        cfg: MultipathConfig,
        size: Bytes,
        paths: Vec<DeviceRef>,
        opts: OpenOptions,
    ) -> Result<MultipathDevice, String> {
        let specs: Vec<_> = cfg.paths().collect();
        if specs.len() != paths.len() {
            return Err(format!(
                "{name}: {} paths opened for {} in the table",
                paths.len(),
                specs.len()
            ));
        }
        let mut ps = Vec::with_capacity(paths.len());
        let mut limits: Option<Limits> = None;
        for ((g, spec), dev) in specs.into_iter().zip(paths) {
            if dev.size() < size {
                return Err(format!(
                    "{name}: path '{}' (group {}) has {} bytes, shorter than the table's {}",
                    spec.dev,
                    g + 1,
                    dev.size().0,
                    size.0
                ));
            }
            let l = dev.limits();
            limits = Some(match limits {
                None => l,
                Some(acc) => acc.stack(&l),
            });
            ps.push(Path {
                name: spec.dev.clone(),
                dev,
                group: g,
                repeat_count: spec.repeat_count,
                relative_throughput: spec.relative_throughput,
                active: AtomicBool::new(true),
                fail_count: AtomicU32::new(0),
                in_flight: AtomicU64::new(0),
                in_flight_bytes: AtomicU64::new(0),
                requests: AtomicU64::new(0),
            });
        }
        let mut groups = Vec::with_capacity(cfg.groups.len());
        let mut first = 0usize;
        for g in &cfg.groups {
            groups.push(Group::new(g.selector, first, g.paths.len()));
            first += g.paths.len();
        }
        let preferred = cfg.initial_group.checked_sub(1).unwrap_or(usize::MAX);
        let inner = Arc::new(Inner {
            name,
            size,
            limits: limits.unwrap_or_default(),
            checker_interval: cfg.features.checker_interval(),
            state: Mutex::new(State {
                queue_if_no_path: cfg.features.queues_initially(),
                retry_limit: cfg.features.retry_limit(),
                no_path_checks: 0,
                waiters: BTreeMap::new(),
                next_waiter: 0,
            }),
            cfg,
            paths: ps,
            groups,
            preferred: AtomicUsize::new(preferred),
            queued_total: AtomicU64::new(0),
        });
        let stop = Arc::new(Stop {
            stop: AtomicBool::new(false),
            wake: (Mutex::new(()), Condvar::new()),
        });
        if opts.background {
            crate::checker::spawn(&inner, &stop);
        }
        Ok(MultipathDevice { inner, stop })
    }

    /// Probes every failed path once (a small direct read at sector 0) and reinstates those
    /// that answer; counts a checker interval without a usable path for `no_path_retry`.
    /// The checker thread calls this every interval; tests without it call it directly.
    pub async fn check_paths(&self) {
        self.inner.check_paths().await
    }

    /// Whether the path named `dev` is active (`None`: no such path).
    pub fn path_active(&self, dev: &str) -> Option<bool> {
        self.inner
            .path(dev)
            .map(|i| self.inner.paths[i].is_active())
    }

    /// Requests sent down each path so far, in table order (tests, benchmarks).
    pub fn path_requests(&self) -> Vec<u64> {
        self.inner
            .paths
            .iter()
            .map(|p| p.requests.load(Ordering::Relaxed))
            .collect()
    }

    /// Requests that have waited for a path so far.
    pub fn queued_total(&self) -> u64 {
        self.inner.queued_total.load(Ordering::Relaxed)
    }

    /// Requests waiting for a path right now.
    pub fn waiting(&self) -> usize {
        self.inner.state().waiters.len()
    }

    /// The parsed table line.
    pub fn config(&self) -> &MultipathConfig {
        &self.inner.cfg
    }
}

impl Drop for MultipathDevice {
    fn drop(&mut self) {
        self.stop.stop.store(true, Ordering::Release);
        let _g = self.stop.wake.0.lock();
        self.stop.wake.1.notify_all();
    }
}

impl Inner {
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Index of the path named `dev`.
    pub fn path(&self, dev: &str) -> Option<usize> {
        self.paths.iter().position(|p| p.name == dev)
    }

    /// Groups in the order requests try them: the preferred one, the others by priority,
    /// then the disabled ones (dm tries bypassed groups only when no other has a path).
    fn group_order(&self) -> impl Iterator<Item = usize> + '_ {
        let pref = self.preferred.load(Ordering::Acquire);
        let n = self.groups.len();
        let enabled = move |g: usize| !self.groups[g].bypassed.load(Ordering::Acquire);
        let first = (pref < n && enabled(pref)).then_some(pref);
        first
            .into_iter()
            .chain((0..n).filter(move |&g| Some(g) != first && enabled(g)))
            .chain((0..n).filter(move |&g| !enabled(g)))
    }

    /// The path for a request of `bytes`: the first group in [`group_order`] with an active
    /// path, by its selector. Checking the preferred group first on every request is
    /// immediate failback.
    fn pick(&self, bytes: u64) -> Option<usize> {
        self.group_order()
            .find_map(|g| self.groups[g].select(&self.paths, bytes))
    }

    /// The group requests go to now (0-based), for status: the first usable one, or the
    /// preferred (else the first) when none is.
    pub fn current_group(&self) -> usize {
        self.group_order()
            .find(|&g| self.groups[g].usable(&self.paths))
            .or_else(|| self.group_order().next())
            .unwrap_or(0)
    }

    /// Whether any path is active.
    pub fn any_active(&self) -> bool {
        self.paths.iter().any(Path::is_active)
    }

    /// Marks path `i` failed after `why` (no-op if it was failed already).
    pub fn fail_path(&self, i: usize, why: &IoError) {
        let p = &self.paths[i];
        if p.active
            .compare_exchange(true, false, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            p.fail_count.fetch_add(1, Ordering::Relaxed);
            log::warn!(
                "{}: path {} (group {}) failed: {why}",
                self.name,
                p.name,
                p.group + 1
            );
        }
    }

    /// Makes path `i` active again and releases requests waiting for a path.
    pub fn reinstate_path(&self, i: usize, why: &str) {
        let p = &self.paths[i];
        if p.active
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            log::info!(
                "{}: path {} (group {}) reinstated ({why})",
                self.name,
                p.name,
                p.group + 1
            );
        }
        let mut st = self.state();
        st.no_path_checks = 0;
        st.wake_all();
    }

    /// Waits until a path may be usable again; `Err` (EIO naming the request) when no
    /// path is usable and requests do not queue (any more).
    async fn wait_for_path(
        &self,
        what: &str,
        off: Bytes,
        len: u64,
        last: Option<&IoError>,
    ) -> IoResult<()> {
        /// The waiter's id while its waker is registered; unregisters it when the request
        /// is dropped while waiting.
        struct Waiting<'a>(&'a Inner, Cell<Option<u64>>);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                if let Some(id) = self.1.take() {
                    self.0.state().waiters.remove(&id);
                }
            }
        }
        let w = Waiting(self, Cell::new(None));
        let mut counted = false;
        poll_fn(|cx| {
            let mut st = self.state();
            if self.any_active() {
                if let Some(i) = w.1.take() {
                    st.waiters.remove(&i);
                }
                return Poll::Ready(Ok(()));
            }
            if !st.queueing() {
                if let Some(i) = w.1.take() {
                    st.waiters.remove(&i);
                }
                let mut msg = format!(
                    "{}: no usable path for the {what} at byte {} (length {len})",
                    self.name, off.0
                );
                if let Some(e) = last {
                    msg.push_str(&format!("; last path error: {e}"));
                }
                return Poll::Ready(Err(IoError::eio(msg)));
            }
            if !counted {
                counted = true;
                self.queued_total.fetch_add(1, Ordering::Relaxed);
            }
            let i = match w.1.get() {
                Some(i) => i,
                None => {
                    st.next_waiter += 1;
                    st.next_waiter
                }
            };
            st.waiters.insert(i, cx.waker().clone());
            w.1.set(Some(i));
            Poll::Pending
        })
        .await
    }

    /// Runs `op` at `off` on a path; on a path error fails that path and reissues the whole
    /// request on the next one the selectors give, waiting while none is usable if the
    /// device queues.
    async fn submit(&self, off: Bytes, mut op: Op<'_>) -> IoResult<Served> {
        let len = op.len();
        if !matches!(op, Op::Flush) {
            check_range(&self.name, self.size, off, Bytes(len))?;
        }
        let mut last: Option<IoError> = None;
        loop {
            let Some(i) = self.pick(len) else {
                self.wait_for_path(op.what(), off, len, last.as_ref())
                    .await?;
                continue;
            };
            let p = &self.paths[i];
            let d = &*p.dev;
            let guard = InFlight::new(p, len);
            let r = match &mut op {
                // SAFETY: awaited right here, inside the future our caller keeps the lending
                // contract for (`BlockDevice::read`).
                Op::Read(b) => unsafe { d.read(off, b) }.await.map(|()| Served::Done),
                // SAFETY: as for the read.
                Op::Write(b, f) => unsafe { d.write(off, b, *f) }.await.map(|()| Served::Done),
                Op::ReadFixed(fb) => d.read_fixed(off, *fb).await,
                Op::WriteFixed(fb, f) => d.write_fixed(off, *fb, *f).await,
                Op::Flush => d.flush().await.map(|()| Served::Done),
                Op::Discard(l) => d.discard(off, *l).await.map(|()| Served::Done),
                Op::WriteZeroes(l, f) => d.write_zeroes(off, *l, *f).await.map(|()| Served::Done),
            };
            drop(guard);
            match r {
                Ok(s) => return Ok(s),
                Err(e) if is_target_error(e.errno) => {
                    return Err(e.context(format_args!(
                        "{}: {} at byte {} through path {}",
                        self.name,
                        op.what(),
                        off.0,
                        p.name
                    )))
                }
                Err(e) => {
                    self.fail_path(i, &e);
                    last = Some(e);
                }
            }
        }
    }
}

impl BlockDevice for MultipathDevice {
    fn name(&self) -> String {
        self.inner.name.clone()
    }
    fn size(&self) -> Bytes {
        self.inner.size
    }
    fn limits(&self) -> Limits {
        self.inner.limits
    }
    unsafe fn read<'a>(&'a self, offset: Bytes, buf: &'a mut [u8]) -> IoFuture<'a> {
        Box::pin(async move { self.inner.submit(offset, Op::Read(buf)).await.map(|_| ()) })
    }
    unsafe fn write<'a>(&'a self, offset: Bytes, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a> {
        Box::pin(async move {
            self.inner
                .submit(offset, Op::Write(buf, flags))
                .await
                .map(|_| ())
        })
    }
    fn read_fixed(&self, offset: Bytes, buf: FixedBuf) -> IoFuture<'_, Served> {
        Box::pin(self.inner.submit(offset, Op::ReadFixed(buf)))
    }
    fn write_fixed(&self, offset: Bytes, buf: FixedBuf, flags: WriteFlags) -> IoFuture<'_, Served> {
        Box::pin(self.inner.submit(offset, Op::WriteFixed(buf, flags)))
    }
    fn flush(&self) -> IoFuture<'_> {
        Box::pin(async move { self.inner.submit(Bytes(0), Op::Flush).await.map(|_| ()) })
    }
    fn discard(&self, offset: Bytes, len: Bytes) -> IoFuture<'_> {
        Box::pin(async move {
            self.inner
                .submit(offset, Op::Discard(len))
                .await
                .map(|_| ())
        })
    }
    fn write_zeroes(&self, offset: Bytes, len: Bytes, flags: WriteFlags) -> IoFuture<'_> {
        Box::pin(async move {
            self.inner
                .submit(offset, Op::WriteZeroes(len, flags))
                .await
                .map(|_| ())
        })
    }
    fn status(&self) -> String {
        self.inner.status()
    }
    fn message<'a>(&'a self, args: &'a [String]) -> IoFuture<'a, String> {
        Box::pin(async move { self.inner.message(args) })
    }
}
