//! The iSCSI extent against a real target (tgtd, its own instance per test): data against a
//! model on 512- and 4096-byte LUNs with bytes checked in the backing files, CHAP (a private
//! secret file works, a readable one and a wrong secret are refused, the secret is never
//! printed), SCSI errors from the target, a target killed and restarted under a writer, a
//! target gone past reconnect-delay, a target that stops answering, and a raid1 with an iSCSI
//! leg on the volume daemon.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::model::*;
use e2e::*;
use extents::net::{IscsiExtent, NetUri};
use extents::FileResolver;
use tables::io::{read_blocking, write_blocking};
use tables::registry::Resolver;
use tables::{BlockDevice, Bytes, DeviceRef, WriteFlags};

const IQN: &str = "iqn.2026-12.org.volmgr.test:disk";

fn try_open(uri: &str) -> Result<Arc<IscsiExtent>, String> {
    let NetUri::Iscsi(u) = NetUri::parse(uri).map_err(|e| e.to_string())? else {
        panic!("{uri} is not an iSCSI URI")
    };
    IscsiExtent::open(u)
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

fn open(uri: &str) -> Arc<IscsiExtent> {
    try_open(uri).unwrap_or_else(|e| panic!("{e}"))
}

fn image(dir: &Path, name: &str, size: u64) -> PathBuf {
    let f = dir.join(name);
    sparse_file(&f, size).unwrap();
    f
}

/// A tgtd serving one LUN (1) of `IQN` on a new `size`-byte file.
fn target(dir: &Path, size: u64, block_size: u32, thin: bool) -> (Tgtd, PathBuf) {
    let f = image(dir, "lun.img", size);
    let mut t = Tgtd::start(dir);
    t.add_lun(TgtLun {
        iqn: IQN.into(),
        lun: 1,
        file: f.clone(),
        block_size,
        thin,
    });
    (t, f)
}

/// The model run on one LUN, then the backing file checked against the model.
fn lun_matches_a_model(block_size: u32, thin: bool, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let (t, file) = target(dir.path(), 32 << 20, block_size, thin);
    let d = open(&t.uri(IQN, 1, ""));
    assert_eq!(d.size(), Bytes(32 << 20));
    let l = d.limits();
    assert_eq!(l.logical_block_size, block_size);
    // UNMAP and WRITE SAME only where the VPD pages say so.
    assert_eq!(l.write_zeroes, thin, "{l:?}");
    assert_eq!(l.discard_granularity != 0, thin, "{l:?}");
    let bs = u64::from(block_size);
    let (model, known) = model_run(&*d, seed, 300, bs);
    flush(&*d);
    let st = d.status();
    assert!(st.contains(" up server 127.0.0.1:"), "{st}");
    drop(d);
    compare_bytes(
        &read_all(&file).unwrap(),
        &model,
        &known,
        bs,
        "the backing file",
    );
    drop(t);
}

#[test]
fn lun_512_thin_matches_a_model() {
    lun_matches_a_model(512, true, 7);
}

#[test]
fn lun_512_thick_matches_a_model() {
    lun_matches_a_model(512, false, 8);
}

#[test]
fn lun_4096_thin_matches_a_model() {
    lun_matches_a_model(4096, true, 9);
}

#[test]
fn bytes_land_at_their_offsets_and_unaligned_writes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (t, file) = target(dir.path(), 8 << 20, 4096, false);
    let d = open(&t.uri(IQN, 1, ""));
    let data: Vec<u8> = (0..65536u32).map(|i| (i * 7 + 1) as u8).collect();
    write_blocking(&*d, Bytes(1 << 20), &data, WriteFlags::FUA).unwrap();
    // Larger than one command (8 MiB): split, and every piece lands.
    let big = pseudo_random(8 << 20, 5);
    write_blocking(
        &*d,
        Bytes(0),
        &big[..(8 << 20) - 65536],
        WriteFlags::default(),
    )
    .unwrap();
    write_blocking(&*d, Bytes((8 << 20) - 65536), &data, WriteFlags::default()).unwrap();
    flush(&*d);
    let on_disk = read_all(&file).unwrap();
    assert!(on_disk[..(8 << 20) - 65536] == big[..(8 << 20) - 65536]);
    assert_eq!(&on_disk[(8 << 20) - 65536..], &data[..]);
    // A read unaligned to the 4096-byte blocks goes through a bounce buffer.
    let mut b = [0u8; 100];
    read_blocking(&*d, Bytes((8 << 20) - 65536 + 1000), &mut b).unwrap();
    assert_eq!(&b[..], &data[1000..1100]);
    // An unaligned write is refused with EINVAL, naming the LUN.
    let e = write_blocking(&*d, Bytes(512), &[1u8; 512], WriteFlags::default()).unwrap_err();
    assert_eq!(e.errno, libc::EINVAL, "{e}");
    assert!(e.msg.contains("LUN 1") && e.msg.contains("4096"), "{e}");
    // Past the end: ENOSPC before anything is sent.
    let e = write_blocking(&*d, Bytes(8 << 20), &[1u8; 4096], WriteFlags::default()).unwrap_err();
    assert_eq!(e.errno, libc::ENOSPC, "{e}");
}

#[test]
fn scsi_errors_name_the_lun_the_lba_and_the_sense() {
    let dir = tempfile::tempdir().unwrap();
    let (t, _file) = target(dir.path(), 4 << 20, 512, false);
    let d = open(&t.uri(IQN, 1, ""));
    t.lun_params(IQN, 1, "readonly=1");
    let e = write_blocking(&*d, Bytes(4096), &[1u8; 512], WriteFlags::default()).unwrap_err();
    assert_eq!(e.errno, libc::EROFS, "{e}");
    for want in [
        t.uri(IQN, 1, "").as_str(),
        "LUN 1",
        "LBA 8",
        "DATA PROTECT",
        "ASC/ASCQ 0x27/",
    ] {
        assert!(e.msg.contains(want), "'{want}' missing: {e}");
    }
    // Reads still work, and the session stayed up.
    let mut b = [0u8; 512];
    read_blocking(&*d, Bytes(0), &mut b).unwrap();
    assert!(d.status().contains(" up "), "{}", d.status());
}

#[test]
fn resolver_shares_an_extent_and_reports_its_health() {
    let dir = tempfile::tempdir().unwrap();
    let (t, _file) = target(dir.path(), 4 << 20, 512, false);
    let uri = t.uri(IQN, 1, "?timeout=5");
    let r = FileResolver::default();
    assert_eq!(r.check_remote(&uri), Some(Ok(())));
    let a: DeviceRef = r.open(&uri).unwrap();
    let b: DeviceRef = r.open(&uri).unwrap();
    assert!(Arc::ptr_eq(&a, &b), "two lines naming one LUN share it");
    write_blocking(&*a, Bytes(0), &[9u8; 512], WriteFlags::default()).unwrap();
    let h = r
        .extent_health(&uri)
        .expect("health of an open iSCSI extent");
    assert_eq!(h.state, "up");
    assert_eq!(h.server, format!("127.0.0.1:{}", t.port));
    assert_eq!((h.connections_up, h.connections), (1, 1));
}

#[test]
fn unreachable_target_and_unknown_target_are_named_at_open() {
    let port = free_port();
    let uri = format!("iscsi://127.0.0.1:{port}/{IQN}/1?connect-timeout=2");
    let e = try_open(&uri).unwrap_err();
    assert!(e.contains(&uri) && e.contains("refused"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let (t, _file) = target(dir.path(), 4 << 20, 512, false);
    let wrong = format!(
        "iscsi://127.0.0.1:{}/iqn.2026-12.org.volmgr.test:nope/1",
        t.port
    );
    let e = try_open(&wrong).unwrap_err();
    assert!(e.contains(&wrong) && e.contains("login"), "{e}");
}

/// Writes `text` to a file of mode `mode` and returns its path.
fn secret_file(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

const CHAP_USER: &str = "volmgr";
const CHAP_SECRET: &str = "Zq7-secret-4Kx9p";

/// The LUN's URI as CHAP user `volmgr` with the secret in `file`, plus `more` options.
fn chap_uri(t: &Tgtd, file: &Path, more: &str) -> String {
    t.uri_as(
        CHAP_USER,
        IQN,
        1,
        &format!("?chap-secret-file={}{more}", file.display()),
    )
}

#[test]
fn chap_logs_in_with_a_private_secret_file_and_never_shows_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let (mut t, file) = target(p, 4 << 20, 512, false);
    t.add_chap(IQN, CHAP_USER, CHAP_SECRET);
    let mut texts: Vec<String> = Vec::new();

    // Without credentials the target refuses the login.
    let e = try_open(&t.uri(IQN, 1, "")).unwrap_err();
    assert!(e.contains("login"), "{e}");
    texts.push(e);

    // A private secret file: in.
    let good = secret_file(p, "chap.secret", &format!("{CHAP_SECRET}\n"), 0o600);
    let d = open(&chap_uri(&t, &good, ""));
    let mut block = [0u8; 512];
    block[..11].copy_from_slice(b"behind chap");
    write_blocking(&*d, Bytes(0), &block, WriteFlags::FUA).unwrap();
    assert_eq!(&read_all(&file).unwrap()[..11], b"behind chap");
    texts.push(d.status());
    texts.push(format!("{d:?}"));
    texts.push(format!("{:?}", d.health()));
    texts.push(format!("{:?}", d.uri()));

    // A file others may read: refused before connecting, naming the file and its mode.
    let open_file = secret_file(p, "loose.secret", CHAP_SECRET, 0o644);
    let loose = chap_uri(&t, &open_file, "");
    let e = try_open(&loose).unwrap_err();
    assert!(
        e.contains(&open_file.display().to_string()) && e.contains("mode 0644"),
        "{e}"
    );
    texts.push(e);

    // A wrong secret: a clear login error.
    let wrong = secret_file(p, "wrong.secret", "not-the-secret-x", 0o600);
    let bad = chap_uri(&t, &wrong, "&connect-timeout=5");
    let e = try_open(&bad).unwrap_err();
    assert!(
        e.contains(&bad) && e.contains("login") && e.contains("uthentication"),
        "{e}"
    );
    texts.push(e);

    for s in &texts {
        assert!(!s.contains(CHAP_SECRET), "the secret leaked: {s}");
        assert!(!s.contains("not-the-secret"), "the secret leaked: {s}");
    }
}

#[test]
fn target_killed_and_restarted_under_a_writer_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut t, file) = target(dir.path(), 32 << 20, 512, false);
    let d = open(&t.uri(IQN, 1, "?timeout=5&reconnect-delay=20"));
    let writer = writer_with_readback(d.clone(), 32 << 20, 5, "across the restart");
    std::thread::sleep(Duration::from_millis(1500));
    t.kill();
    std::thread::sleep(Duration::from_millis(1000));
    t.restart();
    let (model, n) = writer.join().expect("the writer saw an error");
    assert!(n > 10, "only {n} writes");
    let st = d.status();
    assert!(st.contains("reconnects 1 "), "{st}");
    assert!(st.contains(" up "), "{st}");
    drop(d);
    assert!(
        read_all(&file).unwrap() == model,
        "the backing file differs from the model"
    );
}

/// Reads the first bytes of `d` into `b` until that works again (at most 15 s).
fn read_once_back(d: &IscsiExtent, b: &mut [u8]) {
    let until = Instant::now() + Duration::from_secs(15);
    while read_blocking(d, Bytes(0), b).is_err() {
        assert!(Instant::now() < until, "never recovered: {}", d.status());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn target_gone_past_reconnect_delay_fails_then_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let (mut t, _file) = target(dir.path(), 4 << 20, 512, false);
    let d = open(&t.uri(IQN, 1, "?timeout=1&reconnect-delay=1&connect-timeout=1"));
    let mut before = [0u8; 512];
    before[..8].copy_from_slice(b"before..");
    write_blocking(&*d, Bytes(0), &before, WriteFlags::FUA).unwrap();
    t.kill();
    let t0 = Instant::now();
    let mut b = [0u8; 512];
    let e = read_blocking(&*d, Bytes(0), &mut b).unwrap_err();
    assert_eq!(e.errno, libc::EIO, "{e}");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t0.elapsed()
    );
    assert!(
        e.msg.contains("no connection") && e.msg.contains("LUN 1"),
        "{e}"
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert!(d.is_failed(), "{}", d.status());
    assert!(d.status().contains(" failed server"), "{}", d.status());
    // Fails fast while failed.
    let t0 = Instant::now();
    assert!(read_blocking(&*d, Bytes(0), &mut b).is_err());
    assert!(t0.elapsed() < Duration::from_millis(500));
    // Back: the same LUN serves again.
    t.restart();
    read_once_back(&d, &mut b);
    assert_eq!(&b[..8], b"before..");
    assert!(d.status().contains(" up "), "{}", d.status());
}

#[test]
fn a_target_that_stops_answering_times_out_and_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let (t, _file) = target(dir.path(), 4 << 20, 512, false);
    let d = open(&t.uri(IQN, 1, "?timeout=0.5&reconnect-delay=1&connect-timeout=0.5"));
    write_blocking(&*d, Bytes(0), &[3u8; 512], WriteFlags::default()).unwrap();
    t.signal(libc::SIGSTOP);
    let t0 = Instant::now();
    let mut b = [0u8; 512];
    let e = read_blocking(&*d, Bytes(0), &mut b).unwrap_err();
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "took {:?}",
        t0.elapsed()
    );
    assert!(matches!(e.errno, libc::ETIMEDOUT | libc::EIO), "{e}");
    let st = d.status();
    assert!(
        !st.contains("timeouts 0 ") && !st.contains("dropped 0 "),
        "{st}"
    );
    t.signal(libc::SIGCONT);
    read_once_back(&d, &mut b);
    assert_eq!(b, [3u8; 512]);
}

#[test]
fn raid1_with_an_iscsi_leg_on_the_daemon() {
    require_tools(&["qemu-io"]);
    let dir = tempfile::Builder::new()
        .prefix("iscsi-raid1-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let p = dir.path();
    let local = image(p, "local.img", 32 << 20);
    let (mut t, remote) = target(p, 32 << 20, 512, true);
    t.add_chap(IQN, CHAP_USER, CHAP_SECRET);
    let secret = secret_file(p, "chap.secret", CHAP_SECRET, 0o600);
    let leg = chap_uri(&t, &secret, "&timeout=5");
    let d = DaemonProc::start(&p.join("state"));
    let table = p.join("r1.table");
    std::fs::write(
        &table,
        format!(
            "0 61440 raid raid1 3 0 region_size 1024 2 - {} - {leg}\n",
            local.display()
        ),
    )
    .unwrap();
    let port = d.create_nbd("r1", &table);
    let t0 = Instant::now();
    let st = loop {
        let st = d.ok(&["dev", "status", "r1"]);
        if st.contains(" AA ") {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "never in sync: {st}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        st.contains("extent iscsi://") && st.contains(" up server 127.0.0.1:"),
        "{st}"
    );
    let uri = format!("nbd://127.0.0.1:{port}/r1");
    qemu_io(&uri, &["write -P 0x5a 1M 2M", "flush"]);
    qemu_io(&uri, &["read -P 0x5a 1M 2M", "read -P 0 0 1M"]);
    // Both legs hold the data.
    let l = read_all(&local).unwrap();
    let r = read_all(&remote).unwrap();
    assert!(
        l[(1 << 20)..(3 << 20)].iter().all(|&b| b == 0x5a),
        "local leg"
    );
    assert!(
        r[(1 << 20)..(3 << 20)].iter().all(|&b| b == 0x5a),
        "iSCSI leg"
    );
    let js: serde_json::Value = serde_json::from_str(&d.ok(&["dev", "list", "--json"])).unwrap();
    assert_eq!(js[0]["extents"][0]["state"], "up", "{js}");
    // The secret is nowhere: not in what the daemon shows, logs or keeps.
    let shown = [
        d.ok(&["dev", "status", "r1"]),
        d.ok(&["dev", "table", "r1"]),
        js.to_string(),
        d.log(),
        std::fs::read_to_string(p.join("state/devices.json")).unwrap_or_default(),
    ];
    for s in &shown {
        assert!(!s.contains(CHAP_SECRET), "the secret leaked: {s}");
    }
    d.ok(&["dev", "remove", "r1"]);
}
