//! [`NbdExtent`]: an NBD export as a [`BlockDevice`].

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use nbd::proto::*;
use tables::io::{check_range, join_pieces, write_zeroes_by_writing};
use tables::registry::ExtentHealth;
use tables::{BlockDevice, Bytes, IoError, IoFuture, IoResult, Limits, WriteFlags};

use super::handshake::{self, ExportInfo};
use super::link::{DstBuf, Link, Outcome};
use super::wire::request_header;
use crate::net::lend::{bounce_for, SlotWait};
use crate::net::uri::NbdUri;
use crate::net::NetError;
use ::nbd::send_all_vectored;

/// Trims and write-zeroes are sent in pieces of at most this much (the length field is 32
/// bits; servers take a long time over huge ones).
const MAX_RANGE_OP: u64 = 1 << 30;

/// An NBD export, read and written over one or more connections.
///
/// Requests go out on the requester's own io_uring ring; each connection has a thread that
/// reads its replies and reconnects it when it drops (requests not yet answered are sent
/// again: they were never acknowledged upward). A request unanswered for `timeout` tears its
/// connection down; after `reconnect-delay` without a connection, requests fail with EIO and
/// the extent reports itself failed (until a reconnection succeeds).
pub struct NbdExtent {
    uri: Arc<NbdUri>,
    info: ExportInfo,
    links: Vec<Arc<Link>>,
    rr: AtomicUsize,
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for NbdExtent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdExtent")
            .field("uri", &self.uri.to_string())
            .field("size", &self.info.size)
            .field("connections", &self.links.len())
            .finish()
    }
}

impl NbdExtent {
    /// Connects to the export `uri` names (the first connection is made here, so an
    /// unreachable server is reported now, with the reason), then starts one thread per
    /// connection.
    pub fn open(uri: NbdUri) -> Result<NbdExtent, NetError> {
        let first = handshake::connect(&uri).map_err(|e| NetError::Connect {
            uri: uri.to_string(),
            msg: e.to_string(),
        })?;
        let info = first.info;
        let uri = Arc::new(uri);
        let mut n = usize::from(uri.opts.connections);
        if n > 1 && !info.has(TFLAG_CAN_MULTI_CONN) {
            log::warn!(
                "{uri}: the server does not say several connections are safe (multi-conn): \
                 using one"
            );
            n = 1;
        }
        let links: Vec<Arc<Link>> = (0..n)
            .map(|i| Arc::new(Link::new(i, uri.clone(), info)))
            .collect();
        let mut first = Some(first);
        for l in &links {
            let l2 = l.clone();
            let conn = first.take();
            std::thread::Builder::new()
                .name(format!("nbd-link{}", l.idx))
                .spawn(move || super::reader::run(l2, conn))
                .map_err(|e| NetError::Connect {
                    uri: uri.to_string(),
                    msg: format!("cannot start a connection thread: {e}"),
                })?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let weak: Vec<Weak<Link>> = links.iter().map(Arc::downgrade).collect();
        let tick =
            (uri.opts.timeout / 10).clamp(Duration::from_millis(10), Duration::from_millis(250));
        let stop2 = stop.clone();
        std::thread::Builder::new()
            .name("nbd-watchdog".into())
            .spawn(move || watchdog(weak, stop2, tick))
            .map_err(|e| NetError::Connect {
                uri: uri.to_string(),
                msg: format!("cannot start the watchdog thread: {e}"),
            })?;
        // Wait briefly for the others so the first requests spread at once.
        let until = Instant::now() + Duration::from_millis(500);
        while links.iter().any(|l| !l.is_up()) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(NbdExtent {
            uri,
            info,
            links,
            rr: AtomicUsize::new(0),
            stop,
        })
    }

    /// The URI this extent was opened with.
    pub fn uri(&self) -> &NbdUri {
        &self.uri
    }

    /// Connections in use (more than one only when the server allows multi-conn).
    pub fn connections(&self) -> usize {
        self.links.len()
    }

    /// Whether no connection has worked for longer than reconnect-delay.
    pub fn is_failed(&self) -> bool {
        self.health().state == "failed"
    }

    /// How the extent is doing: connections, requests in flight, errors.
    pub fn health(&self) -> ExtentHealth {
        let mut h = ExtentHealth {
            server: self.uri.addr.to_string(),
            connections: self.links.len() as u32,
            ..ExtentHealth::default()
        };
        let mut worst = "up";
        for l in &self.links {
            let (state, n, err) = l.snapshot();
            if state == "up" {
                h.connections_up += 1;
            } else if worst != "failed" {
                worst = state;
            }
            h.inflight += n as u64;
            if err.is_some() {
                h.last_error = err;
            }
            h.reconnects += l.stats.reconnects.load(Ordering::Relaxed);
            h.timeouts += l.stats.timeouts.load(Ordering::Relaxed);
            h.dropped += l.stats.dropped.load(Ordering::Relaxed);
            h.rtt_us = h.rtt_us.max(l.stats.rtt_us.load(Ordering::Relaxed));
        }
        h.state = if h.connections_up == h.connections {
            "up"
        } else if h.connections_up > 0 {
            "degraded"
        } else {
            worst
        }
        .to_string();
        h
    }

    /// One status line: state, server, connections, in flight, reconnects, timeouts,
    /// dropped connections, round-trip time and the last error.
    pub fn status_line(&self) -> String {
        self.health().line(&self.uri.to_string())
    }

    fn pick(&self) -> &Arc<Link> {
        let n = self.links.len();
        if n == 1 {
            // One connection: no choice to make, so no lock to take for it.
            return &self.links[0];
        }
        let start = self.rr.fetch_add(1, Ordering::Relaxed) % n;
        (0..n)
            .map(|i| &self.links[(start + i) % n])
            .find(|l| l.is_up())
            .unwrap_or(&self.links[start])
    }

    fn has(&self, flag: u16) -> bool {
        self.info.has(flag)
    }

    /// Largest piece of one read or write.
    fn max_piece(&self) -> usize {
        let min = self.info.min_block.max(1);
        let mut m = self.info.max_block / min * min;
        if m >= self.info.pref_block {
            m = m / self.info.pref_block * self.info.pref_block;
        }
        m.max(min) as usize
    }

    /// One request, resent on a new connection as often as needed until it is answered or
    /// its deadline (timeout plus reconnect-delay) passes.
    ///
    /// # Safety
    /// `payload` and the memory behind `dst` are lent to the kernel and the link's thread:
    /// keep the [lending contract](tables::io#the-lending-contract).
    async unsafe fn request(
        &self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
        dst: Option<DstBuf>,
    ) -> IoResult<()> {
        let deadline = Instant::now() + self.uri.opts.timeout + self.uri.opts.reconnect_delay;
        loop {
            let link = self.pick();
            let (fd, gen) = std::future::poll_fn(|cx| link.poll_up(cx, deadline)).await?;
            let Some(cookie) = link.register(gen, cmd, offset, len, dst, deadline) else {
                continue;
            };
            let mut wait = SlotWait::new(&**link, cookie);
            {
                let _turn = link.send.lock().await;
                if link.sending(cookie) {
                    let hdr = request_header(cmd, flags, cookie, offset, len);
                    let mut poison = Poison {
                        link,
                        gen,
                        armed: true,
                    };
                    // TLS: encrypted into our own buffer first, then sent in order (we hold
                    // the send lock).
                    let sealed = fd
                        .tls
                        .as_ref()
                        .map(|t| super::tls::seal(t, &[&hdr, payload]));
                    let r = match &sealed {
                        Some(Err(e)) => Err(std::io::Error::new(e.kind(), e.to_string())),
                        Some(Ok(bytes)) => {
                            // SAFETY: `sealed` lives in this future.
                            unsafe { send_all_vectored(fd.fd.as_raw_fd(), &[bytes]) }.await
                        }
                        None => {
                            // SAFETY: `hdr` lives in this future; `payload` is covered by our
                            // caller's lending contract.
                            unsafe { send_all_vectored(fd.fd.as_raw_fd(), &[&hdr, payload]) }.await
                        }
                    };
                    poison.armed = false;
                    if let Err(e) = r {
                        link.kill(gen, &format!("send: {e}"));
                    }
                }
            }
            match (&mut wait).await {
                Outcome::Done(r) => return r,
                Outcome::Retry if Instant::now() >= deadline => {
                    return Err(IoError::new(
                        libc::ETIMEDOUT,
                        format!(
                            "{}: {} at byte {offset} length {len}: not answered within the \
                             timeout and reconnect-delay",
                            self.uri,
                            super::link::cmd_name(cmd)
                        ),
                    ))
                }
                Outcome::Retry => continue,
            }
        }
    }

    /// Reads `buf` at `offset`, in pieces the server takes, aligned to its minimum block.
    ///
    /// # Safety
    /// As [`NbdExtent::request`].
    async unsafe fn read_range(&self, offset: u64, buf: &mut [u8]) -> IoResult<()> {
        let min = u64::from(self.info.min_block.max(1));
        if !offset.is_multiple_of(min) || !(buf.len() as u64).is_multiple_of(min) {
            // Unaligned: read the covering aligned range into our own memory.
            let (start, mut tmp, from) = bounce_for(offset, buf.len(), min, self.info.size);
            // SAFETY: `tmp` is owned by this future.
            unsafe { self.read_aligned(start, &mut tmp) }.await?;
            buf.copy_from_slice(&tmp[from..from + buf.len()]);
            return Ok(());
        }
        // SAFETY: our caller keeps the lending contract for `buf`.
        unsafe { self.read_aligned(offset, buf) }.await
    }

    /// # Safety
    /// As [`NbdExtent::request`].
    async unsafe fn read_aligned(&self, offset: u64, buf: &mut [u8]) -> IoResult<()> {
        let piece = self.max_piece();
        let futs: Vec<IoFuture<'_>> = buf
            .chunks_mut(piece)
            .enumerate()
            .map(|(i, c)| {
                let off = offset + (i * piece) as u64;
                let len = c.len() as u32;
                let dst = DstBuf::new(c);
                // SAFETY: `c` is part of the caller's buffer, lent under its contract.
                Box::pin(unsafe { self.request(CMD_READ, 0, off, len, &[], Some(dst)) })
                    as IoFuture<'_>
            })
            .collect();
        join_pieces(futs).await
    }

    /// # Safety
    /// As [`NbdExtent::request`].
    async unsafe fn write_range(&self, offset: u64, buf: &[u8], fua: bool) -> IoResult<()> {
        let min = u64::from(self.info.min_block.max(1));
        if !offset.is_multiple_of(min) || !(buf.len() as u64).is_multiple_of(min) {
            return Err(IoError::invalid(format!(
                "{}: write at byte {offset} length {}: the server takes writes aligned to {min} \
                 bytes only",
                self.uri,
                buf.len()
            )));
        }
        let native_fua = fua && self.has(TFLAG_SEND_FUA);
        let flags = if native_fua { CMD_FLAG_FUA } else { 0 };
        let piece = self.max_piece();
        let futs: Vec<IoFuture<'_>> = buf
            .chunks(piece)
            .enumerate()
            .map(|(i, c)| {
                let off = offset + (i * piece) as u64;
                // SAFETY: `c` is part of the caller's buffer, lent under its contract.
                Box::pin(unsafe { self.request(CMD_WRITE, flags, off, c.len() as u32, c, None) })
                    as IoFuture<'_>
            })
            .collect();
        join_pieces(futs).await?;
        if fua && !native_fua && self.has(TFLAG_SEND_FLUSH) {
            self.flush_now().await?;
        }
        Ok(())
    }

    async fn flush_now(&self) -> IoResult<()> {
        if !self.has(TFLAG_SEND_FLUSH) {
            return Ok(());
        }
        if self.links.len() == 1 {
            // SAFETY: a flush lends no memory.
            return unsafe { self.request(CMD_FLUSH, 0, 0, 0, &[], None) }.await;
        }
        // Multi-conn: a flush on one connection covers writes completed on all of them.
        // SAFETY: as above.
        unsafe { self.request(CMD_FLUSH, 0, 0, 0, &[], None) }.await
    }

    async fn range_op(&self, cmd: u16, flags: u16, offset: u64, len: u64) -> IoResult<()> {
        let min = u64::from(self.info.min_block.max(1));
        let step = MAX_RANGE_OP / min * min;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(step);
            // SAFETY: trims and write-zeroes lend no memory.
            unsafe { self.request(cmd, flags, offset + done, n as u32, &[], None) }.await?;
            done += n;
        }
        Ok(())
    }
}

impl Drop for NbdExtent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        for l in &self.links {
            l.goodbye();
            l.stop();
        }
    }
}

/// Kills the connection if a send is abandoned half-way (the stream would be out of step).
struct Poison<'a> {
    link: &'a Link,
    gen: u64,
    armed: bool,
}

impl Drop for Poison<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.link
                .kill(self.gen, "a request was abandoned while being sent");
        }
    }
}

fn watchdog(links: Vec<Weak<Link>>, stop: Arc<AtomicBool>, tick: Duration) {
    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(tick);
        let now = Instant::now();
        let mut alive = false;
        for l in links.iter().filter_map(Weak::upgrade) {
            alive = true;
            l.tick(now);
        }
        if !alive {
            return;
        }
    }
}

impl BlockDevice for NbdExtent {
    fn name(&self) -> String {
        self.uri.to_string()
    }

    fn size(&self) -> Bytes {
        Bytes(self.info.size)
    }

    fn limits(&self) -> Limits {
        let lbs = self.info.min_block.clamp(512, 4096);
        Limits {
            logical_block_size: lbs,
            physical_block_size: self.info.pref_block.clamp(lbs, 65536),
            io_opt: 0,
            max_io: self.max_piece().max(lbs as usize) as u32,
            discard_granularity: if self.has(TFLAG_SEND_TRIM) {
                lbs.max(4096)
            } else {
                0
            },
            discard_zeroes: false,
            write_zeroes: self.has(TFLAG_SEND_WRITE_ZEROES),
            volatile_cache: self.has(TFLAG_SEND_FLUSH),
            fua: self.has(TFLAG_SEND_FUA),
            read_only: self.has(TFLAG_READ_ONLY),
            multi_conn_safe: true,
        }
    }

    unsafe fn read<'a>(&'a self, offset: Bytes, buf: &'a mut [u8]) -> IoFuture<'a> {
        Box::pin(async move {
            check_range(&self.name(), self.size(), offset, Bytes(buf.len() as u64))?;
            if buf.is_empty() {
                return Ok(());
            }
            // SAFETY: our caller keeps the lending contract for `buf`.
            unsafe { self.read_range(offset.0, buf) }.await
        })
    }

    unsafe fn write<'a>(&'a self, offset: Bytes, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a> {
        Box::pin(async move {
            if self.has(TFLAG_READ_ONLY) {
                return Err(IoError::read_only(format!(
                    "{}: the export is read-only",
                    self.uri
                )));
            }
            check_range(&self.name(), self.size(), offset, Bytes(buf.len() as u64))?;
            if buf.is_empty() {
                return Ok(());
            }
            // SAFETY: our caller keeps the lending contract for `buf`.
            unsafe { self.write_range(offset.0, buf, flags.fua) }.await
        })
    }

    fn flush(&self) -> IoFuture<'_> {
        Box::pin(self.flush_now())
    }

    fn discard(&self, offset: Bytes, len: Bytes) -> IoFuture<'_> {
        Box::pin(async move {
            check_range(&self.name(), self.size(), offset, len)?;
            if !self.has(TFLAG_SEND_TRIM) || self.has(TFLAG_READ_ONLY) || len.0 == 0 {
                return Ok(()); // a hint the server cannot take
            }
            self.range_op(CMD_TRIM, 0, offset.0, len.0).await
        })
    }

    fn write_zeroes(&self, offset: Bytes, len: Bytes, flags: WriteFlags) -> IoFuture<'_> {
        Box::pin(async move {
            if self.has(TFLAG_READ_ONLY) {
                return Err(IoError::read_only(format!(
                    "{}: the export is read-only",
                    self.uri
                )));
            }
            check_range(&self.name(), self.size(), offset, len)?;
            if len.0 == 0 {
                return Ok(());
            }
            if !self.has(TFLAG_SEND_WRITE_ZEROES) {
                return write_zeroes_by_writing(self, offset, len, flags).await;
            }
            let native_fua = flags.fua && self.has(TFLAG_SEND_FUA);
            let f = if native_fua { CMD_FLAG_FUA } else { 0 };
            self.range_op(CMD_WRITE_ZEROES, f, offset.0, len.0).await?;
            if flags.fua && !native_fua {
                self.flush_now().await?;
            }
            Ok(())
        })
    }

    fn status(&self) -> String {
        self.status_line()
    }

    fn connections_made(&self) -> Option<u64> {
        Some(self.links.iter().map(|l| l.generation()).sum())
    }
}
