//! The mapping core's I/O contract: every target, extent and table is a [`BlockDevice`].
//!
//! Devices stack: a striped target holds `Arc<dyn BlockDevice>` legs, which may be linear targets
//! over file extents, or whole tables. All methods return boxed futures that borrow the caller's
//! buffer; they are driven on one thread (the futures are not `Send`), normally on the
//! per-thread io_uring runtime in `iort`, so no I/O needs a thread of its own.
//!
//! Offsets and lengths are in [`Bytes`]. A front end (NBD, ublk) advertises the device's
//! [`Limits`] and clients normally stay 512-byte aligned, but every device must still handle
//! any byte range inside its size (bounds are checked with [`check_range`]).
//!
//! # The lending contract
//!
//! [`BlockDevice::read`] and [`BlockDevice::write`] are `unsafe`: the future they return may
//! lend the caller's buffer to the kernel (an io_uring read or write in an extent at the
//! bottom of the stack), which keeps using it until the operation's completion arrives. So the
//! caller promises what [`iort`'s lending contract](iort#the-lending-contract) asks:
//!
//! > The returned future is polled to completion or dropped, and never leaked
//! > (`mem::forget`, an `Rc` cycle, a future polled and then abandoned without being
//! > dropped) while the buffer can still be freed or reused.
//!
//! Dropping is fine, mid-flight and while unwinding: the operations at the bottom wait for
//! their completions in their destructors. The contract propagates down the stack: a device's
//! `read` awaits its legs' `read`s inside its own future, so they are completed or dropped
//! with it. Front ends keep it because a request's future lives in a task that completes or
//! is dropped, never forgotten; tools and tests use the safe [`read_blocking`] and
//! [`write_blocking`], which drive the future to completion before they return.
//!
//! The other methods lend no caller memory: [`read_fixed`](BlockDevice::read_fixed) and
//! [`write_fixed`](BlockDevice::write_fixed) name a registered buffer (the ring holds the
//! memory), and [`copy_mapped`](BlockDevice::copy_mapped) copies synchronously through
//! [`MappedCopy::copy`], whose own contract covers the address it passes on.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::units::Bytes;

/// Errors carry a Linux errno so every front end can report them natively (NBD error field,
/// ublk negative result) plus a message that names the device and offset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg} ({})", errno_name(*.errno))]
pub struct IoError {
    /// Positive errno value (`libc::EIO`, ...).
    pub errno: i32,
    /// What failed, where: device, offset, layer.
    pub msg: String,
}

impl IoError {
    /// An error with the given errno.
    pub fn new(errno: i32, msg: impl Into<String>) -> IoError {
        IoError {
            errno,
            msg: msg.into(),
        }
    }
    /// `EIO`: the device failed.
    pub fn eio(msg: impl Into<String>) -> IoError {
        IoError::new(libc::EIO, msg)
    }
    /// `EINVAL`: the request is malformed.
    pub fn invalid(msg: impl Into<String>) -> IoError {
        IoError::new(libc::EINVAL, msg)
    }
    /// `ENOSPC`: the request reaches past the end, or a pool is full.
    pub fn nospc(msg: impl Into<String>) -> IoError {
        IoError::new(libc::ENOSPC, msg)
    }
    /// `EOPNOTSUPP`: the device does not do this operation.
    pub fn unsupported(msg: impl Into<String>) -> IoError {
        IoError::new(libc::EOPNOTSUPP, msg)
    }
    /// `EROFS`: the device is read-only.
    pub fn read_only(msg: impl Into<String>) -> IoError {
        IoError::new(libc::EROFS, msg)
    }
    /// From a negative io_uring result or a positive errno.
    pub fn from_errno(errno: i32, msg: impl Into<String>) -> IoError {
        IoError::new(errno.abs(), msg)
    }
    /// Prefixes the message with outer context (a stacked layer adding where it was).
    pub fn context(mut self, ctx: impl fmt::Display) -> IoError {
        self.msg = format!("{ctx}: {}", self.msg);
        self
    }
}

impl From<std::io::Error> for IoError {
    fn from(e: std::io::Error) -> IoError {
        IoError::new(e.raw_os_error().unwrap_or(libc::EIO), e.to_string())
    }
}

/// Short name of an errno for messages.
pub fn errno_name(errno: i32) -> &'static str {
    match errno {
        libc::EIO => "EIO",
        libc::EINVAL => "EINVAL",
        libc::ENOSPC => "ENOSPC",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EROFS => "EROFS",
        libc::ENOMEM => "ENOMEM",
        libc::EAGAIN => "EAGAIN",
        libc::ENODEV => "ENODEV",
        libc::ENXIO => "ENXIO",
        libc::EFBIG => "EFBIG",
        libc::EBADF => "EBADF",
        libc::ECANCELED => "ECANCELED",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::EILSEQ => "EILSEQ",
        _ => "errno",
    }
}

/// Result of an I/O operation.
pub type IoResult<T = ()> = Result<T, IoError>;

/// The future every device method returns: boxed (devices stack behind `dyn`), borrowing the
/// request's buffer for `'a`, and not `Send` (it runs on the submitting thread's ring).
pub type IoFuture<'a, T = ()> = Pin<Box<dyn Future<Output = IoResult<T>> + 'a>>;

/// Per-write flags.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// Forced unit access: the data is on stable storage when the write completes.
    pub fua: bool,
}

impl WriteFlags {
    /// A write that must be durable on completion.
    pub const FUA: WriteFlags = WriteFlags { fua: true };
}

/// Request data that lives in a buffer registered with the current thread's io_uring (ublk
/// zero copy: the kernel lends the request's own pages to the ring), not in our address
/// space. Only `READ_FIXED`/`WRITE_FIXED` operations on this thread's ring can reach it, so
/// only devices that end in such operations serve it (see [`BlockDevice::read_fixed`]).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct FixedBuf {
    /// Index in the ring's registered-buffer table.
    pub index: u16,
    /// The address the ring knows byte 0 of the registration by: 0 for a buffer the kernel
    /// registered (ublk), the user address for memory registered from userspace.
    pub base: u64,
    /// Where this request's bytes start inside the registration.
    pub offset: u64,
    /// Length in bytes.
    pub len: usize,
}

impl FixedBuf {
    /// The `len` bytes starting `at` bytes into this buffer (a piece of a split request).
    pub fn slice(self, at: usize, len: usize) -> FixedBuf {
        debug_assert!(at + len <= self.len, "fixed buffer slice out of range");
        FixedBuf {
            offset: self.offset + at as u64,
            len,
            ..self
        }
    }

    /// The address to put in an SQE for the byte `at` bytes into this buffer.
    pub fn addr(self, at: usize) -> u64 {
        self.base + self.offset + at as u64
    }
}

/// A kernel-side copy between a device's mapped bytes and a request, for
/// [`BlockDevice::copy_mapped`]: the front end's copy function, called through
/// [`copy`](Self::copy) with the address of the device's bytes, where they start in the
/// request, and how many.
///
/// The function must move the bytes with a system call (which reports a page that vanished,
/// say a file that shrank, as `EFAULT`), never by touching the address itself (that would
/// kill the process with `SIGBUS`). It hands the address to the kernel, which writes there
/// for a read, so only [`copy`](Self::copy), an `unsafe fn`, calls it: the function may rely
/// on that method's contract for the address.
#[derive(Clone, Copy)]
pub struct MappedCopy<'a> {
    f: &'a dyn Fn(*mut u8, usize, usize) -> IoResult<()>,
    /// Where this copy's byte 0 is in the request (a piece of a split request); `None` if
    /// that overflowed (every copy then fails).
    base: Option<usize>,
}

impl<'a> MappedCopy<'a> {
    /// Wraps a front end's copy function `f(addr, at, len)`: move `len` bytes between
    /// `addr` and the request from its byte `at` on.
    pub fn new(f: &'a dyn Fn(*mut u8, usize, usize) -> IoResult<()>) -> MappedCopy<'a> {
        MappedCopy { f, base: Some(0) }
    }

    /// The same request seen from `at` bytes in: byte 0 of the result is byte `at` of this.
    pub fn skip(self, at: usize) -> MappedCopy<'a> {
        MappedCopy {
            base: self.base.and_then(|b| b.checked_add(at)),
            ..self
        }
    }

    /// Moves `len` bytes between `addr` and the request from its byte `at` on (which way
    /// was fixed when the function was made).
    ///
    /// # Safety
    /// `addr..addr + len` must be memory the calling device maps for the device's own bytes
    /// (a mapping of its file), and stay mapped for the duration of the call. Its pages may
    /// be gone from the file (a file that shrank): the kernel reports that as `EFAULT`.
    pub unsafe fn copy(&self, addr: *mut u8, at: usize, len: usize) -> IoResult<()> {
        let at = self.base.and_then(|b| b.checked_add(at)).ok_or_else(|| {
            IoError::invalid(format!(
                "mapped copy of {len} bytes: the request offset overflows"
            ))
        })?;
        (self.f)(addr, at, len)
    }
}

impl fmt::Debug for MappedCopy<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MappedCopy {{ base: {:?} }}", self.base)
    }
}

/// How a [`FixedBuf`] request ended when it returned `Ok`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Served {
    /// The data moved between the device and the registered buffer.
    Done,
    /// Some layer needs the bytes in memory (parity, checksums, a network socket, a target
    /// without a fixed path): the caller must redo the request with `read`/`write` and a
    /// buffer of its own. Parts may already have been transferred; redoing a read or a
    /// write of the same bytes over them is harmless.
    NeedsMemory,
}

/// A request that moves by kernel copies to or from mapped device bytes
/// ([`BlockDevice::copy_mapped`]): its copy function, and where this part starts in it.
#[derive(Clone, Copy)]
pub struct MappedReq<'a> {
    /// The request's copy function.
    pub copy: MappedCopy<'a>,
    /// Where this part starts in the request.
    pub at: usize,
    /// Length in bytes.
    pub len: usize,
}

impl std::fmt::Debug for MappedReq<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MappedReq {{ at: {}, len: {} }}", self.at, self.len)
    }
}

impl<'a> MappedReq<'a> {
    fn piece(self, at: usize, len: usize) -> MappedReq<'a> {
        debug_assert!(at + len <= self.len, "mapped request piece out of range");
        MappedReq {
            at: self.at + at,
            len,
            ..self
        }
    }

    /// `copy_mapped` of this part on `dev` at `off`.
    fn run<'d>(
        self,
        dev: &'d dyn BlockDevice,
        off: Bytes,
        write: Option<WriteFlags>,
    ) -> IoFuture<'d, Served>
    where
        'a: 'd,
    {
        dev.copy_mapped(off, self.len, write, self.copy.skip(self.at))
    }
}

/// Where a write's bytes are: our memory, a registered buffer that only fixed-buffer
/// operations reach, or a request that kernel copies reach. Lets a stacking target (mirror,
/// thin) run one code path for all three.
#[derive(Clone, Copy, Debug)]
pub enum Src<'a> {
    /// Bytes in memory.
    Mem(&'a [u8]),
    /// A registered buffer.
    Fixed(FixedBuf),
    /// A request reached by [`BlockDevice::copy_mapped`].
    Mapped(MappedReq<'a>),
}

impl<'a> Src<'a> {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        match self {
            Src::Mem(b) => b.len(),
            Src::Fixed(f) => f.len,
            Src::Mapped(m) => m.len,
        }
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `len` bytes starting `at` bytes in.
    pub fn piece(self, at: usize, len: usize) -> Src<'a> {
        match self {
            Src::Mem(b) => Src::Mem(&b[at..at + len]),
            Src::Fixed(f) => Src::Fixed(f.slice(at, len)),
            Src::Mapped(m) => Src::Mapped(m.piece(at, len)),
        }
    }

    /// Writes these bytes to `dev` at `off` (`write`, `write_fixed` or `copy_mapped`).
    ///
    /// # Safety
    /// For [`Src::Mem`] this is [`BlockDevice::write`]: keep the
    /// [lending contract](self#the-lending-contract) for the returned future.
    pub unsafe fn write_to<'d>(
        self,
        dev: &'d dyn BlockDevice,
        off: Bytes,
        flags: WriteFlags,
    ) -> IoFuture<'d, Served>
    where
        'a: 'd,
    {
        match self {
            Src::Mem(b) => {
                // SAFETY: awaited inside the returned future, which our caller keeps the
                // lending contract for.
                let f = unsafe { dev.write(off, b, flags) };
                Box::pin(async move { f.await.map(|()| Served::Done) })
            }
            Src::Fixed(fb) => dev.write_fixed(off, fb, flags),
            Src::Mapped(m) => m.run(dev, off, Some(flags)),
        }
    }
}

/// Where a read's bytes go; as [`Src`].
#[derive(Debug)]
pub enum Dst<'a> {
    /// Memory.
    Mem(&'a mut [u8]),
    /// A registered buffer.
    Fixed(FixedBuf),
    /// A request reached by [`BlockDevice::copy_mapped`].
    Mapped(MappedReq<'a>),
}

impl<'a> Dst<'a> {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        match self {
            Dst::Mem(b) => b.len(),
            Dst::Fixed(f) => f.len,
            Dst::Mapped(m) => m.len,
        }
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Splits into consecutive pieces of `lens` bytes (which must add up to at most the
    /// length).
    pub fn split(self, lens: &[usize]) -> Vec<Dst<'a>> {
        let mut at = 0usize;
        match self {
            Dst::Mem(mut b) => lens
                .iter()
                .map(|&l| {
                    let (head, tail) = std::mem::take(&mut b).split_at_mut(l);
                    b = tail;
                    Dst::Mem(head)
                })
                .collect(),
            Dst::Fixed(f) => lens
                .iter()
                .map(|&l| {
                    at += l;
                    Dst::Fixed(f.slice(at - l, l))
                })
                .collect(),
            Dst::Mapped(m) => lens
                .iter()
                .map(|&l| {
                    at += l;
                    Dst::Mapped(m.piece(at - l, l))
                })
                .collect(),
        }
    }

    /// Reads `dev` at `off` into these bytes (`read`, `read_fixed` or `copy_mapped`).
    ///
    /// # Safety
    /// For [`Dst::Mem`] this is [`BlockDevice::read`]: keep the
    /// [lending contract](self#the-lending-contract) for the returned future.
    pub async unsafe fn read_from(
        &mut self,
        dev: &dyn BlockDevice,
        off: Bytes,
    ) -> IoResult<Served> {
        match self {
            // SAFETY: awaited here, in a future our caller keeps the lending contract for.
            Dst::Mem(b) => unsafe { dev.read(off, b) }.await.map(|()| Served::Done),
            Dst::Fixed(f) => dev.read_fixed(off, *f).await,
            Dst::Mapped(m) => m.run(dev, off, None).await,
        }
    }
}

/// `Done` only if every part was.
pub fn all_done(parts: impl IntoIterator<Item = Served>) -> Served {
    if parts.into_iter().all(|s| s == Served::Done) {
        Served::Done
    } else {
        Served::NeedsMemory
    }
}

/// [`BlockDevice::copy_mapped`] over the consecutive pieces of a split request, given as
/// (piece index, device, offset on it, length); `ctx` adds the piece's place to an error. The
/// pieces run one after another (each is a memory copy, nothing to overlap); the first that
/// needs memory ends it.
pub async fn copy_mapped_pieces<'a>(
    pieces: Vec<(usize, &'a DeviceRef, Bytes, usize)>,
    write: Option<WriteFlags>,
    copy: MappedCopy<'a>,
    ctx: impl Fn(usize, Bytes, IoError) -> IoError,
) -> IoResult<Served> {
    let mut at = 0usize;
    for (i, dev, off, n) in pieces {
        let s = dev
            .copy_mapped(off, n, write, copy.skip(at))
            .await
            .map_err(|e| ctx(i, off, e))?;
        if s == Served::NeedsMemory {
            return Ok(s);
        }
        at += n;
    }
    Ok(Served::Done)
}

/// Joins the pieces of a split fixed-buffer request: `Done` only if every piece was.
pub fn join_served(futs: Vec<IoFuture<'_, Served>>) -> IoFuture<'_, Served> {
    match futs.len() {
        0 => ready(Ok(Served::Done)),
        1 => futs
            .into_iter()
            .next()
            .unwrap_or_else(|| ready(Ok(Served::Done))),
        _ => Box::pin(async move { iort::try_join_all(futs).await.map(all_done) }),
    }
}

/// What a device promises and prefers; front ends advertise these (ublk parameters, NBD block
/// size info). Stacking layers combine their legs' limits.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Smallest addressable unit, bytes (512 or 4096).
    pub logical_block_size: u32,
    /// Preferred minimum write unit, bytes.
    pub physical_block_size: u32,
    /// Optimal I/O size (stripe width), bytes; 0 if none.
    pub io_opt: u32,
    /// Largest single request the device likes, bytes (front ends split larger ones).
    pub max_io: u32,
    /// Discard granularity in bytes; 0 means discard is not supported.
    pub discard_granularity: u32,
    /// Whether discarded ranges read back as zeroes afterwards.
    pub discard_zeroes: bool,
    /// Whether write-zeroes is implemented natively (not by writing a zero buffer).
    pub write_zeroes: bool,
    /// Whether the device has a volatile write cache (FLUSH is meaningful).
    pub volatile_cache: bool,
    /// Whether FUA writes are honoured natively.
    pub fua: bool,
    /// Whether the device refuses writes.
    pub read_only: bool,
    /// Whether concurrent connections/queues see one consistent device (NBD multi-conn).
    pub multi_conn_safe: bool,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            logical_block_size: 512,
            physical_block_size: 4096,
            io_opt: 0,
            max_io: 1 << 20,
            discard_granularity: 4096,
            discard_zeroes: false,
            write_zeroes: true,
            volatile_cache: true,
            fua: true,
            read_only: false,
            multi_conn_safe: true,
        }
    }
}

impl Limits {
    /// Limits of a device built from several legs: the strictest of each promise.
    pub fn stack(mut self, o: &Limits) -> Limits {
        self.logical_block_size = self.logical_block_size.max(o.logical_block_size);
        self.physical_block_size = self.physical_block_size.max(o.physical_block_size);
        self.max_io = self.max_io.min(o.max_io);
        self.discard_granularity = if self.discard_granularity == 0 || o.discard_granularity == 0 {
            0
        } else {
            self.discard_granularity.max(o.discard_granularity)
        };
        self.discard_zeroes &= o.discard_zeroes;
        self.write_zeroes &= o.write_zeroes;
        self.volatile_cache |= o.volatile_cache;
        self.fua &= o.fua;
        self.read_only |= o.read_only;
        self.multi_conn_safe &= o.multi_conn_safe;
        self
    }
}

/// A block device: a target, an extent, or a whole table. Implementations must be safe to use
/// from several threads at once (each thread drives its own futures).
pub trait BlockDevice: Send + Sync {
    /// Name for messages and reports (a path, `linear@line3`, a device name).
    fn name(&self) -> String;
    /// Size in bytes.
    fn size(&self) -> Bytes;
    /// Limits and feature flags.
    fn limits(&self) -> Limits {
        Limits::default()
    }
    /// Reads `buf.len()` bytes at `offset`.
    ///
    /// # Safety
    /// The returned future may lend `buf` to the kernel: keep the
    /// [lending contract](self#the-lending-contract) (complete or drop it, never leak it
    /// while `buf` can be freed or reused). [`read_blocking`] is the safe way to call it.
    unsafe fn read<'a>(&'a self, offset: Bytes, buf: &'a mut [u8]) -> IoFuture<'a>;
    /// Writes `buf` at `offset`.
    ///
    /// # Safety
    /// As [`read`](Self::read); [`write_blocking`] is the safe way to call it.
    unsafe fn write<'a>(&'a self, offset: Bytes, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a>;
    /// Reads into a registered buffer ([`FixedBuf`]), when every layer down to the extents
    /// can move the bytes with fixed-buffer operations; otherwise resolves to
    /// [`Served::NeedsMemory`] (the default) and the caller falls back to [`read`](Self::read).
    fn read_fixed(&self, offset: Bytes, buf: FixedBuf) -> IoFuture<'_, Served> {
        let _ = (offset, buf);
        ready(Ok(Served::NeedsMemory))
    }
    /// Writes from a registered buffer; as [`read_fixed`](Self::read_fixed).
    fn write_fixed(&self, offset: Bytes, buf: FixedBuf, flags: WriteFlags) -> IoFuture<'_, Served> {
        let _ = (offset, buf, flags);
        ready(Ok(Served::NeedsMemory))
    }
    /// Moves `len` bytes at `offset` between the device and a request with one kernel copy,
    /// when the bytes sit in memory this process maps (a file in RAM): `copy` gets their
    /// address (`write`: the request's bytes go there). The ublk zero-copy front end uses it
    /// where a fixed-buffer operation would be slow. Resolves to [`Served::NeedsMemory`] (the
    /// default) where the bytes are not mapped.
    fn copy_mapped<'a>(
        &'a self,
        offset: Bytes,
        len: usize,
        write: Option<WriteFlags>,
        copy: MappedCopy<'a>,
    ) -> IoFuture<'a, Served> {
        let _ = (offset, len, write, copy);
        ready(Ok(Served::NeedsMemory))
    }
    /// Makes every completed write durable.
    fn flush(&self) -> IoFuture<'_>;
    /// Unmaps a range (a hint unless `limits().discard_zeroes`).
    fn discard(&self, offset: Bytes, len: Bytes) -> IoFuture<'_>;
    /// Makes a range read back as zeroes.
    fn write_zeroes(&self, offset: Bytes, len: Bytes, flags: WriteFlags) -> IoFuture<'_>;
    /// A device-mapper style status line for `dev status`.
    fn status(&self) -> String {
        String::new()
    }
    /// For a remote extent (an NBD export...), how many connections it has made so far: a
    /// redundant target that failed this device after an error takes it back once the count
    /// grows (it reconnected). `None` for local devices; wrappers answer for what they wrap.
    fn connections_made(&self) -> Option<u64> {
        self.underlying().and_then(|d| d.connections_made())
    }
    /// The device this one forwards to unchanged, if it is a pass-through wrapper (the
    /// daemon's reloadable device). Lets a target find the concrete device behind a name
    /// (a `thin` line finds its pool object).
    fn underlying(&self) -> Option<DeviceRef> {
        None
    }
    /// A device-mapper style message (`dmsetup message`); returns the reply text.
    fn message<'a>(&'a self, args: &'a [String]) -> IoFuture<'a, String> {
        let name = self.name();
        Box::pin(async move {
            Err(IoError::unsupported(format!(
                "{name}: takes no messages (got '{}')",
                args.join(" ")
            )))
        })
    }
}

/// Shared handle to any device.
pub type DeviceRef = Arc<dyn BlockDevice>;

/// Checks that `[offset, offset+len)` lies inside a device of `size`; the error names the device.
pub fn check_range(name: &str, size: Bytes, offset: Bytes, len: Bytes) -> IoResult<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(IoError::nospc(format!(
            "{name}: request at byte {} length {} goes past the end ({} bytes)",
            offset.0, len.0, size.0
        ))),
    }
}

/// A future that is immediately ready (for synchronous devices and errors).
pub fn ready<'a, T: 'a>(r: IoResult<T>) -> IoFuture<'a, T> {
    Box::pin(std::future::ready(r))
}

/// Runs the pieces of a split request concurrently and completes when all have (the first
/// error wins, but every piece is driven to the end so no buffer is abandoned mid-flight); a
/// single piece runs directly, with no extra future around it.
pub fn join_pieces(mut futs: Vec<IoFuture<'_>>) -> IoFuture<'_> {
    match futs.len() {
        0 => ready(Ok(())),
        1 => futs.pop().unwrap_or_else(|| ready(Ok(()))),
        _ => Box::pin(async move { iort::try_join_all(futs).await.map(|_| ()) }),
    }
}

/// A shared zero-filled buffer for write-zeroes emulation and zero reads.
pub static ZERO_BUF: [u8; 1 << 16] = [0u8; 1 << 16];

/// Emulates write-zeroes on a device by writing zero buffers in chunks of at most 64 KiB.
pub async fn write_zeroes_by_writing(
    dev: &dyn BlockDevice,
    offset: Bytes,
    len: Bytes,
    flags: WriteFlags,
) -> IoResult<()> {
    let mut done = 0u64;
    while done < len.0 {
        let n = (len.0 - done).min(ZERO_BUF.len() as u64);
        // SAFETY: the buffer is a static: it is never freed or reused, whatever becomes of
        // this future.
        unsafe { dev.write(Bytes(offset.0 + done), &ZERO_BUF[..n as usize], flags) }.await?;
        done += n;
    }
    Ok(())
}

/// Reads `buf.len()` bytes at `offset` of `dev` and waits for the result: the sound way for
/// tools, tests and examples to call [`BlockDevice::read`]. Drives the read to completion on
/// this thread's cached `iort` runtime ([`iort::block_on`]), so it works for devices that need
/// a ring (file extents) and those that do not (in-memory devices). It blocks the thread: not
/// for use inside a runtime's tasks or on a ublk queue thread.
pub fn read_blocking(dev: &dyn BlockDevice, offset: Bytes, buf: &mut [u8]) -> IoResult<()> {
    let len = buf.len();
    // SAFETY: the future never escapes this call: `block_on` polls it to completion, and on a
    // panic it is dropped while unwinding (which waits for the kernel) before `buf` goes.
    let fut = unsafe { dev.read(offset, buf) };
    iort::block_on(fut).map_err(|e| runtime_error(dev, "read", offset, len, e))?
}

/// Writes `buf` at `offset` of `dev` and waits for the result; as [`read_blocking`].
pub fn write_blocking(
    dev: &dyn BlockDevice,
    offset: Bytes,
    buf: &[u8],
    flags: WriteFlags,
) -> IoResult<()> {
    // SAFETY: as in `read_blocking`: the future is completed or dropped inside this call.
    let fut = unsafe { dev.write(offset, buf, flags) };
    iort::block_on(fut).map_err(|e| runtime_error(dev, "write", offset, buf.len(), e))?
}

/// Reads every `(offset, buffer)` of `reqs` from `dev` with all of them in flight at once
/// and waits for all of them; the first error. As [`read_blocking`], for callers that want
/// queue depth (a copy, a replication) without a runtime of their own.
pub fn read_all_blocking(dev: &dyn BlockDevice, reqs: &mut [(Bytes, &mut [u8])]) -> IoResult<()> {
    let len = reqs.iter().map(|r| r.1.len()).sum();
    let off = reqs.first().map_or(Bytes(0), |r| r.0);
    let futs: Vec<_> = reqs
        .iter_mut()
        // SAFETY: every future is completed or dropped inside `block_on` below (join drives
        // all of them to the end even after an error), before the buffers can go.
        .map(|(off, buf)| unsafe { dev.read(*off, buf) })
        .collect();
    iort::block_on(iort::try_join_all(futs))
        .map_err(|e| runtime_error(dev, "read", off, len, e))?
        .map(|_| ())
}

/// Writes every `(offset, buffer)` of `reqs` to `dev` with all of them in flight at once and
/// waits for all of them; the first error. As [`read_all_blocking`].
pub fn write_all_blocking(
    dev: &dyn BlockDevice,
    reqs: &[(Bytes, &[u8])],
    flags: WriteFlags,
) -> IoResult<()> {
    let futs: Vec<_> = reqs
        .iter()
        // SAFETY: as in `read_all_blocking`.
        .map(|(off, buf)| unsafe { dev.write(*off, buf, flags) })
        .collect();
    let len = reqs.iter().map(|r| r.1.len()).sum();
    let off = reqs.first().map_or(Bytes(0), |r| r.0);
    iort::block_on(iort::try_join_all(futs))
        .map_err(|e| runtime_error(dev, "write", off, len, e))?
        .map(|_| ())
}

/// The runtime for a blocking call could not be created.
fn runtime_error(
    dev: &dyn BlockDevice,
    what: &str,
    offset: Bytes,
    len: usize,
    e: std::io::Error,
) -> IoError {
    IoError::from(e).context(format_args!(
        "{}: {what} of {len} bytes at byte {}: starting an I/O runtime",
        dev.name(),
        offset.0
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::{CrashDevice, CutMode, MemDevice};
    use std::cell::RefCell;

    #[test]
    fn blocking_helpers_move_data_and_report_errors() {
        let m = MemDevice::new("m", Bytes(1 << 20));
        write_blocking(&m, Bytes(4096), &[7u8; 1000], WriteFlags::default()).unwrap();
        let mut b = vec![0u8; 1200];
        read_blocking(&m, Bytes(4000), &mut b).unwrap();
        assert!(b[..96].iter().all(|&x| x == 0));
        assert!(b[96..1096].iter().all(|&x| x == 7));
        assert!(b[1096..].iter().all(|&x| x == 0));
        let e = read_blocking(&m, Bytes((1 << 20) - 1), &mut b).unwrap_err();
        assert_eq!(e.errno, libc::ENOSPC, "{e}");

        // A FUA write through the helper is durable across a power cut.
        let c = CrashDevice::new("c", Bytes(1 << 20));
        write_blocking(&c, Bytes(0), &[3u8; 512], WriteFlags::FUA).unwrap();
        write_blocking(&c, Bytes(512), &[4u8; 512], WriteFlags::default()).unwrap();
        c.power_cut(CutMode::DropAll);
        let mut b = [9u8; 1024];
        read_blocking(&c, Bytes(0), &mut b).unwrap();
        assert_eq!(&b[..512], &[3u8; 512][..]);
        assert_eq!(&b[512..], &[0u8; 512][..]);
    }

    #[test]
    fn mapped_copy_pieces_see_their_place_in_the_request() {
        let seen = RefCell::new(Vec::new());
        let f = |p: *mut u8, at: usize, len: usize| {
            seen.borrow_mut().push((p as usize, at, len));
            Ok(())
        };
        let c = MappedCopy::new(&f);
        let addr = 0x1000 as *mut u8;
        // SAFETY: `f` only records its arguments; nothing touches or lends the address.
        unsafe {
            c.copy(addr, 5, 10).unwrap();
            c.skip(100).copy(addr, 5, 10).unwrap();
            c.skip(100).skip(20).copy(addr, 0, 1).unwrap();
            let e = c.skip(usize::MAX).copy(addr, 1, 1).unwrap_err();
            assert_eq!(e.errno, libc::EINVAL, "{e}");
            let e = c.skip(usize::MAX).skip(1).copy(addr, 0, 1).unwrap_err();
            assert_eq!(e.errno, libc::EINVAL, "{e}");
        }
        assert_eq!(
            *seen.borrow(),
            vec![(0x1000, 5, 10), (0x1000, 105, 10), (0x1000, 120, 1)]
        );
    }
}
