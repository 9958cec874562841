//! `zero` (reads zeroes, swallows writes) and `error` (fails all I/O with EIO).

use std::sync::Arc;

use crate::io::{
    check_range, ready, BlockDevice, DeviceRef, IoError, IoFuture, Limits, WriteFlags,
};
use crate::registry::{ArgError, BuildCtx, TargetKind};
use crate::units::{Bytes, Sectors};

use super::common::{instance_name, no_more};

/// The `zero` target kind (no arguments).
pub struct ZeroKind;

impl TargetKind for ZeroKind {
    fn name(&self) -> &'static str {
        "zero"
    }
    fn device_args(&self, _args: &[String]) -> Vec<usize> {
        Vec::new()
    }
    fn validate(&self, _len: Sectors, args: &[String]) -> Result<(), ArgError> {
        no_more(args, 0, "zero (no arguments)")
    }
    fn build(&self, ctx: &BuildCtx<'_>, args: &[String]) -> Result<DeviceRef, ArgError> {
        self.validate(ctx.len, args)?;
        Ok(Arc::new(Zero::new(
            instance_name("zero", ctx.line),
            ctx.len,
        )))
    }
}

/// Reads as zeroes; writes are accepted and dropped (dm-zero).
pub struct Zero {
    name: String,
    size: Bytes,
}

impl Zero {
    /// A zero device of `len` sectors.
    pub fn new(name: impl Into<String>, len: Sectors) -> Zero {
        Zero {
            name: name.into(),
            size: len.bytes(),
        }
    }
}

impl BlockDevice for Zero {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn size(&self) -> Bytes {
        self.size
    }
    fn limits(&self) -> Limits {
        Limits {
            discard_zeroes: true,
            write_zeroes: true,
            volatile_cache: false,
            ..Limits::default()
        }
    }
    unsafe fn read<'a>(&'a self, offset: Bytes, buf: &'a mut [u8]) -> IoFuture<'a> {
        ready(
            check_range(&self.name, self.size, offset, Bytes(buf.len() as u64))
                .map(|()| buf.fill(0)),
        )
    }
    unsafe fn write<'a>(
        &'a self,
        offset: Bytes,
        buf: &'a [u8],
        _flags: WriteFlags,
    ) -> IoFuture<'a> {
        ready(check_range(
            &self.name,
            self.size,
            offset,
            Bytes(buf.len() as u64),
        ))
    }
    fn flush(&self) -> IoFuture<'_> {
        ready(Ok(()))
    }
    fn discard(&self, offset: Bytes, len: Bytes) -> IoFuture<'_> {
        ready(check_range(&self.name, self.size, offset, len))
    }
    fn write_zeroes(&self, offset: Bytes, len: Bytes, _flags: WriteFlags) -> IoFuture<'_> {
        ready(check_range(&self.name, self.size, offset, len))
    }
}

/// The `error` target kind (no arguments).
pub struct ErrorKind;

impl TargetKind for ErrorKind {
    fn name(&self) -> &'static str {
        "error"
    }
    fn device_args(&self, _args: &[String]) -> Vec<usize> {
        Vec::new()
    }
    fn validate(&self, _len: Sectors, args: &[String]) -> Result<(), ArgError> {
        no_more(args, 0, "error (no arguments)")
    }
    fn build(&self, ctx: &BuildCtx<'_>, args: &[String]) -> Result<DeviceRef, ArgError> {
        self.validate(ctx.len, args)?;
        Ok(Arc::new(ErrorTarget::new(
            instance_name("error", ctx.line),
            ctx.len,
        )))
    }
}

/// Fails every read, write, discard and write-zeroes with EIO (dm-error). Flushes succeed:
/// the kernel never sends flushes to dm-error (it has no cache), so a table with an error
/// segment can still be flushed.
pub struct ErrorTarget {
    name: String,
    size: Bytes,
}

impl ErrorTarget {
    /// An error device of `len` sectors.
    pub fn new(name: impl Into<String>, len: Sectors) -> ErrorTarget {
        ErrorTarget {
            name: name.into(),
            size: len.bytes(),
        }
    }

    fn fail<'a>(&self, what: &str, offset: Bytes, len: Bytes) -> IoFuture<'a> {
        ready(
            check_range(&self.name, self.size, offset, len).and_then(|()| {
                Err(IoError::eio(format!(
                    "{}: {what} at byte {} length {}: error target",
                    self.name, offset.0, len.0
                )))
            }),
        )
    }
}

impl BlockDevice for ErrorTarget {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn size(&self) -> Bytes {
        self.size
    }
    fn limits(&self) -> Limits {
        Limits {
            volatile_cache: false,
            ..Limits::default()
        }
    }
    unsafe fn read<'a>(&'a self, offset: Bytes, buf: &'a mut [u8]) -> IoFuture<'a> {
        self.fail("read", offset, Bytes(buf.len() as u64))
    }
    unsafe fn write<'a>(
        &'a self,
        offset: Bytes,
        buf: &'a [u8],
        _flags: WriteFlags,
    ) -> IoFuture<'a> {
        self.fail("write", offset, Bytes(buf.len() as u64))
    }
    fn flush(&self) -> IoFuture<'_> {
        ready(Ok(()))
    }
    fn discard(&self, offset: Bytes, len: Bytes) -> IoFuture<'_> {
        self.fail("discard", offset, len)
    }
    fn write_zeroes(&self, offset: Bytes, len: Bytes, _flags: WriteFlags) -> IoFuture<'_> {
        self.fail("write-zeroes", offset, len)
    }
}
