//! `delay <dev> <offset> <ms> [<write_dev> <write_offset> <write_ms> [<flush_dev> <flush_offset>
//! <flush_ms>]]`: delays I/O (and optionally sends it to other devices), as dm-delay.
//!
//! With 3 arguments reads, writes and flushes share the device and delay; with 6 the second
//! triple applies to writes and flushes; with 9 the third applies to flushes. Discards and
//! write-zeroes are writes. Each request waits its class's delay (an io_uring timeout via
//! `iort::sleep`, no thread) and is then issued.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::io::{
    check_range, ready, BlockDevice, DeviceRef, IoFuture, IoResult, Limits, WriteFlags,
};
use crate::registry::{ArgError, BuildCtx, TargetKind};
use crate::units::{Bytes, Sectors};

use super::common::{arg_offset, arg_range, check_fits, instance_name, norm_num, open, shift};

const USAGE: &str = "delay <device> <offset> <delay_ms> [<write_device> <write_offset> <write_delay_ms> [<flush_device> <flush_offset> <flush_delay_ms>]]";

/// The `delay` target kind.
pub struct DelayKind;

fn check(len: Sectors, args: &[String]) -> Result<Vec<(Sectors, u32)>, ArgError> {
    let n = args.len();
    if n != 3 && n != 6 && n != 9 {
        return Err(if n > 9 {
            ArgError::at(
                10,
                format!("unexpected argument '{}': delay takes exactly 3, 6 or 9 arguments ({n} given; usage: {USAGE})", args[9]),
            )
        } else {
            ArgError::at(
                n + 1,
                format!(
                    "missing: delay takes exactly 3, 6 or 9 arguments ({n} given; usage: {USAGE})"
                ),
            )
        });
    }
    let mut classes = Vec::new();
    for k in 0..n / 3 {
        let off = arg_offset(args, 3 * k + 2, len)?;
        let ms = arg_range(args, 3 * k + 3, 0, u32::MAX as u64)? as u32;
        classes.push((off, ms));
    }
    Ok(classes)
}

impl TargetKind for DelayKind {
    fn name(&self) -> &'static str {
        "delay"
    }
    fn device_args(&self, args: &[String]) -> Vec<usize> {
        (0..args.len()).step_by(3).collect()
    }
    fn validate(&self, len: Sectors, args: &[String]) -> Result<(), ArgError> {
        check(len, args).map(|_| ())
    }
    fn normalize(&self, args: &[String]) -> Vec<String> {
        args.iter()
            .enumerate()
            .map(|(i, a)| if i % 3 == 0 { a.clone() } else { norm_num(a) })
            .collect()
    }
    fn arg_name(&self, args: &[String], arg: usize) -> Option<String> {
        if arg == 0 {
            return None;
        }
        let what = ["device", "offset", "delay"][(arg - 1) % 3];
        let class = match ((arg - 1) / 3, args.len()) {
            (0, n) if n <= 3 => "",
            (0, _) => "read ",
            (1, _) => "write ",
            (2, _) => "flush ",
            _ => return None,
        };
        Some(format!("{class}{what}"))
    }
    fn build(&self, ctx: &BuildCtx<'_>, args: &[String]) -> Result<DeviceRef, ArgError> {
        let classes = check(ctx.len, args)?;
        let mut opened = Vec::new();
        for (k, (off, ms)) in classes.iter().enumerate() {
            let dev = open(ctx, args, 3 * k + 1)?;
            check_fits(&dev, args, 3 * k + 1, *off, ctx.len)?;
            opened.push(DelayClass {
                label: args[3 * k].clone(),
                dev,
                offset: *off,
                delay: Duration::from_millis(*ms as u64),
            });
        }
        let mut it = opened.into_iter();
        let (Some(read), write, flush) = (it.next(), it.next(), it.next()) else {
            return Err(ArgError::whole("no device"));
        };
        Ok(Arc::new(Delay::new(
            instance_name("delay", ctx.line),
            ctx.len,
            read,
            write,
            flush,
        )))
    }
}

/// One class of a delay device: where its requests go and how long they wait.
#[derive(Clone)]
pub struct DelayClass {
    /// How the table named the device (for messages).
    pub label: String,
    /// The device.
    pub dev: DeviceRef,
    /// First sector used on it.
    pub offset: Sectors,
    /// How long each request waits before it is issued.
    pub delay: Duration,
}

/// A delay device.
pub struct Delay {
    name: String,
    size: Bytes,
    read: DelayClass,
    write: DelayClass,
    flush: DelayClass,
    /// Requests waiting or in flight per class (the status line).
    inflight: [AtomicU32; 3],
}

/// Decrements a class's in-flight count when the request ends (even if dropped).
struct Inflight<'a>(&'a AtomicU32);

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Delay {
    /// A delay device of `len` sectors: `write` defaults to `read`, `flush` to `write`.
    pub fn new(
        name: impl Into<String>,
        len: Sectors,
        read: DelayClass,
        write: Option<DelayClass>,
        flush: Option<DelayClass>,
    ) -> Delay {
        let write = write.unwrap_or_else(|| read.clone());
        let flush = flush.unwrap_or_else(|| write.clone());
        Delay {
            name: name.into(),
            size: len.bytes(),
            read,
            write,
            flush,
            inflight: Default::default(),
        }
    }

    async fn wait(&self, class: usize, d: Duration) -> Inflight<'_> {
        self.inflight[class].fetch_add(1, Ordering::Relaxed);
        let guard = Inflight(&self.inflight[class]);
        if !d.is_zero() {
            iort::sleep(d).await;
        }
        guard
    }

    fn range(&self, offset: Bytes, len: u64) -> IoResult<()> {
        check_range(&self.name, self.size, offset, Bytes(len))
    }
}

impl BlockDevice for Delay {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn size(&self) -> Bytes {
        self.size
    }
    fn limits(&self) -> Limits {
        self.read
            .dev
            .limits()
            .stack(&self.write.dev.limits())
            .stack(&self.flush.dev.limits())
    }
    unsafe fn read<'a>(&'a self, offset: Bytes, buf: &'a mut [u8]) -> IoFuture<'a> {
        if let Err(e) = self.range(offset, buf.len() as u64) {
            return ready(Err(e));
        }
        Box::pin(async move {
            let _g = self.wait(0, self.read.delay).await;
            let c = &self.read;
            let at = shift(&self.name, c.offset.bytes(), offset)?;
            c.dev.read(at, buf).await
        })
    }
    unsafe fn write<'a>(&'a self, offset: Bytes, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a> {
        if let Err(e) = self.range(offset, buf.len() as u64) {
            return ready(Err(e));
        }
        Box::pin(async move {
            let _g = self.wait(1, self.write.delay).await;
            let c = &self.write;
            let at = shift(&self.name, c.offset.bytes(), offset)?;
            c.dev.write(at, buf, flags).await
        })
    }
    fn flush(&self) -> IoFuture<'_> {
        Box::pin(async move {
            let _g = self.wait(2, self.flush.delay).await;
            self.flush.dev.flush().await
        })
    }
    fn discard(&self, offset: Bytes, len: Bytes) -> IoFuture<'_> {
        if let Err(e) = self.range(offset, len.0) {
            return ready(Err(e));
        }
        Box::pin(async move {
            let _g = self.wait(1, self.write.delay).await;
            let c = &self.write;
            let at = shift(&self.name, c.offset.bytes(), offset)?;
            c.dev.discard(at, len).await
        })
    }
    fn write_zeroes(&self, offset: Bytes, len: Bytes, flags: WriteFlags) -> IoFuture<'_> {
        if let Err(e) = self.range(offset, len.0) {
            return ready(Err(e));
        }
        Box::pin(async move {
            let _g = self.wait(1, self.write.delay).await;
            let c = &self.write;
            let at = shift(&self.name, c.offset.bytes(), offset)?;
            c.dev.write_zeroes(at, len, flags).await
        })
    }
    /// dm-delay's status: requests waiting or in flight per class, `reads writes flushes`.
    fn status(&self) -> String {
        format!(
            "{} {} {}",
            self.inflight[0].load(Ordering::Relaxed),
            self.inflight[1].load(Ordering::Relaxed),
            self.inflight[2].load(Ordering::Relaxed)
        )
    }
}
