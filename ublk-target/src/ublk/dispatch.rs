//! Serving one request: ublk's operations mapped onto [`BlockDevice`] calls.

use std::panic::AssertUnwindSafe;

use futures::FutureExt;
use libublk::sys;
use tables::io::{BlockDevice, IoError, Served, WriteFlags};
use tables::Bytes;

use super::zero_copy::ZcRequest;

/// Serves one request: the ublk result (bytes for reads and writes, 0 otherwise, or a
/// negative errno). A target error or panic fails only this request. `buf` holds the data
/// (copy mode) or is scratch for the fallback (zero-copy mode, `zc` set).
///
/// # Safety
/// The table's targets may lend `buf` to the kernel: keep the
/// [lending contract](tables::io#the-lending-contract) for the returned future.
pub(super) async unsafe fn serve(
    dev: &dyn BlockDevice,
    iod: &sys::ublksrv_io_desc,
    buf: &mut [u8],
    zc: Option<ZcRequest>,
) -> i32 {
    match AssertUnwindSafe(execute(dev, iod, buf, zc))
        .catch_unwind()
        .await
    {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => {
            log::warn!("{}: {e}", dev.name());
            if e.errno > 0 {
                -e.errno
            } else {
                -libc::EIO
            }
        }
        Err(_) => {
            log::error!(
                "{}: target panicked serving op {} at sector {} (+{}); failing the request",
                dev.name(),
                iod.op_flags & 0xff,
                iod.start_sector,
                iod.nr_sectors
            );
            -libc::EIO
        }
    }
}

/// ublk's operation codes and flags, mapped onto the [`BlockDevice`] calls.
///
/// # Safety
/// As [`serve`].
async unsafe fn execute(
    dev: &dyn BlockDevice,
    iod: &sys::ublksrv_io_desc,
    buf: &mut [u8],
    zc: Option<ZcRequest>,
) -> Result<i32, IoError> {
    let op = iod.op_flags & 0xff;
    if op == sys::UBLK_IO_OP_FLUSH {
        // A flush carries no range (the kernel leaves its sector at -1).
        return dev.flush().await.map(|()| 0);
    }
    // ublk always counts in 512-byte sectors, whatever the logical block size.
    let off = iod
        .start_sector
        .checked_mul(512)
        .ok_or_else(|| IoError::invalid(format!("sector {} overflows", iod.start_sector)))?;
    let len = u64::from(iod.nr_sectors) << 9;
    let flags = if iod.op_flags & sys::UBLK_IO_F_FUA != 0 {
        WriteFlags::FUA
    } else {
        WriteFlags::default()
    };
    let data_len = || -> Result<usize, IoError> {
        usize::try_from(len)
            .ok()
            .filter(|&n| n <= buf.len() && n <= i32::MAX as usize)
            .ok_or_else(|| {
                IoError::invalid(format!(
                    "request of {len} bytes at byte {off} exceeds the {}-byte buffer",
                    buf.len()
                ))
            })
    };
    match op {
        sys::UBLK_IO_OP_READ => {
            let n = data_len()?;
            if let Some(z) = zc {
                if z.direct(dev, off, n, false, flags).await? == Served::Done {
                    return Ok(n as i32);
                }
            }
            dev.read(Bytes(off), &mut buf[..n]).await?;
            if let Some(z) = zc {
                z.copy(&mut buf[..n], true)
                    .map_err(|e| e.context(format_args!("read at byte {off}")))?;
            }
            Ok(n as i32)
        }
        sys::UBLK_IO_OP_WRITE => {
            let n = data_len()?;
            if let Some(z) = zc {
                if z.direct(dev, off, n, true, flags).await? == Served::Done {
                    return Ok(n as i32);
                }
                z.copy(&mut buf[..n], false)
                    .map_err(|e| e.context(format_args!("write at byte {off}")))?;
            }
            dev.write(Bytes(off), &buf[..n], flags).await?;
            Ok(n as i32)
        }
        sys::UBLK_IO_OP_DISCARD => dev.discard(Bytes(off), Bytes(len)).await.map(|()| 0),
        sys::UBLK_IO_OP_WRITE_ZEROES => dev
            .write_zeroes(Bytes(off), Bytes(len), flags)
            .await
            .map(|()| 0),
        other => Err(IoError::unsupported(format!(
            "ublk operation {other} at byte {off} is not supported"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tables::mem::MemDevice;

    fn iod(op: u32, sector: u64, sectors: u32) -> sys::ublksrv_io_desc {
        sys::ublksrv_io_desc {
            op_flags: op,
            nr_sectors: sectors,
            start_sector: sector,
            addr: 0,
        }
    }

    #[test]
    fn requests_map_onto_the_device() {
        let dev = MemDevice::new("m", Bytes(1 << 20));
        let mut buf = vec![0u8; 64 << 10];
        iort::block_on(async {
            buf[..4096].fill(7);
            let w = iod(sys::UBLK_IO_OP_WRITE | sys::UBLK_IO_F_FUA, 8, 8);
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            assert_eq!(unsafe { serve(&dev, &w, &mut buf, None) }.await, 4096);
            buf.fill(0);
            assert_eq!(
                // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
                unsafe { serve(&dev, &iod(sys::UBLK_IO_OP_READ, 8, 8), &mut buf, None) }.await,
                4096
            );
            assert!(buf[..4096].iter().all(|&b| b == 7));
            // The kernel's flushes carry sector -1.
            let f = iod(sys::UBLK_IO_OP_FLUSH, u64::MAX, 0);
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            assert_eq!(unsafe { serve(&dev, &f, &mut buf, None) }.await, 0);
            assert_eq!(
                // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
                unsafe {
                    serve(
                        &dev,
                        &iod(sys::UBLK_IO_OP_WRITE_ZEROES, 8, 8),
                        &mut buf,
                        None,
                    )
                }
                .await,
                0
            );
            assert_eq!(
                // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
                unsafe { serve(&dev, &iod(sys::UBLK_IO_OP_READ, 8, 8), &mut buf, None) }.await,
                4096
            );
            assert!(buf[..4096].iter().all(|&b| b == 0));
            assert_eq!(
                // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
                unsafe { serve(&dev, &iod(sys::UBLK_IO_OP_DISCARD, 0, 16), &mut buf, None) }.await,
                0
            );
        })
        .unwrap();
    }

    #[test]
    fn errors_become_negative_errnos() {
        let dev = MemDevice::new("m", Bytes(1 << 20));
        let mut buf = vec![0u8; 8192];
        iort::block_on(async {
            // Past the end: the device's ENOSPC.
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            let r =
                unsafe { serve(&dev, &iod(sys::UBLK_IO_OP_READ, 2048, 8), &mut buf, None) }.await;
            assert_eq!(r, -libc::ENOSPC);
            // Larger than the tag buffer.
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            let r = unsafe { serve(&dev, &iod(sys::UBLK_IO_OP_READ, 0, 64), &mut buf, None) }.await;
            assert_eq!(r, -libc::EINVAL);
            // Unknown operation.
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            let r = unsafe {
                serve(
                    &dev,
                    &iod(sys::UBLK_IO_OP_ZONE_APPEND, 0, 8),
                    &mut buf,
                    None,
                )
            }
            .await;
            assert_eq!(r, -libc::EOPNOTSUPP);
        })
        .unwrap();
    }

    /// A device whose reads panic: the request fails, the server does not. With a pipe, a
    /// read first starts a read on it, then panics in the other branch of a join while that
    /// read still waits for data.
    struct Panicky {
        pipe: Option<std::os::fd::RawFd>,
    }
    impl BlockDevice for Panicky {
        fn name(&self) -> String {
            "panicky".into()
        }
        fn size(&self) -> Bytes {
            Bytes(1 << 20)
        }
        unsafe fn read<'a>(&'a self, _: Bytes, buf: &'a mut [u8]) -> tables::IoFuture<'a> {
            let Some(pipe) = self.pipe else {
                return Box::pin(async { panic!("target bug") });
            };
            Box::pin(async move {
                use iort::io_uring::{opcode, types};
                let len = u32::try_from(buf.len()).unwrap();
                let sqe = opcode::Read::new(types::Fd(pipe), buf.as_mut_ptr(), len)
                    .offset(u64::MAX)
                    .build();
                // SAFETY: `buf` is borrowed for this future's life, which our caller
                // completes or drops (the lending contract).
                let read = async { unsafe { iort::submit(sqe) }.await };
                let bug = async {
                    iort::yield_now().await;
                    panic!("target bug while a read is in flight");
                };
                futures::join!(read, bug);
                Ok(())
            })
        }
        unsafe fn write<'a>(
            &'a self,
            _: Bytes,
            _: &'a [u8],
            _: WriteFlags,
        ) -> tables::IoFuture<'a> {
            tables::io::ready(Ok(()))
        }
        fn flush(&self) -> tables::IoFuture<'_> {
            tables::io::ready(Ok(()))
        }
        fn discard(&self, _: Bytes, _: Bytes) -> tables::IoFuture<'_> {
            tables::io::ready(Ok(()))
        }
        fn write_zeroes(&self, _: Bytes, _: Bytes, _: WriteFlags) -> tables::IoFuture<'_> {
            tables::io::ready(Ok(()))
        }
    }

    #[test]
    fn a_panicking_target_fails_the_request() {
        let mut buf = vec![0u8; 4096];
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        let r = iort::block_on(unsafe {
            serve(
                &Panicky { pipe: None },
                &iod(sys::UBLK_IO_OP_READ, 0, 8),
                &mut buf,
                None,
            )
        })
        .unwrap();
        assert_eq!(r, -libc::EIO);
    }

    /// On the queue ring (as on a ublk queue thread), a target that panics while one of its
    /// reads is in flight fails the request, and the request's buffer is not written once
    /// `serve` has returned it (the dropped read waited for its completion).
    #[test]
    fn a_panic_mid_read_on_the_queue_ring_leaves_no_write_into_the_buffer() {
        use crate::ublk::ring::tests::{feed, pipe, run};
        use std::os::fd::AsRawFd;
        crate::ublk::ring::init_test_ring().unwrap();
        iort::set_backend(Some(std::rc::Rc::new(crate::ublk::ring::QueueRingBackend)));
        let (rd, wr) = pipe();
        let dev = Panicky {
            pipe: Some(rd.as_raw_fd()),
        };
        let mut buf = vec![0xAAu8; 4096];
        // SAFETY: `run` drives it to completion before the buffer goes.
        let r = run(unsafe { serve(&dev, &iod(sys::UBLK_IO_OP_READ, 0, 8), &mut buf, None) });
        assert_eq!(r, -libc::EIO);
        // The tag buffer now serves the next request: the old read must not land in it.
        feed(&wr);
        iort::set_backend(None);
        assert!(
            buf.iter().all(|&b| b == 0xAA),
            "a read dropped with its request wrote into the tag buffer afterwards"
        );
    }
}
