//! A PV with two paths (`pvcreate 'URI1|URI2'`: two nbdkit servers serving the same file) and
//! two single-path PVs; a raid1 LV over the two-path PV and one other is activated through the
//! daemon, which runs the PV's multipath device `VG-pv0_mpath` under the LV's image. One of
//! the two servers is killed under a writer: no client error, the raid keeps both legs (AA),
//! the multipath device shows that path F; the server returns: the path is A again. Also: a
//! group whose paths show different PVs is refused, and so is a new PV not seen through every
//! path.
//!
//! Needs nbdkit and qemu-io; a missing one fails the test loudly.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use e2e::mpath::{path_state, wait_path, PatternWriter};
use e2e::{
    free_port, qemu_io, require_tools, sparse_file, volmgr_in, volmgr_ok_in, DaemonProc, PeerServer,
};

fn vm(root: &Path, args: &[&str]) -> Output {
    volmgr_in(root, args)
}

fn ok(root: &Path, args: &[&str]) -> String {
    volmgr_ok_in(root, args)
}

fn fails(root: &Path, args: &[&str]) -> String {
    let o = vm(root, args);
    assert!(!o.status.success(), "volmgr {args:?} should fail");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn nbdkit(port: u16, file: &Path) -> PeerServer {
    PeerServer::nbdkit(port, &["file", &file.display().to_string()])
}

#[test]
fn a_raid_leg_on_a_two_path_pv_survives_one_path_dying() {
    require_tools(&["nbdkit", "qemu-io"]);
    let dir = tempfile::Builder::new()
        .prefix("lvm-mpath-e2e-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("state")).unwrap();
    // An existing devices file: scans look only at what it lists.
    std::fs::write(root.join("lvm-devices"), "# test\n").unwrap();
    let files: Vec<PathBuf> = (0..3).map(|i| root.join(format!("pv{i}.img"))).collect();
    for f in &files {
        sparse_file(f, 64 << 20).unwrap();
    }
    // Two servers of file 0 (the two paths), one server each for files 1 and 2.
    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let mut path_a = Some(nbdkit(ports[0], &files[0]));
    let _path_b = nbdkit(ports[1], &files[0]);
    let _s1 = nbdkit(ports[2], &files[1]);
    let _s2 = nbdkit(ports[3], &files[2]);
    let opts = "?timeout=2&reconnect-delay=1&connect-timeout=1";
    let uri = |p: u16| format!("nbd://127.0.0.1:{p}/disk{opts}");
    let (ua, ub) = (uri(ports[0]), uri(ports[1]));
    let group = format!("{ua}|{ub}");
    let (u1, u2) = (uri(ports[2]), uri(ports[3]));

    ok(root, &["pvcreate", &group, &u1, &u2]);
    let listed = std::fs::read_to_string(root.join("lvm-devices")).unwrap();
    assert!(listed.lines().any(|l| l == group), "{listed}");
    // Two paths that are two different PVs are not one device.
    let e = fails(root, &["pvs", "--devices", &format!("{u1}|{u2}")]);
    assert!(
        e.contains("the paths are not one device") && e.contains(&u1) && e.contains(&u2),
        "{e}"
    );
    // A new PV written through one path and not seen through the other is refused.
    let (fa, fb) = (root.join("a.img"), root.join("b.img"));
    sparse_file(&fa, 8 << 20).unwrap();
    sparse_file(&fb, 8 << 20).unwrap();
    let two = format!("{}|{}", fa.display(), fb.display());
    let e = fails(root, &["pvcreate", "--devices", &two, &two]);
    assert!(e.contains("checking the new PV through every path"), "{e}");
    assert!(e.contains("no PV label"), "{e}");

    ok(root, &["vgcreate", "vgp", &group, &u1, &u2]);
    for (i, u) in [&group, &u1, &u2].into_iter().enumerate() {
        ok(root, &["pvchange", "--addtag", &format!("host:h{i}"), u]);
    }
    let pvs = ok(
        root,
        &[
            "pvs",
            "--noheadings",
            "--separator",
            ";",
            "-o",
            "pv_name,host",
        ],
    );
    assert!(pvs.contains(&format!("{group};h0")), "{pvs}");
    ok(
        root,
        &[
            "lvcreate", "--type", "raid1", "-m", "1", "-L", "8M", "-n", "r", "vgp", &group, &u1,
        ],
    );

    let devfile = root.join("lvm-devices").display().to_string();
    let mut d = DaemonProc::start_with(&root.join("state"), &["--devicesfile", &devfile]);
    ok(root, &["lvchange", "-ay", "vgp/r", "--nbd", "127.0.0.1:0"]);
    let mp = "vgp-pv0_mpath";
    // The image on the two-path PV is mapped onto its multipath device.
    let tables: String = ["vgp-r_rimage_0", "vgp-r_rimage_1"]
        .iter()
        .map(|n| d.ok(&["dev", "table", n]))
        .collect();
    assert!(tables.contains(&format!("/dev/volmgr/{mp} ")), "{tables}");
    let t = d.ok(&["dev", "table", mp]);
    assert!(
        t.contains(&format!(
            "multipath 4 no_path_retry 12 checker_interval_ms 1000 0 1 1 round-robin 0 2 1 {ua} 1 {ub} 1"
        )),
        "{t}"
    );
    assert_eq!(path_state(&d, mp, &ua).0, "A");
    assert_eq!(path_state(&d, mp, &ub).0, "A");
    let lv = ok(root, &["lvs", "--noheadings", "-o", "lv_dm_path", "vgp/r"])
        .trim()
        .to_string();

    // A writer through the LV: patterned 1 MiB writes, each read back.
    let writer = PatternWriter::start(&lv, 8);
    std::thread::sleep(Duration::from_secs(1));
    path_a.take();
    wait_path(&d, mp, &ua, "F", 30);
    std::thread::sleep(Duration::from_secs(2));
    assert!(!writer.is_finished(), "the writer stopped: {}", d.log());
    assert_eq!(path_state(&d, mp, &ub).0, "A");
    let st = d.ok(&["dev", "status", "vgp-r"]);
    assert!(st.contains(" AA "), "a raid leg failed: {st}\n{}", d.log());

    // The server returns on the same port: the checker reinstates the path.
    let _path_a2 = nbdkit(ports[0], &files[0]);
    wait_path(&d, mp, &ua, "A", 30);
    std::thread::sleep(Duration::from_secs(1));
    let (last, n) = writer
        .finish()
        .unwrap_or_else(|| panic!("the writer saw an error; daemon log:\n{}", d.log()));
    assert!(n > 3, "only {n} writes");
    let st = d.ok(&["dev", "status", "vgp-r"]);
    assert!(st.contains(" AA "), "a raid leg failed: {st}");
    for (slot, &pat) in last.iter().enumerate() {
        if pat != 0 {
            qemu_io(&lv, &[&format!("read -P {pat} {} 1M", slot << 20)]);
        }
    }

    // A killed daemon brings the multipath device back, under the LV, from what it persisted.
    d.kill9();
    d = DaemonProc::start_with(&root.join("state"), &["--devicesfile", &devfile]);
    wait_path(&d, mp, &ua, "A", 30);
    wait_path(&d, mp, &ub, "A", 30);
    let st = d.ok(&["dev", "status", "vgp-r"]);
    assert!(st.contains(" AA "), "{st}");
    let lv = ok(root, &["lvs", "--noheadings", "-o", "lv_dm_path", "vgp/r"])
        .trim()
        .to_string();
    for (slot, &pat) in last.iter().enumerate() {
        if pat != 0 {
            qemu_io(&lv, &[&format!("read -P {pat} {} 1M", slot << 20)]);
        }
    }

    // Deactivation takes the multipath device with the last LV using it.
    ok(root, &["lvchange", "-an", "vgp/r"]);
    let list = d.ok(&["dev", "list"]);
    assert!(!list.contains(mp), "{list}");

    // pvmove of an active linear LV onto the two-path PV, whose multipath device is not
    // running: the move creates it for the copy's destination, and the LV ends up on it.
    ok(
        root,
        &[
            "lvcreate",
            "-L",
            "4M",
            "-n",
            "lin",
            "--nbd",
            "127.0.0.1:0",
            "vgp",
            &u2,
        ],
    );
    let lin = ok(
        root,
        &["lvs", "--noheadings", "-o", "lv_dm_path", "vgp/lin"],
    )
    .trim()
    .to_string();
    qemu_io(&lin, &["write -P 0x3c 0 4M", "flush"]);
    ok(root, &["pvmove", &u2, &group]);
    let devs = ok(root, &["lvs", "--noheadings", "-o", "devices", "vgp/lin"]);
    assert!(devs.contains(&group), "{devs}");
    let t = d.ok(&["dev", "table", "vgp-lin"]);
    assert!(t.contains(&format!("/dev/volmgr/{mp} ")), "{t}");
    qemu_io(&lin, &["read -P 0x3c 0 4M"]);
    ok(root, &["lvchange", "-an", "vgp/lin"]);
    let list = d.ok(&["dev", "list"]);
    assert!(!list.contains(mp), "{list}");
}
