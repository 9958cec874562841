//! TLS for NBD connections (`nbds://`), with rustls: x509 files in qemu's and libnbd's layout
//! (`ca-cert.pem`; optionally `client-cert.pem` and `client-key.pem`). The handshake runs on
//! the blocking socket during negotiation (`NBD_OPT_STARTTLS`); afterwards one session per
//! connection is shared, under a lock, by the requesters that encrypt their requests and the
//! link's thread that decrypts replies.

use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rustls::{ClientConfig, ClientConnection, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::net::uri::{NbdAddr, NbdUri};

/// A connection's TLS session.
pub(crate) type Session = Mutex<ClientConnection>;

/// The client configuration `uri`'s `tls-certificates` directory gives.
pub(crate) fn client_config(uri: &NbdUri) -> Result<Arc<ClientConfig>, String> {
    let dir = uri
        .tls_certificates
        .as_deref()
        .ok_or("nbds:// needs tls-certificates=DIR")?;
    let ca = dir.join("ca-cert.pem");
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&ca).map_err(|e| format!("{}: {e}", ca.display()))? {
        let c = c.map_err(|e| format!("{}: {e}", ca.display()))?;
        roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: no certificate in it", ca.display()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots);
    let cert = dir.join("client-cert.pem");
    let key = dir.join("client-key.pem");
    let cfg = if cert.exists() && key.exists() {
        check_private(&key)?;
        let chain = CertificateDer::pem_file_iter(&cert)
            .map_err(|e| format!("{}: {e}", cert.display()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{}: {e}", cert.display()))?;
        let k = PrivateKeyDer::from_pem_file(&key)
            .map_err(|e| format!("{}: not a PEM private key ({e})", key.display()))?;
        builder
            .with_client_auth_cert(chain, k)
            .map_err(|e| format!("{}: {e}", cert.display()))?
    } else {
        builder.with_no_client_auth()
    };
    Ok(Arc::new(cfg))
}

/// A private key file must be readable by its owner only.
fn check_private(key: &Path) -> Result<(), String> {
    let md = std::fs::metadata(key).map_err(|e| format!("{}: {e}", key.display()))?;
    if md.mode() & 0o077 != 0 {
        return Err(format!(
            "{}: mode {:o}: a private key must be readable by its owner only (chmod 600)",
            key.display(),
            md.mode() & 0o777
        ));
    }
    Ok(())
}

/// The name the server's certificate must carry: `tls-hostname`, else the URI's host (an
/// address is checked against the certificate's IP entries), else `localhost` for a Unix
/// socket.
pub(crate) fn server_name(uri: &NbdUri) -> Result<ServerName<'static>, String> {
    let name = match (&uri.tls_hostname, &uri.addr) {
        (Some(h), _) => h.clone(),
        (None, NbdAddr::Tcp { host, .. }) => host.clone(),
        (None, NbdAddr::Unix(_)) => "localhost".into(),
    };
    ServerName::try_from(name.clone()).map_err(|e| format!("TLS server name '{name}': {e}"))
}

/// Encrypts `parts` as one run of records; the bytes to send, in order.
pub(crate) fn seal(s: &Session, parts: &[&[u8]]) -> io::Result<Vec<u8>> {
    let mut c = s.lock().unwrap_or_else(|e| e.into_inner());
    let total: usize = parts.iter().map(|p| p.len()).sum();
    for p in parts {
        c.writer().write_all(p)?;
    }
    let mut out = Vec::with_capacity(total + total / 64 + 64);
    while c.wants_write() {
        c.write_tls(&mut out)?;
    }
    Ok(out)
}

/// Takes some of the received ciphertext `cipher` into the session (as much as it accepts
/// now: the session holds little decrypted plaintext, so the caller drains it with
/// [`plaintext`] between calls); returns how many bytes it took.
pub(crate) fn open(s: &Session, cipher: &[u8]) -> io::Result<usize> {
    let mut c = s.lock().unwrap_or_else(|e| e.into_inner());
    let mut rd = cipher;
    let n = c.read_tls(&mut rd)?;
    c.process_new_packets()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}")))?;
    Ok(n)
}

/// Plaintext the session holds, into `buf`: `Ok(None)` when it needs more ciphertext,
/// `Ok(Some(0))` when the server closed the session.
pub(crate) fn plaintext(s: &Session, buf: &mut [u8]) -> io::Result<Option<usize>> {
    use std::io::Read;
    let mut c = s.lock().unwrap_or_else(|e| e.into_inner());
    match c.reader().read(buf) {
        Ok(n) => Ok(Some(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}
