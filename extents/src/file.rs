//! [`FileExtent`]: a regular file or a block device as a [`BlockDevice`], with every I/O
//! submitted on the calling thread's io_uring (`iort`).
//!
//! - `open`: probing the path, direct or buffered, limits; [`OpenOptions`], [`ExtentError`];
//! - `ring_io`: the read, write and fixed-buffer loops through io_uring;
//! - `bounce`: the unaligned path of direct I/O (bounce buffers, read-modify-write);
//! - `mapping`: files in RAM mapped whole for `copy_mapped`;
//! - `zeroing`: write-zeroes and discard;
//! - here: the extent itself and its [`BlockDevice`] implementation.

mod bounce;
mod mapping;
mod open;
mod ring_io;
mod zeroing;

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};

use tables::io::check_range;
use tables::{
    BlockDevice, Bytes, FixedBuf, IoError, IoFuture, IoResult, Limits, Served, WriteFlags,
};

use crate::sys;
use bounce::RangeLocks;
use mapping::Mapping;
pub use open::{create_sparse, DirectMode, ExtentError, ExtentKind, IoMode, OpenOptions};

/// A regular file or block device, read and written through io_uring on the calling thread.
///
/// Cheap on the hot path: an aligned read or write is one SQE (more only if the kernel
/// completes it short) and allocates nothing beyond the boxed future the trait returns.
pub struct FileExtent {
    name: String,
    path: PathBuf,
    fd: OwnedFd,
    kind: ExtentKind,
    /// Size in bytes; [`FileExtent::refresh_size`] updates it after the file or device grew.
    size: AtomicU64,
    read_only: bool,
    mode: IoMode,
    /// Buffer alignment for direct I/O (1 when buffered).
    mem_align: usize,
    /// Offset/length alignment for direct I/O (1 when buffered); a multiple of `mem_align`.
    off_align: u64,
    /// Granularity of native zeroing/discard on block devices (the logical block size, or
    /// `off_align` if larger).
    blk_unit: u64,
    limits: Limits,
    zero_method: AtomicU8,
    discard_method: AtomicU8,
    locks: RangeLocks,
    /// The file lives in RAM (tmpfs/ramfs): small requests are copied inline (see
    /// `write_loop`), large ones in parallel pieces (see `ram_parallel`).
    ram_backed: bool,
    /// Piece size and threshold for reads through `ram_parallel` (`usize::MAX`: never).
    ram_async_min: usize,
    /// A file in RAM mapped whole, for `copy_mapped` (kernel-side copies only).
    map: Option<Mapping>,
    /// The mapped file had no holes when last looked at (see `copy_mapped`): cleared by
    /// anything that may punch one (fallocate) or add one (growth).
    dense: AtomicBool,
}

impl std::fmt::Debug for FileExtent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileExtent")
            .field("path", &self.path)
            .field("kind", &self.kind)
            .field("size", &self.size)
            .field("read_only", &self.read_only)
            .field("mode", &self.mode)
            .finish()
    }
}

impl FileExtent {
    fn size_now(&self) -> Bytes {
        Bytes(self.size.load(Ordering::Relaxed))
    }

    /// The path this extent was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// File or block device.
    pub fn kind(&self) -> ExtentKind {
        self.kind
    }

    /// Direct or buffered, and why.
    pub fn io_mode(&self) -> &IoMode {
        &self.mode
    }

    /// Whether I/O bypasses the page cache.
    pub fn is_direct(&self) -> bool {
        matches!(self.mode, IoMode::Direct { .. })
    }

    fn direct(&self) -> bool {
        self.mem_align > 1 || self.off_align > 1
    }

    fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn os_err(&self, what: &str, off: u64, len: u64, errno: i32) -> IoError {
        IoError::new(
            errno,
            format!(
                "{}: {what} at byte {off} length {len}: {}",
                self.name,
                sys::errno_text(errno)
            ),
        )
    }

    fn check_write(&self, what: &str, off: Bytes, len: Bytes) -> IoResult<()> {
        check_range(&self.name, self.size_now(), off, len)?;
        if self.read_only {
            return Err(IoError::read_only(format!(
                "{}: {what} at byte {} length {}: opened read-only",
                self.name, off.0, len.0
            )));
        }
        Ok(())
    }

    /// The error for a request that found the data ending at byte `end`, before its own end:
    /// a block device that ended early, or a file that shrank under the extent. Nothing of a
    /// file past its end is made up as zeroes: its size is the size it had when opened (or
    /// refreshed), so a request within it that meets the end means the file was cut behind
    /// our back and that data is gone.
    fn past_end(&self, what: &str, off: u64, len: u64, end: u64) -> IoError {
        match self.kind {
            ExtentKind::File => {
                let now = match sys::file_len(self.raw()) {
                    Ok(l) => format!("is now {l} bytes"),
                    Err(_) => format!("ends at byte {end}"),
                };
                IoError::eio(format!(
                    "{}: {what} at byte {off} length {len}: the file {now}, shorter than the {} \
                     bytes it had when opened (it shrank under the device)",
                    self.name,
                    self.size_now().0
                ))
            }
            ExtentKind::BlockDevice { .. } => IoError::eio(format!(
                "{}: {what} at byte {off} length {len}: device ended at byte {end}",
                self.name
            )),
        }
    }

    /// A read of `len` bytes at `off` that got `n`: an error unless it got them all.
    fn short_read(&self, what: &str, off: u64, len: usize, n: usize) -> IoResult<()> {
        if n >= len {
            return Ok(());
        }
        Err(self.past_end(what, off, len as u64, off.saturating_add(n as u64)))
    }

    /// Before a write to a regular file: the file must still reach the end of the range. A
    /// file that shrank under the device is not grown back by a write (that would bring back
    /// its cut-off tail as zeroes, and undo an administrator's truncation) but refused with
    /// EIO. Costs one `lseek` per write to a file; block devices cannot be cut that way.
    fn check_eof(&self, what: &str, off: u64, len: u64) -> IoResult<()> {
        if self.kind != ExtentKind::File {
            return Ok(());
        }
        let eof = sys::file_len(self.raw()).map_err(|e| {
            let errno = e.raw_os_error().unwrap_or(libc::EIO);
            self.os_err(
                &format!("{what} (finding the end of the file)"),
                off,
                len,
                errno,
            )
        })?;
        let end = off.saturating_add(len);
        if eof < end {
            return Err(self.past_end(what, off, len, eof));
        }
        Ok(())
    }

    /// Whether a transfer at `ptr`/`off` of `len` bytes may go to the kernel as is.
    fn aligned(&self, ptr: usize, off: u64, len: usize) -> bool {
        ptr.is_multiple_of(self.mem_align)
            && off.is_multiple_of(self.off_align)
            && (len as u64).is_multiple_of(self.off_align)
    }

    fn align_down(&self, v: u64) -> u64 {
        v - v % self.off_align
    }

    fn align_up(&self, v: u64) -> u64 {
        v.div_ceil(self.off_align) * self.off_align
    }

    /// A checked, non-empty read: straight into `buf` when aligned, else bounced.
    ///
    /// # Safety
    /// The kernel writes into `buf` until each operation completes: keep the
    /// [lending contract](tables::io#the-lending-contract) for the returned future.
    async unsafe fn do_read(&self, off: u64, buf: &mut [u8]) -> IoResult<()> {
        if self.aligned(buf.as_ptr() as usize, off, buf.len()) {
            let n = self.read_loop(off, buf).await?;
            return self.short_read("read", off, buf.len(), n);
        }
        // Unaligned in direct mode: read the covering aligned span into a bounce buffer.
        self.bounce_read(off, buf).await
    }

    /// A checked, non-empty write: straight from `buf` when aligned, else bounced.
    ///
    /// # Safety
    /// The kernel reads `buf` until each operation completes: keep the
    /// [lending contract](tables::io#the-lending-contract) for the returned future.
    async unsafe fn do_write(&self, off: u64, buf: &[u8], rw_flags: i32) -> IoResult<()> {
        if self.aligned(buf.as_ptr() as usize, off, buf.len()) {
            let n = self.write_loop(off, buf, rw_flags).await?;
            if n == buf.len() {
                return Ok(());
            }
            return self.bounce_write(off + n as u64, &buf[n..], rw_flags).await;
        }
        self.bounce_write(off, buf, rw_flags).await
    }
}

impl AsFd for FileExtent {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl BlockDevice for FileExtent {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn size(&self) -> Bytes {
        self.size_now()
    }

    fn limits(&self) -> Limits {
        self.limits
    }

    unsafe fn read<'a>(&'a self, offset: Bytes, buf: &'a mut [u8]) -> IoFuture<'a> {
        Box::pin(async move {
            check_range(&self.name, self.size_now(), offset, Bytes(buf.len() as u64))?;
            if buf.is_empty() {
                return Ok(());
            }
            self.do_read(offset.0, buf).await
        })
    }

    unsafe fn write<'a>(&'a self, offset: Bytes, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a> {
        Box::pin(async move {
            self.check_write("write", offset, Bytes(buf.len() as u64))?;
            if buf.is_empty() {
                return Ok(());
            }
            self.check_eof("write", offset.0, buf.len() as u64)?;
            let rw_flags = if flags.fua { libc::RWF_DSYNC } else { 0 };
            self.do_write(offset.0, buf, rw_flags).await
        })
    }

    fn read_fixed(&self, offset: Bytes, buf: FixedBuf) -> IoFuture<'_, Served> {
        Box::pin(async move {
            check_range(&self.name, self.size_now(), offset, Bytes(buf.len as u64))?;
            if buf.len == 0 {
                return Ok(Served::Done);
            }
            self.do_read_fixed(offset.0, buf).await
        })
    }

    fn write_fixed(&self, offset: Bytes, buf: FixedBuf, flags: WriteFlags) -> IoFuture<'_, Served> {
        Box::pin(async move {
            self.check_write("write", offset, Bytes(buf.len as u64))?;
            if buf.len == 0 {
                return Ok(Served::Done);
            }
            let rw_flags = if flags.fua { libc::RWF_DSYNC } else { 0 };
            self.do_write_fixed(offset.0, buf, rw_flags).await
        })
    }

    fn copy_mapped<'a>(
        &'a self,
        offset: Bytes,
        len: usize,
        write: Option<WriteFlags>,
        copy: tables::MappedCopy<'a>,
    ) -> IoFuture<'a, Served> {
        Box::pin(async move {
            // Durability needs nothing more: the file is in RAM, so FUA is moot.
            if write.is_some() {
                self.check_write("write", offset, Bytes(len as u64))?;
            } else {
                check_range(&self.name, self.size_now(), offset, Bytes(len as u64))?;
            }
            self.do_copy_mapped(offset, len, write.is_some(), copy)
                .await
        })
    }

    fn flush(&self) -> IoFuture<'_> {
        Box::pin(async move {
            // A file in RAM has no cache to write back (tmpfs's fsync does nothing): skip the
            // system call, which layers that flush often (the raid parity log) pay for.
            if self.read_only || self.ram_backed {
                return Ok(());
            }
            self.fdatasync().await
        })
    }

    fn discard(&self, offset: Bytes, len: Bytes) -> IoFuture<'_> {
        Box::pin(async move {
            self.check_write("discard", offset, len)?;
            if len.0 == 0 {
                return Ok(());
            }
            self.check_eof("discard", offset.0, len.0)?;
            self.do_discard(offset.0, len.0).await
        })
    }

    fn write_zeroes(&self, offset: Bytes, len: Bytes, flags: WriteFlags) -> IoFuture<'_> {
        Box::pin(async move {
            self.check_write("write-zeroes", offset, len)?;
            if len.0 == 0 {
                return Ok(());
            }
            self.check_eof("write-zeroes", offset.0, len.0)?;
            self.do_write_zeroes(offset.0, len.0, flags).await
        })
    }

    fn status(&self) -> String {
        let kind = match self.kind {
            ExtentKind::File => "file".to_string(),
            ExtentKind::BlockDevice { major, minor } => format!("blockdev {major}:{minor}"),
        };
        let mode = match &self.mode {
            IoMode::Direct {
                mem_align,
                offset_align,
            } => format!("direct align {mem_align}/{offset_align}"),
            IoMode::Buffered { reason } => format!("buffered ({reason})"),
        };
        format!(
            "{kind} {} {} {}{}",
            self.name,
            self.size_now().0,
            mode,
            if self.read_only { " ro" } else { "" }
        )
    }
}

#[cfg(test)]
mod test_util {
    pub(super) fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }
}
