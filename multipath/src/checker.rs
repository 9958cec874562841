//! The path checker: a thread per device with its own `iort` runtime that, every checker
//! interval, probes the failed paths with a small direct read at sector 0 and reinstates
//! those that answer. It holds only a `Weak` to the device and exits when the device goes.

use std::cell::RefCell;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use futures::future::{join_all, select};
use tables::buf::AlignedBuf;
use tables::io::IoError;
use tables::Bytes;

use crate::device::{Inner, Stop};

/// Granularity of the probe deadline.
const TICK: Duration = Duration::from_millis(10);

/// Longest a probe may take before it counts as failed: one interval, within 1..=30 s.
fn probe_timeout(interval: Duration) -> Duration {
    interval.clamp(Duration::from_secs(1), Duration::from_secs(30))
}

pub(crate) fn spawn(inner: &Arc<Inner>, stop: &Arc<Stop>) {
    let weak = Arc::downgrade(inner);
    let stop = stop.clone();
    let interval = inner.checker_interval;
    let name = inner.name.clone();
    let r = std::thread::Builder::new()
        .name("mpath-checker".into())
        .spawn(move || checker_loop(weak, stop, interval));
    if let Err(e) = r {
        log::error!("{name}: cannot start the path checker thread: {e}");
    }
}

fn checker_loop(weak: Weak<Inner>, stop: Arc<Stop>, interval: Duration) {
    let rt = match iort::Runtime::new(64) {
        Ok(rt) => rt,
        Err(e) => {
            if let Some(i) = weak.upgrade() {
                log::error!("{}: path checker: no I/O runtime: {e}", i.name);
            }
            return;
        }
    };
    loop {
        {
            // Sleep without holding the device, so dropping it is never delayed by us.
            let g = stop.wake.0.lock().unwrap_or_else(|e| e.into_inner());
            if stop.stop.load(Ordering::Acquire) {
                return;
            }
            let _ = stop
                .wake
                .1
                .wait_timeout(g, interval)
                .unwrap_or_else(|e| e.into_inner());
        }
        if stop.stop.load(Ordering::Acquire) {
            return;
        }
        let Some(inner) = weak.upgrade() else { return };
        rt.block_on(inner.check_paths());
    }
}

impl Inner {
    /// One checker round: see [`MultipathDevice::check_paths`](crate::MultipathDevice::check_paths).
    pub(crate) async fn check_paths(&self) {
        let failed: Vec<usize> = (0..self.paths.len())
            .filter(|&i| !self.paths[i].is_active())
            .collect();
        let timeout = probe_timeout(self.checker_interval);
        // Each probe records its answer as it comes; those without one by the deadline
        // count as failed. The deadline is a ticker of short sleeps, not one long timer: a
        // dropped io_uring timeout waits for its expiry.
        let answers: RefCell<Vec<Option<Result<(), IoError>>>> =
            RefCell::new(vec![None; failed.len()]);
        let probes = join_all(failed.iter().enumerate().map(|(k, &i)| {
            let answers = &answers;
            async move {
                let r = self.probe(i).await;
                answers.borrow_mut()[k] = Some(r);
            }
        }));
        let deadline = async {
            let t0 = Instant::now();
            while t0.elapsed() < timeout {
                iort::sleep(TICK).await;
            }
        };
        let _ = select(Box::pin(probes), Box::pin(deadline)).await;
        let answers = answers.into_inner();
        for (&i, r) in failed.iter().zip(answers) {
            let r = r.unwrap_or_else(|| {
                Err(IoError::new(
                    libc::ETIMEDOUT,
                    format!("no answer within {} ms", timeout.as_millis()),
                ))
            });
            match r {
                Ok(()) => self.reinstate_path(i, "the checker's probe read answered"),
                Err(e) => log::debug!(
                    "{}: path {} still failed: {e}",
                    self.name,
                    self.paths[i].name
                ),
            }
        }
        if !self.any_active() {
            let mut st = self.state();
            st.no_path_checks = st.no_path_checks.saturating_add(1);
            if !st.queueing() && !st.waiters.is_empty() {
                log::warn!(
                    "{}: no path for {} checker intervals (no_path_retry): failing queued I/O",
                    self.name,
                    st.no_path_checks
                );
                st.wake_all();
            }
        }
    }

    /// A read of one logical block at sector 0 of path `i`, in an aligned buffer (direct
    /// I/O on file paths).
    async fn probe(&self, i: usize) -> Result<(), IoError> {
        let dev = &self.paths[i].dev;
        let lbs = (dev.limits().logical_block_size as usize).max(512);
        let mut buf = AlignedBuf::zeroed(lbs, lbs.max(tables::buf::PAGE))?;
        // SAFETY: the buffer lives in this future and outlives the read, which is awaited
        // here; a dropped probe drops the read first (declared later, dropped earlier).
        unsafe { dev.read(Bytes(0), &mut buf) }.await
    }
}
