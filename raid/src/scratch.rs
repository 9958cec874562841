//! Reusable scratch buffers for the parity paths.
//!
//! A raid5 write needs chunk-sized buffers for old data, parity and reconstructed columns on
//! every partial-stripe request. Fresh `vec![0; n]` buffers cost a memset each, and large ones
//! come from `mmap` and fault in zeroed pages (both showed in a profile of 1M sequential
//! writes: ~20% of the serving thread). Each thread keeps a few released buffers instead.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

/// Buffers kept per thread.
const MAX_POOLED: usize = 64;
/// Larger buffers are not kept.
const MAX_POOLED_BYTES: usize = 4 << 20;

thread_local! {
    static POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// A byte buffer of a given length whose contents start out **unspecified** (zeroes, or
/// stale bytes from an earlier use on this thread): only for buffers that are completely
/// overwritten before they are read, by a device read or by [`crate::xor::xor_many`].
/// Dropping it returns the allocation to the thread's pool.
pub struct Scratch {
    buf: Vec<u8>,
    len: usize,
}

impl Scratch {
    /// A buffer of `len` bytes.
    pub fn new(len: usize) -> Scratch {
        let pooled = POOL
            .try_with(|p| {
                let mut p = p.borrow_mut();
                // Smallest pooled buffer that fits, so small requests leave big ones alone.
                let best = p
                    .iter()
                    .enumerate()
                    .filter(|(_, b)| b.len() >= len)
                    .min_by_key(|(_, b)| b.len())
                    .map(|(i, _)| i);
                best.map(|i| p.swap_remove(i))
            })
            .ok()
            .flatten();
        let buf = pooled.unwrap_or_else(|| vec![0u8; len.max(4096).next_power_of_two()]);
        Scratch { buf, len }
    }
}

impl Deref for Scratch {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf[..self.len]
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.buf.len() > MAX_POOLED_BYTES {
            return;
        }
        let buf = std::mem::take(&mut self.buf);
        let _ = POOL.try_with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < MAX_POOLED {
                p.push(buf);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_sized() {
        let a = Scratch::new(65536);
        let ptr = a.as_ptr();
        assert_eq!(a.len(), 65536);
        drop(a);
        let mut b = Scratch::new(1000);
        assert_eq!(b.len(), 1000);
        assert_eq!(b.as_ptr(), ptr, "a released buffer is handed out again");
        b.fill(7);
        // A smaller request prefers the smallest buffer that fits.
        let big = Scratch::new(1 << 20);
        drop(big);
        drop(b);
        let c = Scratch::new(4096);
        assert_eq!(c.as_ptr(), ptr);
        assert!(Scratch::new(8 << 20).len() == 8 << 20);
    }
}
