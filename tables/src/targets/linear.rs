//! `linear <dev> <offset>`: maps the segment onto `dev` starting at sector `offset`.

use crate::io::{
    check_range, ready, BlockDevice, DeviceRef, FixedBuf, IoFuture, Limits, MappedCopy, Served,
    WriteFlags,
};
use crate::registry::{ArgError, BuildCtx, TargetKind};
use crate::units::{Bytes, Sectors};

use super::common::{
    arg_offset, at_least, check_fits, instance_name, no_more, norm_num, open, shift,
};

const USAGE: &str = "linear <device> <offset>";

/// The `linear` target kind.
pub struct LinearKind;

impl TargetKind for LinearKind {
    fn name(&self) -> &'static str {
        "linear"
    }
    fn device_args(&self, _args: &[String]) -> Vec<usize> {
        vec![0]
    }
    fn validate(&self, len: Sectors, args: &[String]) -> Result<(), ArgError> {
        at_least(args, 2, USAGE)?;
        no_more(args, 2, USAGE)?;
        arg_offset(args, 2, len)?;
        Ok(())
    }
    fn normalize(&self, args: &[String]) -> Vec<String> {
        let mut v = args.to_vec();
        if let Some(o) = v.get_mut(1) {
            *o = norm_num(o);
        }
        v
    }
    fn arg_name(&self, _args: &[String], arg: usize) -> Option<String> {
        match arg {
            1 => Some("device".into()),
            2 => Some("offset".into()),
            _ => None,
        }
    }
    fn build(&self, ctx: &BuildCtx<'_>, args: &[String]) -> Result<DeviceRef, ArgError> {
        self.validate(ctx.len, args)?;
        let offset = arg_offset(args, 2, ctx.len)?;
        let dev = open(ctx, args, 1)?;
        check_fits(&dev, args, 1, offset, ctx.len)?;
        Ok(std::sync::Arc::new(Linear::new(
            instance_name("linear", ctx.line),
            dev,
            offset,
            ctx.len,
        )))
    }
}

/// A window of `len` sectors of another device, starting at `offset`.
pub struct Linear {
    name: String,
    dev: DeviceRef,
    offset: Bytes,
    size: Bytes,
}

impl Linear {
    /// Maps `len` sectors of `dev` starting at sector `offset`. The caller checks that they
    /// fit (the kind does, at build); out-of-range requests fail on the device anyway.
    pub fn new(name: impl Into<String>, dev: DeviceRef, offset: Sectors, len: Sectors) -> Linear {
        Linear {
            name: name.into(),
            dev,
            offset: offset.bytes(),
            size: len.bytes(),
        }
    }

    fn map(&self, off: Bytes, len: u64) -> Result<Bytes, crate::io::IoError> {
        check_range(&self.name, self.size, off, Bytes(len))?;
        shift(&self.name, self.offset, off)
    }
}

impl BlockDevice for Linear {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn size(&self) -> Bytes {
        self.size
    }
    fn limits(&self) -> Limits {
        self.dev.limits()
    }
    unsafe fn read<'a>(&'a self, offset: Bytes, buf: &'a mut [u8]) -> IoFuture<'a> {
        match self.map(offset, buf.len() as u64) {
            Ok(o) => self.dev.read(o, buf),
            Err(e) => ready(Err(e)),
        }
    }
    unsafe fn write<'a>(&'a self, offset: Bytes, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a> {
        match self.map(offset, buf.len() as u64) {
            Ok(o) => self.dev.write(o, buf, flags),
            Err(e) => ready(Err(e)),
        }
    }
    fn read_fixed(&self, offset: Bytes, buf: FixedBuf) -> IoFuture<'_, Served> {
        match self.map(offset, buf.len as u64) {
            Ok(o) => self.dev.read_fixed(o, buf),
            Err(e) => ready(Err(e)),
        }
    }
    fn write_fixed(&self, offset: Bytes, buf: FixedBuf, flags: WriteFlags) -> IoFuture<'_, Served> {
        match self.map(offset, buf.len as u64) {
            Ok(o) => self.dev.write_fixed(o, buf, flags),
            Err(e) => ready(Err(e)),
        }
    }
    fn copy_mapped<'a>(
        &'a self,
        offset: Bytes,
        len: usize,
        write: Option<WriteFlags>,
        copy: MappedCopy<'a>,
    ) -> IoFuture<'a, Served> {
        match self.map(offset, len as u64) {
            Ok(o) => self.dev.copy_mapped(o, len, write, copy),
            Err(e) => ready(Err(e)),
        }
    }
    fn flush(&self) -> IoFuture<'_> {
        self.dev.flush()
    }
    fn discard(&self, offset: Bytes, len: Bytes) -> IoFuture<'_> {
        match self.map(offset, len.0) {
            Ok(o) => self.dev.discard(o, len),
            Err(e) => ready(Err(e)),
        }
    }
    fn write_zeroes(&self, offset: Bytes, len: Bytes, flags: WriteFlags) -> IoFuture<'_> {
        match self.map(offset, len.0) {
            Ok(o) => self.dev.write_zeroes(o, len, flags),
            Err(e) => ready(Err(e)),
        }
    }
}
