//! A device whose table can be swapped while it is in use: dmsetup's suspend / reload / resume.
//!
//! [`Switchable`] forwards every request to its current inner device. `suspend()` stops
//! admitting new requests (they wait, they do not fail), waits for the requests in flight to
//! finish and flushes; `resume()` lets the waiting requests through, onto the new inner device if
//! one was staged with `load()` in between. This is how a running volume gets a new table: load,
//! suspend, resume, exactly as `dmsetup reload` + `dmsetup resume`.
//!
//! Requests may come from any thread, so the gate uses a mutex and wakers rather than
//! thread-local state; the lock is held only to count, never across I/O.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use crate::io::{
    BlockDevice, DeviceRef, FixedBuf, IoError, IoFuture, IoResult, Limits, MappedCopy, Served,
    WriteFlags,
};
use crate::units::Bytes;

struct GateState {
    suspended: bool,
    inflight: u64,
    /// Requests waiting for resume.
    admit_waiters: Vec<Waker>,
    /// suspend() callers waiting for in-flight requests to drain.
    drain_waiters: Vec<Waker>,
    current: DeviceRef,
    staged: Option<DeviceRef>,
    /// Set by [`Switchable::kill`]: the device is going away; every request fails.
    dead: Option<String>,
    /// A suspend drained and flushed the device and nothing was admitted since.
    flushed_suspended: bool,
    /// Killed while `flushed_suspended`: a flush has nothing left to do and succeeds.
    dead_clean: bool,
}

/// Per-device I/O statistics for reports.
#[derive(Default, Debug)]
pub struct IoStats {
    /// Completed reads.
    pub reads: AtomicU64,
    /// Completed writes.
    pub writes: AtomicU64,
    /// Bytes read.
    pub read_bytes: AtomicU64,
    /// Bytes written.
    pub write_bytes: AtomicU64,
    /// Flushes.
    pub flushes: AtomicU64,
    /// Discards and write-zeroes.
    pub discards: AtomicU64,
    /// Requests that returned an error.
    pub errors: AtomicU64,
}

impl IoStats {
    fn count<T>(&self, ctr: &AtomicU64, bytes: Option<(&AtomicU64, u64)>, r: &IoResult<T>) {
        if r.is_err() {
            self.errors.fetch_add(1, Ordering::Relaxed);
        } else {
            ctr.fetch_add(1, Ordering::Relaxed);
            if let Some((b, n)) = bytes {
                b.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    /// Counts a zero-copy read or write; one that needs memory is not, since the caller
    /// redoes it through `read`/`write`, which count it then.
    fn count_served(&self, write: bool, len: usize, r: &IoResult<Served>) {
        if matches!(r, Ok(Served::NeedsMemory)) {
            return;
        }
        let (ctr, bytes) = if write {
            (&self.writes, &self.write_bytes)
        } else {
            (&self.reads, &self.read_bytes)
        };
        self.count(ctr, Some((bytes, len as u64)), r);
    }
}

/// A device with a swappable inner device and a suspend gate.
pub struct Switchable {
    name: String,
    state: Mutex<GateState>,
    /// Counters of completed requests.
    pub stats: IoStats,
}

/// Releases one in-flight slot when a request finishes (or its future is dropped).
struct Admitted<'a> {
    sw: &'a Switchable,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        let mut st = self.sw.lock();
        st.inflight -= 1;
        if st.inflight == 0 {
            for w in st.drain_waiters.drain(..) {
                w.wake();
            }
        }
    }
}

impl Switchable {
    /// Wraps `dev` under the device name `name`.
    pub fn new(name: impl Into<String>, dev: DeviceRef) -> Switchable {
        Switchable {
            name: name.into(),
            state: Mutex::new(GateState {
                suspended: false,
                inflight: 0,
                admit_waiters: Vec::new(),
                drain_waiters: Vec::new(),
                current: dev,
                staged: None,
                dead: None,
                flushed_suspended: false,
                dead_clean: false,
            }),
            stats: IoStats::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The device requests go to now.
    pub fn current(&self) -> DeviceRef {
        self.lock().current.clone()
    }

    /// Whether the device is suspended.
    pub fn is_suspended(&self) -> bool {
        self.lock().suspended
    }

    /// Requests currently in flight.
    pub fn inflight(&self) -> u64 {
        self.lock().inflight
    }

    /// Stages `dev` to replace the current device at the next `resume()` (dmsetup reload).
    /// A staged device smaller than the current one is refused: shrinking under a mounted file
    /// system loses data (use remove and create for that).
    pub fn load(&self, dev: DeviceRef) -> Result<(), IoError> {
        let mut st = self.lock();
        if dev.size() < st.current.size() {
            return Err(IoError::invalid(format!(
                "{}: new table is {} bytes, smaller than the current {} bytes; refusing to shrink a live device",
                self.name,
                dev.size().0,
                st.current.size().0
            )));
        }
        st.staged = Some(dev);
        Ok(())
    }

    /// Whether a table is staged for the next resume.
    pub fn has_staged(&self) -> bool {
        self.lock().staged.is_some()
    }

    /// Drops the staged table, if any (a reload that failed after staging): the next resume
    /// keeps the current one.
    pub fn unstage(&self) -> Option<DeviceRef> {
        self.lock().staged.take()
    }

    /// Makes the device fail every request from now on with `ENODEV` and `reason`, including
    /// the ones waiting at a suspended gate, so a device being removed or shut down while
    /// suspended (or stuck) lets its front end drain instead of hanging on them.
    ///
    /// A device killed while suspended (drained and flushed, nothing admitted since) still
    /// answers flushes with success: there is nothing left to write back, and a front end's
    /// last flush on its way out should say so rather than fail.
    pub fn kill(&self, reason: impl Into<String>) {
        let mut st = self.lock();
        if st.dead.is_none() {
            st.dead_clean = st.flushed_suspended;
        }
        st.dead = Some(reason.into());
        for w in st.admit_waiters.drain(..) {
            w.wake();
        }
    }

    /// Why the device was killed, if it was.
    pub fn killed(&self) -> Option<String> {
        self.lock().dead.clone()
    }

    /// Stops admitting requests, waits for in-flight ones, then flushes the current device.
    pub async fn suspend(&self) -> IoResult<()> {
        self.drain().await;
        let dev = self.current();
        let r = dev.flush().await;
        if r.is_ok() {
            let mut st = self.lock();
            st.flushed_suspended = st.suspended;
        }
        r
    }

    /// Stops admitting requests and waits for in-flight ones, without flushing (dmsetup's
    /// `suspend --noflush`: for a device whose storage is gone, whose flush could only
    /// fail). [`Switchable::resume`] admits them again.
    pub async fn drain(&self) {
        {
            let mut st = self.lock();
            st.suspended = true;
        }
        std::future::poll_fn(|cx| {
            let mut st = self.lock();
            if st.inflight == 0 {
                Poll::Ready(())
            } else {
                st.drain_waiters.push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
    }

    /// Swaps in the staged device (if any) and admits requests again. Returns whether the
    /// device changed.
    pub fn resume(&self) -> bool {
        let mut st = self.lock();
        let swapped = if let Some(d) = st.staged.take() {
            st.current = d;
            true
        } else {
            false
        };
        st.suspended = false;
        st.flushed_suspended = false;
        for w in st.admit_waiters.drain(..) {
            w.wake();
        }
        swapped
    }

    /// Waits until requests are admitted, then takes an in-flight slot and the current device.
    fn admit(&self) -> AdmitFuture<'_> {
        AdmitFuture { sw: self }
    }
}

struct AdmitFuture<'a> {
    sw: &'a Switchable,
}

impl<'a> Future for AdmitFuture<'a> {
    type Output = IoResult<(Admitted<'a>, DeviceRef)>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let sw = self.sw;
        let mut st = sw.lock();
        if let Some(why) = &st.dead {
            return Poll::Ready(Err(IoError::new(
                libc::ENODEV,
                format!("{}: {why}", sw.name),
            )));
        }
        if st.suspended {
            st.admit_waiters.push(cx.waker().clone());
            return Poll::Pending;
        }
        st.inflight += 1;
        let dev = st.current.clone();
        Poll::Ready(Ok((Admitted { sw }, dev)))
    }
}

impl BlockDevice for Switchable {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn size(&self) -> Bytes {
        self.lock().current.size()
    }
    fn limits(&self) -> Limits {
        self.lock().current.limits()
    }
    unsafe fn read<'a>(&'a self, offset: Bytes, buf: &'a mut [u8]) -> IoFuture<'a> {
        Box::pin(async move {
            let (_slot, dev) = self.admit().await?;
            let n = buf.len() as u64;
            let r = dev.read(offset, buf).await;
            self.stats
                .count(&self.stats.reads, Some((&self.stats.read_bytes, n)), &r);
            r
        })
    }
    unsafe fn write<'a>(&'a self, offset: Bytes, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a> {
        Box::pin(async move {
            let (_slot, dev) = self.admit().await?;
            let r = dev.write(offset, buf, flags).await;
            self.stats.count(
                &self.stats.writes,
                Some((&self.stats.write_bytes, buf.len() as u64)),
                &r,
            );
            r
        })
    }
    fn read_fixed(&self, offset: Bytes, buf: FixedBuf) -> IoFuture<'_, Served> {
        Box::pin(async move {
            let (_slot, dev) = self.admit().await?;
            let r = dev.read_fixed(offset, buf).await;
            self.stats.count_served(false, buf.len, &r);
            r
        })
    }
    fn write_fixed(&self, offset: Bytes, buf: FixedBuf, flags: WriteFlags) -> IoFuture<'_, Served> {
        Box::pin(async move {
            let (_slot, dev) = self.admit().await?;
            let r = dev.write_fixed(offset, buf, flags).await;
            self.stats.count_served(true, buf.len, &r);
            r
        })
    }
    fn copy_mapped<'a>(
        &'a self,
        offset: Bytes,
        len: usize,
        write: Option<WriteFlags>,
        copy: MappedCopy<'a>,
    ) -> IoFuture<'a, Served> {
        Box::pin(async move {
            let (_slot, dev) = self.admit().await?;
            let r = dev.copy_mapped(offset, len, write, copy).await;
            self.stats.count_served(write.is_some(), len, &r);
            r
        })
    }
    fn flush(&self) -> IoFuture<'_> {
        Box::pin(async move {
            if self.lock().dead_clean {
                return Ok(());
            }
            let (_slot, dev) = self.admit().await?;
            let r = dev.flush().await;
            self.stats.count(&self.stats.flushes, None, &r);
            r
        })
    }
    fn discard(&self, offset: Bytes, len: Bytes) -> IoFuture<'_> {
        Box::pin(async move {
            let (_slot, dev) = self.admit().await?;
            let r = dev.discard(offset, len).await;
            self.stats.count(&self.stats.discards, None, &r);
            r
        })
    }
    fn write_zeroes(&self, offset: Bytes, len: Bytes, flags: WriteFlags) -> IoFuture<'_> {
        Box::pin(async move {
            let (_slot, dev) = self.admit().await?;
            let r = dev.write_zeroes(offset, len, flags).await;
            self.stats.count(&self.stats.discards, None, &r);
            r
        })
    }
    fn status(&self) -> String {
        self.current().status()
    }
    fn message<'a>(&'a self, args: &'a [String]) -> IoFuture<'a, String> {
        Box::pin(async move {
            let dev = self.current();
            dev.message(args).await
        })
    }
    fn underlying(&self) -> Option<DeviceRef> {
        Some(self.current())
    }
}

/// Shared handle to a switchable device.
pub type SwitchRef = Arc<Switchable>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{read_blocking, write_blocking};
    use crate::mem::MemDevice;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    #[test]
    fn reload_swaps_the_table_and_refuses_shrinking() {
        let a: DeviceRef = Arc::new(MemDevice::new("a", Bytes(1 << 20)));
        let b = Arc::new(MemDevice::new("b", Bytes(2 << 20)));
        let sw = Switchable::new("vol", a);
        write_blocking(&sw, Bytes(0), &[1u8; 512], WriteFlags::default()).unwrap();
        let small: DeviceRef = Arc::new(MemDevice::new("s", Bytes(4096)));
        assert!(sw.load(small).is_err());
        sw.load(b.clone()).unwrap();
        futures::executor::block_on(sw.suspend()).unwrap();
        assert!(sw.resume());
        assert_eq!(sw.size(), Bytes(2 << 20));
        write_blocking(&sw, Bytes(4096), &[2u8; 512], WriteFlags::default()).unwrap();
        assert_eq!(b.snapshot(4096, 1), vec![2]);
        assert_eq!(sw.stats.writes.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn suspended_requests_wait_for_resume() {
        let a: DeviceRef = Arc::new(MemDevice::new("a", Bytes(1 << 20)));
        let sw = Arc::new(Switchable::new("vol", a));
        futures::executor::block_on(sw.suspend()).unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let (sw2, done2) = (sw.clone(), done.clone());
        let t = std::thread::spawn(move || {
            let mut b = [0u8; 512];
            read_blocking(&*sw2, Bytes(0), &mut b).unwrap();
            done2.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !done.load(Ordering::SeqCst),
            "read must wait while suspended"
        );
        sw.resume();
        t.join().unwrap();
        assert!(done.load(Ordering::SeqCst));
    }

    #[test]
    fn kill_fails_waiting_and_new_requests_and_unstage_keeps_the_old_table() {
        let a: DeviceRef = Arc::new(MemDevice::new("a", Bytes(1 << 20)));
        let sw = Arc::new(Switchable::new("vol", a));
        let b: DeviceRef = Arc::new(MemDevice::new("b", Bytes(2 << 20)));
        sw.load(b).unwrap();
        assert!(sw.unstage().is_some());
        futures::executor::block_on(sw.suspend()).unwrap();
        assert!(!sw.resume(), "an unstaged table must not be swapped in");
        assert_eq!(sw.size(), Bytes(1 << 20));

        futures::executor::block_on(sw.suspend()).unwrap();
        let sw2 = sw.clone();
        let t = std::thread::spawn(move || {
            let mut b = [0u8; 512];
            read_blocking(&*sw2, Bytes(0), &mut b)
        });
        std::thread::sleep(Duration::from_millis(50));
        sw.kill("removed");
        let r = t.join().unwrap();
        let e = r.expect_err("a request parked at a killed gate must fail");
        assert_eq!(e.errno, libc::ENODEV);
        assert!(e.msg.contains("vol: removed"), "{e}");
        let mut b = [0u8; 512];
        assert!(read_blocking(&*sw, Bytes(0), &mut b).is_err());
        // Killed after a suspend that flushed: nothing is left to flush.
        futures::executor::block_on(sw.flush()).unwrap();
        // Killed while active: a flush cannot be taken any more.
        let live = Switchable::new("live", Arc::new(MemDevice::new("c", Bytes(4096))));
        live.kill("gone");
        assert!(futures::executor::block_on(live.flush()).is_err());
    }
}
