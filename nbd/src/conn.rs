//! The transmission phase of one connection.
//!
//! The connection's task is the reader: it decodes request headers (and write payloads) and
//! starts one local task per request, so requests run concurrently on the device. Replies go
//! through a queue to one writer task, which sends everything queued with a single
//! `sendmsg` (reply header and read data together, several replies per call when the
//! client pipelines). At most [`MAX_INFLIGHT`] requests and [`MAX_INFLIGHT_BYTES`] of
//! buffers are outstanding per connection (queued replies included); past that the reader
//! stops reading and TCP pushes back on the client.
//!
//! Big requests (at least 128 KiB) spread over the worker threads so one connection's
//! large transfers use every core: a big read runs round robin on any worker, which also
//! sends its reply (under the connection's send lock, so replies never interleave); a big
//! write's payload is received here and written to the device by another worker. The
//! socket stays owned by this connection, which waits for every such request before
//! closing it.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};

use futures::channel::oneshot;

use tables::io::{BlockDevice, IoError, IoResult, WriteFlags};
use tables::units::Bytes;
use tables::DeviceRef;

use crate::proto::*;
use crate::server::{Job, Shared};
use crate::sock::{send_vectored_all, shutdown, AlignedBuf, RecvBuf};

/// Largest read or write payload (also advertised as the maximum block size).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Requests outstanding per connection.
pub const MAX_INFLIGHT: usize = 64;
/// Payload buffer bytes outstanding per connection.
pub const MAX_INFLIGHT_BYTES: usize = 64 << 20;
/// Oversized write payloads up to this size are read and dropped to keep the stream in
/// sync; beyond it the connection is closed (after the error reply is sent).
const MAX_SKIP: u32 = 64 << 20;
/// Idle buffers kept per worker thread for reuse (shared by its connections, so idle
/// connections pin no memory).
const POOL_BYTES: usize = 64 << 20;
const POOL_COUNT: usize = 256;
/// Reads and writes at least this large are spread over the worker threads.
const OFFLOAD_MIN: usize = 128 << 10;

/// Reusable payload buffers of one worker thread.
#[derive(Default)]
struct Pool {
    bufs: Vec<AlignedBuf>,
    bytes: usize,
}

impl Pool {
    /// The smallest pooled buffer of at least `len` bytes (and not wastefully larger), or a
    /// new one rounded up to a power of two so it is reusable for nearby sizes.
    fn take(&mut self, len: usize) -> AlignedBuf {
        let limit = (len * 4).max(128 << 10);
        let best = self
            .bufs
            .iter()
            .enumerate()
            .filter(|(_, b)| b.len() >= len && b.len() <= limit)
            .min_by_key(|(_, b)| b.len())
            .map(|(i, _)| i);
        match best {
            Some(i) => {
                let b = self.bufs.swap_remove(i);
                self.bytes -= b.len();
                b
            }
            None => AlignedBuf::new(len.max(4096).next_power_of_two()),
        }
    }

    fn put(&mut self, b: AlignedBuf) {
        if self.bufs.len() < POOL_COUNT && self.bytes + b.len() <= POOL_BYTES {
            self.bytes += b.len();
            self.bufs.push(b);
        }
    }
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
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
    /// Waits for room for one more request costing `cost` bytes of buffer.
    async fn acquire(&self, cost: usize) -> io::Result<()> {
        poll_fn(|cx| {
            let mut st = self.st.borrow_mut();
            if st.broken {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "sending replies failed",
                )));
            }
            let fits = st.inflight == 0 || st.inflight_bytes + cost <= MAX_INFLIGHT_BYTES;
            if st.inflight < MAX_INFLIGHT && fits {
                st.inflight += 1;
                st.inflight_bytes += cost;
                Poll::Ready(Ok(()))
            } else {
                st.reader = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
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
        wake(&mut st.reader);
        wake(&mut st.writer);
    }

    /// A buffer of at least `len` bytes, from this worker's pool when one fits.
    fn take_buf(&self, len: usize) -> AlignedBuf {
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
    home: usize,
    structured: bool,
    mut rb: RecvBuf,
) -> io::Result<()> {
    let conn = Rc::new(Conn {
        fd,
        ex,
        st: RefCell::new(State::default()),
        shared,
        home,
        structured,
        send_lock: Arc::new(futures::lock::Mutex::new(())),
    });
    iort::spawn(writer(conn.clone())).map_err(io::Error::other)?;
    let res = reader(&conn, &mut rb).await;
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

async fn reader(conn: &Rc<Conn>, rb: &mut RecvBuf) -> io::Result<()> {
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
                conn.acquire(len).await?;
                let mut buf = conn.take_buf(len);
                if let Err(e) = rb.read_exact(&mut buf[..len]).await {
                    conn.put_buf(buf);
                    conn.release(len);
                    return Err(e);
                }
                match err {
                    Some(code) => {
                        conn.put_buf(buf);
                        conn.reply(conn.hdr_err(&req, code), None, len);
                    }
                    None => start_write(conn, req, buf)?,
                }
            }
            CMD_READ => {
                let len = req.len as usize;
                match conn.validate(&req) {
                    Some(code) => {
                        conn.acquire(0).await?;
                        conn.reply(conn.hdr_err(&req, code), None, 0);
                    }
                    None => {
                        conn.acquire(len).await?;
                        start_read(conn, req)?;
                    }
                }
            }
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

/// Device I/O split into `max_io` pieces that run concurrently.
async fn dev_read(dev: &dyn BlockDevice, max_io: usize, off: u64, buf: &mut [u8]) -> IoResult {
    if buf.len() <= max_io {
        return dev.read(Bytes(off), buf).await;
    }
    let futs = buf
        .chunks_mut(max_io)
        .enumerate()
        .map(|(i, c)| dev.read(Bytes(off + (i * max_io) as u64), c))
        .collect();
    iort::try_join_all(futs).await.map(|_| ())
}

async fn dev_write(
    dev: &dyn BlockDevice,
    max_io: usize,
    off: u64,
    buf: &[u8],
    flags: WriteFlags,
) -> IoResult {
    if buf.len() <= max_io {
        return dev.write(Bytes(off), buf, flags).await;
    }
    let futs = buf
        .chunks(max_io)
        .enumerate()
        .map(|(i, c)| dev.write(Bytes(off + (i * max_io) as u64), c, flags))
        .collect();
    iort::try_join_all(futs).await.map(|_| ())
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
        let len = req.len as usize;
        match rx.await {
            Ok((buf, r)) => {
                conn.put_buf(buf);
                match r {
                    Ok(()) => conn.reply(conn.hdr_ok(&req), None, len),
                    Err(e) => conn.fail("write", &req, &e, len),
                }
            }
            Err(_) => conn.fail("write", &req, &IoError::eio("worker thread went away"), len),
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
    let n = conn.shared.worker_count();
    if len < OFFLOAD_MIN || n < 2 {
        return spawn(do_read(conn.clone(), req));
    }
    let w = conn.shared.next_worker();
    let (tx, rx) = oneshot::channel();
    let (dev, max_io, fd) = (conn.ex.dev.clone(), conn.ex.max_io, conn.fd);
    let lock = conn.send_lock.clone();
    let hdr = conn.hdr_ok(&req);
    let mut buf = conn.take_buf(len);
    let job: Job = Box::new(move || {
        let _ = iort::spawn(async move {
            let done = match dev_read(&*dev, max_io, req.offset, &mut buf[..len]).await {
                Err(e) => ReadDone::Device(e),
                Ok(()) => {
                    let _guard = lock.lock().await;
                    match send_vectored_all(fd, &[hdr.as_bytes(), &buf[..len]]).await {
                        Ok(()) => ReadDone::Sent,
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
                    ReadDone::Sent => conn.release(len),
                    ReadDone::Device(e) => conn.fail("read", &req, &e, len),
                    ReadDone::Send(e) => {
                        conn.broken(&e);
                        conn.release(len);
                    }
                }
            }
            Err(_) => conn.fail("read", &req, &IoError::eio("worker thread went away"), len),
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
    let job: Job = Box::new(move || {
        let _ = iort::spawn(async move {
            let flags = fua_flags(&req);
            let mut r = dev_write(&*dev, max_io, req.offset, &buf[..len], flags).await;
            if r.is_ok() && flags.fua && !native_fua {
                r = dev.flush().await;
            }
            let _ = tx.send((buf, r));
        });
    });
    offload_write(conn, w, req, job, rx)
}

async fn do_read(conn: Rc<Conn>, req: Request) {
    let len = req.len as usize;
    let mut buf = conn.take_buf(len);
    let ex = &conn.ex;
    match dev_read(&*ex.dev, ex.max_io, req.offset, &mut buf[..len]).await {
        Ok(()) => conn.reply(conn.hdr_ok(&req), Some((buf, len)), len),
        Err(e) => {
            conn.put_buf(buf);
            conn.fail("read", &req, &e, len);
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
    let flags = fua_flags(&req);
    let mut r = dev_write(&*ex.dev, ex.max_io, req.offset, &buf[..len], flags).await;
    if r.is_ok() && flags.fua && !ex.native_fua {
        // The device does not make FUA writes durable by itself.
        r = ex.dev.flush().await;
    }
    conn.put_buf(buf);
    match r {
        Ok(()) => conn.reply(conn.hdr_ok(&req), None, len),
        Err(e) => conn.fail("write", &req, &e, len),
    }
}

/// FLUSH, TRIM and WRITE_ZEROES: no payload either way.
async fn do_other(conn: Rc<Conn>, req: Request) {
    let ex = &conn.ex;
    let dev = &*ex.dev;
    let flags = fua_flags(&req);
    let (off, len) = (Bytes(req.offset), Bytes(req.len as u64));
    let (op, mut r) = match req.kind {
        CMD_FLUSH => ("flush", dev.flush().await),
        CMD_TRIM => ("trim", dev.discard(off, len).await),
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
            ("write-zeroes", r)
        }
    };
    let needs_flush =
        req.kind != CMD_FLUSH && flags.fua && (req.kind == CMD_TRIM || !ex.native_fua);
    if r.is_ok() && needs_flush {
        r = dev.flush().await;
    }
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
            let r = send_vectored_all(conn.fd, &slices).await;
            drop(guard);
            if let Err(e) = r {
                conn.broken(&e);
            }
        }
        let mut st = conn.st.borrow_mut();
        for r in batch.drain(..) {
            st.inflight -= 1;
            st.inflight_bytes -= r.cost;
            if let Some(b) = r.data {
                POOL.with(|p| p.borrow_mut().put(b));
            }
        }
        wake(&mut st.reader);
    }
    let mut st = conn.st.borrow_mut();
    st.writer_done = true;
    wake(&mut st.reader);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_reuses_fitting_buffers_and_stays_bounded() {
        let mut p = Pool::default();
        let b = p.take(5000);
        assert_eq!(b.len(), 8192);
        let ptr = b.as_ptr();
        p.put(b);
        // Fits: reused.
        assert_eq!(p.take(4096).as_ptr(), ptr);
        // A 1 MiB buffer is not handed out for a 4 KiB request.
        p.put(AlignedBuf::new(1 << 20));
        assert_eq!(p.take(4096).len(), 4096);
        for _ in 0..2 * POOL_COUNT {
            p.put(AlignedBuf::new(1 << 20));
        }
        assert!(p.bytes <= POOL_BYTES && p.bufs.len() <= POOL_COUNT);
    }
}
