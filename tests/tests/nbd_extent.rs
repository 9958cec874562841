//! The NBD client extent against real servers (nbdkit, qemu-nbd) and a fake one that answers
//! garbage: data integrity against a model, server restarts, link loss past
//! reconnect-delay, request timeouts, multi-conn, structured replies with holes.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::{
    fake_nbd_handshake, free_port, make_test_certs, require_tool, writer_with_readback,
    PeerServer as Server, Rng,
};
use extents::net::NbdExtent;
use extents::net::NetUri;
use extents::FileResolver;
use tables::io::{read_blocking, write_blocking};
use tables::registry::Resolver;
use tables::{BlockDevice, Bytes, DeviceRef, WriteFlags};

fn open(uri: &str) -> Arc<NbdExtent> {
    let NetUri::Nbd(u) = NetUri::parse(uri).unwrap() else {
        panic!("{uri}")
    };
    Arc::new(NbdExtent::open(u).unwrap_or_else(|e| panic!("{e}")))
}

/// Random reads, writes (FUA or not), write-zeroes, discards and flushes against a model.
fn model_run(dev: &dyn BlockDevice, seed: u64, ops: usize, size: u64) {
    let mut model = vec![0u8; size as usize];
    read_blocking(dev, Bytes(0), &mut model).unwrap();
    let mut rng = Rng(seed);
    for i in 0..ops {
        let max = 256 * 1024;
        let len = (1 + rng.below(max / 512)) * 512;
        let off = rng.below((size - len) / 512) * 512;
        let (o, l) = (off as usize, len as usize);
        match rng.below(10) {
            0..=3 => {
                let data: Vec<u8> = (0..l).map(|_| rng.next_u64() as u8).collect();
                let flags = if rng.below(4) == 0 {
                    WriteFlags::FUA
                } else {
                    WriteFlags::default()
                };
                write_blocking(dev, Bytes(off), &data, flags).unwrap();
                model[o..o + l].copy_from_slice(&data);
            }
            4 => {
                iort::block_on(dev.write_zeroes(Bytes(off), Bytes(len), WriteFlags::default()))
                    .unwrap()
                    .unwrap();
                model[o..o + l].fill(0);
            }
            5 => iort::block_on(dev.flush()).unwrap().unwrap(),
            _ => {
                let mut got = vec![0xa5u8; l];
                read_blocking(dev, Bytes(off), &mut got).unwrap();
                assert!(
                    got == model[o..o + l],
                    "op {i}: read at {off} length {len} differs"
                );
            }
        }
    }
    let mut all = vec![0u8; size as usize];
    read_blocking(dev, Bytes(0), &mut all).unwrap();
    assert!(all == model, "final contents differ from the model");
}

#[test]
fn nbdkit_memory_matches_a_model() {
    let port = free_port();
    let _s = Server::nbdkit(port, &["memory", "16M"]);
    let d = open(&format!("nbd://127.0.0.1:{port}/"));
    assert_eq!(d.size(), Bytes(16 << 20));
    assert!(d.limits().write_zeroes && d.limits().fua && d.limits().volatile_cache);
    model_run(&*d, 7, 400, 16 << 20);
    // Unaligned byte ranges work too (the server's minimum block is 1).
    write_blocking(&*d, Bytes(1001), b"hello", WriteFlags::default()).unwrap();
    let mut b = [0u8; 7];
    read_blocking(&*d, Bytes(1000), &mut b).unwrap();
    assert_eq!(&b[1..6], b"hello");
    assert!(d.status().contains(" connections 1/1 "), "{}", d.status());
    assert_eq!(d.health().state, "up");
}

#[test]
fn concurrent_threads_share_one_connection() {
    let port = free_port();
    let _s = Server::nbdkit(port, &["memory", "64M"]);
    let d = open(&format!("nbd://127.0.0.1:{port}/"));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let d = d.clone();
            std::thread::spawn(move || {
                // Each thread owns a 16 MiB quarter, so the model is per thread.
                let base = t * (16 << 20);
                let mut rng = Rng(t + 1);
                let mut model = vec![0u8; 16 << 20];
                for _ in 0..200 {
                    let len = (1 + rng.below(64)) as usize * 4096;
                    let off = rng.below(((16 << 20) - len as u64) / 4096) as usize * 4096;
                    if rng.below(2) == 0 {
                        let data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
                        write_blocking(&*d, Bytes(base + off as u64), &data, WriteFlags::default())
                            .unwrap();
                        model[off..off + len].copy_from_slice(&data);
                    } else {
                        let mut got = vec![0u8; len];
                        read_blocking(&*d, Bytes(base + off as u64), &mut got).unwrap();
                        assert!(got == model[off..off + len]);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn qemu_nbd_places_bytes_and_holes_read_as_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.img");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let port = free_port();
    let s = Server::qemu_nbd(port, &file);
    let d = open(&format!("nbd://127.0.0.1:{port}/disk"));
    let data: Vec<u8> = (0..65536u32).map(|i| (i * 7) as u8).collect();
    write_blocking(&*d, Bytes(1 << 20), &data, WriteFlags::FUA).unwrap();
    // A read spanning a hole (qemu-nbd answers unallocated ranges with hole chunks) and data.
    let mut got = vec![0xaau8; 2 << 20];
    read_blocking(&*d, Bytes(0), &mut got).unwrap();
    assert!(
        got[..1 << 20].iter().all(|&b| b == 0),
        "hole did not read as zeroes"
    );
    assert_eq!(&got[1 << 20..(1 << 20) + 65536], &data[..]);
    drop(d);
    drop(s);
    let on_disk = std::fs::read(&file).unwrap();
    assert_eq!(
        &on_disk[1 << 20..(1 << 20) + 65536],
        &data[..],
        "bytes not at the offset"
    );
}

#[test]
fn unix_socket_and_resolver_sharing() {
    require_tool("nbdkit");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let mut child = Command::new("nbdkit")
        .args(["-f", "--exit-with-parent", "-U"])
        .arg(&sock)
        .args(["memory", "4M"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(Instant::now() < until, "nbdkit socket never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let r = FileResolver::default();
    let a: DeviceRef = r.open(&uri).unwrap();
    let b: DeviceRef = r.open(&uri).unwrap();
    assert!(Arc::ptr_eq(&a, &b), "two lines naming one export share it");
    write_blocking(&*a, Bytes(0), b"via unix", WriteFlags::default()).unwrap();
    let mut got = [0u8; 8];
    read_blocking(&*b, Bytes(0), &mut got).unwrap();
    assert_eq!(&got, b"via unix");
    drop((a, b));
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn unreachable_server_is_named_at_open() {
    let port = free_port();
    let uri = format!("nbd://127.0.0.1:{port}/x?connect-timeout=2");
    let Err(e) = FileResolver::default().open(&uri) else {
        panic!("opened an unreachable server")
    };
    assert!(e.contains(&uri) && e.contains("refused"), "{e}");
}

#[test]
fn server_restart_under_writes_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.img");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let port = free_port();
    let fstr = format!("file={}", file.display());
    let mut s = Server::nbdkit(port, &["file", &fstr]);
    let d = open(&format!(
        "nbd://127.0.0.1:{port}/?timeout=5&reconnect-delay=20"
    ));
    let writer = writer_with_readback(d.clone(), 32 << 20, 5, "across the server restart");
    std::thread::sleep(Duration::from_millis(1500));
    s.kill();
    std::thread::sleep(Duration::from_millis(1000));
    let _s2 = Server::nbdkit(port, &["file", &fstr]);
    let (model, n) = writer.join().unwrap();
    assert!(n > 10, "only {n} writes");
    let st = d.status();
    assert!(st.contains("reconnects 1"), "{st}");
    drop(d);
    assert!(
        std::fs::read(&file).unwrap() == model,
        "file differs from the model"
    );
}

#[test]
fn link_down_past_reconnect_delay_fails_then_recovers() {
    let port = free_port();
    let mut s = Server::nbdkit(port, &["memory", "4M"]);
    let d = open(&format!(
        "nbd://127.0.0.1:{port}/?timeout=1&reconnect-delay=1&connect-timeout=1"
    ));
    write_blocking(&*d, Bytes(0), b"before", WriteFlags::default()).unwrap();
    s.kill();
    let t = Instant::now();
    let mut b = [0u8; 6];
    let e = read_blocking(&*d, Bytes(0), &mut b).unwrap_err();
    assert_eq!(e.errno, libc::EIO, "{e}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    assert!(e.msg.contains("no connection"), "{e}");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(d.is_failed(), "{}", d.status());
    // Fails fast while failed.
    let t = Instant::now();
    assert!(read_blocking(&*d, Bytes(0), &mut b).is_err());
    assert!(t.elapsed() < Duration::from_millis(500));
    // Back: a new (empty) memory disk on the same port serves again.
    let _s2 = Server::nbdkit(port, &["memory", "4M"]);
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        if read_blocking(&*d, Bytes(0), &mut b).is_ok() {
            break;
        }
        assert!(Instant::now() < until, "never recovered: {}", d.status());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(d.status().contains(" up "), "{}", d.status());
}

#[test]
fn slow_server_requests_time_out() {
    let port = free_port();
    let _s = Server::nbdkit(port, &["--filter=delay", "memory", "4M", "rdelay=10"]);
    let d = open(&format!(
        "nbd://127.0.0.1:{port}/?timeout=0.5&reconnect-delay=0.5"
    ));
    let t = Instant::now();
    let mut b = [0u8; 512];
    let e = read_blocking(&*d, Bytes(0), &mut b).unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "took {:?}",
        t.elapsed()
    );
    assert!(matches!(e.errno, libc::ETIMEDOUT | libc::EIO), "{e}");
    let st = d.status();
    assert!(!st.contains("timeouts 0 "), "{st}");
    // Writes are not delayed: the connection came back and serves them.
    write_blocking(&*d, Bytes(0), &[1u8; 512], WriteFlags::default()).unwrap();
}

#[test]
fn multi_conn_spreads_over_connections() {
    let port = free_port();
    let _s = Server::nbdkit(port, &["memory", "16M"]);
    let d = open(&format!("nbd://127.0.0.1:{port}/?connections=4"));
    assert_eq!(d.connections(), 4);
    model_run(&*d, 3, 200, 16 << 20);
    assert!(d.status().contains("connections 4/4"), "{}", d.status());
}

/// A fake server: a correct handshake, then `reply` answers each request.
fn fake_server(reply: fn(&mut TcpStream, &[u8; 28])) -> (u16, std::thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let h = std::thread::spawn(move || {
        l.set_nonblocking(false).unwrap();
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let _ = fake_session(&mut s, reply);
            });
        }
    });
    (port, h)
}

fn fake_session(s: &mut TcpStream, reply: fn(&mut TcpStream, &[u8; 28])) -> std::io::Result<()> {
    fake_nbd_handshake(s, 1 << 20)?;
    loop {
        let mut h = [0u8; 28];
        s.read_exact(&mut h)?;
        let len = u32::from_be_bytes(h[24..28].try_into().unwrap());
        if u16::from_be_bytes([h[6], h[7]]) == 1 {
            let mut p = vec![0u8; len as usize];
            s.read_exact(&mut p)?;
        }
        reply(s, &h);
    }
}

#[test]
fn garbage_from_a_server_drops_the_connection_and_spares_others() {
    require_tool("nbdkit");
    // Wrong cookie, then a read reply longer than asked, then a bad magic.
    let (p1, _h1) = fake_server(|s, h| {
        let mut r = vec![];
        r.extend_from_slice(&0x67446698u32.to_be_bytes());
        r.extend_from_slice(&0u32.to_be_bytes());
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        r.extend_from_slice(&(cookie ^ 0xdead).to_be_bytes());
        let _ = s.write_all(&r);
    });
    let (p2, _h2) = fake_server(|s, _h| {
        let _ = s.write_all(&[0xffu8; 64]);
    });
    let good_port = free_port();
    let _good = Server::nbdkit(good_port, &["memory", "4M"]);
    let good = open(&format!("nbd://127.0.0.1:{good_port}/"));
    for p in [p1, p2] {
        let bad = open(&format!("nbd://127.0.0.1:{p}/?timeout=1&reconnect-delay=1"));
        let mut b = vec![0x5au8; 4096];
        let t = Instant::now();
        let e = read_blocking(&*bad, Bytes(0), &mut b).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
        assert!(b.iter().all(|&x| x == 0x5a), "garbage reached the buffer");
        let st = bad.status();
        assert!(st.contains("protocol violation"), "{e} / {st}");
        assert!(!st.contains("dropped 0 "), "{st}");
        // The good export is untouched.
        write_blocking(&*good, Bytes(0), &b, WriteFlags::default()).unwrap();
    }
}

fn open_err(uri: &str) -> String {
    match FileResolver::default().open(uri) {
        Ok(_) => panic!("{uri} opened"),
        Err(e) => e,
    }
}

#[test]
fn tls_to_nbdkit_that_requires_it() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    std::fs::create_dir(&pki).unwrap();
    make_test_certs(&pki, "volmgr-test-ca");
    let port = free_port();
    let certs = format!("--tls-certificates={}", pki.display());
    let _s = Server::nbdkit(port, &["--tls=require", &certs, "memory", "16M"]);
    let d = open(&format!(
        "nbds://127.0.0.1:{port}/?tls-certificates={}",
        pki.display()
    ));
    model_run(&*d, 11, 200, 16 << 20);
    // A big write and read cross many TLS records.
    let big: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 251) as u8).collect();
    write_blocking(&*d, Bytes(4 << 20), &big, WriteFlags::FUA).unwrap();
    let mut back = vec![0u8; 8 << 20];
    read_blocking(&*d, Bytes(4 << 20), &mut back).unwrap();
    assert!(back == big, "8 MiB through TLS came back different");

    // A plain client is refused by a server that requires TLS, and says so.
    let e = open_err(&format!("nbd://127.0.0.1:{port}/"));
    assert!(e.contains("TLS"), "{e}");
    // A server whose certificate another CA signed is refused.
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    make_test_certs(&other, "another-ca");
    let e = open_err(&format!(
        "nbds://127.0.0.1:{port}/?tls-certificates={}",
        other.display()
    ));
    assert!(
        e.contains("TLS handshake") && e.contains("certificate"),
        "{e}"
    );
    // A client key others can read is refused before any connection, naming the file.
    std::fs::copy(pki.join("server-cert.pem"), other.join("client-cert.pem")).unwrap();
    std::fs::copy(pki.join("server-key.pem"), other.join("client-key.pem")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        other.join("client-key.pem"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let e = open_err(&format!(
        "nbds://127.0.0.1:{port}/?tls-certificates={}",
        other.display()
    ));
    assert!(
        e.contains("client-key.pem") && e.contains("chmod 600"),
        "{e}"
    );
    assert!(!e.contains("BEGIN"), "key material in an error: {e}");
}
