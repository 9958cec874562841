//! Files in RAM (tmpfs/ramfs) mapped whole, so that the front end copies a request straight
//! between the mapping and its own buffer in one kernel copy (`copy_mapped`).

use std::os::fd::RawFd;
use std::sync::atomic::Ordering;

use tables::{Bytes, IoResult, Served};

use super::FileExtent;

/// A shared mapping of a whole file in RAM. Its bytes are only ever handed to system calls
/// (`copy_mapped`): if the file shrinks, those report `EFAULT` (turned into EIO), where a
/// load or store here would raise `SIGBUS`.
pub(super) struct Mapping {
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
    pub(super) fn new(fd: RawFd, len: u64, read_only: bool) -> Option<Mapping> {
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
    pub(super) fn populate(&self, read_only: bool) {
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

impl FileExtent {
    /// `copy_mapped` once the range is checked: the copy through the mapping, or
    /// `NeedsMemory` where the plain path must serve.
    pub(super) async fn do_copy_mapped(
        &self,
        offset: Bytes,
        len: usize,
        write: bool,
        copy: tables::MappedCopy<'_>,
    ) -> IoResult<Served> {
        let Some(m) = &self.map else {
            return Ok(Served::NeedsMemory);
        };
        let Some(off) = usize::try_from(offset.0)
            .ok()
            .filter(|&o| o <= m.len && len <= m.len - o)
        else {
            return Ok(Served::NeedsMemory);
        };
        // A hole is read and written the plain way: a read fault on a tmpfs hole
        // allocates a page (pread does not), and filling holes through the mapping takes a
        // page fault per page (pwrite allocates them in one go).
        if !self.dense.load(Ordering::Relaxed) && !no_hole(self.raw(), offset.0, len as u64) {
            return Ok(Served::NeedsMemory);
        }
        let what = if write { "write" } else { "read" };
        // SAFETY: `off + len <= m.len` (checked above), so the range is inside our mapping of
        // the file, which `self` keeps mapped for the whole call.
        match unsafe { copy.copy(m.ptr.wrapping_add(off), 0, len) } {
            // A file that shrank still has the page holding its new end mapped: past the end
            // in that page a read sees zeroes and a write is lost, with no EFAULT. So the
            // length is checked after every copy (one lseek, a fraction of a 4 KiB copy).
            Ok(()) => {
                self.check_eof(what, offset.0, len as u64)?;
                Ok(Served::Done)
            }
            // Pages wholly past the end of a file that shrank: EIO saying so. Any other
            // EFAULT is left to the plain path.
            Err(e) if e.errno == libc::EFAULT => {
                self.check_eof(what, offset.0, len as u64)?;
                Ok(Served::NeedsMemory)
            }
            Err(e) => Err(e.context(format_args!("{} at byte {off}", self.name))),
        }
    }
}

/// Whether `[off, off+len)` of `fd` has no hole (`SEEK_HOLE`; false if it cannot tell).
pub(super) fn no_hole(fd: RawFd, off: u64, len: u64) -> bool {
    let Ok(at) = libc::off_t::try_from(off) else {
        return false;
    };
    // SAFETY: lseek on our own descriptor; SEEK_HOLE only reports, it moves nothing we use
    // (all our I/O is positional).
    let h = unsafe { libc::lseek(fd, at, libc::SEEK_HOLE) };
    h >= 0 && h as u64 >= off + len
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::file::test_util::pattern;
    use crate::file::OpenOptions;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{FileExt, MetadataExt};
    use tables::{BlockDevice, IoError, MappedCopy, WriteFlags};

    /// A file in RAM hands its mapped bytes to a kernel copy; a file on disk declines; a copy
    /// past the end of a file that shrank is an error.
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
            // SAFETY: called only through `MappedCopy::copy`, whose caller vouches that `ptr`
            // is mapped for the call; the kernel reads it (or reports EFAULT).
            let n = unsafe { libc::pwrite(rfd, ptr.cast_const().cast(), k, at as i64) };
            match n {
                n if n == k as isize => Ok(()),
                _ => Err(IoError::from(std::io::Error::last_os_error())),
            }
        };
        let to_req = MappedCopy::new(&to_req);
        let from_req = move |ptr: *mut u8, at: usize, k: usize| -> IoResult<()> {
            // SAFETY: as above; the kernel writes the mapping (or reports EFAULT).
            let n = unsafe { libc::pread(rfd, ptr.cast(), k, at as i64) };
            match n {
                n if n == k as isize => Ok(()),
                _ => Err(IoError::from(std::io::Error::last_os_error())),
            }
        };
        let from_req = MappedCopy::new(&from_req);
        iort::block_on(async {
            let s = e
                .copy_mapped(Bytes(8192), 12288, None, to_req)
                .await
                .unwrap();
            assert_eq!(s, Served::Done);
            let mut got = vec![0u8; 12288];
            assert_eq!(r.read_at(&mut got, 0).unwrap(), 12288);
            assert!(got[..] == pattern(1 << 20, 5)[8192..8192 + 12288]);

            let data = pattern(4096, 77);
            r.write_at(&data, 100).unwrap();
            let s = e
                .copy_mapped(Bytes(65536), 4096, Some(WriteFlags::default()), from_req)
                .await
                .unwrap();
            assert_eq!(s, Served::Done);
            let mut back = vec![0u8; 4096];
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { e.read(Bytes(65536), &mut back) }.await.unwrap();
            // The mapping got the request's first 4096 bytes (`at` counts from 0).
            let mut want = vec![0u8; 4096];
            r.read_at(&mut want, 0).unwrap();
            assert!(back == want);

            // The file shrinks to a length inside a page: pages past it give EFAULT, the
            // rest of the page holding the end reads as zeroes through the mapping. Both are
            // EIO naming the path, the offset and the new length; the data before the end
            // still copies, and a write past the end neither succeeds nor grows the file.
            let cut = (256 << 10) + 100;
            std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .unwrap()
                .set_len(cut)
                .unwrap();
            let err = e
                .copy_mapped(Bytes(512 << 10), 4096, None, to_req)
                .await
                .unwrap_err();
            assert_eq!(err.errno, libc::EIO, "a page past the new end: {err}");
            for want in [
                p.to_str().unwrap(),
                "read at byte 524288",
                "is now 262244 bytes",
            ] {
                assert!(err.msg.contains(want), "{want}: {err}");
            }
            let err = e
                .copy_mapped(Bytes(256 << 10), 4096, None, to_req)
                .await
                .unwrap_err();
            assert_eq!(err.errno, libc::EIO, "the page holding the end: {err}");
            let w = e.copy_mapped(
                Bytes(256 << 10),
                4096,
                Some(WriteFlags::default()),
                from_req,
            );
            let err = w.await.unwrap_err();
            assert_eq!(err.errno, libc::EIO, "a write past the end: {err}");
            assert_eq!(std::fs::metadata(&p).unwrap().len(), cut);
            let s = e
                .copy_mapped(Bytes(8192), 12288, None, to_req)
                .await
                .unwrap();
            assert_eq!(s, Served::Done, "before the end");
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
                .copy_mapped(Bytes(0), 4 << 20, None, to_req)
                .await
                .unwrap();
            assert_eq!(s, Served::NeedsMemory, "a hole");
            let w = se.copy_mapped(Bytes(1 << 20), 65536, Some(WriteFlags::default()), from_req);
            assert_eq!(w.await.unwrap(), Served::NeedsMemory, "a write into a hole");
            assert_eq!(blocks(), 0, "nothing allocated");
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { se.write(Bytes(0), &pattern(65536, 1), WriteFlags::default()) }
                .await
                .unwrap();
            let s = se.copy_mapped(Bytes(0), 65536, None, to_req).await.unwrap();
            assert_eq!(s, Served::Done, "written range");
            let s = se
                .copy_mapped(Bytes(0), 131072, None, to_req)
                .await
                .unwrap();
            assert_eq!(s, Served::NeedsMemory, "half written, half hole");
        })
        .unwrap();

        let dd = tempfile::tempdir_in("/var/tmp").unwrap();
        let q = dd.path().join("y");
        std::fs::write(&q, pattern(1 << 20, 6)).unwrap();
        let disk = FileExtent::open(&q, OpenOptions::default()).unwrap();
        let s = iort::block_on(disk.copy_mapped(Bytes(0), 4096, None, to_req))
            .unwrap()
            .unwrap();
        assert_eq!(s, Served::NeedsMemory);
    }
}
