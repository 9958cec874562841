//! [`FileExtent`]: a regular file or a block device as a [`BlockDevice`], with every I/O
//! submitted on the calling thread's io_uring (`iort`).
//!
//! # Direct I/O and unaligned requests
//!
//! The extent prefers `O_DIRECT` (no double caching under a guest's own cache, and writes
//! reach the device's cache at once). `O_DIRECT` needs the buffer address, offset and length
//! aligned (`statx` `STATX_DIOALIGN`, else the logical block size). A request that is aligned
//! goes to the kernel as one SQE straight from the caller's buffer. One that is not goes
//! through an aligned **bounce buffer** over the covering aligned span; a write that only
//! partly covers its first or last block reads those blocks first (read-modify-write) while
//! holding an in-process range lock over the span, so two unaligned writes that share a block
//! cannot lose each other's bytes.
//!
//! Why a bounce buffer and not a second, buffered fd for the unaligned requests: Linux keeps
//! direct and buffered I/O coherent only by flushing the page cache before a direct I/O and
//! invalidating it afterwards. A buffered write does not wait for direct I/O in flight, so a
//! buffered write that fills a page from disk while a direct write to another part of that
//! page is in flight leaves a dirty page holding the old bytes; the invalidation after the
//! direct write then fails (the kernel logs "Page cache invalidation failure on direct I/O")
//! and writeback later puts the old bytes back. Block devices do not even take an inode lock.
//! The bounce path never mixes the two, at the price of a copy for unaligned requests only.
//!
//! The lock is only needed against other read-modify-writes (and the file `fallocate`s that
//! touch partial blocks): an aligned request never shares a block with a request whose bytes it
//! does not overlap, and concurrent overlapping writes have no defined result on any device.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};

use iort::io_uring::{opcode, squeue, types};
use tables::io::{check_range, write_zeroes_by_writing};
use tables::{
    BlockDevice, Bytes, FixedBuf, IoError, IoFuture, IoResult, Limits, Served, WriteFlags,
};

use crate::bounce::{AlignedBuf, RangeLocks};
use crate::sys;

/// Largest transfer put in one SQE (the kernel caps one read/write at just under 2 GiB).
const MAX_CHUNK: usize = 1 << 30;
/// On a file in RAM, reads of at least this many bytes go through the ring, in pieces of
/// this size marked async, so io-wq workers do the copies side by side and off the serving
/// thread; smaller reads, and all writes, are copied inline (see `write_loop`).
/// `VOLMGR_RAM_ASYNC_MIN` (bytes; 0 = always inline) overrides it. Writes stay inline because
/// writes to one file serialize anyway (io-wq hashes buffered writes by inode, and the file
/// system takes the inode lock): handing them to a worker measured 0.73-0.77x of inline
/// for 1M sequential writes in the VM benchmark, while reads gained 1.08-1.35x.
const RAM_ASYNC_MIN: usize = 64 << 10;

/// The effective `RAM_ASYNC_MIN` (read from the environment once).
fn ram_async_min() -> usize {
    static V: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *V.get_or_init(|| {
        match std::env::var("VOLMGR_RAM_ASYNC_MIN")
            .ok()
            .and_then(|v| tables::units::parse_size(&v).ok())
        {
            Some(Bytes(0)) => usize::MAX,
            Some(Bytes(n)) => usize::try_from(n).unwrap_or(usize::MAX).max(4096),
            None => RAM_ASYNC_MIN,
        }
    })
}

/// How often an `EINTR`/`EAGAIN` completion is retried before it is reported.
const MAX_RETRIES: u32 = 16;

/// Alignment the block layer guarantees for a request's memory (its default DMA alignment,
/// 512 bytes, which ublk keeps): direct I/O into a registered request buffer works when the
/// file needs no more than this.
const REQUEST_MEM_ALIGN: usize = 512;

/// `/dev/zero`, opened once: the source that zero-fills a registered buffer past the end of a
/// file (the bytes are not in our address space, so they cannot be cleared in place).
fn dev_zero() -> Option<RawFd> {
    static ZERO: std::sync::OnceLock<Option<OwnedFd>> = std::sync::OnceLock::new();
    ZERO.get_or_init(|| std::fs::File::open("/dev/zero").ok().map(OwnedFd::from))
        .as_ref()
        .map(|f| f.as_raw_fd())
}
/// Alignment assumed for direct I/O on a file whose kernel does not report `STATX_DIOALIGN`:
/// a multiple of every logical block size in use.
const FALLBACK_DIO_ALIGN: u32 = 4096;

/// Whether to open with `O_DIRECT`.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum DirectMode {
    /// Direct I/O where the file system supports it, buffered otherwise (recorded in
    /// [`FileExtent::io_mode`]).
    #[default]
    Auto,
    /// Direct I/O or fail to open.
    Always,
    /// Buffered I/O through the page cache.
    Never,
}

/// How to open an extent.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct OpenOptions {
    /// Open read-only: writes, discards and write-zeroes fail with `EROFS`.
    pub read_only: bool,
    /// Direct or buffered I/O.
    pub direct: DirectMode,
}

/// The I/O mode an extent ended up with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IoMode {
    /// `O_DIRECT`, with the alignment the kernel needs.
    Direct {
        /// Buffer address alignment, bytes.
        mem_align: u32,
        /// File offset and length alignment, bytes (also the read-modify-write unit).
        offset_align: u32,
    },
    /// Through the page cache.
    Buffered {
        /// Why not direct (asked for, or what refused it).
        reason: String,
    },
}

/// What the path is.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ExtentKind {
    /// A regular file: size is its length; reads past its end return zeroes.
    File,
    /// A block device.
    BlockDevice {
        /// Device major number.
        major: u32,
        /// Device minor number.
        minor: u32,
    },
}

/// Why an extent could not be opened or created.
#[derive(Debug, thiserror::Error)]
pub enum ExtentError {
    /// A system call failed.
    #[error("{path}: {what}: {}", io_text(.source))]
    Io {
        /// The path.
        path: String,
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The path cannot be an extent as asked (not a file or block device, no direct I/O...).
    #[error("{path}: {msg}")]
    Unsupported {
        /// The path.
        path: String,
        /// Why.
        msg: String,
    },
}

/// An OS error as its `strerror` text (std adds " (os error N)", which our messages avoid).
fn io_text(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(errno) => sys::errno_text(errno),
        None => e.to_string(),
    }
}

impl ExtentError {
    fn io(path: &str, what: impl Into<String>, source: std::io::Error) -> ExtentError {
        ExtentError::Io {
            path: path.to_string(),
            what: what.into(),
            source,
        }
    }
    /// The errno behind the error (`EINVAL` for unsupported configurations).
    pub fn errno(&self) -> i32 {
        match self {
            ExtentError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            ExtentError::Unsupported { .. } => libc::EINVAL,
        }
    }
}

impl From<ExtentError> for IoError {
    fn from(e: ExtentError) -> IoError {
        IoError::new(e.errno(), e.to_string())
    }
}

/// Creates (or truncates) `path` as a sparse file of `size` bytes reading as zeroes.
pub fn create_sparse(path: impl AsRef<Path>, size: Bytes) -> Result<(), ExtentError> {
    let p = path.as_ref();
    let name = p.display().to_string();
    let f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(p)
        .map_err(|e| ExtentError::io(&name, "create", e))?;
    f.set_len(size.0)
        .map_err(|e| ExtentError::io(&name, format!("set length to {} bytes", size.0), e))
}

// Which fallocate mode last worked for file write-zeroes.
const ZERO_BY_ZERO_RANGE: u8 = 0;
const ZERO_BY_PUNCH: u8 = 1;
const ZERO_BY_WRITING: u8 = 2;
// How block-device discard is issued.
const DISCARD_BY_URING: u8 = 0;
const DISCARD_BY_IOCTL: u8 = 1;

/// A regular file or block device, read and written through io_uring on the calling thread.
///
/// Cheap on the hot path: an aligned read or write is one SQE (more only if the kernel
/// completes it short) and allocates nothing beyond the boxed future the trait returns.
pub struct FileExtent {
    name: String,
    path: PathBuf,
    fd: OwnedFd,
    kind: ExtentKind,
    /// Size in bytes; [`FileExtent::refresh_size`] updates it after the file or device grew.
    size: AtomicU64,
    read_only: bool,
    mode: IoMode,
    /// Buffer alignment for direct I/O (1 when buffered).
    mem_align: usize,
    /// Offset/length alignment for direct I/O (1 when buffered); a multiple of `mem_align`.
    off_align: u64,
    /// Granularity of native zeroing/discard on block devices (the logical block size, or
    /// `off_align` if larger).
    blk_unit: u64,
    limits: Limits,
    zero_method: AtomicU8,
    discard_method: AtomicU8,
    locks: RangeLocks,
    /// The file lives in RAM (tmpfs/ramfs): small requests are copied inline (see
    /// `write_loop`), large ones in parallel pieces (see `ram_parallel`).
    ram_backed: bool,
    /// Piece size and threshold for reads through `ram_parallel` (`usize::MAX`: never).
    ram_async_min: usize,
    /// A file in RAM mapped whole, for `copy_mapped` (kernel-side copies only).
    map: Option<Mapping>,
    /// The mapped file had no holes when last looked at (see `copy_mapped`): cleared by
    /// anything that may punch one (fallocate) or add one (growth).
    dense: AtomicBool,
}

/// A shared mapping of a whole file in RAM. Its bytes are only ever handed to system calls
/// (`copy_mapped`): if the file shrinks, those report `EFAULT`, where a load or store here
/// would raise `SIGBUS`.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is only an address passed to system calls; nothing here dereferences
// it, so sharing it between threads cannot race in this process.
unsafe impl Send for Mapping {}
// SAFETY: as for Send.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` (best effort: `None` if the kernel refuses, and the extent
    /// then copies through memory as before).
    fn new(fd: RawFd, len: u64, read_only: bool) -> Option<Mapping> {
        let len = usize::try_from(len).ok().filter(|&l| l > 0)?;
        let prot = if read_only {
            libc::PROT_READ
        } else {
            libc::PROT_READ | libc::PROT_WRITE
        };
        // SAFETY: a fresh shared mapping of our own descriptor; the kernel picks the address.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, 0) };
        if p == libc::MAP_FAILED {
            log::debug!(
                "mapping a {len}-byte file in RAM: {}",
                std::io::Error::last_os_error()
            );
            return None;
        }
        Some(Mapping { ptr: p.cast(), len })
    }

    /// Maps every page of the (hole-free) file now, in one call: otherwise each page's first
    /// use through the mapping is a page fault inside a kernel copy (half the throughput of
    /// 1M writes to new thin blocks in the VM). Costs page tables only: the pages exist.
    fn populate(&self, read_only: bool) {
        const MADV_POPULATE_READ: libc::c_int = 22;
        const MADV_POPULATE_WRITE: libc::c_int = 23;
        let advice = if read_only {
            MADV_POPULATE_READ
        } else {
            MADV_POPULATE_WRITE
        };
        // SAFETY: our own mapping; populating changes no contents.
        if unsafe { libc::madvise(self.ptr.cast(), self.len, advice) } != 0 {
            log::debug!(
                "prefaulting a {}-byte mapping: {}",
                self.len,
                std::io::Error::last_os_error()
            );
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

impl std::fmt::Debug for FileExtent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileExtent")
            .field("path", &self.path)
            .field("kind", &self.kind)
            .field("size", &self.size)
            .field("read_only", &self.read_only)
            .field("mode", &self.mode)
            .finish()
    }
}

fn open_fd(path: &Path, read_only: bool, direct: bool) -> std::io::Result<OwnedFd> {
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut flags = libc::O_CLOEXEC
        | if read_only {
            libc::O_RDONLY
        } else {
            libc::O_RDWR
        };
    if direct {
        flags |= libc::O_DIRECT;
    }
    // SAFETY: valid C string; open returns a new fd or -1.
    let fd = unsafe { libc::open(cpath.as_ptr(), flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is new and owned by us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl FileExtent {
    /// Opens a regular file or block device as an extent.
    pub fn open(path: impl AsRef<Path>, opts: OpenOptions) -> Result<FileExtent, ExtentError> {
        let path = path.as_ref().to_path_buf();
        let name = path.display().to_string();
        let want_direct = opts.direct != DirectMode::Never;
        let (fd, mut refused) = match open_fd(&path, opts.read_only, want_direct) {
            Ok(fd) => (fd, None),
            Err(e) if want_direct && e.raw_os_error() == Some(libc::EINVAL) => {
                let fd = open_fd(&path, opts.read_only, false)
                    .map_err(|e| ExtentError::io(&name, "open", e))?;
                (fd, Some("the file system refused O_DIRECT".to_string()))
            }
            Err(e) => return Err(ExtentError::io(&name, "open", e)),
        };
        let raw = fd.as_raw_fd();
        let st = sys::statx_fd(raw).map_err(|e| ExtentError::io(&name, "statx", e))?;
        let fmt = st.mode & libc::S_IFMT;
        let (kind, size, lbs, pbs) = if fmt == libc::S_IFREG {
            let pbs = st.blksize.clamp(512, 1 << 16).next_power_of_two();
            (ExtentKind::File, st.size, 512u32, pbs)
        } else if fmt == libc::S_IFBLK {
            let size = sys::blk_size(raw).map_err(|e| ExtentError::io(&name, "BLKGETSIZE64", e))?;
            let (l, p) = sys::blk_block_sizes(raw)
                .map_err(|e| ExtentError::io(&name, "BLKSSZGET/BLKPBSZGET", e))?;
            let kind = ExtentKind::BlockDevice {
                major: st.rdev.0,
                minor: st.rdev.1,
            };
            (kind, size, l, p)
        } else {
            return Err(ExtentError::Unsupported {
                path: name,
                msg: "not a regular file or block device".into(),
            });
        };

        // Decide direct or buffered, and the alignment direct I/O needs.
        let mut align = None;
        if want_direct && refused.is_none() {
            match (kind, st.dioalign) {
                (_, Some((0, _))) | (_, Some((_, 0))) => {
                    refused = Some("statx reports no direct I/O support".into());
                }
                (_, Some((m, o))) => align = Some((m, o)),
                (ExtentKind::BlockDevice { .. }, None) => align = Some((lbs, lbs)),
                (ExtentKind::File, None) => {
                    if sys::on_ram_fs(raw).unwrap_or(false) {
                        refused = Some("tmpfs/ramfs has no real O_DIRECT".into());
                    } else {
                        align = Some((FALLBACK_DIO_ALIGN, FALLBACK_DIO_ALIGN));
                    }
                }
            }
            if let Some((m, o)) = align {
                // The read-modify-write unit must also keep bounce sub-slices mem-aligned.
                let o = o.max(m);
                if !o.is_power_of_two() || !m.is_power_of_two() {
                    refused = Some(format!("odd direct I/O alignment {m}/{o}"));
                    align = None;
                } else if !size.is_multiple_of(u64::from(o)) {
                    refused = Some(format!(
                        "size {size} is not a multiple of the direct I/O alignment {o}"
                    ));
                    align = None;
                } else {
                    align = Some((m, o));
                }
            }
        }
        let mode = match (align, opts.direct) {
            (Some((m, o)), _) => IoMode::Direct {
                mem_align: m,
                offset_align: o,
            },
            (None, DirectMode::Always) => {
                return Err(ExtentError::Unsupported {
                    path: name,
                    msg: format!(
                        "direct I/O required but unavailable: {}",
                        refused.unwrap_or_default()
                    ),
                })
            }
            (None, DirectMode::Never) => IoMode::Buffered {
                reason: "buffered I/O asked for".into(),
            },
            (None, DirectMode::Auto) => {
                let reason = refused.unwrap_or_else(|| "direct I/O unavailable".into());
                if want_direct {
                    sys::clear_direct(raw)
                        .map_err(|e| ExtentError::io(&name, "clear O_DIRECT", e))?;
                }
                IoMode::Buffered { reason }
            }
        };
        let (mem_align, off_align) = match mode {
            IoMode::Direct {
                mem_align,
                offset_align,
            } => (mem_align as usize, u64::from(offset_align)),
            IoMode::Buffered { .. } => (1, 1),
        };

        let mut limits = Limits {
            logical_block_size: lbs,
            physical_block_size: pbs.max(lbs),
            io_opt: 0,
            max_io: 1 << 20,
            discard_granularity: 4096,
            discard_zeroes: true,
            write_zeroes: true,
            volatile_cache: true,
            fua: true,
            read_only: opts.read_only,
            multi_conn_safe: true,
        };
        if let ExtentKind::BlockDevice { major, minor } = kind {
            // Discard on a block device is a hint: nothing promises zeroes afterwards.
            limits.discard_zeroes = false;
            limits.discard_granularity = match sys::queue_num(major, minor, "discard_max_bytes") {
                Some(0) => 0,
                Some(_) => sys::queue_num(major, minor, "discard_granularity")
                    .map(|g| (g as u32).max(lbs))
                    .unwrap_or(lbs),
                None => lbs,
            };
            limits.io_opt = sys::queue_num(major, minor, "optimal_io_size")
                .and_then(|v| u32::try_from(v).ok())
                .unwrap_or(0);
            // A write-through device with O_DIRECT has no cache between us and the medium.
            if mem_align > 1 {
                limits.volatile_cache = sys::queue_attr(major, minor, "write_cache").as_deref()
                    != Some("write through");
            }
        }
        let blk_unit = u64::from(lbs).max(off_align);
        let ram_backed = kind == ExtentKind::File && sys::on_ram_fs(raw).unwrap_or(false);
        let map = if ram_backed {
            Mapping::new(raw, size, opts.read_only)
        } else {
            None
        };
        let dense = map.is_some() && no_hole(raw, 0, size);
        if let (Some(m), true) = (&map, dense) {
            m.populate(opts.read_only);
        }
        Ok(FileExtent {
            name,
            path,
            fd,
            kind,
            size: AtomicU64::new(size),
            read_only: opts.read_only,
            mode,
            mem_align,
            off_align,
            blk_unit,
            limits,
            zero_method: AtomicU8::new(ZERO_BY_ZERO_RANGE),
            discard_method: AtomicU8::new(DISCARD_BY_URING),
            locks: RangeLocks::default(),
            ram_backed,
            ram_async_min: ram_async_min(),
            dense: AtomicBool::new(dense),
            map,
        })
    }

    fn size_now(&self) -> Bytes {
        Bytes(self.size.load(Ordering::Relaxed))
    }

    /// Re-reads the size of the file or block device (after it was grown underneath: a
    /// table reload over the same extent then sees the new size) and returns it.
    pub fn refresh_size(&self) -> Result<Bytes, ExtentError> {
        let raw = self.raw();
        let size = match self.kind {
            ExtentKind::File => {
                sys::statx_fd(raw)
                    .map_err(|e| ExtentError::io(&self.name, "statx", e))?
                    .size
            }
            ExtentKind::BlockDevice { .. } => {
                sys::blk_size(raw).map_err(|e| ExtentError::io(&self.name, "BLKGETSIZE64", e))?
            }
        };
        if self.size.swap(size, Ordering::Relaxed) != size {
            self.dense.store(false, Ordering::Relaxed);
        }
        Ok(Bytes(size))
    }

    /// The path this extent was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// File or block device.
    pub fn kind(&self) -> ExtentKind {
        self.kind
    }

    /// Direct or buffered, and why.
    pub fn io_mode(&self) -> &IoMode {
        &self.mode
    }

    /// Whether I/O bypasses the page cache.
    pub fn is_direct(&self) -> bool {
        matches!(self.mode, IoMode::Direct { .. })
    }

    fn direct(&self) -> bool {
        self.mem_align > 1 || self.off_align > 1
    }

    fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn os_err(&self, what: &str, off: u64, len: u64, errno: i32) -> IoError {
        IoError::new(
            errno,
            format!(
                "{}: {what} at byte {off} length {len}: {}",
                self.name,
                sys::errno_text(errno)
            ),
        )
    }

    fn check_write(&self, what: &str, off: Bytes, len: Bytes) -> IoResult<()> {
        check_range(&self.name, self.size_now(), off, len)?;
        if self.read_only {
            return Err(IoError::read_only(format!(
                "{}: {what} at byte {} length {}: opened read-only",
                self.name, off.0, len.0
            )));
        }
        Ok(())
    }

    /// Whether a transfer at `ptr`/`off` of `len` bytes may go to the kernel as is.
    fn aligned(&self, ptr: usize, off: u64, len: usize) -> bool {
        ptr.is_multiple_of(self.mem_align)
            && off.is_multiple_of(self.off_align)
            && (len as u64).is_multiple_of(self.off_align)
    }

    fn align_down(&self, v: u64) -> u64 {
        v - v % self.off_align
    }

    fn align_up(&self, v: u64) -> u64 {
        v.div_ceil(self.off_align) * self.off_align
    }

    /// Reads until `buf` is full or the file ends. In direct mode it also stops after a short
    /// read that leaves an unaligned remainder, which only happens at the end of a file.
    /// Returns the bytes read.
    async fn read_loop(&self, off: u64, buf: &mut [u8]) -> IoResult<usize> {
        let mut done = 0usize;
        if self.ram_backed && buf.len() >= self.ram_async_min {
            done = self.ram_parallel(off, buf).await;
        }
        let mut retries = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(MAX_CHUNK);
            let chunk = &mut buf[done..done + n];
            let pos = off + done as u64;
            let r = if self.ram_backed {
                // As for writes (see `write_loop`): a tmpfs read is a memcpy from RAM that
                // io_uring would hand to an io-wq worker.
                // SAFETY: pread into a live, exclusively borrowed slice on our descriptor.
                cqe_style(unsafe {
                    libc::pread(
                        self.raw(),
                        chunk.as_mut_ptr() as *mut libc::c_void,
                        n,
                        pos as libc::off_t,
                    )
                })
            } else {
                let sqe = opcode::Read::new(types::Fd(self.raw()), chunk.as_mut_ptr(), n as u32)
                    .offset(pos)
                    .build();
                // SAFETY: `chunk` stays mutably borrowed until the op completes (or its drop
                // waits for the kernel); the fd lives as long as `self`.
                unsafe { iort::submit(sqe) }.await
            };
            if r < 0 {
                if (r == -libc::EINTR || r == -libc::EAGAIN) && retries < MAX_RETRIES {
                    retries += 1;
                    continue;
                }
                return Err(self.os_err("read", pos, n as u64, -r));
            }
            if r == 0 {
                break;
            }
            done += r as usize;
            if self.direct() && !self.aligned(buf.as_ptr() as usize + done, off + done as u64, 0) {
                break;
            }
        }
        Ok(done)
    }

    /// Reads `buf` as `ram_async_min`-sized pieces, all in flight at once and marked
    /// `IOSQE_ASYNC` (a buffered tmpfs copy would be punted to io-wq anyway; saying so up
    /// front skips the failed non-blocking try). Returns how many leading bytes are done:
    /// anything short or failed is left to the caller's sequential loop, which redoes it
    /// (rereading the same bytes is harmless) and reports errors with the usual retries.
    async fn ram_parallel(&self, off: u64, buf: &mut [u8]) -> usize {
        let piece = self.ram_async_min;
        let ops = buf.chunks_mut(piece).enumerate().map(|(i, c)| {
            let n = c.len();
            let sqe = opcode::Read::new(types::Fd(self.raw()), c.as_mut_ptr(), n as u32)
                .offset(off + (i * piece) as u64)
                .build()
                .flags(squeue::Flags::ASYNC);
            async move {
                // SAFETY: this future holds the piece's borrow until the op completes
                // (join_all drives every op to the end; dropping one in flight waits for
                // the kernel); the fd lives as long as `self`.
                let _piece = c;
                (n, unsafe { iort::submit(sqe) }.await)
            }
        });
        let mut done = 0usize;
        for (n, r) in futures::future::join_all(ops).await {
            if r != n as i32 {
                break;
            }
            done += n;
        }
        done
    }

    /// What a read that stopped at `n` of `buf.len()` bytes means: the end of a file (zeroes
    /// follow), or a block device that ended early (an error).
    fn finish_short_read(&self, off: u64, buf: &mut [u8], n: usize) -> IoResult<()> {
        if n == buf.len() {
            return Ok(());
        }
        match self.kind {
            ExtentKind::File => {
                buf[n..].fill(0);
                Ok(())
            }
            ExtentKind::BlockDevice { .. } => Err(IoError::eio(format!(
                "{}: read at byte {off} length {}: device ended at byte {}",
                self.name,
                buf.len(),
                off + n as u64
            ))),
        }
    }

    /// Writes until done. In direct mode it stops after a short write that leaves an unaligned
    /// remainder. Returns the bytes written.
    async fn write_loop(&self, off: u64, buf: &[u8], rw_flags: i32) -> IoResult<usize> {
        let mut done = 0usize;
        let mut retries = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(MAX_CHUNK);
            let chunk = &buf[done..done + n];
            let pos = off + done as u64;
            let r = if self.ram_backed {
                // io_uring cannot complete a buffered tmpfs write without blocking, so it hands
                // every one to an io-wq worker thread (two context switches per write, seen as
                // `iou-wrk` threads under a 4k write load). For a file in RAM the write is a
                // memcpy into the page cache: doing it inline is cheaper and never waits on a
                // disk. (RWF_DSYNC means nothing on tmpfs.)
                // SAFETY: pwrite from a live slice on our own descriptor.
                cqe_style(unsafe {
                    libc::pwrite(
                        self.raw(),
                        chunk.as_ptr() as *const libc::c_void,
                        n,
                        pos as libc::off_t,
                    )
                })
            } else {
                let sqe = opcode::Write::new(types::Fd(self.raw()), chunk.as_ptr(), n as u32)
                    .offset(pos)
                    .rw_flags(rw_flags)
                    .build();
                // SAFETY: `chunk` stays borrowed until the op completes; the fd lives with `self`.
                unsafe { iort::submit(sqe) }.await
            };
            if r < 0 {
                if (r == -libc::EINTR || r == -libc::EAGAIN) && retries < MAX_RETRIES {
                    retries += 1;
                    continue;
                }
                return Err(self.os_err("write", pos, n as u64, -r));
            }
            if r == 0 {
                return Err(IoError::eio(format!(
                    "{}: write at byte {pos} length {n}: the kernel wrote nothing",
                    self.name
                )));
            }
            done += r as usize;
            if self.direct() && !self.aligned(buf.as_ptr() as usize + done, off + done as u64, 0) {
                break;
            }
        }
        Ok(done)
    }

    /// Whether a fixed-buffer transfer of `len` bytes at `off` can go to the kernel as is (no
    /// bounce buffer: that would need the bytes in our memory).
    fn fixed_ok(&self, off: u64, len: usize) -> bool {
        if self.ram_backed {
            // io_uring hands every tmpfs operation to an io-wq worker, and serializes writes
            // to one file there. The mapped copy (`copy_mapped`) runs inline instead: 1.34x
            // (1M reads) and 1.36x (1M writes) of one fixed SQE in the VM benchmark, Linux
            // 7.3; for 4 KiB a fixed SQE was 0.70x of even a pread plus a /dev/ublkcN copy.
            // Without a mapping, requests of 64 KiB and more still gain from going fixed.
            if self.map.is_some() || len < RAM_ASYNC_MIN {
                return false;
            }
        }
        !self.direct()
            || (self.mem_align <= REQUEST_MEM_ALIGN
                && off.is_multiple_of(self.off_align)
                && (len as u64).is_multiple_of(self.off_align))
    }

    /// Moves `buf` to or from the file at `off` with fixed-buffer operations, as
    /// `read_loop`/`write_loop` do with memory, one SQE per request (for an unmapped file in
    /// RAM, one SQE measured faster than parallel async pieces: 1M reads 1.23x, writes 1.47x
    /// in the VM benchmark, Linux 7.3). Returns the bytes done; a read stops early only at the
    /// end of the file, a direct write only after a short write that left an unaligned
    /// remainder.
    async fn fixed_loop(
        &self,
        write: bool,
        off: u64,
        buf: FixedBuf,
        rw_flags: i32,
    ) -> IoResult<usize> {
        let mut done = 0usize;
        let mut retries = 0;
        while done < buf.len {
            let n = (buf.len - done).min(MAX_CHUNK);
            let pos = off + done as u64;
            let sqe = fixed_sqe(write, self.raw(), buf.slice(done, n), pos, rw_flags);
            // SAFETY: the registered buffer belongs to a request this thread owns until it
            // commits it, which is after this op completes (and the ring holds its own
            // reference on a registered buffer while an op uses it); the fd lives with `self`.
            let r = unsafe { iort::submit(sqe) }.await;
            if r < 0 {
                if (r == -libc::EINTR || r == -libc::EAGAIN) && retries < MAX_RETRIES {
                    retries += 1;
                    continue;
                }
                let what = if write { "write" } else { "read" };
                return Err(self.os_err(what, pos, n as u64, -r));
            }
            if r == 0 {
                if write {
                    return Err(IoError::eio(format!(
                        "{}: write at byte {pos} length {n}: the kernel wrote nothing",
                        self.name
                    )));
                }
                break;
            }
            done += r as usize;
            if self.direct() && !(off + done as u64).is_multiple_of(self.off_align) {
                break;
            }
        }
        Ok(done)
    }

    async fn do_read_fixed(&self, off: u64, buf: FixedBuf) -> IoResult<Served> {
        if !self.fixed_ok(off, buf.len) {
            return Ok(Served::NeedsMemory);
        }
        let n = self.fixed_loop(false, off, buf, 0).await?;
        if n == buf.len {
            return Ok(Served::Done);
        }
        match self.kind {
            // Past the end of a file reads as zeroes (as `finish_short_read`).
            ExtentKind::File => {
                let Some(zero) = dev_zero() else {
                    return Ok(Served::NeedsMemory);
                };
                let rest = buf.slice(n, buf.len - n);
                let sqe = fixed_sqe(false, zero, rest, 0, 0);
                // SAFETY: as in `fixed_loop`; /dev/zero stays open for the process.
                let r = unsafe { iort::submit(sqe) }.await;
                Ok(if r == rest.len as i32 {
                    Served::Done
                } else {
                    Served::NeedsMemory
                })
            }
            ExtentKind::BlockDevice { .. } => Err(IoError::eio(format!(
                "{}: read at byte {off} length {}: device ended at byte {}",
                self.name,
                buf.len,
                off + n as u64
            ))),
        }
    }

    async fn do_write_fixed(&self, off: u64, buf: FixedBuf, rw_flags: i32) -> IoResult<Served> {
        if !self.fixed_ok(off, buf.len) {
            return Ok(Served::NeedsMemory);
        }
        let n = self.fixed_loop(true, off, buf, rw_flags).await?;
        // A direct write cut short at an unaligned point needs the bounce path: redone whole.
        Ok(if n == buf.len {
            Served::Done
        } else {
            Served::NeedsMemory
        })
    }

    async fn do_read(&self, off: u64, buf: &mut [u8]) -> IoResult<()> {
        if self.aligned(buf.as_ptr() as usize, off, buf.len()) {
            let n = self.read_loop(off, buf).await?;
            return self.finish_short_read(off, buf, n);
        }
        // Unaligned in direct mode: read the covering aligned span into a bounce buffer.
        let end = off + buf.len() as u64;
        let (a0, a1) = (self.align_down(off), self.align_up(end));
        let mut b = AlignedBuf::zeroed((a1 - a0) as usize, self.mem_align)?;
        let n = self.read_loop(a0, &mut b).await?;
        self.finish_short_read(a0, &mut b, n)?;
        let s = (off - a0) as usize;
        buf.copy_from_slice(&b[s..s + buf.len()]);
        Ok(())
    }

    async fn do_write(&self, off: u64, buf: &[u8], rw_flags: i32) -> IoResult<()> {
        if self.aligned(buf.as_ptr() as usize, off, buf.len()) {
            let n = self.write_loop(off, buf, rw_flags).await?;
            if n == buf.len() {
                return Ok(());
            }
            return self.bounce_write(off + n as u64, &buf[n..], rw_flags).await;
        }
        self.bounce_write(off, buf, rw_flags).await
    }

    /// Reads one aligned block for a read-modify-write (zeroes past the end of a file).
    async fn read_block(&self, pos: u64, blk: &mut [u8]) -> IoResult<()> {
        let n = self.read_loop(pos, blk).await?;
        self.finish_short_read(pos, blk, n)
    }

    /// Writes an unaligned range in direct mode through an aligned bounce buffer.
    async fn bounce_write(&self, off: u64, data: &[u8], rw_flags: i32) -> IoResult<()> {
        let end = off + data.len() as u64;
        let (a0, a1) = (self.align_down(off), self.align_up(end));
        let partial = off != a0 || end != a1;
        // Partial blocks are read-modify-written: no other RMW of them may interleave.
        let _guard = if partial {
            Some(self.locks.lock(a0, a1).await)
        } else {
            None
        };
        let mut b = AlignedBuf::zeroed((a1 - a0) as usize, self.mem_align)?;
        let blk = self.off_align as usize;
        if off != a0 {
            self.read_block(a0, &mut b[..blk]).await?;
        }
        let tail_is_head = off != a0 && a1 - a0 == self.off_align;
        if end != a1 && !tail_is_head {
            let t = b.len() - blk;
            self.read_block(a1 - self.off_align, &mut b[t..]).await?;
        }
        let s = (off - a0) as usize;
        b[s..s + data.len()].copy_from_slice(data);
        let n = self.write_loop(a0, &b, rw_flags).await?;
        if n != b.len() {
            return Err(IoError::eio(format!(
                "{}: write at byte {} length {}: direct write stopped at an unaligned {} bytes",
                self.name,
                a0,
                b.len(),
                n
            )));
        }
        Ok(())
    }

    async fn fdatasync(&self) -> IoResult<()> {
        iort::fsync(self.raw(), true).await.map_err(|e| {
            let errno = e.raw_os_error().unwrap_or(libc::EIO);
            IoError::new(
                errno,
                format!("{}: fdatasync: {}", self.name, sys::errno_text(errno)),
            )
        })
    }

    async fn fallocate(&self, what: &str, mode: i32, off: u64, len: u64) -> IoResult<()> {
        // Punching or zeroing may leave holes, which mapped reads must not touch.
        self.dense.store(false, Ordering::Relaxed);
        iort::fallocate(self.raw(), mode, off, len)
            .await
            .map_err(|e| self.os_err(what, off, len, e.raw_os_error().unwrap_or(libc::EIO)))
    }

    /// Zeroes a byte range of a regular file with `fallocate`, trying the modes from
    /// `zero_method` on (discard starts at punch-hole); writes zeroes if none works.
    async fn file_zero(&self, what: &str, off: u64, len: u64, first: u8) -> IoResult<()> {
        {
            // fallocate zeroes partial blocks through the page cache: keep our RMWs out.
            let (a0, a1) = (self.align_down(off), self.align_up(off + len));
            let _guard = if self.direct() && (a0 != off || a1 != off + len) {
                Some(self.locks.lock(a0, a1).await)
            } else {
                None
            };
            let mut m = self.zero_method.load(Ordering::Relaxed).max(first);
            while m < ZERO_BY_WRITING {
                let mode = libc::FALLOC_FL_KEEP_SIZE
                    | if m == ZERO_BY_ZERO_RANGE {
                        libc::FALLOC_FL_ZERO_RANGE
                    } else {
                        libc::FALLOC_FL_PUNCH_HOLE
                    };
                match self.fallocate(what, mode, off, len).await {
                    Ok(()) => return Ok(()),
                    Err(e) if e.errno == libc::EOPNOTSUPP || e.errno == libc::ENOSYS => {
                        m += 1;
                        self.zero_method.fetch_max(m, Ordering::Relaxed);
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        write_zeroes_by_writing(self, Bytes(off), Bytes(len), WriteFlags::default()).await
    }

    /// Zeroes an aligned range of a block device: `fallocate(ZERO_RANGE)` through the ring
    /// (the kernel's `blkdev_issue_zeroout`, as `BLKZEROOUT`), then the ioctl, then writing.
    async fn blk_zero(&self, off: u64, len: u64) -> IoResult<()> {
        let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        if self.zero_method.load(Ordering::Relaxed) == ZERO_BY_ZERO_RANGE {
            match self.fallocate("write-zeroes", mode, off, len).await {
                Err(e) if e.errno == libc::EOPNOTSUPP || e.errno == libc::ENOSYS => {
                    self.zero_method.fetch_max(ZERO_BY_PUNCH, Ordering::Relaxed);
                }
                r => return r,
            }
        }
        if self.zero_method.load(Ordering::Relaxed) == ZERO_BY_PUNCH {
            match sys::blk_range_ioctl(self.raw(), sys::BLKZEROOUT, off, len) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    self.zero_method
                        .fetch_max(ZERO_BY_WRITING, Ordering::Relaxed);
                }
                Err(e) => {
                    let errno = e.raw_os_error().unwrap_or(libc::EIO);
                    return Err(self.os_err("BLKZEROOUT", off, len, errno));
                }
            }
        }
        write_zeroes_by_writing(self, Bytes(off), Bytes(len), WriteFlags::default()).await
    }

    /// Discards an aligned range of a block device: the io_uring block discard command
    /// (Linux 6.12+), else the synchronous `BLKDISCARD` ioctl.
    async fn blk_discard(&self, off: u64, len: u64) -> IoResult<()> {
        if self.discard_method.load(Ordering::Relaxed) == DISCARD_BY_URING {
            let mut cmd = [0u8; 16];
            cmd[..8].copy_from_slice(&len.to_ne_bytes());
            let sqe = opcode::UringCmd16::new(types::Fd(self.raw()), sys::BLOCK_URING_CMD_DISCARD)
                .addr(Some(off))
                .cmd(cmd)
                .build();
            // SAFETY: the SQE names no memory; the fd lives with `self`.
            let r = unsafe { iort::submit(sqe) }.await;
            match r {
                r if r >= 0 => return Ok(()),
                r if r == -libc::EOPNOTSUPP || r == -libc::EINVAL || r == -libc::ENOTTY => {
                    // Old kernel (or a backend ring without the command): use the ioctl.
                    self.discard_method
                        .store(DISCARD_BY_IOCTL, Ordering::Relaxed);
                }
                r => return Err(self.os_err("discard", off, len, -r)),
            }
        }
        sys::blk_range_ioctl(self.raw(), sys::BLKDISCARD, off, len).map_err(|e| {
            self.os_err(
                "BLKDISCARD",
                off,
                len,
                e.raw_os_error().unwrap_or(libc::EIO),
            )
        })
    }

    async fn do_write_zeroes(&self, off: u64, len: u64, flags: WriteFlags) -> IoResult<()> {
        match self.kind {
            ExtentKind::File => {
                self.file_zero("write-zeroes", off, len, ZERO_BY_ZERO_RANGE)
                    .await?
            }
            ExtentKind::BlockDevice { .. } => {
                // Native zeroing on whole units; partial edges go through the write path.
                let u = self.blk_unit;
                let end = off + len;
                let m0 = off.div_ceil(u) * u;
                let m1 = end - end % u;
                if m0 < m1 {
                    if off < m0 {
                        write_zeroes_by_writing(self, Bytes(off), Bytes(m0 - off), flags).await?;
                    }
                    self.blk_zero(m0, m1 - m0).await?;
                    if m1 < end {
                        write_zeroes_by_writing(self, Bytes(m1), Bytes(end - m1), flags).await?;
                    }
                } else {
                    write_zeroes_by_writing(self, Bytes(off), Bytes(len), flags).await?;
                }
            }
        }
        if flags.fua {
            self.fdatasync().await?;
        }
        Ok(())
    }

    async fn do_discard(&self, off: u64, len: u64) -> IoResult<()> {
        match self.kind {
            // Punch exactly the range: `discard_zeroes` promises zeroes.
            ExtentKind::File => self.file_zero("discard", off, len, ZERO_BY_PUNCH).await,
            ExtentKind::BlockDevice { .. } => {
                if self.limits.discard_granularity == 0 {
                    return Err(IoError::unsupported(format!(
                        "{}: discard at byte {off} length {len}: the device does not discard",
                        self.name
                    )));
                }
                // A hint: discard only the whole units inside the range.
                let u = self.blk_unit;
                let m0 = off.div_ceil(u) * u;
                let m1 = (off + len) - (off + len) % u;
                if m0 >= m1 {
                    return Ok(());
                }
                self.blk_discard(m0, m1 - m0).await
            }
        }
    }
}

impl AsFd for FileExtent {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl BlockDevice for FileExtent {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn size(&self) -> Bytes {
        self.size_now()
    }

    fn limits(&self) -> Limits {
        self.limits
    }

    fn read<'a>(&'a self, offset: Bytes, buf: &'a mut [u8]) -> IoFuture<'a> {
        Box::pin(async move {
            check_range(&self.name, self.size_now(), offset, Bytes(buf.len() as u64))?;
            if buf.is_empty() {
                return Ok(());
            }
            self.do_read(offset.0, buf).await
        })
    }

    fn write<'a>(&'a self, offset: Bytes, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a> {
        Box::pin(async move {
            self.check_write("write", offset, Bytes(buf.len() as u64))?;
            if buf.is_empty() {
                return Ok(());
            }
            let rw_flags = if flags.fua { libc::RWF_DSYNC } else { 0 };
            self.do_write(offset.0, buf, rw_flags).await
        })
    }

    fn read_fixed(&self, offset: Bytes, buf: FixedBuf) -> IoFuture<'_, Served> {
        Box::pin(async move {
            check_range(&self.name, self.size_now(), offset, Bytes(buf.len as u64))?;
            if buf.len == 0 {
                return Ok(Served::Done);
            }
            self.do_read_fixed(offset.0, buf).await
        })
    }

    fn write_fixed(&self, offset: Bytes, buf: FixedBuf, flags: WriteFlags) -> IoFuture<'_, Served> {
        Box::pin(async move {
            self.check_write("write", offset, Bytes(buf.len as u64))?;
            if buf.len == 0 {
                return Ok(Served::Done);
            }
            let rw_flags = if flags.fua { libc::RWF_DSYNC } else { 0 };
            self.do_write_fixed(offset.0, buf, rw_flags).await
        })
    }

    fn copy_mapped<'a>(
        &'a self,
        offset: Bytes,
        len: usize,
        write: Option<WriteFlags>,
        copy: tables::MappedCopy<'a>,
    ) -> IoFuture<'a, Served> {
        Box::pin(async move {
            // Durability needs nothing more: the file is in RAM, so FUA is moot.
            if write.is_some() {
                self.check_write("write", offset, Bytes(len as u64))?;
            } else {
                check_range(&self.name, self.size_now(), offset, Bytes(len as u64))?;
            }
            let Some(m) = &self.map else {
                return Ok(Served::NeedsMemory);
            };
            let off = offset.0 as usize;
            if off + len > m.len {
                return Ok(Served::NeedsMemory);
            }
            // A hole is read and written the plain way: a read fault on a tmpfs hole
            // allocates a page (pread does not), and filling holes through the mapping takes a
            // page fault per page (pwrite allocates them in one go).
            if !self.dense.load(Ordering::Relaxed) && !no_hole(self.raw(), offset.0, len as u64) {
                return Ok(Served::NeedsMemory);
            }
            // The address is only passed on to the kernel (see `MappedCopy`).
            match copy(m.ptr.wrapping_add(off), 0, len) {
                Ok(()) => Ok(Served::Done),
                // The file shrank under its mapping: the plain path handles its end.
                Err(e) if e.errno == libc::EFAULT => Ok(Served::NeedsMemory),
                Err(e) => Err(e.context(format_args!("{} at byte {off}", self.name))),
            }
        })
    }

    fn flush(&self) -> IoFuture<'_> {
        Box::pin(async move {
            // A file in RAM has no cache to write back (tmpfs's fsync does nothing): skip the
            // system call, which layers that flush often (the raid parity log) pay for.
            if self.read_only || self.ram_backed {
                return Ok(());
            }
            self.fdatasync().await
        })
    }

    fn discard(&self, offset: Bytes, len: Bytes) -> IoFuture<'_> {
        Box::pin(async move {
            self.check_write("discard", offset, len)?;
            if len.0 == 0 {
                return Ok(());
            }
            self.do_discard(offset.0, len.0).await
        })
    }

    fn write_zeroes(&self, offset: Bytes, len: Bytes, flags: WriteFlags) -> IoFuture<'_> {
        Box::pin(async move {
            self.check_write("write-zeroes", offset, len)?;
            if len.0 == 0 {
                return Ok(());
            }
            self.do_write_zeroes(offset.0, len.0, flags).await
        })
    }

    fn status(&self) -> String {
        let kind = match self.kind {
            ExtentKind::File => "file".to_string(),
            ExtentKind::BlockDevice { major, minor } => format!("blockdev {major}:{minor}"),
        };
        let mode = match &self.mode {
            IoMode::Direct {
                mem_align,
                offset_align,
            } => format!("direct align {mem_align}/{offset_align}"),
            IoMode::Buffered { reason } => format!("buffered ({reason})"),
        };
        format!(
            "{kind} {} {} {}{}",
            self.name,
            self.size_now().0,
            mode,
            if self.read_only { " ro" } else { "" }
        )
    }
}

/// Whether `[off, off+len)` of `fd` has no hole (`SEEK_HOLE`; false if it cannot tell).
fn no_hole(fd: RawFd, off: u64, len: u64) -> bool {
    let Ok(at) = libc::off_t::try_from(off) else {
        return false;
    };
    // SAFETY: lseek on our own descriptor; SEEK_HOLE only reports, it moves nothing we use
    // (all our I/O is positional).
    let h = unsafe { libc::lseek(fd, at, libc::SEEK_HOLE) };
    h >= 0 && h as u64 >= off + len
}

/// One `READ_FIXED` or `WRITE_FIXED` of all of `buf` at file offset `pos` on `fd`.
fn fixed_sqe(write: bool, fd: RawFd, buf: FixedBuf, pos: u64, rw_flags: i32) -> squeue::Entry {
    let addr = buf.addr(0);
    if write {
        opcode::WriteFixed::new(types::Fd(fd), addr as *const u8, buf.len as u32, buf.index)
            .offset(pos)
            .rw_flags(rw_flags)
            .build()
    } else {
        opcode::ReadFixed::new(types::Fd(fd), addr as *mut u8, buf.len as u32, buf.index)
            .offset(pos)
            .build()
    }
}

/// A `pread`/`pwrite` return value in io_uring's convention (bytes, or a negative errno), so
/// the inline and ring paths share their result handling. Chunks are at most `MAX_CHUNK`, so
/// the byte count fits an `i32`.
fn cqe_style(r: isize) -> i32 {
    if r < 0 {
        -std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    } else {
        r as i32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileExt, MetadataExt};
    use std::process::Command;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Fixed-buffer reads and writes (ublk zero copy) move the same bytes as plain ones on a
    /// disk file (direct I/O); what they cannot do as is they decline. A file in RAM declines
    /// them all: its mapping serves instead (`copy_mapped`, tested below).
    #[test]
    fn fixed_buffer_io_matches_plain_io() {
        let rt = iort::Runtime::new(64).unwrap();
        let mut reg = AlignedBuf::zeroed(2 << 20, 4096).unwrap();
        let base = reg.as_mut_ptr() as u64;
        let iov = libc::iovec {
            iov_base: reg.as_mut_ptr().cast(),
            iov_len: reg.len(),
        };
        // SAFETY: `reg` outlives `rt` (dropped explicitly before it below).
        unsafe { rt.register_buffers(&[iov]) }.unwrap();
        let fixed = |offset: u64, len: usize| FixedBuf {
            index: 0,
            base,
            offset,
            len,
        };

        let ram = tempfile::tempdir_in("/dev/shm").unwrap();
        let rp = ram.path().join("x");
        std::fs::write(&rp, pattern(1 << 20, 3)).unwrap();
        let in_ram = FileExtent::open(&rp, OpenOptions::default()).unwrap();
        rt.block_on(async {
            let w = in_ram.write_fixed(Bytes(0), fixed(0, 256 << 10), WriteFlags::default());
            assert_eq!(w.await.unwrap(), Served::NeedsMemory);
            let r = in_ram.read_fixed(Bytes(0), fixed(0, 4096));
            assert_eq!(r.await.unwrap(), Served::NeedsMemory);
        });

        let d = tempfile::tempdir_in("/var/tmp").unwrap();
        let p = d.path().join("x");
        std::fs::write(&p, pattern(1 << 20, 3)).unwrap();
        let e = FileExtent::open(&p, OpenOptions::default()).unwrap();
        let data = pattern(256 << 10, 9);
        reg[4096..4096 + data.len()].copy_from_slice(&data);
        rt.block_on(async {
            let w = e.write_fixed(Bytes(64 << 10), fixed(4096, data.len()), WriteFlags::FUA);
            assert_eq!(w.await.unwrap(), Served::Done);
            let mut back = vec![0u8; data.len()];
            e.read(Bytes(64 << 10), &mut back).await.unwrap();
            assert!(back == data, "fixed write differs");

            let r = e.read_fixed(Bytes(0), fixed(1 << 20, 512 << 10));
            assert_eq!(r.await.unwrap(), Served::Done);
            let mut plain = vec![0u8; 512 << 10];
            e.read(Bytes(0), &mut plain).await.unwrap();
            assert!(reg[1 << 20..(1 << 20) + (512 << 10)] == plain[..]);

            let small = e.read_fixed(Bytes(8192), fixed(0, 4096)).await.unwrap();
            assert_eq!(small, Served::Done);
            if e.is_direct() {
                let odd = e.read_fixed(Bytes(100), fixed(0, 64 << 10)).await.unwrap();
                assert_eq!(odd, Served::NeedsMemory, "unaligned direct");
            }
            // Past the end of a file that shrank: zeroes, as plain reads give.
            std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .unwrap()
                .set_len(512 << 10)
                .unwrap();
            reg[..256 << 10].fill(0xee);
            let r = e.read_fixed(Bytes(384 << 10), fixed(0, 256 << 10));
            assert_eq!(r.await.unwrap(), Served::Done);
            e.read(Bytes(384 << 10), &mut plain[..256 << 10])
                .await
                .unwrap();
            assert!(reg[..256 << 10] == plain[..256 << 10], "tail");
            assert!(reg[128 << 10..256 << 10].iter().all(|&b| b == 0));
        });
        drop(rt);
        drop(reg);
    }

    /// A file in RAM hands its mapped bytes to a kernel copy; a file on disk declines; a
    /// mapping past the end of a file that shrank reports EFAULT and is declined too.
    #[test]
    fn files_in_ram_copy_through_their_mapping() {
        let d = tempfile::tempdir_in("/dev/shm").unwrap();
        let p = d.path().join("x");
        std::fs::write(&p, pattern(1 << 20, 5)).unwrap();
        let e = FileExtent::open(&p, OpenOptions::default()).unwrap();
        // The "request": a file on disk, copied to and from with pread/pwrite as the ublk
        // front end does with /dev/ublkcN.
        let r = tempfile::tempfile_in("/var/tmp").unwrap();
        let rfd = r.as_raw_fd();
        let to_req = move |ptr: *mut u8, at: usize, k: usize| -> IoResult<()> {
            // SAFETY: the kernel reads the mapping (or reports EFAULT).
            let n = unsafe { libc::pwrite(rfd, ptr.cast_const().cast(), k, at as i64) };
            match n {
                n if n == k as isize => Ok(()),
                _ => Err(IoError::from(std::io::Error::last_os_error())),
            }
        };
        let from_req = move |ptr: *mut u8, at: usize, k: usize| -> IoResult<()> {
            // SAFETY: the kernel writes the mapping (or reports EFAULT).
            let n = unsafe { libc::pread(rfd, ptr.cast(), k, at as i64) };
            match n {
                n if n == k as isize => Ok(()),
                _ => Err(IoError::from(std::io::Error::last_os_error())),
            }
        };
        iort::block_on(async {
            let s = e
                .copy_mapped(Bytes(8192), 12288, None, &to_req)
                .await
                .unwrap();
            assert_eq!(s, Served::Done);
            let mut got = vec![0u8; 12288];
            assert_eq!(r.read_at(&mut got, 0).unwrap(), 12288);
            assert!(got[..] == pattern(1 << 20, 5)[8192..8192 + 12288]);

            let data = pattern(4096, 77);
            r.write_at(&data, 100).unwrap();
            let s = e
                .copy_mapped(Bytes(65536), 4096, Some(WriteFlags::default()), &from_req)
                .await
                .unwrap();
            assert_eq!(s, Served::Done);
            let mut back = vec![0u8; 4096];
            e.read(Bytes(65536), &mut back).await.unwrap();
            // The mapping got the request's first 4096 bytes (`at` counts from 0).
            let mut want = vec![0u8; 4096];
            r.read_at(&mut want, 0).unwrap();
            assert!(back == want);

            std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .unwrap()
                .set_len(256 << 10)
                .unwrap();
            let s = e
                .copy_mapped(Bytes(512 << 10), 4096, None, &to_req)
                .await
                .unwrap();
            assert_eq!(s, Served::NeedsMemory, "a page past the new end");
        })
        .unwrap();

        // A sparse file in RAM: holes are read the plain way (a mapped read would allocate
        // them); once written, the range goes mapped.
        let sp = d.path().join("sparse");
        std::fs::File::create(&sp)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        let se = FileExtent::open(&sp, OpenOptions::default()).unwrap();
        let blocks = || std::fs::metadata(&sp).unwrap().blocks();
        iort::block_on(async {
            let s = se
                .copy_mapped(Bytes(0), 4 << 20, None, &to_req)
                .await
                .unwrap();
            assert_eq!(s, Served::NeedsMemory, "a hole");
            let w = se.copy_mapped(
                Bytes(1 << 20),
                65536,
                Some(WriteFlags::default()),
                &from_req,
            );
            assert_eq!(w.await.unwrap(), Served::NeedsMemory, "a write into a hole");
            assert_eq!(blocks(), 0, "nothing allocated");
            se.write(Bytes(0), &pattern(65536, 1), WriteFlags::default())
                .await
                .unwrap();
            let s = se
                .copy_mapped(Bytes(0), 65536, None, &to_req)
                .await
                .unwrap();
            assert_eq!(s, Served::Done, "written range");
            let s = se
                .copy_mapped(Bytes(0), 131072, None, &to_req)
                .await
                .unwrap();
            assert_eq!(s, Served::NeedsMemory, "half written, half hole");
        })
        .unwrap();

        let dd = tempfile::tempdir_in("/var/tmp").unwrap();
        let q = dd.path().join("y");
        std::fs::write(&q, pattern(1 << 20, 6)).unwrap();
        let disk = FileExtent::open(&q, OpenOptions::default()).unwrap();
        let s = iort::block_on(disk.copy_mapped(Bytes(0), 4096, None, &to_req))
            .unwrap()
            .unwrap();
        assert_eq!(s, Served::NeedsMemory);
    }

    #[test]
    fn file_zeroing_falls_back_where_zero_range_is_unsupported() {
        for (dir, want) in [
            ("/dev/shm", ZERO_BY_PUNCH),
            ("/var/tmp", ZERO_BY_ZERO_RANGE),
        ] {
            let d = tempfile::tempdir_in(dir).unwrap();
            let p = d.path().join("z.img");
            create_sparse(&p, Bytes(1 << 20)).unwrap();
            let e = FileExtent::open(&p, OpenOptions::default()).unwrap();
            iort::block_on(async {
                e.write(Bytes(0), &pattern(65536, 1), WriteFlags::default())
                    .await
                    .unwrap();
                e.write_zeroes(Bytes(4096), Bytes(8192), WriteFlags::default())
                    .await
                    .unwrap();
                let mut b = vec![1u8; 16384];
                e.read(Bytes(0), &mut b).await.unwrap();
                assert!(b[4096..12288].iter().all(|&x| x == 0));
                assert_eq!(b[12288..], pattern(65536, 1)[12288..16384]);
            })
            .unwrap();
            assert_eq!(e.zero_method.load(Ordering::Relaxed), want, "{dir}");
        }
    }

    /// The synchronous ioctl fallbacks (kernels without the io_uring block discard command)
    /// and plain zero-writing, forced on a loop device.
    #[test]
    fn block_device_fallbacks_work() {
        assert!(
            unsafe { libc::geteuid() } == 0,
            "needs root for losetup; does not skip silently"
        );
        let d = tempfile::tempdir_in("/var/tmp").unwrap();
        let backing = d.path().join("b.img");
        create_sparse(&backing, Bytes(4 << 20)).unwrap();
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&backing)
            .output()
            .expect("losetup (util-linux) is needed");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let result = std::panic::catch_unwind(|| {
            let e = FileExtent::open(&dev, OpenOptions::default()).unwrap();
            e.discard_method.store(DISCARD_BY_IOCTL, Ordering::Relaxed);
            iort::block_on(async {
                let data = pattern(1 << 20, 7);
                e.write(Bytes(0), &data, WriteFlags::default())
                    .await
                    .unwrap();
                for method in [ZERO_BY_PUNCH, ZERO_BY_WRITING] {
                    e.write(Bytes(0), &data, WriteFlags::default())
                        .await
                        .unwrap();
                    e.zero_method.store(method, Ordering::Relaxed);
                    e.write_zeroes(Bytes(4096), Bytes(65536), WriteFlags::default())
                        .await
                        .unwrap();
                    let mut b = vec![1u8; 1 << 20];
                    e.read(Bytes(0), &mut b).await.unwrap();
                    assert_eq!(b[..4096], data[..4096]);
                    assert!(b[4096..69632].iter().all(|&x| x == 0), "method {method}");
                    assert_eq!(b[69632..], data[69632..]);
                }
                e.discard(Bytes(0), Bytes(1 << 20)).await.unwrap();
                e.flush().await.unwrap();
            })
            .unwrap();
        });
        let _ = Command::new("losetup").args(["-d", &dev]).status();
        if let Err(p) = result {
            std::panic::resume_unwind(p);
        }
    }
}
