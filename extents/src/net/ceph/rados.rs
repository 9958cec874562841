//! [`RadosExtent`]: a volume stored as a run of RADOS objects, with no header.
//!
//! Layout: byte `b` of a volume `rados:POOL/PREFIX?object_size=S&size=N` is byte `b % S` of
//! the object named `PREFIX.%016x` (the object index `b / S` in lower-case hex, 16 digits) in
//! pool POOL. An object exists once a write has touched it and is as long as the furthest
//! byte written to it; bytes it does not have (a missing object, past its end, a zeroed
//! range) read as zeroes.

use std::ffi::{c_char, CString};
use std::sync::Arc;

use tables::io::{check_range, join_pieces};
use tables::registry::ExtentHealth;
use tables::{BlockDevice, Bytes, IoFuture, IoResult, Limits, WriteFlags};

use super::cluster::Session;
use super::ffi::*;
use super::table::{
    rados_done, request, spawn_watchdog, Issuer, Job, Lib, OpKind, Requests, Where,
};
use crate::net::lend::DstBuf;
use crate::net::uri::RadosUri;
use crate::net::NetError;

/// A volume of fixed-size RADOS objects, read and written through librados's aio calls.
///
/// A request is split at object boundaries, one operation per object: `rados_aio_read`
/// (a missing object, ENOENT, and the bytes past a short object's end read as zeroes),
/// `rados_aio_write` (creating the object), and for discard and write-zeroes
/// `rados_aio_remove` of an object the range covers whole or a `zero` write operation on
/// part of one (so discarded ranges read back as zeroes). A write is durable once librados
/// acknowledges it (the OSDs have committed it), so FLUSH has nothing to do and FUA needs
/// nothing more. The size comes from the name (`size=`): there is no header.
///
/// Completions arrive on librados's threads as for [`super::RbdExtent`] (see `table.rs`).
pub struct RadosExtent {
    inner: Arc<Inner>,
}

struct Inner {
    uri: RadosUri,
    s: Session,
}

impl std::fmt::Debug for RadosExtent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RadosExtent")
            .field("uri", &self.inner.uri.to_string())
            .field("size", &self.inner.uri.size)
            .field("object_size", &self.inner.uri.object_size)
            .finish()
    }
}

/// One object's part of a request: its index, the range in the volume, and where it starts
/// in the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Piece {
    object: u64,
    offset: u64,
    len: u64,
    at: usize,
}

/// `[offset, offset+len)` cut at multiples of `object_size`.
fn pieces(offset: u64, len: u64, object_size: u64) -> Vec<Piece> {
    let mut v = Vec::new();
    let mut done = 0u64;
    while done < len {
        let o = offset + done;
        let n = (object_size - o % object_size).min(len - done);
        v.push(Piece {
            object: o / object_size,
            offset: o,
            len: n,
            at: done as usize,
        });
        done += n;
    }
    v
}

impl RadosExtent {
    /// Connects to the cluster and opens the pool (a keyring readable by others, an
    /// unreachable cluster or a missing pool is reported now, naming the URI, never the
    /// key). The objects need not exist.
    pub fn open(uri: RadosUri) -> Result<RadosExtent, NetError> {
        let name = uri.to_string();
        let err = |msg: String| NetError::Connect {
            uri: name.clone(),
            msg,
        };
        let s = Session::open(&name, &uri.client, &uri.pool, &uri.opts).map_err(err)?;
        let req = s.req.clone();
        let inner = Arc::new(Inner { uri, s });
        spawn_watchdog(Arc::downgrade(&inner), req).map_err(err)?;
        Ok(RadosExtent { inner })
    }

    /// The URI this extent was opened with.
    pub fn uri(&self) -> &RadosUri {
        &self.inner.uri
    }

    /// Whether the cluster has not answered for longer than timeout plus reconnect-delay.
    pub fn is_failed(&self) -> bool {
        self.health().state == "failed"
    }

    /// How the extent is doing (as [`super::RbdExtent::health`]).
    pub fn health(&self) -> ExtentHealth {
        self.inner.s.health()
    }

    fn at(&self, kind: OpKind, p: &Piece) -> Where {
        Where {
            kind,
            offset: p.offset,
            len: p.len,
            object: Some(self.inner.uri.object_name(p.object)),
        }
    }

    /// Discard and write-zeroes: objects covered whole are removed, parts zeroed.
    async fn zero_range(&self, offset: u64, len: u64) -> IoResult<()> {
        let os = self.inner.uri.object_size;
        let size = self.inner.uri.size;
        let futs: Vec<IoFuture<'_>> = pieces(offset, len, os)
            .iter()
            .map(|p| {
                let start = p.object * os;
                let whole =
                    p.offset == start && p.offset + p.len >= start.saturating_add(os).min(size);
                let kind = if whole {
                    OpKind::Remove
                } else {
                    OpKind::WriteZeroes
                };
                let at = self.at(kind, p);
                // SAFETY: no memory of the caller is lent.
                Box::pin(unsafe { request(&*self.inner, at, None, Vec::new()) }) as IoFuture<'_>
            })
            .collect();
        join_pieces(futs).await
    }
}

impl Issuer for Inner {
    const LIB: Lib = Lib::Rados;

    fn requests(&self) -> &Arc<Requests> {
        &self.s.req
    }

    fn issue(&self, mut job: Box<Job>, at: &Where) {
        let io = self.s.io();
        let os = self.uri.object_size;
        let (kind, len) = (at.kind, at.len);
        let obj_off = at.offset % os;
        let Ok(oid) = CString::new(self.uri.object_name(at.offset / os)) else {
            // SAFETY: refusing without calling the library.
            unsafe { job.hand_over(|_| (-libc::EINVAL).into()) };
            return;
        };
        let oid_ptr = oid.as_ptr();
        job.oid = Some(oid);
        let buf = job.buf.as_mut_ptr().cast::<c_char>();
        let n = job.buf.len();
        let stat = (&raw mut job.stat.0, &raw mut job.stat.1);
        // SAFETY: the closure creates one completion whose callback is `rados_done` with the
        // job's address and releases it if the operation is refused; `buf`, `oid_ptr` and
        // `stat` point into the job (heap memory that does not move with the box), which
        // lives until `rados_done` frees it; the ioctx stays open until every job has called
        // back (`retire`).
        unsafe {
            job.hand_over(|p| {
                let mut c: rados_completion_t = std::ptr::null_mut();
                let r = rados_aio_create_completion2(p.cast(), rados_done, &mut c);
                if r < 0 {
                    return r.into();
                }
                let r = match kind {
                    OpKind::Read => rados_aio_read(io, oid_ptr, c, buf, n, obj_off),
                    OpKind::Write { .. } => rados_aio_write(io, oid_ptr, c, buf, n, obj_off),
                    OpKind::Remove => rados_aio_remove(io, oid_ptr, c),
                    OpKind::Discard | OpKind::WriteZeroes => {
                        let op = rados_create_write_op();
                        if op.is_null() {
                            -libc::ENOMEM
                        } else {
                            rados_write_op_zero(op, obj_off, len);
                            let r = rados_aio_write_op_operate(
                                op,
                                io,
                                c,
                                oid_ptr,
                                std::ptr::null_mut(),
                                0,
                            );
                            // librados has taken the operation's steps into its request.
                            rados_release_write_op(op);
                            r
                        }
                    }
                    OpKind::Probe | OpKind::Flush => rados_aio_stat(io, oid_ptr, c, stat.0, stat.1),
                };
                if r < 0 {
                    rados_aio_release(c);
                }
                r.into()
            });
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.s.close(|| ());
    }
}

impl BlockDevice for RadosExtent {
    fn name(&self) -> String {
        self.inner.uri.to_string()
    }

    fn size(&self) -> Bytes {
        Bytes(self.inner.uri.size)
    }

    fn limits(&self) -> Limits {
        let os = self.inner.uri.object_size;
        Limits {
            logical_block_size: 512,
            physical_block_size: 4096,
            io_opt: os as u32,
            max_io: os.min(4 << 20) as u32,
            discard_granularity: 4096,
            discard_zeroes: true,
            write_zeroes: true,
            volatile_cache: false,
            fua: true,
            read_only: false,
            multi_conn_safe: true,
        }
    }

    unsafe fn read<'a>(&'a self, offset: Bytes, buf: &'a mut [u8]) -> IoFuture<'a> {
        Box::pin(async move {
            check_range(&self.name(), self.size(), offset, Bytes(buf.len() as u64))?;
            let ps = pieces(offset.0, buf.len() as u64, self.inner.uri.object_size);
            let mut rest: &mut [u8] = buf;
            let mut futs: Vec<IoFuture<'_>> = Vec::with_capacity(ps.len());
            for p in &ps {
                let (c, tail) = rest.split_at_mut(p.len as usize);
                rest = tail;
                let at = self.at(OpKind::Read, p);
                let bounce = vec![0u8; c.len()];
                let dst = DstBuf::new(c);
                // SAFETY: `c` is part of the caller's buffer, lent under its contract.
                futs.push(Box::pin(unsafe {
                    request(&*self.inner, at, Some(dst), bounce)
                }));
            }
            join_pieces(futs).await
        })
    }

    unsafe fn write<'a>(&'a self, offset: Bytes, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a> {
        Box::pin(async move {
            check_range(&self.name(), self.size(), offset, Bytes(buf.len() as u64))?;
            let kind = OpKind::Write { fua: flags.fua };
            let futs: Vec<IoFuture<'_>> =
                pieces(offset.0, buf.len() as u64, self.inner.uri.object_size)
                    .iter()
                    .map(|p| {
                        let at = self.at(kind, p);
                        // The payload is copied: librados reads it after this call returns.
                        let data = buf[p.at..p.at + p.len as usize].to_vec();
                        // SAFETY: no memory of the caller is lent.
                        Box::pin(unsafe { request(&*self.inner, at, None, data) }) as IoFuture<'_>
                    })
                    .collect();
            join_pieces(futs).await
        })
    }

    fn flush(&self) -> IoFuture<'_> {
        // Acknowledged writes are committed on the OSDs already.
        tables::io::ready(Ok(()))
    }

    fn discard(&self, offset: Bytes, len: Bytes) -> IoFuture<'_> {
        Box::pin(async move {
            check_range(&self.name(), self.size(), offset, len)?;
            self.zero_range(offset.0, len.0).await
        })
    }

    fn write_zeroes(&self, offset: Bytes, len: Bytes, _flags: WriteFlags) -> IoFuture<'_> {
        Box::pin(async move {
            check_range(&self.name(), self.size(), offset, len)?;
            self.zero_range(offset.0, len.0).await
        })
    }

    fn status(&self) -> String {
        self.inner.s.status(&self.name())
    }

    fn connections_made(&self) -> Option<u64> {
        Some(self.inner.s.req.generation())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_cut_at_object_boundaries() {
        let k = 4096;
        assert_eq!(
            pieces(1000, 10_000, k),
            vec![
                Piece {
                    object: 0,
                    offset: 1000,
                    len: 3096,
                    at: 0
                },
                Piece {
                    object: 1,
                    offset: 4096,
                    len: 4096,
                    at: 3096
                },
                Piece {
                    object: 2,
                    offset: 8192,
                    len: 2808,
                    at: 7192
                },
            ]
        );
        assert_eq!(
            pieces(8192, 4096, k),
            vec![Piece {
                object: 2,
                offset: 8192,
                len: 4096,
                at: 0
            }]
        );
        assert!(pieces(5, 0, k).is_empty());
    }
}
