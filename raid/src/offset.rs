//! A window of a device starting at an offset: the `<dev> <offset>` legs of a `mirror` line.

use tables::io::{
    check_range, BlockDevice, DeviceRef, FixedBuf, IoError, IoFuture, IoResult, Limits, Served,
    WriteFlags,
};
use tables::Bytes;

/// `len` bytes of `dev` starting at `start`.
pub struct OffsetDevice {
    dev: DeviceRef,
    start: Bytes,
    len: Bytes,
}

impl OffsetDevice {
    /// The window `[start, start+len)` of `dev` (the caller checked it fits).
    pub fn new(dev: DeviceRef, start: Bytes, len: Bytes) -> OffsetDevice {
        OffsetDevice { dev, start, len }
    }
}

impl OffsetDevice {
    /// Checks `[offset, offset + len)` against the window and returns where it starts on the
    /// device (checked, though `new`'s caller made sure the window fits the device).
    fn at(&self, offset: Bytes, len: u64) -> IoResult<Bytes> {
        check_range(&self.name(), self.len, offset, Bytes(len))?;
        self.start.checked_add(offset).ok_or_else(|| {
            IoError::invalid(format!(
                "{}: byte {} of the window is past 64 bits",
                self.name(),
                offset.0
            ))
        })
    }
}

impl BlockDevice for OffsetDevice {
    fn name(&self) -> String {
        format!("{}+{}", self.dev.name(), self.start.0)
    }
    fn size(&self) -> Bytes {
        self.len
    }
    fn limits(&self) -> Limits {
        self.dev.limits()
    }
    unsafe fn read<'a>(&'a self, offset: Bytes, buf: &'a mut [u8]) -> IoFuture<'a> {
        Box::pin(async move {
            let at = self.at(offset, buf.len() as u64)?;
            self.dev.read(at, buf).await
        })
    }
    unsafe fn write<'a>(&'a self, offset: Bytes, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a> {
        Box::pin(async move {
            let at = self.at(offset, buf.len() as u64)?;
            self.dev.write(at, buf, flags).await
        })
    }
    fn read_fixed(&self, offset: Bytes, buf: FixedBuf) -> IoFuture<'_, Served> {
        Box::pin(async move {
            let at = self.at(offset, buf.len as u64)?;
            self.dev.read_fixed(at, buf).await
        })
    }
    fn write_fixed(&self, offset: Bytes, buf: FixedBuf, flags: WriteFlags) -> IoFuture<'_, Served> {
        Box::pin(async move {
            let at = self.at(offset, buf.len as u64)?;
            self.dev.write_fixed(at, buf, flags).await
        })
    }
    fn flush(&self) -> IoFuture<'_> {
        self.dev.flush()
    }
    fn discard(&self, offset: Bytes, len: Bytes) -> IoFuture<'_> {
        Box::pin(async move {
            let at = self.at(offset, len.0)?;
            self.dev.discard(at, len).await
        })
    }
    fn write_zeroes(&self, offset: Bytes, len: Bytes, flags: WriteFlags) -> IoFuture<'_> {
        Box::pin(async move {
            let at = self.at(offset, len.0)?;
            self.dev.write_zeroes(at, len, flags).await
        })
    }
}
