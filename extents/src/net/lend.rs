//! How a requester lends its read buffer to the thread that receives the data (the NBD
//! link's reader, the iSCSI connection thread), and takes it back.
//!
//! The requester registers a slot holding a [`DstBuf`] in a table behind a lock, and waits on
//! a [`SlotWait`]. The receiving thread copies data in with [`DstBuf::write_at`] only under
//! that lock and only while the slot still holds the buffer; a requester that goes away (its
//! future dropped) withdraws the buffer under the same lock in `SlotWait`'s destructor. That
//! is what makes the cross-thread copy sound.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// A requester's buffer for read data, lent to a table of requests until its request
/// completes or is withdrawn.
#[derive(Clone, Copy)]
pub(crate) struct DstBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a DstBuf is only dereferenced by `write_at`, whose callers hold the lock of the
// table that holds it, while it is registered; the requester withdraws it (under the same
// lock) before its borrow of the memory ends, so the pointer is valid wherever it is used,
// whichever thread uses it.
unsafe impl Send for DstBuf {}

impl DstBuf {
    /// Lends `buf`. The caller must withdraw it (drop its [`SlotWait`]) before the borrow
    /// ends; `SlotWait`'s destructor does so.
    pub(crate) fn new(buf: &mut [u8]) -> DstBuf {
        DstBuf {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        }
    }

    /// Its length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Copies `src` (or, with `None`, `n` zero bytes) to byte `at`; false, writing nothing,
    /// if that reaches past the end. With `src`, `n` is `src.len()`.
    ///
    /// # Safety
    /// The caller holds the lock of the table this buffer is registered in, and the slot
    /// still holds it (it has not been withdrawn).
    pub(crate) unsafe fn write_at(&self, at: usize, src: Option<&[u8]>, n: usize) -> bool {
        let n = src.map_or(n, <[u8]>::len);
        if at.checked_add(n).is_none_or(|e| e > self.len) {
            return false;
        }
        // SAFETY: the lender keeps the memory valid while the slot holds it (the caller's
        // promise), and [at, at+n) lies inside it.
        unsafe {
            match src {
                Some(s) => std::ptr::copy_nonoverlapping(s.as_ptr(), self.ptr.add(at), n),
                None => std::ptr::write_bytes(self.ptr.add(at), 0, n),
            }
        }
        true
    }
}

/// For a read of `len` bytes at `offset` from a device that reads whole `block`s and is
/// `size` bytes long (the range lies inside it): where the covering aligned read starts, a
/// buffer of its length, and where the caller's bytes begin in that buffer.
pub(crate) fn bounce_for(offset: u64, len: usize, block: u64, size: u64) -> (u64, Vec<u8>, usize) {
    let start = offset / block * block;
    let end = (offset + len as u64)
        .div_ceil(block)
        .saturating_mul(block)
        .min(size);
    (
        start,
        vec![0u8; (end - start) as usize],
        (offset - start) as usize,
    )
}

/// A table of requests a requester waits on.
pub(crate) trait Outcomes {
    /// What a request ends with.
    type Outcome;
    /// The request's outcome once it has one (the slot is then the requester's no longer).
    fn poll_outcome(&self, cx: &mut Context<'_>, id: u64) -> Poll<Self::Outcome>;
    /// The requester leaves without its outcome: its buffer is withdrawn.
    fn withdraw(&self, id: u64);
}

/// Waits for a registered request's outcome; withdraws it if dropped first.
pub(crate) struct SlotWait<'a, T: Outcomes> {
    table: &'a T,
    id: u64,
    live: bool,
}

impl<'a, T: Outcomes> SlotWait<'a, T> {
    /// Waits on request `id` of `table`.
    pub(crate) fn new(table: &'a T, id: u64) -> SlotWait<'a, T> {
        SlotWait {
            table,
            id,
            live: true,
        }
    }
}

impl<T: Outcomes> Future for SlotWait<'_, T> {
    type Output = T::Outcome;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T::Outcome> {
        let w = self.get_mut();
        match w.table.poll_outcome(cx, w.id) {
            Poll::Ready(o) => {
                w.live = false;
                Poll::Ready(o)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: Outcomes> Drop for SlotWait<'_, T> {
    fn drop(&mut self) {
        if self.live {
            self.table.withdraw(self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_at_stays_inside_the_buffer() {
        let mut b = [1u8; 8];
        let d = DstBuf::new(&mut b);
        // SAFETY: `b` outlives every use of `d` here, and no other thread has it.
        unsafe {
            assert!(d.write_at(2, Some(&[7, 7]), 0));
            assert!(d.write_at(6, None, 2));
            assert!(!d.write_at(7, Some(&[9, 9]), 0));
            assert!(!d.write_at(usize::MAX, None, 2));
        }
        assert_eq!(b, [1, 1, 7, 7, 1, 1, 0, 0]);
    }
}
