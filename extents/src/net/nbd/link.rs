//! [`Link`]: one NBD connection slot of an extent, re-established over time, and the table of
//! requests waiting on it.
//!
//! Requests are sent by the requester's own future on its own thread's ring (so no request
//! crosses threads on its way out); replies are read by the link's thread
//! ([`super::reader`]), which copies read data into the requester's buffer under the link's
//! lock and wakes the requester. The lock is what makes the cross-thread copy sound: a
//! requester that goes away (its future dropped) takes the same lock to withdraw its buffer,
//! so the reader never writes into memory that is no longer lent to it.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use tables::IoError;

use super::handshake::ExportInfo;
pub(crate) use crate::net::lend::DstBuf;
use crate::net::lend::Outcomes;
use crate::net::uri::NbdUri;

/// Most separate pieces a structured read reply may come in (adjacent pieces merge).
const MAX_PIECES: usize = 4096;

/// How a request ended, as its requester sees it.
pub(crate) enum Outcome {
    /// Answered (data delivered for a read, or the server's error).
    Done(Result<(), IoError>),
    /// The connection it was sent on is gone: send it again.
    Retry,
}

/// One request the link knows of.
struct Slot {
    cmd: u16,
    offset: u64,
    len: u32,
    /// Connection generation it was (or is being) sent on.
    gen: u64,
    /// Sent (or being sent) on the current connection and not finally answered.
    expect_reply: bool,
    sent_at: Instant,
    /// When the requester gives up whatever happens (timeout plus reconnect-delay).
    deadline: Instant,
    /// Where read data goes: present exactly while the requester waits for an outcome.
    dst: Option<DstBuf>,
    /// Byte ranges of the request already covered by structured read chunks.
    covered: Vec<(u64, u64)>,
    /// An error chunk seen before the final one.
    error: Option<IoError>,
    outcome: Option<Outcome>,
    /// The requester has left (taken its outcome or been dropped).
    gone: bool,
    waker: Option<Waker>,
}

impl Slot {
    fn settle(&mut self, o: Outcome) {
        if self.outcome.is_none() && !self.gone {
            self.outcome = Some(o);
            self.dst = None;
            if let Some(w) = self.waker.take() {
                w.wake();
            }
        }
    }

    fn removable(&self) -> bool {
        self.gone && !self.expect_reply
    }
}

/// One connection's socket and, for `nbds://`, its TLS session.
pub(crate) struct Wired {
    pub fd: OwnedFd,
    pub tls: Option<super::tls::Session>,
}

/// Where the link stands.
#[derive(Clone)]
pub(crate) enum Phase {
    /// No connection; the link's thread is (re)connecting.
    Connecting,
    /// Connected: requests go on `fd`.
    Up { fd: Arc<Wired> },
    /// No connection for longer than reconnect-delay: requests fail at once with EIO while the
    /// link's thread keeps trying.
    Failed,
}

struct State {
    phase: Phase,
    /// Bumped at every new connection; requests carry the one they were sent on.
    gen: u64,
    down_since: Option<Instant>,
    pending: HashMap<u64, Slot>,
    next_cookie: u64,
    up_waiters: Vec<Waker>,
    last_error: Option<String>,
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

/// One connection slot of an NBD extent.
pub(crate) struct Link {
    /// Index among the extent's connections (for messages).
    pub idx: usize,
    pub uri: Arc<NbdUri>,
    /// What the first connection negotiated; later connections must agree.
    pub info: ExportInfo,
    st: Mutex<State>,
    /// Held for the whole of one request's send, so requests never interleave on the wire.
    pub send: futures::lock::Mutex<()>,
    stop: AtomicBool,
    pub stats: Stats,
}

impl Link {
    pub(crate) fn new(idx: usize, uri: Arc<NbdUri>, info: ExportInfo) -> Link {
        Link {
            idx,
            uri,
            info,
            st: Mutex::new(State {
                phase: Phase::Connecting,
                gen: 0,
                down_since: Some(Instant::now()),
                pending: HashMap::new(),
                next_cookie: 1,
                up_waiters: Vec::new(),
                last_error: None,
            }),
            send: futures::lock::Mutex::new(()),
            stop: AtomicBool::new(false),
            stats: Stats::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Text for messages: the URI, and which connection when there are several.
    pub(crate) fn label(&self) -> String {
        if self.idx == 0 {
            self.uri.to_string()
        } else {
            format!("{} (connection {})", self.uri, self.idx + 1)
        }
    }

    pub(crate) fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Ends the link: its thread exits after the current step; the socket is shut so a
    /// blocked receive returns.
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let st = self.lock();
        if let Phase::Up { fd } = &st.phase {
            shutdown(&fd.fd);
        }
    }

    /// Waits for a connection; EIO when the link has failed or `deadline` passes first.
    pub(crate) fn poll_up(
        &self,
        cx: &mut Context<'_>,
        deadline: Instant,
    ) -> Poll<Result<(Arc<Wired>, u64), IoError>> {
        let mut st = self.lock();
        let now = Instant::now();
        match &st.phase {
            Phase::Up { fd } => return Poll::Ready(Ok((fd.clone(), st.gen))),
            Phase::Failed => return Poll::Ready(Err(self.down_error(&st, now))),
            Phase::Connecting => {}
        }
        let given_up = st
            .down_since
            .is_some_and(|t| now >= t + self.uri.opts.reconnect_delay);
        if given_up || now >= deadline {
            return Poll::Ready(Err(self.down_error(&st, now)));
        }
        st.up_waiters.push(cx.waker().clone());
        Poll::Pending
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
        IoError::eio(format!("{}: no connection{since}: {why}", self.label()))
    }

    /// Registers a request for the connection `gen`; `None` if that connection is gone.
    pub(crate) fn register(
        &self,
        gen: u64,
        cmd: u16,
        offset: u64,
        len: u32,
        dst: Option<DstBuf>,
        deadline: Instant,
    ) -> Option<u64> {
        let mut st = self.lock();
        if st.gen != gen || !matches!(st.phase, Phase::Up { .. }) {
            return None;
        }
        let cookie = st.next_cookie;
        st.next_cookie = st.next_cookie.wrapping_add(1).max(1);
        st.pending.insert(
            cookie,
            Slot {
                cmd,
                offset,
                len,
                gen,
                expect_reply: false,
                sent_at: Instant::now(),
                deadline,
                dst,
                covered: Vec::new(),
                error: None,
                outcome: None,
                gone: false,
                waker: None,
            },
        );
        Some(cookie)
    }

    /// Marks `cookie` as going onto the wire; false if its connection went away meanwhile
    /// (then it is settled as [`Outcome::Retry`] and must not be sent).
    pub(crate) fn sending(&self, cookie: u64) -> bool {
        let mut st = self.lock();
        let gen = st.gen;
        let up = matches!(st.phase, Phase::Up { .. });
        let Some(s) = st.pending.get_mut(&cookie) else {
            return false;
        };
        if s.gen != gen || !up {
            s.settle(Outcome::Retry);
            return false;
        }
        s.expect_reply = true;
        s.sent_at = Instant::now();
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Makes `fd` the link's connection; wakes everyone waiting for one.
    pub(crate) fn up(&self, fd: Arc<Wired>) -> u64 {
        let mut st = self.lock();
        st.gen += 1;
        st.phase = Phase::Up { fd };
        if st.gen > 1 {
            self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        st.down_since = None;
        for w in st.up_waiters.drain(..) {
            w.wake();
        }
        st.gen
    }

    /// The connection `gen` is finished (`why` says how): the socket is shut, every request
    /// sent on it will be sent again on the next one.
    pub(crate) fn down(&self, gen: u64, why: &str) {
        let mut st = self.lock();
        if st.gen != gen || !matches!(st.phase, Phase::Up { .. }) {
            return;
        }
        if let Phase::Up { fd } = &st.phase {
            shutdown(&fd.fd);
        }
        if !self.stopped() {
            log::warn!("{}: connection lost: {why}", self.label());
        }
        st.phase = Phase::Connecting;
        st.down_since = Some(Instant::now());
        st.last_error = Some(why.to_string());
        for s in st.pending.values_mut() {
            s.expect_reply = false;
            s.settle(Outcome::Retry);
        }
        st.pending.retain(|_, s| !s.removable());
        for w in st.up_waiters.drain(..) {
            w.wake();
        }
    }

    /// A connection attempt failed; past reconnect-delay the link is failed.
    pub(crate) fn connect_failed(&self, why: &str) {
        let mut st = self.lock();
        let now = Instant::now();
        let since = *st.down_since.get_or_insert(now);
        st.last_error = Some(why.to_string());
        if now >= since + self.uri.opts.reconnect_delay && !matches!(st.phase, Phase::Failed) {
            log::error!(
                "{}: no connection for {:.1} s (reconnect-delay): requests fail with EIO until \
                 the server is back: {why}",
                self.label(),
                now.saturating_duration_since(since).as_secs_f64()
            );
            st.phase = Phase::Failed;
        }
        for w in st.up_waiters.drain(..) {
            w.wake();
        }
    }

    /// The connection `gen` misbehaved or stalled: record why and tear it down.
    pub(crate) fn kill(&self, gen: u64, why: &str) {
        self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        self.down(gen, why);
    }

    /// Periodic check (the extent's watchdog): a request unanswered for longer than the
    /// timeout kills its connection; a requester past its deadline gets ETIMEDOUT; waiters for
    /// a connection re-check their deadlines.
    pub(crate) fn tick(&self, now: Instant) {
        let mut stalled = None;
        {
            let mut st = self.lock();
            let gen = st.gen;
            for (cookie, s) in st.pending.iter_mut() {
                if s.expect_reply
                    && now.saturating_duration_since(s.sent_at) > self.uri.opts.timeout
                {
                    stalled = Some((gen, *cookie, s.cmd, s.offset));
                }
                if s.outcome.is_none() && !s.gone && now >= s.deadline {
                    self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                    let msg = format!(
                        "{}: {} at byte {} length {}: no answer within the timeout and \
                         reconnect-delay",
                        self.label(),
                        cmd_name(s.cmd),
                        s.offset,
                        s.len
                    );
                    s.settle(Outcome::Done(Err(IoError::new(libc::ETIMEDOUT, msg))));
                }
            }
            if !matches!(st.phase, Phase::Up { .. }) {
                for w in st.up_waiters.drain(..) {
                    w.wake();
                }
            }
        }
        if let Some((gen, cookie, cmd, off)) = stalled {
            self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
            self.kill(
                gen,
                &format!(
                    "{} at byte {off} (cookie {cookie}) unanswered for over {:.1} s (timeout)",
                    cmd_name(cmd),
                    self.uri.opts.timeout.as_secs_f64()
                ),
            );
        }
    }

    /// What the reader needs to check a reply for `cookie`: (command, offset, length), or
    /// `None` for a cookie with no reply due (a protocol violation).
    pub(crate) fn expected(&self, cookie: u64) -> Option<(u16, u64, u32)> {
        let st = self.lock();
        st.pending
            .get(&cookie)
            .filter(|s| s.expect_reply)
            .map(|s| (s.cmd, s.offset, s.len))
    }

    /// Copies read data for `cookie` at `at` bytes into the request (nothing if the
    /// requester left). Ranges must not overlap earlier chunks, nor scatter into more than
    /// `MAX_PIECES` pieces: false if one does.
    pub(crate) fn deliver(&self, cookie: u64, at: u64, data: Option<&[u8]>, len: u64) -> bool {
        let mut st = self.lock();
        let Some(s) = st.pending.get_mut(&cookie) else {
            return true;
        };
        let end = at.saturating_add(len);
        let i = s.covered.partition_point(|&(a, _)| a < at);
        let overlaps_prev = i > 0 && s.covered[i - 1].1 > at;
        let overlaps_next = s.covered.get(i).is_some_and(|&(a, _)| a < end);
        if overlaps_prev || overlaps_next {
            return false;
        }
        // A server that cuts a read into thousands of scattered pieces is not to be trusted
        // with our memory (the list of pieces would grow without bound).
        if s.covered.len() >= MAX_PIECES {
            return false;
        }
        if i > 0 && s.covered[i - 1].1 == at {
            s.covered[i - 1].1 = end;
        } else {
            s.covered.insert(i, (at, end));
        }
        if let Some(d) = s.dst {
            let (Ok(at), Ok(n)) = (usize::try_from(at), usize::try_from(len)) else {
                return false;
            };
            if at.checked_add(n).is_none_or(|e| e > d.len()) {
                return false;
            }
            let src = data.map(|src| &src[..n.min(src.len())]);
            // SAFETY: `d` is lent by a requester that is still registered (it withdraws `dst`
            // under this lock before its buffer can go); `write_at` checks the range.
            return unsafe { d.write_at(at, src, n) };
        }
        true
    }

    /// Records an error chunk for `cookie` (the first one wins).
    pub(crate) fn note_error(&self, cookie: u64, e: IoError) {
        let mut st = self.lock();
        if let Some(s) = st.pending.get_mut(&cookie) {
            s.error.get_or_insert(e);
        }
    }

    /// The final reply for `cookie` arrived: `result` unless an error chunk came first, and
    /// for reads, an error if the chunks did not cover the whole request.
    pub(crate) fn finish(&self, cookie: u64, result: Result<(), IoError>, started: Instant) {
        let mut st = self.lock();
        let Some(s) = st.pending.get_mut(&cookie) else {
            return;
        };
        s.expect_reply = false;
        let mut r = match s.error.take() {
            Some(e) => Err(e),
            None => result,
        };
        if r.is_ok() && s.cmd == nbd::proto::CMD_READ {
            let got: u64 = s.covered.iter().map(|&(a, b)| b - a).sum();
            if got != u64::from(s.len) {
                r = Err(IoError::eio(format!(
                    "{}: read at byte {} length {}: the server's reply covered {got} bytes",
                    self.label(),
                    s.offset,
                    s.len
                )));
            }
        }
        let rtt = started.saturating_duration_since(s.sent_at);
        let outcome = match r {
            Err(e) if e.errno == libc::ESHUTDOWN => Outcome::Retry,
            r => Outcome::Done(r),
        };
        s.settle(outcome);
        if s.removable() {
            st.pending.remove(&cookie);
        }
        drop(st);
        let us = rtt.as_micros().min(u128::from(u32::MAX)) as u64;
        let old = self.stats.rtt_us.load(Ordering::Relaxed);
        let new = if old == 0 { us } else { (old * 7 + us) / 8 };
        self.stats.rtt_us.store(new, Ordering::Relaxed);
    }

    /// (state, requests in flight, last error) for status.
    pub(crate) fn snapshot(&self) -> (&'static str, usize, Option<String>) {
        let st = self.lock();
        let state = match st.phase {
            Phase::Up { .. } => "up",
            Phase::Connecting if st.gen == 0 => "connecting",
            Phase::Connecting => "reconnecting",
            Phase::Failed => "failed",
        };
        let inflight = st.pending.values().filter(|s| !s.gone).count();
        (state, inflight, st.last_error.clone())
    }

    /// Connections made so far (the generation of the current or last one).
    pub(crate) fn generation(&self) -> u64 {
        self.lock().gen
    }

    /// Whether the link currently has a connection.
    pub(crate) fn is_up(&self) -> bool {
        matches!(self.lock().phase, Phase::Up { .. })
    }

    /// Sends `NBD_CMD_DISC` if the link is idle (a polite goodbye; best effort).
    pub(crate) fn goodbye(&self) {
        let st = self.lock();
        if let Phase::Up { fd } = &st.phase {
            if st.pending.is_empty() {
                let h = super::wire::request_header(nbd::proto::CMD_DISC, 0, 0, 0, 0);
                // SAFETY: a non-blocking send of a stack buffer that outlives the call.
                unsafe {
                    libc::send(
                        fd.fd.as_raw_fd(),
                        h.as_ptr() as *const libc::c_void,
                        h.len(),
                        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                    );
                }
            }
        }
    }
}

impl Outcomes for Link {
    type Outcome = Outcome;

    /// Polls a request's outcome.
    fn poll_outcome(&self, cx: &mut Context<'_>, cookie: u64) -> Poll<Outcome> {
        let mut st = self.lock();
        let Some(s) = st.pending.get_mut(&cookie) else {
            // Only `take`/drop remove a slot whose requester is still here: cannot happen.
            return Poll::Ready(Outcome::Done(Err(IoError::eio(format!(
                "{}: request {cookie} lost",
                self.label()
            )))));
        };
        match s.outcome.take() {
            Some(o) => {
                s.gone = true;
                if s.removable() {
                    st.pending.remove(&cookie);
                }
                Poll::Ready(o)
            }
            None => {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    /// The requester of `cookie` leaves without its outcome: its buffer is withdrawn; the
    /// slot stays while a reply is still due, so the reader can skip it.
    fn withdraw(&self, cookie: u64) {
        let mut st = self.lock();
        if let Some(s) = st.pending.get_mut(&cookie) {
            s.gone = true;
            s.dst = None;
            s.waker = None;
            if s.removable() {
                st.pending.remove(&cookie);
            }
        }
    }
}

/// `shutdown(2)` both ways: a receive blocked on the socket returns, sends fail.
pub(crate) fn shutdown(fd: &OwnedFd) {
    // SAFETY: plain syscall on a descriptor `fd` keeps open.
    unsafe {
        libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR);
    }
}

/// The command's name for messages.
pub(crate) fn cmd_name(cmd: u16) -> &'static str {
    use nbd::proto::*;
    match cmd {
        CMD_READ => "read",
        CMD_WRITE => "write",
        CMD_FLUSH => "flush",
        CMD_TRIM => "trim",
        CMD_WRITE_ZEROES => "write-zeroes",
        CMD_DISC => "disconnect",
        _ => "command",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::uri::NetUri;

    fn link() -> (Link, u64) {
        let NetUri::Nbd(u) = NetUri::parse("nbd://127.0.0.1/x").unwrap() else {
            panic!()
        };
        let info = ExportInfo {
            size: 1 << 20,
            tflags: 1,
            min_block: 1,
            pref_block: 4096,
            max_block: 1 << 20,
            structured: true,
        };
        let l = Link::new(0, Arc::new(u), info);
        let fd: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let gen = l.up(Arc::new(Wired { fd, tls: None }));
        (l, gen)
    }

    #[test]
    fn chunks_land_where_they_say_and_overlaps_and_scatter_are_refused() {
        let (l, gen) = link();
        let mut buf = vec![0u8; 16384];
        let deadline = Instant::now() + std::time::Duration::from_secs(60);
        let c = l
            .register(
                gen,
                nbd::proto::CMD_READ,
                0,
                16384,
                Some(DstBuf::new(&mut buf)),
                deadline,
            )
            .unwrap();
        assert!(l.sending(c));
        assert!(l.deliver(c, 100, Some(&[7u8; 10]), 10));
        assert!(!l.deliver(c, 105, Some(&[8u8; 10]), 10), "overlap accepted");
        assert!(l.deliver(c, 110, None, 5), "adjacent hole refused");
        // One-byte pieces, every other byte from the end: at most MAX_PIECES are taken.
        let mut taken = 0;
        for at in (1000..16384u64).rev().step_by(2) {
            if !l.deliver(c, at, Some(&[9u8]), 1) {
                break;
            }
            taken += 1;
        }
        assert!(taken < MAX_PIECES, "{taken} scattered pieces accepted");
        l.withdraw(c);
        drop(l);
        assert_eq!(&buf[100..110], &[7u8; 10]);
        assert_eq!(&buf[110..115], &[0u8; 5]);
    }
}
