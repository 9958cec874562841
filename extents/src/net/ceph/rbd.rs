//! [`RbdExtent`]: an RBD image (or a snapshot of one, read-only) as a [`BlockDevice`].

use std::ffi::{c_char, CString};
use std::sync::Arc;

use tables::io::{check_range, join_pieces};
use tables::registry::ExtentHealth;
use tables::{BlockDevice, Bytes, IoError, IoFuture, IoResult, Limits, WriteFlags};

use super::cluster::Session;
use super::ffi::*;
use super::table::{
    errno_text, rbd_done, request, spawn_watchdog, Issuer, Job, Lib, OpKind, Requests, Where,
};
use crate::net::lend::DstBuf;
use crate::net::uri::RbdUri;
use crate::net::NetError;

/// Largest piece of one read or write handed to librbd (front ends send at most
/// [`Limits::max_io`]; larger internal requests are split).
const MAX_PIECE: usize = 8 << 20;
/// Largest discard or write-zeroes range handed to librbd at once.
const MAX_RANGE_OP: u64 = 1 << 30;

/// An RBD image read and written through librbd's asynchronous calls.
///
/// Requesters on any thread issue `rbd_aio_*` operations directly (librbd is thread-safe);
/// completions arrive on librbd's threads, which copy read data into the requester's buffer
/// under the request table's lock and wake the requester (see `table.rs`): no thread per
/// request. Reads land in a bounce buffer the operation owns; writes carry a copy of their
/// payload. FUA is `LIBRADOS_OP_FLAG_FADVISE_FUA` (librbd's write-around cache then
/// acknowledges only what the OSDs have); FLUSH is `rbd_aio_flush`; discard is
/// `rbd_aio_discard` (a hint: librbd skips partial objects); write-zeroes is
/// `rbd_aio_write_zeroes`. `@SNAP` opens the snapshot read-only (an origin for thin clones).
pub struct RbdExtent {
    inner: Arc<Inner>,
}

struct Inner {
    uri: RbdUri,
    s: Session,
    image: rbd_image_t,
    size: u64,
    obj_size: u64,
}

// SAFETY: a librbd image handle may be used from any thread (librbd serialises internally);
// the cluster handle is Send + Sync itself.
unsafe impl Send for Inner {}
// SAFETY: as above: concurrent aio calls on one image are supported by librbd.
unsafe impl Sync for Inner {}

impl std::fmt::Debug for RbdExtent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RbdExtent")
            .field("uri", &self.inner.uri.to_string())
            .field("size", &self.inner.size)
            .field("object_size", &self.inner.obj_size)
            .finish()
    }
}

impl RbdExtent {
    /// Connects to the cluster, opens the image (a snapshot read-only) and reads its size:
    /// an unreachable cluster, a missing pool or image, or a keyring readable by others is
    /// reported now, naming the URI (never the key).
    pub fn open(uri: RbdUri) -> Result<RbdExtent, NetError> {
        let name = uri.to_string();
        let err = |msg: String| NetError::Connect {
            uri: name.clone(),
            msg,
        };
        let s = Session::open(&name, &uri.client, &uri.pool, &uri.opts).map_err(err)?;
        let cimage =
            CString::new(uri.image.as_str()).map_err(|_| err("NUL in the image".into()))?;
        let csnap = match &uri.snap {
            Some(s) => {
                Some(CString::new(s.as_str()).map_err(|_| err("NUL in the snapshot".into()))?)
            }
            None => None,
        };
        let snap_ptr = csnap.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
        let mut image: rbd_image_t = std::ptr::null_mut();
        // SAFETY: a live ioctx, NUL-terminated names (the snapshot's or NULL) that outlive
        // the call, a valid out-pointer.
        let r = unsafe {
            if csnap.is_some() {
                rbd_open_read_only(s.io(), cimage.as_ptr(), &mut image, snap_ptr)
            } else {
                rbd_open(s.io(), cimage.as_ptr(), &mut image, snap_ptr)
            }
        };
        if r < 0 {
            let what = match &uri.snap {
                Some(s) => format!("image '{}' snapshot '{s}'", uri.image),
                None => format!("image '{}'", uri.image),
            };
            return Err(err(format!(
                "cannot open {what} in pool '{}': {}",
                uri.pool,
                errno_text(r.into())
            )));
        }
        // SAFETY: rbd_image_info_t is plain data; all zeroes is a valid value.
        let mut info: rbd_image_info_t = unsafe { std::mem::zeroed() };
        // SAFETY: an open image; `info` is writable for the size we pass.
        let r = unsafe { rbd_stat(image, &mut info, std::mem::size_of::<rbd_image_info_t>()) };
        if r < 0 {
            // SAFETY: the image is open and nothing else uses it.
            unsafe { rbd_close(image) };
            return Err(err(format!(
                "cannot stat the image: {}",
                errno_text(r.into())
            )));
        }
        let req = s.req.clone();
        let inner = Arc::new(Inner {
            uri,
            s,
            image,
            size: info.size,
            obj_size: info.obj_size,
        });
        spawn_watchdog(Arc::downgrade(&inner), req).map_err(err)?;
        Ok(RbdExtent { inner })
    }

    /// The URI this extent was opened with.
    pub fn uri(&self) -> &RbdUri {
        &self.inner.uri
    }

    /// Whether the cluster has not answered for longer than timeout plus reconnect-delay.
    pub fn is_failed(&self) -> bool {
        self.health().state == "failed"
    }

    /// How the extent is doing: `up`, `reconnecting` (a request has waited longer than
    /// `timeout`) or `failed`; the monitors; requests in flight; timeouts; mean latency.
    pub fn health(&self) -> ExtentHealth {
        self.inner.s.health()
    }

    fn read_only(&self) -> bool {
        self.inner.uri.snap.is_some()
    }

    fn refuse_write(&self, what: &str, offset: u64) -> IoResult<()> {
        if self.read_only() {
            return Err(IoError::read_only(format!(
                "{}: {what} at byte {offset}: a snapshot is read-only",
                self.inner.uri
            )));
        }
        Ok(())
    }

    /// One operation without a destination buffer, waited for.
    async fn op(&self, kind: OpKind, offset: u64, len: u64, buf: Vec<u8>) -> IoResult<()> {
        let at = Where {
            kind,
            offset,
            len,
            object: None,
        };
        // SAFETY: no memory of the caller is lent (a write's payload is owned by the job).
        unsafe { request(&*self.inner, at, None, buf) }.await
    }

    /// A discard or write-zeroes range in pieces of at most [`MAX_RANGE_OP`].
    async fn range_op(&self, kind: OpKind, offset: u64, len: u64) -> IoResult<()> {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(MAX_RANGE_OP);
            self.op(kind, offset + done, n, Vec::new()).await?;
            done += n;
        }
        Ok(())
    }
}

impl Issuer for Inner {
    const LIB: Lib = Lib::Rbd;

    fn requests(&self) -> &Arc<Requests> {
        &self.s.req
    }

    fn issue(&self, mut job: Box<Job>, at: &Where) {
        let image = self.image;
        let (off, kind) = (at.offset, at.kind);
        if kind == OpKind::Probe {
            // A small read at the start: it needs an OSD to answer.
            job.buf = vec![0u8; self.size.min(512) as usize];
        }
        let len = match kind {
            OpKind::Read | OpKind::Write { .. } | OpKind::Probe => job.buf.len() as u64,
            _ => at.len,
        };
        let buf = job.buf.as_mut_ptr().cast::<c_char>();
        let fua = |f: bool| if f { LIBRADOS_OP_FLAG_FADVISE_FUA } else { 0 };
        // SAFETY: the closure creates one completion whose callback is `rbd_done` with the
        // job's address, releases it if the operation is refused, and uses `buf`, which the
        // job owns (its heap memory does not move with the box) until `rbd_done` frees it;
        // `image` stays open until every job has called back (`retire`).
        unsafe {
            job.hand_over(|p| {
                let mut c: rbd_completion_t = std::ptr::null_mut();
                let r = rbd_aio_create_completion(p.cast(), rbd_done, &mut c);
                if r < 0 {
                    return r.into();
                }
                let Ok(n) = usize::try_from(len) else {
                    rbd_aio_release(c);
                    return (-libc::EINVAL).into();
                };
                let r = match kind {
                    OpKind::Read | OpKind::Probe => rbd_aio_read(image, off, n, buf, c),
                    OpKind::Write { fua: f } => rbd_aio_write2(image, off, n, buf, c, fua(f)),
                    OpKind::Flush => rbd_aio_flush(image, c),
                    OpKind::Discard | OpKind::Remove => rbd_aio_discard(image, off, len, c),
                    OpKind::WriteZeroes => rbd_aio_write_zeroes(image, off, n, c, 0, 0),
                };
                if r < 0 {
                    rbd_aio_release(c);
                }
                r.into()
            });
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let image = self.image;
        // SAFETY: the image is open, and `close` runs once every operation on it has
        // called back.
        self.s.close(|| unsafe {
            rbd_close(image);
        });
    }
}

impl BlockDevice for RbdExtent {
    fn name(&self) -> String {
        self.inner.uri.to_string()
    }

    fn size(&self) -> Bytes {
        Bytes(self.inner.size)
    }

    fn limits(&self) -> Limits {
        let ro = self.read_only();
        Limits {
            logical_block_size: 512,
            physical_block_size: 4096,
            io_opt: u32::try_from(self.inner.obj_size).unwrap_or(0),
            max_io: 4 << 20,
            discard_granularity: if ro { 0 } else { 4096 },
            discard_zeroes: false,
            write_zeroes: !ro,
            volatile_cache: true,
            fua: true,
            read_only: ro,
            multi_conn_safe: true,
        }
    }

    unsafe fn read<'a>(&'a self, offset: Bytes, buf: &'a mut [u8]) -> IoFuture<'a> {
        Box::pin(async move {
            check_range(&self.name(), self.size(), offset, Bytes(buf.len() as u64))?;
            let futs: Vec<IoFuture<'_>> = buf
                .chunks_mut(MAX_PIECE)
                .enumerate()
                .map(|(i, c)| {
                    let at = Where {
                        kind: OpKind::Read,
                        offset: offset.0 + (i * MAX_PIECE) as u64,
                        len: c.len() as u64,
                        object: None,
                    };
                    let bounce = vec![0u8; c.len()];
                    let dst = DstBuf::new(c);
                    // SAFETY: `c` is part of the caller's buffer, lent under its contract.
                    Box::pin(unsafe { request(&*self.inner, at, Some(dst), bounce) })
                        as IoFuture<'_>
                })
                .collect();
            join_pieces(futs).await
        })
    }

    unsafe fn write<'a>(&'a self, offset: Bytes, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a> {
        Box::pin(async move {
            self.refuse_write("write", offset.0)?;
            check_range(&self.name(), self.size(), offset, Bytes(buf.len() as u64))?;
            let kind = OpKind::Write { fua: flags.fua };
            let futs: Vec<IoFuture<'_>> = buf
                .chunks(MAX_PIECE)
                .enumerate()
                .map(|(i, c)| {
                    let at = offset.0 + (i * MAX_PIECE) as u64;
                    // The payload is copied: librbd reads it after this call returns.
                    Box::pin(self.op(kind, at, c.len() as u64, c.to_vec())) as IoFuture<'_>
                })
                .collect();
            join_pieces(futs).await
        })
    }

    fn flush(&self) -> IoFuture<'_> {
        Box::pin(async move {
            if self.read_only() {
                return Ok(());
            }
            self.op(OpKind::Flush, 0, 0, Vec::new()).await
        })
    }

    fn discard(&self, offset: Bytes, len: Bytes) -> IoFuture<'_> {
        Box::pin(async move {
            self.refuse_write("discard", offset.0)?;
            check_range(&self.name(), self.size(), offset, len)?;
            self.range_op(OpKind::Discard, offset.0, len.0).await
        })
    }

    fn write_zeroes(&self, offset: Bytes, len: Bytes, flags: WriteFlags) -> IoFuture<'_> {
        Box::pin(async move {
            self.refuse_write("write-zeroes", offset.0)?;
            check_range(&self.name(), self.size(), offset, len)?;
            self.range_op(OpKind::WriteZeroes, offset.0, len.0).await?;
            if flags.fua {
                // rbd_aio_write_zeroes takes op flags, but FUA there is not documented to
                // reach the cache: a flush makes the zeroes durable.
                self.op(OpKind::Flush, 0, 0, Vec::new()).await?;
            }
            Ok(())
        })
    }

    fn status(&self) -> String {
        self.inner.s.status(&self.name())
    }

    fn connections_made(&self) -> Option<u64> {
        Some(self.inner.s.req.generation())
    }
}
