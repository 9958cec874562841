//! RAID end to end over NBD: ext4 on a raid5 whose legs are daemon devices; a leg fails while
//! files are being written (its table is reloaded with `error`), the file system keeps going,
//! the leg is rebuilt onto a fresh file under load, fsck is clean and every checksum matches.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::*;

fn write_tree(root: &Path, tag: &str, n: usize) {
    let d = root.join(tag);
    std::fs::create_dir_all(&d).unwrap();
    for i in 0..n {
        std::fs::write(
            d.join(format!("f{i}")),
            pseudo_random(50_000 + i * 7919, (i as u64) << 8 | tag.len() as u64),
        )
        .unwrap();
    }
}

#[test]
fn raid5_survives_a_failed_leg_and_rebuilds_under_a_mounted_ext4() {
    require_root();
    require_tools(&[
        "qemu-storage-daemon",
        "losetup",
        "mkfs.ext4",
        "e2fsck",
        "mount",
    ]);
    let dir = tempfile::Builder::new()
        .prefix("raid-e2e-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let p = dir.path();
    let state = p.join("state");
    let mut d = DaemonProc::start(&state);

    // Three 64 MiB data legs, each a daemon device over a file; metadata straight on files.
    let mut raid = String::from("0 262144 raid raid5_ls 3 128 region_size 1024 3");
    for i in 0..3 {
        let data = p.join(format!("d{i}.img"));
        let meta = p.join(format!("m{i}.img"));
        sparse_file(&data, 64 << 20).unwrap();
        sparse_file(&meta, 1 << 20).unwrap();
        let t = p.join(format!("leg{i}.table"));
        std::fs::write(&t, format!("0 131072 linear {} 0\n", data.display())).unwrap();
        d.ok(&[
            "dev",
            "create",
            &format!("leg{i}"),
            "--table",
            t.to_str().unwrap(),
            "--nbd",
            &format!("127.0.0.1:{}", free_port()),
        ]);
        raid.push_str(&format!(" {} /dev/volmgr/leg{i}", meta.display()));
    }
    let rt = p.join("r5.table");
    std::fs::write(&rt, format!("{raid}\n")).unwrap();
    let port = free_port();
    d.ok(&[
        "dev",
        "create",
        "r5",
        "--table",
        rt.to_str().unwrap(),
        "--nbd",
        &format!("127.0.0.1:{port}"),
    ]);
    // Let the initial sync finish so the array starts healthy.
    wait_for_status(&d, "AAA", "idle");

    let mnt = p.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let fl = FuseLoop::attach(port, "r5", p).unwrap();
    run_ok(Command::new("mkfs.ext4").args(["-F", "-q", &fl.loopdev])).unwrap();
    run_ok(Command::new("mount").arg(&fl.loopdev).arg(&mnt)).unwrap();
    write_tree(&mnt, "before", 40);
    run_ok(&mut Command::new("sync")).unwrap();

    // Leg 1 dies: its device now fails every request.
    let dead = p.join("dead.table");
    std::fs::write(&dead, "0 131072 error\n").unwrap();
    d.ok(&["dev", "reload", "leg1", "--table", dead.to_str().unwrap()]);
    write_tree(&mnt, "degraded", 40);
    run_ok(&mut Command::new("sync")).unwrap();
    let st = d.ok(&["dev", "status", "r5"]);
    assert!(
        st.contains(" ADA ") || st.contains(" AaA "),
        "leg 1 must be marked failed: {st}"
    );

    // Rebuild onto a fresh file while more files are written.
    let fresh = p.join("fresh.img");
    sparse_file(&fresh, 64 << 20).unwrap();
    d.ok(&[
        "dev",
        "message",
        "r5",
        "rebuild",
        "1",
        fresh.to_str().unwrap(),
    ]);
    write_tree(&mnt, "during-rebuild", 40);
    run_ok(&mut Command::new("sync")).unwrap();
    wait_for_status(&d, "AAA", "idle");
    let before = tree_sums(&mnt, ".");
    run_ok(Command::new("umount").arg(&mnt)).unwrap();
    let fsck = run(Command::new("e2fsck").args(["-fn", &fl.loopdev])).unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    run_ok(Command::new("mount").arg(&fl.loopdev).arg(&mnt)).unwrap();
    let after = tree_sums(&mnt, ".");
    run_ok(Command::new("umount").arg(&mnt)).unwrap();
    assert_eq!(before.lines().count(), 120);
    assert_eq!(before, after);

    // A scrub finds parity consistent.
    d.ok(&["dev", "message", "r5", "check"]);
    let st = wait_for_status(&d, "AAA", "idle");
    let mismatches: Vec<&str> = st.split_whitespace().collect();
    assert_eq!(
        mismatches.get(8).copied(),
        Some("0"),
        "mismatch count after check: {st}"
    );

    drop(fl);
    assert_eq!(d.terminate(), 0);
}

/// Polls `dev status r5` until the health field and action match; returns the status line.
fn wait_for_status(d: &DaemonProc, health: &str, action: &str) -> String {
    let t0 = Instant::now();
    loop {
        let st = d.ok(&["dev", "status", "r5"]);
        // `<start> <len> raid <type> <#legs> <health> <ratio> <action> <mismatches> ...`
        let f: Vec<&str> = st.split_whitespace().collect();
        if f.get(5) == Some(&health) && f.get(7) == Some(&action) {
            return st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "raid did not reach {health} {action}: {st}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
