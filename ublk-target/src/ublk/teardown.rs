//! How a queue thread lets go of its queue: a queue that winds down (the device stopped and
//! the kernel aborted every tag's command) drops its queue and buffers normally. A queue that
//! died (a tag or its event loop failed, or it panicked) first answers every request it holds
//! or receives with EIO until the device's stop has aborted its commands; only if that does
//! not happen in time does it leak them on purpose.

use std::cell::Cell;
use std::future::Future;
use std::mem::ManuallyDrop;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Waker};
use std::time::{Duration, Instant};

use libublk::helpers::IoBuf;
use libublk::io::UblkQueue;
use libublk::{sys, BufDesc, UblkError};

use super::ring::{drive, TagState, TagStates};

/// How long a dead queue answers requests with EIO while it waits for the device's stop to
/// abort its commands.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);
/// The longest one wait for a completion blocks while draining.
const DRAIN_SLICE: Duration = Duration::from_millis(100);

/// A queue, its tags' buffers and where their commands stand. The buffers may only be freed
/// once every tag's last command has completed (the queue wound down):
/// - In copy mode a tag's FETCH and COMMIT_AND_FETCH commands name its buffer, and the kernel
///   copies a write's data into it when a request arrives for that tag.
/// - `UblkQueue`'s destructor unregisters the ring's files, which on Linux 6.12 waits for the
///   commands in flight, so dropping the queue before would hang the thread.
///
/// A request a tag holds must be answered by us: Linux 7.x aborts such requests only when
/// `/dev/ublkcN` is closed, and stopping the device waits for them first.
pub(super) struct QueueParts<'a> {
    pub(super) queue: ManuallyDrop<Rc<UblkQueue<'a>>>,
    pub(super) bufs: Vec<IoBuf<u8>>,
    /// Indexed by tag.
    pub(super) tags: TagStates,
    zero_copy: bool,
    /// Every tag's last command has completed.
    wound_down: bool,
}

impl<'a> QueueParts<'a> {
    pub(super) fn new(
        queue: UblkQueue<'a>,
        buf_bytes: usize,
        prefault: bool,
        zero_copy: bool,
    ) -> QueueParts<'a> {
        let bufs = queue
            .tags()
            .map(|_| {
                let mut buf = IoBuf::<u8>::new(buf_bytes);
                if prefault {
                    populate(buf.as_mut_slice());
                }
                buf
            })
            .collect();
        QueueParts {
            tags: (0..queue.dev.dev_info.queue_depth)
                .map(|_| Cell::new(TagState::Armed))
                .collect(),
            queue: ManuallyDrop::new(Rc::new(queue)),
            bufs,
            zero_copy,
            wound_down: false,
        }
    }

    /// The queue wound down: its queue and buffers may be dropped.
    pub(super) fn wound_down(&mut self) {
        self.wound_down = true;
    }

    /// The queue died (its tag tasks are gone, its ring still works, and the device is being
    /// stopped): commits every request a tag holds or receives with EIO until every tag's
    /// command has been aborted, for at most [`DRAIN_LIMIT`]. Returns whether it wound down.
    pub(super) fn drain(&self) -> bool {
        let q = &**self.queue;
        let mut cx = Context::from_waker(Waker::noop());
        type Commit<'c> = Pin<Box<dyn Future<Output = Result<i32, UblkError>> + 'c>>;
        let mut commits: Vec<Option<Commit<'_>>> = self.bufs.iter().map(|_| None).collect();
        let deadline = Instant::now() + DRAIN_LIMIT;
        loop {
            if !drive(Duration::ZERO) {
                return false;
            }
            let mut busy = false;
            for ((tag, buf), commit) in q.tags().zip(&self.bufs).zip(commits.iter_mut()) {
                // A commit whose completion came retires its libublk key.
                if let Some(c) = commit {
                    if c.as_mut().poll(&mut cx).is_ready() {
                        *commit = None;
                    }
                }
                let Some(state) = self.tags.get(usize::from(tag)) else {
                    continue;
                };
                match state.get() {
                    TagState::Held => {
                        let desc = if self.zero_copy {
                            BufDesc::AutoReg(auto_reg(tag))
                        } else {
                            BufDesc::Slice(buf.as_slice())
                        };
                        state.set(TagState::Armed);
                        let mut c: Commit<'_> =
                            Box::pin(q.submit_io_commit_cmd(tag, desc, -libc::EIO));
                        // The first poll queues the commit.
                        if c.as_mut().poll(&mut cx).is_pending() {
                            *commit = Some(c);
                        }
                        busy = true;
                    }
                    TagState::Armed => busy = true,
                    TagState::Down | TagState::Failed => {}
                }
            }
            if !busy {
                // Retire what is left (completed commands only).
                commits.clear();
                return true;
            }
            if Instant::now() >= deadline {
                // The futures only hold keys in libublk's table: leaving them is safe.
                commits.into_iter().flatten().for_each(std::mem::forget);
                return false;
            }
            drive(DRAIN_SLICE);
        }
    }
}

impl Drop for QueueParts<'_> {
    fn drop(&mut self) {
        if self.wound_down {
            // SAFETY: dropped once, here; the field is not used afterwards.
            unsafe { ManuallyDrop::drop(&mut self.queue) };
            return;
        }
        log::error!(
            "a dead ublk queue's commands are still in flight: its {} tag buffers and the \
             queue are left allocated",
            self.bufs.len()
        );
        for buf in self.bufs.drain(..) {
            std::mem::forget(buf);
        }
        // The descriptor area libublk mapped for this queue (its open reference would keep
        // the device from being deleted): `cmd_buf_sz(depth)` bytes, the descriptors rounded
        // up to whole pages, from tag 0's descriptor on.
        let depth = usize::from(self.queue.dev.dev_info.queue_depth);
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let len = (depth * std::mem::size_of::<sys::ublksrv_io_desc>()).div_ceil(page) * page;
        let base = std::ptr::from_ref(self.queue.get_iod(0)).cast_mut();
        // SAFETY: [base, base + len) is exactly the queue's descriptor mapping; nothing reads it
        // any more (the tag tasks are gone) and the queue's destructor, which would unmap it
        // too, never runs (the Rc stays in its ManuallyDrop).
        if unsafe { libc::munmap(base.cast(), len) } != 0 {
            log::warn!(
                "unmapping a dead ublk queue's descriptors: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Zero copy: the driver registers each request's pages at index `tag` before handing it
/// over, and unregisters them at the commit.
pub(super) fn auto_reg(tag: u16) -> sys::ublk_auto_buf_reg {
    sys::ublk_auto_buf_reg {
        index: tag,
        ..Default::default()
    }
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
