//! Against the real lvm2 (2.03.16 on Debian 12), on loop devices over sparse files, with a
//! private configuration that shows lvm2 only the test's loop devices. Without kernel
//! device-mapper, LVs are created with `--driverloaded n -an -Zn`.
//!
//! - lvm2 writes a VG (linear and striped LVs, a PV with two metadata areas): our scan reads
//!   it and every field matches `vgs`/`pvs`/`lvs --reportformat json`.
//! - We write the next seqno (an LV added through the model): `vgck`, `vgs`, `lvs` accept it
//!   and show the change; lvm2 then writes again on top of ours and we read that.
//! - Our `pvcreate` lays PVs out as lvm2's does (default, bigger metadata, two copies, other
//!   alignment), and lvm2 uses them.
//! - Our first version of a VG (vgcreate's on-disk half) is accepted by lvm2.
//! - `vgcfgbackup` files parse; our file-style text restores with `vgcfgrestore`.
//! - What only lvm2 uses (zero and error segments, tags, read_ahead, compatibility flags)
//!   survives our commit: lvm2 reads back exactly the VG we wrote.
//! - A commit torn between PVs: lvm2 and our scan both take the new seqno, and
//!   `vgck --updatemetadata` repairs the stale PV.

mod common;

use std::collections::HashMap;

use common::{field, linear_lv, new_vg, num, pv_entry, Lvm2};
use lvm::commit;
use lvm::label::{self, PV_EXT_USED};
use lvm::mda;
use lvm::model::{Metadata, SegmentKind};
use lvm::pvcreate::{self, PvCreateOptions};
use lvm::scan::{self, ScanReport};
use lvm::text::Style;
use tables::Sectors;

const LVCREATE: &[&str] = &["lvcreate", "--driverloaded", "n", "-an", "-Zn", "-y"];

fn lvcreate(env: &Lvm2, args: &[&str]) {
    let mut all = LVCREATE.to_vec();
    all.extend_from_slice(args);
    env.run(&all);
}

/// Scans the test's loop devices (read-only) and checks the scan found no problem.
fn scan_clean(env: &Lvm2) -> ScanReport {
    let devs = env.open(true);
    let r = scan::scan(&devs);
    let problems: Vec<String> = r.problems.iter().map(|p| p.to_string()).collect();
    assert!(problems.is_empty(), "scan problems: {problems:#?}");
    r
}

/// Every field lvm2 reports for VG `name` equals what our scan read.
fn matches_lvm2(env: &Lvm2, r: &ScanReport, name: &str) {
    let svg = r
        .vg(name)
        .unwrap_or_else(|| panic!("our scan did not find VG {name}"));
    let vg = &svg.metadata.vg;
    let es = vg.extent_size.0;

    // Extents each PV has allocated, from the segments.
    let mut alloc: HashMap<&str, u64> = HashMap::new();
    for lv in &vg.logical_volumes {
        for seg in &lv.segments {
            if let SegmentKind::Striped { stripes, .. } = &seg.kind {
                let len = u64::from(seg.area_len().unwrap().0);
                for a in stripes {
                    *alloc.entry(a.volume.as_str()).or_default() += len;
                }
            }
        }
    }
    let total: u64 = vg
        .physical_volumes
        .iter()
        .map(|p| u64::from(p.pe_count.0))
        .sum();
    let used: u64 = alloc.values().sum();

    let rows = env.report(
        &[
            "vgs",
            "-o",
            "vg_name,vg_uuid,vg_seqno,vg_extent_size,vg_extent_count,vg_free_count,pv_count,\
             lv_count,max_lv,max_pv",
            name,
        ],
        "vg",
    );
    assert_eq!(rows.len(), 1);
    let v = &rows[0];
    assert_eq!(field(v, "vg_uuid"), vg.id.to_string());
    assert_eq!(num(v, "vg_seqno"), u64::from(vg.seqno));
    assert_eq!(num(v, "vg_extent_size"), es * 512);
    assert_eq!(num(v, "vg_extent_count"), total);
    assert_eq!(num(v, "vg_free_count"), total - used);
    assert_eq!(num(v, "pv_count"), vg.physical_volumes.len() as u64);
    assert_eq!(num(v, "lv_count"), vg.logical_volumes.len() as u64);
    assert_eq!(num(v, "max_lv"), u64::from(vg.max_lv));
    assert_eq!(num(v, "max_pv"), u64::from(vg.max_pv));

    let rows = env.report(
        &[
            "pvs",
            "-o",
            "pv_name,pv_uuid,dev_size,pe_start,pv_pe_count,pv_pe_alloc_count,pv_mda_count,\
             pv_mda_size,vg_name,pv_ext_vsn",
            "-S",
            &format!("vg_name={name}"),
        ],
        "pv",
    );
    assert_eq!(rows.len(), vg.physical_volumes.len());
    for row in &rows {
        let id = field(row, "pv_uuid");
        let pv = vg
            .physical_volumes
            .iter()
            .find(|p| p.id.to_string() == id)
            .unwrap_or_else(|| panic!("lvm2 lists PV {id} our scan does not have"));
        let dev = svg
            .pvs
            .iter()
            .find(|p| p.id == pv.id)
            .and_then(|p| p.device)
            .map(|i| &r.devices[i])
            .expect("PV found on a device");
        assert_eq!(field(row, "pv_name"), dev.name);
        let label = dev.label.as_ref().unwrap();
        assert_eq!(num(row, "dev_size"), pv.dev_size.unwrap().0 * 512);
        assert_eq!(num(row, "pe_start"), pv.pe_start.0 * 512);
        assert_eq!(num(row, "pv_pe_count"), u64::from(pv.pe_count.0));
        assert_eq!(
            num(row, "pv_pe_alloc_count"),
            alloc.get(pv.key.as_str()).copied().unwrap_or(0)
        );
        assert_eq!(num(row, "pv_mda_count"), label.metadata_areas.len() as u64);
        let smallest = label.metadata_areas.iter().map(|a| a.size.0).min().unwrap();
        assert_eq!(num(row, "pv_mda_size"), smallest);
        assert_eq!(
            num(row, "pv_ext_vsn"),
            u64::from(label.extension.as_ref().unwrap().version)
        );
        assert!(label.in_use());
    }

    let rows = env.report(
        &[
            "lvs",
            "--segments",
            "-o",
            "lv_name,lv_uuid,lv_size,segtype,stripes,stripe_size,seg_start_pe,seg_size_pe,\
             seg_pe_ranges,lv_time,lv_host",
            name,
        ],
        "seg",
    );
    let nsegs: usize = vg.logical_volumes.iter().map(|l| l.segments.len()).sum();
    assert_eq!(rows.len(), nsegs);
    let loop_of = |key: &str| -> String {
        let pv = vg.pv_by_key(key).unwrap();
        let i = svg
            .pvs
            .iter()
            .find(|p| p.id == pv.id)
            .unwrap()
            .device
            .unwrap();
        r.devices[i].name.clone()
    };
    for row in &rows {
        let lv = vg
            .lv(&field(row, "lv_name"))
            .unwrap_or_else(|| panic!("lvm2 lists LV {row} our scan does not have"));
        assert_eq!(field(row, "lv_uuid"), lv.id.to_string());
        assert_eq!(
            num(row, "lv_size"),
            u64::from(lv.extent_count().unwrap().0) * es * 512
        );
        assert_eq!(num(row, "lv_time"), lv.creation_time.unwrap());
        assert_eq!(field(row, "lv_host"), lv.creation_host.clone().unwrap());
        let start = num(row, "seg_start_pe");
        let seg = lv
            .segments
            .iter()
            .find(|s| u64::from(s.start_extent.0) == start)
            .unwrap();
        assert_eq!(num(row, "seg_size_pe"), u64::from(seg.extent_count.0));
        let SegmentKind::Striped {
            stripe_size,
            stripes,
        } = &seg.kind
        else {
            panic!("unexpected segment {seg:?}")
        };
        let want_type = if stripes.len() == 1 {
            "linear"
        } else {
            "striped"
        };
        assert_eq!(field(row, "segtype"), want_type);
        assert_eq!(num(row, "stripes"), stripes.len() as u64);
        assert_eq!(
            num(row, "stripe_size"),
            stripe_size.map_or(0, |s| s.0 * 512)
        );
        let len = seg.area_len().unwrap().0;
        let ranges: Vec<String> = stripes
            .iter()
            .map(|a| {
                format!(
                    "{}:{}-{}",
                    loop_of(&a.volume),
                    a.start.0,
                    a.start.0 + len - 1
                )
            })
            .collect();
        assert_eq!(field(row, "seg_pe_ranges"), ranges.join(" "));
    }
}

/// vgck must pass and say nothing.
fn vgck_clean(env: &Lvm2, name: &str) {
    env.assert_vgck_clean(name);
}

#[test]
fn lvm2_vg_is_read_field_by_field_and_our_next_seqno_is_accepted() {
    let env = Lvm2::new(&[64, 64, 64]);
    let [a, b, c] = [&env.loops[0], &env.loops[1], &env.loops[2]].map(|s| s.as_str());
    env.run(&["pvcreate", a, b]);
    env.run(&["pvcreate", "--pvmetadatacopies", "2", c]);
    env.run(&["vgcreate", "lvmtest_rw", a, b, c]);
    lvcreate(&env, &["-L", "8M", "-n", "lin", "lvmtest_rw"]);
    lvcreate(
        &env,
        &[
            "-L",
            "16M",
            "-i",
            "2",
            "-I",
            "64k",
            "-n",
            "str",
            "lvmtest_rw",
        ],
    );
    lvcreate(
        &env,
        &[
            "-l",
            "3",
            "-i",
            "3",
            "-I",
            "128k",
            "-n",
            "str3",
            "lvmtest_rw",
        ],
    );

    let r = scan_clean(&env);
    matches_lvm2(&env, &r, "lvmtest_rw");
    let old = r.vg("lvmtest_rw").unwrap();
    assert_eq!(old.current.len(), 4, "two PVs with one area, one with two");
    let old_seqno = old.seqno();

    // Our change: a linear LV on the third PV, written as the next seqno.
    let devs = env.open(false);
    let r = scan::scan(&devs);
    let mut md = r.vg("lvmtest_rw").unwrap().metadata.clone();
    let key = md
        .vg
        .pv_by_id(&r.devices[2].label.as_ref().unwrap().pv_uuid)
        .unwrap()
        .key
        .clone();
    let lv = linear_lv(&md.vg, "ours", &key, 3);
    md.vg.logical_volumes.push(lv);
    let before = md.creation_time;
    md.stamp("Write from the lvm crate's interop test.");
    assert!(md.creation_time >= before);
    assert_eq!(md.creation_host, lvm::model::hostname());
    let done = commit::commit(&r, &mut md).unwrap();
    assert_eq!(done.seqno, old_seqno + 1);
    assert_eq!(done.copies.len(), 4);
    drop(devs);

    vgck_clean(&env, "lvmtest_rw");
    let r = scan_clean(&env);
    assert_eq!(r.vg("lvmtest_rw").unwrap().seqno(), old_seqno + 1);
    matches_lvm2(&env, &r, "lvmtest_rw");
    let names: Vec<String> = env
        .report(&["lvs", "-o", "lv_name", "lvmtest_rw"], "lv")
        .iter()
        .map(|row| field(row, "lv_name"))
        .collect();
    assert!(names.contains(&"ours".to_string()), "{names:?}");

    // lvm2 writes after us (its ring position follows ours), and we read what it wrote.
    lvcreate(&env, &["-L", "4M", "-n", "after", "lvmtest_rw"]);
    env.run(&["lvremove", "--driverloaded", "n", "-y", "lvmtest_rw/lin"]);
    vgck_clean(&env, "lvmtest_rw");
    let r = scan_clean(&env);
    let vg = &r.vg("lvmtest_rw").unwrap().metadata.vg;
    assert_eq!(vg.seqno, old_seqno + 3);
    assert!(vg.lv("after").is_some() && vg.lv("ours").is_some() && vg.lv("lin").is_none());
    matches_lvm2(&env, &r, "lvmtest_rw");
}

#[test]
fn our_pvcreate_lays_out_pvs_as_lvm2_does() {
    let cases: [(&str, PvCreateOptions, &[&str]); 4] = [
        ("default", PvCreateOptions::default(), &[]),
        (
            "metadatasize 2m",
            PvCreateOptions {
                metadata_size: Sectors(4096),
                ..PvCreateOptions::default()
            },
            &["--metadatasize", "2m"],
        ),
        (
            "two copies",
            PvCreateOptions {
                metadata_copies: 2,
                ..PvCreateOptions::default()
            },
            &["--pvmetadatacopies", "2"],
        ),
        (
            "dataalignment 4m",
            PvCreateOptions {
                data_alignment: Sectors(8192),
                ..PvCreateOptions::default()
            },
            &["--dataalignment", "4m"],
        ),
    ];
    let env = Lvm2::new(&[37, 37]);
    let (ours, theirs) = (env.loops[0].as_str(), env.loops[1].as_str());
    for (what, opts, args) in cases {
        let devs = env.open(false);
        let our_label = pvcreate::pvcreate(devs[0].as_ref(), &opts).unwrap();
        drop(devs);
        let mut cmd = vec!["pvcreate", "-ff", "-y"];
        cmd.extend_from_slice(args);
        cmd.push(theirs);
        env.run(&cmd);

        let devs = env.open(true);
        let mine = label::find(devs[0].as_ref()).unwrap().unwrap();
        let lvm2s = label::find(devs[1].as_ref()).unwrap().unwrap();
        assert_eq!(mine, our_label, "{what}");
        let same = lvm::Label {
            pv_uuid: lvm2s.pv_uuid,
            ..mine.clone()
        };
        assert_eq!(same, lvm2s, "{what}: our label vs lvm2's");
        for (i, area) in lvm2s.metadata_areas.iter().enumerate() {
            let h1 = mda::read_header(devs[1].as_ref(), area).unwrap();
            let h0 = mda::read_header(devs[0].as_ref(), &mine.metadata_areas[i]).unwrap();
            assert_eq!(h0, h1, "{what}: metadata area {i}");
        }
        drop(devs);

        // lvm2 sees our PV as it sees its own.
        let cols = "pv_name,pe_start,pv_mda_count,pv_mda_size,pv_ext_vsn,dev_size";
        let rows = env.report(&["pvs", "-o", cols, ours, theirs], "pv");
        assert_eq!(rows.len(), 2, "{what}");
        for k in cols.split(',').skip(1) {
            assert_eq!(rows[0][k], rows[1][k], "{what}: {k}");
        }
        assert_eq!(field(&rows[0], "pv_name"), ours);
    }
    // And lvm2 builds a VG on it.
    env.run(&["vgcreate", "lvmtest_pv", ours, theirs]);
    lvcreate(&env, &["-L", "8M", "-i", "2", "-n", "s", "lvmtest_pv"]);
    vgck_clean(&env, "lvmtest_pv");
    let r = scan_clean(&env);
    matches_lvm2(&env, &r, "lvmtest_pv");
}

#[test]
fn lvm2_accepts_a_vg_we_create() {
    let env = Lvm2::new(&[48, 48]);
    let devs = env.open(false);
    let mut pvs = Vec::new();
    for (i, d) in devs.iter().enumerate() {
        let l = pvcreate::pvcreate(d.as_ref(), &PvCreateOptions::default()).unwrap();
        let key = format!("pv{i}");
        pvs.push(pv_entry(
            &key,
            &l,
            d.size(),
            Sectors(8192),
            Some(env.loops[i].clone()),
        ));
    }
    let mut vg = new_vg("lvmtest_new", Sectors(8192), pvs);
    let lv = linear_lv(&vg, "first", "pv1", 2);
    vg.logical_volumes.push(lv);
    let md = Metadata::new(vg, "Write from the lvm crate's interop test.");
    commit::create(&devs, &md).unwrap();
    for d in &devs {
        let l = label::find(d.as_ref()).unwrap().unwrap();
        assert_eq!(l.extension.unwrap().flags & PV_EXT_USED, PV_EXT_USED);
    }
    drop(devs);

    vgck_clean(&env, "lvmtest_new");
    let r = scan_clean(&env);
    matches_lvm2(&env, &r, "lvmtest_new");
    lvcreate(
        &env,
        &["-L", "8M", "-i", "2", "-n", "theirs", "lvmtest_new"],
    );
    let r = scan_clean(&env);
    assert_eq!(r.vg("lvmtest_new").unwrap().seqno(), 2);
    matches_lvm2(&env, &r, "lvmtest_new");
}

#[test]
fn vgcfgbackup_parses_and_our_file_restores() {
    let env = Lvm2::new(&[40, 40]);
    let (a, b) = (env.loops[0].as_str(), env.loops[1].as_str());
    env.run(&["pvcreate", a, b]);
    env.run(&["vgcreate", "lvmtest_cfg", a, b]);
    lvcreate(&env, &["-L", "8M", "-n", "lin", "lvmtest_cfg"]);
    lvcreate(
        &env,
        &[
            "-L",
            "8M",
            "-i",
            "2",
            "-I",
            "32k",
            "-n",
            "str",
            "lvmtest_cfg",
        ],
    );
    let file = env.path("backup.vg");
    let file_s = file.to_str().unwrap();
    env.run(&["vgcfgbackup", "-f", file_s, "lvmtest_cfg"]);

    let r = scan_clean(&env);
    let scanned = r.vg("lvmtest_cfg").unwrap();
    let backup = Metadata::from_text(&std::fs::read(&file).unwrap()).unwrap();
    // The file is the same VG as the disk copy; only the header lines differ.
    assert_eq!(backup.vg, scanned.metadata.vg);

    // Our file, with one more LV, restored by lvm2.
    let mut md = backup.clone();
    let lv = linear_lv(&md.vg, "restored", "pv1", 2);
    md.vg.logical_volumes.push(lv);
    md.description = "Written by the lvm crate's interop test.".into();
    std::fs::write(&file, md.to_text(Style::File).unwrap()).unwrap();
    env.run(&["vgcfgrestore", "-f", file_s, "lvmtest_cfg"]);
    vgck_clean(&env, "lvmtest_cfg");
    let r = scan_clean(&env);
    let vg = &r.vg("lvmtest_cfg").unwrap().metadata.vg;
    assert!(vg.lv("restored").is_some());
    matches_lvm2(&env, &r, "lvmtest_cfg");
}

#[test]
fn commit_torn_between_pvs_is_read_as_new_and_repaired_by_lvm2() {
    let env = Lvm2::new(&[40, 40]);
    let (a, b) = (env.loops[0].as_str(), env.loops[1].as_str());
    env.run(&["pvcreate", a, b]);
    env.run(&["vgcreate", "lvmtest_torn", a, b]);
    lvcreate(&env, &["-L", "8M", "-n", "lin", "lvmtest_torn"]);

    let devs = env.open(false);
    let r = scan::scan(&devs);
    let old_seqno = r.vg("lvmtest_torn").unwrap().seqno();
    let area = r.devices[1].label.as_ref().unwrap().metadata_areas[0];
    let old_header = mda::read_header(devs[1].as_ref(), &area).unwrap();
    let mut md = r.vg("lvmtest_torn").unwrap().metadata.clone();
    let lv = linear_lv(&md.vg, "new", "pv0", 1);
    md.vg.logical_volumes.push(lv);
    commit::commit(&r, &mut md).unwrap();
    // As if the power went between the two PVs' commit writes: PV 1 keeps the old header.
    mda::write_header(devs[1].as_ref(), &old_header, true).unwrap();
    let r = scan::scan(&devs);
    let vg = r.vg("lvmtest_torn").unwrap();
    assert_eq!(vg.seqno(), old_seqno + 1);
    assert_eq!(vg.stale.len(), 1, "{:?}", r.problems);
    drop(devs);

    let rows = env.report(&["vgs", "-o", "vg_seqno", "lvmtest_torn"], "vg");
    assert_eq!(num(&rows[0], "vg_seqno"), u64::from(old_seqno + 1));
    env.run(&["vgck", "--updatemetadata", "lvmtest_torn"]);
    let r = scan_clean(&env);
    assert!(r
        .vg("lvmtest_torn")
        .unwrap()
        .metadata
        .vg
        .lv("new")
        .is_some());
    matches_lvm2(&env, &r, "lvmtest_torn");
}

#[test]
fn what_only_lvm2_uses_survives_our_commit() {
    // Segment types we do not type (zero, error), tags at every level, read_ahead,
    // compatibility flags: we must carry all of it through our commit, and lvm2 must read
    // back exactly the VG we wrote.
    let env = Lvm2::new(&[40, 40]);
    let (a, b) = (env.loops[0].as_str(), env.loops[1].as_str());
    env.run(&["pvcreate", a, b]);
    env.run(&["vgcreate", "lvmtest_keep", a, b]);
    lvcreate(&env, &["-L", "8M", "-n", "lin", "lvmtest_keep"]);
    lvcreate(
        &env,
        &["--type", "zero", "-L", "8M", "-n", "z", "lvmtest_keep"],
    );
    lvcreate(
        &env,
        &["--type", "error", "-L", "4M", "-n", "e", "lvmtest_keep"],
    );
    env.run(&[
        "vgchange",
        "--addtag",
        "vgtag",
        "--setautoactivation",
        "n",
        "lvmtest_keep",
    ]);
    env.run(&["pvchange", "--addtag", "pvtag", a]);
    env.run(&[
        "lvchange",
        "--driverloaded",
        "n",
        "--addtag",
        "lvtag",
        "-r",
        "256",
        "--setactivationskip",
        "y",
        "lvmtest_keep/lin",
    ]);

    let devs = env.open(false);
    let r = scan::scan(&devs);
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    let mut md = r.vg("lvmtest_keep").unwrap().metadata.clone();
    let z = md.vg.lv("z").unwrap();
    assert!(matches!(&z.segments[0].kind, SegmentKind::Other { segtype } if segtype == "zero"));
    assert!(md.vg.flags.has("NOAUTOACTIVATE"));
    assert!(md.vg.lv("lin").unwrap().flags.has("ACTIVATION_SKIP"));
    let lv = linear_lv(&md.vg, "ours", "pv1", 2);
    md.vg.logical_volumes.push(lv);
    commit::commit(&r, &mut md).unwrap();
    drop(devs);

    vgck_clean(&env, "lvmtest_keep");
    let file = env.path("keep.vg");
    env.run(&["vgcfgbackup", "-f", file.to_str().unwrap(), "lvmtest_keep"]);
    let backup = Metadata::from_text(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(backup.vg, md.vg, "lvm2 read back a different VG");
    let rows = env.report(
        &[
            "lvs",
            "-o",
            "lv_name,segtype,lv_tags,lv_read_ahead",
            "lvmtest_keep",
        ],
        "lv",
    );
    let seg: HashMap<String, (String, String)> = rows
        .iter()
        .map(|row| {
            (
                field(row, "lv_name"),
                (field(row, "segtype"), field(row, "lv_tags")),
            )
        })
        .collect();
    assert_eq!(seg["z"].0, "zero");
    assert_eq!(seg["e"].0, "error");
    assert_eq!(seg["lin"].1, "lvtag");
    assert_eq!(seg["ours"].0, "linear");
    let rows = env.report(&["vgs", "-o", "vg_tags", "lvmtest_keep"], "vg");
    assert_eq!(field(&rows[0], "vg_tags"), "vgtag");
    let rows = env.report(&["pvs", "-o", "pv_name,pv_tags", a], "pv");
    assert_eq!(field(&rows[0], "pv_tags"), "pvtag");
}
