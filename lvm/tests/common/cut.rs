//! The power-cut rig shared by the power-cut tests: devices that all die at a chosen
//! mutating I/O, over `tables::mem::CrashDevice`s whose unflushed writes a power cut drops or
//! keeps (torn).

#![allow(dead_code)]

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use tables::io::{BlockDevice, IoFuture};
use tables::mem::CrashDevice;
use tables::{Bytes, DeviceRef, WriteFlags};

/// A seeded pseudo-random number (splitmix64).
pub fn rng(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Forwards to a CrashDevice; the mutating I/O that exhausts the shared budget kills every
/// device first (so it, and everything after it, fails).
pub struct Cut {
    inner: Arc<CrashDevice>,
    budget: Arc<AtomicI64>,
    all: Vec<Arc<CrashDevice>>,
}

impl Cut {
    fn tick(&self) {
        if self.budget.fetch_sub(1, Ordering::SeqCst) == 1 {
            for d in &self.all {
                d.kill();
            }
        }
    }
}

impl BlockDevice for Cut {
    fn name(&self) -> String {
        self.inner.name()
    }
    fn size(&self) -> Bytes {
        self.inner.size()
    }
    unsafe fn read<'a>(&'a self, offset: Bytes, buf: &'a mut [u8]) -> IoFuture<'a> {
        // SAFETY: our caller keeps the lending contract, and the inner future is ours.
        unsafe { self.inner.read(offset, buf) }
    }
    unsafe fn write<'a>(&'a self, offset: Bytes, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a> {
        self.tick();
        // SAFETY: as in `read`.
        unsafe { self.inner.write(offset, buf, flags) }
    }
    fn flush(&self) -> IoFuture<'_> {
        self.tick();
        self.inner.flush()
    }
    fn discard(&self, offset: Bytes, len: Bytes) -> IoFuture<'_> {
        self.tick();
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: Bytes, len: Bytes, flags: WriteFlags) -> IoFuture<'_> {
        self.tick();
        self.inner.write_zeroes(offset, len, flags)
    }
}

/// `n` crash devices, the same devices behind the shared budget, and the budget.
pub struct Rig {
    /// The devices, for the power cut and for reading after it.
    pub crash: Vec<Arc<CrashDevice>>,
    /// The same devices, dying when the budget runs out.
    pub cut: Vec<DeviceRef>,
    /// Mutating I/Os left before every device dies.
    pub budget: Arc<AtomicI64>,
}

/// `n` devices of `size` bytes (`pv0dev`, ...), with an unlimited budget.
pub fn rig(n: usize, size: u64) -> Rig {
    let crash: Vec<Arc<CrashDevice>> = (0..n)
        .map(|i| Arc::new(CrashDevice::new(format!("pv{i}dev"), Bytes(size))))
        .collect();
    let budget = Arc::new(AtomicI64::new(i64::MAX));
    let cut = crash
        .iter()
        .map(|c| {
            Arc::new(Cut {
                inner: c.clone(),
                budget: budget.clone(),
                all: crash.clone(),
            }) as DeviceRef
        })
        .collect();
    Rig { crash, cut, budget }
}

impl Rig {
    /// Cuts the power of every device: unflushed writes all dropped (one time in three) or
    /// each kept or not at random and possibly torn. Returns the mode used.
    pub fn cut_power(&self, cs: &mut u64) -> tables::mem::CutMode {
        use tables::mem::CutMode;
        let mode = if rng(cs).is_multiple_of(3) {
            CutMode::DropAll
        } else {
            CutMode::Random {
                seed: rng(cs),
                tear: true,
            }
        };
        for c in &self.crash {
            c.power_cut(mode);
        }
        mode
    }
}

/// `LVM_CUTS` from the environment, or `default`.
pub fn cuts(default: u64) -> u64 {
    std::env::var("LVM_CUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
