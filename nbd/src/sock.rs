//! Socket plumbing on the `iort` ring: a buffered receiver, vectored sends, aligned buffers.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use iort::io_uring::{opcode, types};

use crate::limits::Watch;

/// Receive buffer size: large enough to pick up hundreds of pipelined request headers per
/// `recv`, small enough that a thousand idle connections pin little memory.
const RECV_BUF: usize = 16 * 1024;
/// Big payloads are received in steps of at most this much, so a stalled sender is seen
/// (each step is progress for [`Watch`]).
const RECV_STEP: usize = 1 << 20;
/// Sends through the ring wait for at most this much at a time, for the same reason.
const SEND_STEP: usize = 1 << 20;

/// Receives with `flags` (`MSG_WAITALL`...); 0 means the peer closed.
///
/// # Safety
/// The kernel uses the borrowed buffers until each operation completes: keep the
/// [lending contract](tables::io#the-lending-contract) for the returned future.
async unsafe fn recv_flags(fd: RawFd, buf: &mut [u8], flags: i32) -> io::Result<usize> {
    let len = buf.len().min(u32::MAX as usize) as u32;
    let sqe = opcode::Recv::new(types::Fd(fd), buf.as_mut_ptr(), len)
        .flags(flags)
        .build();
    // SAFETY: `buf` is borrowed for this future's life, which our caller completes or drops
    // (dropping the op waits for the kernel): the lending contract.
    iort::cqe_result(unsafe { iort::submit(sqe) }.await)
}

/// A buffered reader over a socket: small reads (headers, option data) come out of one
/// `recv` of up to 64 KiB; large payloads are received straight into the caller's buffer.
pub(crate) struct RecvBuf {
    fd: RawFd,
    watch: Arc<Watch>,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl RecvBuf {
    pub(crate) fn new(fd: RawFd, watch: Arc<Watch>) -> RecvBuf {
        RecvBuf {
            fd,
            watch,
            buf: vec![0u8; RECV_BUF].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// Bytes already received and not consumed.
    fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Receives more data into the buffer; `UnexpectedEof` when the peer has closed.
    ///
    /// # Safety
    /// The kernel uses the borrowed buffers until each operation completes: keep the
    /// [lending contract](tables::io#the-lending-contract) for the returned future.
    async unsafe fn fill(&mut self) -> io::Result<()> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.start > 0 && self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let n = recv_flags(self.fd, &mut self.buf[self.end..], 0).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.watch.received();
        self.end += n;
        Ok(())
    }

    /// Fills `dst` completely.
    ///
    /// # Safety
    /// The kernel uses the borrowed buffers until each operation completes: keep the
    /// [lending contract](tables::io#the-lending-contract) for the returned future.
    pub(crate) async unsafe fn read_exact(&mut self, dst: &mut [u8]) -> io::Result<()> {
        let mut done = self.take(dst);
        while done < dst.len() {
            let rest = dst.len() - done;
            if rest >= RECV_BUF / 2 {
                // Big payload: skip the copy and let the kernel wait for a step of it.
                let step = rest.min(RECV_STEP);
                let n = recv_flags(self.fd, &mut dst[done..done + step], libc::MSG_WAITALL).await?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                self.watch.received();
                done += n;
            } else {
                self.fill().await?;
                done += self.take(&mut dst[done..]);
            }
        }
        Ok(())
    }

    /// Discards `n` bytes of input (an option or payload we refuse) without allocating them.
    ///
    /// # Safety
    /// The kernel uses the borrowed buffers until each operation completes: keep the
    /// [lending contract](tables::io#the-lending-contract) for the returned future.
    pub(crate) async unsafe fn skip(&mut self, mut n: u64) -> io::Result<()> {
        loop {
            let take = (self.buffered() as u64).min(n);
            self.start += take as usize;
            n -= take;
            if n == 0 {
                return Ok(());
            }
            self.fill().await?;
        }
    }

    fn take(&mut self, dst: &mut [u8]) -> usize {
        let n = self.buffered().min(dst.len());
        dst[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
        self.start += n;
        n
    }
}

/// Sends every byte of `bufs` with one `sendmsg` per round (more only on short sends), so a
/// reply header and its data, or a batch of replies, leave in one segment train. While it
/// waits for the socket, `watch` sees each step of progress.
///
/// # Safety
/// The kernel uses the borrowed buffers until each operation completes: keep the
/// [lending contract](tables::io#the-lending-contract) for the returned future.
pub(crate) async unsafe fn send_vectored_all(
    fd: RawFd,
    bufs: &[&[u8]],
    watch: &Watch,
) -> io::Result<()> {
    let r = send_vectored_steps(fd, bufs, Some(watch)).await;
    watch.sending(false);
    r
}

/// Sends every byte of `bufs` as [`send_vectored_all`] does, with no progress watch (for a
/// client's requests: its own timeouts notice a stalled server).
///
/// # Safety
/// The kernel uses the borrowed buffers until each operation completes: keep the
/// [lending contract](tables::io#the-lending-contract) for the returned future.
pub async unsafe fn send_all_vectored(fd: RawFd, bufs: &[&[u8]]) -> io::Result<()> {
    // SAFETY: our caller keeps the lending contract.
    unsafe { send_vectored_steps(fd, bufs, None) }.await
}

/// [`send_vectored_all`] without the final bookkeeping.
///
/// # Safety
/// The kernel uses the borrowed buffers until each operation completes: keep the
/// [lending contract](tables::io#the-lending-contract) for the returned future.
async unsafe fn send_vectored_steps(
    fd: RawFd,
    bufs: &[&[u8]],
    watch: Option<&Watch>,
) -> io::Result<()> {
    let mut iov: Vec<libc::iovec> = bufs
        .iter()
        .filter(|b| !b.is_empty())
        .map(|b| libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        })
        .collect();
    let mut first = 0usize;
    // First try a plain non-blocking sendmsg: when the socket has room (the usual case)
    // the data leaves at once, without a trip through the ring's poll machinery.
    let mut direct = true;
    while first < iov.len() {
        let cnt = (iov.len() - first).min(libc::UIO_MAXIOV as usize);
        // SAFETY: an all-zero msghdr is valid (no name, no control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov[first..].as_mut_ptr();
        msg.msg_iovlen = cnt as _;
        let mut n = if direct {
            direct = false;
            // SAFETY: msg and the iovecs it points to are valid for the call.
            let r = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::WouldBlock && e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
                0
            } else {
                r as usize
            }
        } else {
            // At most SEND_STEP bytes per op: the iovecs up to that much, the last one cut.
            let mut step: Vec<libc::iovec> = Vec::with_capacity(cnt);
            let mut total = 0usize;
            for v in &iov[first..first + cnt] {
                let take = v.iov_len.min(SEND_STEP - total);
                step.push(libc::iovec {
                    iov_base: v.iov_base,
                    iov_len: take,
                });
                total += take;
                if total == SEND_STEP {
                    break;
                }
            }
            msg.msg_iov = step.as_mut_ptr();
            msg.msg_iovlen = step.len() as _;
            let sqe = opcode::SendMsg::new(types::Fd(fd), &msg as *const libc::msghdr)
                // WAITALL: the ring finishes the whole step itself instead of returning
                // short counts whenever the socket buffer fills.
                .flags((libc::MSG_NOSIGNAL | libc::MSG_WAITALL) as u32)
                .build();
            if let Some(w) = watch {
                w.sending(true);
            }
            // SAFETY: `msg` and `step` live in this frame across the await; the buffers they
            // point into are borrowed through `bufs` for this future's life, which our caller
            // completes or drops (the lending contract); dropping the op waits for the kernel.
            let n = iort::cqe_result(unsafe { iort::submit(sqe) }.await)?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            if let Some(w) = watch {
                w.sending(true);
            }
            n
        };
        // Advance past what was sent.
        while n > 0 && first < iov.len() {
            let v = &mut iov[first];
            if n >= v.iov_len {
                n -= v.iov_len;
                first += 1;
            } else {
                // SAFETY: stays inside the same buffer (n < iov_len).
                v.iov_base = unsafe { (v.iov_base as *mut u8).add(n) } as *mut libc::c_void;
                v.iov_len -= n;
                n = 0;
            }
        }
    }
    Ok(())
}

/// Sends all of `buf`.
///
/// # Safety
/// The kernel uses the borrowed buffers until each operation completes: keep the
/// [lending contract](tables::io#the-lending-contract) for the returned future.
pub(crate) async unsafe fn send_all(fd: RawFd, buf: &[u8]) -> io::Result<()> {
    iort::send_all(fd, buf, 0).await
}

/// Sets `TCP_NODELAY` (ignored for non-TCP sockets): replies must not wait for Nagle.
pub(crate) fn set_nodelay(fd: RawFd) {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads an int from a valid pointer.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// `shutdown(2)` on a socket; errors (already closed, not connected) are irrelevant here.
pub(crate) fn shutdown(fd: RawFd, how: libc::c_int) {
    // SAFETY: plain syscall on a descriptor the caller keeps open.
    unsafe {
        libc::shutdown(fd, how);
    }
}
