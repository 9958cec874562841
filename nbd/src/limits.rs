//! Resource limits: the options a server takes ([`Limits`]), the server-wide budget for
//! payload buffers ([`Budget`]) and the per-connection progress clock the supervisor reads
//! to enforce timeouts ([`Watch`]).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::conn::MAX_PAYLOAD;

/// Per-server resource limits. Every field has a default ([`Limits::default`]); in a
/// configuration file (serde) any field may be left out. Timeouts are in milliseconds and
/// 0 turns that timeout off; sizes are in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Connections open at once (handshake or transmission). A client beyond it is closed
    /// right after `accept`, before the handshake, and the refusal is logged. Default 1024.
    pub max_connections: usize,
    /// Bytes of request and reply payload buffers in flight across the whole server
    /// (reads being read or waiting for a socket, writes being received or written).
    /// When it is used up, connections stop reading new requests until buffers come back.
    /// At most half of it goes to connections on probation (no reply delivered yet, or
    /// their last send stalled), so clients that never read their replies cannot take
    /// it all. Default 256 MiB; at least 64 MiB (twice the 32 MiB maximum request).
    pub memory_budget_bytes: u64,
    /// Requests in flight per connection (being served or with a reply not yet sent).
    /// Default 64.
    pub max_requests_per_connection: usize,
    /// Payload buffer bytes in flight per connection; a single request may exceed it
    /// when it is the connection's only one. Default 64 MiB.
    pub max_bytes_per_connection: u64,
    /// A client must finish the handshake within this long of being accepted.
    /// Default 30 000 (30 s).
    pub handshake_timeout_ms: u64,
    /// After the handshake, a connection with no request in flight that has received
    /// nothing for this long is closed. Default 0 (off): NBD clients such as the kernel's
    /// or qemu's stay connected and silent for as long as their disk is idle.
    pub idle_timeout_ms: u64,
    /// A connection whose reply sending, or whose receiving of a write's payload, has made
    /// no progress for this long is closed (its buffers come back). Default 60 000 (60 s).
    pub stall_timeout_ms: u64,
    /// The same, but while requests are waiting for the memory budget: a stalled
    /// connection is then closed after this shorter time. Default 1000 (1 s).
    pub pressure_stall_timeout_ms: u64,
}

/// Default of [`Limits::memory_budget_bytes`].
pub const DEFAULT_MEMORY_BUDGET: u64 = 256 << 20;

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 1024,
            memory_budget_bytes: DEFAULT_MEMORY_BUDGET,
            max_requests_per_connection: crate::conn::MAX_INFLIGHT,
            max_bytes_per_connection: crate::conn::MAX_INFLIGHT_BYTES as u64,
            handshake_timeout_ms: 30_000,
            idle_timeout_ms: 0,
            stall_timeout_ms: 60_000,
            pressure_stall_timeout_ms: 1_000,
        }
    }
}

impl Limits {
    /// Smallest accepted [`Limits::memory_budget_bytes`]: a maximum-size request must fit
    /// in the probation half.
    pub const MIN_MEMORY_BUDGET: u64 = 2 * MAX_PAYLOAD as u64;

    /// Checks the values; the error says which field is wrong and why.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_connections == 0 {
            return Err("max_connections must be at least 1".into());
        }
        if self.max_requests_per_connection == 0 {
            return Err("max_requests_per_connection must be at least 1".into());
        }
        if self.max_bytes_per_connection == 0 {
            return Err("max_bytes_per_connection must be at least 1".into());
        }
        if self.memory_budget_bytes < Self::MIN_MEMORY_BUDGET {
            return Err(format!(
                "memory_budget_bytes is {} (minimum {}: twice the largest request)",
                self.memory_budget_bytes,
                Self::MIN_MEMORY_BUDGET
            ));
        }
        if usize::try_from(self.memory_budget_bytes).is_err()
            || usize::try_from(self.max_bytes_per_connection).is_err()
        {
            return Err("byte limits do not fit this machine's address space".into());
        }
        Ok(())
    }
}

/// Milliseconds since the server started; never 0, so 0 can mean "not set".
#[derive(Clone, Copy)]
pub(crate) struct Clock(Instant);

impl Clock {
    pub(crate) fn new() -> Clock {
        Clock(Instant::now())
    }

    pub(crate) fn now(&self) -> u64 {
        u64::try_from(self.0.elapsed().as_millis())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    }
}

/// How long a send may sit without progress before its connection counts as stalled for
/// admission (its new requests then take the probation share).
const STALLED_FOR_ADMISSION_MS: u64 = 250;

/// Progress of one connection, updated by whichever thread moves its bytes and read by
/// the supervisor thread to enforce timeouts.
pub(crate) struct Watch {
    clock: Clock,
    /// Last time any bytes arrived.
    last_rx: AtomicU64,
    /// Last progress of a write payload being received; 0 when none is.
    rx_since: AtomicU64,
    /// Last progress of a reply send that had to wait for the socket; 0 when none waits.
    tx_since: AtomicU64,
    /// Requests in flight (a mirror of the connection's own count).
    inflight: AtomicUsize,
    /// Replies fully handed to the socket.
    replies: AtomicU64,
}

impl Watch {
    pub(crate) fn new(clock: Clock) -> Watch {
        Watch {
            clock,
            last_rx: AtomicU64::new(clock.now()),
            rx_since: AtomicU64::new(0),
            tx_since: AtomicU64::new(0),
            inflight: AtomicUsize::new(0),
            replies: AtomicU64::new(0),
        }
    }

    pub(crate) fn now(&self) -> u64 {
        self.clock.now()
    }

    /// Bytes arrived.
    pub(crate) fn received(&self) {
        let now = self.now();
        self.last_rx.store(now, Ordering::Relaxed);
        if self.rx_since.load(Ordering::Relaxed) != 0 {
            self.rx_since.store(now, Ordering::Relaxed);
        }
    }

    /// A write payload starts (`true`) or is complete (`false`).
    pub(crate) fn payload(&self, receiving: bool) {
        let v = if receiving { self.now() } else { 0 };
        self.rx_since.store(v, Ordering::Relaxed);
    }

    /// A send waits for the socket or made progress (`true`), or is done (`false`). Sends
    /// of one connection are serialized, so there is one writer at a time.
    pub(crate) fn sending(&self, waiting: bool) {
        let v = if waiting { self.now() } else { 0 };
        self.tx_since.store(v, Ordering::Relaxed);
    }

    /// A reply was delivered to the socket.
    pub(crate) fn replied(&self) {
        self.replies.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add_inflight(&self, n: usize) {
        self.inflight.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn sub_inflight(&self, n: usize) {
        self.inflight.fetch_sub(n, Ordering::Relaxed);
    }

    /// Milliseconds since the last received byte.
    pub(crate) fn idle_for(&self, now: u64) -> u64 {
        now.saturating_sub(self.last_rx.load(Ordering::Relaxed))
    }

    pub(crate) fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    /// How long the current send or payload receive has gone without progress, if one is
    /// under way: (what, milliseconds).
    pub(crate) fn stalled_for(&self, now: u64) -> Option<(&'static str, u64)> {
        let tx = self.tx_since.load(Ordering::Relaxed);
        let rx = self.rx_since.load(Ordering::Relaxed);
        let tx = (tx != 0).then(|| ("sending replies", now.saturating_sub(tx)));
        let rx = (rx != 0).then(|| ("receiving a write payload", now.saturating_sub(rx)));
        match (tx, rx) {
            (Some(a), Some(b)) => Some(if a.1 >= b.1 { a } else { b }),
            (a, b) => a.or(b),
        }
    }

    /// Whether this connection's new requests take the probation share of the budget:
    /// no reply delivered yet, or a send stuck right now.
    pub(crate) fn on_probation(&self) -> bool {
        if self.replies.load(Ordering::Relaxed) == 0 {
            return true;
        }
        let tx = self.tx_since.load(Ordering::Relaxed);
        tx != 0 && self.now().saturating_sub(tx) >= STALLED_FOR_ADMISSION_MS
    }
}

/// How many later, smaller requests may overtake a waiting one before it goes next
/// whatever its size (see [`Budget::grant`]).
const MAX_OVERTAKES: u32 = 64;

/// One request waiting for budget.
struct Ticket {
    cost: usize,
    probation: bool,
    granted: AtomicBool,
    waker: Mutex<Option<Waker>>,
    /// Times a later request was granted before this one (under the state lock).
    overtaken: std::sync::atomic::AtomicU32,
}

#[derive(Default)]
struct BudgetState {
    used: usize,
    probation_used: usize,
    /// Waiters of established connections (served first), then of probation ones.
    established: VecDeque<Arc<Ticket>>,
    probation: VecDeque<Arc<Ticket>>,
}

/// The server-wide budget for payload buffers. Waiters are served in order, established
/// connections before connections on probation, and never more than
/// [`Limits::memory_budget_bytes`] is handed out (half of it at most to probation).
pub(crate) struct Budget {
    limit: usize,
    probation_limit: usize,
    st: Mutex<BudgetState>,
    waiting: AtomicUsize,
}

impl Budget {
    pub(crate) fn new(limit: usize) -> Budget {
        Budget {
            limit,
            probation_limit: limit / 2,
            st: Mutex::new(BudgetState::default()),
            waiting: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BudgetState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether requests are waiting for memory right now.
    pub(crate) fn under_pressure(&self) -> bool {
        self.waiting.load(Ordering::Relaxed) > 0
    }

    /// Bytes handed out.
    #[cfg(test)]
    fn used(&self) -> usize {
        self.lock().used
    }

    fn fits(&self, st: &BudgetState, cost: usize, probation: bool) -> bool {
        let total = st.used.saturating_add(cost) <= self.limit;
        total && (!probation || st.probation_used.saturating_add(cost) <= self.probation_limit)
    }

    fn take(st: &mut BudgetState, cost: usize, probation: bool) {
        st.used += cost;
        if probation {
            st.probation_used += cost;
        }
    }

    /// Hands out what fits. Within each class the smallest request goes first: one client
    /// queueing huge READs it never reads the replies of (each can hold the budget until
    /// the stall timeout drops its connection) must not keep a small request of another
    /// client waiting behind every one of them. A request overtaken [`MAX_OVERTAKES`]
    /// times goes next whatever its size, so large requests are never starved. A blocked
    /// established waiter also holds back the probation queue (otherwise small probation
    /// requests could starve it).
    fn grant(&self, st: &mut BudgetState) {
        for probation in [false, true] {
            loop {
                let q = if probation {
                    &st.probation
                } else {
                    &st.established
                };
                let due = q
                    .iter()
                    .position(|t| t.overtaken.load(Ordering::Relaxed) >= MAX_OVERTAKES);
                // The smallest waiter (the earliest of equals), unless one is due.
                let pick = due.or_else(|| {
                    q.iter()
                        .enumerate()
                        .min_by_key(|(i, t)| (t.cost, *i))
                        .map(|(i, _)| i)
                });
                let Some(i) = pick else { break };
                let cost = q[i].cost;
                if !self.fits(st, cost, probation) {
                    return;
                }
                let q = if probation {
                    &mut st.probation
                } else {
                    &mut st.established
                };
                for earlier in q.iter().take(i) {
                    earlier.overtaken.fetch_add(1, Ordering::Relaxed);
                }
                let Some(t) = q.remove(i) else { break };
                Self::take(st, t.cost, probation);
                self.waiting.fetch_sub(1, Ordering::Relaxed);
                t.granted.store(true, Ordering::Release);
                let w = t.waker.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some(w) = w {
                    w.wake();
                }
            }
        }
    }

    /// Gives back `cost` bytes, `probation` of them from the probation share.
    pub(crate) fn release(&self, cost: usize, probation: usize) {
        if cost == 0 {
            return;
        }
        let mut st = self.lock();
        st.used = st.used.saturating_sub(cost);
        st.probation_used = st.probation_used.saturating_sub(probation.min(cost));
        self.grant(&mut st);
    }

    /// Waits for `cost` bytes (`cost` must not exceed half the budget).
    pub(crate) fn acquire(self: &Arc<Self>, cost: usize, probation: bool) -> Acquire {
        Acquire {
            budget: self.clone(),
            cost,
            probation,
            ticket: None,
            done: false,
        }
    }
}

/// Future of [`Budget::acquire`]; dropping it before it is ready gives up the place in
/// line (or the grant, if one raced in).
pub(crate) struct Acquire {
    budget: Arc<Budget>,
    cost: usize,
    probation: bool,
    ticket: Option<Arc<Ticket>>,
    done: bool,
}

impl Future for Acquire {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(());
        }
        match &this.ticket {
            None => {
                let b = &this.budget;
                let mut st = b.lock();
                let queue_empty =
                    st.established.is_empty() && (!this.probation || st.probation.is_empty());
                if queue_empty && b.fits(&st, this.cost, this.probation) {
                    Budget::take(&mut st, this.cost, this.probation);
                    this.done = true;
                    return Poll::Ready(());
                }
                // Others wait: join them, and let the policy decide who goes first (a small
                // request may go at once, ahead of larger ones).
                let t = Arc::new(Ticket {
                    cost: this.cost,
                    probation: this.probation,
                    granted: AtomicBool::new(false),
                    waker: Mutex::new(Some(cx.waker().clone())),
                    overtaken: std::sync::atomic::AtomicU32::new(0),
                });
                if this.probation {
                    st.probation.push_back(t.clone());
                } else {
                    st.established.push_back(t.clone());
                }
                b.waiting.fetch_add(1, Ordering::Relaxed);
                b.grant(&mut st);
                this.ticket = Some(t.clone());
                if t.granted.load(Ordering::Acquire) {
                    this.done = true;
                    return Poll::Ready(());
                }
                Poll::Pending
            }
            Some(t) => {
                *t.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
                if t.granted.load(Ordering::Acquire) {
                    this.done = true;
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            }
        }
    }
}

impl Drop for Acquire {
    fn drop(&mut self) {
        let Some(t) = self.ticket.take() else { return };
        if self.done {
            return;
        }
        let b = &self.budget;
        let mut st = b.lock();
        if t.granted.load(Ordering::Acquire) {
            // Granted, but nobody will use it.
            st.used = st.used.saturating_sub(t.cost);
            if t.probation {
                st.probation_used = st.probation_used.saturating_sub(t.cost);
            }
        } else {
            let q = if t.probation {
                &mut st.probation
            } else {
                &mut st.established
            };
            if let Some(i) = q.iter().position(|x| Arc::ptr_eq(x, &t)) {
                q.remove(i);
                b.waiting.fetch_sub(1, Ordering::Relaxed);
            }
        }
        // Whoever stood behind may fit now.
        b.grant(&mut st);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Wake;

    struct Flag(AtomicBool);
    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    fn poll(f: &mut Acquire, w: &Arc<Flag>) -> bool {
        let waker = Waker::from(w.clone());
        let mut cx = Context::from_waker(&waker);
        Pin::new(f).poll(&mut cx).is_ready()
    }

    #[test]
    fn budget_is_never_exceeded_and_established_go_first() {
        let b = Arc::new(Budget::new(100));
        let w = Arc::new(Flag(AtomicBool::new(false)));
        let mut a = b.acquire(40, true);
        assert!(poll(&mut a, &w));
        // Probation may hold at most half.
        let mut p = b.acquire(20, true);
        assert!(!poll(&mut p, &w));
        assert!(b.under_pressure());
        let mut e = b.acquire(60, false);
        assert!(poll(&mut e, &w), "established requests use the other half");
        assert_eq!(b.used(), 100);
        let mut e2 = b.acquire(30, false);
        assert!(!poll(&mut e2, &w));
        // 30 bytes free: the established waiter is first in line, the probation one waits.
        b.release(30, 30);
        assert!(poll(&mut e2, &w));
        assert!(!poll(&mut p, &w));
        b.release(60, 0);
        assert!(poll(&mut p, &w));
        assert!(!b.under_pressure());
        // A dropped waiter gives up its place; a dropped grant comes back.
        let mut big = b.acquire(90, false);
        assert!(!poll(&mut big, &w));
        drop(big);
        assert!(!b.under_pressure());
        assert_eq!(b.used(), 60);
        b.release(60, 50);
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn small_requests_overtake_huge_ones_but_not_forever() {
        let b = Arc::new(Budget::new(200));
        let w = Arc::new(Flag(AtomicBool::new(false)));
        // A stalled client holds the whole probation half.
        let mut held = b.acquire(100, true);
        assert!(poll(&mut held, &w));
        // Three huge waiters queue up, then a small one.
        let mut huge: Vec<Acquire> = (0..3).map(|_| b.acquire(100, true)).collect();
        for h in &mut huge {
            assert!(!poll(h, &w));
        }
        let mut small = b.acquire(10, true);
        assert!(!poll(&mut small, &w));
        // The stalled holder is dropped: the small request goes before the huge ones.
        b.release(100, 100);
        assert!(poll(&mut small, &w));
        assert!(!poll(&mut huge[0], &w));
        b.release(10, 10);
        assert!(poll(&mut huge[0], &w));
        drop(huge);

        // A huge waiter overtaken MAX_OVERTAKES times goes next, whatever waits behind it.
        let b = Arc::new(Budget::new(200));
        let mut held = b.acquire(30, true);
        assert!(poll(&mut held, &w));
        let mut big = b.acquire(100, true);
        assert!(!poll(&mut big, &w));
        let mut tiny = Vec::new();
        for _ in 0..MAX_OVERTAKES {
            let mut t = b.acquire(1, true);
            assert!(
                poll(&mut t, &w),
                "small requests fit beside the waiting big one"
            );
            tiny.push(t);
        }
        let mut late = b.acquire(1, true);
        assert!(
            !poll(&mut late, &w),
            "the overtaken waiter is due: it holds the line"
        );
        b.release(30 + MAX_OVERTAKES as usize, 30 + MAX_OVERTAKES as usize);
        assert!(poll(&mut big, &w));
        assert!(!poll(&mut late, &w), "the probation half is full again");
        b.release(100, 100);
        assert!(poll(&mut late, &w));
    }

    #[test]
    fn limits_read_from_json_with_defaults_for_missing_fields() {
        let l: Limits = serde_json::from_str(r#"{"idle_timeout_ms": 5000}"#).unwrap();
        assert_eq!(
            l,
            Limits {
                idle_timeout_ms: 5000,
                ..Limits::default()
            }
        );
        assert!(serde_json::from_str::<Limits>(r#"{"idle_timeout": 5}"#).is_err());
        let back: Limits = serde_json::from_str(&serde_json::to_string(&l).unwrap()).unwrap();
        assert_eq!(back, l);
    }

    #[test]
    fn limits_validate_names_the_field() {
        assert!(Limits::default().validate().is_ok());
        let l = Limits {
            memory_budget_bytes: 1 << 20,
            ..Limits::default()
        };
        assert!(l.validate().unwrap_err().contains("memory_budget_bytes"));
        let l = Limits {
            max_connections: 0,
            ..Limits::default()
        };
        assert!(l.validate().unwrap_err().contains("max_connections"));
    }
}
