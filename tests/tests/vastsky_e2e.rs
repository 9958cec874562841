//! The VastSky scenario (issue 15) end to end: four storage hosts, each a network namespace
//! reachable over two links (two networks), each serving one file on both: hosts 0 and 1 by
//! tgtd (iSCSI), hosts 2 and 3 by nbdkit; each PV is a two-path group (one URI per network)
//! tagged `host:hN`; raid1 LVs with three legs on hosts 0-2. One link of host 0 is cut:
//! multipath fails that path over, no leg fails, no client error. Then host 1 is cut whole:
//! its legs fail, the monitor (`--raid-fault-policy allocate`) re-mirrors onto host 3, the
//! rebuilds complete, the legs are on three distinct hosts and healthy; host 1 returns and is
//! not used; what the writers wrote reads back.
//!
//! Two writers run throughout: qemu-io patterned slots (each write read back, the last
//! pattern of every slot checked at the end) and rounds of fio `verify=crc32c` on the other
//! half of the LV. A second three-leg raid1 carries ext4 (through a FUSE loop device) whose
//! files are rewritten and fsync'ed throughout; at the end e2fsck finds it clean and each
//! file holds what was last written to it.
//!
//! Needs root, ip, nbdkit, tgtd, qemu-io, fio, qemu-storage-daemon, mkfs.ext4, e2fsck; a
//! missing one fails the test loudly.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::mpath::{path_state, wait_path, PatternWriter};
use e2e::netns::NetHost;
use e2e::{
    fio_verify, pseudo_random, qemu_io, require_root, require_tools, run_ok, sparse_file,
    volmgr_ok_in, DaemonProc, FuseLoop, TgtLun, Tgtd,
};

fn ok(root: &Path, args: &[&str]) -> String {
    volmgr_ok_in(root, args)
}

/// Each raid image of `vgv/LV`: (the PV entries it uses, its health).
fn images(root: &Path, lv: &str) -> Vec<(HashSet<String>, String)> {
    let out = ok(
        root,
        &[
            "lvs",
            "-a",
            "--noheadings",
            "--separator",
            ";",
            "-o",
            "lv_name,devices,health_status",
            "vgv",
        ],
    );
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.trim().split(';').collect();
            let [name, devs, health] = f.as_slice() else {
                return None;
            };
            name.contains(&format!("[{lv}_rimage_")).then(|| {
                (
                    devs.split(',')
                        .map(|d| d.split('(').next().unwrap_or("").to_string())
                        .collect(),
                    health.to_string(),
                )
            })
        })
        .collect()
}

/// fio rounds through the NBD export `uri` until `stop`: each round randomly writes
/// `8m` at `offset` with `verify=crc32c`, then reads it all back and checks every block.
/// Returns the number of rounds, or the first failing round's output.
fn fio_rounds(uri: String, offset: &'static str, stop: Arc<AtomicBool>) -> Result<usize, String> {
    let mut rounds = 0;
    while !stop.load(Ordering::Acquire) {
        let offset = format!("--offset={offset}");
        let out = fio_verify(&uri, 120, &[&offset, "--size=8m"])
            .output()
            .map_err(|e| format!("running fio: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let json = &text[text.find('{').unwrap_or(0)..];
        let error = serde_json::from_str::<serde_json::Value>(json)
            .ok()
            .and_then(|v| v["jobs"][0]["error"].as_i64());
        if !out.status.success() || error != Some(0) {
            return Err(format!(
                "fio round {rounds}: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        rounds += 1;
    }
    Ok(rounds)
}

/// Size of each file [`fs_rounds`] writes.
const FILE_LEN: usize = 256 << 10;

/// Writes files `f0`..`f15` in `mnt` in turn, each fsync'ed, until `stop`. Returns each
/// file's last content (as the seed of [`pseudo_random`]), or the first error.
fn fs_rounds(mnt: &Path, stop: &AtomicBool) -> Result<BTreeMap<String, u64>, String> {
    let mut last = BTreeMap::new();
    let mut k = 0u64;
    while !stop.load(Ordering::Acquire) {
        let name = format!("f{}", k % 16);
        let path = mnt.join(&name);
        let mut f = std::fs::File::create(&path).map_err(|e| format!("{name}: {e}"))?;
        f.write_all(&pseudo_random(FILE_LEN, k))
            .and_then(|()| f.sync_all())
            .map_err(|e| format!("{name}: {e}"))?;
        last.insert(name, k);
        k += 1;
    }
    Ok(last)
}

#[test]
fn vastsky_two_networks_a_link_cut_then_a_host_cut_and_re_mirrored() {
    require_root();
    require_tools(&[
        "ip",
        "nbdkit",
        "qemu-io",
        "fio",
        "tgtd",
        "tgtadm",
        "qemu-storage-daemon",
        "mkfs.ext4",
        "e2fsck",
    ]);
    let dir = tempfile::Builder::new()
        .prefix("vastsky-e2e-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("state")).unwrap();
    std::fs::write(root.join("lvm-devices"), "# test\n").unwrap();
    let opts = "?timeout=2&reconnect-delay=1&connect-timeout=1";
    let mut hosts = Vec::new();
    let mut tgtds = Vec::new();
    let mut groups = Vec::new();
    let mut paths = Vec::new();
    for i in 0..4 {
        let mut h = NetHost::with_links(2);
        let f = root.join(format!("host{i}.img"));
        sparse_file(&f, 64 << 20).unwrap();
        // Hosts 0 and 1 are iSCSI targets (tgtd), hosts 2 and 3 NBD servers (nbdkit).
        let uris: Vec<String> = if i < 2 {
            let iqn = format!("iqn.2026-12.org.volmgr.test:h{i}");
            let mut t = Tgtd::start_in(root, h.name(), &h.addrs[0]);
            t.add_lun(TgtLun {
                iqn: iqn.clone(),
                lun: 1,
                file: f.clone(),
                block_size: 512,
                thin: false,
            });
            tgtds.push(t);
            h.addrs
                .iter()
                .map(|a| format!("iscsi://{a}:3260/{iqn}/1{opts}"))
                .collect()
        } else {
            let file_arg = format!("file={}", f.display());
            h.spawn("nbdkit", &["-f", "-p", "10809", "file", &file_arg]);
            for a in &h.addrs {
                h.wait_port_on(a, 10809);
            }
            h.addrs
                .iter()
                .map(|a| format!("nbd://{a}:10809/d{opts}"))
                .collect()
        };
        groups.push(uris.join("|"));
        paths.push(uris);
        hosts.push(h);
    }
    let g: Vec<&str> = groups.iter().map(String::as_str).collect();
    let mut a = vec!["pvcreate"];
    a.extend(&g);
    ok(root, &a);
    let mut a = vec!["vgcreate", "vgv"];
    a.extend(&g);
    ok(root, &a);
    for (i, grp) in g.iter().enumerate() {
        ok(root, &["pvchange", "--addtag", &format!("host:h{i}"), grp]);
    }
    let host_of: BTreeMap<String, String> = ok(
        root,
        &[
            "pvs",
            "--noheadings",
            "--separator",
            ";",
            "-o",
            "pv_name,host",
        ],
    )
    .lines()
    .filter_map(|l| l.trim().split_once(';'))
    .map(|(p, h)| (p.to_string(), h.to_string()))
    .collect();
    for (i, grp) in g.iter().enumerate() {
        assert_eq!(host_of.get(*grp), Some(&format!("h{i}")), "{host_of:?}");
    }
    // Three legs on hosts 0-2; host 3 is the spare.
    ok(
        root,
        &[
            "lvcreate", "--type", "raid1", "-m", "2", "-L", "16M", "-n", "r", "vgv", g[0], g[1],
            g[2],
        ],
    );
    let devfile = root.join("lvm-devices").display().to_string();
    ok(
        root,
        &[
            "lvcreate", "--type", "raid1", "-m", "2", "-L", "32M", "-n", "fs", "vgv", g[0], g[1],
            g[2],
        ],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let d = DaemonProc::start_with(
        &root.join("state"),
        &[
            "--raid-fault-policy",
            "allocate",
            "--monitor-interval",
            "1",
            "--devicesfile",
            &devfile,
        ],
    );
    ok(root, &["lvchange", "-ay", "vgv/r", "--nbd", "127.0.0.1:0"]);
    ok(root, &["lvchange", "-ay", "vgv/fs", "--nbd", "127.0.0.1:0"]);
    // ext4 on vgv/fs (through a FUSE loop device), written and fsync'ed throughout.
    let fs_uri = ok(root, &["lvs", "--noheadings", "-o", "lv_dm_path", "vgv/fs"]);
    let port: u16 = fs_uri
        .trim()
        .strip_prefix("nbd://127.0.0.1:")
        .and_then(|r| r.split('/').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("the LV's NBD address: {fs_uri}"));
    let fl = FuseLoop::attach(port, "vgv/fs", root).unwrap();
    let mnt = root.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    run_ok(Command::new("mkfs.ext4").args(["-F", "-q", &fl.loopdev])).unwrap();
    run_ok(Command::new("mount").arg(&fl.loopdev).arg(&mnt)).unwrap();
    let fs_writer = {
        let (mnt, stop) = (mnt.clone(), stop.clone());
        std::thread::spawn(move || fs_rounds(&mnt, &stop))
    };
    let lv = ok(root, &["lvs", "--noheadings", "-o", "lv_dm_path", "vgv/r"])
        .trim()
        .to_string();
    // Two writers: qemu-io patterns in the first 8 MiB, fio crc32c rounds in the second.
    let writer = PatternWriter::start(&lv, 8);
    let fio = {
        let (uri, stop) = (lv.clone(), stop.clone());
        std::thread::spawn(move || fio_rounds(uri, "8m", stop))
    };
    std::thread::sleep(Duration::from_secs(1));

    // One link of host 0 is cut: its first path fails over to the second, no leg fails.
    hosts[0].link_down_one(0);
    wait_path(&d, "vgv-pv0_mpath", &paths[0][0], "F", 30);
    assert_eq!(path_state(&d, "vgv-pv0_mpath", &paths[0][1]).0, "A");
    std::thread::sleep(Duration::from_secs(2));
    let st = d.ok(&["dev", "status", "vgv-r"]);
    assert!(st.contains(" AAA "), "a leg failed: {st}\n{}", d.log());
    assert!(!writer.is_finished(), "the writer stopped: {}", d.log());
    hosts[0].link_up_one(0);
    wait_path(&d, "vgv-pv0_mpath", &paths[0][0], "A", 30);

    // Host 1 is cut whole: its leg fails once multipath stops queueing, the monitor
    // replaces it on host 3 and rebuilds.
    hosts[1].link_down();
    let t0 = Instant::now();
    for lv in ["r", "fs"] {
        loop {
            let imgs = images(root, lv);
            let on_spare = imgs.iter().any(|(s, _)| s.contains(g[3]));
            let synced = ok(
                root,
                &[
                    "lvs",
                    "--noheadings",
                    "-o",
                    "copy_percent",
                    &format!("vgv/{lv}"),
                ],
            );
            let st = d.ok(&["dev", "status", &format!("vgv-{lv}")]);
            if on_spare && synced.trim() == "100.00" && st.contains(" AAA ") {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(150),
                "{lv}: no re-mirror after 150 s: {imgs:?} sync {synced} status {st}\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    assert!(!writer.is_finished(), "the writer stopped: {}", d.log());
    // Three healthy legs on three distinct hosts, none on host 1.
    let check_legs = |lv: &str| {
        let imgs = images(root, lv);
        assert_eq!(imgs.len(), 3, "{imgs:?}");
        let mut used = HashSet::new();
        for (pvs, health) in &imgs {
            assert_eq!(health, "", "a leg is not healthy: {imgs:?}");
            assert_eq!(pvs.len(), 1, "{imgs:?}");
            assert!(!pvs.contains(g[1]), "the dead host holds a leg: {imgs:?}");
            for p in pvs {
                assert!(
                    used.insert(host_of[p].clone()),
                    "two legs on one host: {imgs:?}"
                );
            }
        }
    };
    check_legs("r");
    check_legs("fs");

    // Host 1 returns: its stale leg is not used.
    hosts[1].restore();
    std::thread::sleep(Duration::from_secs(3));
    for lv in ["r", "fs"] {
        check_legs(lv);
        let st = d.ok(&["dev", "status", &format!("vgv-{lv}")]);
        assert!(st.contains(" AAA "), "{st}");
    }

    let (last, n) = writer
        .finish()
        .unwrap_or_else(|| panic!("the writer saw an error; daemon log:\n{}", d.log()));
    assert!(n > 5, "only {n} writes");
    stop.store(true, Ordering::Release);
    let rounds = fio
        .join()
        .expect("the fio thread")
        .unwrap_or_else(|e| panic!("{e}\ndaemon log:\n{}", d.log()));
    assert!(rounds >= 2, "only {rounds} fio rounds");
    let files = fs_writer
        .join()
        .expect("the file system writer")
        .unwrap_or_else(|e| panic!("{e}\ndaemon log:\n{}", d.log()));
    assert!(files.len() >= 4, "only {} files written", files.len());
    // The file system is clean and holds what was fsync'ed last in each file.
    fl.fsck_and_remount(&mnt);
    for (name, seed) in &files {
        let got = std::fs::read(mnt.join(name)).unwrap();
        assert!(got == pseudo_random(FILE_LEN, *seed), "{name} differs");
    }
    run_ok(Command::new("umount").arg(&mnt)).unwrap();
    drop(fl);
    for (slot, &pat) in last.iter().enumerate() {
        if pat != 0 {
            qemu_io(&lv, &[&format!("read -P {pat} {} 1M", slot << 20)]);
        }
    }
    ok(root, &["lvchange", "-an", "vgv/r"]);
    ok(root, &["lvchange", "-an", "vgv/fs"]);
    let list = d.ok(&["dev", "list"]);
    assert!(!list.contains("_mpath"), "{list}");
}
