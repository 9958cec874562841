//! The zero-copy data path: request pages registered in the queue ring's buffer table
//! (fixed buffers), copies through `/dev/ublkcN` into mapped memory, and which step served
//! the last request (the step memory).

use tables::io::{BlockDevice, FixedBuf, IoError, MappedCopy, Served, WriteFlags};
use tables::Bytes;

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
pub(super) struct ZeroCopy {
    pub(super) cdev: std::os::fd::RawFd,
    pub(super) qid: u16,
}

/// The request of one tag on a zero-copy queue.
#[derive(Clone, Copy)]
pub(super) struct ZcRequest {
    pub(super) zc: ZeroCopy,
    pub(super) tag: u16,
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
    pub(super) fn copy(self, buf: &mut [u8], to_request: bool) -> Result<(), IoError> {
        // SAFETY: `buf` is live and ours for the whole (synchronous) call.
        unsafe { self.copy_raw(buf.as_mut_ptr(), 0, buf.len(), to_request) }
    }

    /// Copies `len` bytes between `ptr` and the request from byte `at` on, with pread/pwrite
    /// on `/dev/ublkcN`. `ptr` is only handed to the kernel: it may be a mapping whose pages
    /// are gone (then the error is `EFAULT`).
    ///
    /// # Safety
    /// `ptr..ptr + len` must be memory of ours (a live buffer, or a mapping of a device's
    /// file) that stays valid, and that nothing else uses, for the call: the kernel writes
    /// there when `to_request` is false.
    unsafe fn copy_raw(
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
            // SAFETY: pread/pwrite between the memory our caller vouches for and the driver's
            // descriptor, which lives as long as the queue.
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
    pub(super) async fn direct(
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
            let copy = move |p: *mut u8, at: usize, k: usize| {
                // SAFETY: called only through `MappedCopy::copy`, whose caller (a device)
                // vouches that `p..p + k` is its mapped memory, mapped for the call.
                unsafe { self.copy_raw(p, at, k, !write) }
            };
            let mapped = dev
                .copy_mapped(
                    Bytes(off),
                    n,
                    write.then_some(flags),
                    MappedCopy::new(&copy),
                )
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
