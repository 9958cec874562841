//! The Ceph extents against a real single-node cluster (started per test by
//! `e2e::ceph::CephCluster`, torn down on drop): `rbd:` and `rados:` against a model with the
//! bytes checked through `rbd export` and `rados get` at the documented places, snapshots as
//! read-only thin origins, keyrings and secrets, and OSDs killed under load.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::ceph::{CephAuth, CephCluster};
use e2e::model::*;
use e2e::*;
use extents::net::{NetUri, RadosExtent, RbdExtent};
use tables::io::{read_blocking, write_blocking};
use tables::{BlockDevice, Bytes, WriteFlags};

fn rbd(uri: &str) -> Result<Arc<RbdExtent>, String> {
    let NetUri::Rbd(u) = NetUri::parse(uri).map_err(|e| e.to_string())? else {
        panic!("{uri} is not an rbd: URI")
    };
    RbdExtent::open(u).map(Arc::new).map_err(|e| e.to_string())
}

fn rados(uri: &str) -> Result<Arc<RadosExtent>, String> {
    let NetUri::Rados(u) = NetUri::parse(uri).map_err(|e| e.to_string())? else {
        panic!("{uri} is not a rados: URI")
    };
    RadosExtent::open(u)
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

#[test]
fn rbd_image_matches_a_model_and_rbd_export() {
    let c = CephCluster::start(1, 1, CephAuth::None);
    c.rbd(&["create", "--size", "48M", "rbd/m1"]);
    let d = rbd(&format!("rbd:rbd/m1?{}", c.opts())).unwrap();
    assert_eq!(d.size(), Bytes(48 << 20));
    let l = d.limits();
    assert_eq!((l.logical_block_size, l.read_only), (512, false));
    let (model, known) = model_run(&*d, 11, 300, 512);
    // Unaligned to 4 KiB, and larger than one piece (8 MiB): split, every byte lands.
    let big = pseudo_random(9 << 20, 3);
    write_blocking(&*d, Bytes(512 * 7), &big, WriteFlags::FUA).unwrap();
    let mut model = model;
    model[512 * 7..512 * 7 + big.len()].copy_from_slice(&big);
    let mut known = known;
    known[7..7 + big.len() / 512].fill(true);
    compare(&*d, &model, &known, 512, "read back");
    // Reads whose futures are dropped while librbd has them: the buffers are taken back at
    // once and nothing is ever written into them afterwards.
    let mut bufs = vec![vec![0u8; 1 << 20]; 8];
    for (i, b) in bufs.iter_mut().enumerate() {
        // SAFETY: the future is dropped (withdrawing the buffer) before `b` is used again.
        let mut f = unsafe { d.read(Bytes((i as u64) << 20), b) };
        let waker = std::task::Waker::noop();
        let _ = f.as_mut().poll(&mut std::task::Context::from_waker(waker));
        drop(f);
        // Ours again: whatever happened before the drop is overwritten; nothing may change
        // it from now on.
        b.fill(0x77);
    }
    std::thread::sleep(Duration::from_millis(500));
    for (i, b) in bufs.iter().enumerate() {
        assert!(
            b.iter().all(|&x| x == 0x77),
            "withdrawn buffer {i} was written"
        );
    }
    flush(&*d);
    let st = d.status();
    assert!(
        st.contains("rbd:rbd/m1") && st.contains(" up server "),
        "{st}"
    );
    assert!(st.contains("errors 0"), "{st}");
    drop(d);
    compare_bytes(&c.rbd_export("rbd/m1"), &model, &known, 512, "rbd export");
}

#[test]
fn rados_volume_matches_a_model_and_the_objects() {
    let c = CephCluster::start(1, 1, CephAuth::None);
    let os = 1u64 << 20;
    let size = 24u64 << 20;
    let uri = format!("rados:rbd/vol?object_size=1M&size=24M&{}", c.opts());
    let d = rados(&uri).unwrap();
    assert_eq!(d.size(), Bytes(size));
    // Nothing written yet: every byte reads as zero and no object exists.
    let mut all = vec![1u8; size as usize];
    read_blocking(&*d, Bytes(0), &mut all).unwrap();
    assert!(all.iter().all(|&b| b == 0));
    let (mut model, mut known) = model_run(&*d, 12, 300, 512);
    // A write across three objects, and a discard that removes one whole object and zeroes
    // parts of its neighbours: both read back as the model says (discard zeroes here).
    let data = pseudo_random((2 * os + 4096) as usize, 9);
    let at = 5 * os - 2048;
    write_blocking(&*d, Bytes(at), &data, WriteFlags::default()).unwrap();
    model[at as usize..at as usize + data.len()].copy_from_slice(&data);
    known[(at / 512) as usize..((at as usize + data.len()) / 512)].fill(true);
    let (zo, zl) = (9 * os - 4096, os + 8192);
    iort::block_on(d.discard(Bytes(zo), Bytes(zl)))
        .unwrap()
        .unwrap();
    model[zo as usize..(zo + zl) as usize].fill(0);
    known[(zo / 512) as usize..((zo + zl) / 512) as usize].fill(true);
    compare(&*d, &model, &known, 512, "read back");
    assert_eq!(
        c.rados_get("rbd", "vol.0000000000000009"),
        None,
        "removed whole"
    );
    drop(d);
    // Every object PREFIX.%016x holds the volume's bytes at offset within it; missing
    // objects and bytes past an object's end are zeroes.
    let mut objects = 0;
    let mut got = vec![0u8; size as usize];
    for i in 0..size / os {
        if let Some(b) = c.rados_get("rbd", &format!("vol.{i:016x}")) {
            assert!(b.len() as u64 <= os, "object {i} is {} bytes", b.len());
            got[(i * os) as usize..(i * os) as usize + b.len()].copy_from_slice(&b);
            objects += 1;
        }
    }
    assert!(objects > 3, "only {objects} objects");
    compare_bytes(&got, &model, &known, 512, "rados get");
}

#[test]
fn names_and_keyrings_are_checked_and_no_secret_shows() {
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("client.keyring");
    std::fs::write(&k, "[client.admin]\n\tkey = AQBs3cr3tKeyS3cr3tKey==\n").unwrap();
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o644)).unwrap();
    // Checked before any connection is tried (no cluster at this port).
    let e = rbd(&format!(
        "rbd:rbd/x?conf=/nonexistent.conf&keyring={}",
        k.display()
    ))
    .unwrap_err();
    assert!(
        e.contains(&k.display().to_string()) && e.contains("0644"),
        "{e}"
    );
    assert!(!e.contains("s3cr3t"), "{e}");
    let e = rados(&format!(
        "rados:rbd/v?object_size=4M&size=8M&keyring={}",
        k.display()
    ))
    .unwrap_err();
    assert!(e.contains("0644"), "{e}");
    let e = rbd("rbd:rbd/x?key=AQBs3cr3tKeyS3cr3tKey==").unwrap_err();
    assert!(e.contains("keyring") && !e.contains("s3cr3t"), "{e}");
    let e = rbd("rbd:rbd/x?conf=/nonexistent.conf").unwrap_err();
    assert!(e.contains("/nonexistent.conf"), "{e}");
}

#[test]
fn cephx_keyring_works_and_the_key_never_shows() {
    let c = CephCluster::start(1, 1, CephAuth::Cephx);
    let keyring = c.keyring.clone().expect("a cephx keyring");
    let text = std::fs::read_to_string(&keyring).unwrap();
    let key = text
        .lines()
        .skip_while(|l| !l.contains("[client.admin]"))
        .find_map(|l| l.trim().strip_prefix("key = "))
        .expect("client.admin's key")
        .to_string();
    c.rbd(&["create", "--size", "8M", "rbd/cx"]);
    let d = rbd(&format!("rbd:rbd/cx?{}", c.opts())).unwrap();
    let data = pseudo_random(65536, 4);
    write_blocking(&*d, Bytes(4096), &data, WriteFlags::default()).unwrap();
    let mut back = vec![0u8; data.len()];
    read_blocking(&*d, Bytes(4096), &mut back).unwrap();
    assert_eq!(back, data);
    let shown = format!("{} {:?} {:?}", d.status(), d.health(), d);
    assert!(!shown.contains(&key), "{shown}");
    // Without the keyring cephx refuses us: the error names the URI, not the key.
    let no_key = format!("rbd:rbd/cx?conf={}&connect-timeout=5", c.conf.display());
    let e = rbd(&no_key).unwrap_err();
    assert!(e.starts_with("rbd:rbd/cx") && !e.contains(&key), "{e}");
    // Readable by others: refused, naming the file.
    std::fs::set_permissions(&keyring, std::fs::Permissions::from_mode(0o640)).unwrap();
    let e = rbd(&format!("rbd:rbd/cx?{}", c.opts())).unwrap_err();
    assert!(
        e.contains(&keyring.display().to_string()) && e.contains("0640") && !e.contains(&key),
        "{e}"
    );
    std::fs::set_permissions(&keyring, std::fs::Permissions::from_mode(0o600)).unwrap();
    drop(d);
    let _ = Instant::now() + Duration::ZERO;
}

fn table(dir: &Path, name: &str, text: &str) -> PathBuf {
    let t = dir.join(format!("{name}.table"));
    std::fs::write(&t, text).unwrap();
    t
}

fn tmp(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/var/tmp")
        .unwrap()
}

/// ext4 made, filled, checked (fsck) and read back through our NBD export `name` on `port`
/// (mounted on the host through qemu-storage-daemon's FUSE export and a loop device).
fn ext4_roundtrip(p: &Path, port: u16, name: &str) {
    let fl = FuseLoop::attach(port, name, p).unwrap();
    let mnt = p.join(format!("mnt-{name}"));
    std::fs::create_dir(&mnt).unwrap();
    run_ok(Command::new("mkfs.ext4").args(["-F", "-q", &fl.loopdev])).unwrap();
    run_ok(Command::new("mount").arg(&fl.loopdev).arg(&mnt)).unwrap();
    for i in 0..20 {
        std::fs::write(
            mnt.join(format!("f{i}")),
            pseudo_random(150_000 + i * 777, i as u64),
        )
        .unwrap();
    }
    let before = tree_sums(&mnt, ".");
    run_ok(Command::new("umount").arg(&mnt)).unwrap();
    let fsck = run(Command::new("e2fsck").args(["-fn", &fl.loopdev])).unwrap();
    assert!(
        fsck.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    run_ok(Command::new("mount").arg(&fl.loopdev).arg(&mnt)).unwrap();
    assert_eq!(tree_sums(&mnt, "."), before, "{name}: checksums");
    run_ok(Command::new("umount").arg(&mnt)).unwrap();
    drop(fl);
}

/// The bytes our export `name` on `port` serves (nbdcopy).
fn export_bytes(p: &Path, port: u16, name: &str) -> Vec<u8> {
    let f = p.join(format!("{name}.copy"));
    run_ok(
        Command::new("nbdcopy")
            .arg(format!("nbd://127.0.0.1:{port}/{name}"))
            .arg(&f),
    )
    .unwrap();
    let b = std::fs::read(&f).unwrap();
    std::fs::remove_file(&f).unwrap();
    b
}

#[test]
fn targets_over_rbd_and_rados_on_the_daemon_hold_ext4() {
    require_tools(&[
        "qemu-storage-daemon",
        "mkfs.ext4",
        "e2fsck",
        "losetup",
        "nbdcopy",
        "qemu-io",
    ]);
    let c = CephCluster::start(1, 1, CephAuth::None);
    let o = c.opts();
    let dir = tmp("ceph-e2e-");
    let p = dir.path();
    let d = DaemonProc::start(&p.join("state"));

    // linear over one image: ext4, and `rbd export` is exactly what we serve.
    c.rbd(&["create", "--size", "96M", "rbd/lin"]);
    let t = table(p, "lin", &format!("0 196608 linear rbd:rbd/lin?{o} 0\n"));
    let port = d.create_nbd("lin", &t);
    ext4_roundtrip(p, port, "lin");
    let ours = export_bytes(p, port, "lin");
    assert!(
        ours == c.rbd_export("rbd/lin"),
        "rbd export differs from our export"
    );
    let st = d.ok(&["dev", "status", "lin"]);
    assert!(
        st.contains("extent rbd:rbd/lin") && st.contains(" up server "),
        "{st}"
    );

    // striped over three images: each 64 KiB chunk lands where dm-striped puts it.
    let mut t = String::from("0 147456 striped 3 128");
    for i in 0..3 {
        c.rbd(&["create", "--size", "24M", &format!("rbd/st{i}")]);
        t.push_str(&format!(" rbd:rbd/st{i}?{o} 0"));
    }
    let port = d.create_nbd("st", &table(p, "st", &(t + "\n")));
    let uri = format!("nbd://127.0.0.1:{port}/st");
    let cmds: Vec<String> = (0..12)
        .map(|k| format!("write -P {} {} 64k", k + 1, k * 65536))
        .collect();
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&uri, &refs);
    qemu_io(&uri, &["flush"]);
    let legs: Vec<Vec<u8>> = (0..3)
        .map(|i| c.rbd_export(&format!("rbd/st{i}")))
        .collect();
    for k in 0..12usize {
        let at = (k / 3) * 65536;
        assert!(
            legs[k % 3][at..at + 65536]
                .iter()
                .all(|&b| b == k as u8 + 1),
            "chunk {k} is not at byte {at} of st{}",
            k % 3
        );
    }
    ext4_roundtrip(p, port, "st");

    // raid1 over an image and a local file: ext4, then both legs hold the same bytes.
    c.rbd(&["create", "--size", "64M", "rbd/r1"]);
    let local = p.join("local.img");
    sparse_file(&local, 64 << 20).unwrap();
    let t = table(
        p,
        "r1",
        &format!(
            "0 126976 raid raid1 3 0 region_size 1024 2 - {} - rbd:rbd/r1?{o}\n",
            local.display()
        ),
    );
    let port = d.create_nbd("r1", &t);
    ext4_roundtrip(p, port, "r1");
    let n = 126976 * 512;
    let (l, r) = (read_all(&local).unwrap(), c.rbd_export("rbd/r1"));
    assert!(l[..n] == r[..n], "the raid1 legs differ");

    // A thin pool whose data device is an image.
    c.rbd(&["create", "--size", "128M", "rbd/tdata"]);
    let meta = p.join("meta.img");
    sparse_file(&meta, 4 << 20).unwrap();
    let pool = table(
        p,
        "pool",
        &format!(
            "0 262144 thin-pool {} rbd:rbd/tdata?{o} 128 0\n",
            meta.display()
        ),
    );
    d.ok(&[
        "dev",
        "create",
        "pool",
        "--table",
        &pool.display().to_string(),
        "--internal",
    ]);
    d.ok(&["dev", "message", "pool", "create_thin", "0"]);
    let vol = table(p, "vol", "0 524288 thin /dev/volmgr/pool 0\n");
    let port = d.create_nbd("vol", &vol);
    ext4_roundtrip(p, port, "vol");

    // linear over RADOS objects: ext4, and the objects hold our bytes where documented.
    let rados_uri = format!("rados:rbd/rv?object_size=4M&size=64M&{o}");
    let t = table(p, "rv", &format!("0 131072 linear {rados_uri} 0\n"));
    let port = d.create_nbd("rv", &t);
    ext4_roundtrip(p, port, "rv");
    let ours = export_bytes(p, port, "rv");
    for i in 0..16usize {
        let obj = c
            .rados_get("rbd", &format!("rv.{i:016x}"))
            .unwrap_or_default();
        let at = i << 22;
        assert!(obj[..] == ours[at..at + obj.len()], "object {i}");
        assert!(
            ours[at + obj.len()..at + (4 << 20)].iter().all(|&b| b == 0),
            "object {i} tail"
        );
    }
    d.ok(&["dev", "remove", "vol"]);
}

#[test]
fn a_snapshot_is_a_read_only_origin_for_thin_clones() {
    require_tools(&["qemu-io"]);
    let c = CephCluster::start(1, 1, CephAuth::None);
    let o = c.opts();
    c.rbd(&["create", "--size", "16M", "rbd/base"]);
    let base = rbd(&format!("rbd:rbd/base?{o}")).unwrap();
    write_blocking(&*base, Bytes(0), &vec![0x31u8; 4 << 20], WriteFlags::FUA).unwrap();
    c.rbd(&["snap", "create", "rbd/base@s1"]);
    // The image moves on after the snapshot: a clone of s1 must not see that.
    write_blocking(&*base, Bytes(0), &vec![0x77u8; 1 << 20], WriteFlags::FUA).unwrap();
    drop(base);
    let snap = rbd(&format!("rbd:rbd/base@s1?{o}")).unwrap();
    assert!(snap.limits().read_only);
    let e = write_blocking(&*snap, Bytes(0), &[0u8; 512], WriteFlags::default()).unwrap_err();
    assert_eq!(e.errno, libc::EROFS, "{e}");
    drop(snap);

    let dir = tmp("ceph-snap-");
    let p = dir.path();
    let d = DaemonProc::start(&p.join("state"));
    let (meta, data) = (p.join("meta.img"), p.join("data.img"));
    sparse_file(&meta, 4 << 20).unwrap();
    sparse_file(&data, 64 << 20).unwrap();
    let pool = table(
        p,
        "pool",
        &format!(
            "0 131072 thin-pool {} {} 128 0\n",
            meta.display(),
            data.display()
        ),
    );
    d.ok(&[
        "dev",
        "create",
        "pool",
        "--table",
        &pool.display().to_string(),
        "--internal",
    ]);
    d.ok(&["dev", "message", "pool", "create_thin", "0"]);
    let clone = table(
        p,
        "clone",
        &format!("0 32768 thin /dev/volmgr/pool 0 rbd:rbd/base@s1?{o}\n"),
    );
    let port = d.create_nbd("clone", &clone);
    let uri = format!("nbd://127.0.0.1:{port}/clone");
    qemu_io(
        &uri,
        &[
            "read -P 0x31 0 4M",
            "read -P 0 4M 12M",
            "write -P 0x42 64k 64k",
            "flush",
            "read -P 0x31 0 64k",
            "read -P 0x42 64k 64k",
            "read -P 0x31 128k 1M",
        ],
    );
    // The snapshot is untouched.
    let s1 = c.rbd_export("rbd/base@s1");
    assert!(s1[..4 << 20].iter().all(|&b| b == 0x31));
    d.ok(&["dev", "remove", "clone"]);
}

/// Writes `n` bytes of `fill` at `at` on another thread; its result and how long it took.
fn write_in_background(
    d: Arc<dyn BlockDevice>,
    at: u64,
    n: usize,
    fill: u8,
) -> std::thread::JoinHandle<(Result<(), tables::IoError>, Duration)> {
    std::thread::spawn(move || {
        let t = Instant::now();
        let r = write_blocking(&*d, Bytes(at), &vec![fill; n], WriteFlags::default());
        (r, t.elapsed())
    })
}

#[test]
fn one_osd_killed_requests_wait_or_fail_past_the_delay_then_recover() {
    let mut c = CephCluster::start(1, 1, CephAuth::None);
    let o = c.opts();
    c.rbd(&["create", "--size", "16M", "rbd/k1"]);
    // A 90 s window: a restarted OSD that loses Ceph 16.2's start race is restarted once more
    // (`wait_osd`, up to 60 s), which under a loaded CI took longer than a 20 s window.
    let patient: Arc<dyn BlockDevice> =
        rbd(&format!("rbd:rbd/k1?{o}&timeout=30&reconnect-delay=60")).unwrap();
    let rv: Arc<dyn BlockDevice> = rados(&format!(
        "rados:rbd/kv?object_size=1M&size=8M&{o}&timeout=30&reconnect-delay=60"
    ))
    .unwrap();
    write_blocking(&*patient, Bytes(0), &[1u8; 4096], WriteFlags::default()).unwrap();
    write_blocking(&*rv, Bytes(0), &[1u8; 4096], WriteFlags::default()).unwrap();

    // Back within the window: the requests wait and complete.
    c.kill_osd(0);
    let w1 = write_in_background(patient.clone(), 1 << 20, 65536, 0x61);
    let w2 = write_in_background(rv.clone(), 1 << 20, 65536, 0x62);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !w1.is_finished() && !w2.is_finished(),
        "a write went through without the OSD"
    );
    c.start_osd(0);
    // (Restarts the OSD if it gave up at start: Ceph 16.2's "wrong fsid" race.)
    c.wait_osd(0, true, Duration::from_secs(60));
    for (w, what) in [(w1, "rbd"), (w2, "rados")] {
        let (r, took) = w.join().unwrap();
        r.unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(took >= Duration::from_secs(2), "{what}: {took:?}");
    }
    let mut b = vec![0u8; 65536];
    read_blocking(&*patient, Bytes(1 << 20), &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0x61));
    read_blocking(&*rv, Bytes(1 << 20), &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0x62));
    // The image's exclusive lock goes with its last writer: with two handles open, a write
    // on the new one waits for the old one to hand the lock over, which after an OSD restart
    // can take longer than the 4 s window below. An administrator has one handle per image.
    drop((patient, rv));

    // Gone for longer than timeout + reconnect-delay: EIO at the deadline, the extent says
    // failed (and fails new requests at once), then recovers by itself.
    let quick = rbd(&format!("rbd:rbd/k1?{o}&timeout=2&reconnect-delay=2")).unwrap();
    let quick_rados = rados(&format!(
        "rados:rbd/kv?object_size=1M&size=8M&{o}&timeout=2&reconnect-delay=2"
    ))
    .unwrap();
    let made = quick.connections_made();
    c.kill_osd(0);
    let ws = [
        write_in_background(quick.clone(), 2 << 20, 4096, 0x71),
        write_in_background(quick_rados.clone(), 2 << 20, 4096, 0x72),
    ];
    for w in ws {
        let (r, took) = w.join().unwrap();
        let e = r.expect_err("a write succeeded with the only OSD dead");
        assert_eq!(e.errno, libc::EIO, "{e}");
        assert!(
            e.msg.contains("rbd:rbd/k1") || e.msg.contains("rados:rbd/kv"),
            "{e}"
        );
        assert!(e.msg.contains("byte 2097152"), "{e}");
        assert!(
            took >= Duration::from_secs(3) && took < Duration::from_secs(8),
            "failed after {took:?}: {e}"
        );
    }
    assert!(quick.is_failed() && quick_rados.is_failed());
    let st = quick.status();
    assert!(
        st.contains(" failed server ") && st.contains("errors "),
        "{st}"
    );
    let t = Instant::now();
    let e = write_blocking(&*quick, Bytes(0), &[0u8; 512], WriteFlags::default()).unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(1) && e.errno == libc::EIO,
        "{e}"
    );
    c.start_osd(0);
    c.wait_osd(0, true, Duration::from_secs(60));
    let until = Instant::now() + Duration::from_secs(60);
    while quick.is_failed() || quick_rados.is_failed() {
        assert!(
            Instant::now() < until,
            "never recovered: {}",
            quick.status()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(quick.connections_made() > made, "recovery not counted");
    write_blocking(&*quick, Bytes(3 << 20), &[9u8; 4096], WriteFlags::default()).unwrap();
    write_blocking(
        &*quick_rados,
        Bytes(3 << 20),
        &[9u8; 4096],
        WriteFlags::default(),
    )
    .unwrap();
    assert!(quick.status().contains(" up server "), "{}", quick.status());
}

#[test]
fn an_osd_killed_and_restarted_under_fio_verify_gives_no_error() {
    require_tools(&["fio"]);
    let mut c = CephCluster::start(3, 2, CephAuth::None);
    let o = c.opts();
    c.rbd(&["create", "--size", "64M", "rbd/fv"]);
    let dir = tmp("ceph-fio-");
    let p = dir.path();
    let d = DaemonProc::start(&p.join("state"));
    let t = table(p, "fv", &format!("0 131072 linear rbd:rbd/fv?{o} 0\n"));
    let port = d.create_nbd("fv", &t);
    let t0 = Instant::now();
    let fio = std::thread::spawn(move || {
        Command::new("timeout")
            .args([
                "300",
                "fio",
                "--name=verify",
                "--ioengine=nbd",
                &format!("--uri=nbd://127.0.0.1:{port}/fv"),
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=16",
                "--size=48M",
                // Paced so the writes straddle the OSD's death and return.
                "--rate_iops=1000",
                "--verify=crc32c",
                "--verify_fatal=1",
                "--do_verify=1",
                "--output-format=terse",
            ])
            .output()
            .unwrap()
    });
    std::thread::sleep(Duration::from_secs(2));
    c.kill_osd(1);
    c.wait_osd(1, false, Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(2));
    c.start_osd(1);
    c.wait_osd(1, true, Duration::from_secs(60));
    let out = fio.join().unwrap();
    assert!(
        t0.elapsed() > Duration::from_secs(6),
        "fio ended before the restart"
    );
    assert!(
        out.status.success(),
        "fio: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
    let st = d.ok(&["dev", "status", "fv"]);
    assert!(
        st.contains(" up server ") && st.contains("timeouts 0"),
        "{st}"
    );
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

#[test]
fn raid1_with_an_rbd_leg_degrades_when_the_cluster_dies_and_rebuilds_onto_it() {
    require_tools(&["qemu-io"]);
    let mut c = CephCluster::start(1, 1, CephAuth::None);
    let o = c.opts();
    c.rbd(&["create", "--size", "32M", "rbd/leg"]);
    let dir = tmp("ceph-raid1-");
    let p = dir.path();
    let d = DaemonProc::start(&p.join("state"));
    let local = p.join("local.img");
    sparse_file(&local, 32 << 20).unwrap();
    let t = table(
        p,
        "r1",
        &format!(
            "0 61440 raid raid1 3 0 region_size 1024 2 - {} - rbd:rbd/leg?{o}&timeout=2&reconnect-delay=2\n",
            local.display()
        ),
    );
    let port = d.create_nbd("r1", &t);
    wait_status(&d, "r1", " AA ", 60);
    let uri = format!("nbd://127.0.0.1:{port}/r1");
    qemu_io(&uri, &["write -P 0x11 0 1M", "flush"]);

    // The only OSD dies: writes go on without an error, the leg is failed, the extent too.
    c.kill_osd(0);
    qemu_io(&uri, &["write -P 0x22 1M 1M", "flush", "read -P 0x11 0 1M"]);
    wait_status(&d, "r1", " AD ", 30);
    wait_status(&d, "r1", " failed server ", 30);

    // It comes back: the extent recovers by itself and the raid rebuilds onto the leg.
    c.start_osd(0);
    c.wait_osd(0, true, Duration::from_secs(60));
    wait_status(&d, "r1", " up server ", 60);
    wait_status(&d, "r1", " AA ", 120);
    qemu_io(&uri, &["read -P 0x11 0 1M", "read -P 0x22 1M 1M"]);
    let (l, r) = (read_all(&local).unwrap(), c.rbd_export("rbd/leg"));
    assert!(
        l[..2 << 20] == r[..2 << 20],
        "the legs differ after the rebuild"
    );
    assert!(r[1 << 20..2 << 20].iter().all(|&b| b == 0x22));
}
