//! [`Queue`]: the requests of one iSCSI extent, shared by the requesters (any thread, any
//! ring) and the extent's connection thread, which alone touches the libiscsi context.
//!
//! A requester registers a slot (command, LBA range, and for a read a pointer to its buffer)
//! and wakes the thread; the thread issues the command, and in the command's callback copies
//! read data into the requester's buffer *under this queue's lock*, then wakes the requester.
//! The lock is what makes the cross-thread copy sound: a requester whose future is dropped
//! withdraws its buffer under the same lock, so the thread never writes into memory that is no
//! longer lent to it. Write payloads are copied into the slot when it is registered, so the
//! library never reads a requester's memory.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use tables::{IoError, IoResult};

use super::scsi::Verdict;
use crate::net::lend::{DstBuf, Outcomes};
use crate::net::uri::IscsiUri;

/// How often a command may be sent again for a transient condition (UNIT ATTENTION, BUSY...)
/// before it fails.
const MAX_RETRIES: u32 = 20;

/// A SCSI command as a request carries it.
#[derive(Clone)]
pub(crate) enum Cmd {
    /// READ(16).
    Read,
    /// WRITE(16), the payload owned by the request (and by the library while it is sent).
    Write {
        /// Force unit access.
        fua: bool,
        /// The bytes.
        data: Arc<[u8]>,
    },
    /// SYNCHRONIZE CACHE(16) of the whole LUN.
    Flush,
    /// UNMAP of the range.
    Unmap,
    /// WRITE SAME(16) of a zero block over the range, UNMAP bit off.
    WriteZeroes,
}

impl Cmd {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Cmd::Read => "read",
            Cmd::Write { fua: false, .. } => "write",
            Cmd::Write { fua: true, .. } => "write (FUA)",
            Cmd::Flush => "synchronize cache",
            Cmd::Unmap => "unmap",
            Cmd::WriteZeroes => "write same",
        }
    }
}

/// What the connection thread needs to issue one request.
pub(crate) struct Issue {
    pub id: u64,
    pub cmd: Cmd,
    pub lba: u64,
    pub blocks: u32,
}

struct Slot {
    cmd: Cmd,
    lba: u64,
    blocks: u32,
    /// Where read data goes: present exactly while the requester waits for an outcome.
    dst: Option<DstBuf>,
    /// Issued on the current connection and not answered yet.
    in_flight: bool,
    sent_at: Instant,
    /// When the requester gives up whatever happens (timeout plus reconnect-delay).
    deadline: Instant,
    retries: u32,
    outcome: Option<IoResult<()>>,
    /// The requester has left (taken its outcome or been dropped).
    gone: bool,
    waker: Option<Waker>,
}

impl Slot {
    fn settle(&mut self, r: IoResult<()>) {
        if self.outcome.is_none() && !self.gone {
            self.outcome = Some(r);
            self.dst = None;
            if let Some(w) = self.waker.take() {
                w.wake();
            }
        }
    }

    /// Waiting for an answer it has not had.
    fn waiting(&self) -> bool {
        self.outcome.is_none() && !self.gone
    }

    fn removable(&self) -> bool {
        self.gone && !self.in_flight
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No session; the connection thread is (re)connecting.
    Connecting,
    /// Logged in: requests are issued.
    Up,
    /// No session for longer than reconnect-delay: requests fail at once with EIO while the
    /// thread keeps trying.
    Failed,
}

struct State {
    phase: Phase,
    /// Sessions so far (the first is 1).
    gen: u64,
    down_since: Option<Instant>,
    last_error: Option<String>,
    slots: HashMap<u64, Slot>,
    /// Slots to issue, oldest first.
    queue: VecDeque<u64>,
    /// Slots to issue again at the next tick (the target was busy).
    later: Vec<u64>,
    next_id: u64,
    /// The connection thread's waker, and whether it was woken since it last looked.
    thread: Option<Waker>,
    kicked: bool,
}

/// Counters for `dev status`.
#[derive(Default)]
pub(crate) struct Stats {
    pub requests: AtomicU64,
    pub reconnects: AtomicU64,
    pub timeouts: AtomicU64,
    pub dropped: AtomicU64,
    /// Smoothed round-trip time, microseconds.
    pub rtt_us: AtomicU64,
}

/// The request table of one extent.
pub(crate) struct Queue {
    pub uri: Arc<IscsiUri>,
    st: Mutex<State>,
    stop: AtomicBool,
    pub stats: Stats,
}

impl Queue {
    pub(crate) fn new(uri: Arc<IscsiUri>) -> Queue {
        Queue {
            uri,
            st: Mutex::new(State {
                phase: Phase::Connecting,
                gen: 0,
                down_since: Some(Instant::now()),
                last_error: None,
                slots: HashMap::new(),
                queue: VecDeque::new(),
                later: Vec::new(),
                next_id: 1,
                thread: None,
                kicked: false,
            }),
            stop: AtomicBool::new(false),
            stats: Stats::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `URI: LUN n: CMD at LBA x (n blocks)` for messages.
    pub(crate) fn what(&self, cmd: &Cmd, lba: u64, blocks: u32) -> String {
        match cmd {
            Cmd::Flush => format!("{}: LUN {}: {}", self.uri, self.uri.lun, cmd.name()),
            _ => format!(
                "{}: LUN {}: {} at LBA {lba} ({blocks} blocks)",
                self.uri,
                self.uri.lun,
                cmd.name()
            ),
        }
    }

    pub(crate) fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Ends the connection thread after its current step.
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let mut st = self.lock();
        kick(&mut st);
    }

    // ---- the requester's side ----

    /// Registers a request and wakes the connection thread; EIO at once when the extent is
    /// failed (no session for longer than reconnect-delay).
    pub(crate) fn submit(
        &self,
        cmd: Cmd,
        lba: u64,
        blocks: u32,
        dst: Option<DstBuf>,
        deadline: Instant,
    ) -> IoResult<u64> {
        let mut st = self.lock();
        let now = Instant::now();
        if self.given_up(&st, now) {
            return Err(self.down_error(&st, now));
        }
        let id = st.next_id;
        st.next_id = st.next_id.wrapping_add(1).max(1);
        st.slots.insert(
            id,
            Slot {
                cmd,
                lba,
                blocks,
                dst,
                in_flight: false,
                sent_at: now,
                deadline,
                retries: 0,
                outcome: None,
                gone: false,
                waker: None,
            },
        );
        st.queue.push_back(id);
        kick(&mut st);
        Ok(id)
    }

    // ---- the connection thread's side ----

    /// Registers the thread's waker; true if it was woken since it last asked.
    pub(crate) fn take_kick(&self, w: &Waker) -> bool {
        let mut st = self.lock();
        if !st.thread.as_ref().is_some_and(|t| t.will_wake(w)) {
            st.thread = Some(w.clone());
        }
        std::mem::take(&mut st.kicked)
    }

    /// The requests to issue now (marked in flight), oldest first; none unless a session is
    /// up.
    pub(crate) fn take_queue(&self) -> Vec<Issue> {
        let mut st = self.lock();
        if st.phase != Phase::Up {
            return Vec::new();
        }
        let now = Instant::now();
        let ids: Vec<u64> = st.queue.drain(..).collect();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let Some(s) = st.slots.get_mut(&id) else {
                continue;
            };
            if !s.waiting() || s.in_flight {
                if s.removable() {
                    st.slots.remove(&id);
                }
                continue;
            }
            s.in_flight = true;
            s.sent_at = now;
            out.push(Issue {
                id,
                cmd: s.cmd.clone(),
                lba: s.lba,
                blocks: s.blocks,
            });
        }
        self.stats
            .requests
            .fetch_add(out.len() as u64, Ordering::Relaxed);
        out
    }

    /// A command ended (its callback ran): `verdict` says how; `data` is a read's data.
    /// Returns false if the connection broke (the command will be sent again on the next).
    pub(crate) fn complete(&self, id: u64, verdict: Verdict, data: Option<&[u8]>) -> bool {
        let mut st = self.lock();
        let now = Instant::now();
        let Some(s) = st.slots.get_mut(&id) else {
            return true;
        };
        s.in_flight = false;
        let rtt = now.saturating_duration_since(s.sent_at);
        let mut alive = true;
        match verdict {
            Verdict::Good => {
                let r = match (&s.cmd, s.dst, data) {
                    (Cmd::Read, Some(d), Some(src)) if src.len() == d.len() => {
                        // SAFETY: we hold the queue's lock and the slot still holds `d` (its
                        // requester withdraws it under this lock before its buffer can go).
                        unsafe { d.write_at(0, Some(src), 0) };
                        Ok(())
                    }
                    (Cmd::Read, Some(d), got) => Err(IoError::eio(format!(
                        "{}: the target returned {} bytes, {} were asked for",
                        self.what(&s.cmd, s.lba, s.blocks),
                        got.map_or(0, <[u8]>::len),
                        d.len()
                    ))),
                    _ => Ok(()),
                };
                s.settle(r);
            }
            Verdict::Fail(errno, why) => {
                let msg = format!("{}: {why}", self.what(&s.cmd, s.lba, s.blocks));
                s.settle(Err(IoError::new(errno, msg)));
            }
            Verdict::Retry(why) => {
                s.retries += 1;
                if s.retries > MAX_RETRIES {
                    let msg = format!(
                        "{}: {why}, still after {MAX_RETRIES} tries",
                        self.what(&s.cmd, s.lba, s.blocks)
                    );
                    s.settle(Err(IoError::eio(msg)));
                } else if s.waiting() {
                    st.later.push(id);
                }
            }
            Verdict::Reconnect(_) => {
                alive = false;
                if s.waiting() {
                    st.queue.push_back(id);
                }
            }
        }
        if st.slots.get(&id).is_some_and(Slot::removable) {
            st.slots.remove(&id);
        }
        drop(st);
        let us = rtt.as_micros().min(u128::from(u32::MAX)) as u64;
        let old = self.stats.rtt_us.load(Ordering::Relaxed);
        let new = if old == 0 { us } else { (old * 7 + us) / 8 };
        self.stats.rtt_us.store(new, Ordering::Relaxed);
        alive
    }

    /// A session is up: requests flow; everything waiting is issued, oldest first.
    pub(crate) fn up(&self) -> u64 {
        let mut st = self.lock();
        st.gen += 1;
        if st.gen > 1 {
            self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        st.phase = Phase::Up;
        st.down_since = None;
        st.queue.make_contiguous().sort_unstable();
        kick(&mut st);
        st.gen
    }

    /// The session ended (`why`): every request that was in flight on it is sent again on the
    /// next one (none was acknowledged upward).
    pub(crate) fn down(&self, why: &str) {
        let mut st = self.lock();
        if st.phase != Phase::Up {
            return;
        }
        if !self.stopped() {
            log::warn!("{}: connection lost: {why}", self.uri);
        }
        let now = Instant::now();
        st.phase = Phase::Connecting;
        st.down_since = Some(now);
        st.last_error = Some(why.to_string());
        let st = &mut *st;
        for (id, s) in st.slots.iter_mut() {
            if s.in_flight {
                s.in_flight = false;
                if s.waiting() {
                    st.queue.push_back(*id);
                }
            }
        }
        st.slots.retain(|_, s| !s.removable());
        let mut q: Vec<u64> = st.queue.drain(..).collect();
        q.sort_unstable();
        q.dedup();
        st.queue.extend(q);
        self.expire(st, now);
    }

    /// A connection attempt failed; past reconnect-delay the extent is failed.
    pub(crate) fn connect_failed(&self, why: &str) {
        let mut st = self.lock();
        let now = Instant::now();
        st.down_since.get_or_insert(now);
        st.last_error = Some(why.to_string());
        self.expire(&mut st, now);
    }

    /// Past reconnect-delay without a session: the extent is failed and every request
    /// waiting for a session fails with EIO.
    fn expire(&self, st: &mut State, now: Instant) {
        if st.phase == Phase::Up || !self.given_up(st, now) {
            return;
        }
        if st.phase != Phase::Failed {
            let since = st.down_since.unwrap_or(now);
            log::error!(
                "{}: no connection for {:.1} s (reconnect-delay): requests fail with EIO until \
                 the target is back: {}",
                self.uri,
                now.saturating_duration_since(since).as_secs_f64(),
                st.last_error.as_deref().unwrap_or("not connected yet")
            );
            st.phase = Phase::Failed;
        }
        let err = self.down_error(st, now);
        for id in st.queue.drain(..).chain(st.later.drain(..)) {
            if let Some(s) = st.slots.get_mut(&id) {
                s.settle(Err(err.clone()));
            }
        }
        st.slots.retain(|_, s| !s.removable());
    }

    fn given_up(&self, st: &State, now: Instant) -> bool {
        match st.phase {
            Phase::Up => false,
            Phase::Failed => true,
            Phase::Connecting => st
                .down_since
                .is_some_and(|t| now >= t + self.uri.opts.reconnect_delay),
        }
    }

    fn down_error(&self, st: &State, now: Instant) -> IoError {
        let since = st
            .down_since
            .map(|t| {
                format!(
                    " for {:.1} s",
                    now.saturating_duration_since(t).as_secs_f64()
                )
            })
            .unwrap_or_default();
        let why = st.last_error.as_deref().unwrap_or("not connected yet");
        IoError::eio(format!(
            "{}: LUN {}: no connection{since}: {why}",
            self.uri, self.uri.lun
        ))
    }

    /// Periodic check by the connection thread: requests past their deadline fail with
    /// ETIMEDOUT; busy-retried ones go out again; past reconnect-delay the extent fails.
    /// Returns why the session must be torn down if a command has been unanswered for
    /// longer than the timeout.
    pub(crate) fn tick(&self, now: Instant) -> Option<String> {
        let mut st = self.lock();
        let mut stalled = None;
        let timeout = self.uri.opts.timeout;
        let mut expired = 0;
        for s in st.slots.values_mut() {
            if s.in_flight
                && stalled.is_none()
                && now.saturating_duration_since(s.sent_at) > timeout
            {
                stalled = Some(format!(
                    "{} unanswered for over {:.1} s (timeout)",
                    self.what(&s.cmd, s.lba, s.blocks),
                    timeout.as_secs_f64()
                ));
            }
            if s.waiting() && now >= s.deadline {
                expired += 1;
                let msg = format!(
                    "{}: no answer within the timeout and reconnect-delay",
                    self.what(&s.cmd, s.lba, s.blocks)
                );
                s.settle(Err(IoError::new(libc::ETIMEDOUT, msg)));
            }
        }
        self.stats.timeouts.fetch_add(expired, Ordering::Relaxed);
        st.slots.retain(|_, s| !s.removable());
        let later: Vec<u64> = st.later.drain(..).collect();
        st.queue.extend(later);
        self.expire(&mut st, now);
        if stalled.is_some() {
            self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
        stalled
    }

    /// (state, requests in flight, last error) for status.
    pub(crate) fn snapshot(&self) -> (&'static str, usize, Option<String>) {
        let st = self.lock();
        let state = match st.phase {
            Phase::Up => "up",
            Phase::Connecting if st.gen == 0 => "connecting",
            Phase::Connecting => "reconnecting",
            Phase::Failed => "failed",
        };
        let inflight = st.slots.values().filter(|s| !s.gone).count();
        (state, inflight, st.last_error.clone())
    }
}

impl Outcomes for Queue {
    type Outcome = IoResult<()>;

    /// Polls a request's outcome.
    fn poll_outcome(&self, cx: &mut Context<'_>, id: u64) -> Poll<IoResult<()>> {
        let mut st = self.lock();
        let Some(s) = st.slots.get_mut(&id) else {
            // Only the requester removes a slot it still waits on: cannot happen.
            return Poll::Ready(Err(IoError::eio(format!(
                "{}: request {id} lost",
                self.uri
            ))));
        };
        match s.outcome.take() {
            Some(r) => {
                s.gone = true;
                if s.removable() {
                    st.slots.remove(&id);
                }
                Poll::Ready(r)
            }
            None => {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    /// The requester of `id` leaves without its outcome: its buffer is withdrawn; the slot
    /// stays while the command is in flight, so its callback finds it and drops it.
    fn withdraw(&self, id: u64) {
        let mut st = self.lock();
        if let Some(s) = st.slots.get_mut(&id) {
            s.gone = true;
            s.dst = None;
            s.waker = None;
            if s.removable() {
                st.slots.remove(&id);
            }
        }
    }
}

fn kick(st: &mut State) {
    st.kicked = true;
    if let Some(w) = &st.thread {
        w.wake_by_ref();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::uri::NetUri;
    use std::task::Waker;
    use std::time::Duration;

    fn queue(opts: &str) -> Queue {
        let NetUri::Iscsi(u) = NetUri::parse(&format!("iscsi://h/iqn.x/1{opts}")).unwrap() else {
            panic!()
        };
        Queue::new(Arc::new(u))
    }

    fn poll(q: &Queue, id: u64) -> Poll<IoResult<()>> {
        q.poll_outcome(&mut Context::from_waker(Waker::noop()), id)
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    #[test]
    fn read_data_reaches_only_a_buffer_still_lent() {
        let q = queue("");
        q.up();
        let mut buf = [0u8; 4];
        let id = q
            .submit(Cmd::Read, 8, 1, Some(DstBuf::new(&mut buf)), far())
            .unwrap();
        assert_eq!(q.take_queue().len(), 1);
        assert!(poll(&q, id).is_pending());
        assert!(q.complete(id, Verdict::Good, Some(&[1, 2, 3, 4])));
        assert!(matches!(poll(&q, id), Poll::Ready(Ok(()))));
        assert_eq!(buf, [1, 2, 3, 4]);

        // Withdrawn while in flight: the reply is dropped, the memory untouched.
        let mut gone = [0u8; 4];
        let id = q
            .submit(Cmd::Read, 8, 1, Some(DstBuf::new(&mut gone)), far())
            .unwrap();
        assert_eq!(q.take_queue().len(), 1);
        q.withdraw(id);
        assert!(q.complete(id, Verdict::Good, Some(&[9, 9, 9, 9])));
        assert_eq!(gone, [0u8; 4]);
        assert_eq!(q.snapshot().1, 0, "the slot is gone");

        // A reply of the wrong length is an error, and nothing is copied.
        let mut short = [0u8; 4];
        let id = q
            .submit(Cmd::Read, 8, 1, Some(DstBuf::new(&mut short)), far())
            .unwrap();
        q.take_queue();
        q.complete(id, Verdict::Good, Some(&[7, 7]));
        let Poll::Ready(Err(e)) = poll(&q, id) else {
            panic!()
        };
        assert_eq!(e.errno, libc::EIO);
        assert!(
            e.msg.contains("LUN 1: read at LBA 8 (1 blocks)") && e.msg.contains("2 bytes"),
            "{e}"
        );
        assert_eq!(short, [0u8; 4]);
    }

    #[test]
    fn a_broken_session_resends_then_fails_past_reconnect_delay() {
        let q = queue("?reconnect-delay=0.2");
        q.up();
        let data: Arc<[u8]> = Arc::from(&[5u8; 512][..]);
        let w = Cmd::Write { fua: false, data };
        let id = q.submit(w, 0, 1, None, far()).unwrap();
        assert_eq!(q.take_queue().len(), 1);
        // The session breaks: the command comes back for the next one.
        assert!(!q.complete(id, Verdict::Reconnect("cancelled".into()), None));
        q.down("the target closed the connection");
        assert_eq!(q.snapshot().0, "reconnecting");
        assert!(
            q.take_queue().is_empty(),
            "nothing is issued without a session"
        );
        q.up();
        let again = q.take_queue();
        assert_eq!(again.iter().map(|r| r.id).collect::<Vec<_>>(), vec![id]);
        q.complete(id, Verdict::Good, None);
        assert!(matches!(poll(&q, id), Poll::Ready(Ok(()))));

        // Down again, for longer than reconnect-delay: EIO for the waiting and the new.
        let id = q.submit(Cmd::Flush, 0, 0, None, far()).unwrap();
        q.take_queue();
        q.down("link cut");
        q.tick(Instant::now());
        assert!(poll(&q, id).is_pending(), "within reconnect-delay it waits");
        q.tick(Instant::now() + Duration::from_millis(300));
        let Poll::Ready(Err(e)) = poll(&q, id) else {
            panic!()
        };
        assert_eq!(e.errno, libc::EIO);
        assert!(
            e.msg.contains("no connection") && e.msg.contains("link cut"),
            "{e}"
        );
        assert_eq!(q.snapshot().0, "failed");
        let e = q.submit(Cmd::Flush, 0, 0, None, far()).unwrap_err();
        assert_eq!(e.errno, libc::EIO);
        // A session again: requests flow.
        q.up();
        assert!(q.submit(Cmd::Flush, 0, 0, None, far()).is_ok());
        assert_eq!(q.snapshot().0, "up");
    }

    #[test]
    fn stalls_tear_the_session_down_and_deadlines_end_requests() {
        let q = queue("?timeout=0.05&reconnect-delay=10");
        q.up();
        let t0 = Instant::now();
        let id = q
            .submit(Cmd::Unmap, 64, 8, None, t0 + Duration::from_millis(100))
            .unwrap();
        q.take_queue();
        assert_eq!(q.tick(t0), None);
        let why = q.tick(t0 + Duration::from_millis(80)).expect("a stall");
        assert!(
            why.contains("unmap at LBA 64 (8 blocks)") && why.contains("timeout"),
            "{why}"
        );
        // The connection thread tears the session down; the request waits for the next.
        q.down(&why);
        assert!(poll(&q, id).is_pending());
        q.tick(t0 + Duration::from_millis(200));
        let Poll::Ready(Err(e)) = poll(&q, id) else {
            panic!()
        };
        assert_eq!(e.errno, libc::ETIMEDOUT, "{e}");
        let st = &q.stats;
        assert_eq!(st.dropped.load(Ordering::Relaxed), 1);
        assert!(st.timeouts.load(Ordering::Relaxed) >= 2);
    }

    #[test]
    fn transient_conditions_are_retried_a_bounded_number_of_times() {
        let q = queue("");
        q.up();
        let id = q.submit(Cmd::Flush, 0, 0, None, far()).unwrap();
        for _ in 0..MAX_RETRIES {
            assert_eq!(q.take_queue().len(), 1);
            q.complete(id, Verdict::Retry("UNIT ATTENTION".into()), None);
            assert!(
                q.take_queue().is_empty(),
                "retried at the next tick, not at once"
            );
            q.tick(Instant::now());
        }
        q.take_queue();
        q.complete(id, Verdict::Retry("UNIT ATTENTION".into()), None);
        let Poll::Ready(Err(e)) = poll(&q, id) else {
            panic!()
        };
        assert!(
            e.msg.contains("UNIT ATTENTION") && e.msg.contains("tries"),
            "{e}"
        );
    }
}
