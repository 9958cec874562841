//! Write-zeroes and discard: `fallocate` (zero range, punch hole) on files, the ring's
//! zero-range and block discard command or the `BLKZEROOUT`/`BLKDISCARD` ioctls on block
//! devices, and writing zeroes where nothing native works.

use std::sync::atomic::Ordering;

use iort::io_uring::{opcode, types};
use tables::io::write_zeroes_by_writing;
use tables::{Bytes, IoError, IoResult, WriteFlags};

use super::{ExtentKind, FileExtent};
use crate::sys;

// Which fallocate mode last worked for file write-zeroes.
pub(super) const ZERO_BY_ZERO_RANGE: u8 = 0;
const ZERO_BY_PUNCH: u8 = 1;
const ZERO_BY_WRITING: u8 = 2;
// How block-device discard is issued.
pub(super) const DISCARD_BY_URING: u8 = 0;
const DISCARD_BY_IOCTL: u8 = 1;

impl FileExtent {
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

    pub(super) async fn do_write_zeroes(
        &self,
        off: u64,
        len: u64,
        flags: WriteFlags,
    ) -> IoResult<()> {
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

    pub(super) async fn do_discard(&self, off: u64, len: u64) -> IoResult<()> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::file::test_util::pattern;
    use crate::file::{create_sparse, OpenOptions};
    use std::process::Command;
    use tables::BlockDevice;

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
                // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
                unsafe { e.write(Bytes(0), &pattern(65536, 1), WriteFlags::default()) }
                    .await
                    .unwrap();
                e.write_zeroes(Bytes(4096), Bytes(8192), WriteFlags::default())
                    .await
                    .unwrap();
                let mut b = vec![1u8; 16384];
                // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
                unsafe { e.read(Bytes(0), &mut b) }.await.unwrap();
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
            // SAFETY: geteuid has no preconditions.
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
                // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
                unsafe { e.write(Bytes(0), &data, WriteFlags::default()) }
                    .await
                    .unwrap();
                for method in [ZERO_BY_PUNCH, ZERO_BY_WRITING] {
                    // SAFETY: awaited here, in block_on: completed or dropped before the buffer
                    // goes.
                    unsafe { e.write(Bytes(0), &data, WriteFlags::default()) }
                        .await
                        .unwrap();
                    e.zero_method.store(method, Ordering::Relaxed);
                    e.write_zeroes(Bytes(4096), Bytes(65536), WriteFlags::default())
                        .await
                        .unwrap();
                    let mut b = vec![1u8; 1 << 20];
                    // SAFETY: awaited here, in block_on: completed or dropped before the buffer
                    // goes.
                    unsafe { e.read(Bytes(0), &mut b) }.await.unwrap();
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
