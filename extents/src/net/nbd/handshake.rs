//! The client side of NBD's fixed-newstyle handshake, on a blocking socket with a deadline
//! (it runs on a link's own thread or at `dev create`, never on a queue thread).

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nbd::proto::*;

use crate::net::uri::{NbdAddr, NbdUri};

/// `NBD_OPT_GO`'s info item for block sizes (requested so the server tells us its limits).
const INFO_BLOCK_SIZE_REQ: u16 = INFO_BLOCK_SIZE;
/// The old-style handshake's second magic: such servers are not supported.
const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Option replies longer than this are garbage (the longest legitimate one is a 4 KiB name
/// or description plus a few bytes).
const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// Largest request the protocol's default lets a client send when the server gives no
/// maximum (32 MiB).
pub(crate) const DEFAULT_MAX_BLOCK: u32 = 32 << 20;

/// What the handshake learnt about the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`NBD_FLAG_*`).
    pub tflags: u16,
    /// Minimum block size (requests must be aligned to it).
    pub min_block: u32,
    /// Preferred block size.
    pub pref_block: u32,
    /// Largest request payload.
    pub max_block: u32,
    /// Structured replies were negotiated.
    pub structured: bool,
}

impl ExportInfo {
    pub(crate) fn has(&self, flag: u16) -> bool {
        self.tflags & flag != 0
    }
}

/// Why a connection could not be made; the text is what `dev create` and `dev status` show.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    /// The socket could not be opened or the server stopped answering.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: io::Error,
    },
    /// The server said something the protocol does not allow, or refused us.
    #[error("{0}")]
    Protocol(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ConnectError {
    let what = what.into();
    move |source| ConnectError::Io { what, source }
}

/// A connected, negotiated socket ready for transmission.
pub(crate) struct Connected {
    pub fd: OwnedFd,
    pub info: ExportInfo,
    /// The TLS session, for `nbds://`.
    pub tls: Option<rustls::ClientConnection>,
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Stream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(b),
            Stream::Unix(s) => s.read(b),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(b),
            Stream::Unix(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn remaining(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "connect-timeout passed",
        ));
    }
    Ok(left)
}

fn open_socket(addr: &NbdAddr, deadline: Instant) -> Result<Stream, ConnectError> {
    match addr {
        NbdAddr::Tcp { host, port } => {
            let addrs: Vec<_> = (host.as_str(), *port)
                .to_socket_addrs()
                .map_err(io_err(format!("resolve {host}")))?
                .collect();
            let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
            for a in addrs {
                let left = remaining(deadline).map_err(io_err(format!("connect to {a}")))?;
                match TcpStream::connect_timeout(&a, left) {
                    Ok(s) => {
                        s.set_nodelay(true).map_err(io_err("set TCP_NODELAY"))?;
                        return Ok(Stream::Tcp(s));
                    }
                    Err(e) => last = e,
                }
            }
            Err(ConnectError::Io {
                what: format!("connect to {addr}"),
                source: last,
            })
        }
        NbdAddr::Unix(p) => UnixStream::connect(p)
            .map(Stream::Unix)
            .map_err(io_err(format!("connect to {}", p.display()))),
    }
}

struct Wire<'a> {
    s: &'a mut Stream,
    deadline: Instant,
    /// After `NBD_OPT_STARTTLS`: everything goes through this session.
    tls: Option<rustls::ClientConnection>,
}

impl Wire<'_> {
    fn read(&mut self, buf: &mut [u8], what: &str) -> Result<(), ConnectError> {
        let left = remaining(self.deadline).map_err(io_err(what))?;
        self.s.set_timeout(Some(left)).map_err(io_err(what))?;
        match &mut self.tls {
            Some(c) => rustls::Stream::new(c, &mut *self.s).read_exact(buf),
            None => self.s.read_exact(buf),
        }
        .map_err(io_err(what))
    }

    fn write(&mut self, buf: &[u8], what: &str) -> Result<(), ConnectError> {
        let left = remaining(self.deadline).map_err(io_err(what))?;
        self.s.set_timeout(Some(left)).map_err(io_err(what))?;
        match &mut self.tls {
            Some(c) => rustls::Stream::new(c, &mut *self.s)
                .write_all(buf)
                .and_then(|()| rustls::Stream::new(c, &mut *self.s).flush()),
            None => self.s.write_all(buf),
        }
        .map_err(io_err(what))
    }

    /// `NBD_OPT_STARTTLS`, then the TLS handshake; from then on everything is encrypted.
    fn start_tls(&mut self, uri: &NbdUri) -> Result<(), ConnectError> {
        self.option(OPT_STARTTLS, &[])?;
        let (kind, data) = self.reply(OPT_STARTTLS)?;
        if kind != REP_ACK {
            return Err(ConnectError::Protocol(format!(
                "the server refused TLS: {}",
                rep_error_text(kind, &data)
            )));
        }
        let cfg = super::tls::client_config(uri).map_err(ConnectError::Protocol)?;
        let name = super::tls::server_name(uri).map_err(ConnectError::Protocol)?;
        let mut c = rustls::ClientConnection::new(cfg, name)
            .map_err(|e| ConnectError::Protocol(format!("TLS: {e}")))?;
        let what = "TLS handshake";
        let left = remaining(self.deadline).map_err(io_err(what))?;
        self.s.set_timeout(Some(left)).map_err(io_err(what))?;
        while c.is_handshaking() {
            c.complete_io(&mut *self.s).map_err(|e| {
                ConnectError::Protocol(format!("TLS handshake with the server failed: {e}"))
            })?;
        }
        self.tls = Some(c);
        Ok(())
    }

    fn u16(&mut self, what: &str) -> Result<u16, ConnectError> {
        let mut b = [0u8; 2];
        self.read(&mut b, what)?;
        Ok(u16::from_be_bytes(b))
    }

    fn u64(&mut self, what: &str) -> Result<u64, ConnectError> {
        let mut b = [0u8; 8];
        self.read(&mut b, what)?;
        Ok(u64::from_be_bytes(b))
    }

    fn option(&mut self, opt: u32, data: &[u8]) -> Result<(), ConnectError> {
        let mut m = Vec::with_capacity(16 + data.len());
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.write(&m, &format!("send option {}", opt_name(opt)))
    }

    /// One option reply: (type, data). Checks the magic and that it answers `opt`.
    fn reply(&mut self, opt: u32) -> Result<(u32, Vec<u8>), ConnectError> {
        let what = format!("read the reply to {}", opt_name(opt));
        let mut h = [0u8; 20];
        self.read(&mut h, &what)?;
        let magic = be64(&h[0..8]);
        let echoed = be32(&h[8..12]);
        let kind = be32(&h[12..16]);
        let len = be32(&h[16..20]);
        if magic != OPT_REPLY_MAGIC {
            return Err(ConnectError::Protocol(format!(
                "{what}: bad option reply magic {magic:#x}"
            )));
        }
        if echoed != opt {
            return Err(ConnectError::Protocol(format!(
                "{what}: the reply is for option {echoed}"
            )));
        }
        if len > MAX_OPTION_REPLY {
            return Err(ConnectError::Protocol(format!(
                "{what}: reply of {len} bytes (garbage?)"
            )));
        }
        let mut data = vec![0u8; len as usize];
        self.read(&mut data, &what)?;
        Ok((kind, data))
    }
}

fn opt_name(opt: u32) -> &'static str {
    match opt {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_ABORT => "NBD_OPT_ABORT",
        OPT_STARTTLS => "NBD_OPT_STARTTLS",
        _ => "an option",
    }
}

fn rep_error_text(kind: u32, data: &[u8]) -> String {
    let name = match kind {
        REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        REP_ERR_POLICY => "NBD_REP_ERR_POLICY (refused by the server's policy)",
        REP_ERR_INVALID => "NBD_REP_ERR_INVALID",
        REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN (no such export)",
        REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD (the server requires TLS: use nbds://)",
        REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN (the server is shutting down)",
        REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG",
        k if k & REP_ERR != 0 => "an error",
        _ => "an unexpected reply",
    };
    let msg: String = String::from_utf8_lossy(data)
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect();
    if msg.is_empty() {
        format!("{name} ({kind:#x})")
    } else {
        format!("{name} ({kind:#x}): {msg}")
    }
}

/// Checks the block sizes a server gave (the spec's rules), so nothing downstream divides by
/// zero or trusts a maximum below the minimum.
fn check_block_sizes(min: u32, pref: u32, max: u32) -> Result<(), String> {
    let bad = |why: &str| {
        Err(format!(
            "the server's block sizes (minimum {min}, preferred {pref}, maximum {max}) {why}"
        ))
    };
    if !min.is_power_of_two() || min > 65536 {
        return bad("have a minimum that is not a power of two up to 64 KiB");
    }
    if !pref.is_power_of_two() || pref < min {
        return bad("have a preferred size that is not a power of two at least the minimum");
    }
    if max != u32::MAX && (max < min || !max.is_multiple_of(min)) {
        return bad("have a maximum that is not a multiple of the minimum");
    }
    Ok(())
}

/// Connects to `uri`'s server and negotiates its export, within `uri`'s connect-timeout.
pub(crate) fn connect(uri: &NbdUri) -> Result<Connected, ConnectError> {
    let deadline = Instant::now() + uri.opts.connect_timeout;
    let mut s = open_socket(&uri.addr, deadline)?;
    let mut w = Wire {
        s: &mut s,
        deadline,
        tls: None,
    };
    let info = negotiate(&mut w, uri)?;
    let mut tls = w.tls.take();
    if let Some(c) = &mut tls {
        // Whole requests are encrypted at once: no cap on what one write may queue.
        c.set_buffer_limit(None);
    }
    s.set_timeout(None)
        .map_err(io_err("clear the socket timeouts"))?;
    let fd = match s {
        Stream::Tcp(t) => {
            keepalive(&t);
            OwnedFd::from(t)
        }
        Stream::Unix(u) => OwnedFd::from(u),
    };
    Ok(Connected { fd, info, tls })
}

/// TCP keepalive so an idle connection across a dead link is noticed within minutes even
/// with no request in flight (requests in flight have their own timeout).
fn keepalive(t: &TcpStream) {
    use std::os::fd::AsRawFd;
    let fd = t.as_raw_fd();
    for (level, opt, val) in [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 30),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 10),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3),
    ] {
        let v: libc::c_int = val;
        // SAFETY: setsockopt reads one int from a valid pointer; failure only loses the
        // keepalive, which is a convenience.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                opt,
                &v as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

fn negotiate(w: &mut Wire<'_>, uri: &NbdUri) -> Result<ExportInfo, ConnectError> {
    let export = uri.export.as_str();
    let magic = w.u64("read the server's greeting")?;
    if magic != NBDMAGIC {
        return Err(ConnectError::Protocol(format!(
            "not an NBD server (greeting {magic:#018x})"
        )));
    }
    let style = w.u64("read the server's greeting")?;
    if style == CLISERV_MAGIC {
        return Err(ConnectError::Protocol(
            "the server speaks the old-style handshake, which is not supported".into(),
        ));
    }
    if style != IHAVEOPT {
        return Err(ConnectError::Protocol(format!(
            "bad handshake magic {style:#018x}"
        )));
    }
    let sflags = w.u16("read the handshake flags")?;
    if sflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ConnectError::Protocol(
            "the server does not speak fixed newstyle".into(),
        ));
    }
    let no_zeroes = sflags & FLAG_NO_ZEROES != 0;
    let cflags = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
    w.write(&cflags.to_be_bytes(), "send the client flags")?;
    if uri.tls {
        w.start_tls(uri)?;
    }

    w.option(OPT_STRUCTURED_REPLY, &[])?;
    let (kind, data) = w.reply(OPT_STRUCTURED_REPLY)?;
    let structured = match kind {
        REP_ACK => true,
        k if k & REP_ERR != 0 => false,
        k => {
            return Err(ConnectError::Protocol(format!(
                "NBD_OPT_STRUCTURED_REPLY answered with {}",
                rep_error_text(k, &data)
            )))
        }
    };

    let name = export.as_bytes();
    if name.len() > MAX_STRING {
        return Err(ConnectError::Protocol(format!(
            "export name of {} bytes is longer than NBD allows",
            name.len()
        )));
    }
    let mut go = Vec::with_capacity(8 + name.len());
    go.extend_from_slice(&(name.len() as u32).to_be_bytes());
    go.extend_from_slice(name);
    go.extend_from_slice(&1u16.to_be_bytes());
    go.extend_from_slice(&INFO_BLOCK_SIZE_REQ.to_be_bytes());
    w.option(OPT_GO, &go)?;

    let mut export_info: Option<(u64, u16)> = None;
    let mut sizes: Option<(u32, u32, u32)> = None;
    for _ in 0..64 {
        let (kind, data) = w.reply(OPT_GO)?;
        match kind {
            REP_INFO => {
                if data.len() < 2 {
                    return Err(ConnectError::Protocol("short NBD_REP_INFO".into()));
                }
                match be16(&data) {
                    INFO_EXPORT if data.len() == 12 => {
                        export_info = Some((be64(&data[2..10]), be16(&data[10..12])));
                    }
                    INFO_BLOCK_SIZE if data.len() == 14 => {
                        sizes = Some((be32(&data[2..6]), be32(&data[6..10]), be32(&data[10..14])));
                    }
                    INFO_EXPORT | INFO_BLOCK_SIZE => {
                        return Err(ConnectError::Protocol(format!(
                            "NBD_REP_INFO item {} of {} bytes",
                            be16(&data),
                            data.len()
                        )))
                    }
                    _ => {} // names and descriptions: not needed
                }
            }
            REP_ACK => {
                let (size, tflags) = export_info.ok_or_else(|| {
                    ConnectError::Protocol("NBD_OPT_GO succeeded without NBD_INFO_EXPORT".into())
                })?;
                return finish(size, tflags, sizes, structured);
            }
            REP_ERR_UNSUP => {
                // A server without NBD_OPT_GO: the old way, which cannot report errors.
                return export_name(w, export, no_zeroes, structured);
            }
            k => {
                return Err(ConnectError::Protocol(format!(
                    "export '{export}' refused: {}",
                    rep_error_text(k, &data)
                )))
            }
        }
    }
    Err(ConnectError::Protocol(
        "NBD_OPT_GO: more than 64 info replies".into(),
    ))
}

fn export_name(
    w: &mut Wire<'_>,
    export: &str,
    no_zeroes: bool,
    structured: bool,
) -> Result<ExportInfo, ConnectError> {
    w.option(OPT_EXPORT_NAME, export.as_bytes())?;
    let size = w.u64("read the export's size")?;
    let tflags = w.u16("read the transmission flags")?;
    if !no_zeroes {
        let mut z = [0u8; 124];
        w.read(&mut z, "read the handshake padding")?;
    }
    finish(size, tflags, None, structured)
}

fn finish(
    size: u64,
    tflags: u16,
    sizes: Option<(u32, u32, u32)>,
    structured: bool,
) -> Result<ExportInfo, ConnectError> {
    if tflags & TFLAG_HAS_FLAGS == 0 {
        return Err(ConnectError::Protocol(format!(
            "transmission flags {tflags:#x} lack NBD_FLAG_HAS_FLAGS"
        )));
    }
    if size > i64::MAX as u64 {
        return Err(ConnectError::Protocol(format!(
            "export size {size} is beyond what a block device can be"
        )));
    }
    let (min, pref, max) = sizes.unwrap_or((1, 4096, DEFAULT_MAX_BLOCK));
    check_block_sizes(min, pref, max).map_err(ConnectError::Protocol)?;
    Ok(ExportInfo {
        size,
        tflags,
        min_block: min,
        pref_block: pref,
        max_block: max.min(DEFAULT_MAX_BLOCK).max(min),
        structured,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_size_rules() {
        assert!(check_block_sizes(1, 4096, 32 << 20).is_ok());
        assert!(check_block_sizes(512, 4096, u32::MAX).is_ok());
        assert!(check_block_sizes(4096, 4096, 4096).is_ok());
        assert!(check_block_sizes(0, 4096, 4096).is_err());
        assert!(check_block_sizes(3, 4096, 4096).is_err());
        assert!(check_block_sizes(4096, 512, 1 << 20).is_err());
        assert!(check_block_sizes(512, 4096, 1000).is_err());
        assert!(check_block_sizes(1 << 20, 1 << 20, 1 << 20).is_err());
    }
}
