//! A minimal blocking NBD client for tests, plus test devices.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nbd::proto::*;
use tables::io::{BlockDevice, IoError, IoFuture, Limits, WriteFlags};
use tables::mem::MemDevice;
use tables::units::Bytes;
use tables::DeviceRef;

/// Anything a client can talk over.
pub trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

pub fn tcp(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

pub use nbd::proto::{be16, be32, be64};

/// Reads the server greeting; returns the handshake flags.
pub fn greeting(s: &mut impl Read) -> u16 {
    let mut b = [0u8; 18];
    s.read_exact(&mut b).unwrap();
    assert_eq!(be64(&b[0..8]), NBDMAGIC);
    assert_eq!(be64(&b[8..16]), IHAVEOPT);
    be16(&b[16..18])
}

pub fn send_client_flags(s: &mut impl Write, flags: u32) {
    s.write_all(&flags.to_be_bytes()).unwrap();
}

/// Greeting plus fixed-newstyle, no-zeroes client flags.
pub fn start(s: &mut (impl Read + Write)) {
    let f = greeting(s);
    assert_eq!(f, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    send_client_flags(s, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
}

pub fn send_option(s: &mut impl Write, opt: u32, data: &[u8]) {
    let mut b = Vec::new();
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).unwrap();
}

/// (option, reply type, data)
pub fn read_option_reply(s: &mut impl Read) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    assert_eq!(be64(&h[0..8]), OPT_REPLY_MAGIC);
    let len = be32(&h[16..20]) as usize;
    let mut d = vec![0u8; len];
    s.read_exact(&mut d).unwrap();
    (be32(&h[8..12]), be32(&h[12..16]), d)
}

pub fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

#[derive(Debug, Default)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    pub name: Option<String>,
    pub description: Option<String>,
    pub block_sizes: Option<(u32, u32, u32)>,
}

/// Sends NBD_OPT_INFO or NBD_OPT_GO; Ok(info) on ACK, Err((reply type, message)) on error.
pub fn info_or_go(
    s: &mut (impl Read + Write),
    opt: u32,
    name: &str,
    infos: &[u16],
) -> Result<ExportInfo, (u32, String)> {
    send_option(s, opt, &info_data(name, infos));
    let mut info = ExportInfo::default();
    loop {
        let (o, kind, d) = read_option_reply(s);
        assert_eq!(o, opt);
        match kind {
            REP_ACK => return Ok(info),
            REP_INFO => match be16(&d) {
                INFO_EXPORT => {
                    assert_eq!(d.len(), 12);
                    info.size = be64(&d[2..]);
                    info.flags = be16(&d[10..]);
                }
                INFO_NAME => info.name = Some(String::from_utf8(d[2..].to_vec()).unwrap()),
                INFO_DESCRIPTION => {
                    info.description = Some(String::from_utf8(d[2..].to_vec()).unwrap())
                }
                INFO_BLOCK_SIZE => {
                    assert_eq!(d.len(), 14);
                    info.block_sizes = Some((be32(&d[2..]), be32(&d[6..]), be32(&d[10..])))
                }
                other => panic!("unexpected info type {other}"),
            },
            k if k & REP_ERR != 0 => return Err((k, String::from_utf8_lossy(&d).into_owned())),
            k => panic!("unexpected reply type {k:#x}"),
        }
    }
}

/// A connected client in the transmission phase.
pub struct Client<S: Stream> {
    pub s: S,
    pub info: ExportInfo,
    next: u64,
    /// Read lengths of outstanding read requests, by cookie.
    reads: HashMap<u64, usize>,
    /// Offsets of outstanding reads, to check structured data chunks.
    read_at: HashMap<u64, u64>,
}

/// Error value of a failed request.
pub type NbdErr = u32;

impl<S: Stream> Client<S> {
    /// Handshake with NBD_OPT_GO on `name`.
    pub fn go(mut s: S, name: &str) -> Client<S> {
        start(&mut s);
        let info = info_or_go(&mut s, OPT_GO, name, &[INFO_BLOCK_SIZE]).unwrap();
        Client {
            s,
            info,
            next: 1,
            reads: HashMap::new(),
            read_at: HashMap::new(),
        }
    }

    /// Wraps a stream whose handshake is already done.
    pub fn after_handshake(s: S) -> Client<S> {
        Client {
            s,
            info: ExportInfo::default(),
            next: 1,
            reads: HashMap::new(),
            read_at: HashMap::new(),
        }
    }

    /// Sends a request without waiting; returns its cookie.
    pub fn send(&mut self, kind: u16, flags: u16, offset: u64, len: u32, payload: &[u8]) -> u64 {
        let cookie = self.next;
        self.next += 1;
        let h = Request {
            flags,
            kind,
            cookie,
            offset,
            len,
        }
        .encode();
        let mut b = Vec::with_capacity(h.len() + payload.len());
        b.extend_from_slice(&h);
        b.extend_from_slice(payload);
        self.s.write_all(&b).unwrap();
        if kind == CMD_READ {
            self.reads.insert(cookie, len as usize);
            self.read_at.insert(cookie, offset);
        }
        cookie
    }

    /// Handshake negotiating structured replies first, then NBD_OPT_GO on `name`.
    pub fn go_structured(mut s: S, name: &str) -> Client<S> {
        start(&mut s);
        send_option(&mut s, OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(
            read_option_reply(&mut s),
            (OPT_STRUCTURED_REPLY, REP_ACK, vec![])
        );
        let info = info_or_go(&mut s, OPT_GO, name, &[INFO_BLOCK_SIZE]).unwrap();
        let mut c = Client::after_handshake(s);
        c.info = info;
        c
    }

    /// Reads one reply (simple, or a single final structured chunk): (cookie, result with
    /// the read data if any).
    pub fn recv(&mut self) -> (u64, Result<Vec<u8>, NbdErr>) {
        let mut m = [0u8; 4];
        self.s.read_exact(&mut m).unwrap();
        if be32(&m) == STRUCTURED_REPLY_MAGIC {
            return self.recv_chunk();
        }
        assert_eq!(be32(&m), SIMPLE_REPLY_MAGIC, "reply magic");
        let mut h = [0u8; 12];
        self.s.read_exact(&mut h).unwrap();
        let err = be32(&h[0..4]);
        let cookie = be64(&h[4..12]);
        let len = self.reads.remove(&cookie);
        self.read_at.remove(&cookie);
        if err != 0 {
            return (cookie, Err(err));
        }
        let mut data = vec![0u8; len.unwrap_or(0)];
        self.s.read_exact(&mut data).unwrap();
        (cookie, Ok(data))
    }

    fn recv_chunk(&mut self) -> (u64, Result<Vec<u8>, NbdErr>) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        let flags = be16(&h[0..2]);
        let kind = be16(&h[2..4]);
        let cookie = be64(&h[4..12]);
        let plen = be32(&h[12..16]) as usize;
        assert_eq!(flags, REPLY_FLAG_DONE, "one final chunk per reply");
        let mut p = vec![0u8; plen];
        self.s.read_exact(&mut p).unwrap();
        let want_len = self
            .reads
            .remove(&cookie)
            .expect("structured reply to a read");
        let want_off = self.read_at.remove(&cookie).unwrap();
        match kind {
            REPLY_TYPE_OFFSET_DATA => {
                assert_eq!(be64(&p[0..8]), want_off, "chunk offset");
                assert_eq!(plen - 8, want_len, "one chunk covers the read");
                (cookie, Ok(p[8..].to_vec()))
            }
            REPLY_TYPE_NONE => {
                assert_eq!(want_len, 0);
                (cookie, Ok(Vec::new()))
            }
            REPLY_TYPE_ERROR => {
                assert_eq!(plen, 6 + be16(&p[4..6]) as usize);
                (cookie, Err(be32(&p[0..4])))
            }
            other => panic!("unexpected chunk type {other}"),
        }
    }

    fn call(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Result<Vec<u8>, NbdErr> {
        let c = self.send(kind, flags, offset, len, payload);
        let (rc, r) = self.recv();
        assert_eq!(rc, c, "cookie");
        r
    }

    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, NbdErr> {
        self.call(CMD_READ, 0, offset, len, &[])
    }
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), NbdErr> {
        self.call(CMD_WRITE, 0, offset, data.len() as u32, data)
            .map(|_| ())
    }
    pub fn write_fua(&mut self, offset: u64, data: &[u8]) -> Result<(), NbdErr> {
        self.call(CMD_WRITE, CMD_FLAG_FUA, offset, data.len() as u32, data)
            .map(|_| ())
    }
    pub fn flush(&mut self) -> Result<(), NbdErr> {
        self.call(CMD_FLUSH, 0, 0, 0, &[]).map(|_| ())
    }
    pub fn trim(&mut self, offset: u64, len: u32) -> Result<(), NbdErr> {
        self.call(CMD_TRIM, 0, offset, len, &[]).map(|_| ())
    }
    pub fn zero(&mut self, offset: u64, len: u32, flags: u16) -> Result<(), NbdErr> {
        self.call(CMD_WRITE_ZEROES, flags, offset, len, &[])
            .map(|_| ())
    }
    /// NBD_CMD_DISC, then expects the server to close.
    pub fn disconnect(mut self) {
        self.send(CMD_DISC, 0, 0, 0, &[]);
        let mut b = [0u8; 1];
        assert_eq!(self.s.read(&mut b).unwrap(), 0, "server closes after DISC");
    }
}

/// Deterministic test pattern for (seed, length).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Asserts that the peer has closed (EOF or reset) within the read timeout.
pub fn assert_closed(s: &mut impl Read) {
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("expected the server to close, got {e}"),
        }
    }
}

/// A MemDevice that fails by region: each MiB `i` of the first `errnos.len()` MiB fails
/// reads and writes with `errnos[i]` (0 = works). Flush fails with EIO while `fail_flush`.
pub struct FailDevice {
    pub inner: MemDevice,
    pub errnos: Vec<i32>,
    pub fail_flush: AtomicBool,
}

impl FailDevice {
    pub fn new(size: u64, errnos: Vec<i32>) -> Arc<FailDevice> {
        Arc::new(FailDevice {
            inner: MemDevice::new("fail", Bytes(size)),
            errnos,
            fail_flush: AtomicBool::new(false),
        })
    }
    fn err(&self, off: Bytes) -> Option<IoError> {
        match self.errnos.get((off.0 >> 20) as usize) {
            Some(&e) if e != 0 => Some(IoError::new(
                e,
                format!("fail: injected errno {e} at {}", off.0),
            )),
            _ => None,
        }
    }
}

impl BlockDevice for FailDevice {
    fn name(&self) -> String {
        "fail".into()
    }
    fn size(&self) -> Bytes {
        self.inner.size()
    }
    fn limits(&self) -> Limits {
        self.inner.limits()
    }
    unsafe fn read<'a>(&'a self, offset: Bytes, buf: &'a mut [u8]) -> IoFuture<'a> {
        match self.err(offset) {
            Some(e) => tables::io::ready(Err(e)),
            None => self.inner.read(offset, buf),
        }
    }
    unsafe fn write<'a>(&'a self, offset: Bytes, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a> {
        match self.err(offset) {
            Some(e) => tables::io::ready(Err(e)),
            None => self.inner.write(offset, buf, flags),
        }
    }
    fn flush(&self) -> IoFuture<'_> {
        if self.fail_flush.load(Ordering::SeqCst) {
            return tables::io::ready(Err(IoError::eio("fail: flush injected")));
        }
        self.inner.flush()
    }
    fn discard(&self, offset: Bytes, len: Bytes) -> IoFuture<'_> {
        match self.err(offset) {
            Some(e) => tables::io::ready(Err(e)),
            None => self.inner.discard(offset, len),
        }
    }
    fn write_zeroes(&self, offset: Bytes, len: Bytes, flags: WriteFlags) -> IoFuture<'_> {
        match self.err(offset) {
            Some(e) => tables::io::ready(Err(e)),
            None => self.inner.write_zeroes(offset, len, flags),
        }
    }
}

/// A TCP server on a free port with two workers, `limits` and a short shutdown grace.
pub fn serve_with(dev: DeviceRef, limits: nbd::Limits) -> nbd::ServerHandle {
    nbd::Server::builder()
        .export("disk", "", dev)
        .threads(2)
        .limits(limits)
        .shutdown_grace(Duration::from_millis(200))
        .build()
        .unwrap()
        .serve_tcp("127.0.0.1:0")
        .unwrap()
}

pub fn mem(size: u64) -> Arc<MemDevice> {
    Arc::new(MemDevice::new("mem", Bytes(size)))
}

pub fn as_dev<T: BlockDevice + 'static>(d: &Arc<T>) -> DeviceRef {
    d.clone()
}
