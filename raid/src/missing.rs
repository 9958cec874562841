//! The stand-in for a leg given as `- -` in the table: there is no device, so the leg is
//! failed from the start and every I/O to it is an error (the array never sends any).

use tables::io::{ready, BlockDevice, IoError, IoFuture, WriteFlags};
use tables::Bytes;

/// A missing leg (`- -`).
pub struct MissingLeg {
    idx: usize,
}

impl MissingLeg {
    /// The missing leg at position `idx` of the table.
    pub fn new(idx: usize) -> MissingLeg {
        MissingLeg { idx }
    }
    fn err(&self) -> IoError {
        IoError::eio(format!("leg {} is missing ('- -' in the table)", self.idx))
    }
}

impl BlockDevice for MissingLeg {
    fn name(&self) -> String {
        format!("missing leg {}", self.idx)
    }
    fn size(&self) -> Bytes {
        Bytes(0)
    }
    unsafe fn read<'a>(&'a self, _offset: Bytes, _buf: &'a mut [u8]) -> IoFuture<'a> {
        ready(Err(self.err()))
    }
    unsafe fn write<'a>(
        &'a self,
        _offset: Bytes,
        _buf: &'a [u8],
        _flags: WriteFlags,
    ) -> IoFuture<'a> {
        ready(Err(self.err()))
    }
    fn flush(&self) -> IoFuture<'_> {
        ready(Err(self.err()))
    }
    fn discard(&self, _offset: Bytes, _len: Bytes) -> IoFuture<'_> {
        ready(Err(self.err()))
    }
    fn write_zeroes(&self, _offset: Bytes, _len: Bytes, _flags: WriteFlags) -> IoFuture<'_> {
        ready(Err(self.err()))
    }
}
