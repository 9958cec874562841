//! The daemon and the CLI under bad input, hostile clients and crashes: no table, metadata,
//! client or command sequence may crash, hang or mislead the daemon (the hardening issue's
//! reproductions and one test per item that is best seen through the real binary).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::*;
use ublk_target::control::{self, Reply, Request};

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("robust-")
        .tempdir_in("/var/tmp")
        .unwrap()
}

fn write_table(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

fn list_json(d: &DaemonProc) -> serde_json::Value {
    serde_json::from_str(&d.ok(&["dev", "list", "--json"])).unwrap()
}

fn state_of(d: &DaemonProc, name: &str) -> String {
    list_json(d)
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == name)
        .map(|x| x["state"].as_str().unwrap().to_string())
        .unwrap_or_else(|| panic!("{name} not listed"))
}

/// A linear device over a fresh 32 MiB file, exported over NBD with a pattern written at 0.
fn base_device(d: &DaemonProc, dir: &Path, name: &str) -> String {
    let img = dir.join(format!("{name}.img"));
    sparse_file(&img, 32 << 20).unwrap();
    let t = write_table(
        dir,
        &format!("{name}.table"),
        &format!("0 65536 linear {} 0\n", img.display()),
    );
    let port = d.create_nbd(name, Path::new(&t));
    let uri = format!("nbd://127.0.0.1:{port}/{name}");
    qemu_io(&uri, &["write -P 0x5a 0 64k", "flush"]);
    uri
}

fn records(state: &Path) -> Vec<String> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state.join("devices.json")).unwrap())
            .unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_hostile_raid_table_is_refused_and_never_takes_the_daemon_down() {
    require_root();
    let dir = tempdir();
    let d = DaemonProc::start(&dir.path().join("state"));
    let uri = base_device(&d, dir.path(), "keep");
    let (a, b) = (dir.path().join("ra.img"), dir.path().join("rb.img"));
    sparse_file(&a, 64 << 20).unwrap();
    sparse_file(&b, 64 << 20).unwrap();
    let text = format!(
        "0 65536 raid raid1 3 0 region_size 36028797018963968 2 - {} - {}\n",
        a.display(),
        b.display()
    );
    let t = write_table(dir.path(), "raid.table", &text);
    // `table check` runs the checks a build would: the region size is refused up front.
    let o = run(Command::new(volmgr_bin()).args(["table", "check", &t])).unwrap();
    assert!(!o.status.success(), "table check accepted {text}");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("region"), "{e}");
    // Straight to the daemon, bypassing the CLI's own check: an error, and the daemon lives.
    let rep = control::call(
        &d.state.join("control.sock"),
        &Request::Create {
            name: "bad".into(),
            table: text,
            ublk_id: None,
            nbd: Some(format!("127.0.0.1:{}", free_port())),
            nbd_limits: Default::default(),
            internal: false,
            export: None,
        },
    )
    .unwrap();
    assert!(matches!(rep, Reply::Error { .. }), "{rep:?}");
    qemu_io(&uri, &["read -P 0x5a 0 64k"]);
    assert_eq!(records(&d.state), ["keep"]);
}

#[test]
fn a_reload_that_would_read_from_itself_is_refused_and_the_device_keeps_serving() {
    require_root();
    let dir = tempdir();
    let d = DaemonProc::start(&dir.path().join("state"));
    let uri = base_device(&d, dir.path(), "a");
    let t = write_table(dir.path(), "self.table", "0 65536 linear /dev/volmgr/a 0\n");
    let e = d.err(&["dev", "reload", "a", "--table", &t]);
    assert!(e.contains("itself"), "{e}");
    // Through another device too.
    let t2 = write_table(dir.path(), "b.table", "0 65536 linear /dev/volmgr/a 0\n");
    d.create_nbd("b", Path::new(&t2));
    let t3 = write_table(dir.path(), "viab.table", "0 65536 linear /dev/volmgr/b 0\n");
    let e = d.err(&["dev", "reload", "a", "--table", &t3]);
    assert!(e.contains("a -> b -> a"), "{e}");
    let t0 = Instant::now();
    qemu_io(&uri, &["read -P 0x5a 0 64k"]);
    assert!(t0.elapsed() < Duration::from_secs(10));
}

#[test]
fn suspend_then_remove_returns_and_the_daemon_keeps_answering() {
    require_root();
    let dir = tempdir();
    let d = DaemonProc::start(&dir.path().join("state"));
    base_device(&d, dir.path(), "keep");
    let uri = base_device(&d, dir.path(), "b");
    d.ok(&["dev", "suspend", "b"]);
    assert_eq!(state_of(&d, "b"), "suspended");
    let t0 = Instant::now();
    d.ok(&["dev", "remove", "b"]);
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    assert_eq!(records(&d.state), ["keep"]);

    // A client parked at a suspended gate: remove needs --force and fails its request.
    let uri = uri.replace("/b", "/c");
    let _ = uri;
    let cu = base_device(&d, dir.path(), "c");
    d.ok(&["dev", "suspend", "c"]);
    let parked = std::thread::spawn(move || {
        run(Command::new("qemu-io")
            .args(["-f", "raw", "-c", "read 0 4k"])
            .arg(&cu))
        .unwrap()
    });
    std::thread::sleep(Duration::from_millis(500));
    let e = d.err(&["dev", "remove", "c"]);
    assert!(e.contains("--force"), "{e}");
    let t0 = Instant::now();
    d.ok(&["dev", "remove", "c", "--force"]);
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    let o = parked.join().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() || out.contains("failed") || out.contains("error"),
        "the parked read must fail: {out}"
    );
    let t0 = Instant::now();
    let l = list_json(&d);
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(l.as_array().unwrap().len(), 1);
}

#[test]
fn a_raid5_with_a_missing_leg_starts_degraded() {
    require_root();
    let dir = tempdir();
    let d = DaemonProc::start(&dir.path().join("state"));
    let mut legs = Vec::new();
    for i in 0..3 {
        let (m, x) = (
            dir.path().join(format!("m{i}.img")),
            dir.path().join(format!("d{i}.img")),
        );
        sparse_file(&m, 4 << 20).unwrap();
        sparse_file(&x, 32 << 20).unwrap();
        legs.push(format!("{} {}", m.display(), x.display()));
    }
    legs.insert(1, "- -".into());
    let t = write_table(
        dir.path(),
        "r5.table",
        &format!("0 131072 raid raid5_ls 1 128 4 {}\n", legs.join(" ")),
    );
    let port = d.create_nbd("r5", Path::new(&t));
    let uri = format!("nbd://127.0.0.1:{port}/r5");
    qemu_io(&uri, &["write -P 0x33 0 1M", "read -P 0x33 0 1M", "flush"]);
    let st = d.ok(&["dev", "status", "r5"]);
    assert!(st.contains(" ADAA "), "leg 1 must show as failed: {st}");
    assert!(d.ok(&["dev", "table", "r5"]).contains(" - - "));
}

#[test]
fn a_kill_during_restore_loses_no_device_record() {
    require_root();
    let dir = tempdir();
    let state = dir.path().join("state");
    let d = DaemonProc::start(&state);
    let mut want = Vec::new();
    for i in 0..24 {
        let img = dir.path().join(format!("{i}.img"));
        sparse_file(&img, 1 << 20).unwrap();
        let t = write_table(
            dir.path(),
            &format!("{i}.table"),
            &format!("0 2048 linear {} 0\n", img.display()),
        );
        let name = format!("v{i:02}");
        d.create_nbd(&name, Path::new(&t));
        want.push(name);
    }
    drop(d); // SIGKILL: a crash with every device up.
             // One backing file goes missing before the next start.
    std::fs::remove_file(dir.path().join("7.img")).unwrap();
    // Crash again and again, at random points of the restore.
    for i in 0..8u64 {
        let mut d = DaemonProc::spawn(&state, &[]);
        std::thread::sleep(Duration::from_millis(5 + (i * 37) % 120));
        d.kill9();
        assert_eq!(records(&state), want, "after a kill {}", d.log());
    }
    let mut d = DaemonProc::start(&state);
    let t0 = Instant::now();
    while list_json(&d)
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x["state"] == "pending" || x["state"] == "building")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "restore did not finish"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let l = list_json(&d);
    for x in l.as_array().unwrap() {
        let want_state = if x["name"] == "v07" {
            "failed"
        } else {
            "active"
        };
        assert_eq!(x["state"], want_state, "{x}");
    }
    let failed = l
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "v07")
        .unwrap();
    assert!(
        failed["error"].as_str().unwrap().contains("7.img"),
        "{failed}"
    );
    // The record stays; once the file is back, a retry brings the device up.
    sparse_file(&dir.path().join("7.img"), 1 << 20).unwrap();
    d.ok(&["dev", "retry", "v07"]);
    assert_eq!(state_of(&d, "v07"), "active");
    assert_eq!(records(&state), want);
    assert_eq!(d.terminate(), 0);
}

#[test]
fn sigterm_with_a_suspended_device_and_a_parked_client_exits_promptly() {
    require_root();
    let dir = tempdir();
    let mut d = DaemonProc::start(&dir.path().join("state"));
    let uri = base_device(&d, dir.path(), "s");
    d.ok(&["dev", "suspend", "s"]);
    let parked = std::thread::spawn(move || {
        run(Command::new("qemu-io")
            .args(["-f", "raw", "-c", "read 0 4k"])
            .arg(&uri))
        .unwrap()
    });
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    assert_eq!(d.terminate(), 0, "{}", d.log());
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    parked.join().unwrap();
    // The record is kept for the next start.
    assert_eq!(records(&d.state), ["s"]);
}

#[test]
fn sigterm_during_restore_is_honoured() {
    require_root();
    let dir = tempdir();
    let state = dir.path().join("state");
    let d = DaemonProc::start(&state);
    for i in 0..24 {
        let img = dir.path().join(format!("{i}.img"));
        sparse_file(&img, 1 << 20).unwrap();
        let t = write_table(
            dir.path(),
            &format!("{i}.table"),
            &format!("0 2048 linear {} 0\n", img.display()),
        );
        d.create_nbd(&format!("v{i:02}"), Path::new(&t));
    }
    drop(d);
    let mut d = DaemonProc::spawn(&state, &[]);
    // SIGTERM must arrive once the daemon takes it (it blocks it first thing, before the
    // restore), not while the loader still maps its libraries (librbd's take a while on a
    // busy machine): wait for the block, then stop it at once.
    let pid = d.pid().expect("daemon pid");
    let t0 = Instant::now();
    while !sigterm_blocked(pid) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the daemon never blocked SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let t0 = Instant::now();
    let code = d.terminate();
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    assert!(code == 0 || code == 1, "exit {code}: {}", d.log());
    assert_eq!(records(&state).len(), 24);
}

/// Whether process `pid`'s main thread blocks SIGTERM (`SigBlk` in /proc/PID/status).
fn sigterm_blocked(pid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigBlk:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .is_some_and(|m| m & (1 << (libc::SIGTERM - 1)) != 0)
}

/// Sends raw bytes to a control socket; returns the reply line.
fn raw(sock: &Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let _ = s.write_all(bytes);
    let mut line = String::new();
    let _ = BufReader::new(&s).read_line(&mut line);
    line
}

#[test]
fn the_control_socket_shrugs_off_garbage_and_stuck_clients() {
    require_root();
    let dir = tempdir();
    let d = DaemonProc::start(&dir.path().join("state"));
    base_device(&d, dir.path(), "a");
    let sock = d.state.join("control.sock");
    // Clients that connect and say nothing, or half a request.
    let mut stuck: Vec<UnixStream> = (0..12)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    for s in stuck.iter_mut().take(4) {
        s.write_all(b"{\"op\":\"li").unwrap();
    }
    let t0 = Instant::now();
    assert_eq!(list_json(&d).as_array().unwrap().len(), 1);
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert!(raw(&sock, b"\xff\xfe garbage\n").contains("malformed request"));
    assert!(raw(&sock, b"{\"op\":\"create\"}\n").contains("malformed request"));
    assert!(raw(&sock, &vec![b'['; 5 << 20]).contains("larger than"));
    // The stuck ones are cut off after the client timeout (10 s), not kept forever.
    let mut cut = 0;
    for mut s in stuck {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut b = String::new();
        let _ = BufReader::new(&mut s).read_line(&mut b);
        cut += 1;
    }
    assert_eq!(cut, 12);
    assert_eq!(list_json(&d).as_array().unwrap().len(), 1);
}

#[test]
fn a_daemon_that_could_not_restore_a_device_exits_non_zero() {
    require_root();
    let dir = tempdir();
    let state = dir.path().join("state");
    let img = dir.path().join("gone.img");
    sparse_file(&img, 1 << 20).unwrap();
    let d = DaemonProc::start(&state);
    let t = write_table(
        dir.path(),
        "g.table",
        &format!("0 2048 linear {} 0\n", img.display()),
    );
    d.create_nbd("g", Path::new(&t));
    drop(d);
    std::fs::remove_file(&img).unwrap();
    let mut d = DaemonProc::start(&state);
    assert_eq!(state_of(&d, "g"), "failed");
    let code = d.terminate();
    assert_ne!(code, 0, "{}", d.log());
    assert!(d.log().contains("g is still failed"), "{}", d.log());
}

#[test]
fn relative_table_paths_are_made_absolute_by_the_cli() {
    require_root();
    let dir = tempdir();
    let d = DaemonProc::start(&dir.path().join("state"));
    sparse_file(&dir.path().join("rel.img"), 1 << 20).unwrap();
    std::fs::write(dir.path().join("rel.table"), "0 2048 linear rel.img 0\n").unwrap();
    let port = free_port();
    let o = run(Command::new(volmgr_bin())
        .current_dir(dir.path())
        .env("VOLMGR_STATE_DIR", &d.state)
        .args(["dev", "create", "r", "--table", "rel.table", "--nbd"])
        .arg(format!("127.0.0.1:{port}")))
    .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        d.ok(&["dev", "table", "r"]),
        format!("0 2048 linear {} 0\n", dir.path().join("rel.img").display())
    );
}

#[test]
fn a_pool_repair_that_skips_damage_exits_non_zero() {
    require_root();
    let dir = tempdir();
    let (meta, data) = (dir.path().join("meta.img"), dir.path().join("data.img"));
    sparse_file(&meta, 4 << 20).unwrap();
    sparse_file(&data, 64 << 20).unwrap();
    let mut d = DaemonProc::start(&dir.path().join("state"));
    let t = write_table(
        dir.path(),
        "pool.table",
        &format!(
            "0 131072 thin-pool {} {} 128 0 0\n",
            meta.display(),
            data.display()
        ),
    );
    d.create_nbd("pool", Path::new(&t));
    d.ok(&["dev", "message", "pool", "create_thin", "0"]);
    let tt = write_table(
        dir.path(),
        "thin.table",
        "0 65536 thin /dev/volmgr/pool 0\n",
    );
    let port = d.create_nbd("thin", Path::new(&tt));
    let uri = format!("nbd://127.0.0.1:{port}/thin");
    let writes: Vec<String> = (0..40)
        .map(|i| format!("write -P {i} {}k 4k", i * 384))
        .collect();
    let cmds: Vec<&str> = writes.iter().map(String::as_str).collect();
    qemu_io(&uri, &cmds);
    d.ok(&["dev", "remove", "thin"]);
    d.ok(&["dev", "remove", "pool"]);
    assert_eq!(d.terminate(), 0);

    let vm = |args: &[&str]| run(Command::new(volmgr_bin()).args(args)).unwrap();
    let img = std::fs::read(&meta).unwrap();
    let used: Vec<usize> = (1..img.len() / 4096)
        .filter(|b| img[b * 4096..(b + 1) * 4096].iter().any(|&x| x != 0))
        .collect();
    assert!(!used.is_empty());
    let (bad, out) = (dir.path().join("bad.img"), dir.path().join("out.img"));
    let mut lossy = 0;
    for b in used {
        let mut dmg = img.clone();
        dmg[b * 4096 + 64..b * 4096 + 128].fill(0xa5);
        std::fs::write(&bad, &dmg).unwrap();
        sparse_file(&out, 4 << 20).unwrap();
        let o = vm(&[
            "pool",
            "repair",
            bad.to_str().unwrap(),
            out.to_str().unwrap(),
            "--yes",
        ]);
        let text = String::from_utf8_lossy(&o.stdout);
        let skipped = text.contains("skipped:");
        if skipped {
            lossy += 1;
            assert!(
                !o.status.success(),
                "block {b}: repair skipped damage but exited 0:\n{text}"
            );
            assert!(String::from_utf8_lossy(&o.stderr).contains("lost"));
        } else if o.status.success() {
            // Nothing was lost: the repaired metadata must check clean.
            let c = vm(&["pool", "check", out.to_str().unwrap()]);
            assert!(
                c.status.success(),
                "block {b}: {}",
                String::from_utf8_lossy(&c.stdout)
            );
        }
    }
    assert!(lossy > 0, "no damaged block made repair skip anything");
}

/// The daemon's resident memory, in bytes.
fn rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

/// An NBD client that does the fixed-newstyle handshake by hand (`NBD_OPT_EXPORT_NAME`),
/// then sends `reads` READs of `len` bytes and never reads a reply.
fn hostile_client(
    port: u16,
    export: &str,
    reads: usize,
    len: u32,
) -> std::io::Result<std::net::TcpStream> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello)?;
    s.write_all(&3u32.to_be_bytes())?; // FIXED_NEWSTYLE | NO_ZEROES
    let mut opt = Vec::new();
    opt.extend_from_slice(b"IHAVEOPT");
    opt.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
    opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
    opt.extend_from_slice(export.as_bytes());
    s.write_all(&opt)?;
    let mut info = [0u8; 10]; // size + transmission flags
    s.read_exact(&mut info)?;
    let mut reqs = Vec::new();
    for i in 0..reads {
        reqs.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        reqs.extend_from_slice(&0u16.to_be_bytes()); // flags
        reqs.extend_from_slice(&0u16.to_be_bytes()); // NBD_CMD_READ
        reqs.extend_from_slice(&(i as u64).to_be_bytes()); // cookie
        reqs.extend_from_slice(&0u64.to_be_bytes()); // offset
        reqs.extend_from_slice(&len.to_be_bytes());
    }
    s.write_all(&reqs)?;
    Ok(s)
}

fn raise_nofile(want: u64) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        assert!(
            r.rlim_max >= want,
            "this test needs {want} file descriptors; the hard limit is {}",
            r.rlim_max
        );
        r.rlim_cur = r.rlim_cur.max(want);
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
    }
}

#[test]
fn a_thousand_clients_that_never_read_replies_stay_within_the_nbd_memory_budget() {
    require_root();
    require_tool("qemu-io");
    raise_nofile(4096);
    let dir = tempdir();
    let mut d = DaemonProc::start_with(&dir.path().join("state"), &["--nbd-memory", "64M"]);
    let img = dir.path().join("big.img");
    sparse_file(&img, 256 << 20).unwrap();
    let t = write_table(
        dir.path(),
        "big.table",
        &format!("0 524288 linear {} 0\n", img.display()),
    );
    let port = d.create_nbd("big", Path::new(&t));
    let uri = format!("nbd://127.0.0.1:{port}/big");
    qemu_io(&uri, &["write -P 0x42 0 1M"]);
    let pid = d.pid().unwrap();
    let before = rss(pid);
    // 1,000 connections x 8 READs of 32 MiB: 256 GiB asked for, never taken.
    let mut hostile = Vec::new();
    for _ in 0..1000 {
        match hostile_client(port, "big", 8, 32 << 20) {
            Ok(s) => hostile.push(s),
            Err(e) => panic!("hostile client {}: {e}\n{}", hostile.len(), d.log()),
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    let peak_attack = rss(pid);
    // A well-behaved client still gets service while the others sit there.
    let t0 = Instant::now();
    qemu_io(
        &uri,
        &[
            "read -P 0x42 0 1M",
            "write -P 0x43 1M 64k",
            "read -P 0x43 1M 64k",
        ],
    );
    let served_in = t0.elapsed();
    let after = rss(pid).max(peak_attack);
    drop(hostile);
    let budget = 64u64 << 20;
    let slack = 96u64 << 20;
    eprintln!(
        "daemon RSS: {} MiB before, {} MiB under attack; well-behaved client served in {served_in:?}",
        before >> 20,
        after >> 20
    );
    assert!(
        after <= before + budget + slack,
        "RSS grew from {} to {} MiB (budget 64 MiB + 96 MiB slack)",
        before >> 20,
        after >> 20
    );
    assert!(served_in < Duration::from_secs(30), "{served_in:?}");
    assert_eq!(list_json(&d).as_array().unwrap().len(), 1);
    assert_eq!(d.terminate(), 0, "{}", d.log());
}
