//! TLS on the server side (`--tls on|require`), x509 as qemu-nbd and nbdkit do it: a
//! directory with `server-cert.pem` and `server-key.pem` (mode 0600), and `ca-cert.pem` to
//! verify clients' certificates when asked to.
//!
//! After `NBD_OPT_STARTTLS` the connection's socket is handed to a pump that runs the TLS
//! session and passes plaintext through a socket pair; the rest of the handshake and the
//! transmission phase run unchanged on the pair's other end. That keeps every path of the
//! connection code (batched replies, big reads sent by other workers) the same with and
//! without TLS, at the cost of one more copy per byte on TLS connections.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Whether a server offers TLS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsMode {
    /// Never (`NBD_OPT_STARTTLS` is refused as unsupported).
    #[default]
    Off,
    /// Clients may start TLS.
    On,
    /// Clients must start TLS before anything else (`NBD_REP_ERR_TLS_REQD` otherwise).
    Require,
}

/// A server's TLS mode and credentials.
#[derive(Clone)]
pub struct Tls {
    /// Off, on or required.
    pub mode: TlsMode,
    pub(crate) config: Arc<ServerConfig>,
    /// Where the credentials came from (for messages).
    pub dir: PathBuf,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The credentials themselves never appear in output.
        f.debug_struct("Tls")
            .field("mode", &self.mode)
            .field("dir", &self.dir)
            .finish()
    }
}

impl Tls {
    /// Loads `dir/server-cert.pem` and `dir/server-key.pem` (refused unless only its owner
    /// can read it); with `verify_peer`, clients must present a certificate `dir/ca-cert.pem`
    /// signed. Errors name the file.
    pub fn load(mode: TlsMode, dir: &Path, verify_peer: bool) -> Result<Tls, String> {
        let cert = dir.join("server-cert.pem");
        let key = dir.join("server-key.pem");
        let md = std::fs::metadata(&key).map_err(|e| format!("{}: {e}", key.display()))?;
        if md.mode() & 0o077 != 0 {
            return Err(format!(
                "{}: mode {:o}: a private key must be readable by its owner only (chmod 600)",
                key.display(),
                md.mode() & 0o777
            ));
        }
        let chain = CertificateDer::pem_file_iter(&cert)
            .map_err(|e| format!("{}: {e}", cert.display()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{}: {e}", cert.display()))?;
        if chain.is_empty() {
            return Err(format!("{}: no certificate in it", cert.display()));
        }
        let k = PrivateKeyDer::from_pem_file(&key)
            .map_err(|e| format!("{}: not a PEM private key ({e})", key.display()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?;
        let builder = if verify_peer {
            let ca = dir.join("ca-cert.pem");
            let mut roots = RootCertStore::empty();
            for c in
                CertificateDer::pem_file_iter(&ca).map_err(|e| format!("{}: {e}", ca.display()))?
            {
                let c = c.map_err(|e| format!("{}: {e}", ca.display()))?;
                roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
            }
            let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("{}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(v)
        } else {
            builder.with_no_client_auth()
        };
        let config = builder
            .with_single_cert(chain, k)
            .map_err(|e| format!("{}: {e}", cert.display()))?;
        Ok(Tls {
            mode,
            config: Arc::new(config),
            dir: dir.to_path_buf(),
        })
    }

    /// A session for a new connection.
    pub(crate) fn session(&self) -> io::Result<ServerConnection> {
        ServerConnection::new(self.config.clone())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}")))
    }
}

/// A connected pair of Unix stream sockets: (ours, the pump's).
pub(crate) fn socket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: socketpair writes two descriptors into the array it is given.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

const STEP: usize = 64 * 1024;

/// Runs the TLS session of one connection: ciphertext on `tcp`, plaintext on `plain`, until
/// either side is done. The client closing (or the server shutting `tcp`'s read side) ends
/// the plaintext side's input but lets replies still flow out; the connection code closing
/// its end sends close_notify and ends the TCP write side.
pub(crate) async fn pump(tcp: Arc<OwnedFd>, plain: OwnedFd, session: ServerConnection) {
    let s = RefCell::new(session);
    let send_lock = futures::lock::Mutex::new(());
    let inbound = async {
        let r = inbound(&tcp, &plain, &s, &send_lock).await;
        if let Err(e) = &r {
            log::debug!("nbd: TLS: {e}");
        }
        // No more input for the connection code (its replies still go out).
        // SAFETY: plain syscall on a descriptor this function owns.
        unsafe { libc::shutdown(plain.as_raw_fd(), libc::SHUT_WR) };
        if r.is_err() {
            // A broken session cannot carry replies either.
            // SAFETY: as above.
            unsafe { libc::shutdown(tcp.as_raw_fd(), libc::SHUT_RDWR) };
        }
    };
    let outbound = async {
        if let Err(e) = outbound(&tcp, &plain, &s, &send_lock).await {
            log::debug!("nbd: TLS: {e}");
        }
        // SAFETY: plain syscalls on descriptors this function holds.
        unsafe {
            libc::shutdown(tcp.as_raw_fd(), libc::SHUT_WR);
            libc::shutdown(plain.as_raw_fd(), libc::SHUT_RD);
        }
    };
    futures::future::join(inbound, outbound).await;
}

/// Sends whatever the session has to send (handshake messages, records, alerts).
async fn flush_tls(
    tcp: &OwnedFd,
    s: &RefCell<ServerConnection>,
    lock: &futures::lock::Mutex<()>,
) -> io::Result<()> {
    let _turn = lock.lock().await;
    let mut out = Vec::new();
    {
        let mut c = s.borrow_mut();
        while c.wants_write() {
            c.write_tls(&mut out)?;
        }
    }
    if !out.is_empty() {
        // SAFETY: `out` lives in this future, which its caller awaits to the end.
        unsafe { iort::send_all(tcp.as_raw_fd(), &out, libc::MSG_NOSIGNAL) }.await?;
    }
    Ok(())
}

/// Client to connection: ciphertext in, plaintext out.
async fn inbound(
    tcp: &OwnedFd,
    plain: &OwnedFd,
    s: &RefCell<ServerConnection>,
    lock: &futures::lock::Mutex<()>,
) -> io::Result<()> {
    let mut cipher = vec![0u8; STEP];
    let mut clear = vec![0u8; STEP];
    loop {
        // SAFETY: `cipher` lives in this future, which its caller awaits to the end.
        let n = unsafe { iort::recv(tcp.as_raw_fd(), &mut cipher) }.await?;
        if n == 0 {
            return Ok(());
        }
        let mut rd = &cipher[..n];
        while !rd.is_empty() {
            {
                let mut c = s.borrow_mut();
                c.read_tls(&mut rd)?;
                c.process_new_packets()
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{e}")))?;
            }
            flush_tls(tcp, s, lock).await?;
            loop {
                let got = s.borrow_mut().reader().read(&mut clear);
                match got {
                    Ok(0) => return Ok(()), // close_notify
                    Ok(k) => {
                        // SAFETY: `clear` lives in this future.
                        unsafe {
                            iort::send_all(plain.as_raw_fd(), &clear[..k], libc::MSG_NOSIGNAL)
                        }
                        .await?
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
        }
    }
}

/// Connection to client: plaintext in, ciphertext out.
async fn outbound(
    tcp: &OwnedFd,
    plain: &OwnedFd,
    s: &RefCell<ServerConnection>,
    lock: &futures::lock::Mutex<()>,
) -> io::Result<()> {
    let mut clear = vec![0u8; STEP];
    loop {
        // SAFETY: `clear` lives in this future, which its caller awaits to the end.
        let n = unsafe { iort::recv(plain.as_raw_fd(), &mut clear) }.await?;
        if n == 0 {
            s.borrow_mut().send_close_notify();
            return flush_tls(tcp, s, lock).await;
        }
        s.borrow_mut().writer().write_all(&clear[..n])?;
        flush_tls(tcp, s, lock).await?;
    }
}
