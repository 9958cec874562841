//! [`AlignedBuf`]: the one zeroed, aligned heap buffer of the project (direct I/O bounce
//! buffers, NBD request buffers, registered test buffers).

use std::alloc::Layout;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use crate::io::{IoError, IoResult};

/// Page size, the alignment `O_DIRECT` and registered buffers want.
pub const PAGE: usize = 4096;

/// `len` zero-initialised bytes at an address aligned to a power of two. The allocation is
/// rounded up to whole alignment units (so a page-aligned buffer owns whole pages, which
/// `MADV_*` and direct I/O may touch), and is at least one unit even for `len` 0.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like Vec<u8>; shared access only
// reads through `&self`.
unsafe impl Send for AlignedBuf {}
// SAFETY: as above.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// `len` zeroed bytes aligned to `align` (a power of two). An impossible size or
    /// alignment is `EINVAL` and a failed allocation `ENOMEM`, never an abort.
    pub fn zeroed(len: usize, align: usize) -> IoResult<AlignedBuf> {
        let align = align.max(1);
        let layout = len
            .max(1)
            .checked_next_multiple_of(align)
            .and_then(|size| Layout::from_size_align(size, align).ok())
            .ok_or_else(|| {
                IoError::invalid(format!(
                    "buffer of {len} bytes aligned to {align}: impossible size or alignment"
                ))
            })?;
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(p).ok_or_else(|| {
            IoError::new(libc::ENOMEM, format!("allocating a buffer of {len} bytes"))
        })?;
        Ok(AlignedBuf { ptr, layout, len })
    }

    /// `len` zeroed bytes aligned to a page ([`PAGE`]).
    pub fn page_aligned(len: usize) -> IoResult<AlignedBuf> {
        Self::zeroed(len, PAGE)
    }

    /// Length in bytes (what the slice shows; the allocation may be larger).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is a live, zero-initialised allocation of layout.size() >= len bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and `&mut self` guarantees exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "AlignedBuf({} bytes, align {})",
            self.len,
            self.layout.align()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_zeroed_and_as_long_as_asked() {
        for (len, align) in [
            (0usize, 4096usize),
            (1, 512),
            (4095, 4096),
            (4096, 4096),
            (1 << 20, 4096),
            (3, 1),
        ] {
            let mut b = AlignedBuf::zeroed(len, align).unwrap();
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % align, 0);
            assert!(b.iter().all(|&x| x == 0));
            if len > 0 {
                b[len - 1] = 7;
                assert_eq!(b[len - 1], 7);
            }
        }
        assert_eq!(AlignedBuf::zeroed(16, 3).unwrap_err().errno, libc::EINVAL);
        assert_eq!(
            AlignedBuf::zeroed(usize::MAX, 4096).unwrap_err().errno,
            libc::EINVAL
        );
    }
}
