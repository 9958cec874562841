//! The connection thread of an iSCSI extent: it alone owns the libiscsi context (contexts are
//! not thread-safe). It runs an `iort` runtime and waits, with io_uring polls, on the socket
//! for the events libiscsi asks for, on a periodic tick, and on requesters' wake-ups (they
//! wake this runtime, which signals its eventfd). It logs in (and reconnects with backoff),
//! issues queued requests and lets libiscsi read replies, whose callbacks complete them.
//!
//! Reconnection is ours, not libiscsi's (its automatic reconnect is turned off): a broken
//! session is destroyed (libiscsi cancels its commands), a new one logged in after a pause,
//! and every unanswered request sent again, so the rules are the NBD extent's.

use std::ffi::c_int;
use std::future::Future;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use iort::io_uring::{opcode, types};

use super::ffi;
use super::queue::Queue;
use super::scsi::{self, LunInfo};
use super::secret::Secret;
use super::session::{take_lost, Session};
use crate::net::uri::IscsiUri;

const POLLIN: c_int = libc::POLLIN as c_int;
const POLLOUT: c_int = libc::POLLOUT as c_int;

/// Runs the extent's connection until its queue is stopped. The first login's result (the
/// LUN's geometry, or why it failed) goes to `first`; a failed first login ends the thread.
pub(crate) fn run(q: Arc<Queue>, secret: Option<Secret>, first: Sender<Result<LunInfo, String>>) {
    let rt = match iort::Runtime::new(64) {
        Ok(rt) => rt,
        Err(e) => {
            let _ = first.send(Err(format!(
                "cannot create an io_uring for the connection thread: {e}"
            )));
            return;
        }
    };
    rt.block_on(main_loop(&q, secret.as_ref(), first));
}

/// `host:port` as libiscsi takes a portal.
fn portal(u: &IscsiUri) -> String {
    if u.host.contains(':') {
        format!("[{}]:{}", u.host, u.port)
    } else {
        format!("{}:{}", u.host, u.port)
    }
}

async fn main_loop(
    q: &Arc<Queue>,
    secret: Option<&Secret>,
    first: Sender<Result<LunInfo, String>>,
) {
    let tick =
        (q.uri.opts.timeout / 10).clamp(Duration::from_millis(10), Duration::from_millis(250));
    let mut p = Poller::new(tick);
    let mut first = Some(first);
    let mut geometry: Option<LunInfo> = None;
    let mut backoff = Duration::from_millis(50);
    while !q.stopped() {
        take_lost();
        let (mut sess, info) = match attempt(q, secret, geometry.as_ref(), &mut p).await {
            Ok(x) => x,
            Err(why) => {
                if let Some(tx) = first.take() {
                    let _ = tx.send(Err(why));
                    return;
                }
                q.connect_failed(&why);
                pause(q, &mut p, &mut backoff).await;
                continue;
            }
        };
        geometry = Some(info);
        let since = Instant::now();
        q.up();
        if let Some(tx) = first.take() {
            let _ = tx.send(Ok(info));
        }
        let why = serve(q, &mut sess, &mut p).await;
        p.release().await;
        // Destroying the context cancels its commands: their callbacks put them back in
        // the queue for the next session.
        drop(sess);
        take_lost();
        q.down(&why);
        // A session that broke at once is retried with growing pauses, not in a storm.
        if since.elapsed() < Duration::from_secs(2) {
            pause(q, &mut p, &mut backoff).await;
        } else {
            backoff = Duration::from_millis(50);
        }
    }
    p.release().await;
}

/// One login: a new session, logged in, showing the LUN `geometry` says (if known); on
/// failure the session is already gone.
async fn attempt(
    q: &Queue,
    secret: Option<&Secret>,
    geometry: Option<&LunInfo>,
    p: &mut Poller,
) -> Result<(Session, LunInfo), String> {
    let mut sess = Session::new(&q.uri, secret)?;
    let r = login(q, &mut sess, p)
        .await
        .and_then(|info| match geometry {
            Some(g) => compatible(g, &info).map(|()| info),
            None => Ok(info),
        });
    match r {
        Ok(info) => Ok((sess, info)),
        Err(why) => {
            p.release().await;
            drop(sess);
            take_lost();
            Err(why)
        }
    }
}

/// Sleeps for the backoff (ticking the queue meanwhile, so deadlines and reconnect-delay are
/// kept) and doubles it up to 2 s.
async fn pause(q: &Queue, p: &mut Poller, backoff: &mut Duration) {
    let until = Instant::now() + *backoff;
    while !q.stopped() && Instant::now() < until {
        let w = p.wait(q, None).await;
        if w.tick {
            q.tick(Instant::now());
        }
    }
    *backoff = (*backoff * 2).min(Duration::from_secs(2));
}

/// A new session must show the LUN the first one did.
fn compatible(a: &LunInfo, b: &LunInfo) -> Result<(), String> {
    if (a.blocks, a.block_size) != (b.blocks, b.block_size) {
        return Err(format!(
            "the LUN is now {} blocks of {} bytes, it was {} blocks of {} bytes: not \
             reconnecting to a different disk",
            b.blocks, b.block_size, a.blocks, a.block_size
        ));
    }
    Ok(())
}

/// Drives the library until `done` says so, the connect-timeout passes or the socket fails.
async fn drive(
    q: &Queue,
    s: &mut Session,
    p: &mut Poller,
    deadline: Instant,
    what: &str,
    mut done: impl FnMut(&Session) -> bool,
) -> Result<(), String> {
    while !done(s) {
        if q.stopped() {
            return Err("stopped".into());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{what}: no answer within the connect-timeout ({:.1} s)",
                q.uri.opts.connect_timeout.as_secs_f64()
            ));
        }
        let w = p.wait(q, Some(s)).await;
        if w.tick {
            q.tick(Instant::now());
        }
        // A failing service call may also have ended what we wait for (a refused
        // connection completes the login with an error): that outcome says more.
        if w.revents != 0 && s.service(w.revents) < 0 && !done(s) {
            return Err(format!("{what}: {}", s.error()));
        }
    }
    Ok(())
}

/// Connects, logs in and reads the LUN's geometry and abilities, within connect-timeout.
async fn login(q: &Queue, s: &mut Session, p: &mut Poller) -> Result<LunInfo, String> {
    let deadline = Instant::now() + q.uri.opts.connect_timeout;
    let portal = portal(&q.uri);
    s.start_login(&portal)?;
    drive(q, s, p, deadline, "login", |s| s.login_status().is_some()).await?;
    match s.login_status() {
        Some((ffi::SCSI_STATUS_GOOD, _)) => {}
        Some((_, why)) => {
            return Err(format!(
                "login to {} on {portal} failed: {why}",
                q.uri.target
            ))
        }
        None => return Err(format!("login to {} on {portal}: no result", q.uri.target)),
    }
    let cap = probe(q, s, p, deadline, None, true).await?;
    let (blocks, bs, phys_exp, lbpme) = scsi::parse_capacity16(&cap)?;
    if bs != 512 && bs != 4096 {
        return Err(format!(
            "LUN {} has {bs}-byte blocks: only 512 and 4096 are supported",
            q.uri.lun
        ));
    }
    s.set_block_size(bs);
    let mut info = LunInfo {
        block_size: bs,
        blocks,
        phys_exp,
        ..LunInfo::default()
    };
    // VPD pages are optional: a LUN without them gets plain reads and writes.
    let pages = match probe(q, s, p, deadline, Some(0), false).await {
        Ok(d) => scsi::parse_supported_pages(&d),
        Err(_) => Vec::new(),
    };
    if pages.contains(&0xb0) {
        if let Ok(d) = probe(q, s, p, deadline, Some(0xb0), false).await {
            scsi::parse_block_limits(&d, &mut info);
        }
    }
    if pages.contains(&0xb2) {
        if let Ok(d) = probe(q, s, p, deadline, Some(0xb2), false).await {
            scsi::parse_provisioning(&d, lbpme, &mut info);
        }
    }
    Ok(info)
}

/// One INQUIRY (VPD `page`) or READ CAPACITY(16) (`capacity`), waited for.
async fn probe(
    q: &Queue,
    s: &mut Session,
    p: &mut Poller,
    deadline: Instant,
    page: Option<u8>,
    capacity: bool,
) -> Result<Vec<u8>, String> {
    let what = match (page, capacity) {
        (_, true) => "READ CAPACITY(16)".to_string(),
        (Some(pg), false) => format!("INQUIRY VPD page {pg:#04x}"),
        (None, false) => "INQUIRY".to_string(),
    };
    s.start_probe(page, capacity)
        .map_err(|e| format!("{what}: {e}"))?;
    let mut got = None;
    drive(q, s, p, deadline, &what, |s| {
        got = s.take_probe();
        got.is_some()
    })
    .await?;
    let Some((status, key, ascq, data)) = got else {
        return Err(format!("{what}: no result"));
    };
    match scsi::verdict(status, key, ascq) {
        scsi::Verdict::Good => Ok(data),
        scsi::Verdict::Fail(_, why) | scsi::Verdict::Retry(why) | scsi::Verdict::Reconnect(why) => {
            Err(format!("{what}: {why}"))
        }
    }
}

/// Why a session broke, in words (libiscsi sets no error when the target closes).
fn why_lost(s: &Session) -> String {
    let e = s.error();
    if e.contains("Can not reconnect right now") || e.contains("unknown libiscsi error") {
        "the target closed the connection".into()
    } else {
        e
    }
}

/// Issues requests and services the socket until the session breaks or stalls; returns why.
async fn serve(q: &Arc<Queue>, s: &mut Session, p: &mut Poller) -> String {
    loop {
        if q.stopped() {
            return "stopped".into();
        }
        for r in q.take_queue() {
            let what = q.what(&r.cmd, r.lba, r.blocks);
            if let Err(e) = s.issue(q, r) {
                return format!("{what}: cannot issue: {e}");
            }
        }
        // Send what was just queued now rather than after a poll round trip.
        if s.which_events() & POLLOUT != 0 && s.service(POLLOUT) < 0 {
            return why_lost(s);
        }
        if take_lost() {
            return why_lost(s);
        }
        let w = p.wait(q, Some(s)).await;
        if w.revents != 0 {
            if s.service(w.revents) < 0 {
                return why_lost(s);
            }
            if take_lost() || w.revents & c_int::from(libc::POLLERR | libc::POLLHUP) != 0 {
                return why_lost(s);
            }
        }
        if w.tick {
            if let Some(why) = q.tick(Instant::now()) {
                return why;
            }
        }
    }
}

/// What woke the thread.
#[derive(Default)]
struct Woke {
    /// Poll events on the socket.
    revents: c_int,
    /// The tick passed.
    tick: bool,
}

/// The thread's waits: poll operations on (a duplicate of) the session's socket, one for
/// reading and one for writing, and a periodic timeout. They stay armed across waits (an
/// io_uring operation cannot be abandoned: dropping one waits for it), and are ended by
/// shutting the socket down before a session is destroyed.
struct Poller {
    /// Our duplicate of the library's socket: the polls use it, so they never see a
    /// descriptor number the library closed and reused.
    sock: Option<OwnedFd>,
    /// The library's descriptor it duplicates.
    lib_fd: c_int,
    rd: Option<iort::Op>,
    wr: Option<iort::Op>,
    tick: Option<Pin<Box<dyn Future<Output = ()>>>>,
    period: Duration,
}

impl Poller {
    fn new(period: Duration) -> Poller {
        Poller {
            sock: None,
            lib_fd: -1,
            rd: None,
            wr: None,
            tick: None,
            period,
        }
    }

    fn arm(&self, mask: c_int) -> Option<iort::Op> {
        let fd = self.sock.as_ref()?.as_raw_fd();
        let sqe = opcode::PollAdd::new(types::Fd(fd), mask as u32).build();
        // SAFETY: the SQE names no memory; the descriptor is our duplicate, kept open until
        // the operation completes (`release` waits for it before closing).
        Some(unsafe { iort::submit(sqe) })
    }

    /// Waits until the session's socket is ready for what the library wants, the tick
    /// passes, or a requester wakes the thread.
    async fn wait(&mut self, q: &Queue, s: Option<&Session>) -> Woke {
        if let Some(s) = s {
            let fd = s.fd();
            if fd != self.lib_fd {
                self.release().await;
                if fd >= 0 {
                    // SAFETY: dup of a descriptor the library holds open; the result is ours.
                    let d = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
                    if d >= 0 {
                        // SAFETY: `d` is a new descriptor nothing else owns.
                        self.sock = Some(unsafe { OwnedFd::from_raw_fd(d) });
                        self.lib_fd = fd;
                    }
                }
            }
            let ev = s.which_events();
            if ev & POLLIN != 0 && self.rd.is_none() {
                self.rd = self.arm(POLLIN);
            }
            if ev & POLLOUT != 0 && self.wr.is_none() {
                self.wr = self.arm(POLLOUT);
            }
        }
        if self.tick.is_none() {
            self.tick = Some(Box::pin(iort::sleep(self.period)));
        }
        std::future::poll_fn(|cx| {
            let mut w = Woke::default();
            for op in [&mut self.rd, &mut self.wr] {
                if let Some(o) = op.as_mut() {
                    if let Poll::Ready(r) = Pin::new(o).poll(cx) {
                        *op = None;
                        w.revents |= if r < 0 { c_int::from(libc::POLLERR) } else { r };
                    }
                }
            }
            if let Some(t) = self.tick.as_mut() {
                if t.as_mut().poll(cx).is_ready() {
                    self.tick = None;
                    w.tick = true;
                }
            }
            let kicked = q.take_kick(cx.waker());
            if w.revents != 0 || w.tick || kicked {
                Poll::Ready(w)
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// Shuts the socket down so the pending polls end, waits for them, and closes our
    /// duplicate. Called before a session is destroyed.
    async fn release(&mut self) {
        if let Some(s) = &self.sock {
            // SAFETY: plain syscall on a descriptor we own.
            unsafe { libc::shutdown(s.as_raw_fd(), libc::SHUT_RDWR) };
        }
        if let Some(op) = self.rd.take() {
            op.await;
        }
        if let Some(op) = self.wr.take() {
            op.await;
        }
        self.sock = None;
        self.lib_fd = -1;
    }
}
