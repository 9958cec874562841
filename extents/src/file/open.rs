//! Opening an extent: probing what the path is (file or block device), its size and block
//! sizes, choosing direct or buffered I/O and the alignment it needs, and the limits the
//! extent reports; [`OpenOptions`], [`ExtentError`] and [`create_sparse`].

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};

use tables::{Bytes, IoError, Limits};

use super::bounce::RangeLocks;
use super::mapping::{no_hole, Mapping};
use super::ring_io::ram_async_min;
use super::zeroing::{DISCARD_BY_URING, ZERO_BY_ZERO_RANGE};
use super::FileExtent;
use crate::sys;

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
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct OpenOptions {
    /// Open read-only: writes, discards and write-zeroes fail with `EROFS`.
    pub read_only: bool,
    /// Direct or buffered I/O.
    pub direct: DirectMode,
    /// Claim a block device exclusively (`O_EXCL`, the default): a disk that holds a mounted
    /// file system, or that md, dm, a loop device, another volume or any other exclusive
    /// opener holds, is refused with `EBUSY` naming it, and while the extent is open nobody
    /// else can claim the device either. `false` forces sharing it (two writers that know
    /// nothing of each other corrupt it). One extent shared through a
    /// [`crate::FileResolver`] counts once, however many table lines name it. Regular files
    /// are never claimed.
    pub exclusive: bool,
}

impl Default for OpenOptions {
    fn default() -> OpenOptions {
        OpenOptions {
            read_only: false,
            direct: DirectMode::default(),
            exclusive: true,
        }
    }
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
    /// A regular file: size is its length when opened (or refreshed). If it shrinks under the
    /// extent, reads and writes that reach past its new end fail with EIO; writes do not
    /// grow it back.
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
    /// A table names a relative path where relative paths are refused (see
    /// [`crate::RelativePaths`]).
    #[error("table names relative path '{path}': give an absolute path{}", base_text(.base))]
    RelativePath {
        /// The path as the table gave it.
        path: String,
        /// The base directory it would have been taken from, if that was not absolute.
        base: Option<String>,
    },
}

/// How a refused relative path explains itself when a base directory was given.
fn base_text(base: &Option<String>) -> String {
    match base {
        Some(b) => format!(" (the base directory '{b}' is not absolute either)"),
        None => String::new(),
    }
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
            ExtentError::Unsupported { .. } | ExtentError::RelativePath { .. } => libc::EINVAL,
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

/// A block device's discard granularity for [`Limits`] from its sysfs queue attributes: 0
/// if it cannot discard, at least the logical block size, and the logical block size where
/// sysfs says nothing usable (a value that does not fit a `u32` is not one).
fn discard_granularity(max_bytes: Option<u64>, granularity: Option<u64>, lbs: u32) -> u32 {
    match max_bytes {
        Some(0) => 0,
        _ => granularity
            .and_then(|g| u32::try_from(g).ok())
            .map_or(lbs, |g| g.max(lbs)),
    }
}

/// What an exclusive open that found the block device busy says.
const EXCL_BUSY: &str = "open exclusively: the device is mounted, or held by md, dm, a loop \
     device or another volume (OpenOptions::exclusive = false shares it)";

/// Whether `path` names a block device (false if it cannot be looked at: the open then
/// reports why).
fn is_block_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

/// Opens `path` with `extra` flags (`O_DIRECT`, `O_EXCL`) on top of the access mode.
fn open_fd(path: &Path, read_only: bool, extra: libc::c_int) -> std::io::Result<OwnedFd> {
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let flags = libc::O_CLOEXEC
        | extra
        | if read_only {
            libc::O_RDONLY
        } else {
            libc::O_RDWR
        };
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
        // O_EXCL without O_CREAT only means something for block devices (elsewhere it is
        // undefined): ask for it only where the path is one.
        let excl = if opts.exclusive && is_block_device(&path) {
            libc::O_EXCL
        } else {
            0
        };
        let open_err = |e: std::io::Error| {
            if excl != 0 && e.raw_os_error() == Some(libc::EBUSY) {
                ExtentError::io(&name, EXCL_BUSY, e)
            } else {
                ExtentError::io(&name, "open", e)
            }
        };
        let direct_flag = if want_direct { libc::O_DIRECT } else { 0 };
        let (fd, mut refused) = match open_fd(&path, opts.read_only, excl | direct_flag) {
            Ok(fd) => (fd, None),
            Err(e) if want_direct && e.raw_os_error() == Some(libc::EINVAL) => {
                let fd = open_fd(&path, opts.read_only, excl).map_err(open_err)?;
                (fd, Some("the file system refused O_DIRECT".to_string()))
            }
            Err(e) => return Err(open_err(e)),
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
            limits.discard_granularity = discard_granularity(
                sys::queue_num(major, minor, "discard_max_bytes"),
                sys::queue_num(major, minor, "discard_granularity"),
                lbs,
            );
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discard_granularity_from_sysfs_values() {
        assert_eq!(
            discard_granularity(Some(0), Some(4096), 512),
            0,
            "no discard"
        );
        assert_eq!(discard_granularity(Some(1 << 30), Some(4096), 512), 4096);
        assert_eq!(discard_granularity(Some(1 << 30), Some(0), 512), 512);
        assert_eq!(discard_granularity(None, None, 4096), 4096);
        assert_eq!(discard_granularity(Some(1 << 30), None, 512), 512);
        // Too large for the limits' u32: not read as its low 32 bits (which are 0 here).
        assert_eq!(discard_granularity(Some(1 << 30), Some(1 << 32), 512), 512);
        assert_eq!(
            discard_granularity(Some(1 << 30), Some((1 << 32) + 8192), 512),
            512
        );
    }
}
