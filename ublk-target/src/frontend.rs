//! One front end per device: `/dev/ublkbN` through ublk, or an NBD export (TCP or unix
//! socket). `volmgr serve` and the daemon both go through here.

use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use tables::{Bytes, DeviceRef};

use crate::ublk::{UblkOptions, UblkServer};

/// Which front end to start.
#[derive(Debug, Clone)]
pub enum FrontendKind {
    /// NBD on a TCP address (`HOST:PORT`).
    Nbd(String),
    /// NBD on a unix socket.
    NbdUnix(PathBuf),
    /// ublk, with an optional device id.
    Ublk(Option<u32>),
    /// None: the device serves only the daemon's other devices (stacked under them).
    Internal,
}

enum Inner {
    Nbd(nbd::ServerHandle),
    Ublk(UblkServer),
    Internal,
}

/// A running front end.
pub struct Frontend {
    inner: Inner,
    path: String,
}

/// Front-end failures (messages carry the device name).
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// The NBD server failed.
    #[error("NBD export: {0}")]
    Nbd(#[from] nbd::NbdError),
    /// The ublk device failed.
    #[error("ublk: {0}")]
    Ublk(String),
}

impl Frontend {
    /// Starts a front end for `dev` named `name`. With `restoring`, a ublk device that still
    /// exists in the kernel (the daemon was killed) is re-attached through user recovery.
    /// NBD exports get `limits` (memory budget, connections, timeouts) and `tls` (offered
    /// or required); an export on an address other hosts can reach without TLS is logged as
    /// a warning.
    pub fn start(
        name: &str,
        dev: DeviceRef,
        kind: FrontendKind,
        restoring: bool,
        limits: &nbd::Limits,
        tls: Option<&nbd::Tls>,
    ) -> Result<Frontend, FrontendError> {
        let builder = || {
            let b = nbd::Server::builder()
                .export(name, "volmgr volume", dev.clone())
                .limits(*limits);
            match tls {
                Some(t) => b.tls(t.clone()),
                None => b,
            }
        };
        let scheme = match tls.map(|t| t.mode) {
            Some(nbd::TlsMode::Require) => "nbds",
            _ => "nbd",
        };
        match kind {
            FrontendKind::Nbd(addr) => {
                let h = builder().build()?.serve_tcp(addr.as_str())?;
                let local = h.local_addr();
                if tls.is_none() && local.is_some_and(|a| !a.ip().is_loopback()) {
                    log::warn!(
                        "{name}: exported over NBD on {addr} without TLS: whoever reaches that \
                         address can read and write the volume (use --tls require)"
                    );
                }
                let shown = local.map(|a| a.to_string()).unwrap_or_else(|| addr.clone());
                Ok(Frontend {
                    inner: Inner::Nbd(h),
                    path: format!("{scheme}://{shown}/{name}"),
                })
            }
            FrontendKind::NbdUnix(p) => {
                let h = builder().build()?.serve_unix(&p)?;
                Ok(Frontend {
                    inner: Inner::Nbd(h),
                    path: format!("{scheme}+unix:///{name}?socket={}", p.display()),
                })
            }
            FrontendKind::Internal => {
                // The device is kept alive by the daemon's record; its users hold it too.
                drop(dev);
                Ok(Frontend {
                    inner: Inner::Internal,
                    path: String::new(),
                })
            }
            FrontendKind::Ublk(id) => {
                let opts = UblkOptions {
                    dev_id: id,
                    user_recovery: true,
                    ..UblkOptions::default()
                };
                // A daemon restoring after a crash finds its devices still in the kernel
                // (created with user recovery): re-attach instead of creating anew.
                let s = match id {
                    Some(id) if restoring && UblkServer::exists(id) => {
                        UblkServer::recover(dev, id, &opts)
                    }
                    _ => UblkServer::start(dev, &opts),
                }
                .map_err(|e| FrontendError::Ublk(e.to_string()))?;
                let path = s.bdev_path();
                Ok(Frontend {
                    inner: Inner::Ublk(s),
                    path,
                })
            }
        }
    }

    /// Where clients find the device: `/dev/ublkbN` or an NBD URI.
    pub fn path(&self) -> String {
        self.path.clone()
    }

    /// The ublk device id, for ublk front ends.
    pub fn ublk_id(&self) -> Option<u32> {
        match &self.inner {
            Inner::Ublk(s) => Some(s.dev_id()),
            Inner::Nbd(_) | Inner::Internal => None,
        }
    }

    /// How request data moves: `zero-copy`, `copy` (ublk) or `nbd`.
    pub fn data_path(&self) -> &'static str {
        match &self.inner {
            Inner::Ublk(s) if s.zero_copy() => "zero-copy",
            Inner::Ublk(_) => "copy",
            Inner::Nbd(_) => "nbd",
            Inner::Internal => "internal",
        }
    }

    /// Why the device should not be removed now (mounted, open, clients connected), if so.
    pub fn busy(&self) -> Option<String> {
        match &self.inner {
            Inner::Nbd(h) => {
                let n = h.connections();
                (n > 0).then(|| format!("in use by {n} NBD client(s)"))
            }
            Inner::Ublk(_) => {
                // An exclusive open fails with EBUSY while the block device is mounted or
                // otherwise held exclusively.
                match std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_EXCL)
                    .open(&self.path)
                {
                    Ok(_) => None,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        Some("open or mounted".to_string())
                    }
                    Err(_) => None,
                }
            }
            // Users among the daemon's devices are checked by the daemon itself.
            Inner::Internal => None,
        }
    }

    /// Why the front end stopped serving on its own, if it did (a ublk queue thread died).
    pub fn failed(&self) -> Option<String> {
        match &self.inner {
            Inner::Nbd(_) | Inner::Internal => None,
            Inner::Ublk(s) => s.failed(),
        }
    }

    /// Whether [`Frontend::resize`] can work here: always for NBD; for ublk only on a kernel
    /// with `UBLK_U_CMD_UPDATE_SIZE`.
    pub fn can_resize(&self) -> bool {
        match &self.inner {
            Inner::Nbd(_) | Inner::Internal => true,
            Inner::Ublk(_) => UblkServer::can_update_size(),
        }
    }

    /// Tells the front end the device's new size after a reload.
    pub fn resize(&self, size: Bytes) -> Result<(), FrontendError> {
        match &self.inner {
            // NBD clients learn the size at their next handshake.
            Inner::Nbd(_) | Inner::Internal => Ok(()),
            Inner::Ublk(s) => s
                .update_size(size)
                .map_err(|e| FrontendError::Ublk(e.to_string())),
        }
    }

    /// Stops the front end: NBD stops accepting and flushes; ublk stops and deletes the device.
    pub fn stop(self) -> Result<(), FrontendError> {
        match self.inner {
            Inner::Nbd(h) => Ok(h.shutdown()?),
            Inner::Ublk(s) => s.stop().map_err(|e| FrontendError::Ublk(e.to_string())),
            Inner::Internal => Ok(()),
        }
    }
}
