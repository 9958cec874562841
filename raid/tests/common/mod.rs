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

/// A seeded generator (splitmix64) for the power-cut tests.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The line the power-cut tests use: `t` over legs `m0 d0 ...` with 16 KiB regions.
pub fn line_for(t: &str, n: usize) -> String {
    let mut line = match t {
        "raid1" => format!("raid1 3 0 region_size 32 {n}"),
        "raid10" => format!("raid10 3 8 region_size 32 {n}"),
        _ => format!("{t} 3 8 region_size 32 {n}"),
    };
    for i in 0..n {
        line.push_str(&format!(" m{i} d{i}"));
    }
    line
}

/// Named devices `d0..`, `m0..` behind [`Leg`] wrappers sharing one write `budget`.
pub fn gated(
    datas: &[Arc<CrashDevice>],
    metas: &[Arc<CrashDevice>],
    budget: &Arc<AtomicI64>,
) -> Devs {
    let g = Devs::default();
    for (i, (d, m)) in datas.iter().zip(metas).enumerate() {
        g.add(
            &format!("d{i}"),
            Leg::with_budget(d.clone(), budget.clone()),
        );
        g.add(
            &format!("m{i}"),
            Leg::with_budget(m.clone(), budget.clone()),
        );
    }
    g
}

/// What a power-cut test wrote, per 512-byte sector: its contents at the last completed flush
/// (`None`: never written, it holds whatever the legs held) and the versions written since
/// (acknowledged or not: any part of a write may have landed).
pub struct Written {
    pub durable: Vec<Option<Vec<u8>>>,
    current: Vec<Option<Vec<u8>>>,
    pub later: Vec<Vec<Vec<u8>>>,
}

impl Written {
    const SECTOR: usize = 512;

    pub fn new(sectors: usize) -> Written {
        Written {
            durable: vec![None; sectors],
            current: vec![None; sectors],
            later: vec![Vec::new(); sectors],
        }
    }

    /// Records `data` at sector `s0` as written and flushed.
    pub fn flushed(&mut self, s0: usize, data: &[u8]) {
        for (j, c) in data.chunks(Self::SECTOR).enumerate() {
            self.durable[s0 + j] = Some(c.to_vec());
            self.current[s0 + j] = Some(c.to_vec());
        }
    }

    /// Up to `ops` random writes (up to 40 sectors) and flushes (one op in `flush_one_in`) on
    /// `dev`, stopping at the first that fails (the power is off).
    pub fn random_io(
        &mut self,
        dev: &dyn BlockDevice,
        rng: &mut Rng,
        ops: usize,
        flush_one_in: u64,
    ) {
        let sectors = self.durable.len();
        for _ in 0..ops {
            if rng.below(flush_one_in) == 0 {
                if flush(dev).is_err() {
                    break;
                }
                self.durable.clone_from(&self.current);
                for l in self.later.iter_mut() {
                    l.clear();
                }
                continue;
            }
            let s0 = rng.below(sectors as u64) as usize;
            let ns = (1 + rng.below(40) as usize).min(sectors - s0);
            let data = pattern(rng.next(), ns * Self::SECTOR);
            let r = wr(dev, (s0 * Self::SECTOR) as u64, &data);
            for (j, c) in data.chunks(Self::SECTOR).enumerate() {
                self.later[s0 + j].push(c.to_vec());
            }
            if r.is_err() {
                break;
            }
            for (j, c) in data.chunks(Self::SECTOR).enumerate() {
                self.current[s0 + j] = Some(c.to_vec());
            }
        }
    }

    /// Panics (with `what`) at the first sector of `got` (read from sector 0) that holds
    /// neither its flushed contents nor a later write.
    #[track_caller]
    pub fn verify(&self, got: &[u8], what: &dyn Fn() -> String) {
        for (s, g) in got.chunks(Self::SECTOR).enumerate() {
            let Some(d) = &self.durable[s] else { continue };
            if g != d.as_slice() && !self.later[s].iter().any(|v| v.as_slice() == g) {
                panic!(
                    "{}: sector {s} holds neither its flushed contents nor a later write ({} \
                     later writes)",
                    what(),
                    self.later[s].len()
                );
            }
        }
    }
}
