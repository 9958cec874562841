//! Asynchronous replication between two daemons, the secondary in its own network
//! namespace, over TLS: lag under a writer on the primary's mounted ext4, a link cut and
//! resume from the last common snapshot, `kill -9` of the primary and `promote --force`
//! (the copy equals one of the primary's replication snapshots, block for block, and is
//! fsck clean), then failback: the old primary resynced with only the diverged blocks, a
//! clean demote/promote back.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::netns::NetHost;
use e2e::{
    pseudo_random, read_all, require_root, require_tools, run_ok, sparse_file, DaemonProc, FuseLoop,
};
use serde_json::Value;

const VOL_SECTORS: u64 = 262_144; // 128 MiB
const MIB: u64 = 1 << 20;

/// A CA, one server certificate for both sides' addresses and one client certificate.
fn make_certs(dir: &Path, ips: &[&str]) {
    let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    let san: Vec<String> = ips.iter().map(|i| format!("IP:{i}")).collect();
    let script = format!(
        "set -e
         openssl req -x509 {ec} -keyout ca-key.pem -out ca-cert.pem -days 2 -subj /CN=ca 2>/dev/null
         openssl req {ec} -keyout server-key.pem -out server.csr -subj /CN=repl 2>/dev/null
         printf 'subjectAltName={}\\nextendedKeyUsage=serverAuth\\n' > sext
         openssl x509 -req -in server.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
           -out server-cert.pem -days 2 -extfile sext 2>/dev/null
         openssl req {ec} -keyout client-key.pem -out client.csr -subj /CN=primary 2>/dev/null
         printf 'extendedKeyUsage=clientAuth\\n' > cext
         openssl x509 -req -in client.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
           -out client-cert.pem -days 2 -extfile cext 2>/dev/null
         chmod 600 server-key.pem client-key.pem",
        san.join(",")
    );
    run_ok(Command::new("bash").args(["-c", &script]).current_dir(dir)).unwrap();
}

/// A thin pool `pool` of 256 MiB (64 KiB blocks) on files under `dir`.
fn make_pool(d: &DaemonProc, dir: &Path, tag: &str) {
    let meta = dir.join(format!("{tag}-meta.img"));
    let data = dir.join(format!("{tag}-data.img"));
    sparse_file(&meta, 16 * MIB).unwrap();
    sparse_file(&data, 256 * MIB).unwrap();
    let t = dir.join(format!("{tag}-pool.table"));
    std::fs::write(
        &t,
        format!(
            "0 524288 thin-pool {} {} 128 0\n",
            meta.display(),
            data.display()
        ),
    )
    .unwrap();
    d.ok(&[
        "dev",
        "create",
        "pool",
        "--table",
        &t.to_string_lossy(),
        "--internal",
    ]);
}

/// Creates device `name` over thin `id` of the pool, exported over NBD at `addr`.
fn thin_dev(d: &DaemonProc, dir: &Path, name: &str, id: u32, addr: &str) {
    let t = dir.join(format!("{name}.table"));
    std::fs::write(&t, format!("0 {VOL_SECTORS} thin /dev/volmgr/pool {id}\n")).unwrap();
    d.ok(&[
        "dev",
        "create",
        name,
        "--table",
        &t.to_string_lossy(),
        "--nbd",
        addr,
    ]);
}

/// The whole volume behind `nbd://addr/export`, copied into `out` and returned.
fn read_export(addr: &str, export: &str, out: &Path) -> Vec<u8> {
    read_export_uri(&format!("nbd://{addr}/{export}"), out)
}

/// `repl status --json` of one volume.
fn status(d: &DaemonProc, vol: &str) -> Value {
    let text = d.ok(&["repl", "status", vol, "--json"]);
    let v: Value = serde_json::from_str(&text).unwrap();
    v[0].clone()
}

fn num(s: &Value, k: &str) -> u64 {
    s[k].as_u64().unwrap_or_else(|| panic!("{k} in {s}"))
}

fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A crash-consistent image of a mounted ext4 is clean once its journal is replayed, as a
/// mount would: checked on a copy (`e2fsck -E journal_only`, then `e2fsck -fn` must find
/// nothing).
fn fsck_crash_image(img: &Path) {
    let copy = img.with_extension("fsck");
    std::fs::copy(img, &copy).unwrap();
    // Exit 1 means the journal was replayed: not an error here.
    let o = Command::new("e2fsck")
        .args(["-y", "-E", "journal_only"])
        .arg(&copy)
        .output()
        .unwrap();
    assert!(
        matches!(o.status.code(), Some(0 | 1)),
        "journal replay of {}: {}",
        img.display(),
        String::from_utf8_lossy(&o.stdout)
    );
    run_ok(Command::new("e2fsck").args(["-fn"]).arg(&copy)).unwrap();
    std::fs::remove_file(&copy).unwrap();
}

/// Rewrites 16 files of 256 KiB in turn, each fsync'ed, until stopped.
fn writer(mnt: PathBuf, stop: Arc<AtomicBool>) -> Result<u64, String> {
    let mut k = 0u64;
    while !stop.load(Ordering::Acquire) {
        let path = mnt.join(format!("f{}", k % 16));
        let mut f = std::fs::File::create(&path).map_err(|e| format!("{path:?}: {e}"))?;
        f.write_all(&pseudo_random(256 << 10, k))
            .and_then(|()| f.sync_all())
            .map_err(|e| format!("{path:?}: {e}"))?;
        k += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(k)
}

#[test]
fn two_daemons_lag_link_cut_kill_promote_force_and_failback() {
    require_root();
    require_tools(&[
        "ip",
        "openssl",
        "nbdcopy",
        "qemu-io",
        "qemu-storage-daemon",
        "mkfs.ext4",
        "e2fsck",
    ]);
    let tmp = tempfile::Builder::new()
        .prefix("repl-e2e-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let root = tmp.path();
    let mut h = NetHost::new();
    // Our end of the link: the primary's address as the secondary sees it.
    let a_addr = format!("{}.1", h.addr.rsplit_once('.').unwrap().0);
    let b_addr = h.addr.clone();
    let certs = root.join("certs");
    std::fs::create_dir(&certs).unwrap();
    make_certs(&certs, &[&a_addr, &b_addr]);
    let certs_s = certs.to_string_lossy().to_string();
    for s in ["a-state", "b-state"] {
        std::fs::create_dir(root.join(s)).unwrap();
    }
    let mut a = DaemonProc::start(&root.join("a-state"));
    let b = DaemonProc::start_in_netns(&root.join("b-state"), h.name());
    make_pool(&a, root, "a");
    make_pool(&b, root, "b");
    a.ok(&["dev", "message", "pool", "create_thin", "1"]);
    let a_port = e2e::free_port();
    let a_nbd = format!("127.0.0.1:{a_port}");
    thin_dev(&a, root, "vol", 1, &a_nbd);

    // ext4 on the primary's volume, 48 MiB of it filled before replication starts (so a
    // full resync would be plain to see next to an incremental one).
    let fl = FuseLoop::attach(a_port, "vol", root).unwrap();
    let mnt = root.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    run_ok(Command::new("mkfs.ext4").args(["-F", "-q", "-E", "nodiscard", &fl.loopdev])).unwrap();
    run_ok(Command::new("mount").arg(&fl.loopdev).arg(&mnt)).unwrap();
    run_ok(Command::new("dd").args([
        "if=/dev/urandom",
        &format!("of={}", mnt.join("big").display()),
        "bs=1M",
        "count=48",
        "conv=fsync",
        "status=none",
    ]))
    .unwrap();

    let vol_args = |listen_or_peer: [&str; 2]| -> Vec<String> {
        let mut v: Vec<String> = [
            "--volume",
            "v1",
            "--pool",
            "pool",
            "--thin",
            "1",
            "--size",
            "128M",
            "--tls-dir",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.push(certs_s.clone());
        v.extend(listen_or_peer.iter().map(|s| s.to_string()));
        v
    };
    let run_repl = |d: &DaemonProc, verb: &str, extra: Vec<String>| -> String {
        let mut args = vec!["repl".to_string(), verb.to_string()];
        args.extend(extra);
        let r: Vec<&str> = args.iter().map(String::as_str).collect();
        d.ok(&r)
    };
    // A secondary's copy must not be active: refused, naming the device.
    let b_listen = format!("{b_addr}:7480");
    run_repl(&b, "secondary", vol_args(["--listen", &b_listen]));
    let mut p = vol_args(["--peer", &b_listen]);
    p.extend(["--interval".into(), "1s".into()]);
    run_repl(&a, "primary", p);
    // A pool a replication holds cannot be removed.
    let e = a.err(&["dev", "remove", "pool"]);
    assert!(e.contains("replication of v1"), "{e}");

    let first = Instant::now();
    wait_until("the first snapshot on the secondary", 60, || {
        num(&status(&b, "v1"), "last_synced_snapshot") > 0
    });
    eprintln!("initial sync: {:?}", first.elapsed());
    let full_sync = num(&status(&a, "v1"), "bytes_shipped");
    assert!(
        full_sync >= 48 * MIB,
        "initial sync shipped {full_sync} bytes"
    );

    // A writer on the mounted ext4; the lag (age of the secondary's newest complete
    // snapshot, in ms on the primary) stays under two intervals.
    let stop = Arc::new(AtomicBool::new(false));
    let w = {
        let (m, s) = (mnt.clone(), stop.clone());
        std::thread::spawn(move || writer(m, s))
    };
    let mut worst = 0;
    for _ in 0..16 {
        std::thread::sleep(Duration::from_millis(500));
        let s = status(&a, "v1");
        assert_eq!(s["state"], "replaying", "{s}");
        worst = worst.max(num(&s, "lag_ms"));
    }
    eprintln!("worst lag under the writer: {worst} ms (interval 1 s)");
    assert!(worst < 2000, "lag reached {worst} ms with a 1 s interval");
    let before_cut = status(&a, "v1");

    // The link cut for several intervals: the primary reports the error, then resumes from
    // the last common snapshot, shipping the change only.
    h.link_down();
    let t_cut = Instant::now();
    // The link timeout (10 s) tells a dead link from a slow one.
    wait_until("the primary reports the cut", 30, || {
        let s = status(&a, "v1");
        if t_cut.elapsed() > Duration::from_secs(28) {
            eprintln!("{s}\nprimary log: {}", a.log());
        }
        s["state"] == "error"
    });
    eprintln!("cut noticed after {:?}", t_cut.elapsed());
    std::thread::sleep(Duration::from_secs(3));
    let cut = status(&a, "v1");
    assert_eq!(cut["state"], "error", "{cut}");
    assert!(cut["last_error"].as_str().is_some(), "{cut}");
    assert!(num(&cut, "seconds_behind") >= 5, "{cut}");
    h.restore();
    let synced_then = num(&cut, "last_synced_snapshot");
    let shipped_then = num(&cut, "bytes_shipped");
    wait_until("replication resumes after the cut", 60, || {
        let s = status(&a, "v1");
        num(&s, "last_synced_snapshot") > synced_then && s["state"] == "replaying"
    });
    let resumed = status(&a, "v1");
    let resume_bytes = num(&resumed, "bytes_shipped") - shipped_then;
    eprintln!(
        "before the cut: {before_cut}\nresume shipped {resume_bytes} bytes (initial sync {full_sync})"
    );
    assert!(
        resume_bytes < 24 * MIB,
        "the resume shipped {resume_bytes} bytes: more like a full sync ({full_sync})"
    );

    // kill -9 of the primary while the writer runs; then promote on the secondary.
    std::thread::sleep(Duration::from_millis(1500));
    a.kill9();
    stop.store(true, Ordering::Release);
    // The file system lost its device: the writer stops on an error or the flag.
    let _ = w.join();
    let _ = Command::new("umount").args(["-l"]).arg(&mnt).status();
    drop(fl);
    let e = b.err(&["repl", "promote", "v1"]);
    assert!(e.contains("--force"), "{e}");
    let out = b.ok(&["repl", "promote", "v1", "--force"]);
    assert!(out.contains("promoted (forced)"), "{out}");
    let b_nbd = format!("{b_addr}:10811");
    thin_dev(&b, root, "vol", 1, &b_nbd);
    let promoted = read_export(&b_nbd, "vol", &root.join("b-promoted.img"));
    fsck_crash_image(&root.join("b-promoted.img"));

    // The old primary comes back: its replication snapshots (the acknowledged one and the
    // one in flight) are in its pool; the promoted copy equals exactly one of them.
    let a = DaemonProc::start(&root.join("a-state"));
    a.ok(&["repl", "stop", "v1"]);
    let st: Value =
        serde_json::from_slice(&std::fs::read(root.join("a-state/replication/v1.state")).unwrap())
            .unwrap();
    let mut candidates = Vec::new();
    for key in ["thin_id", "pending_thin_id"] {
        let id = st[key].as_u64().unwrap_or(0) as u32;
        if id == 0 {
            continue;
        }
        let port = e2e::free_port();
        let addr = format!("127.0.0.1:{port}");
        let name = format!("snap{id}");
        let tf = root.join(format!("{name}.table"));
        std::fs::write(&tf, format!("0 {VOL_SECTORS} thin /dev/volmgr/pool {id}\n")).unwrap();
        let o = a.vm(&[
            "dev",
            "create",
            &name,
            "--table",
            &tf.to_string_lossy(),
            "--nbd",
            &addr,
        ]);
        if !o.status.success() {
            continue; // the in-flight snapshot may not exist
        }
        candidates.push(read_export(&addr, &name, &root.join(format!("{name}.img"))));
        a.ok(&["dev", "remove", &name]);
    }
    let equal = candidates.iter().filter(|c| **c == promoted).count();
    assert_eq!(
        equal,
        1,
        "the promoted copy equals {equal} of the primary's {} replication snapshots (state {st})",
        candidates.len()
    );

    // Failback. The new primary writes 2 MiB; the old one is demoted, resynced from the last
    // common snapshot (only what diverged ships), and the roles are swapped back cleanly.
    let qio = |args: &[&str]| {
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw"]);
        for a in args {
            c.args(["-c", a]);
        }
        c.arg(format!("nbd://{b_nbd}/vol"));
        run_ok(&mut c).unwrap();
    };
    qio(&["write -P 0x5a 100M 2M"]);
    a.ok(&["dev", "remove", "vol"]);
    let out = a.ok(&["repl", "demote", "v1"]);
    assert!(out.contains("demoted"), "{out}");
    let a_listen = format!("{a_addr}:7481");
    run_repl(&a, "secondary", vol_args(["--listen", &a_listen]));
    let mut p = vol_args(["--peer", &a_listen]);
    p.extend(["--interval".into(), "1s".into()]);
    run_repl(&b, "primary", p);
    wait_until("the old primary catches up", 60, || {
        num(&status(&a, "v1"), "intervals") > 0
    });
    let back = num(&status(&b, "v1"), "bytes_shipped");
    assert!(
        back < 8 * MIB,
        "failback shipped {back} bytes for a 2 MiB change (initial sync {full_sync})"
    );
    qio(&["write -P 0x6b 110M 1M"]);
    b.ok(&["dev", "remove", "vol"]);
    let out = b.ok(&["repl", "demote", "v1"]);
    assert!(out.contains("is complete on the secondary"), "{out}");
    let out = a.ok(&["repl", "promote", "v1"]);
    assert!(out.contains("promoted:"), "{out}");
    thin_dev(&a, root, "vol", 1, &a_nbd);
    let back_home = read_export(&a_nbd, "vol", &root.join("a-back.img"));
    assert_eq!(&back_home[100 << 20..102 << 20], &[0x5a; 2 << 20][..]);
    assert_eq!(&back_home[110 << 20..111 << 20], &[0x6b; 1 << 20][..]);
    assert_eq!(&back_home[..100 << 20], &promoted[..100 << 20]);
    fsck_crash_image(&root.join("a-back.img"));
    let st = status(&a, "v1");
    assert_eq!(st["role"], "primary", "{st}");
    drop(b);
    drop(h);
}

/// `volmgr ARGS --devices DEVICES` on daemon `d`.
fn lvm_ok(d: &DaemonProc, devices: &Path, args: &[&str]) -> String {
    let mut a = args.to_vec();
    a.extend_from_slice(&["--devices", devices.to_str().unwrap()]);
    d.ok(&a)
}

/// The NBD URI of an active LV (`lvs -o lv_dm_path`).
fn lv_uri(d: &DaemonProc, devices: &Path, lv: &str) -> String {
    let out = lvm_ok(d, devices, &["lvs", "--noheadings", "-o", "lv_dm_path", lv]);
    let uri = out.trim().to_string();
    assert!(uri.starts_with("nbd://"), "{lv} is not exported: '{out}'");
    uri
}

/// Replication named by LVs: a thin LV of one VG replicates into a thin LV of another
/// daemon's VG (pool, thin id and size come from the LVM metadata); an active copy and a
/// non-thin LV are refused; after a demote and a promote the copy LV activates with the
/// primary's bytes, and its VG still reads clean.
#[test]
fn thin_lvs_replicate_by_name_and_the_copy_lv_serves_after_promote() {
    require_root();
    require_tools(&["openssl", "nbdcopy", "qemu-io"]);
    let tmp = tempfile::Builder::new()
        .prefix("repl-lv-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let root = tmp.path();
    let certs = root.join("certs");
    std::fs::create_dir(&certs).unwrap();
    make_certs(&certs, &["127.0.0.1"]);
    let certs_s = certs.to_string_lossy().to_string();
    let mut sides = Vec::new();
    for tag in ["a", "b"] {
        let state = root.join(format!("{tag}-state"));
        std::fs::create_dir(&state).unwrap();
        let d = DaemonProc::start(&state);
        let pv = root.join(format!("{tag}-pv.img"));
        sparse_file(&pv, 256 * MIB).unwrap();
        let vg = format!("vg{tag}");
        lvm_ok(
            &d,
            &pv,
            &["vgcreate", "-s", "1m", &vg, pv.to_str().unwrap()],
        );
        lvm_ok(
            &d,
            &pv,
            &[
                "lvcreate",
                "--type",
                "thin-pool",
                "-L",
                "64m",
                "-n",
                "pool",
                &vg,
            ],
        );
        sides.push((d, pv));
    }
    let (a, a_pv) = &sides[0];
    let (b, b_pv) = &sides[1];
    let nbd = ["--nbd", "127.0.0.1:0"];
    let mut create = vec!["lvcreate", "-V", "32m", "-T", "pool", "-n", "data", "vga"];
    create.extend_from_slice(&nbd);
    lvm_ok(a, a_pv, &create);
    let mut create = vec!["lvcreate", "-V", "32m", "-T", "pool", "-n", "copy", "vgb"];
    create.extend_from_slice(&nbd);
    lvm_ok(b, b_pv, &create);
    let uri = lv_uri(a, a_pv, "vga/data");
    e2e::qemu_io(&uri, &["write -P 0x3c 1M 5M", "write -P 0x4d 20M 3M"]);

    let listen = format!("127.0.0.1:{}", e2e::free_port());
    let repl = |d: &DaemonProc, pv: &Path, verb: &str, lv: &str, link: [&str; 2]| {
        let args = [
            "repl",
            verb,
            "--lv",
            lv,
            "--volume",
            "db",
            "--tls-dir",
            &certs_s,
            link[0],
            link[1],
            "--devices",
            pv.to_str().unwrap(),
        ];
        d.vm(&args)
    };
    // Refused: the copy is active; a thin pool is not a thin LV.
    let out = repl(b, b_pv, "secondary", "vgb/copy", ["--listen", &listen]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && e.contains("vgb/copy is active"),
        "{e}"
    );
    let out = repl(a, a_pv, "primary", "vga/pool", ["--peer", &listen]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && e.contains("is not a thin LV"),
        "{e}"
    );

    lvm_ok(b, b_pv, &["lvchange", "-an", "vgb/copy"]);
    let out = repl(b, b_pv, "secondary", "vgb/copy", ["--listen", &listen]);
    assert!(out.status.success(), "{out:?}");
    let out = repl(a, a_pv, "primary", "vga/data", ["--peer", &listen]);
    assert!(out.status.success(), "{out:?}");
    let st = status(a, "db");
    assert_eq!(st["pool"], "vga-pool", "{st}");
    assert_eq!(st["role"], "primary", "{st}");
    // A replicated LV is not removed from under its replication, on either side.
    for (d, pv, lv) in [(a, a_pv, "vga/data"), (b, b_pv, "vgb/copy")] {
        let out = d.vm(&["lvremove", "-y", lv, "--devices", pv.to_str().unwrap()]);
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && e.contains("is replicated as 'db'"),
            "{lv}: {e}"
        );
    }
    wait_until("the first snapshot on the secondary", 60, || {
        num(&status(b, "db"), "last_synced_snapshot") > 0
    });
    let shipped = num(&status(a, "db"), "bytes_shipped");
    assert!(
        (8 * MIB..12 * MIB).contains(&shipped),
        "8 MiB mapped, {shipped} bytes shipped"
    );

    // Hand over: the primary's LV inactive, demoted (one final snapshot), the copy promoted
    // and activated by its LV name.
    let primary_bytes = read_export_uri(&uri, &root.join("a.img"));
    lvm_ok(a, a_pv, &["lvchange", "-an", "vga/data"]);
    let out = a.ok(&["repl", "demote", "db"]);
    assert!(out.contains("demoted"), "{out}");
    let out = b.ok(&["repl", "promote", "db"]);
    assert!(out.contains("promoted:"), "{out}");
    let mut act = vec!["lvchange", "-ay", "vgb/copy"];
    act.extend_from_slice(&nbd);
    lvm_ok(b, b_pv, &act);
    let copy = read_export_uri(&lv_uri(b, b_pv, "vgb/copy"), &root.join("b.img"));
    assert_eq!(copy.len(), 32 * MIB as usize);
    assert!(
        copy == primary_bytes,
        "the promoted copy differs from the primary's LV"
    );
    assert_eq!(&copy[MIB as usize..6 * MIB as usize], &[0x3c; 5 << 20][..]);
    let r = lvm_ok(
        b,
        b_pv,
        &[
            "lvs",
            "--noheadings",
            "--separator",
            ";",
            "-o",
            "lv_name,lv_attr",
            "vgb",
        ],
    );
    assert!(r.contains("copy;Vwi-a-t---"), "{r}");
}

/// The whole volume behind `uri`, copied into `out` and returned.
fn read_export_uri(uri: &str, out: &Path) -> Vec<u8> {
    let _ = std::fs::remove_file(out);
    run_ok(Command::new("nbdcopy").arg(uri).arg(out)).unwrap();
    read_all(out).unwrap()
}
