//! Hostile clients: garbage, truncated handshakes and headers, bad magic, out-of-range and
//! huge requests, disconnects in the middle of a write payload. Meanwhile a well-behaved
//! client writes and verifies its own region; afterwards the server still serves and the
//! good data is intact.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nbd::proto::*;
use nbd::Server;
use rand::{Rng, SeedableRng};

const MIB: u64 = 1 << 20;
/// The well-behaved client owns [0, GOOD); hostile valid writes go above.
const GOOD: u64 = 8 * MIB;
const SIZE: u64 = 32 * MIB;

fn raw(addr: SocketAddr) -> std::net::TcpStream {
    let s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
    s
}

/// Handshake to transmission, tolerating failure (returns None).
fn go(addr: SocketAddr) -> Option<std::net::TcpStream> {
    let mut s = raw(addr);
    let mut g = [0u8; 18];
    s.read_exact(&mut g).ok()?;
    s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
        .ok()?;
    send_option(&mut s, OPT_GO, &info_data("disk", &[]));
    loop {
        let (_, kind, _) = read_option_reply(&mut s);
        if kind == REP_ACK {
            return Some(s);
        }
        if kind & REP_ERR != 0 {
            return None;
        }
    }
}

fn header(kind: u16, flags: u16, offset: u64, len: u32) -> [u8; 28] {
    Request {
        flags,
        kind,
        cookie: 0xfeed,
        offset,
        len,
    }
    .encode()
}

/// Reads one simple reply's error field (None if the server closed instead).
fn reply_error(s: &mut std::net::TcpStream) -> Option<u32> {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).ok()?;
    assert_eq!(be32(&h), SIMPLE_REPLY_MAGIC);
    Some(be32(&h[4..]))
}

fn hostile(addr: SocketAddr, rng: &mut rand::rngs::StdRng, errors_seen: &AtomicU64) {
    let garbage: Vec<u8> = (0..rng.gen_range(0..4096)).map(|_| rng.gen()).collect();
    match rng.gen_range(0..11) {
        // Random bytes instead of a handshake.
        0 => {
            let mut s = raw(addr);
            let _ = s.write_all(&garbage);
        }
        // Truncated handshake: partial client flags or a partial option header.
        1 => {
            let mut s = raw(addr);
            let mut g = [0u8; 18];
            let _ = s.read_exact(&mut g);
            let _ = s.write_all(&[0, 0]);
        }
        2 => {
            let mut s = raw(addr);
            let mut g = [0u8; 18];
            let _ = s.read_exact(&mut g);
            let _ = s.write_all(&1u32.to_be_bytes());
            let _ = s.write_all(&IHAVEOPT.to_be_bytes()[..5]);
        }
        // Random options with random lengths (no data sent for huge ones).
        3 => {
            let mut s = raw(addr);
            let mut g = [0u8; 18];
            let _ = s.read_exact(&mut g);
            let _ = s.write_all(&1u32.to_be_bytes());
            for _ in 0..rng.gen_range(1..8) {
                let mut h = IHAVEOPT.to_be_bytes().to_vec();
                h.extend_from_slice(&rng.gen_range(0u32..16).to_be_bytes());
                let len: u32 = if rng.gen_bool(0.3) {
                    rng.gen()
                } else {
                    rng.gen_range(0..64)
                };
                h.extend_from_slice(&len.to_be_bytes());
                if len < 64 {
                    h.extend((0..len).map(|_| rng.gen::<u8>()));
                }
                if s.write_all(&h).is_err() {
                    break;
                }
            }
        }
        // Transmission, then garbage.
        4 => {
            if let Some(mut s) = go(addr) {
                let _ = s.write_all(&garbage);
            }
        }
        // Truncated request header.
        5 => {
            if let Some(mut s) = go(addr) {
                let h = header(CMD_READ, 0, GOOD, 4096);
                let _ = s.write_all(&h[..rng.gen_range(1..28)]);
            }
        }
        // Bad magic.
        6 => {
            if let Some(mut s) = go(addr) {
                let mut h = header(CMD_READ, 0, GOOD, 4096);
                h[0] ^= 0xff;
                let _ = s.write_all(&h);
                let mut b = [0u8; 1];
                assert!(
                    !matches!(s.read(&mut b), Ok(n) if n > 0),
                    "no reply to a bad magic"
                );
            }
        }
        // Out of range and huge requests: error replies, and the stream stays usable.
        7 => {
            if let Some(mut s) = go(addr) {
                let cases = [
                    (CMD_READ, SIZE, 4096u32, EINVAL),
                    (CMD_READ, u64::MAX, 1, EINVAL),
                    (CMD_READ, 0, u32::MAX, EOVERFLOW),
                    (CMD_WRITE_ZEROES, SIZE - 1, 2, ENOSPC),
                    (CMD_TRIM, u64::MAX - 1, 4096, EINVAL),
                    (99, 0, 0, EINVAL),
                ];
                for (kind, off, len, want) in cases {
                    s.write_all(&header(kind, 0, off, len)).unwrap();
                    assert_eq!(
                        reply_error(&mut s),
                        Some(want),
                        "kind {kind} off {off} len {len}"
                    );
                    errors_seen.fetch_add(1, Ordering::Relaxed);
                }
                // A write past the end: payload consumed, ENOSPC.
                let mut w = header(CMD_WRITE, 0, SIZE - 512, 1024).to_vec();
                w.extend_from_slice(&[0xee; 1024]);
                s.write_all(&w).unwrap();
                assert_eq!(reply_error(&mut s), Some(ENOSPC));
                s.write_all(&header(CMD_DISC, 0, 0, 0)).unwrap();
            }
        }
        // Disconnect in the middle of a write payload (into the hostile area).
        8 => {
            if let Some(mut s) = go(addr) {
                let off = GOOD + rng.gen_range(0..(SIZE - GOOD - MIB)) / 512 * 512;
                let _ = s.write_all(&header(CMD_WRITE, 0, off, MIB as u32));
                let _ = s.write_all(&garbage);
            }
        }
        // A huge write whose payload never comes.
        9 => {
            if let Some(mut s) = go(addr) {
                let _ = s.write_all(&header(CMD_WRITE, 0, 0, u32::MAX));
                let _ = s.write_all(&garbage);
            }
        }
        // Many pipelined valid requests (small, and big ones that other workers answer),
        // then vanish without reading the replies.
        _ => {
            if let Some(mut s) = go(addr) {
                let len: u32 = if rng.gen_bool(0.5) { 65536 } else { 1 << 20 };
                let mut b = Vec::new();
                for i in 0..100u64 {
                    let off = GOOD + (i * len as u64) % (SIZE - GOOD - len as u64);
                    b.extend_from_slice(&header(CMD_READ, 0, off, len));
                }
                let _ = s.write_all(&b);
            }
        }
    }
}

#[test]
fn hostile_clients_do_not_hurt_good_ones() {
    let dev = mem(SIZE);
    let h = Server::builder()
        .export("disk", "", as_dev(&dev))
        .threads(2)
        .handshake_timeout(Duration::from_secs(2))
        .build()
        .unwrap()
        .serve_tcp("127.0.0.1:0")
        .unwrap();
    let addr = h.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let errors_seen = Arc::new(AtomicU64::new(0));
    let seed: u64 = std::env::var("NBD_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed);
    let run_for = Duration::from_secs(6);

    let hostiles: Vec<_> = (0..4)
        .map(|t| {
            let stop = stop.clone();
            let errors_seen = errors_seen.clone();
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed + t);
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    hostile(addr, &mut rng, &errors_seen);
                    n += 1;
                }
                n
            })
        })
        .collect();

    // The good client keeps writing and verifying its own region meanwhile.
    let mut good = Client::go(tcp(addr), "disk");
    let t0 = Instant::now();
    let mut round = 0u64;
    let mut written = std::collections::HashMap::new();
    while t0.elapsed() < run_for {
        let blk = round % (GOOD / (64 << 10));
        let data = pattern(round, 64 << 10);
        good.write(blk * (64 << 10), &data).unwrap();
        written.insert(blk, round);
        if round % 16 == 15 {
            good.flush().unwrap();
        }
        round += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let attempts: u64 = hostiles.into_iter().map(|t| t.join().unwrap()).sum();
    eprintln!(
        "{attempts} hostile connections, {} error replies checked, {round} good writes",
        errors_seen.load(Ordering::Relaxed)
    );
    assert!(attempts > 100, "only {attempts} hostile connections");
    assert!(errors_seen.load(Ordering::Relaxed) > 0);

    // Every hostile connection goes away (timeouts included).
    let t1 = Instant::now();
    while h.connections() > 1 && t1.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(h.connections(), 1, "only the good client remains");

    // The good client's data is intact, through the same connection and a fresh one.
    let mut fresh = Client::go(tcp(addr), "disk");
    for (&blk, &r) in &written {
        let want = pattern(r, 64 << 10);
        assert!(
            good.read(blk * (64 << 10), 64 << 10).unwrap() == want,
            "block {blk}"
        );
        assert!(
            fresh.read(blk * (64 << 10), 64 << 10).unwrap() == want,
            "block {blk} (fresh)"
        );
    }
    assert!(h.total_connections() > attempts / 2);
    good.disconnect();
    fresh.disconnect();
    let t2 = Instant::now();
    h.shutdown().unwrap();
    assert!(t2.elapsed() < Duration::from_secs(3));
}
