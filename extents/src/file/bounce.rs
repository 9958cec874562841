//! The unaligned path of direct I/O: aligned bounce buffers, a range lock that serialises
//! read-modify-write of partially covered blocks, and the bounce reads and writes themselves.
//!
//! # Direct I/O and unaligned requests
//!
//! The extent prefers `O_DIRECT` (no double caching under a guest's own cache, and writes
//! reach the device's cache at once). `O_DIRECT` needs the buffer address, offset and length
//! aligned (`statx` `STATX_DIOALIGN`, else the logical block size). A request that is aligned
//! goes to the kernel as one SQE straight from the caller's buffer. One that is not goes
//! through an aligned **bounce buffer** over the covering aligned span; a write that only
//! partly covers its first or last block reads those blocks first (read-modify-write) while
//! holding an in-process range lock over the span, so two unaligned writes that share a block
//! cannot lose each other's bytes.
//!
//! Why a bounce buffer and not a second, buffered fd for the unaligned requests: Linux keeps
//! direct and buffered I/O coherent only by flushing the page cache before a direct I/O and
//! invalidating it afterwards. A buffered write does not wait for direct I/O in flight, so a
//! buffered write that fills a page from disk while a direct write to another part of that
//! page is in flight leaves a dirty page holding the old bytes; the invalidation after the
//! direct write then fails (the kernel logs "Page cache invalidation failure on direct I/O")
//! and writeback later puts the old bytes back. Block devices do not even take an inode lock.
//! The bounce path never mixes the two, at the price of a copy for unaligned requests only.
//!
//! The lock is only needed against other read-modify-writes (and the file `fallocate`s that
//! touch partial blocks): an aligned request never shares a block with a request whose bytes it
//! does not overlap, and concurrent overlapping writes have no defined result on any device.

use std::sync::Mutex;
use std::task::{Poll, Waker};

pub(crate) use tables::buf::AlignedBuf;
use tables::{IoError, IoResult};

use super::FileExtent;

#[derive(Default)]
struct LockState {
    held: Vec<(u64, u64)>,
    waiters: Vec<Waker>,
}

/// Byte-range locks shared by every thread using one extent. Waiters are woken through their
/// wakers, which on `iort` cross threads via the runtime's eventfd.
#[derive(Default)]
pub(crate) struct RangeLocks {
    state: Mutex<LockState>,
}

/// Holds `[start, end)` until dropped.
pub(crate) struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    range: (u64, u64),
}

impl RangeLocks {
    /// Waits until no held range overlaps `[start, end)`, then holds it.
    pub(crate) async fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        std::future::poll_fn(|cx| {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if st.held.iter().any(|&(s, e)| s < end && start < e) {
                st.waiters.push(cx.waker().clone());
                Poll::Pending
            } else {
                st.held.push((start, end));
                Poll::Ready(())
            }
        })
        .await;
        RangeGuard {
            locks: self,
            range: (start, end),
        }
    }

    #[cfg(test)]
    fn held(&self) -> usize {
        self.state.lock().map(|s| s.held.len()).unwrap_or(0)
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let waiters = {
            let mut st = self.locks.state.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = st.held.iter().position(|&r| r == self.range) {
                st.held.swap_remove(i);
            }
            std::mem::take(&mut st.waiters)
        };
        // Wake everyone: each re-checks its own range.
        for w in waiters {
            w.wake();
        }
    }
}

impl FileExtent {
    /// Reads an unaligned range in direct mode through an aligned bounce buffer over the
    /// covering aligned span.
    pub(super) async fn bounce_read(&self, off: u64, buf: &mut [u8]) -> IoResult<()> {
        let end = off + buf.len() as u64;
        let (a0, a1) = (self.align_down(off), self.align_up(end));
        let mut b = AlignedBuf::zeroed((a1 - a0) as usize, self.mem_align)?;
        // SAFETY: `b` belongs to this future and is freed only when it is dropped, after the
        // read completed or was dropped (waiting for the kernel); a leaked future leaks it.
        let n = unsafe { self.read_loop(a0, &mut b) }.await?;
        // Only the requested bytes must exist: the span's tail past them may be cut off.
        let got = (a0 + n as u64).saturating_sub(off);
        self.short_read(
            "read",
            off,
            buf.len(),
            usize::try_from(got).unwrap_or(usize::MAX),
        )?;
        let s = (off - a0) as usize;
        buf.copy_from_slice(&b[s..s + buf.len()]);
        Ok(())
    }

    /// Reads one aligned block for a read-modify-write (an error if the file no longer holds
    /// all of it: writing it back would grow the file again).
    ///
    /// # Safety
    /// As [`FileExtent::read_loop`] for `blk`.
    async unsafe fn read_block(&self, pos: u64, blk: &mut [u8]) -> IoResult<()> {
        // SAFETY: awaited here, in a future our caller keeps the lending contract for.
        let n = unsafe { self.read_loop(pos, blk) }.await?;
        self.short_read("read-modify-write", pos, blk.len(), n)
    }

    /// Writes an unaligned range in direct mode through an aligned bounce buffer.
    pub(super) async fn bounce_write(&self, off: u64, data: &[u8], rw_flags: i32) -> IoResult<()> {
        let end = off + data.len() as u64;
        let (a0, a1) = (self.align_down(off), self.align_up(end));
        let partial = off != a0 || end != a1;
        // Partial blocks are read-modify-written: no other RMW of them may interleave.
        let _guard = if partial {
            Some(self.locks.lock(a0, a1).await)
        } else {
            None
        };
        let mut b = AlignedBuf::zeroed((a1 - a0) as usize, self.mem_align)?;
        let blk = self.off_align as usize;
        if off != a0 {
            // SAFETY: the reads and the write below lend only `b`, which belongs to this
            // future and is freed when it is dropped, after they completed or were dropped
            // (waiting for the kernel); a leaked future leaks it.
            unsafe { self.read_block(a0, &mut b[..blk]) }.await?;
        }
        let tail_is_head = off != a0 && a1 - a0 == self.off_align;
        if end != a1 && !tail_is_head {
            let t = b.len() - blk;
            // SAFETY: as above.
            unsafe { self.read_block(a1 - self.off_align, &mut b[t..]) }.await?;
        }
        let s = (off - a0) as usize;
        b[s..s + data.len()].copy_from_slice(data);
        // SAFETY: as above.
        let n = unsafe { self.write_loop(a0, &b, rw_flags) }.await?;
        if n != b.len() {
            return Err(IoError::eio(format!(
                "{}: write at byte {} length {}: direct write stopped at an unaligned {} bytes",
                self.name,
                a0,
                b.len(),
                n
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;

    #[test]
    fn aligned_buf_is_aligned_and_zeroed() {
        let b = AlignedBuf::zeroed(3 * 512, 4096).unwrap();
        assert_eq!(b.as_ptr() as usize % 4096, 0);
        assert_eq!(b.len(), 1536);
        assert!(b.iter().all(|&x| x == 0));
    }

    #[test]
    fn overlapping_ranges_serialise_disjoint_ones_do_not() {
        let locks = Rc::new(RangeLocks::default());
        let log = Rc::new(RefCell::new(Vec::new()));
        iort::block_on({
            let locks = locks.clone();
            let log = log.clone();
            async move {
                let g = locks.lock(0, 512).await;
                // Disjoint: taken at once.
                let g2 = locks.lock(512, 1024).await;
                assert_eq!(locks.held(), 2);
                let (l2, log2) = (locks.clone(), log.clone());
                iort::spawn(async move {
                    let _g = l2.lock(256, 768).await;
                    log2.borrow_mut().push("overlapping taken");
                })
                .unwrap();
                iort::yield_now().await;
                iort::yield_now().await;
                assert!(log.borrow().is_empty(), "overlapping lock must wait");
                drop(g);
                iort::yield_now().await;
                assert!(log.borrow().is_empty(), "still overlaps the second range");
                drop(g2);
                for _ in 0..4 {
                    iort::yield_now().await;
                }
                assert_eq!(*log.borrow(), vec!["overlapping taken"]);
            }
        })
        .unwrap();
        assert_eq!(locks.held(), 0);
    }
}
