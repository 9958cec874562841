//! The accept thread: accepts on every listener, hands connections to live workers, and
//! enforces the timeouts of every connection.
//!
//! It runs apart from the workers, so a worker that is stuck in a blocking device call or
//! has died stops neither accepting nor the timeouts: new connections go to the workers
//! that still beat, and a stuck worker's clients still get their sockets closed.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::Waker;
use std::time::Duration;

use crate::limits::{Clock, Watch};
use crate::server::{Accepted, Listener, Msg, Shared};
use crate::sock::{set_nodelay, shutdown};

/// A worker that has not beaten for this long counts as stuck.
const STUCK_AFTER_MS: u64 = 1_000;
/// Refused connections are logged at most this often (with a count).
const REFUSAL_LOG_EVERY_MS: u64 = 10_000;
/// Connections accepted per listener per wakeup, so timeouts are not starved.
const ACCEPT_BATCH: usize = 64;

/// One live connection as the supervisor and shutdown see it.
pub(crate) struct ConnEntry {
    pub(crate) id: u64,
    /// Who it is, for log lines.
    pub(crate) peer: String,
    fd: Weak<OwnedFd>,
    /// Worker serving it (`usize::MAX` until handed over).
    worker: AtomicUsize,
    accepted_ms: u64,
    transmitting: AtomicBool,
    pub(crate) watch: Arc<Watch>,
    killed: AtomicBool,
    /// The connection's reader while it waits for room: woken by [`ConnEntry::kill`].
    waker: Mutex<Option<Waker>>,
}

impl ConnEntry {
    pub(crate) fn new(id: u64, fd: &Arc<OwnedFd>, peer: String, clock: Clock) -> ConnEntry {
        ConnEntry {
            id,
            peer,
            fd: Arc::downgrade(fd),
            worker: AtomicUsize::new(usize::MAX),
            accepted_ms: clock.now(),
            transmitting: AtomicBool::new(false),
            watch: Arc::new(Watch::new(clock)),
            killed: AtomicBool::new(false),
            waker: Mutex::new(None),
        }
    }

    /// The worker serving this connection, once handed over.
    pub(crate) fn worker(&self) -> Option<usize> {
        let w = self.worker.load(Ordering::Relaxed);
        (w != usize::MAX).then_some(w)
    }

    /// The handshake is over: from now on the idle and stall timeouts apply.
    pub(crate) fn transmitting(&self) {
        self.watch.received();
        self.transmitting.store(true, Ordering::Relaxed);
    }

    pub(crate) fn is_killed(&self) -> bool {
        self.killed.load(Ordering::Relaxed)
    }

    /// Remembers the reader's waker while it waits for room.
    pub(crate) fn park(&self, w: &Waker) {
        let mut g = self.waker.lock().unwrap_or_else(|e| e.into_inner());
        if !g.as_ref().is_some_and(|old| old.will_wake(w)) {
            *g = Some(w.clone());
        }
    }

    /// `shutdown(how)` on the socket, if it is still open.
    pub(crate) fn shutdown(&self, how: libc::c_int) {
        if let Some(fd) = self.fd.upgrade() {
            shutdown(fd.as_raw_fd(), how);
        }
    }

    /// Closes the connection from outside its worker: its socket operations fail, and a
    /// reader waiting for room gives up.
    pub(crate) fn kill(&self, why: &str) {
        if self.killed.swap(true, Ordering::SeqCst) {
            return;
        }
        log::info!("nbd: {}: closing the connection: {why}", self.peer);
        self.shutdown(libc::SHUT_RDWR);
        let w = self.waker.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = w {
            w.wake();
        }
    }
}

/// Runs until the server stops: accepting, dispatching, enforcing timeouts.
pub(crate) fn supervisor(shared: Arc<Shared>) {
    let l = shared.limits;
    let shortest = [
        l.handshake_timeout_ms,
        l.idle_timeout_ms,
        l.stall_timeout_ms,
        l.pressure_stall_timeout_ms,
    ]
    .into_iter()
    .filter(|&t| t > 0)
    .min()
    .unwrap_or(1_000);
    // Check often enough that a timeout fires at most a quarter late.
    let tick_ms = (shortest / 4).clamp(5, 100);
    let mut pfds: Vec<libc::pollfd> = shared
        .listeners
        .iter()
        .map(|l| l.fd())
        .chain([shared.stop_fd.as_raw_fd()])
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let mut refusals = Refusals::default();
    let mut next_check = 0u64;
    loop {
        for p in pfds.iter_mut() {
            p.revents = 0;
        }
        // SAFETY: pfds is a valid array of pollfd for the call's duration.
        let n = unsafe {
            libc::poll(
                pfds.as_mut_ptr(),
                pfds.len() as libc::nfds_t,
                tick_ms as i32,
            )
        };
        if shared.is_stopping() {
            return;
        }
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                log::error!("nbd: poll on the listening sockets: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        for (i, l) in shared.listeners.iter().enumerate() {
            if pfds[i].revents != 0 {
                accept_some(&shared, l, &mut refusals);
            }
        }
        let now = shared.clock.now();
        if now >= next_check {
            next_check = now + tick_ms;
            check_timeouts(&shared, now);
            refusals.report(now);
        }
    }
}

/// Counts refused connections between log lines.
#[derive(Default)]
struct Refusals {
    unreported: u64,
    last_log: Option<u64>,
}

impl Refusals {
    fn refused(&mut self, shared: &Shared, peer: &str) {
        let now = shared.clock.now();
        if self
            .last_log
            .is_none_or(|t| now >= t + REFUSAL_LOG_EVERY_MS)
        {
            log::warn!(
                "nbd: {peer}: refused: {} connections open (max_connections)",
                shared.limits.max_connections
            );
            self.last_log = Some(now);
        } else {
            self.unreported += 1;
        }
    }

    fn report(&mut self, now: u64) {
        if self.unreported > 0
            && self
                .last_log
                .is_some_and(|t| now >= t + REFUSAL_LOG_EVERY_MS)
        {
            log::warn!(
                "nbd: refused {} more connection(s) at max_connections",
                self.unreported
            );
            self.unreported = 0;
            self.last_log = Some(now);
        }
    }
}

/// Accepts what is pending on `l` (a bounded batch) and dispatches it.
fn accept_some(shared: &Shared, l: &Listener, refusals: &mut Refusals) {
    for _ in 0..ACCEPT_BATCH {
        let accepted = match l {
            Listener::Tcp(t) => t.accept().map(|(s, a)| {
                set_nodelay(s.as_raw_fd());
                (OwnedFd::from(s), a.to_string())
            }),
            Listener::Unix(u, p) => u
                .accept()
                .map(|(s, _)| (OwnedFd::from(s), format!("unix:{}", p.display()))),
        };
        let (fd, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                match e.raw_os_error() {
                    Some(libc::EAGAIN) | Some(libc::EINTR) | Some(libc::ECONNABORTED) => {}
                    Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS)
                    | Some(libc::ENOMEM) => {
                        log::warn!("nbd: accept: {e}; retrying shortly");
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    _ if shared.is_stopping() => {}
                    _ => log::error!("nbd: accept: {e}"),
                }
                return;
            }
        };
        // The accepted stream is blocking; the workers' ring copes with that and the
        // direct sends use MSG_DONTWAIT.
        if shared.conns().len() >= shared.limits.max_connections {
            refusals.refused(shared, &peer);
            continue;
        }
        let fd = Arc::new(fd);
        let entry = shared.register(&fd, peer);
        dispatch(shared, Accepted { fd, entry });
    }
}

/// Hands a connection to the least loaded worker that is alive and beating (or, if every
/// worker is stuck, alive at all).
fn dispatch(shared: &Shared, mut acc: Accepted) {
    let now = shared.clock.now();
    let beating = |i: &usize| {
        now.saturating_sub(shared.workers[*i].beat.load(Ordering::Relaxed)) < STUCK_AFTER_MS
    };
    loop {
        let alive: Vec<usize> = (0..shared.workers.len())
            .filter(|&i| shared.workers[i].alive.load(Ordering::SeqCst))
            .collect();
        let pick = alive
            .iter()
            .copied()
            .filter(beating)
            .min_by_key(|&i| shared.workers[i].load.load(Ordering::Relaxed))
            .or_else(|| {
                alive
                    .iter()
                    .copied()
                    .min_by_key(|&i| shared.workers[i].load.load(Ordering::Relaxed))
            });
        let Some(i) = pick else {
            log::error!(
                "nbd: {}: no worker thread is alive; closing",
                acc.entry.peer
            );
            shared.unregister(acc.entry.id);
            return;
        };
        let slot = &shared.workers[i];
        slot.load.fetch_add(1, Ordering::Relaxed);
        acc.entry.worker.store(i, Ordering::Relaxed);
        match slot.tx.unbounded_send(Msg::Conn(acc)) {
            Ok(()) => return,
            Err(e) => {
                // That worker is gone: mark it and try another.
                slot.load.fetch_sub(1, Ordering::Relaxed);
                slot.alive.store(false, Ordering::SeqCst);
                match e.into_inner() {
                    Msg::Conn(a) => acc = a,
                    _ => return,
                }
            }
        }
    }
}

/// Closes connections past a deadline: handshake, idle, or a stalled transfer (sooner
/// while requests wait for the memory budget).
fn check_timeouts(shared: &Shared, now: u64) {
    let l = &shared.limits;
    let pressure = shared.budget.under_pressure();
    for e in shared.entries() {
        if e.is_killed() {
            continue;
        }
        if !e.transmitting.load(Ordering::Relaxed) {
            let t = l.handshake_timeout_ms;
            if t > 0 && now.saturating_sub(e.accepted_ms) >= t {
                e.kill(&format!("handshake not finished within {t} ms"));
            }
            continue;
        }
        if let Some((what, ms)) = e.watch.stalled_for(now) {
            let (s, p) = (l.stall_timeout_ms, l.pressure_stall_timeout_ms);
            if s > 0 && ms >= s {
                e.kill(&format!("{what} made no progress for {ms} ms"));
                continue;
            }
            if pressure && p > 0 && ms >= p {
                e.kill(&format!(
                    "{what} made no progress for {ms} ms while other requests wait for \
                     memory (memory_budget_bytes)"
                ));
                continue;
            }
        }
        let idle = l.idle_timeout_ms;
        if idle > 0 && e.watch.inflight() == 0 && e.watch.stalled_for(now).is_none() {
            let quiet = e.watch.idle_for(now);
            if quiet >= idle {
                e.kill(&format!("idle for {quiet} ms"));
            }
        }
    }
}
