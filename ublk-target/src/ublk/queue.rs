//! One hardware queue's thread: a task per tag on libublk's executor, the event loop that
//! drives the queue ring, and the [`iort::Backend`] that puts the table's SQEs on that ring.

use std::rc::Rc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::{sys, BufDesc, UblkError};
use tables::io::{BlockDevice, DeviceRef};

use super::dispatch::serve;
use super::options::{describe, ZERO_COPY_FLAGS};
use super::ring::QueueRing;
use super::zero_copy::{ZcRequest, ZeroCopy};
use super::UblkOptions;

/// Seconds of no I/O after which a queue goes idle (libublk then releases buffer pages).
const IDLE_SECS: u64 = 20;

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

/// One hardware queue: a local task per tag, all driven by libublk's event loop.
pub(super) fn queue_thread(qid: u16, udev: &UblkDev, dev: DeviceRef, setup: QueueSetup) {
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
    // The table's I/O goes onto this queue's ring. Declared before the executor, so dropped
    // after it (locals drop in reverse order): operations its tasks drop in flight can still
    // reap this queue's ring.
    let _ring = QueueRing::enter(q.clone());
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
