//! In-process tests of the daemon (NBD front ends on loopback, devices over temp files and test
//! targets); `tests/` runs the real binary.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tables::io::ready;
use tables::mem::MemDevice;
use tables::registry::{ArgError, BuildCtx, Registry, TargetKind};
use tables::{BlockDevice, Bytes, DeviceRef, IoError, IoFuture, Sectors, WriteFlags};

use super::*;

/// A RAM device whose flush fails while `FAIL_FLUSH` is set, and whose status panics when its
/// table says `panic`.
struct TestDev {
    mem: MemDevice,
    panic_status: bool,
}

static FAIL_FLUSH: AtomicBool = AtomicBool::new(false);

impl BlockDevice for TestDev {
    fn name(&self) -> String {
        self.mem.name()
    }
    fn size(&self) -> Bytes {
        self.mem.size()
    }
    unsafe fn read<'a>(&'a self, offset: Bytes, buf: &'a mut [u8]) -> IoFuture<'a> {
        self.mem.read(offset, buf)
    }
    unsafe fn write<'a>(&'a self, offset: Bytes, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a> {
        self.mem.write(offset, buf, flags)
    }
    fn flush(&self) -> IoFuture<'_> {
        if FAIL_FLUSH.load(Ordering::SeqCst) {
            return ready(Err(IoError::eio("test: flush fails")));
        }
        self.mem.flush()
    }
    fn discard(&self, offset: Bytes, len: Bytes) -> IoFuture<'_> {
        self.mem.discard(offset, len)
    }
    fn write_zeroes(&self, offset: Bytes, len: Bytes, flags: WriteFlags) -> IoFuture<'_> {
        self.mem.write_zeroes(offset, len, flags)
    }
    fn status(&self) -> String {
        assert!(!self.panic_status, "test: status panics");
        "test".into()
    }
}

/// `testdev [panic]`.
struct TestKind;

impl TargetKind for TestKind {
    fn name(&self) -> &'static str {
        "testdev"
    }
    fn device_args(&self, _args: &[String]) -> Vec<usize> {
        Vec::new()
    }
    fn validate(&self, _len: Sectors, args: &[String]) -> Result<(), ArgError> {
        match args {
            [] => Ok(()),
            [p] if p == "panic" => Ok(()),
            _ => Err(ArgError::whole("testdev [panic]")),
        }
    }
    fn build(&self, ctx: &BuildCtx<'_>, args: &[String]) -> Result<DeviceRef, ArgError> {
        Ok(Arc::new(TestDev {
            mem: MemDevice::new("testdev", ctx.len.bytes()),
            panic_status: !args.is_empty(),
        }))
    }
}

fn registry() -> Registry {
    let mut r = tables::targets::builtin_registry();
    r.register(Arc::new(TestKind));
    raid::register(&mut r);
    r
}

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }
    fn file(&self, name: &str, size: u64) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::File::create(&p).unwrap().set_len(size).unwrap();
        p
    }
    fn open(&self) -> Arc<Daemon> {
        let mut cfg = DaemonConfig::new(self.state());
        cfg.ublk_available = false;
        cfg.io_timeout = Duration::from_secs(2);
        Arc::new(Daemon::open(cfg, registry(), Arc::new(extents::FileResolver::default())).unwrap())
    }
}

fn rec(name: &str, table: &str) -> PersistedDevice {
    PersistedDevice {
        name: name.into(),
        table: table.into(),
        ublk_id: None,
        nbd: Some("127.0.0.1:0".into()),
        nbd_limits: Default::default(),
        internal: false,
        export: None,
    }
}

fn linear(p: &Path) -> String {
    format!("0 2048 linear {} 0\n", p.display())
}

fn ok(r: Reply) -> String {
    match r {
        Reply::Ok { text } => text,
        other => panic!("expected Ok, got {other:?}"),
    }
}

fn err(r: Reply) -> String {
    match r {
        Reply::Error { message } => message,
        other => panic!("expected an error, got {other:?}"),
    }
}

fn list(d: &Daemon) -> Vec<DeviceInfo> {
    match d.handle(Request::List) {
        Reply::Devices { devices } => devices,
        other => panic!("{other:?}"),
    }
}

fn states(d: &Daemon) -> Vec<(String, String)> {
    list(d).into_iter().map(|i| (i.name, i.state)).collect()
}

fn create(d: &Daemon, name: &str, table: &str) -> Reply {
    d.handle(Request::Create {
        name: name.into(),
        table: table.into(),
        ublk_id: None,
        nbd: Some("127.0.0.1:0".into()),
        nbd_limits: Default::default(),
        internal: false,
        export: None,
    })
}

/// Whether a 3-leg raid1 status shows leg 1 failed and the others live (`A`, or `a` while the
/// array's first resync runs).
fn leg_1_missing(status: &str) -> bool {
    let w: Vec<&str> = status.split_whitespace().collect();
    w.windows(3).any(|v| {
        let h: Vec<char> = v[2].chars().collect();
        v[0] == "raid1" && v[1] == "3" && h.len() == 3 && h[1] == 'D' && h[0] != 'D' && h[2] != 'D'
    })
}

fn names(recs: &[PersistedDevice]) -> Vec<&str> {
    recs.iter().map(|r| r.name.as_str()).collect()
}

#[test]
fn a_device_that_cannot_be_restored_keeps_its_record_and_can_be_retried() {
    let f = Fixture::new();
    let (a, c) = (f.file("a.img", 1 << 20), f.file("c.img", 1 << 20));
    let missing = f.dir.path().join("b.img");
    std::fs::create_dir_all(f.state()).unwrap();
    let recs = vec![
        rec("a", &linear(&a)),
        rec("b", &linear(&missing)),
        rec("c", &linear(&c)),
    ];
    state::save(&f.state().join("devices.json"), &recs).unwrap();

    let d = f.open();
    let problems = d.restore().unwrap();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("b.img"), "{problems:?}");
    assert_eq!(
        states(&d),
        [("a", "active"), ("b", "failed"), ("c", "active")].map(|(n, s)| (n.into(), s.into()))
    );
    let b = list(&d).into_iter().find(|i| i.name == "b").unwrap();
    assert!(b.error.unwrap().contains("b.img"));
    // Every record is still on disk, in creation order.
    assert_eq!(names(&d.load_state().unwrap()), ["a", "b", "c"]);
    // The recorded table is still shown.
    assert_eq!(
        ok(d.handle(Request::Table { name: "b".into() })),
        linear(&missing)
    );
    assert_eq!(d.failed_devices().len(), 1);

    // Retry fails again (still missing), then works once the file exists.
    assert!(err(d.handle(Request::Retry { name: "b".into() })).contains("b.img"));
    f.file("b.img", 1 << 20);
    assert!(ok(d.handle(Request::Retry { name: "b".into() })).starts_with("nbd://"));
    assert!(states(&d).iter().all(|(_, s)| s == "active"));
    assert!(d.failed_devices().is_empty());
    assert!(d.shutdown().is_empty());
    assert_eq!(names(&d.load_state().unwrap()), ["a", "b", "c"]);
}

#[test]
fn a_stop_during_restore_leaves_every_record_in_place() {
    let f = Fixture::new();
    let files: Vec<PathBuf> = (0..3)
        .map(|i| f.file(&format!("{i}.img"), 1 << 20))
        .collect();
    std::fs::create_dir_all(f.state()).unwrap();
    let recs: Vec<PersistedDevice> = files
        .iter()
        .enumerate()
        .map(|(i, p)| rec(&format!("d{i}"), &linear(p)))
        .collect();
    state::save(&f.state().join("devices.json"), &recs).unwrap();
    let d = f.open();
    d.request_stop();
    let problems = d.restore().unwrap();
    assert!(
        problems.iter().any(|p| p.contains("interrupted")),
        "{problems:?}"
    );
    assert!(
        states(&d).iter().all(|(_, s)| s == "pending"),
        "{:?}",
        states(&d)
    );
    assert_eq!(names(&d.load_state().unwrap()), ["d0", "d1", "d2"]);
    // The control socket is not even bound after a stop request.
    d.serve_control().unwrap();
    assert!(d.shutdown().is_empty());
    assert_eq!(names(&d.load_state().unwrap()), ["d0", "d1", "d2"]);
}

#[test]
fn restore_brings_devices_up_after_the_devices_they_use() {
    let f = Fixture::new();
    let a = f.file("a.img", 1 << 20);
    std::fs::create_dir_all(f.state()).unwrap();
    // `upper` was recorded first (a reload pointed it at `base` later).
    let recs = vec![
        rec("upper", "0 1024 linear /dev/volmgr/base 1024\n"),
        rec("base", &linear(&a)),
    ];
    state::save(&f.state().join("devices.json"), &recs).unwrap();
    let d = f.open();
    assert!(d.restore().unwrap().is_empty());
    assert!(
        states(&d).iter().all(|(_, s)| s == "active"),
        "{:?}",
        states(&d)
    );
    // Creation order is kept for listing and for devices.json.
    assert_eq!(names(&d.load_state().unwrap()), ["upper", "base"]);
    assert!(d.shutdown().is_empty());
}

/// A raid whose leg could not be brought back at start (its host is down) comes up degraded,
/// without that leg, serving what the others hold; its record keeps the degraded table. A
/// device that cannot run without what failed still fails, naming it.
#[test]
fn a_raid_over_a_device_that_fails_at_start_comes_up_degraded() {
    let f = Fixture::new();
    let files: Vec<PathBuf> = (0..3)
        .map(|i| f.file(&format!("d{i}.img"), 1 << 20))
        .collect();
    let gone = f.dir.path().join("gone.img");
    std::fs::create_dir_all(f.state()).unwrap();
    let mut recs = Vec::new();
    for (i, p) in files.iter().enumerate() {
        let mut r = rec(&format!("leg{i}"), &linear(p));
        r.nbd = None;
        r.internal = true;
        // Leg 1's storage is gone.
        if i == 1 {
            r.table = linear(&gone);
        }
        recs.push(r);
    }
    let legs = "- /dev/volmgr/leg0 - /dev/volmgr/leg1 - /dev/volmgr/leg2";
    recs.push(rec("r", &format!("0 2048 raid raid1 1 0 3 {legs}\n")));
    recs.push(rec("plain", "0 2048 linear /dev/volmgr/leg1 0\n"));
    state::save(&f.state().join("devices.json"), &recs).unwrap();
    let d = f.open();
    let problems = d.restore().unwrap();
    // leg1 and `plain` (a linear cannot run without its device) fail; `r` does not.
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems
        .iter()
        .any(|p| p.starts_with("leg1") && p.contains("gone.img")));
    let plain = list(&d).into_iter().find(|i| i.name == "plain").unwrap();
    assert!(plain.error.unwrap().contains("leg1"));
    let st: Vec<(String, String)> = states(&d);
    assert!(st.contains(&("r".into(), "active".into())), "{st:?}");
    let table = ok(d.handle(Request::Table { name: "r".into() }));
    assert!(
        table.contains("- /dev/volmgr/leg0 - - - /dev/volmgr/leg2"),
        "{table}"
    );
    let status = ok(d.handle(Request::Status { name: "r".into() }));
    assert!(leg_1_missing(&status), "{status}");
    let rec_r = d.load_state().unwrap().into_iter().find(|r| r.name == "r");
    assert_eq!(rec_r.map(|r| r.table), Some(table));
    assert!(d.shutdown().is_empty());
}

/// A raid naming its legs directly, one of which cannot be opened at start (a remote server
/// down, here a file gone), comes up degraded without it rather than not at all.
#[test]
fn a_raid_whose_leg_cannot_be_opened_at_start_comes_up_degraded() {
    let f = Fixture::new();
    let d0 = f.file("d0.img", 1 << 20);
    let d2 = f.file("d2.img", 1 << 20);
    let gone = f.dir.path().join("gone.img");
    std::fs::create_dir_all(f.state()).unwrap();
    let table = format!(
        "0 2048 raid raid1 1 0 3 - {} - {} - {}\n",
        d0.display(),
        gone.display(),
        d2.display()
    );
    state::save(&f.state().join("devices.json"), &[rec("r", &table)]).unwrap();
    let d = f.open();
    assert!(d.restore().unwrap().is_empty());
    let t = ok(d.handle(Request::Table { name: "r".into() }));
    assert!(
        t.contains(&format!("- {} - - - {}", d0.display(), d2.display())),
        "{t}"
    );
    let status = ok(d.handle(Request::Status { name: "r".into() }));
    assert!(leg_1_missing(&status), "{status}");
    assert!(d.shutdown().is_empty());
}

#[test]
fn tables_that_would_make_a_device_use_itself_are_refused() {
    let f = Fixture::new();
    let a = f.file("a.img", 1 << 20);
    let d = f.open();
    ok(create(&d, "a", &linear(&a)));
    ok(create(&d, "b", "0 2048 linear /dev/volmgr/a 0\n"));
    ok(create(&d, "c", "0 2048 linear /dev/volmgr/b 0\n"));
    let e = err(d.handle(Request::Reload {
        name: "a".into(),
        table: "0 2048 linear /dev/volmgr/a 0\n".into(),
    }));
    assert!(e.contains("uses /dev/volmgr/a itself"), "{e}");
    let e = err(d.handle(Request::Reload {
        name: "a".into(),
        table: "0 2048 linear /dev/volmgr/c 0\n".into(),
    }));
    assert!(e.contains("a -> c -> b -> a"), "{e}");
    // Nothing changed.
    assert_eq!(
        ok(d.handle(Request::Table { name: "a".into() })),
        linear(&a)
    );
    assert_eq!(d.load_state().unwrap()[0].table, linear(&a));
    // Relative paths mean nothing to the daemon.
    let e = err(create(&d, "r", "0 2048 linear a.img 0\n"));
    assert!(e.contains("relative path"), "{e}");
    // In use: refused; users first.
    let e = err(d.handle(Request::Remove {
        name: "a".into(),
        force: false,
    }));
    assert!(e.contains("used by b"), "{e}");
    assert!(d.shutdown().is_empty());
}

#[test]
fn a_reload_whose_flush_fails_keeps_the_old_table_everywhere() {
    let f = Fixture::new();
    let a = f.file("a.img", 1 << 20);
    let d = f.open();
    ok(create(&d, "t", "0 2048 testdev\n"));
    FAIL_FLUSH.store(true, Ordering::SeqCst);
    let e = err(d.handle(Request::Reload {
        name: "t".into(),
        table: linear(&a),
    }));
    FAIL_FLUSH.store(false, Ordering::SeqCst);
    assert!(
        e.contains("flush failed") && e.contains("old table stays"),
        "{e}"
    );
    assert_eq!(
        ok(d.handle(Request::Table { name: "t".into() })),
        "0 2048 testdev\n"
    );
    assert_eq!(d.load_state().unwrap()[0].table, "0 2048 testdev\n");
    assert_eq!(
        ok(d.handle(Request::Status { name: "t".into() })),
        "0 2048 testdev test"
    );
    let st = states(&d);
    assert_eq!(st, [("t".to_string(), "active".to_string())]);
    // With the flush working, the same reload goes through.
    ok(d.handle(Request::Reload {
        name: "t".into(),
        table: linear(&a),
    }));
    assert_eq!(d.load_state().unwrap()[0].table, linear(&a));
    assert!(d.shutdown().is_empty());
}

#[test]
fn a_suspended_device_can_be_removed_and_the_daemon_still_answers() {
    let f = Fixture::new();
    let a = f.file("a.img", 1 << 20);
    let d = f.open();
    ok(create(&d, "s", &linear(&a)));
    ok(d.handle(Request::Suspend { name: "s".into() }));
    let t0 = Instant::now();
    ok(d.handle(Request::Remove {
        name: "s".into(),
        force: false,
    }));
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert!(list(&d).is_empty());
    assert!(d.load_state().unwrap().is_empty());
    // Shutting down with a suspended device returns too.
    ok(create(&d, "s2", &linear(&a)));
    ok(d.handle(Request::Suspend { name: "s2".into() }));
    let t0 = Instant::now();
    assert!(d.shutdown().is_empty());
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}

/// Sends raw bytes to the control socket and returns the reply line (empty if none).
fn raw(sock: &Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = s.write_all(bytes);
    let mut line = String::new();
    let _ = BufReader::new(&s).read_line(&mut line);
    line
}

#[test]
fn the_control_socket_survives_garbage_stuck_clients_and_a_panicking_request() {
    let f = Fixture::new();
    let d = f.open();
    ok(create(&d, "p", "0 2048 testdev panic\n"));
    let server = {
        let d = d.clone();
        std::thread::spawn(move || d.serve_control())
    };
    let sock = d.socket_path();
    let t0 = Instant::now();
    while UnixStream::connect(&sock).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(10));
    }
    // A client that connects and sends nothing holds only its own thread.
    let stuck: Vec<UnixStream> = (0..4)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    let t0 = Instant::now();
    let r = raw(&sock, b"{\"op\":\"list\"}\n");
    assert!(r.contains("\"devices\""), "{r}");
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    // Garbage and oversized requests get errors.
    assert!(raw(&sock, b"\x00\xffnot json\n").contains("malformed request"));
    let big = vec![b'x'; (control_server::MAX_REQUEST_BYTES + 10) as usize];
    assert!(raw(&sock, &big).contains("larger than"));
    // A panic in a target while handling a request answers that request with an error...
    let r = raw(&sock, b"{\"op\":\"status\",\"name\":\"p\"}\n");
    assert!(
        r.contains("internal error") && r.contains("status panics"),
        "{r}"
    );
    // ... and the daemon keeps serving.
    assert!(raw(&sock, b"{\"op\":\"list\"}\n").contains("\"p\""));
    drop(stuck);
    d.request_stop();
    server.join().unwrap().unwrap();
    assert!(d.shutdown().is_empty());
}

#[test]
fn internal_devices_have_no_front_end_serve_their_users_and_come_back() {
    let f = Fixture::new();
    let a = f.file("a.img", 1 << 20);
    let d = f.open();
    let internal = |name: &str, table: &str| {
        d.handle(Request::Create {
            name: name.into(),
            table: table.into(),
            ublk_id: None,
            nbd: None,
            nbd_limits: Default::default(),
            internal: true,
            export: None,
        })
    };
    // An internal device never gets an export, even when asked.
    let e = err(d.handle(Request::Create {
        name: "x".into(),
        table: linear(&a),
        ublk_id: None,
        nbd: Some("127.0.0.1:0".into()),
        nbd_limits: Default::default(),
        internal: true,
        export: None,
    }));
    assert!(e.contains("no NBD export"), "{e}");
    ok(internal("base", &linear(&a)));
    ok(create(&d, "top", "0 2048 linear /dev/volmgr/base 0\n"));
    let l = list(&d);
    let base = l.iter().find(|i| i.name == "base").unwrap();
    assert_eq!(
        (base.path.as_str(), base.data_path.as_str()),
        ("", "internal")
    );
    assert_eq!(base.state, "active");
    assert!(l
        .iter()
        .any(|i| i.name == "top" && i.path.starts_with("nbd://")));
    let e = err(d.handle(Request::Remove {
        name: "base".into(),
        force: false,
    }));
    assert!(e.contains("used by top"), "{e}");
    assert!(d.shutdown().is_empty());
    // The record says internal, and a restart brings it back the same way.
    let recs = d.load_state().unwrap();
    assert!(recs.iter().any(|r| r.name == "base" && r.internal));
    drop(d);
    let d = f.open();
    assert!(d.restore().unwrap().is_empty());
    let l = list(&d);
    assert!(l
        .iter()
        .any(|i| i.name == "base" && i.data_path == "internal" && i.state == "active"));
    ok(d.handle(Request::Remove {
        name: "top".into(),
        force: false,
    }));
    ok(d.handle(Request::Remove {
        name: "base".into(),
        force: false,
    }));
    assert!(d.shutdown().is_empty());
}
