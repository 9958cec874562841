//! systemd's readiness protocol (`Type=notify`): the daemon says `READY=1` once every recorded
//! device has been brought up (or found failed), and `STOPPING=1` when it starts to stop.
//! Without `NOTIFY_SOCKET` in the environment this does nothing.

use std::os::unix::net::UnixDatagram;

/// Sends `state` (`READY=1`, `STATUS=...`, newline-separated) to systemd, if it asked for it.
/// Failures are logged, never fatal: a daemon must not die because nobody listens.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match UnixDatagram::unbound() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("volmgr daemon: sd_notify: {e}");
            return;
        }
    };
    let bytes = path.as_encoded_bytes();
    let r = if let Some(name) = bytes.strip_prefix(b"@") {
        // An abstract socket (systemd's usual choice).
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
    } else {
        sock.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = r {
        eprintln!(
            "volmgr daemon: sd_notify to {}: {e}",
            path.to_string_lossy()
        );
    }
}
