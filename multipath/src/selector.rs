//! Path selectors: which active path of a group takes the next request, as dm's
//! `dm-round-robin`, `dm-queue-length` and `dm-service-time` choose.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use tables::io::DeviceRef;

use crate::parse::SelectorKind;

/// One path's live state.
pub(crate) struct Path {
    /// The device as the table names it (status lines and messages use this).
    pub name: String,
    pub dev: DeviceRef,
    /// 0-based group.
    pub group: usize,
    pub repeat_count: u32,
    pub relative_throughput: u32,
    pub active: AtomicBool,
    pub fail_count: AtomicU32,
    /// Requests in flight on this path.
    pub in_flight: AtomicU64,
    /// Bytes in flight on this path.
    pub in_flight_bytes: AtomicU64,
    /// Requests this path completed or failed (for tests and the benchmark).
    pub requests: AtomicU64,
}

impl Path {
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }
}

/// Counts a request on a path while it is in flight (the queue-length and service-time
/// selectors read these); undone on drop, so a dropped request is not counted forever.
pub(crate) struct InFlight<'a> {
    path: &'a Path,
    bytes: u64,
}

impl<'a> InFlight<'a> {
    pub fn new(path: &'a Path, bytes: u64) -> InFlight<'a> {
        path.in_flight.fetch_add(1, Ordering::Relaxed);
        path.in_flight_bytes.fetch_add(bytes, Ordering::Relaxed);
        InFlight { path, bytes }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.path.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.path
            .in_flight_bytes
            .fetch_sub(self.bytes, Ordering::Relaxed);
        self.path.requests.fetch_add(1, Ordering::Relaxed);
    }
}

/// Round-robin position: the current path and how many requests it took in a row.
#[derive(Default)]
struct RrState {
    cur: usize,
    count: u32,
}

/// A priority group's selector state.
pub(crate) struct Group {
    pub kind: SelectorKind,
    /// Its paths: indices into the device's path list.
    pub first: usize,
    pub len: usize,
    /// `disable_group`: tried only after every enabled group.
    pub bypassed: AtomicBool,
    rr: Mutex<RrState>,
    /// Where queue-length and service-time start scanning, so that ties rotate.
    rotate: AtomicUsize,
}

impl Group {
    pub fn new(kind: SelectorKind, first: usize, len: usize) -> Group {
        Group {
            kind,
            first,
            len,
            bypassed: AtomicBool::new(false),
            rr: Mutex::new(RrState::default()),
            rotate: AtomicUsize::new(0),
        }
    }

    /// Whether some path of the group is active.
    pub fn usable(&self, paths: &[Path]) -> bool {
        self.paths(paths).iter().any(Path::is_active)
    }

    fn paths<'p>(&self, paths: &'p [Path]) -> &'p [Path] {
        paths.get(self.first..self.first + self.len).unwrap_or(&[])
    }

    /// The path (index into the device's list) for a request of `bytes`, or `None` if no
    /// path of the group is active.
    pub fn select(&self, paths: &[Path], bytes: u64) -> Option<usize> {
        let ps = self.paths(paths);
        let n = ps.len();
        if n == 0 {
            return None;
        }
        let i = match self.kind {
            SelectorKind::RoundRobin => {
                let mut rr = self.rr.lock().unwrap_or_else(|e| e.into_inner());
                let cur = rr.cur % n;
                if ps[cur].is_active() && rr.count < ps[cur].repeat_count {
                    rr.count += 1;
                    cur
                } else {
                    let next = (1..=n)
                        .map(|k| (cur + k) % n)
                        .find(|&i| ps[i].is_active())?;
                    rr.cur = next;
                    rr.count = 1;
                    next
                }
            }
            SelectorKind::QueueLength => {
                let start = self.rotate.fetch_add(1, Ordering::Relaxed);
                let mut best: Option<(usize, u64)> = None;
                for k in 0..n {
                    let i = start.wrapping_add(k) % n;
                    if !ps[i].is_active() {
                        continue;
                    }
                    let q = ps[i].in_flight.load(Ordering::Relaxed);
                    if best.is_none_or(|(_, b)| q < b) {
                        best = Some((i, q));
                        if q == 0 {
                            break;
                        }
                    }
                }
                best?.0
            }
            SelectorKind::ServiceTime => {
                let start = self.rotate.fetch_add(1, Ordering::Relaxed);
                let mut best: Option<usize> = None;
                for k in 0..n {
                    let i = start.wrapping_add(k) % n;
                    if !ps[i].is_active() {
                        continue;
                    }
                    if best.is_none_or(|b| st_less(&ps[i], &ps[b], bytes)) {
                        best = Some(i);
                    }
                }
                best?
            }
        };
        Some(self.first + i)
    }
}

/// dm-service-time's `st_compare_load`: whether `a` is a better choice than `b` for a
/// request of `incoming` bytes. Smallest (in-flight bytes + incoming) / relative throughput
/// wins, compared by cross-multiplying; a path with throughput 0 is used only when every
/// path has 0; ties go to the higher throughput.
fn st_less(a: &Path, b: &Path, incoming: u64) -> bool {
    let (ra, rb) = (a.relative_throughput as u128, b.relative_throughput as u128);
    let sa = a.in_flight_bytes.load(Ordering::Relaxed) as u128;
    let sb = b.in_flight_bytes.load(Ordering::Relaxed) as u128;
    if ra == rb {
        return sa < sb;
    }
    if sa == sb || ra == 0 || rb == 0 {
        return ra > rb;
    }
    let (ta, tb) = ((sa + incoming as u128) * rb, (sb + incoming as u128) * ra);
    if ta != tb {
        return ta < tb;
    }
    ra > rb
}
