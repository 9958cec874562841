//! Shared test scaffolding: leg wrappers that fail, yield or cut power, and array builders.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};

use raid::{RaidDevice, RaidKind};
use tables::io::{
    read_blocking, write_blocking, BlockDevice, DeviceRef, IoError, IoFuture, Limits, WriteFlags,
};
use tables::mem::{CrashDevice, MemDevice};
use tables::registry::BuildCtx;
use tables::{Bytes, Sectors};

/// A leg wrapper: can be made to fail every I/O, yields once before each I/O (so concurrent
/// requests interleave), and can share a "write budget" after which every I/O fails (the
/// moment power is lost: nothing more reaches any disk).
pub struct Leg {
    pub inner: DeviceRef,
    pub fail: AtomicBool,
    pub yield_first: AtomicBool,
    pub budget: Option<Arc<AtomicI64>>,
}

impl Leg {
    pub fn new(inner: DeviceRef) -> Arc<Leg> {
        Arc::new(Leg {
            inner,
            fail: AtomicBool::new(false),
            yield_first: AtomicBool::new(false),
            budget: None,
        })
    }
    pub fn with_budget(inner: DeviceRef, budget: Arc<AtomicI64>) -> Arc<Leg> {
        Arc::new(Leg {
            inner,
            fail: AtomicBool::new(false),
            yield_first: AtomicBool::new(false),
            budget: Some(budget),
        })
    }
    fn gate(&self, is_write: bool) -> Result<(), IoError> {
        if self.fail.load(Ordering::Acquire) {
            return Err(IoError::eio(format!(
                "{}: injected failure",
                self.inner.name()
            )));
        }
        if let Some(b) = &self.budget {
            if b.load(Ordering::Acquire) <= 0 {
                return Err(IoError::eio("power is off"));
            }
            if is_write {
                b.fetch_sub(1, Ordering::AcqRel);
            }
        }
        Ok(())
    }
}

impl BlockDevice for Leg {
    fn name(&self) -> String {
        self.inner.name()
    }
    fn size(&self) -> Bytes {
        self.inner.size()
    }
    fn limits(&self) -> Limits {
        self.inner.limits()
    }
    unsafe fn read<'a>(&'a self, offset: Bytes, buf: &'a mut [u8]) -> IoFuture<'a> {
        Box::pin(async move {
            if self.yield_first.load(Ordering::Relaxed) {
                iort::yield_now().await;
            }
            self.gate(false)?;
            self.inner.read(offset, buf).await
        })
    }
    unsafe fn write<'a>(&'a self, offset: Bytes, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a> {
        Box::pin(async move {
            if self.yield_first.load(Ordering::Relaxed) {
                iort::yield_now().await;
            }
            self.gate(true)?;
            self.inner.write(offset, buf, flags).await
        })
    }
    fn flush(&self) -> IoFuture<'_> {
        Box::pin(async move {
            self.gate(true)?;
            self.inner.flush().await
        })
    }
    fn discard(&self, offset: Bytes, len: Bytes) -> IoFuture<'_> {
        Box::pin(async move {
            self.gate(true)?;
            self.inner.discard(offset, len).await
        })
    }
    fn write_zeroes(&self, offset: Bytes, len: Bytes, flags: WriteFlags) -> IoFuture<'_> {
        Box::pin(async move {
            self.gate(true)?;
            self.inner.write_zeroes(offset, len, flags).await
        })
    }
}

/// Named devices for the resolver.
#[derive(Default, Clone)]
pub struct Devs {
    pub map: Arc<Mutex<HashMap<String, DeviceRef>>>,
}

impl Devs {
    pub fn add(&self, name: &str, d: DeviceRef) {
        self.map.lock().unwrap().insert(name.to_string(), d);
    }
    pub fn open(&self, name: &str) -> Result<DeviceRef, String> {
        self.map
            .lock()
            .unwrap()
            .get(name)
            .cloned()
            .ok_or_else(|| format!("no device '{name}'"))
    }
}

pub fn args(s: &str) -> Vec<String> {
    s.split_whitespace().map(String::from).collect()
}

/// Builds a raid (or mirror) line of `len` sectors over `devs`.
pub fn build(
    devs: &Devs,
    mirror: bool,
    background: bool,
    len: Sectors,
    line: &str,
) -> Result<Arc<RaidDevice>, String> {
    let kind = if mirror {
        RaidKind::mirror()
    } else {
        RaidKind::raid()
    }
    .with_background(background);
    let d2 = devs.clone();
    let kind = kind.with_opener(Arc::new(move |n: &str| d2.open(n)));
    let d3 = devs.clone();
    let resolver = move |n: &str| d3.open(n);
    let ctx = BuildCtx {
        line: 1,
        len,
        resolver: &resolver,
    };
    kind.build_raid(&ctx, &args(line))
        .map_err(|e| e.to_string())
}

pub fn mem(name: &str, size: u64) -> Arc<MemDevice> {
    Arc::new(MemDevice::new(name, Bytes(size)))
}

pub fn crash(name: &str, size: u64) -> Arc<CrashDevice> {
    Arc::new(CrashDevice::new(name, Bytes(size)))
}

/// Deterministic data for a write: depends on the seed and the position.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn rd(dev: &dyn BlockDevice, off: u64, len: usize) -> Result<Vec<u8>, IoError> {
    let mut b = vec![0u8; len];
    read_blocking(dev, Bytes(off), &mut b)?;
    Ok(b)
}

pub fn wr(dev: &dyn BlockDevice, off: u64, data: &[u8]) -> Result<(), IoError> {
    write_blocking(dev, Bytes(off), data, WriteFlags::default())
}

pub fn flush(dev: &dyn BlockDevice) -> Result<(), IoError> {
    iort::block_on(dev.flush()).unwrap()
}

pub fn msg(dev: &dyn BlockDevice, m: &str) -> Result<String, IoError> {
    iort::block_on(dev.message(&args(m))).unwrap()
}

pub fn sync_all(dev: &RaidDevice) {
    iort::block_on(dev.sync_all()).unwrap().unwrap();
}

/// Runs `check` to completion and returns the mismatch count.
pub fn check(dev: &RaidDevice) -> u64 {
    msg(dev, "check").unwrap();
    sync_all(dev);
    dev.mismatch_count()
}

/// Compares two buffers; on mismatch reports the first differing offset (not the buffers).
#[track_caller]
pub fn same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        let bad = got.iter().zip(want).filter(|(a, b)| a != b).count();
        panic!(
            "{what}: first difference at byte {i} (got {:#04x}, want {:#04x}); {bad} bytes differ",
            got[i], want[i]
        );
    }
}

/// Panics so far in this test binary, on any thread: the assembly thread's panics are turned
/// into errors by `RaidDevice::open`, so only a hook sees them. The count is process-wide.
pub fn panics() -> usize {
    static COUNT: AtomicUsize = AtomicUsize::new(0);
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |i| {
            COUNT.fetch_add(1, Ordering::SeqCst);
            prev(i)
        }));
    });
    COUNT.load(Ordering::SeqCst)
}
