//! Two pools in one process, replicated over loopback TCP: a writer on the primary volume
//! with a 1 s interval (lag stays under two intervals), a cut of several intervals then a
//! restore (resumes from the last common snapshot and ships exactly the change), the
//! secondary's latest snapshot equal block by block to the primary's snapshot of the same
//! id; and garbage, plain TCP on a TLS port, a certificate from another CA and a wrong volume
//! never write a byte into the secondary's pool.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use replicate::proto::{recv, send, Msg, Payload};
use replicate::{tls, Primary, PrimaryConfig, Secondary, SecondaryConfig, State};
use tables::io::{read_blocking, write_blocking};
use tables::mem::MemDevice;
use tables::{Bytes, WriteFlags};
use thin::{Pool, PoolOptions, ThinId};

const BS: u64 = 64 * 1024;
const VOL: u64 = 32 << 20;
const VOL_ID: ThinId = ThinId(1);
const SNAPS: [ThinId; 2] = [ThinId(100), ThinId(101)];

fn pool(name: &str) -> Arc<Pool> {
    let o = PoolOptions {
        data_block_sectors: (BS / 512) as u32,
        commit_interval: None,
        error_if_no_space: true,
        ..PoolOptions::default()
    };
    let meta = Arc::new(MemDevice::new(format!("{name}-meta"), Bytes(4 << 20)));
    let data = Arc::new(MemDevice::new(format!("{name}-data"), Bytes(128 << 20)));
    iort::block_on(Pool::open(meta, data, o)).unwrap().unwrap()
}

/// Writes block `b` of `dev` with bytes derived from `seed`.
fn write_block(dev: &dyn tables::io::BlockDevice, b: u64, seed: u64) {
    let mut buf = vec![0u8; BS as usize];
    for (i, c) in buf.chunks_mut(8).enumerate() {
        c.copy_from_slice(&(seed ^ (i as u64) ^ (b << 32)).to_le_bytes());
    }
    write_blocking(dev, Bytes(b * BS), &buf, WriteFlags::default()).unwrap();
}

fn secondary_cfg(pool: &Arc<Pool>, dir: &Path, tls: Option<&Path>) -> SecondaryConfig {
    SecondaryConfig {
        volume: "vol-uuid-1".into(),
        pool: pool.clone(),
        copy: ThinId(7),
        size: Bytes(VOL),
        snap_ids: SNAPS,
        state_path: dir.join("secondary.json"),
        tls: tls.map(|d| tls::server_config(d).unwrap()),
    }
}

fn primary_cfg(pool: &Arc<Pool>, dir: &Path, port: u16, tls: Option<&Path>) -> PrimaryConfig {
    PrimaryConfig {
        volume: "vol-uuid-1".into(),
        pool: pool.clone(),
        thin: VOL_ID,
        size: Bytes(VOL),
        snap_ids: SNAPS,
        interval: Duration::from_secs(1),
        state_path: dir.join("primary.json"),
        peer: format!("127.0.0.1:{port}"),
        server_name: "127.0.0.1".into(),
        tls: tls.map(|d| tls::client_config(d).unwrap()),
        bwlimit: None,
    }
}

fn start_secondary(cfg: SecondaryConfig, l: TcpListener) -> (Arc<Secondary>, JoinHandle<()>) {
    let s = Arc::new(Secondary::new(cfg).unwrap());
    let s2 = s.clone();
    let h = std::thread::spawn(move || s2.serve(l).unwrap());
    (s, h)
}

fn start_primary(cfg: PrimaryConfig) -> (Arc<Primary>, JoinHandle<()>) {
    let p = Arc::new(Primary::new(cfg));
    let p2 = p.clone();
    let h = std::thread::spawn(move || p2.run());
    (p, h)
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn read_all(pool: &Arc<Pool>, id: ThinId) -> Vec<u8> {
    let dev = pool.thin(id, Bytes(VOL), None).unwrap();
    let mut buf = vec![0u8; VOL as usize];
    read_blocking(&*dev, Bytes(0), &mut buf).unwrap();
    buf
}

#[test]
fn replicates_under_writes_resumes_after_a_cut_and_matches_block_by_block() {
    let dir = tempfile::tempdir().unwrap();
    let (pp, sp) = (pool("primary"), pool("secondary"));
    pp.create_thin(VOL_ID).unwrap();
    let vol = pp.thin(VOL_ID, Bytes(VOL), None).unwrap();
    for b in 0..VOL / BS / 4 {
        write_block(&*vol, b, 1);
    }
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (sec, sec_h) = start_secondary(secondary_cfg(&sp, dir.path(), None), l);
    let (pri, pri_h) = start_primary(primary_cfg(&pp, dir.path(), port, None));

    // A writer: a block every 20 ms, all over the volume.
    let stop_writer = Arc::new(AtomicBool::new(false));
    let writer = {
        let (vol, stop) = (vol.clone(), stop_writer.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                write_block(&*vol, (i * 7919) % (VOL / BS), i + 2);
                i += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    wait_for("the first full copy", 30, || sec.status().intervals >= 1);
    // Lag under two intervals while the link is up: every sample over 4 s.
    let start = pri.status().intervals;
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(500));
        let s = pri.status();
        assert!(s.seconds_behind <= 2, "lag {} s: {s:?}", s.seconds_behind);
    }
    assert!(
        pri.status().intervals >= start + 2,
        "intervals kept coming: {:?}",
        pri.status()
    );
    stop_writer.store(true, Ordering::SeqCst);
    writer.join().unwrap();

    // Everything written is acknowledged; then the link is cut.
    let settled = pri.status().intervals + 2;
    wait_for("a quiet interval", 10, || pri.status().intervals >= settled);
    sec.stop();
    sec_h.join().unwrap();
    let before_cut = State::load(&dir.path().join("primary.json")).unwrap();
    let changed = 40u64;
    for b in 0..changed {
        write_block(&*vol, 3 * b, 999);
    }
    std::thread::sleep(Duration::from_secs(4));
    assert!(pri.status().last_error.is_some(), "the cut is seen");
    assert_eq!(
        State::load(&dir.path().join("primary.json"))
            .unwrap()
            .snapshot,
        before_cut.snapshot,
        "nothing acknowledged while cut"
    );

    // Restored on the same port: resumes from the last common snapshot.
    let l = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let (sec, sec_h) = start_secondary(secondary_cfg(&sp, dir.path(), None), l);
    wait_for("resumed replication", 20, || sec.status().intervals >= 2);
    let s = sec.status();
    assert_eq!(
        s.bytes_shipped,
        changed * BS,
        "only the blocks changed during the cut were shipped: {s:?}"
    );
    pri.stop();
    pri_h.join().unwrap();
    sec.stop();
    sec_h.join().unwrap();

    // The secondary's latest snapshot is the primary's last acknowledged one, block by block.
    let ps = State::load(&dir.path().join("primary.json")).unwrap();
    let (snap, sid) = sec.latest().unwrap().unwrap();
    assert_eq!(snap, ps.snapshot);
    assert!(snap > before_cut.snapshot);
    let (a, b) = (read_all(&pp, ThinId(ps.thin_id)), read_all(&sp, sid));
    for (i, (x, y)) in a.chunks(BS as usize).zip(b.chunks(BS as usize)).enumerate() {
        assert!(x == y, "block {i} differs");
    }
    // And it holds the writes made during the cut.
    assert_eq!(&a[..BS as usize], &b[..BS as usize]);
    let mut want = vec![0u8; BS as usize];
    read_blocking(&*vol, Bytes(3 * 39 * BS), &mut want).unwrap();
    assert_eq!(
        &b[(3 * 39 * BS) as usize..(3 * 39 * BS + BS) as usize],
        &want[..]
    );
}

/// A CA with a server certificate for 127.0.0.1 and a client certificate in `dir`, and a
/// second CA's client certificate in `dir/rogue`.
fn make_certs(dir: &Path) {
    let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    let script = format!(
        "set -e
         openssl req -x509 {ec} -keyout ca-key.pem -out ca-cert.pem -days 2 -subj /CN=ca 2>/dev/null
         openssl req {ec} -keyout server-key.pem -out server.csr -subj /CN=127.0.0.1 2>/dev/null
         printf 'subjectAltName=IP:127.0.0.1\\nextendedKeyUsage=serverAuth\\n' > sext
         openssl x509 -req -in server.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
           -out server-cert.pem -days 2 -extfile sext 2>/dev/null
         openssl req {ec} -keyout client-key.pem -out client.csr -subj /CN=primary 2>/dev/null
         printf 'extendedKeyUsage=clientAuth\\n' > cext
         openssl x509 -req -in client.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
           -out client-cert.pem -days 2 -extfile cext 2>/dev/null
         chmod 600 server-key.pem client-key.pem"
    );
    let rogue = dir.join("rogue");
    std::fs::create_dir(&rogue).unwrap();
    for d in [dir, rogue.as_path()] {
        let o = Command::new("bash")
            .args(["-c", &script])
            .current_dir(d)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "openssl in {}: {}",
            d.display(),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    // The rogue client trusts the real server (so only its own certificate is wrong).
    std::fs::copy(dir.join("ca-cert.pem"), rogue.join("ca-cert.pem")).unwrap();
}

#[test]
fn garbage_plain_tcp_rogue_certificates_and_wrong_volumes_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let sp = pool("secondary");
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (sec, sec_h) = start_secondary(secondary_cfg(&sp, dir.path(), Some(dir.path())), l);
    let untouched = |what: &str| {
        assert!(
            sp.devices().unwrap().is_empty(),
            "{what}: no device was created"
        );
        assert_eq!(sp.stats().data_used, 0, "{what}: no data block was written");
        assert!(
            !dir.path().join("secondary.json").exists(),
            "{what}: no state"
        );
    };
    let addr = format!("127.0.0.1:{port}");

    // Random bytes.
    let mut s = TcpStream::connect(&addr).unwrap();
    let mut x = 0x1234_5678_9abc_def0u64;
    let junk: Vec<u8> = (0..65536)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let _ = s.write_all(&junk);
    drop(s);
    wait_for("the refusal", 10, || sec.status().last_error.is_some());
    untouched("random bytes");

    // The protocol itself, in plain TCP, on the TLS port: a full interval.
    let mut s = TcpStream::connect(&addr).unwrap();
    let msgs = [
        Msg::Hello {
            volume: "vol-uuid-1".into(),
            last_common: 0,
        },
        Msg::Begin {
            snapshot: 1,
            base: 0,
            volume_size: VOL,
            taken_at: 1,
        },
        Msg::Data {
            offset: 0,
            bytes: Payload::copy_of(&[7; 4096]).unwrap(),
        },
    ];
    for m in &msgs {
        let _ = send(&mut s, m);
    }
    drop(s);
    std::thread::sleep(Duration::from_millis(500));
    untouched("plain TCP on the TLS port");

    // A client certificate from another CA.
    let rogue = tls::connect(
        &addr,
        "127.0.0.1",
        Some(&tls::client_config(&dir.path().join("rogue")).unwrap()),
    );
    if let Ok(mut l) = rogue {
        for m in &msgs {
            let _ = send(&mut l, m);
        }
        let _ = l.flush();
        assert!(recv(&mut l).is_err(), "a rogue client gets no ACK");
    }
    std::thread::sleep(Duration::from_millis(500));
    untouched("a certificate from another CA");

    // An authenticated primary for another volume.
    let good = tls::client_config(dir.path()).unwrap();
    let mut l = tls::connect(&addr, "127.0.0.1", Some(&good)).unwrap();
    send(
        &mut l,
        &Msg::Hello {
            volume: "another-volume".into(),
            last_common: 0,
        },
    )
    .unwrap();
    match recv(&mut l) {
        Ok((Msg::Error { text }, _)) => assert!(text.contains("another-volume"), "{text}"),
        r => panic!("wrong volume accepted: {r:?}"),
    }
    drop(l);
    std::thread::sleep(Duration::from_millis(200));
    untouched("a wrong volume");

    // Out of order: DATA before BEGIN from an authenticated primary.
    let mut l = tls::connect(&addr, "127.0.0.1", Some(&good)).unwrap();
    send(&mut l, &msgs[0]).unwrap();
    assert!(matches!(recv(&mut l).unwrap().0, Msg::Ack { snapshot: 0 }));
    // A plain pool takes no hash references.
    assert_eq!(recv(&mut l).unwrap().0, Msg::Caps { dedup_block: 0 });
    send(&mut l, &msgs[2]).unwrap();
    let _ = l.flush();
    assert!(
        recv(&mut l).is_err(),
        "DATA before BEGIN ends the connection"
    );
    drop(l);
    std::thread::sleep(Duration::from_millis(200));
    untouched("DATA before BEGIN");

    // The real primary over TLS gets through.
    let pp = pool("primary");
    pp.create_thin(VOL_ID).unwrap();
    let vol = pp.thin(VOL_ID, Bytes(VOL), None).unwrap();
    write_block(&*vol, 5, 42);
    let (pri, pri_h) = start_primary(primary_cfg(&pp, dir.path(), port, Some(dir.path())));
    wait_for("a TLS interval", 20, || sec.status().intervals >= 1);
    pri.stop();
    pri_h.join().unwrap();
    sec.stop();
    sec_h.join().unwrap();
    let (_, sid) = sec.latest().unwrap().unwrap();
    let copy = read_all(&sp, sid);
    let mut want = vec![0u8; BS as usize];
    read_blocking(&*vol, Bytes(5 * BS), &mut want).unwrap();
    assert_eq!(&copy[(5 * BS) as usize..(6 * BS) as usize], &want[..]);
}

/// Sends one interval's messages; returns the COMMIT that matches them.
fn interval(l: &mut TcpStream, snapshot: u64, base: u64, blocks: &[(u64, u8)]) -> Msg {
    send(
        l,
        &Msg::Begin {
            snapshot,
            base,
            volume_size: VOL,
            taken_at: 1,
        },
    )
    .unwrap();
    let mut crc = 0u32;
    for &(b, v) in blocks {
        let m = Msg::Data {
            offset: b * BS,
            bytes: Payload::copy_of(&vec![v; BS as usize]).unwrap(),
        };
        crc = send(l, &m).unwrap().chain(crc);
    }
    Msg::Commit {
        snapshot,
        count: blocks.len() as u64,
        checksum: crc,
    }
}

fn hello(addr: &str, last_common: u64) -> (TcpStream, Msg) {
    let mut l = TcpStream::connect(addr).unwrap();
    let h = Msg::Hello {
        volume: "vol-uuid-1".into(),
        last_common,
    };
    send(&mut l, &h).unwrap();
    let ack = recv(&mut l).unwrap().0;
    if matches!(ack, Msg::Ack { .. }) {
        let caps = recv(&mut l).unwrap().0;
        assert!(matches!(caps, Msg::Caps { .. }), "{caps:?}");
    }
    (l, ack)
}

#[test]
fn an_interval_cut_halfway_or_with_a_bad_checksum_never_reaches_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let sp = pool("secondary");
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let (sec, sec_h) = start_secondary(secondary_cfg(&sp, dir.path(), None), l);
    let block = |id: ThinId, b: u64| read_all(&sp, id)[(b * BS) as usize] as u64;

    // A full copy: snapshot 1 holds block 0.
    let (mut c, ack) = hello(&addr, 0);
    assert_eq!(ack, Msg::Ack { snapshot: 0 });
    let commit = interval(&mut c, 1, 0, &[(0, 11)]);
    send(&mut c, &commit).unwrap();
    assert_eq!(recv(&mut c).unwrap().0, Msg::Ack { snapshot: 1 });
    drop(c);

    // Interval 2 is cut after its DATA.
    let (mut c, _) = hello(&addr, 1);
    interval(&mut c, 2, 1, &[(5, 22)]);
    drop(c);

    // Interval 3 with a wrong checksum: refused, no ACK.
    let (mut c, ack) = hello(&addr, 1);
    assert_eq!(
        ack,
        Msg::Ack { snapshot: 1 },
        "the cut interval is not complete"
    );
    let Msg::Commit {
        snapshot, count, ..
    } = interval(&mut c, 3, 1, &[(6, 33)])
    else {
        unreachable!()
    };
    let bad = Msg::Commit {
        snapshot,
        count,
        checksum: 0x1234_5678,
    };
    send(&mut c, &bad).unwrap();
    assert!(recv(&mut c).is_err(), "a bad checksum gets no ACK");
    drop(c);

    // Interval 4 completes from snapshot 1: none of the bytes of 2 or 3 leaked into it.
    let (mut c, ack) = hello(&addr, 1);
    assert_eq!(ack, Msg::Ack { snapshot: 1 });
    let commit = interval(&mut c, 4, 1, &[(7, 44)]);
    send(&mut c, &commit).unwrap();
    assert_eq!(recv(&mut c).unwrap().0, Msg::Ack { snapshot: 4 });
    drop(c);
    sec.stop();
    sec_h.join().unwrap();
    let (snap, id) = sec.latest().unwrap().unwrap();
    assert_eq!(snap, 4);
    assert_eq!(
        [block(id, 0), block(id, 5), block(id, 6), block(id, 7)],
        [11, 0, 0, 44]
    );
    // Only the latest complete snapshot and the copy are left in the pool.
    assert_eq!(
        sp.devices().unwrap().len(),
        2,
        "{:?}",
        sp.devices().unwrap()
    );
}

/// Plays a secondary for one connection: answers HELLO with `holds`, then ACKs the
/// intervals while `ack` says so; returns each BEGIN's (snapshot, base) and the HELLO's
/// last common snapshot.
fn fake_secondary(
    l: &TcpListener,
    holds: u64,
    ack: impl Fn(u64) -> bool,
) -> (u64, Vec<(u64, u64)>) {
    let (mut c, _) = l.accept().unwrap();
    let Msg::Hello { last_common, .. } = recv(&mut c).unwrap().0 else {
        panic!("no HELLO")
    };
    send(&mut c, &Msg::Ack { snapshot: holds }).unwrap();
    send(&mut c, &Msg::Caps { dedup_block: 0 }).unwrap();
    let mut begins = Vec::new();
    loop {
        match recv(&mut c).map(|m| m.0) {
            Ok(Msg::Begin { snapshot, base, .. }) => begins.push((snapshot, base)),
            Ok(Msg::Commit { snapshot, .. }) => {
                if !ack(snapshot) {
                    return (last_common, begins);
                }
                send(&mut c, &Msg::Ack { snapshot }).unwrap();
            }
            Ok(_) => {}
            Err(_) => return (last_common, begins),
        }
    }
}

#[test]
fn a_primary_restarted_after_a_lost_ack_resumes_from_the_snapshot_the_secondary_completed() {
    let dir = tempfile::tempdir().unwrap();
    let pp = pool("primary");
    pp.create_thin(VOL_ID).unwrap();
    let vol = pp.thin(VOL_ID, Bytes(VOL), None).unwrap();
    write_block(&*vol, 1, 5);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (pri, pri_h) = start_primary(primary_cfg(&pp, dir.path(), port, None));
    // Snapshot 1 is acknowledged; 2 is committed by the "secondary" but its ACK is lost.
    let (hello, begins) = fake_secondary(&l, 0, |s| s < 2);
    assert_eq!((hello, begins), (0, vec![(1, 0), (2, 1)]));
    pri.stop();
    pri_h.join().unwrap();
    drop(pri);

    // A new primary process: it knows 1 as common, the secondary holds 2.
    let (pri, pri_h) = start_primary(primary_cfg(&pp, dir.path(), port, None));
    let (hello, begins) = fake_secondary(&l, 2, |s| s < 4);
    pri.stop();
    pri_h.join().unwrap();
    assert_eq!(hello, 1);
    assert_eq!(
        begins[..2],
        [(3, 2), (4, 3)],
        "incremental from 2, not a full copy"
    );
    let st = State::load(&dir.path().join("primary.json")).unwrap();
    assert_eq!((st.snapshot, st.pending_snapshot), (3, 4));
    // Only the volume, the acknowledged and the pending snapshot are left.
    assert_eq!(
        pp.devices().unwrap().len(),
        3,
        "{:?}",
        pp.devices().unwrap()
    );
}

#[test]
fn blocks_a_dedup_secondary_holds_are_sent_as_hashes_not_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let pp = pool("primary");
    // The secondary: a dedup pool (4 KiB blocks, no byte comparison), already holding the
    // contents of the volume's first 32 blocks in another thin device, at other offsets.
    let sp = {
        let o = PoolOptions {
            data_block_sectors: 8,
            commit_interval: None,
            error_if_no_space: true,
            dedup: true,
            ..PoolOptions::default()
        };
        let meta = Arc::new(MemDevice::new("dd-meta", Bytes(16 << 20)));
        let data = Arc::new(MemDevice::new("dd-data", Bytes(128 << 20)));
        iort::block_on(Pool::open(meta, data, o)).unwrap().unwrap()
    };
    assert!(sp.takes_hash_refs());
    pp.create_thin(VOL_ID).unwrap();
    let v = pp.thin(VOL_ID, Bytes(VOL), None).unwrap();
    for b in 0..64 {
        write_block(&*v, b, 0xabc0 + b);
    }
    drop(v);
    sp.create_thin(ThinId(50)).unwrap();
    let other = sp.thin(ThinId(50), Bytes(VOL), None).unwrap();
    let src = pp.thin(VOL_ID, Bytes(VOL), None).unwrap();
    let mut buf = vec![0u8; BS as usize];
    for b in 0..32u64 {
        read_blocking(&*src, Bytes(b * BS), &mut buf).unwrap();
        write_blocking(&*other, Bytes((200 - b) * BS), &buf, WriteFlags::default()).unwrap();
    }
    drop((other, src));
    iort::block_on(sp.commit()).unwrap().unwrap();

    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (s, sh) = start_secondary(secondary_cfg(&sp, dir.path(), None), l);
    let (p, ph) = start_primary(primary_cfg(&pp, dir.path(), port, None));
    wait_for("the first snapshot", 30, || {
        s.status().last_synced_snapshot > 0
    });
    p.stop();
    ph.join().unwrap();
    s.stop();
    sh.join().unwrap();
    let (ps, ss) = (p.status(), s.status());
    // 32 blocks referenced, 32 shipped as bytes (and nothing else mapped).
    assert_eq!(ps.bytes_referenced, 32 * BS, "{ps:?}");
    assert_eq!(ps.bytes_shipped, 32 * BS, "{ps:?}");
    assert_eq!(ss.bytes_referenced, 32 * BS, "{ss:?}");
    let (_, snap) = s.latest().unwrap().unwrap();
    assert!(
        read_all(&sp, snap) == read_all(&pp, VOL_ID),
        "the secondary's snapshot differs from the primary's volume"
    );
}

/// A primary that stops on purpose says BYE; the secondary remembers it across its own
/// restart (promote then needs no --force), and forgets it once a primary connects again.
#[test]
fn a_primary_s_bye_outlives_a_secondary_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (pp, sp) = (pool("primary"), pool("secondary"));
    pp.create_thin(VOL_ID).unwrap();
    let vol = pp.thin(VOL_ID, Bytes(VOL), None).unwrap();
    write_block(&*vol, 3, 1);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (sec, sec_h) = start_secondary(secondary_cfg(&sp, dir.path(), None), l);
    let (pri, pri_h) = start_primary(primary_cfg(&pp, dir.path(), port, None));
    wait_for("the first snapshot", 30, || sec.status().intervals >= 1);
    assert!(!sec.primary_stopped(), "a primary is connected");
    pri.stop();
    pri_h.join().unwrap();
    wait_for("the BYE", 10, || sec.primary_stopped());
    sec.stop();
    sec_h.join().unwrap();

    // The secondary restarts: it still knows the primary stopped on purpose.
    let l = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let (sec, sec_h) = start_secondary(secondary_cfg(&sp, dir.path(), None), l);
    assert!(sec.primary_stopped(), "the BYE was forgotten in a restart");
    // A primary connects again: no longer stopped, and a restart does not bring it back.
    let (pri, pri_h) = start_primary(primary_cfg(&pp, dir.path(), port, None));
    wait_for("the primary back", 30, || !sec.primary_stopped());
    sec.stop();
    sec_h.join().unwrap();
    let again = Secondary::new(secondary_cfg(&sp, dir.path(), None)).unwrap();
    assert!(
        !again.primary_stopped(),
        "a BYE from before the reconnection came back"
    );
    pri.stop();
    pri_h.join().unwrap();
}
