//! In-memory devices: the reference extent for tests and the simulated-power-cut device.
//!
//! [`MemDevice`] is a sparse RAM disk (unwritten pages read as zeroes). [`CrashDevice`] keeps,
//! besides the current contents, the durable image as of the last flush plus the writes since;
//! [`CrashDevice::power_cut`] throws the volatile state away the way a real disk may: every
//! write not yet flushed is dropped or kept independently, and a kept one may be torn at a
//! sector boundary. Everything persistent in this project is tested against it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::io::{check_range, ready, BlockDevice, IoError, IoFuture, IoResult, Limits, WriteFlags};
use crate::units::{Bytes, SECTOR_SIZE};

const PAGE: u64 = 4096;

/// Sparse page store shared by the in-memory devices.
#[derive(Default, Clone)]
struct Pages {
    pages: HashMap<u64, Box<[u8]>>,
}

impl Pages {
    fn read(&self, mut off: u64, buf: &mut [u8]) {
        let mut done = 0usize;
        while done < buf.len() {
            let page = off / PAGE;
            let in_page = (off % PAGE) as usize;
            let n = (PAGE as usize - in_page).min(buf.len() - done);
            match self.pages.get(&page) {
                Some(p) => buf[done..done + n].copy_from_slice(&p[in_page..in_page + n]),
                None => buf[done..done + n].fill(0),
            }
            done += n;
            off += n as u64;
        }
    }

    fn write(&mut self, mut off: u64, buf: &[u8]) {
        let mut done = 0usize;
        while done < buf.len() {
            let page = off / PAGE;
            let in_page = (off % PAGE) as usize;
            let n = (PAGE as usize - in_page).min(buf.len() - done);
            let p = self
                .pages
                .entry(page)
                .or_insert_with(|| vec![0u8; PAGE as usize].into_boxed_slice());
            p[in_page..in_page + n].copy_from_slice(&buf[done..done + n]);
            done += n;
            off += n as u64;
        }
    }

    /// Zeroes a range; whole pages are dropped so discards free memory.
    fn zero(&mut self, off: u64, len: u64) {
        let end = off + len;
        let mut pos = off;
        while pos < end {
            let page = pos / PAGE;
            let in_page = pos % PAGE;
            let n = (PAGE - in_page).min(end - pos);
            if n == PAGE {
                self.pages.remove(&page);
            } else if let Some(p) = self.pages.get_mut(&page) {
                p[in_page as usize..(in_page + n) as usize].fill(0);
            }
            pos += n;
        }
    }

    fn bytes_allocated(&self) -> u64 {
        self.pages.len() as u64 * PAGE
    }
}

/// Counters every test device keeps, so tests can assert what reached it.
#[derive(Default, Debug)]
pub struct IoCounters {
    /// Read requests.
    pub reads: AtomicU64,
    /// Write requests.
    pub writes: AtomicU64,
    /// Flush requests.
    pub flushes: AtomicU64,
    /// Discard requests.
    pub discards: AtomicU64,
    /// Write-zeroes requests.
    pub write_zeroes: AtomicU64,
    /// Bytes read.
    pub bytes_read: AtomicU64,
    /// Bytes written.
    pub bytes_written: AtomicU64,
}

impl IoCounters {
    fn bump(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// A sparse in-memory block device.
pub struct MemDevice {
    name: String,
    size: Bytes,
    limits: Limits,
    pages: Mutex<Pages>,
    /// What reached this device.
    pub counters: IoCounters,
}

impl MemDevice {
    /// A zero-filled device of `size` bytes.
    pub fn new(name: impl Into<String>, size: Bytes) -> MemDevice {
        MemDevice {
            name: name.into(),
            size,
            limits: Limits {
                discard_zeroes: true,
                ..Limits::default()
            },
            pages: Mutex::new(Pages::default()),
            counters: IoCounters::default(),
        }
    }

    /// Overrides the advertised limits.
    pub fn with_limits(mut self, limits: Limits) -> MemDevice {
        self.limits = limits;
        self
    }

    /// Copies out `len` bytes at `off` synchronously (for test assertions).
    pub fn snapshot(&self, off: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.lock().read(off, &mut v);
        v
    }

    /// Writes synchronously, bypassing counters (for test setup).
    pub fn fill(&self, off: u64, data: &[u8]) {
        self.lock().write(off, data);
    }

    /// Bytes of RAM pages holding data.
    pub fn bytes_allocated(&self) -> u64 {
        self.lock().bytes_allocated()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pages> {
        // A panic while holding the lock can only come from a bug in this module; the pages
        // themselves stay consistent, so recover the guard instead of propagating poison.
        self.pages.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl BlockDevice for MemDevice {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn size(&self) -> Bytes {
        self.size
    }
    fn limits(&self) -> Limits {
        self.limits
    }
    unsafe fn read<'a>(&'a self, offset: Bytes, buf: &'a mut [u8]) -> IoFuture<'a> {
        ready(
            check_range(&self.name, self.size, offset, Bytes(buf.len() as u64)).map(|()| {
                IoCounters::bump(&self.counters.reads, 1);
                IoCounters::bump(&self.counters.bytes_read, buf.len() as u64);
                self.lock().read(offset.0, buf)
            }),
        )
    }
    unsafe fn write<'a>(
        &'a self,
        offset: Bytes,
        buf: &'a [u8],
        _flags: WriteFlags,
    ) -> IoFuture<'a> {
        ready(
            check_range(&self.name, self.size, offset, Bytes(buf.len() as u64)).map(|()| {
                IoCounters::bump(&self.counters.writes, 1);
                IoCounters::bump(&self.counters.bytes_written, buf.len() as u64);
                self.lock().write(offset.0, buf)
            }),
        )
    }
    fn flush(&self) -> IoFuture<'_> {
        IoCounters::bump(&self.counters.flushes, 1);
        ready(Ok(()))
    }
    fn discard(&self, offset: Bytes, len: Bytes) -> IoFuture<'_> {
        ready(check_range(&self.name, self.size, offset, len).map(|()| {
            IoCounters::bump(&self.counters.discards, 1);
            self.lock().zero(offset.0, len.0)
        }))
    }
    fn write_zeroes(&self, offset: Bytes, len: Bytes, _flags: WriteFlags) -> IoFuture<'_> {
        ready(check_range(&self.name, self.size, offset, len).map(|()| {
            IoCounters::bump(&self.counters.write_zeroes, 1);
            self.lock().zero(offset.0, len.0)
        }))
    }
}

/// How a simulated power cut treats writes that were not yet flushed.
#[derive(Copy, Clone, Debug)]
pub enum CutMode {
    /// Every unflushed write is lost.
    DropAll,
    /// Each unflushed write survives or not by a coin toss (seeded), and a surviving write
    /// may be torn: only a prefix of its sectors lands.
    Random {
        /// Seed for the coin tosses.
        seed: u64,
        /// Whether surviving writes may be torn at a sector boundary.
        tear: bool,
    },
}

#[derive(Clone)]
enum Pending {
    Write { off: u64, data: Vec<u8> },
    Zero { off: u64, len: u64 },
}

struct CrashState {
    current: Pages,
    durable: Pages,
    pending: Vec<Pending>,
    /// When set, every I/O fails (the "disk is gone" state after a cut, until reopened).
    dead: bool,
}

/// An in-memory device that can simulate a power cut.
///
/// A FUA write is durable on completion; a flush makes every completed write durable.
pub struct CrashDevice {
    name: String,
    size: Bytes,
    state: Mutex<CrashState>,
    /// Number of completed writes (FUA or not); lets tests pick a cut point.
    pub writes: AtomicU64,
    /// Number of flushes.
    pub flushes: AtomicU64,
}

/// Small deterministic PRNG (splitmix64), so cut points replay from a seed.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl CrashDevice {
    /// A zero-filled crashable device.
    pub fn new(name: impl Into<String>, size: Bytes) -> CrashDevice {
        CrashDevice {
            name: name.into(),
            size,
            state: Mutex::new(CrashState {
                current: Pages::default(),
                durable: Pages::default(),
                pending: Vec::new(),
                dead: false,
            }),
            writes: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CrashState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Cuts the power: the contents become the durable image plus whatever unflushed writes
    /// `mode` lets through. The device stays usable (as after a reboot).
    pub fn power_cut(&self, mode: CutMode) {
        let mut st = self.lock();
        let pending = std::mem::take(&mut st.pending);
        let mut img = st.durable.clone();
        if let CutMode::Random { seed, tear } = mode {
            let mut rng = seed;
            for p in pending {
                if splitmix(&mut rng).is_multiple_of(2) {
                    continue;
                }
                match p {
                    Pending::Write { off, data } => {
                        let sectors = data.len().div_ceil(SECTOR_SIZE as usize).max(1);
                        let keep = if tear && splitmix(&mut rng).is_multiple_of(4) {
                            (splitmix(&mut rng) as usize % sectors) * SECTOR_SIZE as usize
                        } else {
                            data.len()
                        };
                        img.write(off, &data[..keep.min(data.len())]);
                    }
                    Pending::Zero { off, len } => img.zero(off, len),
                }
            }
        }
        st.current = img.clone();
        st.durable = img;
        st.dead = false;
    }

    /// Makes every later I/O fail with EIO until the next [`power_cut`](Self::power_cut)
    /// (a disk that vanished).
    pub fn kill(&self) {
        self.lock().dead = true;
    }

    /// Number of writes not yet durable.
    pub fn pending_writes(&self) -> usize {
        self.lock().pending.len()
    }

    /// Reads the current contents synchronously (for assertions).
    pub fn snapshot(&self, off: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.lock().current.read(off, &mut v);
        v
    }

    fn check(&self, st: &CrashState, offset: Bytes, len: Bytes) -> IoResult<()> {
        if st.dead {
            return Err(IoError::eio(format!("{}: device is gone", self.name)));
        }
        check_range(&self.name, self.size, offset, len)
    }
}

impl BlockDevice for CrashDevice {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn size(&self) -> Bytes {
        self.size
    }
    fn limits(&self) -> Limits {
        Limits {
            discard_zeroes: true,
            ..Limits::default()
        }
    }
    unsafe fn read<'a>(&'a self, offset: Bytes, buf: &'a mut [u8]) -> IoFuture<'a> {
        let st = self.lock();
        let r = self
            .check(&st, offset, Bytes(buf.len() as u64))
            .map(|()| st.current.read(offset.0, buf));
        ready(r)
    }
    unsafe fn write<'a>(&'a self, offset: Bytes, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a> {
        let mut st = self.lock();
        let r = self.check(&st, offset, Bytes(buf.len() as u64)).map(|()| {
            st.current.write(offset.0, buf);
            if flags.fua {
                st.durable.write(offset.0, buf);
            } else {
                st.pending.push(Pending::Write {
                    off: offset.0,
                    data: buf.to_vec(),
                });
            }
            self.writes.fetch_add(1, Ordering::Relaxed);
        });
        ready(r)
    }
    fn flush(&self) -> IoFuture<'_> {
        let mut st = self.lock();
        let r = self.check(&st, Bytes(0), Bytes(0)).map(|()| {
            st.pending.clear();
            st.durable = st.current.clone();
            self.flushes.fetch_add(1, Ordering::Relaxed);
        });
        ready(r)
    }
    fn discard(&self, offset: Bytes, len: Bytes) -> IoFuture<'_> {
        self.write_zeroes(offset, len, WriteFlags::default())
    }
    fn write_zeroes(&self, offset: Bytes, len: Bytes, flags: WriteFlags) -> IoFuture<'_> {
        let mut st = self.lock();
        let r = self.check(&st, offset, len).map(|()| {
            st.current.zero(offset.0, len.0);
            if flags.fua {
                st.durable.zero(offset.0, len.0);
            } else {
                st.pending.push(Pending::Zero {
                    off: offset.0,
                    len: len.0,
                });
            }
        });
        ready(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{read_blocking, write_blocking};
    use futures::executor::block_on;

    #[test]
    fn mem_device_reads_back_and_zeroes() {
        let d = MemDevice::new("m", Bytes(1 << 20));
        write_blocking(&d, Bytes(1000), &[7u8; 5000], WriteFlags::default()).unwrap();
        let mut b = vec![0u8; 6000];
        read_blocking(&d, Bytes(500), &mut b).unwrap();
        assert!(b[..500].iter().all(|&x| x == 0));
        assert!(b[500..5500].iter().all(|&x| x == 7));
        block_on(d.discard(Bytes(0), Bytes(8192))).unwrap();
        assert!(d.snapshot(0, 8192).iter().all(|&x| x == 0));
        assert_eq!(d.snapshot(8192, 1), vec![0]);
        assert!(read_blocking(&d, Bytes((1 << 20) - 1), &mut b).is_err());
    }

    #[test]
    fn crash_device_keeps_only_flushed_or_fua() {
        let d = CrashDevice::new("c", Bytes(1 << 20));
        write_blocking(&d, Bytes(0), &[1u8; 512], WriteFlags::default()).unwrap();
        block_on(d.flush()).unwrap();
        write_blocking(&d, Bytes(512), &[2u8; 512], WriteFlags::default()).unwrap();
        write_blocking(&d, Bytes(1024), &[3u8; 512], WriteFlags::FUA).unwrap();
        d.power_cut(CutMode::DropAll);
        assert_eq!(d.snapshot(0, 1), vec![1]);
        assert_eq!(d.snapshot(512, 1), vec![0]);
        assert_eq!(d.snapshot(1024, 1), vec![3]);
    }
}
