//! Shared scaffolding: paths that are one in-memory device seen through per-path fault
//! wrappers, and multipath devices built over them.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use multipath::{MultipathDevice, MultipathKind};
use tables::io::{BlockDevice, DeviceRef, IoError, IoFuture, IoResult, Limits, WriteFlags};
use tables::mem::MemDevice;
use tables::registry::BuildCtx;
use tables::{Bytes, Sectors};

/// One path to a shared device: fails every request with `errno` while `dead` (a cut
/// link), holds requests while `hold` (a slow link: they stay in flight), and yields once
/// before each request when `yield_first` (so concurrent requests interleave).
pub struct FaultPath {
    pub name: String,
    pub inner: DeviceRef,
    pub dead: AtomicBool,
    pub errno: AtomicI32,
    pub hold: AtomicBool,
    pub yield_first: AtomicBool,
    /// Requests that reached the shared device through this path.
    pub served: AtomicU64,
}

impl FaultPath {
    pub fn new(name: &str, inner: DeviceRef) -> Arc<FaultPath> {
        Arc::new(FaultPath {
            name: name.to_string(),
            inner,
            dead: AtomicBool::new(false),
            errno: AtomicI32::new(libc::EIO),
            hold: AtomicBool::new(false),
            yield_first: AtomicBool::new(false),
            served: AtomicU64::new(0),
        })
    }

    pub fn kill(&self) {
        self.dead.store(true, Ordering::Release);
    }

    pub fn heal(&self) {
        self.dead.store(false, Ordering::Release);
    }

    async fn gate(&self, what: &str, off: Bytes) -> IoResult<()> {
        if self.yield_first.load(Ordering::Relaxed) {
            iort::yield_now().await;
        }
        while self.hold.load(Ordering::Acquire) {
            // Sleep rather than yield: a task that is always ready keeps the runtime from
            // ever waiting on its ring, so timers would never fire.
            iort::sleep(Duration::from_millis(1)).await;
        }
        if self.dead.load(Ordering::Acquire) {
            return Err(IoError::new(
                self.errno.load(Ordering::Relaxed),
                format!(
                    "{}: {what} at byte {}: injected path failure",
                    self.name, off.0
                ),
            ));
        }
        self.served.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

impl BlockDevice for FaultPath {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn size(&self) -> Bytes {
        self.inner.size()
    }
    fn limits(&self) -> Limits {
        self.inner.limits()
    }
    unsafe fn read<'a>(&'a self, offset: Bytes, buf: &'a mut [u8]) -> IoFuture<'a> {
        Box::pin(async move {
            self.gate("read", offset).await?;
            // SAFETY: awaited inside this future, which our caller keeps the contract for.
            unsafe { self.inner.read(offset, buf) }.await
        })
    }
    unsafe fn write<'a>(&'a self, offset: Bytes, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a> {
        Box::pin(async move {
            self.gate("write", offset).await?;
            // SAFETY: as for the read.
            unsafe { self.inner.write(offset, buf, flags) }.await
        })
    }
    fn flush(&self) -> IoFuture<'_> {
        Box::pin(async move {
            self.gate("flush", Bytes(0)).await?;
            self.inner.flush().await
        })
    }
    fn discard(&self, offset: Bytes, len: Bytes) -> IoFuture<'_> {
        Box::pin(async move {
            self.gate("discard", offset).await?;
            self.inner.discard(offset, len).await
        })
    }
    fn write_zeroes(&self, offset: Bytes, len: Bytes, flags: WriteFlags) -> IoFuture<'_> {
        Box::pin(async move {
            self.gate("write-zeroes", offset).await?;
            self.inner.write_zeroes(offset, len, flags).await
        })
    }
}

/// A multipath device over `n` paths to one in-memory device of `size` bytes, named
/// `p0`, `p1`, ... in the line `args` (which must name them); no checker thread unless
/// `background`.
pub struct Rig {
    pub mem: Arc<MemDevice>,
    pub paths: Vec<Arc<FaultPath>>,
    pub dev: Arc<MultipathDevice>,
}

pub fn rig(n: usize, size: u64, args: &str, background: bool) -> Rig {
    let mem = Arc::new(MemDevice::new("shared", Bytes(size)));
    let paths: Vec<Arc<FaultPath>> = (0..n)
        .map(|i| FaultPath::new(&format!("p{i}"), mem.clone()))
        .collect();
    let ps = paths.clone();
    let resolver = move |d: &str| -> Result<DeviceRef, String> {
        ps.iter()
            .find(|p| p.name == d)
            .map(|p| p.clone() as DeviceRef)
            .ok_or_else(|| format!("no path '{d}'"))
    };
    let ctx = BuildCtx {
        line: 1,
        len: Sectors(size / 512),
        resolver: &resolver,
    };
    let a: Vec<String> = args.split_whitespace().map(String::from).collect();
    let dev = MultipathKind::new()
        .with_background(background)
        .build_multipath(&ctx, &a)
        .unwrap_or_else(|e| panic!("building '{args}': {e}"));
    Rig { mem, paths, dev }
}

/// Sends `dmsetup message`-style words to `dev`.
pub fn message(dev: &MultipathDevice, words: &str) -> IoResult<String> {
    let a: Vec<String> = words.split_whitespace().map(String::from).collect();
    iort::block_on(dev.message(&a)).expect("an I/O runtime")
}

/// The status line's per-path fields for `path`: `A|F fail_count [selector fields]`.
pub fn path_status(dev: &MultipathDevice, path: &str) -> String {
    let st = dev.status();
    let f: Vec<&str> = st.split_whitespace().collect();
    let i = f
        .iter()
        .position(|&w| w == path)
        .unwrap_or_else(|| panic!("no {path} in '{st}'"));
    // State and fail count, then the selector's numbers up to the next group or path.
    let extra = f[(i + 3).min(f.len())..]
        .iter()
        .take_while(|w| w.bytes().all(|b| b.is_ascii_digit()))
        .count();
    f[i + 1..(i + 3 + extra).min(f.len())].join(" ")
}
