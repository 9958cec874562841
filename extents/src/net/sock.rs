//! A buffered receiver for reply streams on the calling thread's io_uring (sends use
//! [`nbd::send_all_vectored`]).

use std::io;
use std::os::fd::RawFd;

use iort::io_uring::{opcode, types};

/// A buffered reader over a socket; it lends the kernel only its own buffer.
pub(crate) struct Receiver {
    fd: RawFd,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Receiver {
    pub(crate) fn new(fd: RawFd, size: usize) -> Receiver {
        Receiver {
            fd,
            buf: vec![0u8; size].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// Makes at least `n` bytes (at most the buffer's size) available; EOF is an error.
    ///
    /// # Safety
    /// The kernel writes into this receiver's buffer until the operation completes: keep the
    /// [lending contract](tables::io#the-lending-contract) for the returned future (complete
    /// or drop it; never leak it and then drop the receiver).
    pub(crate) async unsafe fn need(&mut self, n: usize) -> io::Result<&[u8]> {
        let n = n.min(self.buf.len());
        while self.end - self.start < n {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let free = &mut self.buf[self.end..];
            let sqe =
                opcode::Recv::new(types::Fd(self.fd), free.as_mut_ptr(), free.len() as u32).build();
            // SAFETY: the buffer is owned by `self`, which this future borrows mutably until
            // the operation completes or is dropped (the op's drop waits for the kernel); our
            // caller keeps the lending contract.
            let got = iort::cqe_result(unsafe { iort::submit(sqe) }.await)?;
            if got == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                ));
            }
            self.end += got;
        }
        Ok(&self.buf[self.start..self.start + n])
    }

    /// Consumes `n` bytes made available by [`Receiver::need`].
    pub(crate) fn consume(&mut self, n: usize) {
        self.start += n.min(self.end - self.start);
    }

    /// The buffer's size: the most one [`Receiver::need`] returns.
    pub(crate) fn capacity(&self) -> usize {
        self.buf.len()
    }
}
