//! Thin wrappers over the Linux calls io_uring does not cover: block-device ioctls, `statx`,
//! `fstatfs`, and the block queue limits in sysfs.

use std::io;
use std::os::fd::RawFd;

/// Generic Linux ioctl number encoding (x86, arm, riscv...).
const fn ioc(dir: u64, ty: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (ty << 8) | nr
}
const IOC_NONE: u64 = 0;
const IOC_READ: u64 = 2;

/// `BLKGETSIZE64`: device size in bytes (`_IOR(0x12, 114, size_t)`).
pub(crate) const BLKGETSIZE64: u64 = ioc(IOC_READ, 0x12, 114, 8);
/// `BLKDISCARD`: discard a byte range (`_IO(0x12, 119)`), argument `u64[2]`.
pub(crate) const BLKDISCARD: u64 = ioc(IOC_NONE, 0x12, 119, 0);
/// `BLKZEROOUT`: zero a byte range (`_IO(0x12, 127)`), argument `u64[2]`.
pub(crate) const BLKZEROOUT: u64 = ioc(IOC_NONE, 0x12, 127, 0);
/// `BLOCK_URING_CMD_DISCARD` (`_IO(0x12, 0)`): asynchronous discard through io_uring
/// (Linux 6.12+); start in `sqe->addr`, length in `sqe->addr3`.
pub(crate) const BLOCK_URING_CMD_DISCARD: u32 = ioc(IOC_NONE, 0x12, 0, 0) as u32;

const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Size of a block device in bytes.
pub(crate) fn blk_size(fd: RawFd) -> io::Result<u64> {
    let mut v: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 to the pointer.
    cvt(unsafe { libc::ioctl(fd, BLKGETSIZE64 as libc::Ioctl, &mut v as *mut u64) })?;
    Ok(v)
}

/// Logical and physical block size of a block device.
pub(crate) fn blk_block_sizes(fd: RawFd) -> io::Result<(u32, u32)> {
    let mut lbs: libc::c_int = 0;
    let mut pbs: libc::c_uint = 0;
    // SAFETY: BLKSSZGET writes an int, BLKPBSZGET an unsigned int.
    cvt(unsafe { libc::ioctl(fd, libc::BLKSSZGET, &mut lbs as *mut libc::c_int) })?;
    // SAFETY: as above, into `pbs`.
    cvt(unsafe { libc::ioctl(fd, libc::BLKPBSZGET, &mut pbs as *mut libc::c_uint) })?;
    Ok(block_sizes(lbs, pbs))
}

/// Logical and physical block sizes from what the ioctls wrote: at least 512, the physical
/// at least the logical (a negative logical size, which no kernel reports, counts as 0).
fn block_sizes(lbs: libc::c_int, pbs: libc::c_uint) -> (u32, u32) {
    let l = u32::try_from(lbs).unwrap_or(0).max(512);
    (l, pbs.max(l))
}

/// `BLKDISCARD` or `BLKZEROOUT` over `[start, start+len)` (synchronous: the fallbacks for
/// kernels whose io_uring cannot do it).
pub(crate) fn blk_range_ioctl(fd: RawFd, req: u64, start: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [start, len];
    // SAFETY: both ioctls read a u64[2] from the pointer.
    cvt(unsafe { libc::ioctl(fd, req as libc::Ioctl, range.as_ptr()) }).map(|_| ())
}

/// What `statx` says about an open file.
pub(crate) struct StatX {
    pub mode: u32,
    pub size: u64,
    pub blksize: u32,
    pub rdev: (u32, u32),
    /// `(memory alignment, offset alignment)` if the kernel reported STATX_DIOALIGN; `(0, 0)`
    /// there means the file does not support direct I/O.
    pub dioalign: Option<(u32, u32)>,
}

/// `statx` of an open fd.
pub(crate) fn statx_fd(fd: RawFd) -> io::Result<StatX> {
    // SAFETY: statx is plain integers; all-zero is a valid value.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: empty C string with AT_EMPTY_PATH stats the fd itself; `st` is writable.
    cvt(unsafe {
        libc::statx(
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_BASIC_STATS | libc::STATX_DIOALIGN,
            &mut st,
        )
    })?;
    let dioalign = (st.stx_mask & libc::STATX_DIOALIGN != 0)
        .then_some((st.stx_dio_mem_align, st.stx_dio_offset_align));
    Ok(StatX {
        mode: u32::from(st.stx_mode),
        size: st.stx_size,
        blksize: st.stx_blksize,
        rdev: (st.stx_rdev_major, st.stx_rdev_minor),
        dioalign,
    })
}

/// The current length of an open regular file: `lseek(SEEK_END)`, the cheapest way to ask
/// (about a bare system call; `statx` costs twice that).
pub(crate) fn file_len(fd: RawFd) -> io::Result<u64> {
    // SAFETY: lseek on an fd the caller owns. It moves only the file offset, which none of
    // our I/O uses (it is all positional).
    let r = unsafe { libc::lseek(fd, 0, libc::SEEK_END) };
    u64::try_from(r).map_err(|_| io::Error::last_os_error())
}

/// Whether the fd lives on a RAM filesystem, where O_DIRECT is accepted but means nothing.
pub(crate) fn on_ram_fs(fd: RawFd) -> io::Result<bool> {
    // SAFETY: statfs is plain integers; fstatfs fills it.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes one statfs into `st`, which is ours and writable.
    cvt(unsafe { libc::fstatfs(fd, &mut st) })?;
    let t = st.f_type as i64;
    Ok(t == TMPFS_MAGIC || t == RAMFS_MAGIC)
}

/// Clears `O_DIRECT` on an open fd (the buffered fallback).
pub(crate) fn clear_direct(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on an fd we own.
    let fl = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    // SAFETY: as above; no pointers involved.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, fl & !libc::O_DIRECT) }).map(|_| ())
}

/// Reads a block device's queue attribute from sysfs (partitions read their disk's queue).
pub(crate) fn queue_attr(major: u32, minor: u32, name: &str) -> Option<String> {
    let base = format!("/sys/dev/block/{major}:{minor}");
    std::fs::read_to_string(format!("{base}/queue/{name}"))
        .or_else(|_| std::fs::read_to_string(format!("{base}/../queue/{name}")))
        .ok()
        .map(|s| s.trim().to_string())
}

/// A queue attribute as a number.
pub(crate) fn queue_num(major: u32, minor: u32, name: &str) -> Option<u64> {
    queue_attr(major, minor, name).and_then(|s| s.parse().ok())
}

/// The `/dev` node of block device `major:minor`: `/dev/block/M:m` when udev made it, else the
/// `DEVNAME` the kernel reports in sysfs.
pub(crate) fn devnode(major: u32, minor: u32) -> io::Result<std::path::PathBuf> {
    let link = std::path::PathBuf::from(format!("/dev/block/{major}:{minor}"));
    if link.exists() {
        return Ok(link);
    }
    let uevent = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/uevent"))?;
    uevent
        .lines()
        .find_map(|l| l.strip_prefix("DEVNAME="))
        .map(|n| std::path::PathBuf::from(format!("/dev/{n}")))
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "sysfs names no DEVNAME"))
}

/// `strerror` text without std's " (os error N)" suffix.
pub(crate) fn errno_text(errno: i32) -> String {
    let s = io::Error::from_raw_os_error(errno).to_string();
    match s.rfind(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sizes_are_sane_whatever_the_ioctls_wrote() {
        assert_eq!(block_sizes(512, 4096), (512, 4096));
        assert_eq!(block_sizes(4096, 512), (4096, 4096));
        assert_eq!(block_sizes(0, 0), (512, 512));
        // A negative logical size must not turn into a physical size of 4 GiB - 1.
        assert_eq!(block_sizes(-1, 0), (512, 512));
    }
}
