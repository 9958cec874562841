//! [`IscsiExtent`]: an iSCSI logical unit as a [`BlockDevice`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use tables::io::{check_range, join_pieces, write_zeroes_by_writing};
use tables::registry::ExtentHealth;
use tables::{BlockDevice, Bytes, IoError, IoFuture, IoResult, Limits, WriteFlags};

use super::queue::{Cmd, Queue};
use super::scsi::LunInfo;
use super::secret::read_secret;
use crate::net::lend::{bounce_for, DstBuf, SlotWait};
use crate::net::uri::IscsiUri;
use crate::net::NetError;

/// Largest read or write sent as one command (less when the LUN's Block Limits say so).
const MAX_TRANSFER: u64 = 8 << 20;
/// Largest UNMAP or WRITE SAME range sent as one command (less when the LUN says so).
const MAX_RANGE_OP: u64 = 1 << 30;

/// An iSCSI logical unit, read and written through libiscsi.
///
/// One connection thread per extent owns the libiscsi context (contexts are not
/// thread-safe): requesters on any thread queue their requests and wake it; it issues READ(16),
/// WRITE(16) (FUA when asked), SYNCHRONIZE CACHE(16), UNMAP and WRITE SAME(16) (only where the
/// LUN's VPD pages allow them) and completes the requests from libiscsi's callbacks. A broken
/// session is logged in again with backoff and its unanswered requests sent again; a request
/// unanswered for `timeout` tears the session down; after `reconnect-delay` without a session,
/// requests fail with EIO and the extent reports itself failed (until a login succeeds).
pub struct IscsiExtent {
    uri: Arc<IscsiUri>,
    info: LunInfo,
    q: Arc<Queue>,
    /// The target refused WRITE SAME: write-zeroes writes zeroes from then on.
    no_write_same: AtomicBool,
}

impl std::fmt::Debug for IscsiExtent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IscsiExtent")
            .field("uri", &self.uri.to_string())
            .field("lun", &self.uri.lun)
            .field("size", &self.info.size())
            .field("block_size", &self.info.block_size)
            .finish()
    }
}

impl IscsiExtent {
    /// Logs in to the LUN `uri` names (the first login happens here, so an unreachable
    /// target or a refused login is reported now, with the reason) and reads its geometry.
    /// With a user in the URI, the CHAP secret is read from `chap-secret-file`, which must
    /// belong to the running user with mode 0600 or stricter.
    pub fn open(uri: IscsiUri) -> Result<IscsiExtent, NetError> {
        let connect_err = |uri: &IscsiUri, msg: String| NetError::Connect {
            uri: uri.to_string(),
            msg,
        };
        let secret = match &uri.chap_secret_file {
            Some(p) => Some(read_secret(p).map_err(|m| connect_err(&uri, m))?),
            None => None,
        };
        let uri = Arc::new(uri);
        let q = Arc::new(Queue::new(uri.clone()));
        let (tx, rx) = mpsc::channel();
        let q2 = q.clone();
        std::thread::Builder::new()
            .name(format!("iscsi-lun{}", uri.lun))
            .spawn(move || super::conn::run(q2, secret, tx))
            .map_err(|e| connect_err(&uri, format!("cannot start the connection thread: {e}")))?;
        // The thread keeps the connect-timeout itself; this only guards against a hang in a
        // name lookup.
        let info = match rx.recv_timeout(uri.opts.connect_timeout + Duration::from_secs(5)) {
            Ok(Ok(info)) => info,
            Ok(Err(msg)) => return Err(connect_err(&uri, msg)),
            Err(_) => {
                q.stop();
                return Err(connect_err(
                    &uri,
                    "no login within the connect-timeout".into(),
                ));
            }
        };
        Ok(IscsiExtent {
            uri,
            info,
            q,
            no_write_same: AtomicBool::new(false),
        })
    }

    /// The URI this extent was opened with.
    pub fn uri(&self) -> &IscsiUri {
        &self.uri
    }

    /// Whether no session has worked for longer than reconnect-delay.
    pub fn is_failed(&self) -> bool {
        self.health().state == "failed"
    }

    /// How the extent is doing: session state, requests in flight, errors.
    pub fn health(&self) -> ExtentHealth {
        let (state, inflight, last_error) = self.q.snapshot();
        let s = &self.q.stats;
        let server = if self.uri.host.contains(':') {
            format!("[{}]:{}", self.uri.host, self.uri.port)
        } else {
            format!("{}:{}", self.uri.host, self.uri.port)
        };
        ExtentHealth {
            state: state.to_string(),
            server,
            connections_up: u32::from(state == "up"),
            connections: 1,
            inflight: inflight as u64,
            reconnects: s.reconnects.load(Ordering::Relaxed),
            timeouts: s.timeouts.load(Ordering::Relaxed),
            dropped: s.dropped.load(Ordering::Relaxed),
            rtt_us: s.rtt_us.load(Ordering::Relaxed),
            last_error,
        }
    }

    /// One status line: state, server, connections, in flight, reconnects, timeouts, dropped
    /// sessions, round-trip time and the last error.
    pub fn status_line(&self) -> String {
        self.health().line(&self.uri.to_string())
    }

    fn bs(&self) -> u64 {
        u64::from(self.info.block_size)
    }

    /// Largest piece of one read or write, in bytes (a multiple of the block size).
    fn max_piece(&self) -> usize {
        let bs = self.bs();
        let mut m = MAX_TRANSFER;
        if self.info.max_transfer > 0 {
            m = m.min(u64::from(self.info.max_transfer).saturating_mul(bs));
        }
        (m / bs * bs).max(bs) as usize
    }

    /// Largest UNMAP or WRITE SAME range in blocks, given the LUN's own limit (0: none).
    fn max_range_blocks(&self, lun_max: u64) -> u64 {
        let mut m = (MAX_RANGE_OP / self.bs()).min(u64::from(u32::MAX));
        if lun_max > 0 {
            m = m.min(lun_max);
        }
        m.max(1)
    }

    fn aligned(&self, offset: u64, len: u64) -> bool {
        offset.is_multiple_of(self.bs()) && len.is_multiple_of(self.bs())
    }

    /// One command, waited for. The connection thread resends it on new sessions as needed
    /// until it is answered or its deadline (timeout plus reconnect-delay) passes.
    ///
    /// # Safety
    /// The memory behind `dst` is lent to the connection thread: keep the
    /// [lending contract](tables::io#the-lending-contract) for the returned future.
    async unsafe fn request(
        &self,
        cmd: Cmd,
        lba: u64,
        blocks: u32,
        dst: Option<DstBuf>,
    ) -> IoResult<()> {
        let deadline = Instant::now() + self.uri.opts.timeout + self.uri.opts.reconnect_delay;
        let id = self.q.submit(cmd, lba, blocks, dst, deadline)?;
        SlotWait::new(&*self.q, id).await
    }

    /// Reads `buf` at `offset`; a range unaligned to the block size goes through a bounce
    /// buffer.
    ///
    /// # Safety
    /// As [`IscsiExtent::request`], for `buf`.
    async unsafe fn read_range(&self, offset: u64, buf: &mut [u8]) -> IoResult<()> {
        if !self.aligned(offset, buf.len() as u64) {
            let (start, mut tmp, from) = bounce_for(offset, buf.len(), self.bs(), self.info.size());
            // SAFETY: `tmp` is owned by this future.
            unsafe { self.read_aligned(start, &mut tmp) }.await?;
            buf.copy_from_slice(&tmp[from..from + buf.len()]);
            return Ok(());
        }
        // SAFETY: our caller keeps the lending contract for `buf`.
        unsafe { self.read_aligned(offset, buf) }.await
    }

    /// # Safety
    /// As [`IscsiExtent::request`], for `buf`.
    async unsafe fn read_aligned(&self, offset: u64, buf: &mut [u8]) -> IoResult<()> {
        let piece = self.max_piece();
        let bs = self.bs();
        let futs: Vec<IoFuture<'_>> = buf
            .chunks_mut(piece)
            .enumerate()
            .map(|(i, c)| {
                let lba = (offset + (i * piece) as u64) / bs;
                let blocks = (c.len() as u64 / bs) as u32;
                let dst = DstBuf::new(c);
                // SAFETY: `c` is part of the caller's buffer, lent under its contract.
                Box::pin(unsafe { self.request(Cmd::Read, lba, blocks, Some(dst)) }) as IoFuture<'_>
            })
            .collect();
        join_pieces(futs).await
    }

    async fn write_range(&self, offset: u64, buf: &[u8], fua: bool) -> IoResult<()> {
        if !self.aligned(offset, buf.len() as u64) {
            return Err(IoError::invalid(format!(
                "{}: LUN {}: write at byte {offset} length {}: the LUN takes writes aligned to \
                 its {}-byte blocks only",
                self.uri,
                self.uri.lun,
                buf.len(),
                self.bs()
            )));
        }
        let piece = self.max_piece();
        let bs = self.bs();
        let futs: Vec<IoFuture<'_>> = buf
            .chunks(piece)
            .enumerate()
            .map(|(i, c)| {
                let lba = (offset + (i * piece) as u64) / bs;
                let blocks = (c.len() as u64 / bs) as u32;
                // The payload is copied: the library reads it after this call returns.
                let cmd = Cmd::Write {
                    fua,
                    data: Arc::from(c),
                };
                // SAFETY: a write lends no memory (its payload is owned by the request).
                Box::pin(unsafe { self.request(cmd, lba, blocks, None) }) as IoFuture<'_>
            })
            .collect();
        join_pieces(futs).await
    }

    async fn flush_now(&self) -> IoResult<()> {
        // SAFETY: a flush lends no memory.
        unsafe { self.request(Cmd::Flush, 0, 0, None) }.await
    }

    /// UNMAP or WRITE SAME over `[lba, lba + blocks)`, in pieces of at most `step` blocks.
    async fn range_op(&self, cmd: Cmd, lba: u64, blocks: u64, step: u64) -> IoResult<()> {
        let mut done = 0;
        while done < blocks {
            let n = (blocks - done).min(step);
            // SAFETY: UNMAP and WRITE SAME lend no memory (the zero block is static).
            unsafe { self.request(cmd.clone(), lba + done, n as u32, None) }.await?;
            done += n;
        }
        Ok(())
    }
}

impl Drop for IscsiExtent {
    fn drop(&mut self) {
        self.q.stop();
    }
}

impl BlockDevice for IscsiExtent {
    fn name(&self) -> String {
        self.uri.to_string()
    }

    fn size(&self) -> Bytes {
        Bytes(self.info.size())
    }

    fn limits(&self) -> Limits {
        let lbs = self.info.block_size;
        let phys = u64::from(lbs) << self.info.phys_exp.min(4);
        let opt = u64::from(self.info.opt_transfer).saturating_mul(u64::from(lbs));
        Limits {
            logical_block_size: lbs,
            physical_block_size: phys.clamp(u64::from(lbs), 65536) as u32,
            io_opt: if opt <= MAX_TRANSFER { opt as u32 } else { 0 },
            max_io: self.max_piece() as u32,
            discard_granularity: if self.info.unmap {
                let g = u64::from(self.info.unmap_granularity).saturating_mul(u64::from(lbs));
                g.clamp(u64::from(lbs).max(4096), 1 << 20) as u32
            } else {
                0
            },
            discard_zeroes: false,
            write_zeroes: self.info.write_same && !self.no_write_same.load(Ordering::Relaxed),
            volatile_cache: true,
            fua: true,
            read_only: false,
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
            check_range(&self.name(), self.size(), offset, Bytes(buf.len() as u64))?;
            if buf.is_empty() {
                return Ok(());
            }
            self.write_range(offset.0, buf, flags.fua).await
        })
    }

    fn flush(&self) -> IoFuture<'_> {
        Box::pin(self.flush_now())
    }

    fn discard(&self, offset: Bytes, len: Bytes) -> IoFuture<'_> {
        Box::pin(async move {
            check_range(&self.name(), self.size(), offset, len)?;
            if !self.info.unmap || len.0 == 0 {
                return Ok(()); // a hint the LUN cannot take
            }
            // A hint: only the whole blocks inside the range are unmapped.
            let bs = self.bs();
            let first = offset.0.div_ceil(bs);
            let end = (offset.0 + len.0) / bs;
            if end <= first {
                return Ok(());
            }
            let step = self.max_range_blocks(u64::from(self.info.max_unmap));
            self.range_op(Cmd::Unmap, first, end - first, step).await
        })
    }

    fn write_zeroes(&self, offset: Bytes, len: Bytes, flags: WriteFlags) -> IoFuture<'_> {
        Box::pin(async move {
            check_range(&self.name(), self.size(), offset, len)?;
            if len.0 == 0 {
                return Ok(());
            }
            if !self.limits().write_zeroes {
                return write_zeroes_by_writing(self, offset, len, flags).await;
            }
            if !self.aligned(offset.0, len.0) {
                return Err(IoError::invalid(format!(
                    "{}: LUN {}: write-zeroes at byte {} length {}: the LUN takes ranges \
                     aligned to its {}-byte blocks only",
                    self.uri,
                    self.uri.lun,
                    offset.0,
                    len.0,
                    self.bs()
                )));
            }
            let bs = self.bs();
            let step = self.max_range_blocks(self.info.max_write_same);
            match self
                .range_op(Cmd::WriteZeroes, offset.0 / bs, len.0 / bs, step)
                .await
            {
                Err(e) if e.errno == libc::EOPNOTSUPP || e.errno == libc::EINVAL => {
                    log::warn!(
                        "{}: the target refused WRITE SAME ({e}): writing zeroes instead",
                        self.uri
                    );
                    self.no_write_same.store(true, Ordering::Relaxed);
                    return write_zeroes_by_writing(self, offset, len, flags).await;
                }
                r => r?,
            }
            if flags.fua {
                self.flush_now().await?;
            }
            Ok(())
        })
    }

    fn status(&self) -> String {
        self.status_line()
    }
}
