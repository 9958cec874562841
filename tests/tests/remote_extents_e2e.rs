//! Tables over remote NBD extents, served by the daemon and exported over NBD: placement
//! against dm's, ext4 with fsck, raid1 with a remote leg that dies and comes back, a thin pool
//! on a remote data device, a server restart under fio verify, and a garbage-talking server
//! that harms nobody else.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::*;

fn tmp(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/var/tmp")
        .unwrap()
}

fn table(dir: &Path, name: &str, text: &str) -> String {
    let t = dir.join(format!("{name}.table"));
    std::fs::write(&t, text).unwrap();
    t.to_string_lossy().into_owned()
}

fn nbdkit_file(file: &Path) -> (PeerServer, u16) {
    let port = free_port();
    let s = PeerServer::nbdkit(port, &["file", &format!("file={}", file.display())]);
    (s, port)
}

#[test]
fn striped_over_three_nbdkits_places_chunks_as_dm_does() {
    require_tools(&["nbdkit", "qemu-io"]);
    let dir = tmp("remote-striped-");
    let p = dir.path();
    let d = DaemonProc::start(&p.join("state"));
    let mut servers = Vec::new();
    let mut legs = Vec::new();
    for i in 0..3 {
        let f = p.join(format!("leg{i}.img"));
        sparse_file(&f, 8 << 20).unwrap();
        let (s, port) = nbdkit_file(&f);
        servers.push(s);
        legs.push((f, port));
    }
    // 64 KiB chunks (128 sectors), 24 MiB.
    let mut t = String::from("0 49152 striped 3 128");
    for (_, port) in &legs {
        t.push_str(&format!(" nbd://127.0.0.1:{port}/ 0"));
    }
    let port = d.create_nbd("st", Path::new(&table(p, "st", &(t + "\n"))));
    let uri = format!("nbd://127.0.0.1:{port}/st");
    let cmds: Vec<String> = (0..12)
        .map(|k| format!("write -P {} {} 64k", k + 1, k * 65536))
        .collect();
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&uri, &refs);
    qemu_io(&uri, &["flush"]);
    for k in 0..12usize {
        let (file, _) = &legs[k % 3];
        let bytes = read_all(file).unwrap();
        let at = (k / 3) * 65536;
        assert!(
            bytes[at..at + 65536].iter().all(|&b| b == (k + 1) as u8),
            "chunk {k} is not at leg {} offset {at}",
            k % 3
        );
    }
    let st = d.ok(&["dev", "status", "st"]);
    assert_eq!(st.matches("extent nbd://").count(), 3, "{st}");
    // An unreachable server is named, with the reason, and nothing is created.
    let dead = format!("nbd://127.0.0.1:{}/?connect-timeout=2", free_port());
    let t = table(p, "dead", &format!("0 2048 linear {dead} 0\n"));
    let e = d.err(&[
        "dev",
        "create",
        "dead",
        "--table",
        &t,
        "--nbd",
        "127.0.0.1:0",
    ]);
    assert!(e.contains(&dead) && e.contains("Connection refused"), "{e}");
    assert!(!d.ok(&["dev", "list"]).contains("dead"));
    assert!(st.contains(" up server 127.0.0.1:"), "{st}");
    let js: serde_json::Value = serde_json::from_str(&d.ok(&["dev", "list", "--json"])).unwrap();
    let ext = &js[0]["extents"];
    assert_eq!(ext.as_array().map(Vec::len), Some(3), "{js}");
    assert_eq!(ext[0]["state"], "up", "{js}");
    drop(servers);
}

#[test]
fn ext4_on_a_linear_over_qemu_nbd_is_clean() {
    require_root();
    require_tools(&[
        "qemu-nbd",
        "qemu-storage-daemon",
        "mkfs.ext4",
        "e2fsck",
        "losetup",
    ]);
    let dir = tmp("remote-ext4-");
    let p = dir.path();
    let d = DaemonProc::start(&p.join("state"));
    let f = p.join("remote.img");
    sparse_file(&f, 128 << 20).unwrap();
    let sport = free_port();
    let _s = PeerServer::qemu_nbd(sport, &f);
    let t = table(
        p,
        "lin",
        &format!("0 262144 linear nbd://127.0.0.1:{sport}/disk 0\n"),
    );
    let port = d.create_nbd("lin", Path::new(&t));
    let fl = FuseLoop::attach(port, "lin", p).unwrap();
    let mnt = p.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    run_ok(Command::new("mkfs.ext4").args(["-F", "-q", &fl.loopdev])).unwrap();
    run_ok(Command::new("mount").arg(&fl.loopdev).arg(&mnt)).unwrap();
    for i in 0..30 {
        std::fs::write(
            mnt.join(format!("f{i}")),
            pseudo_random(100_000 + i * 777, i as u64),
        )
        .unwrap();
    }
    let before = tree_sums(&mnt, ".");
    run_ok(Command::new("umount").arg(&mnt)).unwrap();
    let fsck = run(Command::new("e2fsck").args(["-fn", &fl.loopdev])).unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    run_ok(Command::new("mount").arg(&fl.loopdev).arg(&mnt)).unwrap();
    assert_eq!(tree_sums(&mnt, "."), before);
    run_ok(Command::new("umount").arg(&mnt)).unwrap();
    drop(fl);
}

/// Polls `dev status NAME` until `want` appears in it.
fn wait_status(d: &DaemonProc, name: &str, want: &str, secs: u64) -> String {
    let t0 = Instant::now();
    loop {
        let st = d.ok(&["dev", "status", name]);
        if st.contains(want) {
            return st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "{name} never showed '{want}': {st}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A raid1 `r1` (no metadata devices) over a local file leg and a remote leg served by
/// `nbdkit ARGS` (the remote file is `remote.img`, given to `args` by the caller); returns the
/// server, its port, our export's URI and the two leg files.
struct Raid1Rig {
    srv: PeerServer,
    rport: u16,
    uri: String,
    local: std::path::PathBuf,
    remote: std::path::PathBuf,
}

fn raid1_rig(
    p: &Path,
    d: &DaemonProc,
    args: impl Fn(&Path) -> Vec<String>,
    opts: &str,
) -> Raid1Rig {
    let local = p.join("local.img");
    let remote = p.join("remote.img");
    sparse_file(&local, 32 << 20).unwrap();
    sparse_file(&remote, 32 << 20).unwrap();
    let rport = free_port();
    let a = args(&remote);
    let refs: Vec<&str> = a.iter().map(String::as_str).collect();
    let srv = PeerServer::nbdkit(rport, &refs);
    let t = table(
        p,
        "r1",
        &format!(
            "0 61440 raid raid1 3 0 region_size 1024 2 - {} - nbd://127.0.0.1:{rport}/{opts}\n",
            local.display()
        ),
    );
    let port = d.create_nbd("r1", Path::new(&t));
    wait_status(d, "r1", " AA ", 60);
    Raid1Rig {
        srv,
        rport,
        uri: format!("nbd://127.0.0.1:{port}/r1"),
        local,
        remote,
    }
}

#[test]
fn raid1_with_a_remote_leg_degrades_when_the_link_dies_and_rebuilds_onto_it() {
    require_tools(&["nbdkit", "qemu-io"]);
    let dir = tmp("remote-raid1-");
    let p = dir.path();
    let d = DaemonProc::start(&p.join("state"));
    let file_arg = |f: &Path| vec!["file".to_string(), format!("file={}", f.display())];
    let opts = "?timeout=2&reconnect-delay=1&connect-timeout=1";
    let Raid1Rig {
        mut srv,
        rport,
        uri,
        local,
        remote,
    } = raid1_rig(p, &d, file_arg, opts);
    qemu_io(&uri, &["write -P 0x11 0 1M", "flush"]);

    // The remote server dies for good: writes go on without an error, the leg is failed.
    srv.kill();
    qemu_io(&uri, &["write -P 0x22 1M 1M", "flush", "read -P 0x11 0 1M"]);
    wait_status(&d, "r1", " AD ", 30);
    let st = wait_status(&d, "r1", " failed server", 30);
    assert!(st.contains("Connection refused"), "{st}");

    // It comes back (same disk): the extent reconnects and the raid rebuilds onto it by
    // itself; then both legs hold every write.
    let _srv2 = PeerServer::nbdkit(rport, &["file", &format!("file={}", remote.display())]);
    wait_status(&d, "r1", " up server", 20);
    wait_status(&d, "r1", " AA ", 120);
    assert!(
        d.log().contains("reachable again: rebuilding"),
        "{}",
        d.log()
    );
    qemu_io(&uri, &["read -P 0x11 0 1M", "read -P 0x22 1M 1M"]);
    let l = read_all(&local).unwrap();
    let r = read_all(&remote).unwrap();
    assert!(
        l[..2 << 20] == r[..2 << 20],
        "the legs differ after the rebuild"
    );
    assert!(r[(1 << 20)..(2 << 20)].iter().all(|&b| b == 0x22));
}

#[test]
fn raid1_leg_behind_an_error_filter_fails_without_a_client_error() {
    require_tools(&["nbdkit", "qemu-io"]);
    let dir = tmp("remote-errfilter-");
    let p = dir.path();
    let d = DaemonProc::start(&p.join("state"));
    let trigger = p.join("inject");
    let t2 = trigger.clone();
    let filtered = move |f: &Path| {
        vec![
            "--filter=error".to_string(),
            "file".into(),
            format!("file={}", f.display()),
            "error=EIO".into(),
            "error-rate=100%".into(),
            format!("error-file={}", t2.display()),
        ]
    };
    let rig = raid1_rig(p, &d, filtered, "");
    let uri = rig.uri.clone();
    std::fs::write(&trigger, b"").unwrap();
    qemu_io(&uri, &["write -P 0x33 0 2M", "flush", "read -P 0x33 0 2M"]);
    let st = wait_status(&d, "r1", " AD ", 30);
    // A leg that answers errors over a live connection is not taken back.
    std::thread::sleep(Duration::from_secs(2));
    let st2 = d.ok(&["dev", "status", "r1"]);
    assert!(st2.contains(" AD "), "{st2}");
    // The connection itself stayed up: the server answered with errors.
    assert!(st.contains(" up server"), "{st}");
}

#[test]
fn thin_pool_on_a_remote_data_device() {
    require_tools(&["nbdkit", "qemu-io"]);
    let dir = tmp("remote-thin-");
    let p = dir.path();
    let d = DaemonProc::start(&p.join("state"));
    let meta = p.join("meta.img");
    sparse_file(&meta, 4 << 20).unwrap();
    let dport = free_port();
    let _srv = PeerServer::nbdkit(dport, &["memory", "256M"]);
    let pool = table(
        p,
        "pool",
        &format!(
            "0 524288 thin-pool {} nbd://127.0.0.1:{dport}/ 128 0\n",
            meta.display()
        ),
    );
    d.ok(&["dev", "create", "pool", "--table", &pool, "--internal"]);
    d.ok(&["dev", "message", "pool", "create_thin", "0"]);
    let vol = table(p, "vol", "0 2097152 thin /dev/volmgr/pool 0\n");
    let port = d.create_nbd("vol", Path::new(&vol));
    let uri = format!("nbd://127.0.0.1:{port}/vol");
    qemu_io(
        &uri,
        &[
            "write -P 0x44 0 4M",
            "write -P 0x55 512M 1M",
            "flush",
            "read -P 0x44 0 4M",
            "read -P 0x55 512M 1M",
            "read -P 0 8M 1M",
        ],
    );
    let st = d.ok(&["dev", "status", "pool"]);
    assert!(st.contains("extent nbd://127.0.0.1:"), "{st}");
}

#[test]
fn server_restart_under_fio_verify_is_invisible() {
    require_tools(&["nbdkit", "fio"]);
    let dir = tmp("remote-fio-");
    let p = dir.path();
    let d = DaemonProc::start(&p.join("state"));
    let f = p.join("remote.img");
    sparse_file(&f, 64 << 20).unwrap();
    let (mut srv, sport) = nbdkit_file(&f);
    let t = table(
        p,
        "lin",
        &format!("0 131072 linear nbd://127.0.0.1:{sport}/?timeout=5&reconnect-delay=30 0\n"),
    );
    let port = d.create_nbd("lin", Path::new(&t));
    let t0 = Instant::now();
    let fio = std::thread::spawn(move || {
        Command::new("fio")
            .args([
                "--name=verify",
                "--ioengine=nbd",
                &format!("--uri=nbd://127.0.0.1:{port}/lin"),
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=16",
                "--size=48M",
                // Paced so the writes straddle the server's death and return (about 6 s).
                "--rate_iops=2000",
                "--verify=crc32c",
                "--verify_fatal=1",
                "--do_verify=1",
                "--output-format=terse",
            ])
            .output()
            .unwrap()
    });
    std::thread::sleep(Duration::from_millis(1500));
    srv.kill();
    std::thread::sleep(Duration::from_millis(1500));
    let _srv2 = PeerServer::nbdkit(sport, &["file", &format!("file={}", f.display())]);
    let out = fio.join().unwrap();
    assert!(
        t0.elapsed() > Duration::from_secs(4),
        "fio ended before the restart"
    );
    assert!(
        out.status.success(),
        "fio: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let st = d.ok(&["dev", "status", "lin"]);
    assert!(
        st.contains("reconnects 1"),
        "the restart was not seen: {st}"
    );
}

#[test]
fn a_server_talking_garbage_harms_only_its_device() {
    require_tools(&["nbdkit", "qemu-io"]);
    let dir = tmp("remote-garbage-");
    let p = dir.path();
    let d = DaemonProc::start(&p.join("state"));
    // A fake server: a valid handshake, then garbage for every request.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let gport = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let _ = garbage_session(&mut s);
            });
        }
    });
    let (_good, gp) = {
        let port = free_port();
        (PeerServer::nbdkit(port, &["memory", "16M"]), port)
    };
    let good = table(
        p,
        "good",
        &format!("0 32768 linear nbd://127.0.0.1:{gp}/ 0\n"),
    );
    let good_port = d.create_nbd("good", Path::new(&good));
    let bad = table(
        p,
        "bad",
        &format!("0 2048 linear nbd://127.0.0.1:{gport}/?timeout=1&reconnect-delay=1 0\n"),
    );
    let bad_port = d.create_nbd("bad", Path::new(&bad));
    let o = run(Command::new("timeout").args([
        "60",
        "qemu-io",
        "-f",
        "raw",
        "-c",
        "read 0 4k",
        &format!("nbd://127.0.0.1:{bad_port}/bad"),
    ]))
    .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        text.contains("Input/output error") || text.contains("failed"),
        "{text}"
    );
    let st = d.ok(&["dev", "status", "bad"]);
    assert!(st.contains("protocol violation"), "{st}");
    qemu_io(
        &format!("nbd://127.0.0.1:{good_port}/good"),
        &["write -P 7 0 1M", "read -P 7 0 1M"],
    );
    assert!(
        d.log().contains("protocol violation"),
        "the reason is logged"
    );
}

fn garbage_session(s: &mut std::net::TcpStream) -> std::io::Result<()> {
    use std::io::{Read, Write};
    fake_nbd_handshake(s, 1 << 20)?;
    let mut h = [0u8; 28];
    loop {
        s.read_exact(&mut h)?;
        s.write_all(&[0xeeu8; 40])?;
    }
}

#[test]
fn raid1_leg_on_a_host_cut_off_degrades_without_a_client_error_and_rebuilds() {
    require_root();
    require_tools(&["nbdkit", "qemu-io", "nft"]);
    let dir = tmp("remote-netcut-");
    let p = dir.path();
    let d = DaemonProc::start(&p.join("state"));
    let mut host = netns::NetHost::new();
    let local = p.join("local.img");
    let remote = p.join("remote.img");
    sparse_file(&local, 32 << 20).unwrap();
    sparse_file(&remote, 32 << 20).unwrap();
    let file_arg = format!("file={}", remote.display());
    let addr = host.addr.clone();
    host.spawn(
        "nbdkit",
        &["-f", "-i", &addr, "-p", "10809", "file", &file_arg],
    );
    host.wait_port(10809);
    let ruri = format!("nbd://{addr}/?timeout=1&reconnect-delay=2&connect-timeout=1");
    let t = table(
        p,
        "r1",
        &format!(
            "0 61440 raid raid1 3 0 region_size 1024 2 - {} - {ruri}\n",
            local.display()
        ),
    );
    let port = d.create_nbd("r1", Path::new(&t));
    let uri = format!("nbd://127.0.0.1:{port}/r1");
    wait_status(&d, "r1", " AA ", 60);
    qemu_io(&uri, &["write -P 0x11 0 1M", "flush"]);

    // Every packet to the host is dropped: its requests hang, time out, the link fails after
    // reconnect-delay, the raid fails the leg; the client sees only a pause.
    host.blackhole();
    let t0 = Instant::now();
    qemu_io(&uri, &["write -P 0x22 1M 1M", "flush", "read -P 0x11 0 1M"]);
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "writes stalled {:?}",
        t0.elapsed()
    );
    wait_status(&d, "r1", " AD ", 30);
    let st = d.ok(&["dev", "status", "r1"]);
    assert!(!st.contains(" timeouts 0 "), "{st}");

    // The host is back: the extent reconnects and the raid rebuilds onto it by itself.
    host.restore();
    wait_status(&d, "r1", " up server", 30);
    wait_status(&d, "r1", " AA ", 120);
    qemu_io(&uri, &["read -P 0x11 0 1M", "read -P 0x22 1M 1M"]);
    let r = read_all(&remote).unwrap();
    assert!(
        r[(1 << 20)..(2 << 20)].iter().all(|&b| b == 0x22),
        "not rebuilt"
    );
}
