//! The transmission phase of one connection.
//!
//! The connection's task is the reader: it decodes request headers (and write payloads) and
//! starts one local task per request, so requests run concurrently on the device. Replies go
//! through a queue to one writer task, which sends everything queued with a single
//! `sendmsg` (reply header and read data together, several replies per call when the
//! client pipelines). At most [`crate::Limits::max_requests_per_connection`] requests and
//! [`crate::Limits::max_bytes_per_connection`] of buffers are outstanding per connection
//! (queued replies included), and every payload buffer is first taken from the server's
//! memory budget; past either the reader stops reading and TCP pushes back on the client.
//! Device calls run under `catch_unwind`: a target that panics fails that request (`EIO`).
//!
//! Big requests (at least 128 KiB) spread over the worker threads so one connection's
//! large transfers use every core: a big read runs round robin on any worker, which also
//! sends its reply (under the connection's send lock, so replies never interleave); a big
//! write's payload is received here and written to the device by another worker. The
//! socket stays owned by this connection, which waits for every such request before
//! closing it.

use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::io;
use std::os::fd::RawFd;
use std::panic::AssertUnwindSafe;
use std::pin::pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};

use futures::channel::oneshot;
use futures::FutureExt;

use tables::io::{BlockDevice, IoError, IoResult, WriteFlags};
use tables::units::Bytes;
use tables::DeviceRef;

use crate::proto::*;
use crate::server::{ConnEntry, Job, Shared};
use crate::sock::{send_vectored_all, shutdown, RecvBuf};
use tables::buf::AlignedBuf;

/// Largest read or write payload (also advertised as the maximum block size).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Default of [`crate::Limits::max_requests_per_connection`].
pub const MAX_INFLIGHT: usize = 64;
/// Default of [`crate::Limits::max_bytes_per_connection`].
pub const MAX_INFLIGHT_BYTES: usize = 64 << 20;
/// Oversized write payloads up to this size are read and dropped to keep the stream in
/// sync; beyond it the connection is closed (after the error reply is sent).
const MAX_SKIP: u32 = 64 << 20;
/// Idle buffers kept per worker thread for reuse (shared by its connections, so idle
/// connections pin no memory); the server lowers it to a share of its memory budget.
const POOL_BYTES: usize = 64 << 20;
const POOL_COUNT: usize = 256;
/// Reads and writes at least this large are spread over the worker threads.
const OFFLOAD_MIN: usize = 128 << 10;

/// The size of the buffer a payload of `len` bytes gets, which is also what it costs in
/// the memory budget: a power of two of at least a page, so buffers are reusable for
/// nearby sizes and a reused buffer is never bigger than what was paid for.
pub(crate) fn buf_size(len: usize) -> usize {
    len.max(4096).next_power_of_two()
}

/// Reusable payload buffers of one worker thread.
struct Pool {
    bufs: Vec<AlignedBuf>,
    bytes: usize,
    limit: usize,
}

impl Default for Pool {
    fn default() -> Pool {
        Pool {
            bufs: Vec::new(),
            bytes: 0,
            limit: POOL_BYTES,
        }
    }
}

impl Pool {
    /// A pooled buffer of exactly [`buf_size`]`(len)` bytes, or a new one (`ENOMEM` if the
    /// allocation fails: the budget bounds what is asked, so that is the machine's memory).
    fn take(&mut self, len: usize) -> IoResult<AlignedBuf> {
        let size = buf_size(len);
        match self.bufs.iter().position(|b| b.len() == size) {
            Some(i) => {
                let b = self.bufs.swap_remove(i);
                self.bytes -= b.len();
                Ok(b)
            }
            None => AlignedBuf::page_aligned(size),
        }
    }

    fn put(&mut self, b: AlignedBuf) {
        if self.bufs.len() < POOL_COUNT && self.bytes + b.len() <= self.limit {
            self.bytes += b.len();
            self.bufs.push(b);
        }
    }
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
}

/// Caps this worker thread's idle buffer pool at `bytes` (at most the built-in maximum).
pub(crate) fn set_pool_limit(bytes: usize) {
    POOL.with(|p| p.borrow_mut().limit = bytes.min(POOL_BYTES));
}

/// Runs a device call; a panic in the target becomes an `EIO` for this request only.
async fn caught(
    export: &str,
    op: &str,
    offset: u64,
    len: usize,
    f: impl Future<Output = IoResult>,
) -> IoResult {
    match AssertUnwindSafe(f).catch_unwind().await {
        Ok(r) => r,
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".into());
            log::error!(
                "nbd: export '{export}': target panicked in {op} at byte {offset} length \
                 {len}: {what}; failing the request"
            );
            Err(IoError::eio(format!(
                "export '{export}': target panicked in {op} at byte {offset}"
            )))
        }
    }
}

/// What transmission needs to know about the export.
pub(crate) struct ExportView {
    pub(crate) name: String,
    pub(crate) dev: DeviceRef,
    pub(crate) size: u64,
    pub(crate) read_only: bool,
    pub(crate) discard: bool,
    pub(crate) native_zeroes: bool,
    pub(crate) native_fua: bool,
    pub(crate) max_io: usize,
}

struct Reply {
    hdr: ReplyHdr,
    data: Option<AlignedBuf>,
    data_len: usize,
    cost: usize,
}

#[derive(Default)]
struct State {
    queue: Vec<Reply>,
    inflight: usize,
    inflight_bytes: usize,
    reader: Option<Waker>,
    writer: Option<Waker>,
    /// A send failed: replies are dropped from now on.
    broken: bool,
    /// The reader is done: the writer exits once nothing is in flight.
    closing: bool,
    writer_done: bool,
}

struct Conn {
    fd: RawFd,
    ex: ExportView,
    st: RefCell<State>,
    shared: Arc<Shared>,
    /// This connection in the server's registry: progress clock and kill switch.
    entry: Arc<ConnEntry>,
    /// Budget bytes this connection holds from the probation share (given back first).
    probation_held: Cell<usize>,
    /// The worker this connection lives on.
    home: usize,
    /// Whether the client negotiated structured replies (used for reads).
    structured: bool,
    /// Serialises whole replies on the socket (the writer task and offloaded reads).
    send_lock: Arc<futures::lock::Mutex<()>>,
}

fn wake(w: &mut Option<Waker>) {
    if let Some(w) = w.take() {
        w.wake();
    }
}

impl Conn {
    /// Why the reader must stop, if it must: a failed send or the supervisor's kill.
    fn stopped(&self, st: &State) -> Option<io::Error> {
        if st.broken {
            Some(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "sending replies failed",
            ))
        } else if self.entry.is_killed() {
            Some(io::Error::new(
                io::ErrorKind::TimedOut,
                "closed by the server (timeout or memory pressure)",
            ))
        } else {
            None
        }
    }

    /// Waits for room for one more request costing `cost` bytes of buffer: first on this
    /// connection, then in the server's memory budget (connections on probation, with no
    /// reply delivered yet or a stalled send, draw from its smaller share).
    async fn acquire(&self, cost: usize) -> io::Result<()> {
        let sh = &self.shared;
        poll_fn(|cx| {
            let mut st = self.st.borrow_mut();
            if let Some(e) = self.stopped(&st) {
                return Poll::Ready(Err(e));
            }
            let fits = st.inflight == 0
                || st.inflight_bytes.saturating_add(cost) <= sh.max_bytes_per_connection;
            if st.inflight < sh.max_requests_per_connection && fits {
                st.inflight += 1;
                st.inflight_bytes += cost;
                self.entry.watch.add_inflight(1);
                Poll::Ready(Ok(()))
            } else {
                st.reader = Some(cx.waker().clone());
                self.entry.park(cx.waker());
                Poll::Pending
            }
        })
        .await?;
        if cost == 0 {
            return Ok(());
        }
        let probation = self.entry.watch.on_probation();
        let mut grant = pin!(self.shared.budget.acquire(cost, probation));
        let r = poll_fn(|cx| {
            if let Some(e) = self.stopped(&self.st.borrow()) {
                return Poll::Ready(Err(e));
            }
            match grant.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Ok(())),
                Poll::Pending => {
                    // Woken by a grant, the supervisor's kill or a failed send.
                    self.st.borrow_mut().reader = Some(cx.waker().clone());
                    self.entry.park(cx.waker());
                    Poll::Pending
                }
            }
        })
        .await;
        match r {
            Ok(()) => {
                if probation {
                    self.probation_held.set(self.probation_held.get() + cost);
                }
                Ok(())
            }
            Err(e) => {
                // Not granted (or granted and dropped above): only this connection's slot
                // is given back.
                let mut st = self.st.borrow_mut();
                st.inflight -= 1;
                st.inflight_bytes -= cost;
                self.entry.watch.sub_inflight(1);
                wake(&mut st.writer);
                Err(e)
            }
        }
    }

    /// Gives `cost` bytes back to the server's budget.
    fn unbudget(&self, cost: usize) {
        if cost == 0 {
            return;
        }
        let probation = self.probation_held.get().min(cost);
        self.probation_held
            .set(self.probation_held.get() - probation);
        self.shared.budget.release(cost, probation);
    }

    /// Marks the connection failed: replies are dropped, the reader is unblocked.
    fn broken(&self, e: &io::Error) {
        log::debug!("nbd: export '{}': sending replies: {e}", self.ex.name);
        self.st.borrow_mut().broken = true;
        shutdown(self.fd, libc::SHUT_RDWR);
    }

    /// Gives back a slot whose reply was sent elsewhere or will never be.
    fn release(&self, cost: usize) {
        let mut st = self.st.borrow_mut();
        st.inflight -= 1;
        st.inflight_bytes -= cost;
        self.entry.watch.sub_inflight(1);
        wake(&mut st.reader);
        wake(&mut st.writer);
        drop(st);
        self.unbudget(cost);
    }

    /// A buffer of at least `len` bytes, from this worker's pool when one fits.
    fn take_buf(&self, len: usize) -> IoResult<AlignedBuf> {
        POOL.with(|p| p.borrow_mut().take(len))
    }

    fn put_buf(&self, b: AlignedBuf) {
        POOL.with(|p| p.borrow_mut().put(b));
    }

    /// The header of a successful reply to `req`.
    fn hdr_ok(&self, req: &Request) -> ReplyHdr {
        if self.structured && req.kind == CMD_READ {
            ReplyHdr::read_data(req.cookie, req.offset, req.len)
        } else {
            ReplyHdr::simple(0, req.cookie)
        }
    }

    /// The header of an error reply to `req` (reads need an error chunk once structured
    /// replies are on; everything else may always use a simple reply).
    fn hdr_err(&self, req: &Request, error: u32) -> ReplyHdr {
        if self.structured && req.kind == CMD_READ {
            ReplyHdr::structured_error(error, req.cookie)
        } else {
            ReplyHdr::simple(error, req.cookie)
        }
    }

    fn reply(&self, hdr: ReplyHdr, data: Option<(AlignedBuf, usize)>, cost: usize) {
        let (data, data_len) = match data {
            Some((b, n)) => (Some(b), n),
            None => (None, 0),
        };
        let mut st = self.st.borrow_mut();
        st.queue.push(Reply {
            hdr,
            data,
            data_len,
            cost,
        });
        wake(&mut st.writer);
    }

    fn fail(&self, op: &str, req: &Request, e: &IoError, cost: usize) {
        log::warn!(
            "nbd: export '{}': {op} at byte {} length {}: {e}",
            self.ex.name,
            req.offset,
            req.len
        );
        self.reply(self.hdr_err(req, nbd_errno(e.errno)), None, cost);
    }

    fn in_range(&self, req: &Request) -> bool {
        matches!(req.offset.checked_add(req.len as u64), Some(end) if end <= self.ex.size)
    }

    /// Checks a request before it reaches the device; `Some(error)` rejects it.
    fn validate(&self, req: &Request) -> Option<u32> {
        let allowed = match req.kind {
            CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            _ => CMD_FLAG_FUA,
        };
        if req.flags & !allowed != 0 {
            return Some(EINVAL);
        }
        let writes = matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
        if writes && self.ex.read_only {
            return Some(EPERM);
        }
        match req.kind {
            CMD_READ if req.len > MAX_PAYLOAD => Some(EOVERFLOW),
            CMD_WRITE if req.len > MAX_PAYLOAD => Some(EOVERFLOW),
            CMD_READ | CMD_TRIM if !self.in_range(req) => Some(EINVAL),
            CMD_WRITE | CMD_WRITE_ZEROES if !self.in_range(req) => Some(ENOSPC),
            CMD_TRIM if !self.ex.discard => Some(EINVAL),
            CMD_WRITE_ZEROES if req.flags & CMD_FLAG_FAST_ZERO != 0 && !self.ex.native_zeroes => {
                Some(ENOTSUP)
            }
            _ => None,
        }
    }
}

/// Runs transmission until the client disconnects or breaks the protocol; every request
/// read before that is answered first.
pub(crate) async fn transmit(
    fd: RawFd,
    ex: ExportView,
    shared: Arc<Shared>,
    entry: Arc<ConnEntry>,
    home: usize,
    structured: bool,
    mut rb: RecvBuf,
) -> io::Result<()> {
    let conn = Rc::new(Conn {
        fd,
        ex,
        st: RefCell::new(State::default()),
        shared,
        entry,
        probation_held: Cell::new(0),
        home,
        structured,
        send_lock: Arc::new(futures::lock::Mutex::new(())),
    });
    iort::spawn(writer(conn.clone())).map_err(io::Error::other)?;
    // A bug of ours in the reader must not leave the writer and the request tasks behind
    // with a closed descriptor: treat a panic as a protocol error and wind down as usual.
    // SAFETY: `rb` belongs to this future and the reader is awaited here: completed or
    // dropped before `rb` goes, and a leaked future leaks `rb` with it.
    let res = match AssertUnwindSafe(unsafe { reader(&conn, &mut rb) })
        .catch_unwind()
        .await
    {
        Ok(r) => r,
        Err(_) => Err(io::Error::other("the request reader panicked")),
    };
    {
        let mut st = conn.st.borrow_mut();
        st.closing = true;
        wake(&mut st.writer);
    }
    poll_fn(|cx| {
        let mut st = conn.st.borrow_mut();
        if st.writer_done {
            Poll::Ready(())
        } else {
            st.reader = Some(cx.waker().clone());
            Poll::Pending
        }
    })
    .await;
    res
}

/// Reads requests until the client leaves; the request buffers it fills are its own until
/// it hands them to a request task.
///
/// # Safety
/// The kernel receives into `rb`: keep the
/// [lending contract](tables::io#the-lending-contract) for the returned future.
async unsafe fn reader(conn: &Rc<Conn>, rb: &mut RecvBuf) -> io::Result<()> {
    loop {
        let mut hdr = [0u8; REQUEST_LEN];
        match rb.read_exact(&mut hdr).await {
            Ok(()) => {}
            // The client left between requests (or shutdown closed our side): a clean end.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let Some(req) = Request::parse(&hdr) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad request magic {:#x}", be32(&hdr[0..4])),
            ));
        };
        match req.kind {
            CMD_DISC => return Ok(()),
            CMD_WRITE => {
                let len = req.len as usize;
                let err = conn.validate(&req);
                if req.len > MAX_PAYLOAD {
                    conn.acquire(0).await?;
                    conn.reply(conn.hdr_err(&req, err.unwrap_or(EOVERFLOW)), None, 0);
                    if req.len > MAX_SKIP {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("write of {} bytes is too large to skip", req.len),
                        ));
                    }
                    rb.skip(req.len as u64).await?;
                    continue;
                }
                let cost = buf_size(len);
                conn.acquire(cost).await?;
                let mut buf = match conn.take_buf(len) {
                    Ok(b) => b,
                    Err(e) => {
                        conn.release(cost);
                        return Err(io::Error::from_raw_os_error(e.errno));
                    }
                };
                let watch = &conn.entry.watch;
                watch.payload(true);
                let r = rb.read_exact(&mut buf[..len]).await;
                watch.payload(false);
                if let Err(e) = r {
                    conn.put_buf(buf);
                    conn.release(cost);
                    return Err(e);
                }
                match err {
                    Some(code) => {
                        conn.put_buf(buf);
                        conn.reply(conn.hdr_err(&req, code), None, cost);
                    }
                    None => start_write(conn, req, buf)?,
                }
            }
            CMD_READ => match conn.validate(&req) {
                Some(code) => {
                    conn.acquire(0).await?;
                    conn.reply(conn.hdr_err(&req, code), None, 0);
                }
                None => {
                    conn.acquire(buf_size(req.len as usize)).await?;
                    start_read(conn, req)?;
                }
            },
            CMD_FLUSH | CMD_TRIM | CMD_WRITE_ZEROES => {
                conn.acquire(0).await?;
                match conn.validate(&req) {
                    Some(code) => conn.reply(conn.hdr_err(&req, code), None, 0),
                    None => spawn(do_other(conn.clone(), req))?,
                }
            }
            _ => {
                conn.acquire(0).await?;
                conn.reply(conn.hdr_err(&req, EINVAL), None, 0);
            }
        }
    }
}

fn spawn(f: impl std::future::Future<Output = ()> + 'static) -> io::Result<()> {
    iort::spawn(f).map_err(io::Error::other)
}

/// Device I/O split into `max_io` pieces that run concurrently; a panic in the target is
/// this request's `EIO`.
///
/// # Safety
/// The device may lend `buf` to the kernel: keep the
/// [lending contract](tables::io#the-lending-contract) for the returned future.
async unsafe fn dev_read(
    export: &str,
    dev: &dyn BlockDevice,
    max_io: usize,
    off: u64,
    buf: &mut [u8],
) -> IoResult {
    let len = buf.len();
    caught(export, "read", off, len, async {
        if buf.len() <= max_io {
            return dev.read(Bytes(off), buf).await;
        }
        let futs = buf
            .chunks_mut(max_io)
            .enumerate()
            .map(|(i, c)| dev.read(Bytes(off + (i * max_io) as u64), c))
            .collect();
        iort::try_join_all(futs).await.map(|_| ())
    })
    .await
}

/// A write (split like [`dev_read`]), followed by a flush when FUA is asked for and the
/// device does not make FUA writes durable by itself.
///
/// # Safety
/// As [`dev_read`].
async unsafe fn dev_write(
    export: &str,
    dev: &dyn BlockDevice,
    max_io: usize,
    native_fua: bool,
    req: &Request,
    buf: &[u8],
) -> IoResult {
    let off = req.offset;
    let flags = fua_flags(req);
    caught(export, "write", off, buf.len(), async {
        let r = if buf.len() <= max_io {
            dev.write(Bytes(off), buf, flags).await
        } else {
            let futs = buf
                .chunks(max_io)
                .enumerate()
                .map(|(i, c)| dev.write(Bytes(off + (i * max_io) as u64), c, flags))
                .collect();
            iort::try_join_all(futs).await.map(|_| ())
        };
        if r.is_ok() && flags.fua && !native_fua {
            return dev.flush().await;
        }
        r
    })
    .await
}

/// Another worker for a big write's device I/O, or `None` to run it here (the payload was
/// received here already).
fn offload_target(conn: &Conn, len: usize) -> Option<usize> {
    let n = conn.shared.worker_count();
    if len < OFFLOAD_MIN || n < 2 {
        return None;
    }
    // Round robin over the other workers.
    let w = conn.shared.next_worker() % (n - 1);
    Some(if w >= conn.home { w + 1 } else { w })
}

/// Runs a write `job` on worker `w` (or here, if that worker is gone) and replies from here
/// when the buffer comes back.
fn offload_write(
    conn: &Rc<Conn>,
    w: usize,
    req: Request,
    job: Job,
    rx: oneshot::Receiver<(AlignedBuf, IoResult)>,
) -> io::Result<()> {
    if let Err(job) = conn.shared.send_job(w, job) {
        job();
    }
    let conn = conn.clone();
    spawn(async move {
        let cost = buf_size(req.len as usize);
        match rx.await {
            Ok((buf, r)) => {
                conn.put_buf(buf);
                match r {
                    Ok(()) => conn.reply(conn.hdr_ok(&req), None, cost),
                    Err(e) => conn.fail("write", &req, &e, cost),
                }
            }
            Err(_) => conn.fail(
                "write",
                &req,
                &IoError::eio("worker thread went away"),
                cost,
            ),
        }
    })
}

/// How an offloaded read ended.
enum ReadDone {
    /// Data and reply header went out from the worker that read them.
    Sent,
    /// The device failed: the connection's writer sends the error reply.
    Device(IoError),
    /// The socket failed.
    Send(io::Error),
}

/// Big reads run round robin on every worker, and the worker that read the data also
/// sends it (holding the connection's send lock), so both the device copy and the socket
/// copy of one connection's big reads spread over all cores.
fn start_read(conn: &Rc<Conn>, req: Request) -> io::Result<()> {
    let len = req.len as usize;
    let cost = buf_size(len);
    let n = conn.shared.worker_count();
    if len < OFFLOAD_MIN || n < 2 {
        return spawn(do_read(conn.clone(), req));
    }
    let w = conn.shared.next_worker();
    let (tx, rx) = oneshot::channel();
    let (dev, max_io, fd) = (conn.ex.dev.clone(), conn.ex.max_io, conn.fd);
    let export = conn.ex.name.clone();
    let entry = conn.entry.clone();
    let lock = conn.send_lock.clone();
    let hdr = conn.hdr_ok(&req);
    let mut buf = match conn.take_buf(len) {
        Ok(b) => b,
        Err(e) => {
            conn.fail("read", &req, &e, cost);
            return Ok(());
        }
    };
    let job: Job = Box::new(move || {
        let _ = iort::spawn(async move {
            // SAFETY: `buf` and `hdr` belong to this spawned task, which awaits the read and
            // the send: it completes, or is dropped (dropping them first, which waits for the
            // kernel), or is leaked with them.
            let read = unsafe { dev_read(&export, &*dev, max_io, req.offset, &mut buf[..len]) };
            let done = match read.await {
                Err(e) => ReadDone::Device(e),
                Ok(()) => {
                    let _guard = lock.lock().await;
                    let watch = &entry.watch;
                    let bufs = [hdr.as_bytes(), &buf[..len]];
                    // SAFETY: as for the read above.
                    match unsafe { send_vectored_all(fd, &bufs, watch) }.await {
                        Ok(()) => {
                            watch.replied();
                            ReadDone::Sent
                        }
                        Err(e) => ReadDone::Send(e),
                    }
                }
            };
            let _ = tx.send((buf, done));
        });
    });
    if w == conn.home {
        job();
    } else if let Err(job) = conn.shared.send_job(w, job) {
        job();
    }
    let conn = conn.clone();
    spawn(async move {
        match rx.await {
            Ok((buf, done)) => {
                conn.put_buf(buf);
                match done {
                    ReadDone::Sent => conn.release(cost),
                    ReadDone::Device(e) => conn.fail("read", &req, &e, cost),
                    ReadDone::Send(e) => {
                        conn.broken(&e);
                        conn.release(cost);
                    }
                }
            }
            Err(_) => conn.fail("read", &req, &IoError::eio("worker thread went away"), cost),
        }
    })
}

fn start_write(conn: &Rc<Conn>, req: Request, buf: AlignedBuf) -> io::Result<()> {
    let len = req.len as usize;
    let Some(w) = offload_target(conn, len) else {
        return spawn(do_write(conn.clone(), req, buf));
    };
    let (tx, rx) = oneshot::channel();
    let (dev, max_io, native_fua) = (conn.ex.dev.clone(), conn.ex.max_io, conn.ex.native_fua);
    let export = conn.ex.name.clone();
    let job: Job = Box::new(move || {
        let _ = iort::spawn(async move {
            // SAFETY: `buf` belongs to this spawned task and the write is awaited in it: the
            // task completes, or is dropped (dropping this first, which waits for the
            // kernel), or is leaked with `buf`.
            let r =
                unsafe { dev_write(&export, &*dev, max_io, native_fua, &req, &buf[..len]) }.await;
            let _ = tx.send((buf, r));
        });
    });
    offload_write(conn, w, req, job, rx)
}

async fn do_read(conn: Rc<Conn>, req: Request) {
    let len = req.len as usize;
    let cost = buf_size(len);
    let mut buf = match conn.take_buf(len) {
        Ok(b) => b,
        Err(e) => return conn.fail("read", &req, &e, cost),
    };
    let ex = &conn.ex;
    // SAFETY: `buf` belongs to this request task, which awaits the read: it completes, or is
    // dropped (dropping the read first, which waits for the kernel), or is leaked with `buf`.
    match unsafe { dev_read(&ex.name, &*ex.dev, ex.max_io, req.offset, &mut buf[..len]) }.await {
        Ok(()) => conn.reply(conn.hdr_ok(&req), Some((buf, len)), cost),
        Err(e) => {
            conn.put_buf(buf);
            conn.fail("read", &req, &e, cost);
        }
    }
}

fn fua_flags(req: &Request) -> WriteFlags {
    WriteFlags {
        fua: req.flags & CMD_FLAG_FUA != 0,
    }
}

async fn do_write(conn: Rc<Conn>, req: Request, buf: AlignedBuf) {
    let len = req.len as usize;
    let ex = &conn.ex;
    // SAFETY: as in `do_read`: `buf` belongs to this request task, which awaits the write.
    let r = unsafe {
        dev_write(
            &ex.name,
            &*ex.dev,
            ex.max_io,
            ex.native_fua,
            &req,
            &buf[..len],
        )
    }
    .await;
    conn.put_buf(buf);
    match r {
        Ok(()) => conn.reply(conn.hdr_ok(&req), None, buf_size(len)),
        Err(e) => conn.fail("write", &req, &e, buf_size(len)),
    }
}

/// FLUSH, TRIM and WRITE_ZEROES: no payload either way.
async fn do_other(conn: Rc<Conn>, req: Request) {
    let ex = &conn.ex;
    let dev = &*ex.dev;
    let flags = fua_flags(&req);
    let (off, len) = (Bytes(req.offset), Bytes(req.len as u64));
    let op = match req.kind {
        CMD_FLUSH => "flush",
        CMD_TRIM => "trim",
        _ => "write-zeroes",
    };
    let r = caught(&ex.name, op, req.offset, req.len as usize, async {
        let mut r = match req.kind {
            CMD_FLUSH => dev.flush().await,
            CMD_TRIM => dev.discard(off, len).await,
            _ => {
                let mut r = dev.write_zeroes(off, len, flags).await;
                let fast = req.flags & CMD_FLAG_FAST_ZERO != 0;
                if matches!(&r, Err(e) if e.errno == libc::EOPNOTSUPP) {
                    r = if fast {
                        Err(IoError::unsupported("fast zeroing is not supported"))
                    } else {
                        tables::io::write_zeroes_by_writing(dev, off, len, flags).await
                    };
                }
                r
            }
        };
        let needs_flush =
            req.kind != CMD_FLUSH && flags.fua && (req.kind == CMD_TRIM || !ex.native_fua);
        if r.is_ok() && needs_flush {
            r = dev.flush().await;
        }
        r
    })
    .await;
    match r {
        Ok(()) => conn.reply(conn.hdr_ok(&req), None, 0),
        Err(e) if req.flags & CMD_FLAG_FAST_ZERO != 0 && e.errno == libc::EOPNOTSUPP => {
            conn.reply(conn.hdr_err(&req, ENOTSUP), None, 0)
        }
        Err(e) => conn.fail(op, &req, &e, 0),
    }
}

/// Sends queued replies, batching whatever accumulated while the last send was in flight.
async fn writer(conn: Rc<Conn>) {
    let mut batch: Vec<Reply> = Vec::new();
    loop {
        let more = poll_fn(|cx| {
            let mut st = conn.st.borrow_mut();
            if !st.queue.is_empty() {
                std::mem::swap(&mut st.queue, &mut batch);
                Poll::Ready(true)
            } else if st.closing && st.inflight == 0 {
                Poll::Ready(false)
            } else {
                st.writer = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
        if !more {
            break;
        }
        let broken = conn.st.borrow().broken;
        if !broken {
            let mut slices: Vec<&[u8]> = Vec::with_capacity(batch.len() * 2);
            for r in &batch {
                slices.push(r.hdr.as_bytes());
                if let Some(d) = &r.data {
                    slices.push(&d[..r.data_len]);
                }
            }
            // Offloaded reads send from other threads: one reply train at a time.
            let guard = conn.send_lock.lock().await;
            // SAFETY: `slices` point into `batch`, which this writer task owns and keeps
            // until the send is over: the task completes, or is dropped (dropping the send
            // first, which waits for the kernel), or is leaked with `batch`.
            let r = unsafe { send_vectored_all(conn.fd, &slices, &conn.entry.watch) }.await;
            drop(guard);
            match r {
                Ok(()) => conn.entry.watch.replied(),
                Err(e) => conn.broken(&e),
            }
        }
        let mut st = conn.st.borrow_mut();
        let (n, mut cost) = (batch.len(), 0usize);
        for r in batch.drain(..) {
            st.inflight -= 1;
            st.inflight_bytes -= r.cost;
            cost += r.cost;
            if let Some(b) = r.data {
                POOL.with(|p| p.borrow_mut().put(b));
            }
        }
        conn.entry.watch.sub_inflight(n);
        wake(&mut st.reader);
        drop(st);
        conn.unbudget(cost);
    }
    let mut st = conn.st.borrow_mut();
    st.writer_done = true;
    wake(&mut st.reader);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_reuses_buffers_of_the_same_size_and_stays_bounded() {
        let mut p = Pool::default();
        let b = p.take(5000).unwrap();
        assert_eq!(b.len(), 8192);
        assert_eq!(buf_size(5000), 8192);
        let ptr = b.as_ptr();
        p.put(b);
        // Same size class: reused.
        assert_eq!(p.take(6000).unwrap().as_ptr(), ptr);
        // A bigger buffer is never handed out: a buffer costs what its size class costs.
        p.put(AlignedBuf::page_aligned(1 << 20).unwrap());
        assert_eq!(p.take(4096).unwrap().len(), 4096);
        for _ in 0..2 * POOL_COUNT {
            p.put(AlignedBuf::page_aligned(1 << 20).unwrap());
        }
        assert!(p.bytes <= POOL_BYTES && p.bufs.len() <= POOL_COUNT);
        p.limit = 3 << 20;
        p.bufs.clear();
        p.bytes = 0;
        for _ in 0..8 {
            p.put(AlignedBuf::page_aligned(1 << 20).unwrap());
        }
        assert_eq!(p.bytes, 3 << 20);
    }
}
