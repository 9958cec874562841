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
    fn read<'a>(&'a self, offset: Bytes, buf: &'a mut [u8]) -> IoFuture<'a>;
    /// Writes `buf` at `offset`.
    fn write<'a>(&'a self, offset: Bytes, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a>;
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
        dev.write(Bytes(offset.0 + done), &ZERO_BUF[..n as usize], flags)
            .await?;
        done += n;
    }
    Ok(())
}
