//! The volume manager end to end against the real lvm2 tools: VGs written by lvm2 on loop
//! devices are activated by `volmgr` through its daemon (exported over NBD: the host has no
//! ublk), and their bytes are where kernel LVM would put them, in both directions.
//!
//! Needs root (losetup), lvm2, qemu-io and nbdcopy; a missing one fails the test loudly.

#[path = "../../lvm/tests/common/mod.rs"]
mod lvm2;

use std::os::unix::fs::FileExt;
use std::process::Command;

use e2e::{pseudo_random, qemu_io, require_tool, run_ok, DaemonProc};
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
    env.report(
        &[
            "lvs",
            "--segments",
            "-o",
            "lv_name,seg_size_pe,stripes,stripe_size,seg_pe_ranges",
            vg,
        ],
        "seg",
    )
    .iter()
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
            field(row, "lv_name"),
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
