//! [`Cluster`]: a librados handle connected to a cluster, with an I/O context on one pool.

use std::ffi::{c_char, CString};
use std::mem::ManuallyDrop;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tables::registry::ExtentHealth;

use super::ffi::*;
use super::table::{errno_text, retire, Requests};
use crate::net::private::check_private;
use crate::net::uri::{CephClient, NetOptions};

/// A connected cluster handle and an I/O context on one pool. librados's handles are
/// thread-safe for I/O: requesters on any thread issue operations through them.
pub(crate) struct Cluster {
    rados: rados_t,
    pub io: rados_ioctx_t,
    /// The monitors, as the configuration names them (for status).
    pub mon_host: String,
}

// SAFETY: librados handles may be used from any thread (librados serialises internally);
// we only change their configuration before they are shared.
unsafe impl Send for Cluster {}
// SAFETY: as above: concurrent I/O calls on one ioctx are supported by librados.
unsafe impl Sync for Cluster {}

fn cstr(what: &str, s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{what} holds a NUL byte"))
}

/// Whole seconds, rounded up, at least 1 (librados's timeouts are whole seconds).
fn secs(d: Duration) -> String {
    d.as_secs_f64().ceil().max(1.0).to_string()
}

impl Cluster {
    /// Connects as `client` says (the keyring must be private to us) and opens `pool`.
    /// `connect-timeout` bounds the connection (`client_mount_timeout`); `window` bounds
    /// every operation (`rados_osd_op_timeout`, `rados_mon_op_timeout`), during which
    /// librados resends it as the cluster's maps change. Errors never hold the key.
    pub(crate) fn connect(
        client: &CephClient,
        pool: &str,
        opts: &NetOptions,
        window: Duration,
    ) -> Result<Cluster, String> {
        if let Some(k) = &client.keyring {
            check_private("keyring", "the Ceph key", k)?;
        }
        let name = format!("client.{}", client.id.as_deref().unwrap_or("admin"));
        let cname = cstr("id", &name)?;
        let mut rados: rados_t = std::ptr::null_mut();
        // SAFETY: `rados` is a valid out-pointer; the strings are NUL-terminated and live
        // across the call.
        let r = unsafe { rados_create2(&mut rados, c"ceph".as_ptr(), cname.as_ptr(), 0) };
        if r < 0 {
            return Err(format!(
                "cannot create a librados handle: {}",
                errno_text(r.into())
            ));
        }
        let mut c = Cluster {
            rados,
            io: std::ptr::null_mut(),
            mon_host: String::new(),
        };
        c.configure(client, opts, window)?;
        // SAFETY: a configured handle, not yet connected.
        let r = unsafe { rados_connect(c.rados) };
        if r < 0 {
            return Err(format!(
                "cannot connect to the cluster (monitors {}) as {name} within {:.1} s: {}",
                c.mon_host,
                opts.connect_timeout.as_secs_f64(),
                errno_text(r.into())
            ));
        }
        let cpool = cstr("the pool name", pool)?;
        // SAFETY: a connected handle, a NUL-terminated name, a valid out-pointer.
        let r = unsafe { rados_ioctx_create(c.rados, cpool.as_ptr(), &mut c.io) };
        if r < 0 {
            c.io = std::ptr::null_mut();
            return Err(format!("pool '{pool}': {}", errno_text(r.into())));
        }
        Ok(c)
    }

    fn set(&self, option: &str, value: &str) -> Result<(), String> {
        let o = cstr(option, option)?;
        let v = cstr(option, value)?;
        // SAFETY: a live, unconnected handle; NUL-terminated strings that outlive the call.
        let r = unsafe { rados_conf_set(self.rados, o.as_ptr(), v.as_ptr()) };
        if r < 0 {
            return Err(format!("{option}: {}", errno_text(r.into())));
        }
        Ok(())
    }

    fn configure(
        &mut self,
        client: &CephClient,
        opts: &NetOptions,
        window: Duration,
    ) -> Result<(), String> {
        let conf = match &client.conf {
            Some(p) => Some(cstr("conf=", &p.display().to_string())?),
            None => None,
        };
        let ptr = conf.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
        // SAFETY: a live handle; `ptr` is NULL (librados's default search) or a
        // NUL-terminated path that outlives the call.
        let r = unsafe { rados_conf_read_file(self.rados, ptr) };
        if r < 0 {
            let which = client.conf.as_ref().map_or_else(
                || "the default configuration ($CEPH_CONF, /etc/ceph/ceph.conf)".to_string(),
                |p| format!("conf {}", p.display()),
            );
            return Err(format!("cannot read {which}: {}", errno_text(r.into())));
        }
        if let Some(k) = &client.keyring {
            self.set("keyring", &k.display().to_string())?;
        }
        self.set("client_mount_timeout", &secs(opts.connect_timeout))?;
        self.set("rados_osd_op_timeout", &secs(window))?;
        self.set("rados_mon_op_timeout", &secs(window))?;
        self.mon_host = self.get("mon_host").unwrap_or_default();
        Ok(())
    }

    fn get(&self, option: &str) -> Option<String> {
        let o = CString::new(option).ok()?;
        let mut buf = vec![0u8; 1024];
        // SAFETY: a live handle; `buf` is writable for its length.
        let r = unsafe {
            rados_conf_get(
                self.rados,
                o.as_ptr(),
                buf.as_mut_ptr().cast::<c_char>(),
                buf.len(),
            )
        };
        if r < 0 {
            return None;
        }
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        Some(String::from_utf8_lossy(&buf[..end]).into_owned())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.io.is_null() {
            // SAFETY: the ioctx is ours and no operation on it is outstanding (the extent
            // drains its jobs before dropping the cluster, or leaks it).
            unsafe { rados_ioctx_destroy(self.io) };
        }
        // SAFETY: the handle is ours and nothing uses it any more.
        unsafe { rados_shutdown(self.rados) };
    }
}

/// What both Ceph extents hold: their request table and their cluster handle, which is
/// closed only once the library holds none of their jobs.
pub(crate) struct Session {
    pub req: Arc<Requests>,
    cluster: ManuallyDrop<Cluster>,
    /// [`Session::close`] ran (the cluster handle is closed, or leaked on purpose).
    closed: bool,
}

impl Session {
    /// Connects for the extent `name` (see [`Cluster::connect`]).
    pub(crate) fn open(
        name: &str,
        client: &CephClient,
        pool: &str,
        opts: &NetOptions,
    ) -> Result<Session, String> {
        let req = Arc::new(Requests::new(name.to_string(), opts.clone()));
        let cluster = Cluster::connect(client, pool, opts, req.op_window())?;
        Ok(Session {
            req,
            cluster: ManuallyDrop::new(cluster),
            closed: false,
        })
    }

    /// The pool's I/O context.
    pub(crate) fn io(&self) -> rados_ioctx_t {
        self.cluster.io
    }

    /// The extent's health (its server is the monitors).
    pub(crate) fn health(&self) -> ExtentHealth {
        self.req.health(self.cluster.mon_host.clone())
    }

    /// The status line of extent `name`: its health and its count of failed requests.
    pub(crate) fn status(&self, name: &str) -> String {
        let errors = self.req.stats.errors.load(Ordering::Relaxed);
        format!("{} errors {errors}", self.health().line(name))
    }

    /// Waits until the library holds no job, then runs `close` (closing what uses the
    /// cluster handle) and closes the handle; if jobs remain, leaks them both (see
    /// [`retire`]).
    pub(crate) fn close(&mut self, close: impl FnOnce()) {
        if std::mem::replace(&mut self.closed, true) {
            return;
        }
        if retire(&self.req) {
            close();
            // SAFETY: dropped once, here, after everything that used it was closed.
            unsafe { ManuallyDrop::drop(&mut self.cluster) };
        }
    }
}

impl Drop for Session {
    /// A session its extent did not close (an open that failed half-way) closes here.
    fn drop(&mut self) {
        self.close(|| ());
    }
}
