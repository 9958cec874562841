//! The table's I/O on a queue thread's ring: [`QueueRingBackend`] puts the targets' SQEs on
//! libublk's per-thread queue ring, and [`RingOp`] keeps their buffers safe.
//!
//! libublk's op futures do nothing when dropped: a request future dropped while one of its
//! operations is in flight (a target panic that `serve` catches, a queue torn down in the
//! middle of a request) would hand buffers the kernel still reads or writes back to their
//! owners. A [`RingOp`] follows `iort::Op`'s rule instead: dropped while its operation is
//! pending, it asks the kernel to cancel the operation and drives the ring, reaping every
//! completion as the queue's event loop does, until the operation's own completion has
//! arrived. That wait is bounded ([`GIVE_UP_AFTER`]) and logged.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::ptr::NonNull;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use iort::io_uring::{cqueue, opcode, squeue, types, IoUring};
use libublk::io::{UblkIOCtx, UblkQueue};
use libublk::uring_async::{
    ublk_reap_events_with_handler, ublk_reap_io_events_with_update_queue, ublk_wake_task,
    UblkUringOpFuture,
};
use libublk::{sys, UblkUringData};

/// The longest a dropped operation's wait blocks in the kernel before it looks at its clock.
const WAIT_SLICE: Duration = Duration::from_millis(100);
/// A dropped operation still in flight after this long is logged (again at every doubling).
const WARN_AFTER: Duration = Duration::from_secs(5);
/// A dropped operation still in flight this long after its cancellation is stuck in the
/// kernel (a device that never answers). Returning would let the kernel write into freed
/// memory, waiting would hang the queue thread for good: the process aborts instead, after
/// logging why (devices created with user recovery then wait for a new server).
const GIVE_UP_AFTER: Duration = Duration::from_secs(120);
/// How long a dropped operation that has completed waits for its cancellation's completion
/// (which owns no memory) before leaving it behind.
const CANCEL_GRACE: Duration = Duration::from_secs(1);
/// How often a push onto a full submission queue flushes the queue and retries.
const PUSH_TRIES: u32 = 64;

thread_local! {
    /// The queue this thread serves, while a [`QueueRing`] guard is alive on it.
    static QUEUE: Cell<Option<NonNull<UblkQueue<'static>>>> = const { Cell::new(None) };
    /// Per tag of that queue: where its commands stand (see [`TagState`]).
    static TAGS: RefCell<Option<TagStates>> = const { RefCell::new(None) };
}

/// Where a tag's ublk commands stand, as far as the kernel is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TagState {
    /// A command (FETCH or COMMIT_AND_FETCH) is queued or in flight, waiting for a request.
    Armed,
    /// The tag holds a request the server has not committed yet: from the completion that
    /// fetched it (seen by [`handle_cqe`], whoever reaps it) until the tag queues its commit.
    Held,
    /// The kernel aborted the tag's command: the queue is down.
    Down,
    /// The tag's command failed.
    Failed,
}

/// Per tag of a queue (indexed by tag): [`TagState`].
pub(super) type TagStates = Rc<[Cell<TagState>]>;

/// For the life of a queue thread's serving: installs [`QueueRingBackend`] as the thread's
/// `iort` backend and makes the queue known to dropped [`RingOp`]s (which reap its commands'
/// completions as the event loop does). Dropping it undoes both; it must be dropped before
/// the queue's executor is, never after the queue.
pub(super) struct QueueRing<'a> {
    /// Keeps the queue alive while its address is published.
    _queue: Rc<UblkQueue<'a>>,
}

impl<'a> QueueRing<'a> {
    pub(super) fn enter(queue: Rc<UblkQueue<'a>>, tags: TagStates) -> QueueRing<'a> {
        // Lifetime erased for the thread-local: the address is only dereferenced on this
        // thread while this guard (which holds the Rc, so the queue and the device it borrows
        // outlive it) is alive, and the guard clears it when dropped.
        let ptr = NonNull::from(&*queue).cast::<UblkQueue<'static>>();
        QUEUE.with(|q| q.set(Some(ptr)));
        TAGS.with(|t| *t.borrow_mut() = Some(tags));
        iort::set_backend(Some(Rc::new(QueueRingBackend)));
        QueueRing { _queue: queue }
    }
}

impl Drop for QueueRing<'_> {
    fn drop(&mut self) {
        iort::set_backend(None);
        TAGS.with(|t| t.borrow_mut().take());
        QUEUE.with(|q| q.set(None));
    }
}

/// Submits the table's SQEs onto libublk's ring for this queue thread.
pub(super) struct QueueRingBackend;

impl iort::Backend for QueueRingBackend {
    unsafe fn submit(&self, sqe: squeue::Entry) -> Pin<Box<dyn Future<Output = i32>>> {
        let opcode = sqe.get_opcode();
        // SAFETY: the caller keeps the SQE's buffers valid until the returned future completes;
        // if it is dropped before, its destructor waits for the kernel (RingOp's Drop).
        Box::pin(match unsafe { push(sqe) } {
            Ok(op) => RingOp {
                op: Some(op),
                opcode,
                result: 0,
            },
            Err(e) => RingOp {
                op: None,
                opcode,
                result: e,
            },
        })
    }
}

/// An operation on the queue ring; resolves to its CQE result (negative errno on failure).
pub(super) struct RingOp {
    /// libublk's handle on the operation while it is in flight.
    op: Option<UblkUringOpFuture>,
    /// For the logs of a dropped operation.
    opcode: u32,
    result: i32,
}

impl Future for RingOp {
    type Output = i32;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<i32> {
        let this = self.get_mut();
        let Some(op) = &mut this.op else {
            return Poll::Ready(this.result);
        };
        match Pin::new(op).poll(cx) {
            Poll::Ready(r) => {
                this.op = None;
                this.result = r;
                Poll::Ready(r)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for RingOp {
    fn drop(&mut self) {
        if let Some(op) = self.op.take() {
            finish_dropped(op, self.opcode);
        }
    }
}

/// Runs `f` on this thread's queue ring; `None` if the thread has none, or if it is in use
/// further up the stack (then it cannot be driven from here).
fn with_ring<R>(f: impl FnOnce(&mut IoUring<squeue::Entry>) -> R) -> Option<R> {
    let mut f = Some(f);
    let mut out = None;
    // Only hands out the thread-local cell (it initialises nothing: the closure does not).
    let _ = libublk::io::ublk_init_task_ring(|cell| {
        if let (Some(ring), Some(f)) = (cell.get(), f.take()) {
            if let Ok(mut ring) = ring.try_borrow_mut() {
                out = Some(f(&mut ring));
            }
        }
        Ok(())
    });
    out
}

/// Puts `sqe` on this thread's queue ring under a new libublk operation key (marked as
/// target I/O, so the event loop hands its completion to [`ublk_wake_task`]). Returns a
/// negative errno if there is no ring or the submission queue stays full.
///
/// # Safety
/// The SQE's buffers and descriptors must stay valid until the operation completes.
unsafe fn push(sqe: squeue::Entry) -> Result<UblkUringOpFuture, i32> {
    if with_ring(|_| ()).is_none() {
        return Err(-libc::ENXIO);
    }
    // Cannot fail: the Target bit lies outside the key's bits.
    let op =
        UblkUringOpFuture::new_validate(UblkUringData::Target as u64).map_err(|_| -libc::EINVAL)?;
    let sqe = sqe.user_data(op.user_data);
    for _ in 0..PUSH_TRIES {
        // SAFETY: the caller keeps the SQE's memory valid until its completion.
        match with_ring(|r| unsafe { r.submission().push(&sqe) }.is_ok()) {
            Some(true) => return Ok(op),
            Some(false) => {
                // Full: hand what is queued to the kernel and reap, then retry.
                let _ = with_ring(|r| r.submit());
                reap();
            }
            None => break,
        }
    }
    // The key stays in libublk's table (there is no way to retire it without a completion).
    Err(-libc::EAGAIN)
}

/// Reaps every completion on this thread's ring and wakes the tasks they belong to, exactly
/// as the queue's event loop does (with the queue's command accounting when a [`QueueRing`]
/// is alive). Returns false if the ring cannot be used from here.
fn reap() -> bool {
    if with_ring(|_| ()).is_none() {
        return false;
    }
    let wake = |cqe: &cqueue::Entry| handle_cqe(cqe);
    match QUEUE.with(Cell::get) {
        Some(q) => {
            // SAFETY: QUEUE is only set while the QueueRing guard holding this queue lives on
            // this thread; the reference does not outlive this call.
            let q: &UblkQueue<'_> = unsafe { q.as_ref() };
            // Not a timeout: a dropped operation's wait must not put the queue to idle.
            let _ = ublk_reap_io_events_with_update_queue(q, false, None, wake);
        }
        None => {
            let _ = with_ring(|r| ublk_reap_events_with_handler(r, wake));
        }
    }
    true
}

/// What a queue thread does with each completion it reaps: a ublk command's (one without the
/// Target bit) updates its tag's [`TagState`]; then the task waiting for it is woken.
pub(super) fn handle_cqe(cqe: &cqueue::Entry) {
    let data = cqe.user_data();
    if data & UblkUringData::Target as u64 == 0 {
        let res = cqe.result();
        let state =
            if res == sys::UBLK_IO_RES_OK as i32 || res == sys::UBLK_IO_RES_NEED_GET_DATA as i32 {
                TagState::Held
            } else if res == sys::UBLK_IO_RES_ABORT {
                TagState::Down
            } else {
                TagState::Failed
            };
        let tag = UblkIOCtx::user_data_to_tag(data) as usize;
        TAGS.with(|t| {
            if let Some(cell) = t.borrow().as_ref().and_then(|t| t.get(tag)) {
                cell.set(state);
            }
        });
    }
    ublk_wake_task(data, cqe);
}

/// Submits what is queued, waits up to `slice` for a completion, and reaps them all (as the
/// event loop does). False if the ring cannot be used from here.
pub(super) fn drive(slice: Duration) -> bool {
    let ts = types::Timespec::from(slice);
    let args = types::SubmitArgs::new().timespec(&ts);
    // ETIME (nothing within the slice), EINTR and EBUSY (reap first) only mean: go round.
    let _ = with_ring(|r| r.submitter().submit_with_args(1, &args));
    reap()
}

/// The result of `op` if its completion has been reaped (which retires its key).
fn completed(op: &mut UblkUringOpFuture) -> Option<i32> {
    match Pin::new(op).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(r) => Some(r),
        Poll::Pending => None,
    }
}

/// Waits until a dropped operation's completion has arrived: cancels it, then submits, waits
/// (in slices) and reaps until it is back. Never returns while the kernel may still use the
/// operation's memory; aborts the process if that lasts [`GIVE_UP_AFTER`].
fn finish_dropped(mut op: UblkUringOpFuture, opcode: u32) {
    if completed(&mut op).is_some() {
        return;
    }
    // A read on a socket or pipe, a poll or a timeout would otherwise wait for their event.
    // SAFETY: a cancellation names its target by user_data and refers to no memory.
    let mut cancel = unsafe { push(opcode::AsyncCancel::new(op.user_data).build()) }.ok();
    let t0 = Instant::now();
    let mut warn_at = WARN_AFTER;
    let mut done = false;
    loop {
        if !reap() {
            log::error!(
                "ublk queue ring: an operation (opcode {opcode}) dropped while in flight cannot \
                 be waited for (the ring is unavailable here); aborting rather than letting the \
                 kernel use freed memory"
            );
            std::process::abort();
        }
        done = done || completed(&mut op).is_some();
        if cancel.as_mut().is_some_and(|c| completed(c).is_some()) {
            cancel = None;
        }
        let waited = t0.elapsed();
        if done && (cancel.is_none() || waited >= CANCEL_GRACE) {
            if waited >= WARN_AFTER {
                log::warn!(
                    "ublk queue ring: a dropped operation (opcode {opcode}) completed after {:.1}s",
                    waited.as_secs_f64()
                );
            }
            return;
        }
        if !done && waited >= GIVE_UP_AFTER {
            log::error!(
                "ublk queue ring: an operation (opcode {opcode}) dropped while in flight is \
                 still in the kernel {}s after its cancellation; aborting rather than letting \
                 the kernel use freed memory",
                waited.as_secs()
            );
            std::process::abort();
        }
        if waited >= warn_at {
            log::warn!(
                "ublk queue ring: waiting {}s for an operation (opcode {opcode}) dropped while in \
                 flight{}",
                waited.as_secs(),
                if cancel.is_some() {
                    " (cancellation pending)"
                } else {
                    ""
                }
            );
            warn_at = warn_at.saturating_mul(2);
        }
        drive(WAIT_SLICE);
    }
}

/// A queue thread's ring for a thread without ublk (tests): libublk's thread-local ring,
/// created if missing.
#[cfg(test)]
pub(super) fn init_test_ring() -> Result<(), libublk::UblkError> {
    libublk::io::ublk_init_task_ring(|cell| {
        if cell.get().is_none() {
            let ring = IoUring::builder()
                .build(32)
                .map_err(libublk::UblkError::IOError)?;
            cell.set(RefCell::new(ring))
                .map_err(|_| libublk::UblkError::OtherError(-libc::EEXIST))?;
        }
        Ok(())
    })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use iort::Backend;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    /// One round of a queue thread's event loop without a queue: submit, wait up to `wait`
    /// for a completion, reap and wake (only libublk's public API, so these tests also run
    /// against a backend without [`RingOp`]).
    pub(in crate::ublk) fn drive(wait: Duration) {
        libublk::io::with_task_io_ring_mut(|r| {
            let ts = types::Timespec::from(wait);
            let args = types::SubmitArgs::new().timespec(&ts);
            let _ = r.submitter().submit_with_args(1, &args);
            ublk_reap_events_with_handler(r, |cqe| ublk_wake_task(cqe.user_data(), cqe))
        })
        .unwrap();
    }

    /// Polls `fut` to its end, driving the ring between polls.
    pub(in crate::ublk) fn run<F: Future>(fut: F) -> F::Output {
        let mut fut = std::pin::pin!(fut);
        let mut cx = Context::from_waker(Waker::noop());
        loop {
            if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
                return v;
            }
            drive(Duration::from_millis(10));
        }
    }

    pub(in crate::ublk) fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills two descriptors that nobody else owns.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both are new descriptors owned from here on.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    /// Writes to the pipe, then gives a read still in flight every chance to land.
    pub(in crate::ublk) fn feed(wr: &OwnedFd) {
        let data = [0x55u8; 64];
        // SAFETY: writes from a valid local array to our pipe.
        let n = unsafe { libc::write(wr.as_raw_fd(), data.as_ptr().cast(), data.len()) };
        assert_eq!(n, 64);
        for _ in 0..5 {
            drive(Duration::from_millis(20));
        }
    }

    #[test]
    fn an_op_completes_with_its_result() {
        init_test_ring().unwrap();
        // SAFETY: a NOP refers to no memory.
        let op = unsafe { QueueRingBackend.submit(opcode::Nop::new().build()) };
        assert_eq!(run(op), 0);
    }

    #[test]
    fn a_dropped_read_keeps_its_buffer_until_its_completion() {
        init_test_ring().unwrap();
        let (rd, wr) = pipe();
        let mut buf = vec![0xAAu8; 64];
        let sqe = opcode::Read::new(types::Fd(rd.as_raw_fd()), buf.as_mut_ptr(), 64)
            .offset(u64::MAX)
            .build();
        // SAFETY: `buf` outlives the operation (it lives to the end of the test).
        let mut op = unsafe { QueueRingBackend.submit(sqe) };
        let mut cx = Context::from_waker(Waker::noop());
        assert!(op.as_mut().poll(&mut cx).is_pending());
        drive(Duration::from_millis(20)); // the read now waits in the kernel for data
        assert!(op.as_mut().poll(&mut cx).is_pending());
        let t0 = Instant::now();
        drop(op);
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        // Were the buffer freed now, the kernel must not write into it any more.
        feed(&wr);
        assert!(
            buf.iter().all(|&b| b == 0xAA),
            "the kernel wrote into the buffer of an operation dropped before"
        );
    }

    #[test]
    fn a_dropped_long_timeout_is_cancelled_not_waited_out() {
        init_test_ring().unwrap();
        let ts = types::Timespec::new().sec(3600);
        // SAFETY: the timespec outlives the operation.
        let mut op = unsafe {
            QueueRingBackend.submit(opcode::Timeout::new(&ts as *const types::Timespec).build())
        };
        let mut cx = Context::from_waker(Waker::noop());
        assert!(op.as_mut().poll(&mut cx).is_pending());
        drive(Duration::from_millis(20));
        let t0 = Instant::now();
        drop(op);
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    }

    #[test]
    fn without_a_ring_an_op_fails_cleanly() {
        std::thread::spawn(|| {
            // SAFETY: a NOP refers to no memory.
            let op = unsafe { QueueRingBackend.submit(opcode::Nop::new().build()) };
            assert_eq!(run_no_ring(op), -libc::ENXIO);
        })
        .join()
        .unwrap();
    }

    fn run_no_ring<F: Future>(fut: F) -> F::Output {
        let mut fut = std::pin::pin!(fut);
        match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(v) => v,
            Poll::Pending => panic!("an op without a ring must not wait"),
        }
    }
}
