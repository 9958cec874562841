//! The one place this crate touches a device: synchronous reads, writes and flushes on a
//! [`BlockDevice`], driven to completion with [`iort::block_on`] on the calling thread.
//!
//! Metadata I/O is small and rare (a few sectors per scan or commit), so the crate's API is
//! synchronous. These functions must not be called from inside a task of an `iort` runtime
//! (they would block its ring): from async code, use [`iort::run_on_io_thread`].
//!
//! Every transfer goes through a page-aligned bounce buffer, so devices opened with
//! `O_DIRECT` see aligned memory whatever the caller passes.

use tables::buf::AlignedBuf;
use tables::{BlockDevice, Bytes, IoError, WriteFlags};

/// An I/O failure, with the device and the byte offset it happened at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{device}: {op} of {len} bytes at byte offset {offset} failed: {source}")]
pub struct DevIoError {
    /// Device name.
    pub device: String,
    /// "read", "write" or "flush".
    pub op: &'static str,
    /// Byte offset of the request.
    pub offset: u64,
    /// Length of the request.
    pub len: usize,
    /// What the device answered.
    pub source: IoError,
}

fn run<T>(
    dev: &dyn BlockDevice,
    op: &'static str,
    offset: u64,
    len: usize,
    fut: impl std::future::Future<Output = Result<T, IoError>>,
) -> Result<T, DevIoError> {
    let err = failed(dev, op, offset, len);
    iort::block_on(fut)
        .map_err(|e| err(IoError::from(e)))?
        .map_err(&err)
}

/// A failure of `op` on `dev`, as [`DevIoError`].
fn failed<'a>(
    dev: &'a dyn BlockDevice,
    op: &'static str,
    offset: u64,
    len: usize,
) -> impl Fn(IoError) -> DevIoError + 'a {
    move |source| DevIoError {
        device: dev.name(),
        op,
        offset,
        len,
        source,
    }
}

/// Reads `buf.len()` bytes at byte `offset` of `dev`.
pub fn read_at(dev: &dyn BlockDevice, offset: u64, buf: &mut [u8]) -> Result<(), DevIoError> {
    let err = failed(dev, "read", offset, buf.len());
    let mut bounce = AlignedBuf::page_aligned(buf.len()).map_err(&err)?;
    tables::io::read_blocking(dev, Bytes(offset), &mut bounce[..]).map_err(&err)?;
    buf.copy_from_slice(&bounce[..]);
    Ok(())
}

/// Reads `len` bytes at byte `offset` of `dev` into a new vector.
pub fn read_vec(dev: &dyn BlockDevice, offset: u64, len: usize) -> Result<Vec<u8>, DevIoError> {
    let mut v = vec![0u8; len];
    read_at(dev, offset, &mut v)?;
    Ok(v)
}

/// Writes `buf` at byte `offset` of `dev`; with `fua` it is durable when this returns.
pub fn write_at(
    dev: &dyn BlockDevice,
    offset: u64,
    buf: &[u8],
    fua: bool,
) -> Result<(), DevIoError> {
    let err = failed(dev, "write", offset, buf.len());
    let mut bounce = AlignedBuf::page_aligned(buf.len()).map_err(&err)?;
    bounce.copy_from_slice(buf);
    let flags = if fua {
        WriteFlags::FUA
    } else {
        WriteFlags::default()
    };
    tables::io::write_blocking(dev, Bytes(offset), &bounce[..], flags).map_err(&err)
}

/// Makes every completed write to `dev` durable.
pub fn flush(dev: &dyn BlockDevice) -> Result<(), DevIoError> {
    run(dev, "flush", 0, 0, dev.flush())
}
