//! One hardware queue's thread: a task per tag on libublk's executor, and the event loop that
//! drives the queue ring.

use std::cell::{Cell, RefCell};
use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::{BufDesc, UblkError};
use tables::io::{BlockDevice, DeviceRef};

use super::dispatch::serve;
use super::failure::{panic_message, DeviceFailure};
use super::options::{describe, ZERO_COPY_FLAGS};
use super::ring::{handle_cqe, QueueRing, TagState, TagStates};
use super::teardown::{auto_reg, QueueParts};
use super::zero_copy::{ZcRequest, ZeroCopy};
use super::UblkOptions;

/// Seconds of no I/O after which a queue goes idle (libublk then releases buffer pages).
const IDLE_SECS: u64 = 20;

/// One hardware queue: a local task per tag, all driven by libublk's event loop, until the
/// queue is down. If the queue dies instead (a tag's commands or the event loop fail, or
/// either panics), its requests would have nobody to serve them: it reports the failure to
/// `failure` (which stops the device) and answers them with EIO until the stop is through.
pub(super) fn queue_thread(
    qid: u16,
    udev: &UblkDev,
    dev: DeviceRef,
    setup: QueueSetup,
    failure: &DeviceFailure,
) {
    let what = format!("ublk queue {qid}");
    let q = match UblkQueue::new(qid, udev) {
        Ok(q) => q,
        Err(e) => {
            // start_dev waits for every queue to register its buffers: a failure report
            // (the mlock-failed flag is the public way to send one) makes it fail instead.
            udev.notify_buffer_registration_complete(true);
            failure.fail(&what, format!("setup failed: {}", describe(&e)));
            return;
        }
    };
    // The device's own flags decide (a recovered device keeps the path it was created with).
    let zc = (udev.dev_info.flags & ZERO_COPY_FLAGS == ZERO_COPY_FLAGS).then(|| ZeroCopy {
        cdev: udev.tgt.fds[0],
        qid,
    });
    // Declared before the executor, so dropped after it (locals drop in reverse order), also
    // when a panic unwinds: the tasks borrow the buffers, and the queue outlives them.
    let buf_bytes = udev.dev_info.max_io_buf_bytes as usize;
    let mut parts = QueueParts::new(q, buf_bytes, setup.prefault, zc.is_some());
    let q = Rc::clone(&parts.queue);
    // The table's I/O goes onto this queue's ring; before the executor too, so operations its
    // tasks drop in flight can still reap this queue's ring.
    let _ring = QueueRing::enter(q.clone(), parts.tags.clone());
    let fatal: RefCell<Option<String>> = RefCell::new(None);
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
    for (tag, buf) in q.tags().zip(parts.bufs.iter_mut()) {
        let q = q.clone();
        let states = parts.tags.clone();
        let dev = dev.clone();
        let fatal = &fatal;
        let task = async move {
            // The executor would catch a panic too, and quietly end the task.
            // SAFETY: the tag's buffer lives in `parts`, declared before the executor, so it
            // outlives every task: the tasks finish, or are dropped with the executor below
            // (also while unwinding), and none is ever forgotten; a request future dropped
            // in flight waits for its target I/O (ring.rs). A queue that cannot wind down
            // is leaked whole, buffers included.
            let serving = unsafe { tag_task(&q, tag, &*dev, buf, &states, zc) };
            let served = AssertUnwindSafe(serving).catch_unwind().await;
            let why = match served {
                Ok(Ok(())) | Ok(Err(UblkError::QueueIsDown)) => return,
                Ok(Err(e)) => format!("tag {tag} failed: {}", describe(&e)),
                Err(panic) => format!("tag {tag} panicked: {}", panic_message(&*panic)),
            };
            // The request this tag holds now stays unserved: the whole queue must go.
            fatal.borrow_mut().get_or_insert(why);
        };
        tasks.push(match &kick {
            Some(k) => exe.spawn(crate::kick::Kicked::new(task, k.clone()).boxed_local()),
            None => exe.spawn(task.boxed_local()),
        });
    }
    let ticker = exe.clone();
    let res = std::panic::catch_unwind(AssertUnwindSafe(|| {
        smol::block_on(exe.run(async {
            let run_ops = || while ticker.try_tick() {};
            let stop = || fatal.borrow().is_some();
            let done = || tasks.iter().all(|t| t.is_finished());
            event_loop(&q, setup.spin, run_ops, stop, done).await
        }))
    }));
    let all_done = tasks.iter().all(|t| t.is_finished());
    // Unfinished tasks (a dead queue) are dropped here, with any target I/O they have in
    // flight (which waits for the kernel: ring.rs).
    drop(tasks);
    drop(ticker);
    drop(exe);
    let why = match res {
        Ok(r) => fatal.into_inner().or_else(|| {
            r.err()
                .map(|e| format!("its event loop failed: {}", describe(&e)))
        }),
        Err(panic) => Some(format!(
            "its event loop panicked: {}",
            panic_message(&*panic)
        )),
    };
    let why = why.or_else(|| (!all_done).then(|| "its event loop ended early".to_string()));
    match why {
        None => parts.wound_down(),
        Some(why) => {
            failure.fail(&what, why);
            if parts.drain() {
                parts.wound_down();
            }
        }
    }
}

/// The [`UblkOptions`] the queue threads act on.
#[derive(Clone, Copy)]
pub(super) struct QueueSetup {
    pub(super) pin_queues: bool,
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
    stop: impl Fn() -> bool,
    done: impl Fn() -> bool,
) -> Result<(), UblkError> {
    use libublk::uring_async::{
        run_uring_tasks, ublk_reap_io_events_with_update_queue, uring_poll_io_fn,
    };
    let last_busy = Cell::new(Instant::now());
    // A failure to wait on the ring (not a signal, not a full completion queue) ends the loop.
    let poll_error: RefCell<Option<UblkError>> = RefCell::new(None);
    let poll_uring = || {
        let polling = !spin.is_zero() && last_busy.get().elapsed() < spin;
        let stopping = stop();
        let poll_error = &poll_error;
        async move {
            if stopping {
                // Ends the loop (with `done` true) without waiting.
                return Err(UblkError::QueueIsDown);
            }
            let r = if polling {
                uring_poll_io_fn::<iort::io_uring::squeue::Entry>(q, None, 0)
            } else {
                let t = iort::io_uring::types::Timespec::new().sec(IDLE_SECS);
                uring_poll_io_fn::<iort::io_uring::squeue::Entry>(q, Some(t), 1)
            };
            if let Err(UblkError::IOError(e)) = &r {
                if !matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                ) {
                    *poll_error.borrow_mut() = Some(UblkError::IOError(std::io::Error::new(
                        e.kind(),
                        format!("waiting on the queue ring: {e}"),
                    )));
                }
            }
            r
        }
    };
    let done = || stop() || poll_error.borrow().is_some() || done();
    let reap = |timed_out| {
        #[cfg(feature = "fault-injection")]
        super::fault::loop_error()?;
        let mut n = 0u32;
        let r = ublk_reap_io_events_with_update_queue(q, timed_out, None, |cqe| {
            n += 1;
            handle_cqe(cqe)
        });
        if n > 0 {
            last_busy.set(Instant::now());
        }
        r
    };
    run_uring_tasks(poll_uring, reap, run_ops, done).await?;
    match poll_error.into_inner() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// One tag: fetch a request, serve it from the tag's buffer, commit the result, repeat until
/// the queue goes down.
///
/// # Safety
/// The table's targets may lend `buf` to the kernel: keep the
/// [lending contract](tables::io#the-lending-contract) for the returned future.
async unsafe fn tag_task(
    q: &UblkQueue<'_>,
    tag: u16,
    dev: &dyn BlockDevice,
    buf: &mut IoBuf<u8>,
    states: &TagStates,
    zc: Option<ZeroCopy>,
) -> Result<(), UblkError> {
    // The fetch's completion marked the tag as holding its request; queuing the commit (its
    // future's first poll) hands it back.
    let handed_back = || {
        if let Some(s) = states.get(usize::from(tag)) {
            s.set(TagState::Armed);
        }
    };
    let Some(zc) = zc else {
        q.submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(buf))
            .await?;
        loop {
            let iod = *q.get_iod(tag);
            #[cfg(feature = "fault-injection")]
            super::fault::on_request(&iod)?;
            let res = serve(dev, &iod, buf.as_mut_slice(), None).await;
            handed_back();
            q.submit_io_commit_cmd(tag, BufDesc::Slice(buf.as_slice()), res)
                .await?;
        }
    };
    let req = ZcRequest { zc, tag };
    q.submit_io_prep_cmd(tag, BufDesc::AutoReg(auto_reg(tag)), 0, None)
        .await?;
    loop {
        let iod = *q.get_iod(tag);
        #[cfg(feature = "fault-injection")]
        super::fault::on_request(&iod)?;
        let res = serve(dev, &iod, buf.as_mut_slice(), Some(req)).await;
        handed_back();
        q.submit_io_commit_cmd(tag, BufDesc::AutoReg(auto_reg(tag)), res)
            .await?;
    }
}
