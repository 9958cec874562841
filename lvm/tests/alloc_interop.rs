//! The allocator against the real lvm2 (2.03.16 on Debian 12), on loop devices with a
//! private configuration (see `common`): before each `lvcreate`/`lvextend`, the allocator
//! predicts the extents from the VG as our scan reads it; then lvm2 runs, and the LV it wrote
//! must use exactly those PVs and extents (compared extent row by extent row, so lvm2's
//! merging of adjacent segments does not matter), and lvm2's rounding messages and refusals
//! must match ours.
//!
//! Cases: linear on a named PV, striped `-i 2 -I 64k`, `--alloc contiguous`, `-L 10m`
//! rounding, lvextend in place / elsewhere / refused under contiguous, a PV range
//! (`PV:20-23`), a linear LV spanning three PVs, and lvm2's choice among several free runs
//! of one PV (not always the smallest that fits; `PvSpace::lvm2_run`). Raid needs the kernel's
//! device-mapper (lvm2 refuses `--type raid1` with `--driverloaded n`), so it is not here.

mod common;

use common::Lvm2;
use lvm::alloc::{self, parse_size, Policy, PvSelection, Request};
use lvm::model::SegmentKind;
use lvm::{scan, Extents, Segment, VolumeGroup};
use tables::Sectors;

const NO_DM: &[&str] = &["--driverloaded", "n"];

/// Runs lvm2 `cmd` with `args` (no device-mapper; lvcreate also `-an -Zn -y`); returns
/// whether it succeeded and stdout + stderr.
fn lvm2(env: &Lvm2, cmd: &str, args: &[&str]) -> (bool, String) {
    let mut all = vec![cmd];
    all.extend_from_slice(NO_DM);
    if cmd == "lvcreate" {
        all.extend_from_slice(&["-an", "-Zn", "-y"]);
    }
    all.extend_from_slice(args);
    let out = env.try_run(&all);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn ok(env: &Lvm2, cmd: &str, args: &[&str]) -> String {
    let (ok, text) = lvm2(env, cmd, args);
    assert!(ok, "lvm {cmd} {} failed: {text}", args.join(" "));
    text
}

/// The VG as our scan reads it now.
fn read_vg(env: &Lvm2, name: &str) -> VolumeGroup {
    let devs = env.open(true);
    let r = scan::scan(&devs);
    let problems: Vec<String> = r.problems.iter().map(|p| p.to_string()).collect();
    assert!(problems.is_empty(), "scan problems: {problems:#?}");
    r.vg(name)
        .unwrap_or_else(|| panic!("our scan did not find VG {name}"))
        .metadata
        .vg
        .clone()
}

/// The key of the PV on `dev`.
fn key_of(vg: &VolumeGroup, dev: &str) -> String {
    vg.physical_volumes
        .iter()
        .find(|p| p.device.as_deref() == Some(dev))
        .unwrap_or_else(|| panic!("no PV on {dev} in {vg:?}"))
        .key
        .clone()
}

/// Each row of an LV's stripes: the (PV, extent) of every stripe at that offset.
fn rows(segs: &[Segment]) -> Vec<Vec<(String, u32)>> {
    let mut out = Vec::new();
    for s in segs {
        let SegmentKind::Striped { stripes, .. } = &s.kind else {
            panic!("not striped: {s:?}");
        };
        let len = s.extent_count.0 / stripes.len() as u32;
        for r in 0..len {
            out.push(
                stripes
                    .iter()
                    .map(|a| (a.volume.clone(), a.start.0 + r))
                    .collect(),
            );
        }
    }
    out
}

fn lv_rows(vg: &VolumeGroup, lv: &str) -> Vec<Vec<(String, u32)>> {
    rows(
        &vg.lv(lv)
            .unwrap_or_else(|| panic!("no LV {lv} in {vg:?}"))
            .segments,
    )
}

/// Predicts `lvcreate -n NAME ARGS vg PVS` with `req`, runs it, and compares.
fn create(env: &Lvm2, name: &str, req: &Request, args: &[&str], pvs: &[&str]) -> String {
    let before = read_vg(env, "vg");
    let ours = alloc::allocate(&before, req)
        .unwrap_or_else(|e| panic!("our allocator refused lvcreate {args:?}: {e}"));
    let mut all = vec!["-n", name];
    all.extend_from_slice(args);
    all.push("vg");
    all.extend_from_slice(pvs);
    let text = ok(env, "lvcreate", &all);
    let after = read_vg(env, "vg");
    assert_eq!(
        lv_rows(&after, name),
        rows(&ours.legs[0]),
        "lvcreate {args:?}: lvm2's extents (left) differ from ours (right)"
    );
    text
}

/// Predicts `lvextend -l +more` of `lv`, runs it, and compares the new rows.
fn extend(env: &Lvm2, lv: &str, more: u32, policy: Policy, args: &[&str]) {
    let before = read_vg(env, "vg");
    let old = lv_rows(&before, lv).len();
    let ours = alloc::extend(&before, lv, Extents(more), policy, None)
        .unwrap_or_else(|e| panic!("our allocator refused lvextend {lv} +{more}: {e}"));
    let plus = format!("+{more}");
    let target = format!("vg/{lv}");
    let mut all = vec!["-l", plus.as_str()];
    all.extend_from_slice(args);
    all.push(&target);
    ok(env, "lvextend", &all);
    let after = read_vg(env, "vg");
    let new = lv_rows(&after, lv);
    assert_eq!(
        new[old..],
        rows(&ours)[..],
        "lvextend {lv} +{more}: lvm2's extents (left) differ from ours (right)"
    );
}

#[test]
fn placements_match_lvm2() {
    // 100 MiB devices: 24 extents of 4 MiB each after the 1 MiB metadata area.
    let env = Lvm2::new(&[100, 100, 100]);
    let loops: Vec<&str> = env.loops.iter().map(String::as_str).collect();
    let mut args = vec!["pvcreate", "-q"];
    args.extend_from_slice(&loops);
    env.run(&args);
    let mut args = vec!["vgcreate", "-q", "vg"];
    args.extend_from_slice(&loops);
    env.run(&args);
    let vg = read_vg(&env, "vg");
    let pv1 = key_of(&vg, loops[1]);
    let pv2 = key_of(&vg, loops[2]);

    // Linear on a named PV.
    create(
        &env,
        "a",
        &Request {
            extents: Extents(10),
            pvs: Some(PvSelection::whole([pv1.clone()])),
            ..Request::default()
        },
        &["-l", "10"],
        &[loops[1]],
    );
    // Striped: the first PVs (in VG order) that hold a stripe.
    create(
        &env,
        "b",
        &Request {
            extents: Extents(10),
            stripes: 2,
            stripe_size: Some(Sectors(128)),
            ..Request::default()
        },
        &["-l", "10", "-i", "2", "-I", "64k"],
        &[],
    );
    let vg = read_vg(&env, "vg");
    match &vg.lv("b").unwrap().segments[0].kind {
        SegmentKind::Striped { stripe_size, .. } => assert_eq!(*stripe_size, Some(Sectors(128))),
        SegmentKind::Other { segtype } => panic!("b is {segtype}"),
    }
    // Contiguous.
    create(
        &env,
        "c",
        &Request {
            extents: Extents(6),
            policy: Policy::Contiguous,
            ..Request::default()
        },
        &["-l", "6", "--alloc", "contiguous"],
        &[],
    );
    // -L 10m: rounded up to 3 extents, with lvm2's message.
    let vg = read_vg(&env, "vg");
    let (extents, note) = parse_size("10m", false)
        .unwrap()
        .to_extents(&vg, None, 1)
        .unwrap();
    assert_eq!(extents, Extents(3));
    let note = note.expect("a rounding note");
    let text = create(
        &env,
        "d",
        &Request {
            extents,
            ..Request::default()
        },
        &["-L", "10m"],
        &[],
    );
    assert!(text.contains(&note), "lvm2 said {text:?}, we say {note:?}");

    // lvextend: a's next extent is b's; lvm2 clings to a's PV.
    extend(&env, "a", 4, Policy::Normal, &[]);
    // Contiguous extension of b is blocked by c: both refuse, alike.
    let vg = read_vg(&env, "vg");
    let ours = alloc::extend(&vg, "b", Extents(2), Policy::Contiguous, None)
        .expect_err("b cannot grow in place");
    let (done, text) = lvm2(
        &env,
        "lvextend",
        &["-l", "+2", "--alloc", "contiguous", "vg/b"],
    );
    assert!(!done, "lvm2 extended b in place: {text}");
    let lvm2_says = "Insufficient suitable contiguous allocatable extents for logical volume b: \
                     2 more required";
    assert!(text.contains(lvm2_says), "lvm2 said {text}");
    assert!(ours.to_string().starts_with(lvm2_says), "we say {ours}");
    // Normal extension of the striped b: each stripe on its PV.
    extend(&env, "b", 4, Policy::Normal, &[]);

    // A PV range.
    let vg = read_vg(&env, "vg");
    let mut sel = PvSelection::new();
    sel.add(&vg, &pv2, Some("20-23")).unwrap();
    let range = format!("{}:20-23", loops[2]);
    create(
        &env,
        "e",
        &Request {
            extents: Extents(3),
            pvs: Some(sel),
            ..Request::default()
        },
        &["-l", "3"],
        &[&range],
    );
    // Linear over three PVs: the largest run, the rest of its PV, then the others.
    create(
        &env,
        "f",
        &Request {
            extents: Extents(30),
            ..Request::default()
        },
        &["-l", "30"],
        &[],
    );
    // lvm2's choice among a PV's runs: 2 extents from runs of 6 (PE 5-10) and 8 (PE 16-23)
    // come from the 8.
    ok(&env, "lvremove", &["-y", "vg/f", "vg/c"]);
    create(
        &env,
        "g",
        &Request {
            extents: Extents(4),
            stripes: 2,
            ..Request::default()
        },
        &["-l", "4", "-i", "2"],
        &[],
    );

    // Free space as pvs reports it.
    let vg = read_vg(&env, "vg");
    let report = alloc::free_report(&vg);
    let rows = env.report(
        &[
            "pvs",
            "-o",
            "pv_name,pv_pe_count,pv_pe_alloc_count",
            "-S",
            "vg_name=vg",
        ],
        "pv",
    );
    for row in rows {
        let key = key_of(&vg, &common::field(&row, "pv_name"));
        let free = common::num(&row, "pv_pe_count") - common::num(&row, "pv_pe_alloc_count");
        let ours = report.iter().find(|p| p.key == key).unwrap();
        assert_eq!(u64::from(ours.free.0), free, "PFree of {key}");
    }
}
