//! The control socket: one JSON request per line, one JSON reply, each client on its own
//! thread. A client that sends nothing, sends too much or never reads its reply is cut off by
//! a timeout or a size limit; at most [`MAX_CLIENTS`] are served at once (others are told so).
//! Commands that wait for a device's I/O are bounded on their own (see `ops.rs`), so nothing a
//! client or a device does can stop the daemon from answering the next client.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::{io_err, Daemon, DaemonError};
use crate::control::{Reply, Request};

/// Control clients served at once.
pub const MAX_CLIENTS: usize = 32;
/// Largest request line (a table of a few thousand lines fits).
pub const MAX_REQUEST_BYTES: u64 = 4 << 20;
/// How long a client may take to send its request, and to take its reply.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Counts a client in; counts it out however its thread ends.
struct ClientSlot(Arc<Daemon>);

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Daemon {
    /// Serves the control socket until a shutdown request or [`Daemon::request_stop`] (also
    /// one that came before the socket was bound: then it returns at once).
    pub fn serve_control(self: &Arc<Self>) -> Result<(), DaemonError> {
        if self.stopping() {
            return Ok(());
        }
        let sock = self.socket_path();
        let _ = std::fs::remove_file(&sock); // stale socket of a dead daemon: we hold the lock
                                             // SAFETY: umask has no failure mode; the socket is restricted to its owner from birth.
        let old = unsafe { libc::umask(0o177) };
        let listener = UnixListener::bind(&sock);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let listener = listener.map_err(io_err(format!("binding {}", sock.display())))?;
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err(format!("chmod {}", sock.display())))?;
        for conn in listener.incoming() {
            if self.stopping() {
                break;
            }
            let Ok(conn) = conn else { continue };
            let _ = conn.set_write_timeout(Some(CLIENT_TIMEOUT));
            if !peer_is_root(&conn) {
                let _ = reply(
                    &conn,
                    &Reply::Error {
                        message: "the volmgr control socket is for root only".into(),
                    },
                );
                continue;
            }
            if self.clients.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
                self.clients.fetch_sub(1, Ordering::SeqCst);
                let _ = reply(
                    &conn,
                    &Reply::Error {
                        message: format!(
                            "the daemon is serving {MAX_CLIENTS} control clients already; \
                             try again"
                        ),
                    },
                );
                continue;
            }
            let slot = ClientSlot(self.clone());
            let spawned = std::thread::Builder::new()
                .name("volmgr-ctl".into())
                .spawn(move || {
                    let slot = slot;
                    slot.0.handle_conn(conn);
                });
            if let Err(e) = spawned {
                // The closure (and its slot) was dropped: the count is already back.
                log::error!("cannot start a control client thread: {e}");
            }
        }
        Ok(())
    }

    /// One client: read one request line (bounded in time and size), answer it.
    fn handle_conn(&self, conn: UnixStream) {
        let _ = conn.set_read_timeout(Some(CLIENT_TIMEOUT));
        let mut line = Vec::new();
        let read = BufReader::new((&conn).take(MAX_REQUEST_BYTES + 1)).read_until(b'\n', &mut line);
        let rep = match read {
            Err(e) => {
                log::warn!("control client: no complete request ({e}); dropped");
                Reply::Error {
                    message: format!(
                        "no complete request within {} s: {e}",
                        CLIENT_TIMEOUT.as_secs()
                    ),
                }
            }
            Ok(_) if line.len() as u64 > MAX_REQUEST_BYTES => Reply::Error {
                message: format!(
                    "request larger than {} MiB; refused",
                    MAX_REQUEST_BYTES >> 20
                ),
            },
            Ok(0) => return,
            Ok(_) => match serde_json::from_slice::<Request>(&line) {
                Ok(req) => {
                    let shutdown = matches!(req, Request::Shutdown);
                    let rep = self.handle(req);
                    if shutdown {
                        self.request_stop();
                    }
                    rep
                }
                Err(e) => Reply::Error {
                    message: format!("malformed request: {e}"),
                },
            },
        };
        if let Err(e) = reply(&conn, &rep) {
            log::warn!("control client: reply not delivered: {e}");
        }
    }
}

fn reply(conn: &UnixStream, rep: &Reply) -> std::io::Result<()> {
    let mut s = serde_json::to_string(rep).map_err(std::io::Error::other)?;
    s.push('\n');
    (&*conn).write_all(s.as_bytes())
}

fn peer_is_root(conn: &UnixStream) -> bool {
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, which outlives the call.
    let r = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    r == 0 && cred.uid == 0
}
