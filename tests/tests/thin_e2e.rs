//! Thin provisioning end to end over NBD through the daemon: ext4 on a thin volume,
//! a snapshot taken while it is mounted and being written, the snapshot mounted and compared,
//! ten thin clones of one image through an external origin, fstrim returning space, and the
//! metadata tools (check, dump, restore) on the pool's metadata afterwards.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::*;

struct Env {
    dir: tempfile::TempDir,
    d: DaemonProc,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::Builder::new()
            .prefix("thin-e2e-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let d = DaemonProc::start(&dir.path().join("state"));
        Env { dir, d }
    }

    fn p(&self) -> &Path {
        self.dir.path()
    }

    fn vm(&self, args: &[&str]) -> String {
        self.d.ok(args)
    }

    /// Creates a device from table text; returns its NBD port.
    fn create(&self, name: &str, table: &str) -> u16 {
        let t = self.p().join(format!("{name}.table"));
        std::fs::write(&t, table).unwrap();
        self.d.create_nbd(name, &t)
    }

    /// Data blocks used by the pool (from its dm-thin style status line).
    fn data_used(&self) -> u64 {
        let st = self.vm(&["dev", "status", "pool"]);
        // `<start> <len> thin-pool <transaction> <meta used>/<total> <data used>/<total> ...`
        let f: Vec<&str> = st.split_whitespace().collect();
        let used = f.get(5).and_then(|x| x.split('/').next()).unwrap_or("");
        used.parse()
            .unwrap_or_else(|_| panic!("bad pool status: {st}"))
    }

    fn stop_daemon(&mut self) {
        assert_eq!(self.d.terminate(), 0, "daemon did not exit 0 on SIGTERM");
    }
}

/// A pool of 256 MiB data (64 KiB blocks) and a 1 GiB (over-provisioned) thin volume 0.
fn pool_and_volume(env: &Env) -> u16 {
    let meta = env.p().join("meta.img");
    let data = env.p().join("data.img");
    sparse_file(&meta, 16 << 20).unwrap();
    sparse_file(&data, 256 << 20).unwrap();
    env.create(
        "pool",
        &format!(
            "0 524288 thin-pool {} {} 128 64\n",
            meta.display(),
            data.display()
        ),
    );
    env.vm(&["dev", "message", "pool", "create_thin", "0"]);
    env.create("vol", "0 2097152 thin /dev/volmgr/pool 0\n")
}

/// Files of 64 KiB the background writer may write: 40 MiB, well inside the 256 MiB pool.
const MAX_WRITER_FILES: u64 = 640;

#[test]
fn snapshot_of_a_mounted_ext4_under_writes_then_fstrim_and_metadata_tools() {
    require_root();
    require_tools(&[
        "qemu-storage-daemon",
        "losetup",
        "mkfs.ext4",
        "e2fsck",
        "mount",
        "fstrim",
        "tune2fs",
    ]);
    let mut env = Env::new();
    let port = pool_and_volume(&env);
    let mnt = env.p().join("mnt");
    let snapmnt = env.p().join("snapmnt");
    std::fs::create_dir(&mnt).unwrap();
    std::fs::create_dir(&snapmnt).unwrap();
    let vol = FuseLoop::attach(port, "vol", &env.p().join("fv").tap_mkdir()).unwrap();
    run_ok(Command::new("mkfs.ext4").args(["-F", "-q", "-E", "nodiscard", &vol.loopdev])).unwrap();
    run_ok(
        Command::new("mount")
            .args(["-o", "nodiscard"])
            .arg(&vol.loopdev)
            .arg(&mnt),
    )
    .unwrap();
    let used_empty = env.data_used();

    // Set A, synced before the snapshot.
    let a = mnt.join("a");
    std::fs::create_dir(&a).unwrap();
    for i in 0..30 {
        std::fs::write(
            a.join(format!("f{i}")),
            pseudo_random(100_000 + i * 4099, i as u64),
        )
        .unwrap();
    }
    run_ok(&mut Command::new("sync")).unwrap();
    let sums_a = tree_sums(&mnt, "a");

    // A writer keeps going while the snapshot is taken.
    let stop = Arc::new(AtomicBool::new(false));
    let (stop2, mnt2) = (stop.clone(), mnt.clone());
    let writer = std::thread::spawn(move || {
        let b = mnt2.join("b");
        std::fs::create_dir(&b).unwrap();
        // Bounded (the pool holds 256 MiB): unthrottled, a fast host writes hundreds of
        // MiB through the page cache in the ~0.6 s this runs and fills the pool, whose
        // queue_if_no_space then stalls the file system. Paced so it is still writing
        // while the snapshot is taken.
        let mut i = 0u64;
        while !stop2.load(Ordering::SeqCst) && i < MAX_WRITER_FILES {
            std::fs::write(b.join(format!("g{i}")), pseudo_random(64 << 10, 1000 + i)).unwrap();
            i += 1;
            std::thread::sleep(Duration::from_millis(1));
        }
        i
    });
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    env.vm(&["dev", "message", "pool", "create_snap", "1", "0"]);
    let snap_time = t0.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let written = writer.join().unwrap();
    assert!(written > 0);
    eprintln!(
        "create_snap round trip through the CLI: {snap_time:?}; writer wrote {written} files"
    );

    // Change set A on the origin after the snapshot.
    std::fs::write(a.join("f0"), b"changed after the snapshot").unwrap();
    run_ok(&mut Command::new("sync")).unwrap();

    // Mount the snapshot (journal replay, then a fresh UUID so both can be mounted).
    let sport = env.create("snap", "0 2097152 thin /dev/volmgr/pool 1\n");
    let snap = FuseLoop::attach(sport, "snap", &env.p().join("fs").tap_mkdir()).unwrap();
    let fsck = run(Command::new("e2fsck").args(["-fy", &snap.loopdev])).unwrap();
    assert!(
        fsck.status.code().unwrap_or(8) < 4,
        "snapshot fsck: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    run_ok(Command::new("tune2fs").args(["-U", "random", &snap.loopdev])).unwrap();
    run_ok(Command::new("mount").arg(&snap.loopdev).arg(&snapmnt)).unwrap();
    assert_eq!(
        tree_sums(&snapmnt, "a"),
        sums_a,
        "the snapshot must hold set A as it was"
    );
    let origin_now = tree_sums(&mnt, "a");
    assert_ne!(origin_now, sums_a, "the origin changed after the snapshot");
    run_ok(Command::new("umount").arg(&snapmnt)).unwrap();
    let clean = run(Command::new("e2fsck").args(["-fn", &snap.loopdev])).unwrap();
    assert!(
        clean.status.success(),
        "snapshot not clean: {}",
        String::from_utf8_lossy(&clean.stdout)
    );
    drop(snap);

    // fstrim returns space: delete set B and trim.
    let used_full = env.data_used();
    assert!(
        used_full > used_empty,
        "writes must provision blocks ({used_empty} -> {used_full})"
    );
    std::fs::remove_dir_all(mnt.join("b")).unwrap();
    run_ok(&mut Command::new("sync")).unwrap();
    run_ok(Command::new("fstrim").arg("-v").arg(&mnt)).unwrap();
    let used_trimmed = env.data_used();
    assert!(
        used_trimmed < used_full,
        "fstrim must return blocks to the pool ({used_full} -> {used_trimmed})"
    );
    run_ok(Command::new("umount").arg(&mnt)).unwrap();
    let clean = run(Command::new("e2fsck").args(["-fn", &vol.loopdev])).unwrap();
    assert!(
        clean.status.success(),
        "origin not clean: {}",
        String::from_utf8_lossy(&clean.stdout)
    );
    drop(vol);

    // Deleting the snapshot frees what only it used.
    env.vm(&["dev", "remove", "snap"]);
    env.vm(&["dev", "message", "pool", "delete", "1"]);
    assert!(env.data_used() <= used_trimmed);

    // Metadata tools on the pool's metadata once the daemon has stopped (the pool is closed).
    env.stop_daemon();
    let vm = volmgr_bin();
    let meta = env.p().join("meta.img");
    let check = run_ok(
        Command::new(&vm)
            .args(["pool", "check", "--json"])
            .arg(&meta),
    )
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&check).unwrap();
    assert_eq!(v["clean"].as_bool(), Some(true), "{check}");
    assert_eq!(v["devices"].as_u64(), Some(1), "{check}");
    let dump = env.p().join("dump.json");
    run_ok(
        Command::new(&vm)
            .args(["pool", "dump", "--json", "-o"])
            .arg(&dump)
            .arg(&meta),
    )
    .unwrap();
    let restored = env.p().join("restored.img");
    sparse_file(&restored, 16 << 20).unwrap();
    let refused = run(Command::new(&vm)
        .args(["pool", "restore", "-i"])
        .arg(&dump)
        .arg(&restored))
    .unwrap();
    assert!(
        !refused.status.success(),
        "restore without --yes must be refused"
    );
    run_ok(
        Command::new(&vm)
            .args(["pool", "restore", "--yes", "-i"])
            .arg(&dump)
            .arg(&restored),
    )
    .unwrap();
    let check2 = run_ok(
        Command::new(&vm)
            .args(["pool", "check", "--json"])
            .arg(&restored),
    )
    .unwrap();
    let v2: serde_json::Value = serde_json::from_str(&check2).unwrap();
    assert_eq!(v2["clean"].as_bool(), Some(true), "{check2}");
    assert_eq!(
        v2["mapped_blocks"], v["mapped_blocks"],
        "{check} vs {check2}"
    );
    // A corrupted copy is reported, naming the block, not a panic.
    let bad = env.p().join("bad.img");
    let mut bytes = read_all(&meta).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&bad, &bytes).unwrap();
    let o = run(Command::new(&vm).args(["pool", "check"]).arg(&bad)).unwrap();
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("block"), "{err}");
}

trait TapMkdir {
    fn tap_mkdir(self) -> PathBuf;
}

impl TapMkdir for PathBuf {
    fn tap_mkdir(self) -> PathBuf {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

#[test]
fn ten_thin_clones_of_one_image_share_it() {
    require_root();
    require_tools(&["mkfs.ext4", "nbdcopy"]);
    let env = Env::new();
    let meta = env.p().join("meta.img");
    let data = env.p().join("data.img");
    sparse_file(&meta, 16 << 20).unwrap();
    sparse_file(&data, 256 << 20).unwrap();
    env.create(
        "pool",
        &format!(
            "0 524288 thin-pool {} {} 128 0\n",
            meta.display(),
            data.display()
        ),
    );
    // The golden image: a 64 MiB ext4 file system populated from a directory.
    let src = env.p().join("src");
    std::fs::create_dir(&src).unwrap();
    for i in 0..10 {
        std::fs::write(src.join(format!("file{i}")), pseudo_random(200_000, 77 + i)).unwrap();
    }
    let image = env.p().join("golden.img");
    sparse_file(&image, 64 << 20).unwrap();
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-F", "-q", "-d"])
            .arg(&src)
            .arg(&image),
    )
    .unwrap();
    let golden = read_all(&image).unwrap();
    let mut ports = Vec::new();
    for id in 0..10 {
        env.vm(&["dev", "message", "pool", "create_thin", &id.to_string()]);
        let port = env.create(
            &format!("clone{id}"),
            &format!("0 131072 thin /dev/volmgr/pool {id} {}\n", image.display()),
        );
        ports.push(port);
    }
    let used_before = env.data_used();
    assert_eq!(used_before, 0, "clones must not copy the image");
    // Every clone reads the image.
    for (id, port) in ports.iter().enumerate() {
        let out = env.p().join(format!("clone{id}.out"));
        run_ok(
            Command::new("nbdcopy")
                .arg(format!("nbd://127.0.0.1:{port}/clone{id}"))
                .arg(&out),
        )
        .unwrap();
        assert!(
            read_all(&out).unwrap() == golden,
            "clone {id} differs from the image"
        );
        std::fs::remove_file(&out).unwrap();
    }
    // Writing one clone changes only that clone.
    require_tool("qemu-io");
    let o = run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x77 1M 100k"])
        .arg(format!("nbd://127.0.0.1:{}/clone3", ports[3])))
    .unwrap();
    assert!(o.status.success());
    let used_after = env.data_used();
    assert!(
        (2..=3).contains(&used_after),
        "a 100 KiB write provisions 2-3 blocks, got {used_after}"
    );
    let out = env.p().join("c4.out");
    run_ok(
        Command::new("nbdcopy")
            .arg(format!("nbd://127.0.0.1:{}/clone4", ports[4]))
            .arg(&out),
    )
    .unwrap();
    assert!(
        read_all(&out).unwrap() == golden,
        "clone 4 must be unaffected"
    );
    let out3 = env.p().join("c3.out");
    run_ok(
        Command::new("nbdcopy")
            .arg(format!("nbd://127.0.0.1:{}/clone3", ports[3]))
            .arg(&out3),
    )
    .unwrap();
    let c3 = read_all(&out3).unwrap();
    assert!(c3[(1 << 20)..(1 << 20) + 100 * 1024]
        .iter()
        .all(|&b| b == 0x77));
    assert!(
        c3[..1 << 20] == golden[..1 << 20]
            && c3[(1 << 20) + 100 * 1024..] == golden[(1 << 20) + 100 * 1024..]
    );
    assert!(
        read_all(&image).unwrap() == golden,
        "the origin image must never be written"
    );
    let mut env = env;
    env.stop_daemon();
}

/// The pool's data and metadata totals (blocks) from its status line.
fn totals(env: &Env) -> (u64, u64) {
    let st = env.vm(&["dev", "status", "pool"]);
    let f: Vec<&str> = st.split_whitespace().collect();
    let total = |i: usize| -> u64 {
        f.get(i)
            .and_then(|x| x.split('/').nth(1))
            .and_then(|x| x.parse().ok())
            .unwrap_or_else(|| panic!("bad pool status: {st}"))
    };
    (total(5), total(4))
}

/// `volmgr pool resize` grows a live pool's data and metadata files; the pool takes the space
/// at once (a volume fills past the old capacity), data written before reads back, and a
/// shrink is refused with the device named.
#[test]
fn pool_resize_grows_a_live_pool() {
    require_root();
    require_tools(&["qemu-io"]);
    let env = Env::new();
    let meta = env.p().join("meta.img");
    let data = env.p().join("data.img");
    sparse_file(&meta, 4 << 20).unwrap();
    sparse_file(&data, 16 << 20).unwrap();
    env.create(
        "pool",
        &format!(
            "0 32768 thin-pool {} {} 128 0 1 error_if_no_space\n",
            meta.display(),
            data.display()
        ),
    );
    env.vm(&["dev", "message", "pool", "create_thin", "0"]);
    let port = env.create("vol", "0 131072 thin /dev/volmgr/pool 0\n");
    let uri = format!("nbd://127.0.0.1:{port}/vol");
    let qemu_io = |cmd: &str| {
        let o = run(Command::new("qemu-io")
            .args(["-f", "raw", "-c", cmd])
            .arg(&uri))
        .unwrap();
        String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr)
    };
    let (data0, meta0) = totals(&env);
    assert_eq!(data0, 256, "16 MiB of 64 KiB blocks");

    // 16 MiB fits; the pool is then full and the next block fails (error_if_no_space).
    let out = qemu_io("write -P 0xa1 0 16M");
    assert!(!out.contains("error") && !out.contains("failed"), "{out}");
    let out = qemu_io("write -P 0xa2 16M 1M");
    assert!(
        out.contains("error") || out.contains("failed"),
        "a full pool took more: {out}"
    );

    let out = env.vm(&[
        "pool",
        "resize",
        "pool",
        "--data-size",
        "32M",
        "--metadata-size",
        "8M",
    ]);
    assert!(
        out.contains("data device") && out.contains("metadata device"),
        "resize said: {out}"
    );
    let (data1, meta1) = totals(&env);
    assert_eq!(data1, 512, "data total after growing to 32 MiB");
    assert!(meta1 > meta0, "metadata total {meta0} -> {meta1}");

    let out = qemu_io("write -P 0xa2 16M 12M");
    assert!(!out.contains("error") && !out.contains("failed"), "{out}");
    let out = qemu_io("read -P 0xa1 0 16M");
    assert!(!out.contains("error") && !out.contains("failed"), "{out}");
    let out = qemu_io("read -P 0xa2 16M 12M");
    assert!(!out.contains("error") && !out.contains("failed"), "{out}");

    let e = env.d.err(&["pool", "resize", "pool", "--data-size", "8M"]);
    assert!(
        e.contains("cannot shrink") && e.contains("data.img"),
        "shrink refused with the device named: {e}"
    );
    assert_eq!(totals(&env).0, 512);
}
