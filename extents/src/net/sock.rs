//! A buffered receiver for reply streams on the calling thread's io_uring (sends use
//! [`nbd::send_all_vectored`]).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use iort::io_uring::{opcode, types};

use super::nbd::link::Wired;

/// A buffered reader over a socket; it lends the kernel only its own buffer.
pub(crate) struct Receiver {
    w: Arc<Wired>,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// Ciphertext as received, for a TLS connection, and the part the session has not
    /// taken yet.
    cipher: Box<[u8]>,
    cstart: usize,
    cend: usize,
}

/// Ciphertext taken per receive on a TLS connection (a few records).
const CIPHER_BUF: usize = 64 * 1024;

impl Receiver {
    pub(crate) fn new(w: Arc<Wired>, size: usize) -> Receiver {
        let cipher = if w.tls.is_some() { CIPHER_BUF } else { 0 };
        Receiver {
            w,
            buf: vec![0u8; size].into_boxed_slice(),
            start: 0,
            end: 0,
            cipher: vec![0u8; cipher].into_boxed_slice(),
            cstart: 0,
            cend: 0,
        }
    }

    /// Receives into `self.cipher` (TLS) or the free end of `self.buf`; 0 means EOF.
    ///
    /// # Safety
    /// As [`Receiver::need`].
    async unsafe fn recv_some(&mut self, into_cipher: bool) -> io::Result<usize> {
        let free: &mut [u8] = if into_cipher {
            &mut self.cipher
        } else {
            &mut self.buf[self.end..]
        };
        let sqe = opcode::Recv::new(
            types::Fd(self.w.fd.as_raw_fd()),
            free.as_mut_ptr(),
            free.len() as u32,
        )
        .build();
        // SAFETY: the buffer is owned by `self`, which this future borrows mutably until the
        // operation completes or is dropped (the op's drop waits for the kernel); our caller
        // keeps the lending contract.
        iort::cqe_result(unsafe { iort::submit(sqe) }.await)
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
            // A handle of our own, so the session can be used while `self` is borrowed.
            let w = self.w.clone();
            if let Some(t) = &w.tls {
                // Plaintext the session already holds comes first.
                match super::nbd::tls::plaintext(t, &mut self.buf[self.end..])? {
                    Some(0) => {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the server closed the TLS session",
                        ))
                    }
                    Some(k) => {
                        self.end += k;
                        continue;
                    }
                    None => {}
                }
                if self.cstart == self.cend {
                    // SAFETY: our caller keeps the lending contract.
                    let got = unsafe { self.recv_some(true) }.await?;
                    if got == 0 {
                        return Err(eof());
                    }
                    (self.cstart, self.cend) = (0, got);
                }
                let took = super::nbd::tls::open(t, &self.cipher[self.cstart..self.cend])?;
                self.cstart += took;
                continue;
            }
            // SAFETY: our caller keeps the lending contract.
            let got = unsafe { self.recv_some(false) }.await?;
            if got == 0 {
                return Err(eof());
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

fn eof() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the server closed the connection",
    )
}
