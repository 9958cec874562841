//! The volume manager end to end against the real lvm2 tools: VGs written by lvm2 on loop
//! devices are activated by `volmgr` through its daemon (exported over NBD: the host has no
//! ublk), and their bytes are where kernel LVM would put them, in both directions.
//!
//! Needs root (losetup), lvm2, qemu-io and nbdcopy; a missing one fails the test loudly.

#[path = "../../lvm/tests/common/mod.rs"]
mod lvm2;

use std::os::unix::fs::FileExt;
use std::process::Command;

use e2e::{pseudo_random, qemu_io, read_all, require_tool, run_ok, DaemonProc};
use lvm2::{field, num, Lvm2};

const MIB: u64 = 1 << 20;

/// One stripe area of an LV segment, as lvm2 reports it: device and first extent.
#[derive(Debug)]
struct LvSeg {
    stripes: u64,
    stripe_size: u64,
    areas: Vec<(String, u64)>,
    extents: u64,
}

/// Where lvm2 says each LV's extents are (`seg_pe_ranges`), for LVs of one segment.
fn lvm2_segments(env: &Lvm2, vg: &str) -> Vec<(String, LvSeg)> {
    lvm2_segments_of(env, vg, false)
}

/// As [`lvm2_segments`], hidden LVs too with `all` (names without brackets).
fn lvm2_segments_of(env: &Lvm2, vg: &str, all: bool) -> Vec<(String, LvSeg)> {
    let mut args = vec![
        "lvs",
        "--segments",
        "-o",
        "lv_name,seg_size_pe,stripes,stripe_size,seg_pe_ranges",
        vg,
    ];
    if all {
        args.push("-a");
    }
    env.report(&args, "seg")
        .iter()
        .filter(|row| !field(row, "seg_pe_ranges").is_empty())
        .map(|row| {
            let areas = field(row, "seg_pe_ranges")
                .split_whitespace()
                .map(|r| {
                    let (dev, range) = r.rsplit_once(':').expect("DEV:PE-PE");
                    let first = range.split('-').next().expect("PE-PE");
                    (dev.to_string(), first.parse().expect("a PE number"))
                })
                .collect();
            (
                field(row, "lv_name")
                    .trim_matches(|c| c == '[' || c == ']')
                    .to_string(),
                LvSeg {
                    stripes: num(row, "stripes"),
                    stripe_size: num(row, "stripe_size"),
                    areas,
                    extents: num(row, "seg_size_pe"),
                },
            )
        })
        .collect()
}

/// The device and byte offset of LV byte `x` (kernel LVM's mapping, computed independently
/// of volmgr from what lvm2 reports).
fn locate(seg: &LvSeg, pe_start: u64, extent: u64, x: u64) -> (String, u64) {
    if seg.stripes == 1 {
        let (dev, pe) = &seg.areas[0];
        return (dev.clone(), pe_start + pe * extent + x);
    }
    let chunk = x / seg.stripe_size;
    let stripe = (chunk % seg.stripes) as usize;
    let row = chunk / seg.stripes;
    let (dev, pe) = &seg.areas[stripe];
    (
        dev.clone(),
        pe_start + pe * extent + row * seg.stripe_size + x % seg.stripe_size,
    )
}

fn open_rw(dev: &str) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .unwrap_or_else(|e| panic!("opening {dev}: {e}"))
}

#[test]
fn lvm2_linear_and_striped_lvs_serve_their_bytes_through_the_daemon() {
    require_tool("qemu-io");
    require_tool("nbdcopy");
    let env = Lvm2::new(&[64, 64]);
    let (l0, l1) = (env.loops[0].clone(), env.loops[1].clone());
    env.run(&["pvcreate", &l0, &l1]);
    env.run(&["vgcreate", "-s", "1m", "vge2e", &l0, &l1]);
    let create = |args: &[&str]| {
        let mut a = vec!["lvcreate", "--driverloaded", "n", "-an", "-Zn"];
        a.extend_from_slice(args);
        env.run(&a);
    };
    create(&["-l", "10", "-n", "lin", "vge2e", &l0]);
    create(&["-i", "2", "-I", "64k", "-l", "8", "-n", "str", "vge2e"]);
    let pe_start = num(
        &env.report(&["pvs", "-o", "pv_name,pe_start", &l0], "pv")[0],
        "pe_start",
    );
    let segs = lvm2_segments(&env, "vge2e");
    assert_eq!(segs.len(), 2, "{segs:?}");

    // lvm2's side: each LV's bytes written straight to the PVs where lvm2 says they are.
    let mut want = Vec::new();
    for (i, (name, seg)) in segs.iter().enumerate() {
        let len = seg.extents * MIB;
        let data = pseudo_random(len as usize, 7 + i as u64);
        for x in (0..len).step_by(4096) {
            let (dev, off) = locate(seg, pe_start, MIB, x);
            open_rw(&dev)
                .write_all_at(&data[x as usize..x as usize + 4096], off)
                .expect("writing a PV");
        }
        want.push((name.clone(), seg, data));
    }

    let state = env.path("state");
    std::fs::create_dir_all(&state).unwrap();
    let d = DaemonProc::start(&state);
    let devices = format!("{l0},{l1}");
    let lvs = |extra: &[&str]| {
        let mut a = vec![
            "lvs",
            "--devices",
            &devices,
            "--noheadings",
            "--separator",
            ";",
            "-o",
            "lv_name,lv_attr,lv_dm_path",
        ];
        a.extend_from_slice(extra);
        d.ok(&a)
    };
    assert!(lvs(&[]).contains(";-wi-------;"), "{}", lvs(&[]));
    d.ok(&[
        "vgchange",
        "-ay",
        "vge2e",
        "--nbd",
        "127.0.0.1:0",
        "--devices",
        &devices,
    ]);
    let report = lvs(&[]);
    let uri = |lv: &str| {
        report
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{lv};")))
            .and_then(|l| l.trim().rsplit(';').next())
            .unwrap_or_else(|| panic!("{lv} in {report}"))
            .to_string()
    };
    for (name, seg, data) in &want {
        assert!(
            report.contains(&format!("{name};-wi-a-----;nbd://")),
            "{report}"
        );
        // Exported as LVM names it.
        assert!(
            uri(name).ends_with(&format!("/vge2e/{name}")),
            "{}",
            uri(name)
        );
        // volmgr's side reads what lvm2's layout put there.
        let out = env.path(&format!("{name}.img"));
        run_ok(Command::new("nbdcopy").arg(uri(name)).arg(&out)).unwrap();
        let got = std::fs::read(&out).unwrap();
        assert_eq!(got.len() as u64, seg.extents * MIB, "{name}: size");
        assert!(
            got == *data,
            "{name}: the LV does not read the bytes lvm2's layout holds"
        );

        // And the other way: a write through the daemon lands where kernel LVM reads it.
        let at = seg.extents * MIB - 3 * 65536 - 4096;
        qemu_io(&uri(name), &[&format!("write -P 0xa5 {at} 139264")]);
        for x in (at..at + 139_264).step_by(4096) {
            let (dev, off) = locate(seg, pe_start, MIB, x);
            let mut b = vec![0u8; 4096];
            open_rw(&dev).read_exact_at(&mut b, off).unwrap();
            assert!(
                b.iter().all(|&c| c == 0xa5),
                "{name}: LV byte {x} is not at {dev}:{off}"
            );
        }
    }

    // lvm2 still reads the VG, and sees nothing changed by activation.
    let lv_names: Vec<String> = env
        .report(&["lvs", "-o", "lv_name", "vge2e"], "lv")
        .iter()
        .map(|r| field(r, "lv_name"))
        .collect();
    assert_eq!(lv_names, ["lin", "str"]);

    d.ok(&["lvchange", "-an", "vge2e/lin", "--devices", &devices]);
    let report = lvs(&[]);
    assert!(report.contains("lin;-wi-------;"), "{report}");
    assert!(report.contains("str;-wi-a-----;nbd://"), "{report}");
    let listed = d.ok(&["dev", "list"]);
    assert!(!listed.contains("vge2e-lin"), "{listed}");
    d.ok(&["vgchange", "-an", "vge2e", "--devices", &devices]);
    assert!(!d.ok(&["dev", "list"]).contains("vge2e-str"));
}

#[test]
fn activation_names_what_is_missing_and_partial_maps_it_to_errors() {
    require_tool("qemu-io");
    let env = Lvm2::new(&[32, 32]);
    let (l0, l1) = (env.loops[0].clone(), env.loops[1].clone());
    env.run(&["pvcreate", &l0, &l1]);
    env.run(&["vgcreate", "-s", "1m", "vgmiss", &l0, &l1]);
    // One LV over both PVs: 20 extents on l0, then 5 on l1.
    env.run(&[
        "lvcreate",
        "--driverloaded",
        "n",
        "-an",
        "-Zn",
        "-l",
        "25",
        "-n",
        "span",
        "vgmiss",
        &format!("{l0}:0-19"),
        &format!("{l1}:0-4"),
    ]);
    let state = env.path("state");
    std::fs::create_dir_all(&state).unwrap();
    let d = DaemonProc::start(&state);
    // Only l0 is visible: l1 is "missing".
    let e = String::from_utf8_lossy(
        &d.vm(&[
            "lvchange",
            "-ay",
            "vgmiss/span",
            "--nbd",
            "127.0.0.1:0",
            "--devices",
            &l0,
        ])
        .stderr,
    )
    .into_owned();
    assert!(
        e.contains("vgmiss/span") && e.contains("missing") && e.contains("pv1"),
        "{e}"
    );
    assert!(!d.ok(&["dev", "list"]).contains("vgmiss-span"));
    d.ok(&[
        "lvchange",
        "-ay",
        "vgmiss/span",
        "--activationmode",
        "partial",
        "--nbd",
        "127.0.0.1:0",
        "--devices",
        &l0,
    ]);
    let table = d.ok(&["dev", "table", "vgmiss-span"]);
    assert!(
        table.contains(&format!("linear {l0} 2048")) && table.contains(" error"),
        "{table}"
    );
}

/// `volmgr ARGS` with the loop devices as the only devices, asserting success.
fn vm_on(d: &DaemonProc, devices: &str, args: &[&str]) -> String {
    let mut a = args.to_vec();
    a.extend_from_slice(&["--devices", devices]);
    d.ok(&a)
}

/// `volmgr ARGS` with the loop devices as the only devices, asserting failure; its stderr.
fn vm_err(d: &DaemonProc, devices: &str, args: &[&str]) -> String {
    let mut a = args.to_vec();
    a.extend_from_slice(&["--devices", devices]);
    d.err(&a)
}

#[test]
fn lvs_volmgr_creates_extends_renames_and_removes_are_what_lvm2_reads() {
    let env = Lvm2::new(&[64, 64, 64]);
    let loops = env.loops.clone();
    let devices = loops.join(",");
    let state = env.path("state");
    std::fs::create_dir_all(&state).unwrap();
    let d = DaemonProc::start(&state);
    let mut vgcreate = vec!["vgcreate", "-s", "1m", "vgx"];
    vgcreate.extend(loops.iter().map(String::as_str));
    vm_on(&d, &devices, &vgcreate);
    vm_on(
        &d,
        &devices,
        &["lvcreate", "-an", "-L", "10m", "-n", "lin", "vgx"],
    );
    vm_on(
        &d,
        &devices,
        &[
            "lvcreate", "-an", "-i", "3", "-I", "128k", "-l", "12", "-n", "str", "vgx",
        ],
    );
    // A PV list with a range, and the default name.
    let pv2 = format!("{}:40-", loops[2]);
    vm_on(&d, &devices, &["lvcreate", "-an", "-L", "5m", "vgx", &pv2]);
    vm_on(&d, &devices, &["lvextend", "-L", "+4m", "vgx/lin"]);
    vm_on(&d, &devices, &["lvrename", "vgx", "lvol0", "other"]);
    vm_on(
        &d,
        &devices,
        &["lvcreate", "-an", "-l", "3", "-n", "gone", "vgx"],
    );
    vm_on(&d, &devices, &["lvremove", "vgx/gone"]);

    // lvm2 reads exactly that: names, sizes, segments and the extents each one is on.
    env.run(&["vgck", "vgx"]);
    let segs = env.report(
        &[
            "lvs",
            "--segments",
            "-o",
            "lv_name,seg_start_pe,seg_size_pe,stripes,stripe_size,seg_pe_ranges",
            "vgx",
        ],
        "seg",
    );
    let got: Vec<String> = segs
        .iter()
        .map(|r| {
            format!(
                "{} {} {} {} {} {}",
                field(r, "lv_name"),
                field(r, "seg_start_pe"),
                field(r, "seg_size_pe"),
                field(r, "stripes"),
                field(r, "stripe_size"),
                field(r, "seg_pe_ranges")
            )
        })
        .collect();
    let (a, b, c) = (&loops[0], &loops[1], &loops[2]);
    assert_eq!(
        got,
        [
            format!("lin 0 10 1 0 {a}:0-9"),
            // In place was taken by the striped LV: the 4 more extents follow it on the PV.
            format!("lin 10 4 1 0 {a}:14-17"),
            format!("other 0 5 1 0 {c}:40-44"),
            format!("str 0 12 3 131072 {a}:10-13 {b}:0-3 {c}:0-3"),
        ],
        "lvm2's view of volmgr's LVs"
    );
    let vfree = num(
        &env.report(&["vgs", "-o", "vg_free", "vgx"], "vg")[0],
        "vg_free",
    );
    assert_eq!(
        vfree,
        (3 * 63 - 14 - 5 - 12) * MIB,
        "free space as lvm2 counts it"
    );

    // lvm2 changes the VG; volmgr reads the change.
    env.run(&[
        "lvcreate",
        "--driverloaded",
        "n",
        "-an",
        "-Zn",
        "-l",
        "7",
        "-n",
        "fromlvm2",
        "vgx",
        b,
    ]);
    let listed = vm_on(
        &d,
        &devices,
        &[
            "lvs",
            "--noheadings",
            "-o",
            "lv_name,lv_size",
            "--units",
            "m",
            "vgx",
        ],
    );
    assert!(
        listed.contains("fromlvm2") && listed.contains("7.00m"),
        "{listed}"
    );

    // Refusals name what is wrong and change nothing.
    let e = vm_err(
        &d,
        &devices,
        &["lvcreate", "-an", "-l", "500", "-n", "big", "vgx"],
    );
    assert!(e.contains("Insufficient free space"), "{e}");
    let e = vm_err(
        &d,
        &devices,
        &["lvcreate", "-an", "-l", "4", "-n", "lin", "vgx"],
    );
    assert!(e.contains("already exists"), "{e}");
    let e = vm_err(&d, &devices, &["lvrename", "vgx", "other", "x_rimage_0"]);
    assert!(e.contains("reserved"), "{e}");
    let seqno = |env: &Lvm2| {
        num(
            &env.report(&["vgs", "-o", "vg_seqno", "vgx"], "vg")[0],
            "vg_seqno",
        )
    };
    let before = seqno(&env);
    assert!(!d
        .vm(&[
            "lvcreate",
            "-an",
            "-i",
            "4",
            "-l",
            "8",
            "-n",
            "s4",
            "vgx",
            "--devices",
            &devices
        ])
        .status
        .success());
    assert_eq!(seqno(&env), before, "a refused lvcreate wrote metadata");
    env.run(&["vgck", "vgx"]);
}

/// The URI of an active LV exported over NBD, from `volmgr lvs`.
fn lv_uri(d: &DaemonProc, devices: &str, lv: &str) -> String {
    let out = vm_on(d, devices, &["lvs", "--noheadings", "-o", "lv_dm_path", lv]);
    let uri = out.trim().to_string();
    assert!(uri.starts_with("nbd://"), "{lv} is not exported: '{out}'");
    uri
}

/// lvm2 creating a one-extent LV in `vgr` (refused while volmgr's LVs are in it).
const LVM2_LVCREATE_X: &[&str] = &[
    "lvcreate",
    "--driverloaded",
    "n",
    "-an",
    "-Zn",
    "-l",
    "1",
    "-n",
    "x",
    "vgr",
];

#[test]
fn raid_and_thin_lvs_serve_data_and_lvm2_keeps_off_them() {
    require_tool("qemu-io");
    let env = Lvm2::new(&[64, 64, 64, 64]);
    let loops = env.loops.clone();
    // The fourth device stays out of the VG, for lvm2's vgextend.
    let devices = loops[..3].join(",");
    let state = env.path("state");
    std::fs::create_dir_all(&state).unwrap();
    let d = DaemonProc::start(&state);
    let mut vgcreate = vec!["vgcreate", "-s", "1m", "vgr"];
    vgcreate.extend(loops[..3].iter().map(String::as_str));
    vm_on(&d, &devices, &vgcreate);
    let nbd = ["--nbd", "127.0.0.1:0"];
    let create = |args: &[&str]| {
        let mut a = vec!["lvcreate"];
        a.extend_from_slice(args);
        a.extend_from_slice(&nbd);
        vm_on(&d, &devices, &a);
    };
    create(&["--type", "raid1", "-m", "1", "-L", "8m", "-n", "r1", "vgr"]);
    create(&["--type", "raid5", "-i", "2", "-L", "8m", "-n", "r5", "vgr"]);
    vm_on(
        &d,
        &devices,
        &[
            "lvcreate",
            "--type",
            "thin-pool",
            "-L",
            "16m",
            "-n",
            "pool",
            "vgr",
        ],
    );
    create(&["-V", "64m", "--thinpool", "pool", "-n", "t1", "vgr"]);

    for lv in ["vgr/r1", "vgr/r5", "vgr/t1"] {
        qemu_io(&lv_uri(&d, &devices, lv), &["write -P 0x3c 1M 2M"]);
    }
    create(&["-s", "vgr/t1", "-n", "s1"]);
    qemu_io(&lv_uri(&d, &devices, "vgr/t1"), &["write -P 0x4d 1M 1M"]);
    qemu_io(&lv_uri(&d, &devices, "vgr/s1"), &["read -P 0x3c 1M 2M"]);
    qemu_io(
        &lv_uri(&d, &devices, "vgr/t1"),
        &["read -P 0x4d 1M 1M", "read -P 0x3c 2M 1M"],
    );

    // lvs: types, sync and usage from the live devices.
    let report = |what: &str| {
        vm_on(
            &d,
            &devices,
            &[
                "lvs",
                "-a",
                "--noheadings",
                "--separator",
                ";",
                "-o",
                what,
                "vgr",
            ],
        )
    };
    let t0 = std::time::Instant::now();
    loop {
        let r = report("lv_name,lv_attr,segtype,pool_lv,origin,data_percent,copy_percent");
        let synced = r.contains("r1;rwi-a-r---;raid1;;;;100.00")
            && r.contains("r5;rwi-a-r---;raid5;;;;100.00");
        if synced {
            assert!(r.contains("pool;twi-a-t---;thin-pool;;;"), "{r}");
            assert!(r.contains("t1;Vwi-a-t---;thin;pool;;"), "{r}");
            assert!(r.contains("s1;Vwi-a-t---;thin;pool;t1;"), "{r}");
            assert!(r.contains("[r1_rimage_0];iwi-a-----;linear"), "{r}");
            break;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(60),
            "raid LVs did not sync: {r}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }

    // Real lvm2: lists the VG, counts our sub-LVs' extents as used, and changes nothing.
    let vg_row =
        |env: &Lvm2| env.report(&["vgs", "-o", "vg_free,vg_seqno", "vgr"], "vg")[0].clone();
    let before = vg_row(&env);
    let ours = vm_on(
        &d,
        &devices,
        &[
            "vgs",
            "--noheadings",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            "vg_free",
            "vgr",
        ],
    );
    assert_eq!(
        ours.trim(),
        field(&before, "vg_free"),
        "free space: ours vs lvm2's"
    );
    let lvm2_lvs = env.try_run(&["lvs", "vgr"]);
    let lvm2_text = String::from_utf8_lossy(&lvm2_lvs.stdout).into_owned()
        + &String::from_utf8_lossy(&lvm2_lvs.stderr);
    assert!(
        lvm2_text.contains("r1") && lvm2_text.contains("t1"),
        "{lvm2_text}"
    );
    for args in [
        LVM2_LVCREATE_X.to_vec(),
        vec!["vgextend", "vgr", loops[3].as_str()],
        vec!["lvremove", "-y", "--driverloaded", "n", "vgr/r1"],
        vec!["lvextend", "--driverloaded", "n", "-l", "+1", "vgr/r1"],
    ] {
        let o = env.try_run(&args);
        let text = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(
            !o.status.success(),
            "lvm {args:?} succeeded on a VG with volmgr LVs: {text}"
        );
        assert!(
            text.contains("unknown segment") || text.contains("Cannot change VG"),
            "lvm {args:?}: {text}"
        );
    }
    // Activation through lvm2 (here without device-mapper) writes nothing either.
    let _ = env.try_run(&["lvchange", "-ay", "--driverloaded", "n", "vgr/r1"]);
    let _ = env.try_run(&["vgchange", "-ay", "--driverloaded", "n", "vgr"]);
    let after = vg_row(&env);
    assert_eq!(
        field(&after, "vg_seqno"),
        field(&before, "vg_seqno"),
        "lvm2 wrote the VG"
    );
    qemu_io(&lv_uri(&d, &devices, "vgr/r1"), &["read -P 0x3c 1M 2M"]);

    // Removal takes the sub-LVs and the pool's thin ids with it; both tools then agree.
    let e = vm_err(&d, &devices, &["lvremove", "-y", "vgr/pool"]);
    assert!(e.contains("used by"), "{e}");
    vm_on(
        &d,
        &devices,
        &[
            "lvremove", "-y", "vgr/s1", "vgr/t1", "vgr/r1", "vgr/r5", "vgr/pool",
        ],
    );
    let left = vm_on(&d, &devices, &["lvs", "-a", "--noheadings", "vgr"]);
    assert!(left.trim().is_empty(), "{left}");
    assert!(
        !d.ok(&["dev", "list"]).contains("vgr-"),
        "devices left active"
    );
    env.run(&["vgck", "vgr"]);
    let free = num(
        &env.report(&["vgs", "-o", "vg_free", "vgr"], "vg")[0],
        "vg_free",
    );
    assert_eq!(free, 3 * 63 * MIB, "every extent free again");
    // With nothing of ours left, lvm2 may change the VG again.
    env.run(LVM2_LVCREATE_X);
}

#[test]
fn lvconvert_to_raid1_and_back_under_fio_verify() {
    require_tool("fio");
    let env = Lvm2::new(&[64, 64]);
    let (d, devices) = vg_with_lv(&env, "vgc");
    let uri = lv_uri(&d, &devices, "vgc/lv");
    // fio writes and verifies in a loop while the LV changes shape under it.
    let fio = {
        let uri = uri.clone();
        std::thread::spawn(move || {
            e2e::fio_verify(&uri, 600, &["--size=24m", "--loops=60"])
                .output()
                .expect("running fio")
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(500));
    vm_on(&d, &devices, &["lvconvert", "-m", "1", "vgc/lv"]);
    let t0 = std::time::Instant::now();
    loop {
        let r = vm_on(
            &d,
            &devices,
            &[
                "lvs",
                "--noheadings",
                "-o",
                "lv_attr,copy_percent",
                "vgc/lv",
            ],
        );
        if r.contains("rwi-a-r---") && r.contains("100.00") {
            break;
        }
        assert!(t0.elapsed().as_secs() < 60, "no sync: {r}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    vm_on(&d, &devices, &["lvconvert", "-m", "0", "vgc/lv"]);
    vm_on(&d, &devices, &["lvconvert", "-m", "1", "vgc/lv"]);
    assert!(
        !fio.is_finished(),
        "fio ended before the conversions did: the test needs a longer fio run"
    );
    let out = fio.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let json = &text[text.find('{').unwrap_or(0)..];
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_else(|e| {
        panic!(
            "fio output ({e}): {text}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(v["jobs"][0]["error"].as_i64(), Some(0), "{text}");
    assert!(out.status.success(), "{text}");
    // Both tools agree on the result, and the second image holds the first's bytes once in
    // sync: compare the two legs' extents directly.
    // lvm2 warns about the volmgr-raid1 type it does not know, and finds nothing wrong.
    env.run(&["vgck", "vgc"]);
    let t0 = std::time::Instant::now();
    while !vm_on(
        &d,
        &devices,
        &["lvs", "--noheadings", "-o", "copy_percent", "vgc/lv"],
    )
    .contains("100.00")
    {
        assert!(t0.elapsed().as_secs() < 60, "no sync");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    vm_on(&d, &devices, &["lvchange", "-an", "vgc/lv"]);
    let segs = lvm2_segments_all(&env, "vgc");
    let leg = |name: &str| {
        let (dev, pe) = segs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s.areas[0].clone())
            .unwrap_or_else(|| panic!("{name} in {segs:?}"));
        let mut b = vec![0u8; 32 << 20];
        open_rw(&dev).read_exact_at(&mut b, MIB + pe * MIB).unwrap();
        b
    };
    assert!(
        leg("lv_rimage_0") == leg("lv_rimage_1"),
        "the images differ after sync"
    );
}

/// Every LV's segments, hidden ones too, as lvm2 reports them.
fn lvm2_segments_all(env: &Lvm2, vg: &str) -> Vec<(String, LvSeg)> {
    let mut v = lvm2_segments_of(env, vg, true);
    v.retain(|(n, _)| !n.is_empty());
    v
}

/// A daemon on a state directory of `env` and a VG `vg` (1 MiB extents) of the first two
/// loop devices; returns the daemon and the `--devices` list.
fn vg_of_two(env: &Lvm2, vg: &str) -> (DaemonProc, String) {
    let loops = &env.loops;
    let devices = loops.join(",");
    let state = env.path("state");
    std::fs::create_dir_all(&state).unwrap();
    let d = DaemonProc::start(&state);
    vm_on(
        &d,
        &devices,
        &["vgcreate", "-s", "1m", vg, &loops[0], &loops[1]],
    );
    (d, devices)
}

/// As [`vg_of_two`], with a 32 MiB LV `lv` on the first, active over NBD; returns the daemon and the `--devices` list.
fn vg_with_lv(env: &Lvm2, vg: &str) -> (DaemonProc, String) {
    let (d, devices) = vg_of_two(env, vg);
    let loops = &env.loops;
    vm_on(
        &d,
        &devices,
        &[
            "lvcreate",
            "-L",
            "32m",
            "-n",
            "lv",
            vg,
            &loops[0],
            "--nbd",
            "127.0.0.1:0",
        ],
    );
    (d, devices)
}

/// `volmgr pvmove ARGS` in the background against `d`'s state directory.
fn pvmove_bg(d: &DaemonProc, devices: &str, args: &[&str]) -> std::process::Child {
    Command::new(e2e::volmgr_bin())
        .arg("pvmove")
        .args(args)
        .args(["--devices", devices])
        .env("VOLMGR_STATE_DIR", &d.state)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawning pvmove")
}

/// Waits until the daemon of `d` has the pvmove mirror of `vg`.
fn wait_for_mirror(d: &DaemonProc, vg: &str) {
    let t0 = std::time::Instant::now();
    while !d.ok(&["dev", "list"]).contains(&format!("{vg}-pvmove0 ")) {
        assert!(t0.elapsed().as_secs() < 30, "no pvmove mirror: {}", d.log());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn pvmove_online_survives_a_daemon_kill_and_aborts_cleanly() {
    require_tool("qemu-io");
    let env = Lvm2::new(&[64, 64]);
    let loops = env.loops.clone();
    let (mut d, devices) = vg_with_lv(&env, "vgm");
    qemu_io(&lv_uri(&d, &devices, "vgm/lv"), &["write -P 0x5a 0 32M"]);

    // A slow move (4 MiB/s), the daemon killed in the middle of it.
    let mv = pvmove_bg(&d, &devices, &[&loops[0], "--rate", "4096"]);
    wait_for_mirror(&d, "vgm");
    std::thread::sleep(std::time::Duration::from_millis(500));
    // Writes during the move reach both copies.
    qemu_io(&lv_uri(&d, &devices, "vgm/lv"), &["write -P 0x6b 16M 1M"]);
    d.kill9();
    let out = mv.wait_with_output().unwrap();
    assert!(!out.status.success(), "pvmove went on without its daemon");
    // Nothing committed: the metadata still names the source.
    let before = vm_on(
        &d,
        &devices,
        &["lvs", "--noheadings", "-o", "devices", "vgm/lv"],
    );
    assert!(before.contains(&format!("{}(0)", loops[0])), "{before}");

    // The restarted daemon brings the LV back on its mirror; pvmove again finishes the move.
    d = DaemonProc::start(&env.path("state"));
    wait_for_mirror(&d, "vgm");
    // lvs shows the move: its source PV and the copy's progress.
    let r = vm_on(
        &d,
        &devices,
        &[
            "lvs",
            "--noheadings",
            "--separator",
            ";",
            "-o",
            "lv_name,move_pv,copy_percent",
            "vgm/lv",
        ],
    );
    let f: Vec<&str> = r.trim().split(';').collect();
    assert_eq!(f[..2], ["lv", loops[0].as_str()], "{r}");
    let pct: f64 = f[2].parse().unwrap_or_else(|_| panic!("Cpy%Sync in {r}"));
    assert!((0.0..100.0).contains(&pct), "{r}");
    let out = vm_on(&d, &devices, &["pvmove", &loops[0]]);
    assert!(
        out.contains("resuming") && out.contains("Moved: 100.00%"),
        "{out}"
    );
    let after = vm_on(
        &d,
        &devices,
        &["lvs", "--noheadings", "-o", "devices", "vgm/lv"],
    );
    assert!(after.contains(&format!("{}(", loops[1])), "{after}");
    assert!(
        !d.ok(&["dev", "list"]).contains("pvmove"),
        "mirror left behind"
    );
    let uri = lv_uri(&d, &devices, "vgm/lv");
    qemu_io(
        &uri,
        &[
            "read -P 0x5a 0 16M",
            "read -P 0x6b 16M 1M",
            "read -P 0x5a 17M 15M",
        ],
    );
    env.assert_vgck_clean("vgm");

    // --abort: a move stopped half way goes back to the source, nothing committed.
    let mut mv = pvmove_bg(&d, &devices, &[&loops[1], "--rate", "4096"]);
    wait_for_mirror(&d, "vgm");
    mv.kill().unwrap();
    let _ = mv.wait();
    qemu_io(&uri, &["write -P 0x7c 0 1M"]);
    vm_on(&d, &devices, &["pvmove", "--abort", &loops[1]]);
    assert!(
        !d.ok(&["dev", "list"]).contains("pvmove"),
        "mirror left after --abort"
    );
    let table = d.ok(&["dev", "table", "vgm-lv"]);
    assert!(table.contains(&format!("linear {}", loops[1])), "{table}");
    qemu_io(
        &uri,
        &[
            "read -P 0x7c 0 1M",
            "read -P 0x5a 1M 15M",
            "read -P 0x6b 16M 1M",
        ],
    );
    env.assert_vgck_clean("vgm");
}

#[test]
fn a_raid1_lv_with_a_pv_missing_runs_degraded_and_heals_when_it_returns() {
    require_tool("qemu-io");
    let env = Lvm2::new(&[64, 64]);
    let loops = env.loops.clone();
    let (d, devices) = vg_of_two(&env, "vgd");
    let nbd = ["--nbd", "127.0.0.1:0"];
    let mut create = vec![
        "lvcreate", "--type", "raid1", "-m", "1", "-L", "16m", "-n", "r", "vgd",
    ];
    create.extend_from_slice(&nbd);
    vm_on(&d, &devices, &create);
    let synced = |devs: &str| {
        let t0 = std::time::Instant::now();
        loop {
            let r = vm_on(
                &d,
                devs,
                &["lvs", "--noheadings", "-o", "copy_percent", "vgd/r"],
            );
            if r.contains("100.00") {
                break;
            }
            assert!(t0.elapsed().as_secs() < 60, "no sync: {r}");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    synced(&devices);
    qemu_io(&lv_uri(&d, &devices, "vgd/r"), &["write -P 0x21 0 16M"]);
    vm_on(&d, &devices, &["lvchange", "-an", "vgd/r"]);

    // The second PV is gone: complete refuses, degraded (the default) runs on one leg.
    let only0 = loops[0].clone();
    let mut complete = vec!["lvchange", "-ay", "vgd/r", "--activationmode", "complete"];
    complete.extend_from_slice(&nbd);
    let e = vm_err(&d, &only0, &complete);
    assert!(e.contains("missing"), "{e}");
    let mut degraded = vec!["lvchange", "-ay", "vgd/r"];
    degraded.extend_from_slice(&nbd);
    vm_on(&d, &only0, &degraded);
    let table = d.ok(&["dev", "table", "vgd-r"]);
    assert!(table.trim_end().ends_with("- -"), "{table}");
    let health = vm_on(
        &d,
        &only0,
        &["lvs", "--noheadings", "-o", "lv_health_status", "vgd/r"],
    );
    assert_eq!(health.trim(), "partial");
    // Written while degraded: only the first leg has it.
    qemu_io(&lv_uri(&d, &only0, "vgd/r"), &["write -P 0x43 4M 2M"]);
    vm_on(&d, &only0, &["lvchange", "-an", "vgd/r"]);

    // The PV is back: the leg is rebuilt; then the second leg alone holds everything.
    vm_on(&d, &devices, &degraded);
    synced(&devices);
    vm_on(&d, &devices, &["lvchange", "-an", "vgd/r"]);
    let only1 = loops[1].clone();
    vm_on(&d, &only1, &degraded);
    qemu_io(
        &lv_uri(&d, &only1, "vgd/r"),
        &[
            "read -P 0x21 0 4M",
            "read -P 0x43 4M 2M",
            "read -P 0x21 6M 10M",
        ],
    );
}

#[test]
fn lvreduce_and_lvresize_shrink_what_lvm2_then_reads() {
    require_tool("qemu-io");
    let env = Lvm2::new(&[64, 64]);
    let loops = env.loops.clone();
    let (d, devices) = vg_with_lv(&env, "vgs");
    qemu_io(&lv_uri(&d, &devices, "vgs/lv"), &["write -P 0x61 0 32M"]);
    // A destructive shrink needs --yes where there is no terminal to ask on.
    let e = vm_err(&d, &devices, &["lvreduce", "-L", "20m", "vgs/lv"]);
    assert!(e.contains("--yes"), "{e}");
    // Active over NBD: down, cut, up again at an export of the same address.
    vm_on(&d, &devices, &["lvreduce", "-y", "-L", "20m", "vgs/lv"]);
    let uri = lv_uri(&d, &devices, "vgs/lv");
    let size = run_ok(Command::new("nbdinfo").args(["--size", &uri])).unwrap();
    assert_eq!(size.trim(), (20 * MIB).to_string());
    qemu_io(&uri, &["read -P 0x61 0 20M"]);
    // lvresize to a smaller size reduces too; -l -N counts extents.
    vm_on(&d, &devices, &["lvresize", "-y", "-l", "-4", "vgs/lv"]);
    let lvs = |env: &Lvm2| {
        num(
            &env.report(&["lvs", "-o", "lv_size", "vgs/lv"], "lv")[0],
            "lv_size",
        )
    };
    assert_eq!(lvs(&env), 16 * MIB, "lvm2's view");
    // Growing again allocates after the cut, in place.
    vm_on(&d, &devices, &["lvresize", "-L", "24m", "vgs/lv"]);
    assert_eq!(lvs(&env), 24 * MIB);
    let segs = lvm2_segments(&env, "vgs");
    assert_eq!(segs[0].1.areas, [(loops[0].clone(), 0)], "{segs:?}");
    env.assert_vgck_clean("vgs");
    // A cut inside a striped segment must leave whole rows.
    vm_on(
        &d,
        &devices,
        &["lvcreate", "-an", "-i", "2", "-l", "8", "-n", "st", "vgs"],
    );
    let e = vm_err(&d, &devices, &["lvreduce", "-y", "-l", "5", "vgs/st"]);
    assert!(e.contains("multiple of 2"), "{e}");
    // -r needs the LV as a local block device here (NBD only on this host).
    let e = vm_err(&d, &devices, &["lvreduce", "-r", "-L", "8m", "vgs/lv"]);
    assert!(e.contains("-r needs"), "{e}");
    // vgremove leaves no LV serving extents it frees: refused without -f, and with -f the
    // active LV is deactivated first.
    let e = vm_err(&d, &devices, &["vgremove", "vgs"]);
    assert!(e.contains("still contains"), "{e}");
    assert!(
        d.ok(&["dev", "list"]).contains("vgs-lv"),
        "still active after a refusal"
    );
    vm_on(&d, &devices, &["vgremove", "-f", "vgs"]);
    assert!(!d.ok(&["dev", "list"]).contains("vgs-lv"), "left active");
    let o = Command::new(e2e::volmgr_bin())
        .args(["lvs", "--devices", &devices, "vgs"])
        .env("VOLMGR_STATE_DIR", &d.state)
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(5),
        "lvm2's exit status for a failed command"
    );
}

#[test]
fn a_full_thin_pool_grows_online_with_lvextend() {
    require_tool("qemu-io");
    let env = Lvm2::new(&[64, 64]);
    let (d, devices) = vg_of_two(&env, "vgt");
    vm_on(
        &d,
        &devices,
        &[
            "lvcreate",
            "--type",
            "thin-pool",
            "-L",
            "8m",
            "-n",
            "pool",
            "vgt",
        ],
    );
    vm_on(
        &d,
        &devices,
        &[
            "lvcreate",
            "-V",
            "64m",
            "-T",
            "pool",
            "-n",
            "t",
            "vgt",
            "--nbd",
            "127.0.0.1:0",
        ],
    );
    let uri = lv_uri(&d, &devices, "vgt/t");
    qemu_io(&uri, &["write -P 0x51 0 6M"]);
    let data = |d: &DaemonProc| {
        vm_on(
            d,
            &devices,
            &["lvs", "--noheadings", "-o", "data_percent", "vgt/pool"],
        )
        .trim()
        .parse::<f64>()
        .unwrap()
    };
    let before = data(&d);
    assert!(before > 70.0, "{before}");
    vm_on(&d, &devices, &["lvextend", "-L", "+24m", "vgt/pool"]);
    let after = data(&d);
    assert!(
        after < before / 3.0,
        "the pool did not take the new blocks: {before} -> {after}"
    );
    // lvm2 sees the data sub-LV grown; both agree on the free space.
    let tdata = env.report(&["lvs", "-a", "-o", "lv_name,lv_size", "vgt"], "lv");
    let row = tdata
        .iter()
        .find(|r| field(r, "lv_name").contains("pool_tdata"))
        .expect("pool_tdata");
    assert_eq!(num(row, "lv_size"), 32 * MIB);
    // Room for what would not have fitted before.
    qemu_io(&uri, &["write -P 0x52 6M 16M"]);
    qemu_io(&uri, &["read -P 0x51 0 6M", "read -P 0x52 6M 16M"]);
}

/// `volmgr lvs ARGS --reportformat json --units b --nosuffix`: the rows.
fn vm_report(d: &DaemonProc, devices: &str, args: &[&str]) -> Vec<serde_json::Value> {
    let mut a = vec!["lvs"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["--reportformat", "json", "--units", "b", "--nosuffix"]);
    let out = vm_on(d, devices, &a);
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("lvs JSON ({e}): {out}"));
    v["report"][0]["lv"].as_array().cloned().unwrap_or_default()
}

#[test]
fn raid1_and_raid5_lvs_grow_online_with_lvextend() {
    require_tool("qemu-io");
    require_tool("nbdinfo");
    let env = Lvm2::new(&[64, 64, 64, 64]);
    let loops = env.loops.clone();
    let devices = loops.join(",");
    let state = env.path("state");
    std::fs::create_dir_all(&state).unwrap();
    let d = DaemonProc::start(&state);
    let mut vgcreate = vec!["vgcreate", "-s", "1m", "vgg"];
    vgcreate.extend(loops.iter().map(String::as_str));
    vm_on(&d, &devices, &vgcreate);
    let nbd = ["--nbd", "127.0.0.1:0"];
    for args in [
        ["--type", "raid1", "-m", "1", "-L", "8m", "-n", "r1", "vgg"].as_slice(),
        ["--type", "raid5", "-i", "2", "-L", "8m", "-n", "r5", "vgg"].as_slice(),
    ] {
        let mut a = vec!["lvcreate"];
        a.extend_from_slice(args);
        a.extend_from_slice(&nbd);
        vm_on(&d, &devices, &a);
    }
    let synced = |lv: &str| {
        let t0 = std::time::Instant::now();
        loop {
            let r = vm_on(
                &d,
                &devices,
                &["lvs", "--noheadings", "-o", "copy_percent", lv],
            );
            if r.trim() == "100.00" {
                break;
            }
            assert!(t0.elapsed().as_secs() < 60, "{lv} did not sync: {r}");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    for (lv, p) in [("vgg/r1", "0x5a"), ("vgg/r5", "0x6b")] {
        synced(lv);
        qemu_io(&lv_uri(&d, &devices, lv), &[&format!("write -P {p} 0 8M")]);
    }
    let seqno = |d: &DaemonProc| {
        vm_on(
            d,
            &devices,
            &["vgs", "--noheadings", "-o", "vg_seqno", "vgg"],
        )
        .trim()
        .to_string()
    };

    // Refused: a PV list of one PV cannot keep the images apart; nothing is written.
    let before = seqno(&d);
    let e = vm_err(
        &d,
        &devices,
        &["lvextend", "-L", "+4m", "vgg/r1", &loops[3]],
    );
    assert!(
        e.contains("Insufficient suitable allocatable extents for logical volume r1")
            && e.contains("r1_rimage_0")
            && e.contains("r1_rimage_1"),
        "{e}"
    );
    assert_eq!(seqno(&d), before, "a refused lvextend wrote metadata");
    // Refused too while a leg is failed, before anything is written; fine once rebuilt.
    d.ok(&["dev", "message", "vgg-r1", "fail", "1"]);
    let e = vm_err(&d, &devices, &["lvextend", "-L", "+8m", "vgg/r1"]);
    assert!(e.contains("not in-sync"), "{e}");
    assert_eq!(seqno(&d), before, "a refused lvextend wrote metadata");
    d.ok(&["dev", "message", "vgg-r1", "rebuild", "1"]);
    synced("vgg/r1");

    // Both grow by 8 MiB while active: raid1 images by 8 MiB, raid5's by 4 MiB each.
    vm_on(&d, &devices, &["lvextend", "-L", "+8m", "vgg/r1"]);
    vm_on(&d, &devices, &["lvextend", "-L", "+8m", "vgg/r5"]);
    let rows = vm_report(&d, &devices, &["-o", "lv_name,lv_size", "vgg"]);
    for lv in ["r1", "r5"] {
        let row = rows
            .iter()
            .find(|r| field(r, "lv_name") == lv)
            .unwrap_or_else(|| panic!("no {lv} in {rows:?}"));
        assert_eq!(num(row, "lv_size"), 16 * MIB, "{lv}");
    }
    for (lv, p) in [("vgg/r1", "0x5a"), ("vgg/r5", "0x6b")] {
        let uri = lv_uri(&d, &devices, lv);
        let size = run_ok(Command::new("nbdinfo").args(["--size", &uri])).unwrap();
        assert_eq!(size.trim(), (16 * MIB).to_string(), "{lv}: export size");
        // The old data, and writes past the old end, while the new part resyncs.
        qemu_io(
            &uri,
            &[
                &format!("read -P {p} 0 8M"),
                "write -P 0x7e 8M 6M",
                "read -P 0x7e 8M 6M",
            ],
        );
        synced(lv);
        qemu_io(&uri, &[&format!("read -P {p} 0 8M"), "read -P 0x7e 8M 6M"]);
        // The copies and parity of the part the array gained agree once resynced.
        let dm = lv.replace('/', "-");
        d.ok(&["dev", "message", &dm, "check"]);
        d.ok(&["dev", "wait", &dm, "--timeout", "60"]);
        let st = d.ok(&["dev", "status", &dm]);
        let words: Vec<&str> = st.split_whitespace().collect();
        let at = words.iter().position(|w| *w == "idle").expect("idle");
        assert_eq!(
            (words[at - 1], words[at + 1]),
            ("32768/32768", "0"),
            "{lv}: {st}"
        );
    }
    // Every image (with its metadata extent) on PVs no other image of its LV uses.
    let rows = vm_report(&d, &devices, &["-a", "-o", "lv_name,devices", "vgg"]);
    for (lv, images) in [("r1", 2), ("r5", 3)] {
        let pvs: Vec<std::collections::HashSet<String>> = (0..images)
            .map(|i| {
                rows.iter()
                    .filter(|r| {
                        let n = field(r, "lv_name");
                        n == format!("[{lv}_rimage_{i}]") || n == format!("[{lv}_rmeta_{i}]")
                    })
                    .flat_map(|r| {
                        field(r, "devices")
                            .split(',')
                            .filter_map(|x| x.split('(').next().map(str::to_string))
                            .collect::<Vec<_>>()
                    })
                    .collect()
            })
            .collect();
        for i in 0..images {
            assert!(!pvs[i].is_empty(), "{lv} image {i}: no devices in {rows:?}");
            for j in 0..i {
                assert!(
                    pvs[i].is_disjoint(&pvs[j]),
                    "{lv}: images {j} and {i} share a PV: {pvs:?}"
                );
            }
        }
    }
    // The array records the new size: it comes back at 16 MiB, in sync, with the data.
    vm_on(&d, &devices, &["lvchange", "-an", "vgg/r1"]);
    let mut up = vec!["lvchange", "-ay", "vgg/r1"];
    up.extend_from_slice(&nbd);
    vm_on(&d, &devices, &up);
    synced("vgg/r1");
    qemu_io(
        &lv_uri(&d, &devices, "vgg/r1"),
        &["read -P 0x5a 0 8M", "read -P 0x7e 8M 6M"],
    );
}

/// Data blocks a pool device uses (its dm-thin style status line).
fn pool_data_used(d: &DaemonProc, dev: &str) -> u64 {
    let st = d.ok(&["dev", "status", dev]);
    let f: Vec<&str> = st.split_whitespace().collect();
    f.get(5)
        .and_then(|x| x.split('/').next())
        .and_then(|x| x.parse().ok())
        .unwrap_or_else(|| panic!("bad pool status: {st}"))
}

/// `lvcreate --type thin-pool --dedup [--dedup-verify]`: the pool LV's table carries the
/// `dedup` feature words, kept in the VG metadata (activation after a deactivation builds
/// the same table), and two thin LVs with the same data use one copy.
#[test]
fn lvcreate_dedup_pool_keeps_its_feature_and_shares_identical_thin_lvs() {
    require_tool("nbdcopy");
    let env = Lvm2::new(&[64, 64]);
    let (d, devices) = vg_of_two(&env, "vgd");
    // A dedup pool has 4 KiB blocks: another size is refused with the reason.
    let e = vm_err(
        &d,
        &devices,
        &[
            "lvcreate",
            "--type",
            "thin-pool",
            "--dedup",
            "-c",
            "64k",
            "-L",
            "16m",
            "-n",
            "p0",
            "vgd",
        ],
    );
    assert!(e.contains("4k blocks"), "{e}");
    let e = vm_err(
        &d,
        &devices,
        &["lvcreate", "--dedup", "-L", "4m", "-n", "l", "vgd"],
    );
    assert!(e.contains("thin pools"), "{e}");
    for (name, size, verify) in [("pool", "24m", false), ("vpool", "8m", true)] {
        let mut a = vec![
            "lvcreate",
            "--type",
            "thin-pool",
            "--dedup",
            "-L",
            size,
            "-n",
            name,
        ];
        if verify {
            a.push("--dedup-verify");
        }
        a.push("vgd");
        vm_on(&d, &devices, &a);
    }
    let table = d.ok(&["dev", "table", "vgd-pool"]);
    assert!(table.trim_end().ends_with(" 8 0 1 dedup"), "{table}");
    let vtable = d.ok(&["dev", "table", "vgd-vpool"]);
    assert!(
        vtable.trim_end().ends_with(" 8 0 2 dedup dedup_verify"),
        "{vtable}"
    );

    // Deactivated and activated again from the VG metadata: the same table.
    vm_on(&d, &devices, &["vgchange", "-an", "vgd"]);
    vm_on(&d, &devices, &["vgchange", "-ay", "vgd"]);
    assert_eq!(d.ok(&["dev", "table", "vgd-pool"]), table);
    assert_eq!(d.ok(&["dev", "table", "vgd-vpool"]), vtable);

    let img = env.path("img");
    let data = pseudo_random(4 << 20, 9);
    std::fs::write(&img, &data).unwrap();
    for t in ["t0", "t1"] {
        vm_on(
            &d,
            &devices,
            &[
                "lvcreate",
                "-V",
                "8m",
                "-T",
                "pool",
                "-n",
                t,
                "vgd",
                "--nbd",
                "127.0.0.1:0",
            ],
        );
        let uri = lv_uri(&d, &devices, &format!("vgd/{t}"));
        run_ok(
            Command::new("nbdcopy")
                .arg("--destination-is-zero")
                .arg(&img)
                .arg(&uri),
        )
        .unwrap();
        let back = env.path("back");
        run_ok(Command::new("nbdcopy").arg(&uri).arg(&back)).unwrap();
        assert!(
            read_all(&back).unwrap()[..4 << 20] == data[..],
            "{t} differs"
        );
        std::fs::remove_file(&back).unwrap();
    }
    // 4 MiB twice: one copy of 1024 blocks.
    assert_eq!(pool_data_used(&d, "vgd-pool"), 1024);
    // lvs shows the pool's dedup ratio: 2048 logical blocks on 1024.
    let ratio = vm_on(
        &d,
        &devices,
        &["lvs", "--noheadings", "-o", "dedup_ratio", "vgd/pool"],
    );
    assert_eq!(ratio.trim(), "2.00", "{ratio}");
    vm_on(&d, &devices, &["vgchange", "-an", "vgd"]);
}
