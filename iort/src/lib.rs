//! A per-thread io_uring runtime.
//!
//! Each I/O thread owns one [`Runtime`]: an io_uring ring and a local executor. Futures on
//! that thread submit operations with [`submit`]; the runtime batches every SQE pushed while
//! running ready tasks into one `io_uring_enter`, then sleeps until a completion (or a wake
//! from another thread) arrives. No thread is ever spent on one I/O.
//!
//! On a ublk queue thread the ring belongs to libublk; the front end installs a [`Backend`]
//! with [`set_backend`] so the same target code submits onto that ring instead.
//!
//! # The lending contract
//!
//! An io_uring operation lends memory to the kernel from its submission until its completion
//! arrives. The functions that put memory the caller *borrows* into an SQE ([`read_at`],
//! [`write_at`], [`recv`], [`send`], [`recv_exact`], [`send_all`], and [`submit`] for any
//! SQE) are `unsafe`, because a borrow can end while the kernel still writes into or reads
//! from the memory: a leaked future never runs its destructor. Their callers promise:
//!
//! > The returned future is polled to completion or dropped, and never leaked
//! > (`mem::forget`, an `Rc` cycle, a future polled and then abandoned without being
//! > dropped) while the memory it borrows can still be freed or reused.
//!
//! Dropping is always fine, mid-flight and while unwinding from a panic: an [`Op`]'s
//! destructor waits for the operation's completion before the borrow ends. The contract
//! propagates: a future that awaits such a future is under the same contract. It holds by
//! construction for a future awaited inside [`block_on`] or [`Runtime::block_on`] (the future
//! never escapes the call; on a panic it is dropped), and for memory a `'static` task owns
//! (leaking the task leaks the memory with it, so it is never reused). Operations that lend
//! only memory they own ([`sleep`]'s timespec) or no memory at all ([`fsync`], [`accept`],
//! [`readable`]...) are safe.

#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring};

/// Re-exported so callers build SQEs with the same crate version.
pub use io_uring;

const WAKE_TOKEN: u64 = u64::MAX;
const MAIN_TASK: usize = usize::MAX;

/// An alternative submission path (libublk's queue ring on ublk threads).
pub trait Backend {
    /// Submits `sqe` and resolves to its CQE result.
    ///
    /// # Safety
    /// The SQE's buffers and descriptors must stay valid until the operation completes. The
    /// caller keeps the [lending contract](crate#the-lending-contract) for the returned
    /// future; an implementation's future, like [`Op`], must wait for the completion when it
    /// is dropped early.
    unsafe fn submit(&self, sqe: squeue::Entry) -> Pin<Box<dyn Future<Output = i32>>>;
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<Inner>>> = const { RefCell::new(None) };
    static BACKEND: RefCell<Option<Rc<dyn Backend>>> = const { RefCell::new(None) };
    static CACHED: RefCell<Option<Runtime>> = const { RefCell::new(None) };
}

/// Installs (or with `None`, removes) an external submission backend for this thread.
pub fn set_backend(b: Option<Rc<dyn Backend>>) {
    BACKEND.with(|x| *x.borrow_mut() = b);
}

enum OpState {
    Waiting(Option<Waker>),
    Done(i32),
}

/// Ready-queue shared with wakers (which may fire on other threads).
struct Shared {
    ready: Mutex<Vec<usize>>,
    sleeping: AtomicBool,
    eventfd: OwnedFd,
}

impl Shared {
    fn push(&self, id: usize) {
        self.ready
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(id);
        if self.sleeping.swap(false, Ordering::AcqRel) {
            let one: u64 = 1;
            // SAFETY: writing 8 bytes from a valid u64 to our own eventfd.
            unsafe {
                libc::write(
                    self.eventfd.as_raw_fd(),
                    &one as *const u64 as *const libc::c_void,
                    8,
                );
            }
        }
    }
}

struct TaskWaker {
    id: usize,
    shared: Arc<Shared>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.shared.push(self.id);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.shared.push(self.id);
    }
}

type LocalTask = Pin<Box<dyn Future<Output = ()>>>;

struct Inner {
    ring: RefCell<IoUring>,
    ops: RefCell<Slab<OpState>>,
    tasks: RefCell<Slab<Option<LocalTask>>>,
    shared: Arc<Shared>,
    /// Whether the eventfd read is armed in the ring.
    wake_armed: Cell<bool>,
    wake_buf: Box<Cell<u64>>,
    /// SQEs pushed but not yet submitted.
    unsubmitted: Cell<u32>,
}

/// Minimal slab: stable indices, reused free slots.
struct Slab<T> {
    items: Vec<Option<T>>,
    free: Vec<usize>,
}

impl<T> Slab<T> {
    fn new() -> Self {
        Slab {
            items: Vec::new(),
            free: Vec::new(),
        }
    }
    fn insert(&mut self, v: T) -> usize {
        if let Some(i) = self.free.pop() {
            self.items[i] = Some(v);
            i
        } else {
            self.items.push(Some(v));
            self.items.len() - 1
        }
    }
    fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        self.items.get_mut(i).and_then(|x| x.as_mut())
    }
    fn remove(&mut self, i: usize) -> Option<T> {
        let v = self.items.get_mut(i).and_then(|x| x.take());
        if v.is_some() {
            self.free.push(i);
        }
        v
    }
    fn len(&self) -> usize {
        self.items.len() - self.free.len()
    }
}

/// A per-thread io_uring runtime. Not `Send`: create one on each I/O thread.
pub struct Runtime {
    inner: Rc<Inner>,
}

impl Runtime {
    /// A runtime with a ring of `entries` submission slots.
    pub fn new(entries: u32) -> io::Result<Runtime> {
        let ring = IoUring::builder().build(entries.max(8))?;
        // SAFETY: eventfd returns a new fd or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: efd is a fresh, owned descriptor.
        let eventfd = unsafe { OwnedFd::from_raw_fd(efd) };
        Ok(Runtime {
            inner: Rc::new(Inner {
                ring: RefCell::new(ring),
                ops: RefCell::new(Slab::new()),
                tasks: RefCell::new(Slab::new()),
                shared: Arc::new(Shared {
                    ready: Mutex::new(Vec::new()),
                    sleeping: AtomicBool::new(false),
                    eventfd,
                }),
                wake_armed: Cell::new(false),
                wake_buf: Box::new(Cell::new(0)),
                unsubmitted: Cell::new(0),
            }),
        })
    }

    /// Registers `bufs` as this ring's fixed buffers (indices 0..), replacing none: for
    /// exercising `READ_FIXED`/`WRITE_FIXED` paths outside a ublk queue (tests, tools).
    ///
    /// # Safety
    /// The memory must stay valid and unmoved for as long as the runtime lives.
    pub unsafe fn register_buffers(&self, bufs: &[libc::iovec]) -> io::Result<()> {
        // SAFETY: the caller keeps the memory alive for the ring's lifetime.
        unsafe { self.inner.ring.borrow().submitter().register_buffers(bufs) }
    }

    /// Runs `fut` to completion on this thread, driving spawned tasks and the ring meanwhile.
    pub fn block_on<F: Future>(&self, fut: F) -> F::Output {
        let prev = CURRENT.with(|c| c.borrow_mut().replace(self.inner.clone()));
        let _restore = Restore(prev);
        let mut fut = std::pin::pin!(fut);
        let waker = Waker::from(Arc::new(TaskWaker {
            id: MAIN_TASK,
            shared: self.inner.shared.clone(),
        }));
        let mut main_ready = true;
        loop {
            if main_ready {
                main_ready = false;
                let mut cx = Context::from_waker(&waker);
                if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
                    return v;
                }
            }
            // Run every task that is ready, including ones woken while running.
            loop {
                let batch: Vec<usize> = std::mem::take(
                    &mut *self
                        .inner
                        .shared
                        .ready
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()),
                );
                if batch.is_empty() {
                    break;
                }
                for id in batch {
                    if id == MAIN_TASK {
                        main_ready = true;
                    } else {
                        self.inner.poll_task(id);
                    }
                }
            }
            if main_ready {
                continue;
            }
            // Nothing runnable: submit what was queued and sleep until a completion arrives.
            self.inner.arm_wake();
            self.inner.shared.sleeping.store(true, Ordering::Release);
            let pending = !self
                .inner
                .shared
                .ready
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty();
            let wait = if pending { 0 } else { 1 };
            self.inner.submit_and_wait(wait);
            self.inner.shared.sleeping.store(false, Ordering::Release);
            self.inner.reap();
        }
    }
}

struct Restore(Option<Rc<Inner>>);
impl Drop for Restore {
    fn drop(&mut self) {
        let prev = self.0.take();
        CURRENT.with(|c| *c.borrow_mut() = prev);
    }
}

impl Inner {
    fn poll_task(self: &Rc<Self>, id: usize) {
        // Take the future out so a task that spawns or nests block_on cannot alias the slab.
        let fut = match self.tasks.borrow_mut().get_mut(id) {
            Some(slot) => slot.take(),
            None => return,
        };
        let Some(mut fut) = fut else { return };
        let waker = Waker::from(Arc::new(TaskWaker {
            id,
            shared: self.shared.clone(),
        }));
        let mut cx = Context::from_waker(&waker);
        match fut.as_mut().poll(&mut cx) {
            Poll::Ready(()) => {
                self.tasks.borrow_mut().remove(id);
            }
            Poll::Pending => {
                if let Some(slot) = self.tasks.borrow_mut().get_mut(id) {
                    *slot = Some(fut);
                }
            }
        }
    }

    fn arm_wake(&self) {
        if self.wake_armed.get() {
            return;
        }
        let sqe = opcode::Read::new(
            types::Fd(self.shared.eventfd.as_raw_fd()),
            self.wake_buf.as_ptr() as *mut u8,
            8,
        )
        .build()
        .user_data(WAKE_TOKEN);
        // SAFETY: wake_buf lives as long as the ring (both owned by Inner).
        if unsafe { self.push(&sqe) } {
            self.wake_armed.set(true);
        }
    }

    /// Pushes an SQE, submitting to make room if the queue is full. Returns false only if the
    /// ring refuses even after submitting (it then has no room at all).
    ///
    /// # Safety
    /// As [`submit`]: whatever the SQE names stays valid until its completion is reaped.
    unsafe fn push(&self, sqe: &squeue::Entry) -> bool {
        for _ in 0..64 {
            {
                let mut ring = self.ring.borrow_mut();
                if ring.submission().push(sqe).is_ok() {
                    self.unsubmitted.set(self.unsubmitted.get() + 1);
                    return true;
                }
            }
            self.submit_and_wait(0);
            self.reap();
        }
        false
    }

    fn submit_and_wait(&self, want: usize) {
        let ring = self.ring.borrow();
        loop {
            match ring.submitter().submit_and_wait(want) {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {
                    if want == 0 {
                        break;
                    }
                }
                // EBUSY: completion queue overflow pending; reaping makes room.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => break,
                Err(_) => break,
            }
        }
        self.unsubmitted.set(0);
    }

    fn reap(&self) {
        let mut done: Vec<(u64, i32)> = Vec::new();
        {
            let mut ring = self.ring.borrow_mut();
            for cqe in ring.completion() {
                done.push((cqe.user_data(), cqe.result()));
            }
        }
        for (ud, res) in done {
            if ud == WAKE_TOKEN {
                self.wake_armed.set(false);
                continue;
            }
            let idx = ud as usize;
            let mut ops = self.ops.borrow_mut();
            if let Some(st) = ops.get_mut(idx) {
                let prev = std::mem::replace(st, OpState::Done(res));
                drop(ops);
                if let OpState::Waiting(Some(w)) = prev {
                    w.wake();
                }
            }
        }
    }
}

/// An in-flight operation; resolves to the CQE result (negative errno on failure).
pub struct Op {
    kind: OpKind,
}

enum OpKind {
    Own { rt: Rc<Inner>, idx: usize },
    External(Pin<Box<dyn Future<Output = i32>>>),
    Finished(i32),
}

impl Future for Op {
    type Output = i32;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<i32> {
        match &mut self.kind {
            OpKind::Finished(r) => Poll::Ready(*r),
            OpKind::External(f) => f.as_mut().poll(cx),
            OpKind::Own { rt, idx } => {
                let idx = *idx;
                let mut ops = rt.ops.borrow_mut();
                match ops.get_mut(idx) {
                    Some(OpState::Done(r)) => {
                        let r = *r;
                        ops.remove(idx);
                        drop(ops);
                        self.kind = OpKind::Finished(r);
                        Poll::Ready(r)
                    }
                    Some(OpState::Waiting(w)) => {
                        *w = Some(cx.waker().clone());
                        Poll::Pending
                    }
                    _ => Poll::Ready(-libc::ECANCELED),
                }
            }
        }
    }
}

impl Drop for Op {
    fn drop(&mut self) {
        if let OpKind::Own { rt, idx } = &self.kind {
            let idx = *idx;
            // The kernel may still use the SQE's buffers: wait for the completion here.
            loop {
                let done = {
                    let mut ops = rt.ops.borrow_mut();
                    match ops.get_mut(idx) {
                        Some(OpState::Done(_)) | None => {
                            ops.remove(idx);
                            true
                        }
                        Some(_) => false,
                    }
                };
                if done {
                    break;
                }
                rt.submit_and_wait(1);
                rt.reap();
            }
        }
    }
}

/// Submits an SQE on this thread's ring (or its installed [`Backend`]).
///
/// Without a runtime or backend on this thread the op resolves to `-ENXIO`.
///
/// # Safety
/// Every buffer and fd the SQE names must stay valid until the returned [`Op`] completes or is
/// dropped (dropping waits for the kernel), and the `Op` is under the
/// [lending contract](crate#the-lending-contract): completed or dropped, never leaked while
/// that memory can be freed or reused.
pub unsafe fn submit(sqe: squeue::Entry) -> Op {
    if let Some(b) = BACKEND.with(|b| b.borrow().clone()) {
        return Op {
            kind: OpKind::External(b.submit(sqe)),
        };
    }
    let Some(rt) = CURRENT.with(|c| c.borrow().clone()) else {
        return Op {
            kind: OpKind::Finished(-libc::ENXIO),
        };
    };
    let idx = rt.ops.borrow_mut().insert(OpState::Waiting(None));
    let sqe = sqe.user_data(idx as u64);
    if !rt.push(&sqe) {
        rt.ops.borrow_mut().remove(idx);
        return Op {
            kind: OpKind::Finished(-libc::EAGAIN),
        };
    }
    Op {
        kind: OpKind::Own { rt, idx },
    }
}

/// Error from [`spawn`] outside a runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoRuntime;

impl std::fmt::Display for NoRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("no iort runtime on this thread")
    }
}
impl std::error::Error for NoRuntime {}

/// Spawns a task on this thread's runtime. It runs while the runtime's `block_on` runs.
pub fn spawn<F: Future<Output = ()> + 'static>(fut: F) -> Result<(), NoRuntime> {
    let rt = CURRENT.with(|c| c.borrow().clone()).ok_or(NoRuntime)?;
    let id = rt.tasks.borrow_mut().insert(Some(Box::pin(fut)));
    rt.shared.push(id);
    Ok(())
}

/// Number of live tasks on this thread's runtime (0 without one).
pub fn task_count() -> usize {
    CURRENT.with(|c| {
        c.borrow()
            .as_ref()
            .map(|r| r.tasks.borrow().len())
            .unwrap_or(0)
    })
}

/// Sleeps for `d` using an io_uring timeout (works on either ring).
pub async fn sleep(d: Duration) {
    let ts = Box::new(
        types::Timespec::new()
            .sec(d.as_secs())
            .nsec(d.subsec_nanos()),
    );
    let sqe = opcode::Timeout::new(&*ts as *const types::Timespec).build();
    // SAFETY: this future owns `ts` (boxed, so it never moves): it is freed only after the op
    // completes or is dropped (which waits for the kernel), and a leaked future leaks it.
    let r = unsafe { submit(sqe) }.await;
    drop(ts);
    if r == -libc::ENXIO {
        // No ring on this thread (plain unit tests): fall back to a blocking sleep.
        std::thread::sleep(d);
    }
}

/// Yields once to other tasks.
pub async fn yield_now() {
    let mut yielded = false;
    std::future::poll_fn(move |cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await
}

/// Runs `fut` on this thread's cached runtime (created on first use with 256 entries).
/// Convenient for tests and CLI one-shots; I/O threads should own a [`Runtime`].
pub fn block_on<F: Future>(fut: F) -> io::Result<F::Output> {
    let rt = CACHED.with(|c| -> io::Result<Rc<Inner>> {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = Some(Runtime::new(256)?);
        }
        c.as_ref()
            .map(|r| r.inner.clone())
            .ok_or_else(|| io::Error::other("no runtime"))
    })?;
    Ok(Runtime { inner: rt }.block_on(fut))
}

/// Why [`run_on_io_thread`] could not produce a value.
#[derive(Debug, thiserror::Error)]
pub enum HelperThreadError {
    /// The thread or its runtime could not be created.
    #[error("starting an I/O helper thread: {0}")]
    Start(#[from] io::Error),
    /// The future panicked (the message, when it had one).
    #[error("the I/O helper thread panicked: {0}")]
    Panicked(String),
}

/// Runs the future `f` makes to completion on a fresh, scoped thread with its own runtime,
/// and returns its output. For synchronous code that needs async I/O but may itself run
/// inside a runtime's task (a table build, a device's drop), where blocking on the same ring
/// would deadlock. A panic in the future comes back as an error, not a panic.
pub fn run_on_io_thread<T: Send, Fut: Future<Output = T>>(
    f: impl FnOnce() -> Fut + Send,
) -> Result<T, HelperThreadError> {
    std::thread::scope(|s| {
        let h = std::thread::Builder::new()
            .name("io-helper".into())
            .spawn_scoped(s, || -> Result<T, HelperThreadError> {
                let rt = Runtime::new(64)?;
                Ok(rt.block_on(f()))
            })?;
        match h.join() {
            Ok(r) => r,
            Err(p) => Err(HelperThreadError::Panicked(
                p.downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_default(),
            )),
        }
    })
}

/// Completes when every future in `futs` completes; returns the first error (all are still
/// driven to completion so no buffer is abandoned mid-flight).
pub async fn try_join_all<T, E, F>(futs: Vec<F>) -> Result<Vec<T>, E>
where
    F: Future<Output = Result<T, E>>,
{
    let results = futures::future::join_all(futs).await;
    let mut out = Vec::with_capacity(results.len());
    let mut first_err = None;
    for r in results {
        match r {
            Ok(v) => out.push(v),
            Err(e) => {
                if first_err.is_none() {
                    first_err = Some(e);
                }
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// Converts an io_uring result into `io::Result<usize>`.
pub fn cqe_result(res: i32) -> io::Result<usize> {
    if res < 0 {
        Err(io::Error::from_raw_os_error(-res))
    } else {
        Ok(res as usize)
    }
}

/// Reads into `buf` at `offset` (one `read`; may be short).
///
/// # Safety
/// The kernel writes into `buf` until the operation completes: keep the
/// [lending contract](crate#the-lending-contract) for the returned future.
pub async unsafe fn read_at(fd: RawFd, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let sqe = opcode::Read::new(types::Fd(fd), buf.as_mut_ptr(), io_len(buf.len()))
        .offset(offset)
        .build();
    // SAFETY: `buf` is borrowed for this future's life, and our caller keeps the lending
    // contract for it: completed, or dropped (which waits for the kernel), never leaked.
    cqe_result(unsafe { submit(sqe) }.await)
}

/// Writes `buf` at `offset` with per-write flags (`RWF_DSYNC` for FUA); may be short.
///
/// # Safety
/// The kernel reads `buf` until the operation completes: keep the
/// [lending contract](crate#the-lending-contract) for the returned future.
pub async unsafe fn write_at(
    fd: RawFd,
    buf: &[u8],
    offset: u64,
    rw_flags: i32,
) -> io::Result<usize> {
    let sqe = opcode::Write::new(types::Fd(fd), buf.as_ptr(), io_len(buf.len()))
        .offset(offset)
        .rw_flags(rw_flags)
        .build();
    // SAFETY: as in `read_at`: `buf` is borrowed for this future's life, which our caller
    // completes or drops.
    cqe_result(unsafe { submit(sqe) }.await)
}

/// An SQE length for a buffer: at most `u32::MAX` (the operation is then short, which every
/// caller of these one-shot wrappers handles).
fn io_len(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// `fdatasync` (or `fsync` when `datasync` is false) through the ring.
pub async fn fsync(fd: RawFd, datasync: bool) -> io::Result<()> {
    let mut op = opcode::Fsync::new(types::Fd(fd));
    if datasync {
        op = op.flags(types::FsyncFlags::DATASYNC);
    }
    // SAFETY: the SQE names no memory; a stale fd only makes the op fail (EBADF).
    cqe_result(unsafe { submit(op.build()) }.await).map(|_| ())
}

/// `fallocate` through the ring (punch hole, zero range...).
pub async fn fallocate(fd: RawFd, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let sqe = opcode::Fallocate::new(types::Fd(fd), len)
        .offset(offset)
        .mode(mode)
        .build();
    // SAFETY: the SQE names no memory; a stale fd only makes the op fail (EBADF).
    cqe_result(unsafe { submit(sqe) }.await).map(|_| ())
}

/// Receives into `buf` from a socket (may be short; 0 means the peer closed).
///
/// # Safety
/// The kernel writes into `buf` until the operation completes: keep the
/// [lending contract](crate#the-lending-contract) for the returned future.
pub async unsafe fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    let sqe = opcode::Recv::new(types::Fd(fd), buf.as_mut_ptr(), io_len(buf.len())).build();
    // SAFETY: as in `read_at`: `buf` is borrowed for this future's life, which our caller
    // completes or drops.
    cqe_result(unsafe { submit(sqe) }.await)
}

/// Sends from `buf` on a socket with `flags` (`MSG_MORE`...); may be short.
///
/// # Safety
/// The kernel reads `buf` until the operation completes: keep the
/// [lending contract](crate#the-lending-contract) for the returned future.
pub async unsafe fn send(fd: RawFd, buf: &[u8], flags: i32) -> io::Result<usize> {
    let sqe = opcode::Send::new(types::Fd(fd), buf.as_ptr(), io_len(buf.len()))
        .flags(flags)
        .build();
    // SAFETY: as in `read_at`: `buf` is borrowed for this future's life, which our caller
    // completes or drops.
    cqe_result(unsafe { submit(sqe) }.await)
}

/// Receives exactly `buf.len()` bytes; `UnexpectedEof` if the peer closes first.
///
/// # Safety
/// As [`recv`]: keep the [lending contract](crate#the-lending-contract) for the returned
/// future.
pub async unsafe fn recv_exact(fd: RawFd, buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: each `recv` is awaited here, inside a future our caller completes or drops.
        let n = unsafe { recv(fd, &mut buf[done..]) }.await?;
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        done += n;
    }
    Ok(())
}

/// Sends all of `buf` (with `MSG_NOSIGNAL`, plus `flags`).
///
/// # Safety
/// As [`send`]: keep the [lending contract](crate#the-lending-contract) for the returned
/// future.
pub async unsafe fn send_all(fd: RawFd, buf: &[u8], flags: i32) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: each `send` is awaited here, inside a future our caller completes or drops.
        let n = unsafe { send(fd, &buf[done..], flags | libc::MSG_NOSIGNAL) }.await?;
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        done += n;
    }
    Ok(())
}

/// Accepts a connection on a listening socket; returns the new fd (owned by the caller).
pub async fn accept(fd: RawFd) -> io::Result<OwnedFd> {
    let sqe = opcode::Accept::new(types::Fd(fd), std::ptr::null_mut(), std::ptr::null_mut())
        .flags(libc::SOCK_CLOEXEC)
        .build();
    // SAFETY: the SQE names no memory (null address pointers: the peer address is not
    // wanted); a stale fd only makes the op fail.
    let r = cqe_result(unsafe { submit(sqe) }.await)?;
    // SAFETY: accept returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

/// Waits until `fd` is readable (poll), for fds the ring should not read itself.
pub async fn readable(fd: RawFd) -> io::Result<()> {
    let sqe = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32).build();
    // SAFETY: the SQE names no memory; a stale fd only makes the op fail.
    cqe_result(unsafe { submit(sqe) }.await).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Instant;

    #[test]
    fn file_read_write_and_fsync() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[0u8; 8192]).unwrap();
        let fd = f.as_raw_fd();
        let rt = Runtime::new(32).unwrap();
        rt.block_on(async {
            // SAFETY: awaited here, inside `block_on`, before the buffers go.
            let n = unsafe { write_at(fd, &[5u8; 4096], 4096, 0) }
                .await
                .unwrap();
            assert_eq!(n, 4096);
            fsync(fd, true).await.unwrap();
            let mut b = vec![0u8; 8192];
            // SAFETY: as above.
            let n = unsafe { read_at(fd, &mut b, 0) }.await.unwrap();
            assert_eq!(n, 8192);
            assert!(b[..4096].iter().all(|&x| x == 0));
            assert!(b[4096..].iter().all(|&x| x == 5));
        });
    }

    #[test]
    fn spawned_tasks_run_concurrently_with_timers() {
        let rt = Runtime::new(32).unwrap();
        let t0 = Instant::now();
        let hits = Rc::new(Cell::new(0));
        rt.block_on(async {
            for _ in 0..10 {
                let h = hits.clone();
                spawn(async move {
                    sleep(Duration::from_millis(50)).await;
                    h.set(h.get() + 1);
                })
                .unwrap();
            }
            sleep(Duration::from_millis(120)).await;
        });
        assert_eq!(hits.get(), 10);
        // Ten 50 ms sleeps overlapped: far less than 500 ms.
        assert!(
            t0.elapsed() < Duration::from_millis(400),
            "{:?}",
            t0.elapsed()
        );
    }

    #[test]
    fn cross_thread_wake_interrupts_wait() {
        let rt = Runtime::new(8).unwrap();
        let (tx, rx) = futures::channel::oneshot::channel::<u32>();
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            let _ = tx.send(7);
        });
        let v = rt.block_on(async { rx.await.unwrap() });
        assert_eq!(v, 7);
        h.join().unwrap();
    }

    #[test]
    fn dropped_op_waits_for_kernel() {
        let rt = Runtime::new(8).unwrap();
        rt.block_on(async {
            let ts = types::Timespec::new().nsec(20_000_000);
            // SAFETY: `ts` outlives the op, which is dropped (waiting for the kernel) below.
            let op = unsafe { submit(opcode::Timeout::new(&ts).build()) };
            let t0 = Instant::now();
            drop(op);
            assert!(t0.elapsed() >= Duration::from_millis(15));
        });
    }

    #[test]
    fn submit_without_runtime_reports_enxio() {
        // SAFETY: a NOP names no memory.
        let r = futures::executor::block_on(unsafe { submit(opcode::Nop::new().build()) });
        assert_eq!(r, -libc::ENXIO);
    }
}

#[cfg(test)]
mod helper_thread_tests {
    use super::*;

    #[test]
    fn runs_io_on_its_own_ring_even_from_inside_a_runtime() {
        let rt = Runtime::new(8).unwrap();
        let v = rt.block_on(async {
            run_on_io_thread(|| async {
                sleep(Duration::from_millis(5)).await;
                7
            })
        });
        assert_eq!(v.unwrap(), 7);
        let e = run_on_io_thread(|| async { panic!("boom") as u8 }).unwrap_err();
        assert!(e.to_string().contains("boom"), "{e}");
    }
}
