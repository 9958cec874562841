//! Resource limits and robustness: handshake and idle timeouts, stalled transfers,
//! `max_connections`, a panicking target, a worker stuck in its device, and shutdown with
//! clients that do not cooperate.

mod common;

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nbd::proto::*;
use nbd::{Limits, ServerHandle};
use tables::io::{BlockDevice, IoFuture, Limits as DevLimits, WriteFlags};
use tables::mem::MemDevice;
use tables::units::Bytes;

const MIB: u64 = 1 << 20;

fn addr(h: &ServerHandle) -> std::net::SocketAddr {
    h.local_addr().unwrap()
}

/// Waits until the peer closes; returns how long that took.
fn time_to_close(s: &mut std::net::TcpStream, t0: Instant) -> Duration {
    assert_closed(s);
    t0.elapsed()
}

/// Shuts the server down on another thread and asserts it returns within `bound`.
fn shutdown_within(h: ServerHandle, bound: Duration) {
    let t0 = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(h.shutdown());
    });
    match rx.recv_timeout(bound) {
        Ok(r) => r.unwrap(),
        Err(_) => panic!("shutdown did not return within {bound:?}"),
    }
    eprintln!("shutdown took {:?}", t0.elapsed());
}

#[test]
fn handshake_timeout_closes_a_silent_client() {
    let h = serve_with(
        as_dev(&mem(MIB)),
        Limits {
            handshake_timeout_ms: 300,
            ..Limits::default()
        },
    );
    // Connects and never reads or writes a byte.
    let t0 = Instant::now();
    let mut silent = tcp(addr(&h));
    std::thread::sleep(Duration::from_millis(100));
    let mut b = [0u8; 18];
    silent.read_exact(&mut b).unwrap(); // the greeting was waiting in the buffer
    let took = time_to_close(&mut silent, t0);
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // Within a moment the server has forgotten it.
    let t1 = Instant::now();
    while h.connections() > 0 && t1.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(h.connections(), 0);
}

#[test]
fn idle_timeout_closes_an_idle_connection_only() {
    let h = serve_with(
        as_dev(&mem(MIB)),
        Limits {
            idle_timeout_ms: 400,
            ..Limits::default()
        },
    );
    let mut idle = Client::go(tcp(addr(&h)), "disk");
    idle.write(0, b"idle").unwrap();
    let t0 = Instant::now();
    // A busy client on another connection, with gaps shorter than the timeout, stays.
    let mut busy = Client::go(tcp(addr(&h)), "disk");
    while t0.elapsed() < Duration::from_millis(1200) {
        busy.write(4096, b"busy").unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = time_to_close(&mut idle.s, t0);
    assert!(
        took >= Duration::from_millis(350) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert!(busy.read(4096, 4).unwrap() == b"busy");
    busy.disconnect();
    shutdown_within(h, Duration::from_secs(3));
}

#[test]
fn stalled_transfers_are_dropped_after_the_stall_timeout() {
    let h = serve_with(
        as_dev(&mem(64 * MIB)),
        Limits {
            stall_timeout_ms: 500,
            ..Limits::default()
        },
    );
    // Never reads the replies to 32 MiB of reads: the send stalls once the socket buffers
    // are full.
    let mut reader = Client::go(tcp(addr(&h)), "disk");
    reader.send(CMD_READ, 0, 0, 32 << 20, &[]);
    // Announces a 1 MiB write and sends only part of its payload.
    let mut writer = Client::go(tcp(addr(&h)), "disk");
    let hdr = Request {
        flags: 0,
        kind: CMD_WRITE,
        cookie: 1,
        offset: 0,
        len: 1 << 20,
    }
    .encode();
    writer.s.write_all(&hdr).unwrap();
    writer.s.write_all(&[7u8; 1000]).unwrap();
    let t0 = Instant::now();
    let t = time_to_close(&mut writer.s, t0);
    assert!(
        t >= Duration::from_millis(400) && t < Duration::from_secs(4),
        "{t:?}"
    );
    while h.connections() > 0 && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        h.connections(),
        0,
        "the reader that does not read is dropped too"
    );
    assert!(t0.elapsed() >= Duration::from_millis(400));
    // Data already in the socket buffers is still there, then the close.
    reader
        .s
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut got = 0usize;
    let mut b = vec![0u8; 1 << 20];
    loop {
        match reader.s.read(&mut b) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(
        got < (32 << 20) + 16,
        "the reply was cut short ({got} bytes)"
    );
    shutdown_within(h, Duration::from_secs(3));
}

#[test]
fn max_connections_refuses_the_next_one_until_one_closes() {
    let h = serve_with(
        as_dev(&mem(MIB)),
        Limits {
            max_connections: 3,
            ..Limits::default()
        },
    );
    let mut a = Client::go(tcp(addr(&h)), "disk");
    let b = Client::go(tcp(addr(&h)), "disk");
    let c = Client::go(tcp(addr(&h)), "disk");
    // The fourth is closed before the handshake: no greeting at all.
    let mut d = tcp(addr(&h));
    let mut buf = [0u8; 18];
    let n = match d.read(&mut buf) {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => 0,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(n, 0, "refused before the greeting");
    a.write(0, b"a").unwrap();
    b.disconnect();
    let t0 = Instant::now();
    while h.connections() > 2 && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut e = Client::go(tcp(addr(&h)), "disk");
    assert!(e.read(0, 1).unwrap() == b"a");
    // Full again.
    let mut f = tcp(addr(&h));
    assert_closed(&mut f);
    a.disconnect();
    c.disconnect();
    e.disconnect();
    shutdown_within(h, Duration::from_secs(3));
}

/// A device with traps: reads of MiB 1 panic when called (or, with `block_for`, block
/// the calling thread that long), writes of MiB 2 panic inside their future, reads from
/// MiB 64 on take 30 s (without blocking the thread), flushes panic while `flush_panics`.
struct TrapDevice {
    inner: MemDevice,
    block_for: Option<Duration>,
    flush_panics: std::sync::atomic::AtomicBool,
}

impl TrapDevice {
    fn new(block_for: Option<Duration>) -> Arc<TrapDevice> {
        Arc::new(TrapDevice {
            inner: MemDevice::new("trap", Bytes(128 * MIB)),
            block_for,
            flush_panics: Default::default(),
        })
    }
}

fn in_mib(off: Bytes, mib: u64) -> bool {
    off.0 >> 20 == mib
}

impl BlockDevice for TrapDevice {
    fn name(&self) -> String {
        "trap".into()
    }
    fn size(&self) -> Bytes {
        self.inner.size()
    }
    fn limits(&self) -> DevLimits {
        self.inner.limits()
    }
    unsafe fn read<'a>(&'a self, offset: Bytes, buf: &'a mut [u8]) -> IoFuture<'a> {
        if in_mib(offset, 1) {
            match self.block_for {
                Some(d) => std::thread::sleep(d),
                None => panic!("injected read panic at {}", offset.0),
            }
        }
        if offset.0 >= 64 * MIB {
            return Box::pin(async move {
                iort::sleep(Duration::from_secs(30)).await;
                self.inner.read(offset, buf).await
            });
        }
        self.inner.read(offset, buf)
    }
    unsafe fn write<'a>(&'a self, offset: Bytes, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a> {
        Box::pin(async move {
            if in_mib(offset, 2) {
                panic!("injected write panic at {}", offset.0);
            }
            self.inner.write(offset, buf, flags).await
        })
    }
    fn flush(&self) -> IoFuture<'_> {
        if self.flush_panics.load(std::sync::atomic::Ordering::SeqCst) {
            panic!("injected flush panic");
        }
        self.inner.flush()
    }
    fn discard(&self, offset: Bytes, len: Bytes) -> IoFuture<'_> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: Bytes, len: Bytes, flags: WriteFlags) -> IoFuture<'_> {
        self.inner.write_zeroes(offset, len, flags)
    }
}

#[test]
fn a_panicking_target_fails_the_request_and_the_server_keeps_serving() {
    let dev = TrapDevice::new(None);
    let h = serve_with(as_dev(&dev), Limits::default());
    let mut c = Client::go(tcp(addr(&h)), "disk");
    c.write(0, b"before").unwrap();
    // Small (served on the connection's worker) and big (offloaded) reads and writes.
    for len in [4096u32, 1 << 20] {
        assert_eq!(c.read(MIB, len), Err(EIO), "read of {len}");
        assert_eq!(c.write(2 * MIB, &vec![1u8; len as usize]), Err(EIO));
        assert!(c.read(0, 6).unwrap() == b"before");
    }
    // Pipelined: the panicking request fails, its neighbours succeed.
    let a = c.send(CMD_READ, 0, 0, 6, &[]);
    let p = c.send(CMD_READ, 0, MIB + 512, 512, &[]);
    let b = c.send(CMD_WRITE, 0, 4096, 5, b"after");
    let mut got = std::collections::HashMap::new();
    for _ in 0..3 {
        let (cookie, r) = c.recv();
        got.insert(cookie, r);
    }
    assert_eq!(got[&a], Ok(b"before".to_vec()));
    assert_eq!(got[&p], Err(EIO));
    assert_eq!(got[&b], Ok(vec![]));
    dev.flush_panics
        .store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(c.flush(), Err(EIO));
    dev.flush_panics
        .store(false, std::sync::atomic::Ordering::SeqCst);
    // Another connection is served as well, by both workers.
    for _ in 0..4 {
        let mut d = Client::go(tcp(addr(&h)), "disk");
        assert!(d.read(4096, 5).unwrap() == b"after");
        assert_eq!(d.read(MIB, 4096), Err(EIO));
        d.disconnect();
    }
    c.disconnect();
    shutdown_within(h, Duration::from_secs(3));
}

#[test]
fn a_stuck_worker_does_not_stop_new_connections() {
    let dev = TrapDevice::new(Some(Duration::from_secs(3)));
    let h = serve_with(as_dev(&dev), Limits::default());
    // Connections go to the least loaded worker, the first on a tie: a, c, e to worker 0
    // and b, d to worker 1. With c and e gone, worker 0 is the less loaded one.
    let mut conns: Vec<_> = (0..5).map(|_| Client::go(tcp(addr(&h)), "disk")).collect();
    let e = conns.pop().unwrap();
    let d = conns.pop().unwrap();
    let c = conns.pop().unwrap();
    let b = conns.pop().unwrap();
    let mut a = conns.pop().unwrap();
    c.disconnect();
    e.disconnect();
    let t = Instant::now();
    while h.connections() > 3 && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
    // a's small read blocks worker 0's thread for 3 s.
    let cookie = a.send(CMD_READ, 0, MIB, 4096, &[]);
    // Once worker 0 has missed its heartbeats for a second, new clients go elsewhere.
    std::thread::sleep(Duration::from_millis(1300));
    let t0 = Instant::now();
    for i in 0..3u8 {
        let mut n = Client::go(tcp(addr(&h)), "disk");
        n.write(4096 * u64::from(i), &[i; 4096]).unwrap();
        assert!(n.read(4096 * u64::from(i), 4096).unwrap() == vec![i; 4096]);
        n.disconnect();
    }
    let took = t0.elapsed();
    assert!(
        took < Duration::from_millis(1000),
        "new clients waited {took:?}"
    );
    // The stuck request completes in the end.
    let (got, r) = a.recv();
    assert_eq!(got, cookie);
    assert!(r.is_ok());
    for x in [a, b, d] {
        x.disconnect();
    }
    shutdown_within(h, Duration::from_secs(3));
}

#[test]
fn clients_on_probation_cannot_starve_an_established_one() {
    // No eviction under pressure and a long stall timeout: only the probation share keeps
    // memory free for the established client.
    let h = serve_with(
        as_dev(&mem(1 << 30)),
        Limits {
            memory_budget_bytes: 64 * MIB,
            pressure_stall_timeout_ms: 0,
            ..Limits::default()
        },
    );
    let mut good = Client::go(tcp(addr(&h)), "disk");
    good.write(0, &[5u8; 4096]).unwrap();
    // They never read: their 32 MiB replies hold their buffers.
    let mut hostile = Vec::new();
    for i in 0..8u64 {
        let mut c = Client::go(tcp(addr(&h)), "disk");
        c.send(CMD_READ, 0, i * 32 * MIB, 32 << 20, &[]);
        c.send(CMD_READ, 0, (i + 8) * 32 * MIB, 32 << 20, &[]);
        hostile.push(c);
    }
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    for i in 0..20u64 {
        let data = pattern(i, 1 << 20);
        good.write(i * MIB, &data).unwrap();
        assert!(good.read(i * MIB, 1 << 20).unwrap() == data);
    }
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "the established client waited {took:?}"
    );
    assert_eq!(h.connections(), 9, "nobody was dropped");
    good.disconnect();
    shutdown_within(h, Duration::from_secs(4));
}

#[test]
fn shutdown_returns_promptly_with_clients_that_do_not_read() {
    let h = serve_with(
        as_dev(&mem(256 * MIB)),
        Limits {
            memory_budget_bytes: 64 * MIB,
            ..Limits::default()
        },
    );
    // They fill the budget with replies nobody reads, and more requests wait for it.
    let mut clients = Vec::new();
    for i in 0..6u64 {
        let mut c = Client::go(tcp(addr(&h)), "disk");
        for j in 0..4u64 {
            c.send(
                CMD_READ,
                0,
                ((i * 4 + j) * 8 * MIB) % (256 * MIB),
                8 << 20,
                &[],
            );
        }
        clients.push(c);
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(h.connections(), 6);
    shutdown_within(h, Duration::from_secs(4));
    for c in &mut clients {
        c.s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut b = vec![0u8; 1 << 20];
        loop {
            match c.s.read(&mut b) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("client not closed: {e}"),
            }
        }
    }
}

#[test]
fn shutdown_is_bounded_even_with_a_device_request_that_never_completes() {
    let dev = TrapDevice::new(None);
    let h = serve_with(
        as_dev(&dev),
        Limits {
            memory_budget_bytes: 64 * MIB,
            ..Limits::default()
        },
    );
    // a's read sits in the device holding all of the probation share; b's read waits for
    // budget that will not come back in time.
    let mut a = Client::go(tcp(addr(&h)), "disk");
    a.send(CMD_READ, 0, 64 * MIB, 32 << 20, &[]);
    std::thread::sleep(Duration::from_millis(100));
    let mut b = Client::go(tcp(addr(&h)), "disk");
    b.send(CMD_READ, 0, 0, 32 << 20, &[]);
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    let r = h.shutdown();
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(6), "shutdown took {took:?}");
    // Only the connection whose request is on the device is left behind; b gave up its
    // wait for memory when it was cut off.
    assert!(
        matches!(
            r,
            Err(nbd::NbdError::ShutdownTimedOut { connections: 1, .. })
        ),
        "{r:?}"
    );
    assert_closed(&mut a.s);
    assert_closed(&mut b.s);
}
