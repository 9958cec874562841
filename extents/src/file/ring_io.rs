//! The I/O loops through io_uring: reads and writes from memory (inline `pread`/`pwrite`
//! for files in RAM, parallel async pieces for their large reads), fixed-buffer reads and
//! writes (ublk zero copy), short transfers, retries, and `fdatasync`.

use std::os::fd::RawFd;

use iort::io_uring::{opcode, squeue, types};
use tables::{Bytes, FixedBuf, IoError, IoResult, Served};

use super::FileExtent;
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
pub(super) fn ram_async_min() -> usize {
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

impl FileExtent {
    /// Reads until `buf` is full or the file ends. In direct mode it also stops after a short
    /// read that leaves an unaligned remainder, which only happens at the end of a file.
    /// Returns the bytes read.
    ///
    /// # Safety
    /// The kernel writes into `buf` until each operation completes: keep the
    /// [lending contract](tables::io#the-lending-contract) for the returned future.
    pub(super) async unsafe fn read_loop(&self, off: u64, buf: &mut [u8]) -> IoResult<usize> {
        let mut done = 0usize;
        if self.ram_backed && buf.len() >= self.ram_async_min {
            // SAFETY: awaited here, in a future our caller keeps the lending contract for.
            done = unsafe { self.ram_parallel(off, buf) }.await;
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
                // SAFETY: `chunk` is borrowed for this future's life, which our caller
                // completes or drops (the op's drop waits for the kernel): the lending
                // contract. The fd lives as long as `self`.
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
            done += self.moved("read", pos, n, r)?;
            if self.direct() && !self.aligned(buf.as_ptr() as usize + done, off + done as u64, 0) {
                break;
            }
        }
        Ok(done)
    }

    /// The byte count of a successful transfer of `n` bytes at `pos` (`r` > 0), checked: a
    /// count above what was asked (no kernel should report one) would run the loops' slicing
    /// past the buffer, so it is an error rather than a panic.
    pub(super) fn moved(&self, what: &str, pos: u64, n: usize, r: i32) -> IoResult<usize> {
        match usize::try_from(r) {
            Ok(m) if m <= n => Ok(m),
            _ => Err(IoError::eio(format!(
                "{}: {what} at byte {pos} length {n}: the kernel reported {r} bytes done",
                self.name
            ))),
        }
    }

    /// Reads `buf` as `ram_async_min`-sized pieces, all in flight at once and marked
    /// `IOSQE_ASYNC` (a buffered tmpfs copy would be punted to io-wq anyway; saying so up
    /// front skips the failed non-blocking try). Returns how many leading bytes are done:
    /// anything short or failed is left to the caller's sequential loop, which redoes it
    /// (rereading the same bytes is harmless) and reports errors with the usual retries.
    ///
    /// # Safety
    /// The kernel writes into `buf` until each operation completes: keep the
    /// [lending contract](tables::io#the-lending-contract) for the returned future.
    async unsafe fn ram_parallel(&self, off: u64, buf: &mut [u8]) -> usize {
        let piece = self.ram_async_min;
        let ops = buf.chunks_mut(piece).enumerate().map(|(i, c)| {
            let n = c.len();
            let sqe = opcode::Read::new(types::Fd(self.raw()), c.as_mut_ptr(), n as u32)
                .offset(off + (i * piece) as u64)
                .build()
                .flags(squeue::Flags::ASYNC);
            async move {
                let _piece = c;
                // SAFETY: this future holds the piece's borrow until the op completes:
                // join_all drives every op to the end, and our caller completes or drops
                // the whole (dropping an op in flight waits for the kernel). The fd lives
                // as long as `self`.
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

    /// Writes until done. In direct mode it stops after a short write that leaves an unaligned
    /// remainder. Returns the bytes written.
    ///
    /// # Safety
    /// The kernel reads `buf` until each operation completes: keep the
    /// [lending contract](tables::io#the-lending-contract) for the returned future.
    pub(super) async unsafe fn write_loop(
        &self,
        off: u64,
        buf: &[u8],
        rw_flags: i32,
    ) -> IoResult<usize> {
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
                // SAFETY: `chunk` is borrowed for this future's life, which our caller
                // completes or drops (the lending contract); the fd lives with `self`.
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
            done += self.moved("write", pos, n, r)?;
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
            done += self.moved(if write { "write" } else { "read" }, pos, n, r)?;
            if self.direct() && !(off + done as u64).is_multiple_of(self.off_align) {
                break;
            }
        }
        Ok(done)
    }

    pub(super) async fn do_read_fixed(&self, off: u64, buf: FixedBuf) -> IoResult<Served> {
        if !self.fixed_ok(off, buf.len) {
            return Ok(Served::NeedsMemory);
        }
        let n = self.fixed_loop(false, off, buf, 0).await?;
        if n == buf.len {
            return Ok(Served::Done);
        }
        Err(self.past_end("read", off, buf.len as u64, off.saturating_add(n as u64)))
    }

    pub(super) async fn do_write_fixed(
        &self,
        off: u64,
        buf: FixedBuf,
        rw_flags: i32,
    ) -> IoResult<Served> {
        if !self.fixed_ok(off, buf.len) {
            return Ok(Served::NeedsMemory);
        }
        self.check_eof("write", off, buf.len as u64)?;
        let n = self.fixed_loop(true, off, buf, rw_flags).await?;
        // A direct write cut short at an unaligned point needs the bounce path: redone whole.
        Ok(if n == buf.len {
            Served::Done
        } else {
            Served::NeedsMemory
        })
    }

    pub(super) async fn fdatasync(&self) -> IoResult<()> {
        iort::fsync(self.raw(), true).await.map_err(|e| {
            let errno = e.raw_os_error().unwrap_or(libc::EIO);
            IoError::new(
                errno,
                format!("{}: fdatasync: {}", self.name, sys::errno_text(errno)),
            )
        })
    }
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
    use crate::file::bounce::AlignedBuf;
    use crate::file::test_util::pattern;
    use crate::file::OpenOptions;
    use tables::{BlockDevice, WriteFlags};

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
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { e.read(Bytes(64 << 10), &mut back) }.await.unwrap();
            assert!(back == data, "fixed write differs");

            let r = e.read_fixed(Bytes(0), fixed(1 << 20, 512 << 10));
            assert_eq!(r.await.unwrap(), Served::Done);
            let mut plain = vec![0u8; 512 << 10];
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { e.read(Bytes(0), &mut plain) }.await.unwrap();
            assert!(reg[1 << 20..(1 << 20) + (512 << 10)] == plain[..]);

            let small = e.read_fixed(Bytes(8192), fixed(0, 4096)).await.unwrap();
            assert_eq!(small, Served::Done);
            if e.is_direct() {
                let odd = e.read_fixed(Bytes(100), fixed(0, 64 << 10)).await.unwrap();
                assert_eq!(odd, Served::NeedsMemory, "unaligned direct");
            }
            // Past the end of a file that shrank: EIO naming the path, the offset and the
            // new size, as plain reads give; within it, the data. Writes do not grow it back.
            std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .unwrap()
                .set_len(512 << 10)
                .unwrap();
            let err = e
                .read_fixed(Bytes(384 << 10), fixed(0, 256 << 10))
                .await
                .unwrap_err();
            assert_eq!(err.errno, libc::EIO, "{err}");
            let name = p.to_str().unwrap();
            for want in [name, "read at byte 393216", "is now 524288 bytes"] {
                assert!(err.msg.contains(want), "{want}: {err}");
            }
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            let err = unsafe { e.read(Bytes(384 << 10), &mut plain[..256 << 10]) }
                .await
                .unwrap_err();
            assert_eq!(err.errno, libc::EIO, "{err}");
            let r = e.read_fixed(Bytes(256 << 10), fixed(0, 256 << 10));
            assert_eq!(r.await.unwrap(), Served::Done);
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { e.read(Bytes(256 << 10), &mut plain[..256 << 10]) }
                .await
                .unwrap();
            assert!(reg[..256 << 10] == plain[..256 << 10], "within the new end");
            let w = e.write_fixed(Bytes(768 << 10), fixed(0, 4096), WriteFlags::default());
            let err = w.await.unwrap_err();
            assert_eq!(err.errno, libc::EIO, "{err}");
            assert_eq!(std::fs::metadata(&p).unwrap().len(), 512 << 10, "not grown");
        });
        drop(rt);
        drop(reg);
    }

    /// A completion that claims more bytes than were asked for is an EIO naming the path and
    /// the offset, not an overrun of the request's buffer (`&buf[n..]` past its end panicked
    /// in the write path). No kernel can be made to report one, so the check is tested alone.
    #[test]
    fn an_overlong_completion_is_an_error() {
        let d = tempfile::tempdir_in("/var/tmp").unwrap();
        let p = d.path().join("x");
        std::fs::write(&p, pattern(8192, 1)).unwrap();
        let e = FileExtent::open(&p, OpenOptions::default()).unwrap();
        assert_eq!(e.moved("read", 4096, 4096, 4096).unwrap(), 4096);
        assert_eq!(e.moved("write", 4096, 4096, 512).unwrap(), 512);
        let err = e.moved("write", 4096, 4096, 8192).unwrap_err();
        assert_eq!(err.errno, libc::EIO);
        for want in [
            p.to_str().unwrap(),
            "write at byte 4096",
            "reported 8192 bytes",
        ] {
            assert!(err.msg.contains(want), "{want}: {err}");
        }
        assert!(e.moved("read", 0, 4096, -5).is_err());
    }
}
