//! A window of a device starting at an offset: the `<dev> <offset>` legs of a `mirror` line.

use tables::io::{
    check_range, BlockDevice, DeviceRef, FixedBuf, IoFuture, Limits, Served, WriteFlags,
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
    fn read<'a>(&'a self, offset: Bytes, buf: &'a mut [u8]) -> IoFuture<'a> {
        Box::pin(async move {
            check_range(&self.name(), self.len, offset, Bytes(buf.len() as u64))?;
            self.dev.read(self.start + offset, buf).await
        })
    }
    fn write<'a>(&'a self, offset: Bytes, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a> {
        Box::pin(async move {
            check_range(&self.name(), self.len, offset, Bytes(buf.len() as u64))?;
            self.dev.write(self.start + offset, buf, flags).await
        })
    }
    fn read_fixed(&self, offset: Bytes, buf: FixedBuf) -> IoFuture<'_, Served> {
        Box::pin(async move {
            check_range(&self.name(), self.len, offset, Bytes(buf.len as u64))?;
            self.dev.read_fixed(self.start + offset, buf).await
        })
    }
    fn write_fixed(&self, offset: Bytes, buf: FixedBuf, flags: WriteFlags) -> IoFuture<'_, Served> {
        Box::pin(async move {
            check_range(&self.name(), self.len, offset, Bytes(buf.len as u64))?;
            self.dev.write_fixed(self.start + offset, buf, flags).await
        })
    }
    fn flush(&self) -> IoFuture<'_> {
        self.dev.flush()
    }
    fn discard(&self, offset: Bytes, len: Bytes) -> IoFuture<'_> {
        Box::pin(async move {
            check_range(&self.name(), self.len, offset, len)?;
            self.dev.discard(self.start + offset, len).await
        })
    }
    fn write_zeroes(&self, offset: Bytes, len: Bytes, flags: WriteFlags) -> IoFuture<'_> {
        Box::pin(async move {
            check_range(&self.name(), self.len, offset, len)?;
            self.dev.write_zeroes(self.start + offset, len, flags).await
        })
    }
}
