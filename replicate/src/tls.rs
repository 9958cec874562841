//! The link: one TCP connection, TLS with the same x509 files as the NBD export
//! (`nbd/src/tls.rs`): the secondary presents `server-cert.pem`/`server-key.pem` and
//! requires a client certificate signed by its `ca-cert.pem`; the primary presents
//! `client-cert.pem`/`client-key.pem` and checks the secondary's certificate against its own
//! `ca-cert.pem` (qemu's file names for a client). Private keys must be mode 0600.
//! Plain TCP only when configured explicitly (`--insecure`, tests on loopback).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::ClientConfig;
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls::{ClientConnection, RootCertStore, ServerConnection, StreamOwned};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::error::{ReplError, ReplResult};

/// A byte stream to the peer (TLS or plain TCP).
pub trait Link: Read + Write + Send {}
impl<T: Read + Write + Send> Link for T {}

/// How long a read or write may stall before the connection is given up.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

fn cfg(p: &Path, e: impl std::fmt::Display) -> ReplError {
    ReplError::Config(format!("{}: {e}", p.display()))
}

fn certs(p: &Path) -> ReplResult<Vec<CertificateDer<'static>>> {
    let v = CertificateDer::pem_file_iter(p)
        .map_err(|e| cfg(p, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cfg(p, e))?;
    if v.is_empty() {
        return Err(cfg(p, "no certificate in it"));
    }
    Ok(v)
}

fn key(p: &Path) -> ReplResult<PrivateKeyDer<'static>> {
    let md = std::fs::metadata(p).map_err(|e| cfg(p, e))?;
    if md.mode() & 0o077 != 0 {
        return Err(cfg(
            p,
            format!(
                "mode {:o}: a private key must be readable by its owner only (chmod 600)",
                md.mode() & 0o777
            ),
        ));
    }
    PrivateKeyDer::from_pem_file(p).map_err(|e| cfg(p, format!("not a PEM private key ({e})")))
}

fn roots(p: &Path) -> ReplResult<Arc<RootCertStore>> {
    let mut r = RootCertStore::empty();
    for c in certs(p)? {
        r.add(c).map_err(|e| cfg(p, e))?;
    }
    Ok(Arc::new(r))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The secondary's TLS: its certificate, and client certificates required (signed by
/// `dir/ca-cert.pem`): only an authenticated primary can write.
pub fn server_config(dir: &Path) -> ReplResult<Arc<ServerConfig>> {
    let ca = dir.join("ca-cert.pem");
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(&ca)?, provider())
        .build()
        .map_err(|e| cfg(&ca, e))?;
    let cert = dir.join("server-cert.pem");
    let c = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ReplError::Config(format!("TLS: {e}")))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&cert)?, key(&dir.join("server-key.pem"))?)
        .map_err(|e| cfg(&cert, e))?;
    Ok(Arc::new(c))
}

/// The primary's TLS: checks the secondary against `dir/ca-cert.pem`, presents
/// `dir/client-cert.pem`.
pub fn client_config(dir: &Path) -> ReplResult<Arc<ClientConfig>> {
    let cert = dir.join("client-cert.pem");
    let c = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ReplError::Config(format!("TLS: {e}")))?
        .with_root_certificates(roots(&dir.join("ca-cert.pem"))?)
        .with_client_auth_cert(certs(&cert)?, key(&dir.join("client-key.pem"))?)
        .map_err(|e| cfg(&cert, e))?;
    Ok(Arc::new(c))
}

/// Timeouts (a stalled peer is given up) and no Nagle delay (COMMIT/ACK are small).
fn tune(s: &TcpStream) -> ReplResult<()> {
    s.set_read_timeout(Some(IO_TIMEOUT))
        .map_err(ReplError::Net)?;
    s.set_write_timeout(Some(IO_TIMEOUT))
        .map_err(ReplError::Net)?;
    s.set_nodelay(true).map_err(ReplError::Net)
}

/// Accepted connection -> link (TLS unless `tls` is `None`, i.e. `--insecure`).
pub fn accept(s: TcpStream, tls: Option<&Arc<ServerConfig>>) -> ReplResult<Box<dyn Link>> {
    tune(&s)?;
    Ok(match tls {
        None => Box::new(s),
        Some(c) => {
            let conn = ServerConnection::new(c.clone())
                .map_err(|e| ReplError::Protocol(format!("TLS: {e}")))?;
            Box::new(StreamOwned::new(conn, s))
        }
    })
}

/// Connects to the secondary at `addr` (`host:port`); `server_name` is what its certificate
/// must name (an IP address or a DNS name).
pub fn connect(
    addr: &str,
    server_name: &str,
    tls: Option<&Arc<ClientConfig>>,
) -> ReplResult<Box<dyn Link>> {
    connect_watched(addr, server_name, tls).map(|(l, _)| l)
}

/// [`connect`], with a [`Watch`] on the connection: the socket timeouts alone do not bound
/// a TLS write (rustls retries a blocked write after a blocked read, and again on the next
/// call), so the primary's watchdog cuts a link stuck in one system call for longer than
/// [`IO_TIMEOUT`].
pub fn connect_watched(
    addr: &str,
    server_name: &str,
    tls: Option<&Arc<ClientConfig>>,
) -> ReplResult<(Box<dyn Link>, Watch)> {
    let s = TcpStream::connect_timeout(&resolve(addr)?, IO_TIMEOUT).map_err(ReplError::Net)?;
    tune(&s)?;
    let watch = Watch {
        since: Arc::new(AtomicU64::new(0)),
        sock: s.try_clone().map_err(ReplError::Net)?,
    };
    let s = Watched {
        s,
        since: watch.since.clone(),
    };
    let link: Box<dyn Link> = match tls {
        None => Box::new(s),
        Some(c) => {
            let name = ServerName::try_from(server_name.to_string())
                .map_err(|e| ReplError::Config(format!("server name {server_name}: {e}")))?;
            let conn = ClientConnection::new(c.clone(), name)
                .map_err(|e| ReplError::Protocol(format!("TLS: {e}")))?;
            Box::new(StreamOwned::new(conn, s))
        }
    };
    Ok((link, watch))
}

fn resolve(addr: &str) -> ReplResult<std::net::SocketAddr> {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()
        .map_err(ReplError::Net)?
        .next()
        .ok_or_else(|| ReplError::Config(format!("{addr}: no address")))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(1)
        .max(1)
}

/// A TCP stream whose read and write calls stamp when they started (0: none running).
struct Watched {
    s: TcpStream,
    since: Arc<AtomicU64>,
}

impl Read for Watched {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.since.store(now_ms(), Ordering::SeqCst);
        let r = self.s.read(buf);
        self.since.store(0, Ordering::SeqCst);
        r
    }
}

impl Write for Watched {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.since.store(now_ms(), Ordering::SeqCst);
        let r = self.s.write(buf);
        self.since.store(0, Ordering::SeqCst);
        r
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.s.flush()
    }
}

/// What a watchdog sees of a connection made by [`connect_watched`].
pub struct Watch {
    since: Arc<AtomicU64>,
    sock: TcpStream,
}

impl Watch {
    /// How long the read or write running now has been blocked (zero when none runs).
    pub fn stuck_for(&self) -> Duration {
        match self.since.load(Ordering::SeqCst) {
            0 => Duration::ZERO,
            t => Duration::from_millis(now_ms().saturating_sub(t)),
        }
    }

    /// Shuts the connection down: the blocked call fails at once.
    pub fn cut(&self) {
        // Best effort: the connection may be gone already.
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }
}
