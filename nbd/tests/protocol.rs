//! Protocol conformance with a hand-written client: handshake, options, commands, errors.

mod common;

use std::io::{Read, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nbd::proto::*;
use nbd::{Server, ServerHandle};
use tables::io::Limits;
use tables::mem::{CrashDevice, CutMode, MemDevice};
use tables::units::Bytes;

const MIB: u64 = 1 << 20;

fn serve(b: nbd::ServerBuilder) -> ServerHandle {
    b.threads(2)
        .build()
        .unwrap()
        .serve_tcp("127.0.0.1:0")
        .unwrap()
}

fn addr(h: &ServerHandle) -> std::net::SocketAddr {
    h.local_addr().unwrap()
}

#[test]
fn handshake_info_and_go_report_the_export() {
    let dev = mem(64 * MIB);
    let h = serve(
        Server::builder()
            .export("a", "first disk", as_dev(&dev))
            .export("b", "", as_dev(&dev)),
    );
    let mut s = tcp(addr(&h));
    start(&mut s);
    let info = info_or_go(
        &mut s,
        OPT_INFO,
        "a",
        &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE],
    )
    .unwrap();
    assert_eq!(info.size, 64 * MIB);
    assert_eq!(info.name.as_deref(), Some("a"));
    assert_eq!(info.description.as_deref(), Some("first disk"));
    assert_eq!(info.block_sizes, Some((512, 4096, 32 << 20)));
    let want = TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_SEND_TRIM
        | TFLAG_SEND_WRITE_ZEROES
        | TFLAG_SEND_FAST_ZERO
        | TFLAG_CAN_MULTI_CONN;
    assert_eq!(info.flags, want);
    // INFO keeps haggling; GO enters transmission.
    let info = info_or_go(&mut s, OPT_GO, "b", &[]).unwrap();
    assert_eq!(info.size, 64 * MIB);
    assert_eq!(info.flags, want);
    let mut c = Client::after_handshake(s);
    c.info = info;
    c.write(0, b"hello").unwrap();
    assert!(c.read(0, 5).unwrap() == b"hello");
    c.disconnect();
    h.shutdown().unwrap();
}

#[test]
fn option_errors_keep_the_handshake_alive() {
    let dev = mem(MIB);
    let h = serve(
        Server::builder()
            .export("disk", "the disk", as_dev(&dev))
            .export("other", "x", as_dev(&dev)),
    );
    let mut s = tcp(addr(&h));
    start(&mut s);

    // LIST: every export with its description, then ACK.
    send_option(&mut s, OPT_LIST, &[]);
    let mut names = Vec::new();
    loop {
        let (o, kind, d) = read_option_reply(&mut s);
        assert_eq!(o, OPT_LIST);
        if kind == REP_ACK {
            break;
        }
        assert_eq!(kind, REP_SERVER);
        let n = be32(&d) as usize;
        names.push((
            String::from_utf8(d[4..4 + n].to_vec()).unwrap(),
            String::from_utf8(d[4 + n..].to_vec()).unwrap(),
        ));
    }
    assert_eq!(
        names,
        vec![
            ("disk".into(), "the disk".into()),
            ("other".into(), "x".into())
        ]
    );

    // LIST with data is invalid.
    send_option(&mut s, OPT_LIST, b"junk");
    assert_eq!(read_option_reply(&mut s).1, REP_ERR_INVALID);
    // Unknown option, structured replies, STARTTLS: unsupported.
    for opt in [99u32, OPT_STARTTLS, 9, 10, 11] {
        send_option(&mut s, opt, &[]);
        let (o, kind, msg) = read_option_reply(&mut s);
        assert_eq!((o, kind), (opt, REP_ERR_UNSUP));
        assert!(!msg.is_empty(), "error replies carry a message");
    }
    // Structured replies take no data.
    send_option(&mut s, OPT_STRUCTURED_REPLY, b"x");
    assert_eq!(read_option_reply(&mut s).1, REP_ERR_INVALID);
    // Unknown export.
    let e = info_or_go(&mut s, OPT_GO, "nope", &[]).unwrap_err();
    assert_eq!(e.0, REP_ERR_UNKNOWN);
    assert!(e.1.contains("nope"), "{}", e.1);
    // Malformed INFO data: name length past the end, odd info count.
    send_option(&mut s, OPT_INFO, &[0, 0, 1, 0, b'x', 0, 0]);
    assert_eq!(read_option_reply(&mut s).1, REP_ERR_INVALID);
    let mut d = info_data("disk", &[INFO_NAME]);
    d.pop();
    send_option(&mut s, OPT_GO, &d);
    assert_eq!(read_option_reply(&mut s).1, REP_ERR_INVALID);
    // Still usable: the empty name is the default (first) export.
    let info = info_or_go(&mut s, OPT_GO, "", &[INFO_NAME]).unwrap();
    assert_eq!(info.name.as_deref(), Some("disk"));
    let mut c = Client::after_handshake(s);
    assert!(c.read(0, 512).unwrap() == vec![0u8; 512]);
    c.disconnect();
}

#[test]
fn abort_and_hard_disconnect_cases() {
    let dev = mem(MIB);
    let h = serve(Server::builder().export("disk", "", as_dev(&dev)));
    // ABORT gets an ACK, then the server closes.
    let mut s = tcp(addr(&h));
    start(&mut s);
    send_option(&mut s, OPT_ABORT, &[]);
    assert_eq!(read_option_reply(&mut s), (OPT_ABORT, REP_ACK, vec![]));
    assert_closed(&mut s);

    // Unknown client flags: closed.
    let mut s = tcp(addr(&h));
    greeting(&mut s);
    send_client_flags(&mut s, 1 << 7);
    assert_closed(&mut s);

    // Bad option magic: closed.
    let mut s = tcp(addr(&h));
    start(&mut s);
    s.write_all(&[0x55; 16]).unwrap();
    assert_closed(&mut s);

    // Absurd option length: an error reply, no allocation, then closed.
    let mut s = tcp(addr(&h));
    start(&mut s);
    let mut hdr = Vec::new();
    hdr.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hdr.extend_from_slice(&OPT_GO.to_be_bytes());
    hdr.extend_from_slice(&0xffff_fff0u32.to_be_bytes());
    s.write_all(&hdr).unwrap();
    assert_eq!(read_option_reply(&mut s).1, REP_ERR_TOO_BIG);
    assert_closed(&mut s);

    // EXPORT_NAME on an unknown export cannot be answered: closed.
    let mut s = tcp(addr(&h));
    start(&mut s);
    send_option(&mut s, OPT_EXPORT_NAME, b"nope");
    assert_closed(&mut s);
    h.shutdown().unwrap();
}

#[test]
fn export_name_with_and_without_zero_padding() {
    let dev = mem(3 * MIB);
    dev.fill(0, b"old style");
    let h = serve(Server::builder().export("disk", "", as_dev(&dev)));
    for (flags, pad) in [
        (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES, 0),
        (FLAG_C_FIXED_NEWSTYLE, 124),
        (0, 124),
    ] {
        let mut s = tcp(addr(&h));
        greeting(&mut s);
        send_client_flags(&mut s, flags);
        send_option(&mut s, OPT_EXPORT_NAME, b"disk");
        let mut b = vec![0u8; 10 + pad];
        s.read_exact(&mut b).unwrap();
        assert_eq!(be64(&b), 3 * MIB);
        assert_ne!(be16(&b[8..]) & TFLAG_HAS_FLAGS, 0);
        assert!(b[10..].iter().all(|&x| x == 0));
        let mut c = Client::after_handshake(s);
        assert!(c.read(0, 9).unwrap() == b"old style");
        c.disconnect();
    }
    // A non-fixed client may only send EXPORT_NAME.
    let mut s = tcp(addr(&h));
    greeting(&mut s);
    send_client_flags(&mut s, 0);
    send_option(&mut s, OPT_LIST, &[]);
    assert_closed(&mut s);
}

#[test]
fn commands_reach_the_device() {
    let dev = mem(16 * MIB);
    let h = serve(Server::builder().export("disk", "", as_dev(&dev)));
    let mut c = Client::go(tcp(addr(&h)), "disk");
    let data = pattern(1, 256 * 1024);
    c.write(MIB, &data).unwrap();
    assert!(c.read(MIB, data.len() as u32).unwrap() == data);
    assert!(dev.snapshot(MIB, data.len()) == data);
    // Unaligned I/O is passed through.
    c.write(12345, b"unaligned").unwrap();
    assert!(c.read(12340, 20).unwrap()[5..14] == *b"unaligned");
    // Zero-length read and write succeed.
    assert!(c.read(0, 0).unwrap() == Vec::<u8>::new());
    c.write(0, &[]).unwrap();
    // FLUSH, TRIM (discard zeroes on MemDevice), WRITE_ZEROES with FUA and NO_HOLE.
    let flushes = dev.counters.flushes.load(Ordering::Relaxed);
    c.flush().unwrap();
    assert_eq!(dev.counters.flushes.load(Ordering::Relaxed), flushes + 1);
    c.trim(MIB, 65536).unwrap();
    assert!(c.read(MIB, 65536).unwrap() == vec![0u8; 65536]);
    assert_eq!(dev.counters.discards.load(Ordering::Relaxed), 1);
    c.zero(MIB + 65536, 65536, CMD_FLAG_FUA | CMD_FLAG_NO_HOLE)
        .unwrap();
    c.zero(MIB + 2 * 65536, 65536, CMD_FLAG_FAST_ZERO).unwrap();
    assert!(c.read(MIB, 3 * 65536).unwrap().iter().all(|&x| x == 0));
    assert!(c.read(MIB + 3 * 65536, 4096).unwrap() == data[3 * 65536..3 * 65536 + 4096]);
    // A FUA write.
    c.write_fua(0, b"fua").unwrap();
    // FUA is accepted on reads and flushes too (clients are known to set it).
    c.send(CMD_READ, CMD_FLAG_FUA, 0, 3, &[]);
    assert_eq!(c.recv().1.unwrap(), b"fua");
    // A 32 MiB request (the maximum) works.
    let big = 8 * MIB;
    let payload = pattern(2, 8 << 20);
    c.write(big, &payload).unwrap();
    assert!(c.read(big, payload.len() as u32).unwrap() == payload);
    c.disconnect();
    h.shutdown().unwrap();
}

#[test]
fn error_replies_keep_the_stream_in_sync() {
    let dev = mem(4 * MIB);
    let h = serve(Server::builder().export("disk", "", as_dev(&dev)));
    let mut c = Client::go(tcp(addr(&h)), "disk");
    let size = 4 * MIB;
    // Reads past the end: EINVAL. Writes past the end: ENOSPC (payload consumed).
    assert!(c.read(size - 512, 1024) == Err(EINVAL));
    assert!(c.read(u64::MAX - 10, 512) == Err(EINVAL));
    assert_eq!(c.write(size - 512, &[1u8; 1024]), Err(ENOSPC));
    assert_eq!(c.zero(size, 512, 0), Err(ENOSPC));
    assert_eq!(c.trim(size - 512, 1024), Err(EINVAL));
    // Unknown command (CACHE, BLOCK_STATUS, garbage) and unknown flags: EINVAL.
    for kind in [5u16, 7, 8, 200] {
        c.send(kind, 0, 0, 512, &[]);
        assert_eq!(c.recv().1, Err(EINVAL));
    }
    c.send(CMD_READ, 1 << 9, 0, 512, &[]);
    assert_eq!(c.recv().1, Err(EINVAL));
    c.send(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 4, b"abcd");
    assert_eq!(c.recv().1, Err(EINVAL));
    c.send(CMD_READ, CMD_FLAG_DF, 0, 512, &[]);
    assert_eq!(c.recv().1, Err(EINVAL));
    // Over the maximum payload: EOVERFLOW; the oversized write's payload is skipped.
    assert!(c.read(0, (32 << 20) + 1) == Err(EOVERFLOW));
    let huge = vec![0x77u8; (32 << 20) + 4096];
    assert_eq!(c.write(0, &huge), Err(EOVERFLOW));
    // Nothing of the rejected writes reached the device, and the stream is still in sync.
    assert!(dev.snapshot(size - 512, 512).iter().all(|&x| x == 0));
    assert!(dev.snapshot(0, 4096).iter().all(|&x| x == 0));
    c.write(0, b"still fine").unwrap();
    assert!(c.read(0, 10).unwrap() == b"still fine");
    c.disconnect();

    // A write too large to skip: error reply, then the server hangs up.
    let mut c = Client::go(tcp(addr(&h)), "disk");
    c.send(CMD_WRITE, 0, 0, u32::MAX, &[0u8; 1000]);
    assert_eq!(c.recv().1, Err(EOVERFLOW));
    assert_closed(&mut c.s);
    h.shutdown().unwrap();
}

#[test]
fn device_errors_map_to_nbd_errors() {
    let dev = FailDevice::new(
        8 * MIB,
        vec![
            0,
            libc::EIO,
            libc::EROFS,
            libc::ENOSPC,
            libc::EFBIG,
            libc::EOVERFLOW,
            libc::ENODEV,
            libc::EOPNOTSUPP,
        ],
    );
    let h = serve(Server::builder().export("disk", "", as_dev(&dev)));
    let mut c = Client::go(tcp(addr(&h)), "disk");
    let want = [0, EIO, EPERM, ENOSPC, ENOSPC, EOVERFLOW, EIO, EINVAL];
    for (i, &e) in want.iter().enumerate() {
        let off = i as u64 * MIB;
        let w = c.write(off, &[9u8; 4096]);
        let r = c.read(off, 4096);
        let z = c.zero(off, 4096, 0);
        if e == 0 {
            w.unwrap();
            assert_eq!(r.unwrap(), vec![9u8; 4096]);
            z.unwrap();
        } else {
            assert_eq!(
                (w, r.map(|_| ()), z),
                (Err(e), Err(e), Err(e)),
                "region {i}"
            );
        }
    }
    // Big requests run on other worker threads; their errors come back the same way.
    let big = vec![5u8; 512 << 10];
    assert_eq!(c.write(MIB, &big), Err(EIO));
    assert_eq!(c.read(MIB, 512 << 10), Err(EIO));
    assert_eq!(c.write(2 * MIB, &big), Err(EPERM));
    assert_eq!(c.read(3 * MIB, 512 << 10), Err(ENOSPC));
    c.write(0, &big).unwrap();
    assert!(c.read(0, 512 << 10).unwrap() == big);
    dev.fail_flush.store(true, Ordering::SeqCst);
    assert_eq!(c.flush(), Err(EIO));
    dev.fail_flush.store(false, Ordering::SeqCst);
    c.flush().unwrap();
    c.disconnect();
    h.shutdown().unwrap();
}

#[test]
fn read_only_exports_refuse_writes_with_eperm() {
    let dev = mem(MIB);
    dev.fill(0, b"data");
    let ro_dev = Arc::new(MemDevice::new("ro", Bytes(MIB)).with_limits(Limits {
        read_only: true,
        ..Limits::default()
    }));
    let h = serve(
        Server::builder()
            .export_read_only("ro", "", as_dev(&dev))
            .export("ro-dev", "", as_dev(&ro_dev)),
    );
    for name in ["ro", "ro-dev"] {
        let mut c = Client::go(tcp(addr(&h)), name);
        assert_ne!(c.info.flags & TFLAG_READ_ONLY, 0);
        assert_eq!(
            c.info.flags & (TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES),
            0
        );
        assert_eq!(c.write(0, b"nope"), Err(EPERM));
        assert_eq!(c.trim(0, 512), Err(EPERM));
        assert_eq!(c.zero(0, 512, 0), Err(EPERM));
        c.flush().unwrap();
        if name == "ro" {
            assert!(c.read(0, 4).unwrap() == b"data");
        }
        c.disconnect();
    }
    assert!(dev.snapshot(0, 4) == b"data");
}

#[test]
fn fua_and_flush_make_writes_durable() {
    let dev = Arc::new(CrashDevice::new("crash", Bytes(4 * MIB)));
    let h = serve(Server::builder().export("disk", "", as_dev(&dev)));
    let mut c = Client::go(tcp(addr(&h)), "disk");
    c.write(0, &[1u8; 4096]).unwrap();
    c.write_fua(4096, &[2u8; 4096]).unwrap();
    c.zero(8192, 4096, CMD_FLAG_FUA).unwrap();
    dev.power_cut(CutMode::DropAll);
    assert!(
        dev.snapshot(0, 4096) == vec![0u8; 4096],
        "unflushed write dropped"
    );
    assert!(
        dev.snapshot(4096, 4096) == vec![2u8; 4096],
        "FUA write survives"
    );
    c.write(0, &[3u8; 4096]).unwrap();
    c.flush().unwrap();
    dev.power_cut(CutMode::DropAll);
    assert!(
        dev.snapshot(0, 4096) == vec![3u8; 4096],
        "flushed write survives"
    );
    c.disconnect();
}

#[test]
fn fua_is_emulated_with_a_flush_when_the_device_lacks_it() {
    let dev = Arc::new(MemDevice::new("nofua", Bytes(MIB)).with_limits(Limits {
        fua: false,
        ..Limits::default()
    }));
    let h = serve(Server::builder().export("disk", "", as_dev(&dev)));
    let mut c = Client::go(tcp(addr(&h)), "disk");
    c.write(0, b"x").unwrap();
    assert_eq!(dev.counters.flushes.load(Ordering::Relaxed), 0);
    c.write_fua(0, b"y").unwrap();
    assert_eq!(dev.counters.flushes.load(Ordering::Relaxed), 1);
    c.disconnect();
}

#[test]
fn pipelined_requests_all_complete_beyond_the_inflight_limit() {
    let dev = mem(64 * MIB);
    let h = serve(Server::builder().export("disk", "", as_dev(&dev)));
    let mut c = Client::go(tcp(addr(&h)), "disk");
    let n = 3 * nbd::MAX_INFLIGHT as u64;
    let mut expect = std::collections::HashMap::new();
    for i in 0..n {
        let cookie = c.send(CMD_WRITE, 0, i * 65536, 65536, &pattern(i, 65536));
        expect.insert(cookie, ());
    }
    for _ in 0..n {
        let (cookie, r) = c.recv();
        r.unwrap();
        assert!(
            expect.remove(&cookie).is_some(),
            "unexpected cookie {cookie}"
        );
    }
    // Reads of the same regions, all sent before any reply is read.
    let mut want = std::collections::HashMap::new();
    for i in 0..n {
        want.insert(c.send(CMD_READ, 0, i * 65536, 65536, &[]), i);
    }
    for _ in 0..n {
        let (cookie, r) = c.recv();
        let i = want.remove(&cookie).expect("known cookie");
        assert!(r.unwrap() == pattern(i, 65536), "block {i}");
    }
    c.disconnect();
}

#[test]
fn multi_conn_clients_see_each_others_writes_after_flush() {
    let dev = mem(16 * MIB);
    let h = serve(Server::builder().export("disk", "", as_dev(&dev)));
    let mut a = Client::go(tcp(addr(&h)), "disk");
    let mut b = Client::go(tcp(addr(&h)), "disk");
    assert_ne!(a.info.flags & TFLAG_CAN_MULTI_CONN, 0);
    assert_eq!(h.connections(), 2);
    let (pa, pb) = (pattern(10, 1 << 20), pattern(11, 1 << 20));
    let ta = std::thread::spawn(move || {
        a.write(0, &pa).unwrap();
        a.flush().unwrap();
        (a, pa)
    });
    b.write(8 * MIB, &pb).unwrap();
    b.flush().unwrap();
    let (mut a, pa) = ta.join().unwrap();
    assert!(a.read(8 * MIB, 1 << 20).unwrap() == pb);
    assert!(b.read(0, 1 << 20).unwrap() == pa);
    a.disconnect();
    b.disconnect();
    let t0 = Instant::now();
    while h.connections() > 0 && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(h.connections(), 0);
    assert_eq!(h.total_connections(), 2);

    // Not advertised when the device says it is unsafe.
    let unsafe_dev = Arc::new(MemDevice::new("u", Bytes(MIB)).with_limits(Limits {
        multi_conn_safe: false,
        discard_granularity: 0,
        ..Limits::default()
    }));
    let h2 = serve(Server::builder().export("u", "", as_dev(&unsafe_dev)));
    let mut c = Client::go(tcp(addr(&h2)), "u");
    assert_eq!(c.info.flags & TFLAG_CAN_MULTI_CONN, 0);
    assert_eq!(c.info.flags & TFLAG_SEND_TRIM, 0);
    assert_eq!(c.trim(0, 512), Err(EINVAL));
    c.disconnect();
}

#[test]
fn unix_socket_serving() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let dev = mem(MIB);
    let h = Server::builder()
        .export("disk", "", as_dev(&dev))
        .threads(1)
        .build()
        .unwrap()
        .serve_unix(&path)
        .unwrap();
    assert!(h.local_addr().is_none());
    let s = std::os::unix::net::UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut c = Client::go(s, "disk");
    c.write(512, b"over unix").unwrap();
    assert!(c.read(512, 9).unwrap() == b"over unix");
    c.disconnect();
    h.shutdown().unwrap();
    assert!(!path.exists(), "socket path removed at shutdown");
}

#[test]
fn shutdown_answers_inflight_closes_clients_and_flushes() {
    let dev = mem(16 * MIB);
    let h = Server::builder()
        .export("disk", "", as_dev(&dev))
        .threads(2)
        .shutdown_grace(Duration::from_secs(10))
        .build()
        .unwrap()
        .serve_tcp("127.0.0.1:0")
        .unwrap();
    let a = addr(&h);
    let mut c = Client::go(tcp(a), "disk");
    let mut idle = tcp(a); // stuck in the handshake
    greeting(&mut idle);
    c.write(0, b"before").unwrap();
    // Requests in flight when shutdown starts still get their replies.
    let cookies: Vec<u64> = (0..8)
        .map(|i| c.send(CMD_WRITE, 0, i * 4096, 4096, &[i as u8; 4096]))
        .collect();
    while h.connections() < 2 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let t0 = Instant::now();
    let flushes = dev.counters.flushes.load(Ordering::Relaxed);
    h.shutdown().unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        t0.elapsed()
    );
    let mut got: Vec<u64> = (0..8)
        .map(|_| {
            let (k, r) = c.recv();
            r.unwrap();
            k
        })
        .collect();
    got.sort();
    assert_eq!(got, cookies);
    assert_closed(&mut c.s);
    assert_closed(&mut idle);
    assert!(
        dev.counters.flushes.load(Ordering::Relaxed) > flushes,
        "exports flushed"
    );
    assert!(
        std::net::TcpStream::connect(a).is_err(),
        "no longer listening"
    );
}

#[test]
fn stopper_ends_wait() {
    let dev = mem(MIB);
    let h = Server::builder()
        .export("disk", "", as_dev(&dev))
        .threads(1)
        .build()
        .unwrap()
        .serve_tcp("127.0.0.1:0")
        .unwrap();
    let stop = h.stopper();
    let a = addr(&h);
    let t = std::thread::spawn(move || h.wait());
    let mut c = Client::go(tcp(a), "disk");
    c.write(0, b"x").unwrap();
    stop.stop();
    t.join().unwrap().unwrap();
    assert_closed(&mut c.s);
}

#[test]
fn slow_handshakes_time_out() {
    let dev = mem(MIB);
    let h = Server::builder()
        .export("disk", "", as_dev(&dev))
        .handshake_timeout(Duration::from_millis(300))
        .build()
        .unwrap()
        .serve_tcp("127.0.0.1:0")
        .unwrap();
    let mut s = tcp(addr(&h));
    let t0 = Instant::now();
    greeting(&mut s);
    assert_closed(&mut s);
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // A client that completes its handshake in time is not cut off later.
    let mut c = Client::go(tcp(addr(&h)), "disk");
    std::thread::sleep(Duration::from_millis(600));
    c.write(0, b"late").unwrap();
    c.disconnect();
}

#[test]
fn builder_rejects_bad_configurations() {
    assert!(matches!(
        Server::builder().build(),
        Err(nbd::NbdError::NoExports)
    ));
    let d = mem(MIB);
    let e = Server::builder()
        .export("x", "", as_dev(&d))
        .export("x", "", as_dev(&d))
        .build();
    assert!(matches!(e, Err(nbd::NbdError::DuplicateExport(n)) if n == "x"));
    let e = Server::builder().export("a\0b", "", as_dev(&d)).build();
    assert!(matches!(e, Err(nbd::NbdError::BadExport { .. })));
    let e = Server::builder()
        .export("y".repeat(5000), "", as_dev(&d))
        .build();
    assert!(matches!(e, Err(nbd::NbdError::BadExport { .. })));
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let e = Server::builder()
        .export("x", "", as_dev(&d))
        .build()
        .unwrap()
        .serve_tcp(taken.local_addr().unwrap());
    assert!(matches!(e, Err(nbd::NbdError::Listen { .. })));
}

#[test]
fn connections_over_the_limit_are_closed() {
    let dev = mem(MIB);
    let h = Server::builder()
        .export("disk", "", as_dev(&dev))
        .max_connections(2)
        .build()
        .unwrap()
        .serve_tcp("127.0.0.1:0")
        .unwrap();
    let mut a = Client::go(tcp(addr(&h)), "disk");
    let b = Client::go(tcp(addr(&h)), "disk");
    let mut c = tcp(addr(&h));
    assert_closed(&mut c);
    a.write(0, b"a").unwrap();
    b.disconnect();
    let t0 = Instant::now();
    while h.connections() > 1 && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut d = Client::go(tcp(addr(&h)), "disk");
    assert!(d.read(0, 1).unwrap() == b"a");
    a.disconnect();
    d.disconnect();
}

#[test]
fn structured_replies_carry_reads_and_read_errors() {
    let dev = FailDevice::new(4 * MIB, vec![0, libc::EIO]);
    let h = serve(Server::builder().export("disk", "", as_dev(&dev)));
    let mut c = Client::go_structured(tcp(addr(&h)), "disk");
    let small = pattern(3, 4096);
    let big = pattern(4, 1 << 20);
    c.write(8192, &small).unwrap();
    c.write(2 * MIB, &big).unwrap();
    assert!(c.read(8192, 4096).unwrap() == small);
    assert!(
        c.read(2 * MIB, 1 << 20).unwrap() == big,
        "big read (another worker sends it)"
    );
    assert!(c.read(0, 0).unwrap().is_empty());
    // Errors on reads come as error chunks: validation, device, big device read.
    assert_eq!(c.read(4 * MIB, 512), Err(EINVAL));
    assert_eq!(c.read(MIB, 4096), Err(EIO));
    assert_eq!(c.read(MIB, 512 << 10), Err(EIO));
    // Other commands keep simple replies.
    assert_eq!(c.write(MIB, b"x"), Err(EIO));
    c.flush().unwrap();
    // Pipelined mix of small and big reads.
    let mut want = std::collections::HashMap::new();
    for i in 0..40u64 {
        let len = if i % 3 == 0 { 256 << 10 } else { 4096 };
        want.insert(c.send(CMD_READ, 0, 2 * MIB + i * 4096, len, &[]), (i, len));
    }
    for _ in 0..40 {
        let (cookie, r) = c.recv();
        let (i, len) = want.remove(&cookie).unwrap();
        let off = (i * 4096) as usize;
        assert!(r.unwrap() == big[off..off + len as usize], "read {i}");
    }
    c.disconnect();
}
