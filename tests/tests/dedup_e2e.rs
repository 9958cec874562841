//! Thin-pool deduplication end to end through the daemon over NBD: `volmgr pool dedup-scan`
//! on a plain pool reloaded with `dedup`, `volmgr pool import` of ten image clones, and two
//! ext4 file systems holding the same tree (plus a snapshot) in one dedup pool.

use std::path::Path;
use std::process::Command;

use e2e::*;

struct Env {
    dir: tempfile::TempDir,
    d: DaemonProc,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::Builder::new()
            .prefix("dedup-e2e-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let d = DaemonProc::start(&dir.path().join("state"));
        Env { dir, d }
    }

    fn p(&self) -> &Path {
        self.dir.path()
    }

    fn table_file(&self, name: &str, table: &str) -> String {
        let t = self.p().join(format!("{name}.table"));
        std::fs::write(&t, table).unwrap();
        t.to_string_lossy().into_owned()
    }

    /// Creates a device exported over NBD; returns its URI.
    fn create(&self, name: &str, table: &str) -> String {
        format!("nbd://127.0.0.1:{}/{name}", self.create_port(name, table))
    }

    /// Creates a device exported over NBD; returns its port.
    fn create_port(&self, name: &str, table: &str) -> u16 {
        let t = self.table_file(name, table);
        self.d.create_nbd(name, Path::new(&t))
    }

    /// The pool's status line.
    fn status(&self) -> String {
        self.d.ok(&["dev", "status", "pool"])
    }

    /// Data blocks the pool uses.
    fn data_used(&self) -> u64 {
        let st = self.status();
        let f: Vec<&str> = st.split_whitespace().collect();
        f.get(5)
            .and_then(|x| x.split('/').next())
            .and_then(|x| x.parse().ok())
            .unwrap_or_else(|| panic!("bad pool status: {st}"))
    }

    /// Copies `uri` into a file and returns its bytes.
    fn read_volume(&self, uri: &str) -> Vec<u8> {
        let out = self.p().join("readback.out");
        let _ = std::fs::remove_file(&out);
        run_ok(Command::new("nbdcopy").arg(uri).arg(&out)).unwrap();
        let v = read_all(&out).unwrap();
        std::fs::remove_file(&out).unwrap();
        v
    }
}

/// The `<unhashed>` field of a dedup pool's status tail.
fn unhashed(status: &str) -> u64 {
    let w: Vec<&str> = status.split_whitespace().collect();
    let i = w
        .iter()
        .position(|x| *x == "dedup")
        .unwrap_or_else(|| panic!("no dedup tail: {status}"));
    w.get(i + 8)
        .and_then(|x| x.parse().ok())
        .unwrap_or_else(|| panic!("bad dedup tail: {status}"))
}

/// A plain pool with the same 4 MiB written to two thin volumes (and 1 MiB only one has),
/// reloaded with `dedup` and scanned: the duplicate copy's blocks are freed, both volumes read
/// back as written, and a second scan finds nothing left to do.
#[test]
fn dedup_scan_shares_blocks_written_before_dedup() {
    require_root();
    require_tools(&["nbdcopy"]);
    let env = Env::new();
    let meta = env.p().join("meta.img");
    let data = env.p().join("data.img");
    sparse_file(&meta, 16 << 20).unwrap();
    sparse_file(&data, 64 << 20).unwrap();
    let plain = format!(
        "0 131072 thin-pool {} {} 8 0\n",
        meta.display(),
        data.display()
    );
    env.create("pool", &plain);
    let mut uris = Vec::new();
    for id in 0..2 {
        env.d
            .ok(&["dev", "message", "pool", "create_thin", &id.to_string()]);
        uris.push(env.create(
            &format!("vol{id}"),
            &format!("0 32768 thin /dev/volmgr/pool {id}\n"),
        ));
    }
    let same = pseudo_random(4 << 20, 1);
    let only1 = pseudo_random(1 << 20, 2);
    let img0 = env.p().join("img0");
    let img1 = env.p().join("img1");
    let mut want1 = same.clone();
    want1.resize(8 << 20, 0);
    want1.extend_from_slice(&only1);
    std::fs::write(&img0, &same).unwrap();
    std::fs::write(&img1, &want1).unwrap();
    // `--destination-is-zero`: nbdcopy would otherwise zero the holes, which a plain pool
    // stores as written blocks.
    for (img, uri) in [(&img0, &uris[0]), (&img1, &uris[1])] {
        run_ok(
            Command::new("nbdcopy")
                .arg("--destination-is-zero")
                .arg(img)
                .arg(uri),
        )
        .unwrap();
    }
    assert_eq!(env.data_used(), 1024 + 1024 + 256, "{}", env.status());

    // Scanning a plain pool is refused with the reason.
    let e = env.d.err(&["pool", "dedup-scan", "pool"]);
    assert!(e.contains("not a dedup pool"), "{e}");

    let t = env.table_file("pool-dedup", &plain.replace(" 8 0\n", " 8 0 1 dedup\n"));
    env.d.ok(&["dev", "reload", "pool", "--table", &t]);
    assert_eq!(unhashed(&env.status()), 2304, "{}", env.status());

    // A scan stopped half way (one step by hand, as an interrupted run leaves it); the
    // verb then carries on from where it stopped instead of starting over.
    let step = env.d.ok(&["dev", "message", "pool", "dedup_scan", "1500"]);
    let field = |k: &str| -> u64 {
        let w: Vec<&str> = step.split_whitespace().collect();
        let i = w.iter().position(|x| *x == k).unwrap();
        w[i + 1].parse().unwrap()
    };
    let (visited1, shared1) = (field("visited"), field("shared"));
    assert!(step.contains("running") && visited1 > 0, "{step}");
    let out = env
        .d
        .ok(&["pool", "dedup-scan", "pool", "--step", "300", "--json"]);
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["data_used_before"], 2304 - shared1, "{out}");
    assert_eq!(r["data_used_after"], 1280, "{out}");
    assert_eq!(r["shared"], 1024 - shared1, "{out}");
    // Both volumes hold 2304 mappings: the rest of the pass, once.
    assert_eq!(r["visited"], 2304 - visited1, "{out}");
    assert_eq!(r["passes"], 1, "{out}");
    assert_eq!(r["unhashed_left"], 0, "{out}");
    assert_eq!(env.data_used(), 1280);
    assert_eq!(unhashed(&env.status()), 0);

    let mut want0 = same.clone();
    want0.resize(16 << 20, 0);
    want1.resize(16 << 20, 0);
    assert!(env.read_volume(&uris[0]) == want0, "vol0 differs");
    assert!(env.read_volume(&uris[1]) == want1, "vol1 differs");

    // Run again: nothing is left, so nothing is hashed and nothing changes.
    let out = env.d.ok(&["pool", "dedup-scan", "pool", "--json"]);
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (r["hashed"].as_u64(), r["shared"].as_u64()),
        (Some(0), Some(0)),
        "{out}"
    );
    assert_eq!(r["data_used_after"], 1280, "{out}");
    let mut env = env;
    assert_eq!(env.d.terminate(), 0, "daemon did not exit 0 on SIGTERM");

    // `pool check` recounts the hash records: one per used block, none stale or duplicate.
    let m = meta.to_string_lossy();
    let out = env.d.ok(&["pool", "check", &m]);
    assert!(
        out.contains("\ndedup: 1280 hash record(s), 0 stale, 0 duplicate hash(es)\n"),
        "{out}"
    );
    let r: serde_json::Value =
        serde_json::from_str(&env.d.ok(&["pool", "check", &m, "--json"])).unwrap();
    assert_eq!(r["clean"], true, "{r}");
    assert_eq!(
        (
            &r["hash_records"],
            &r["stale_hash_records"],
            &r["duplicate_hashes"]
        ),
        (&1280.into(), &0.into(), &0.into()),
        "{r}"
    );
}

/// A dedup pool of `data_mib` MiB of data (4 KiB blocks) and `meta_mib` of metadata.
fn dedup_pool(env: &Env, data_mib: u64, meta_mib: u64) {
    let meta = env.p().join("meta.img");
    let data = env.p().join("data.img");
    sparse_file(&meta, meta_mib << 20).unwrap();
    sparse_file(&data, data_mib << 20).unwrap();
    env.create(
        "pool",
        &format!(
            "0 {} thin-pool {} {} 8 0 1 dedup\n",
            data_mib << 11,
            meta.display(),
            data.display()
        ),
    );
}

/// Ten clones of one 16 MiB image (8 MiB of data, the rest zeroes), each with three 4 KiB
/// blocks of its own, imported as ten thin volumes (one of them as qcow2): the pool holds one
/// image plus the changes, and each volume reads back equal to its source.
#[test]
fn ten_imported_clones_of_one_image_take_one_image_of_space() {
    require_root();
    require_tools(&["nbdcopy", "qemu-img"]);
    let env = Env::new();
    dedup_pool(&env, 64, 16);
    let mut golden = pseudo_random(8 << 20, 7);
    golden.resize(16 << 20, 0);
    let mut sources = Vec::new();
    for i in 0..10u64 {
        let mut img = golden.clone();
        for k in 0..3u64 {
            let b = ((i * 131 + k * 577) % 2048) as usize;
            img[b * 4096..(b + 1) * 4096]
                .copy_from_slice(&pseudo_random(4096, 1000 + 2 * (i * 3 + k)));
        }
        let raw = env.p().join(format!("clone{i}.raw"));
        std::fs::write(&raw, &img).unwrap();
        let file = if i == 4 {
            let q = env.p().join("clone4.qcow2");
            run_ok(
                Command::new("qemu-img")
                    .args(["convert", "-f", "raw", "-O", "qcow2"])
                    .arg(&raw)
                    .arg(&q),
            )
            .unwrap();
            q
        } else {
            raw
        };
        sources.push(img);
        let out = env.d.ok(&[
            "pool",
            "import",
            "pool",
            "--thin-id",
            &i.to_string(),
            &file.to_string_lossy(),
            "--json",
        ]);
        let r: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(r["format"], if i == 4 { "qcow2" } else { "raw" }, "{out}");
        assert_eq!(r["bytes"], 16 << 20, "{out}");
        // The zero half is not written.
        assert_eq!(r["zero_pieces"], 2048, "{out}");
        assert_eq!(r["written_pieces"], 2048, "{out}");
    }
    // One image (2048 blocks) and 3 blocks per clone; nothing else.
    let used = env.data_used();
    let want = 2048 + 10 * 3;
    assert!(
        (want..=want + want / 100).contains(&used),
        "used {used}, want about {want}: {}",
        env.status()
    );
    // The temporary exports are gone.
    let list = env.d.ok(&["dev", "list"]);
    assert!(!list.contains("import-"), "{list}");
    for (i, src) in sources.iter().enumerate() {
        let uri = env.create(
            &format!("vol{i}"),
            &format!("0 32768 thin /dev/volmgr/pool {i}\n"),
        );
        assert!(
            env.read_volume(&uri) == *src,
            "volume {i} differs from its source"
        );
    }
    // An id that exists is refused before anything is written.
    let e = env.d.err(&[
        "pool",
        "import",
        "pool",
        "--thin-id",
        "3",
        &env.p().join("clone3.raw").to_string_lossy(),
    ]);
    assert!(e.contains("create_thin 3"), "{e}");
    assert_eq!(env.data_used(), used);
    let mut env = env;
    assert_eq!(env.d.terminate(), 0, "daemon did not exit 0 on SIGTERM");
}

/// The tree the ext4 test copies: the host's Python standard library (tens of MiB of
/// real files), or /usr/share/doc where there is none.
fn source_tree() -> std::path::PathBuf {
    let mut py: Vec<_> = std::fs::read_dir("/usr/lib")
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("python3.") && p.join("os.py").exists())
        })
        .collect();
    py.sort();
    py.pop()
        .unwrap_or_else(|| std::path::PathBuf::from("/usr/share/doc"))
}

fn mount(dev: &str, at: &Path, opts: &str) {
    run_ok(Command::new("mount").args(["-o", opts]).arg(dev).arg(at)).unwrap();
}

fn umount(at: &Path) {
    run_ok(Command::new("umount").arg(at)).unwrap();
}

fn fsck_clean(dev: &str) {
    let o = run(Command::new("e2fsck").args(["-fn", dev])).unwrap();
    assert!(
        o.status.success(),
        "e2fsck -fn {dev}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Two ext4 file systems on two thin volumes of one dedup pool with the same directory tree
/// copied into both, plus a snapshot of the first: the second copy and the snapshot add
/// little (used data < 1.3x and > 0.9x of one copy: ext4's own metadata differs), every file
/// system is fsck clean, and after a daemon restart every file's checksum matches the source.
#[test]
fn two_ext4_copies_of_one_tree_and_a_snapshot_take_about_one_copy() {
    require_root();
    require_tools(&[
        "qemu-storage-daemon",
        "losetup",
        "mkfs.ext4",
        "e2fsck",
        "mount",
        "umount",
        "cp",
        "du",
        "sha256sum",
    ]);
    let src = source_tree();
    let (src_parent, src_name) = (
        src.parent().unwrap().to_path_buf(),
        src.file_name().unwrap().to_string_lossy().into_owned(),
    );
    let want_sums = tree_sums(&src_parent, &src_name);
    let mut env = Env::new();
    dedup_pool(&env, 512, 64);
    let mut ports = Vec::new();
    for id in 0..2 {
        env.d
            .ok(&["dev", "message", "pool", "create_thin", &id.to_string()]);
        ports.push(env.create_port(
            &format!("vol{id}"),
            &format!("0 1048576 thin /dev/volmgr/pool {id}\n"),
        ));
    }
    let attach = |env: &Env, port: u16, name: &str| {
        let dir = env.p().join(format!("fl-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        FuseLoop::attach(port, name, &dir).unwrap()
    };
    let mnt = env.p().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mut used = Vec::new();
    {
        let vols = [
            attach(&env, ports[0], "vol0"),
            attach(&env, ports[1], "vol1"),
        ];
        for v in &vols {
            run_ok(Command::new("mkfs.ext4").args(["-F", "-q", "-E", "nodiscard", &v.loopdev]))
                .unwrap();
        }
        used.push(env.data_used());
        for v in &vols {
            mount(&v.loopdev, &mnt, "nodiscard");
            run_ok(Command::new("cp").arg("-a").arg(&src).arg(&mnt)).unwrap();
            umount(&mnt);
            used.push(env.data_used());
        }
        for v in &vols {
            fsck_clean(&v.loopdev);
        }
    }
    let [empty, one, two] = used[..] else {
        unreachable!()
    };
    let one_copy = one - empty;
    let both = two - empty;
    let tree_blocks: u64 = run_ok(Command::new("du").args(["-sB4096"]).arg(&src))
        .unwrap()
        .split_whitespace()
        .next()
        .and_then(|x| x.parse().ok())
        .unwrap();
    eprintln!(
        "{}: {tree_blocks} blocks; empty file systems {empty}, one copy {one_copy}, \
         both {both}",
        src.display()
    );
    assert!(
        one_copy * 2 > tree_blocks,
        "one copy took {one_copy} blocks for a tree of {tree_blocks}"
    );
    assert!(
        both * 10 > one_copy * 9 && both * 10 < one_copy * 13,
        "two copies took {both} blocks, one {one_copy} (empty file systems {empty}): {}",
        env.status()
    );
    // A snapshot of the first volume takes nothing.
    env.d
        .ok(&["dev", "message", "pool", "create_snap", "2", "0"]);
    ports.push(env.create_port("snap", "0 1048576 thin /dev/volmgr/pool 2\n"));
    assert_eq!(env.data_used(), two);

    // After a restart the daemon brings every device back from its state directory.
    assert_eq!(env.d.terminate(), 0, "daemon did not exit 0 on SIGTERM");
    env.d = DaemonProc::start(&env.d.state);
    for (port, name) in ports.iter().zip(["vol0", "vol1", "snap"]) {
        let v = attach(&env, *port, name);
        fsck_clean(&v.loopdev);
        mount(&v.loopdev, &mnt, "ro");
        let sums = tree_sums(&mnt, &src_name);
        umount(&mnt);
        assert!(
            sums == want_sums,
            "{name}: checksums differ from {}",
            src.display()
        );
    }
    assert_eq!(env.data_used(), two);
    assert_eq!(env.d.terminate(), 0, "daemon did not exit 0 on SIGTERM");
}
