//! volmgr's VG/PV verbs against the real lvm2 (2.03.16) on loop devices: what `volmgr
//! vgextend`, `vgreduce`, `vgrename`, `pvresize`, `vgcfgrestore` and `vgck --updatemetadata`
//! write, lvm2 reads back with the expected values, and `lvm vgck` finds clean; lvm2's
//! backups restore with volmgr and volmgr's with lvm2; damaged metadata is restored or
//! repaired. Refusals exit with lvm2's status (5) and name what is in the way.
//!
//! Needs root (losetup) and lvm2; a missing one fails the test loudly.

#[path = "../../lvm/tests/common/mod.rs"]
mod lvm2;

use std::os::unix::fs::FileExt;
use std::process::{Command, Output};

use e2e::{volmgr_bin, DaemonProc};
use lvm2::{field, num, Lvm2};

const LVCREATE: &[&str] = &["lvcreate", "--driverloaded", "n", "-an", "-Zn", "-y"];

/// The test's loop devices and a state directory with no daemon (nothing is active).
struct Env {
    lvm: Lvm2,
    devices: String,
}

impl Env {
    fn new(sizes_mib: &[u64]) -> Env {
        let lvm = Lvm2::new(sizes_mib);
        let devices = lvm.loops.join(",");
        std::fs::create_dir_all(lvm.path("state")).unwrap();
        Env { lvm, devices }
    }
    fn l(&self, i: usize) -> &str {
        &self.lvm.loops[i]
    }
    fn lvcreate(&self, args: &[&str]) {
        let mut a = LVCREATE.to_vec();
        a.extend_from_slice(args);
        self.lvm.run(&a);
    }
    /// `volmgr ARGS --devices LOOPS`.
    fn vm(&self, args: &[&str]) -> Output {
        self.vm_on(args, &self.devices)
    }
    fn vm_on(&self, args: &[&str], devices: &str) -> Output {
        Command::new(volmgr_bin())
            .args(args)
            .args(["--devices", devices])
            .env("VOLMGR_STATE_DIR", self.lvm.path("state"))
            .output()
            .expect("running volmgr")
    }
    /// Runs volmgr, asserting success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.vm(args);
        assert!(
            o.status.success(),
            "volmgr {args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
    /// Runs volmgr, asserting lvm2's failure status 5; returns stderr.
    fn fails(&self, args: &[&str]) -> String {
        fails(self.vm(args), args)
    }
    /// lvm2's `vgck` passes and warns about nothing, and so does ours.
    fn vgck_clean(&self, vg: &str) {
        self.lvm.assert_vgck_clean(vg);
        self.ok(&["vgck", vg]);
    }
    /// `lvm pvs` rows by device: (VG, pe_count).
    fn pvs(&self) -> Vec<(String, String, u64)> {
        self.lvm
            .report(&["pvs", "-o", "pv_name,vg_name,pv_pe_count"], "pv")
            .iter()
            .map(|r| {
                (
                    field(r, "pv_name"),
                    field(r, "vg_name"),
                    num(r, "pv_pe_count"),
                )
            })
            .collect()
    }
    fn vg_of(&self, dev: &str) -> String {
        self.pvs()
            .into_iter()
            .find(|(d, _, _)| d == dev)
            .map(|(_, vg, _)| vg)
            .unwrap_or_else(|| panic!("lvm pvs does not list {dev}"))
    }
    fn lv_names(&self, vg: &str) -> Vec<String> {
        self.lvm
            .report(&["lvs", "-o", "lv_name", vg], "lv")
            .iter()
            .map(|r| field(r, "lv_name"))
            .collect()
    }
    /// Overwrites the committed text of the first metadata area of `dev` with garbage.
    fn garble_text(&self, dev: &str) {
        let f = open_rw(dev);
        let mut h = [0u8; 512];
        f.read_exact_at(&mut h, 4096).unwrap();
        let off = u64::from_le_bytes(h[40..48].try_into().unwrap());
        let size = u64::from_le_bytes(h[48..56].try_into().unwrap());
        assert!(size > 0, "{dev} has no committed text");
        f.write_all_at(&vec![b'#'; size as usize], 4096 + off)
            .unwrap();
        f.sync_all().unwrap();
    }
}

fn open_rw(dev: &str) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .unwrap_or_else(|e| panic!("opening {dev}: {e}"))
}

fn fails(o: Output, args: &[&str]) -> String {
    assert_eq!(
        o.status.code(),
        Some(5),
        "volmgr {args:?} should fail with lvm2's status 5: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn vgextend_and_vgreduce_are_what_lvm2_reads() {
    let e = Env::new(&[64, 64, 64, 64]);
    let (l0, l1, l2, l3) = (e.l(0), e.l(1), e.l(2), e.l(3));
    e.lvm.run(&["pvcreate", l0, l1]);
    e.lvm.run(&["vgcreate", "-s", "1m", "vgx", l0]);
    e.lvcreate(&["-l", "10", "-n", "lin", "vgx"]);
    // l1 is lvm2's orphan PV, l2 nothing yet: we pvcreate it.
    let out = e.ok(&["vgextend", "vgx", l1, l2]);
    assert!(
        out.contains(&format!("Physical volume \"{l2}\" successfully created"))
            && out.contains("Volume group \"vgx\" successfully extended"),
        "{out}"
    );
    e.vgck_clean("vgx");
    let v = &e.lvm.report(
        &[
            "vgs",
            "-o",
            "pv_count,vg_extent_count,vg_free_count,vg_seqno",
            "vgx",
        ],
        "vg",
    )[0];
    assert_eq!(num(v, "pv_count"), 3);
    assert_eq!(num(v, "vg_extent_count"), 3 * 63);
    assert_eq!(num(v, "vg_free_count"), 3 * 63 - 10);
    assert_eq!(num(v, "vg_seqno"), 3);
    // lvm2 allocates on what we added.
    e.lvcreate(&["-l", "5", "-n", "onl2", "vgx", l2]);
    e.vgck_clean("vgx");

    // Refusals: a PV of another VG, one already in it.
    e.lvm.run(&["vgcreate", "-s", "1m", "vgy", l3]);
    let err = e.fails(&["vgextend", "vgx", l3]);
    assert!(
        err.contains(&format!(
            "Physical volume '{l3}' is already in volume group 'vgy'"
        )) && err.contains("Unable to add physical volume"),
        "{err}"
    );
    let err = e.fails(&["vgextend", "vgx", l1]);
    assert!(err.contains("already in the VG"), "{err}");

    // vgreduce: used PVs are refused naming the LV; an empty one becomes lvm2's orphan.
    let err = e.fails(&["vgreduce", "vgx", l2]);
    assert!(
        err.contains(&format!("Physical volume \"{l2}\" still in use")) && err.contains("onl2"),
        "{err}"
    );
    let out = e.ok(&["vgreduce", "vgx", l1]);
    assert!(
        out.contains(&format!("Removed \"{l1}\" from volume group \"vgx\"")),
        "{out}"
    );
    e.vgck_clean("vgx");
    assert_eq!(e.vg_of(l1), "");
    assert_eq!(e.vg_of(l2), "vgx");
    // lvm2 takes our orphan back, and gives it up to us again.
    e.lvm.run(&["vgextend", "vgx", l1]);
    e.vgck_clean("vgx");
    // -a: every PV without LV extents (l1 only).
    let out = e.ok(&["vgreduce", "-a", "vgx"]);
    assert!(
        out.contains(l1) && !out.contains(l0) && !out.contains(l2),
        "{out}"
    );
    assert_eq!(e.vg_of(l1), "");
    e.vgck_clean("vgx");
    let err = e.fails(&["vgreduce", "vgy", l3]);
    assert!(
        err.contains(&format!(
            "Can't remove final physical volume \"{l3}\" from volume group \"vgy\""
        )),
        "{err}"
    );

    // --removemissing: l2 (with LV onl2) cannot be seen.
    let seen = format!("{l0},{l1}");
    let err = fails(
        e.vm_on(&["vgreduce", "--removemissing", "vgx"], &seen),
        &["vgreduce --removemissing"],
    );
    assert!(err.contains("partial LVs") && err.contains("onl2"), "{err}");
    let o = e.vm_on(&["vgreduce", "--removemissing", "--force", "vgx"], &seen);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("Wrote out consistent volume group vgx"));
    // Back in sight, l2 is an outdated PV: vgck --updatemetadata wipes it.
    let err = e.fails(&["vgck", "vgx"]);
    assert!(err.contains(l2), "{err}");
    e.ok(&["vgck", "--updatemetadata", "vgx"]);
    e.vgck_clean("vgx");
    assert_eq!(e.vg_of(l2), "");
    assert_eq!(e.lv_names("vgx"), ["lin"]);
}

#[test]
fn vgrename_and_pvresize_are_what_lvm2_reads() {
    let e = Env::new(&[64, 64, 64, 64]);
    let (l0, l1, l2, l3) = (e.l(0), e.l(1), e.l(2), e.l(3));
    e.lvm.run(&["pvcreate", l0, l1, l2, l3]);
    e.lvm.run(&["vgcreate", "-s", "1m", "vgr", l0, l1, l2]);
    e.lvm.run(&["vgcreate", "-s", "1m", "taken", l3]);
    e.lvcreate(&["-l", "20", "-n", "lin", "vgr", l0]);
    let uuid = field(
        &e.lvm.report(&["vgs", "-o", "vg_uuid", "vgr"], "vg")[0],
        "vg_uuid",
    );

    let out = e.ok(&["vgrename", "vgr", "vgs2"]);
    assert!(
        out.contains("Volume group \"vgr\" successfully renamed to \"vgs2\""),
        "{out}"
    );
    let row = &e
        .lvm
        .report(&["vgs", "-o", "vg_name,vg_uuid,vg_seqno"], "vg");
    assert!(
        row.iter()
            .any(|r| field(r, "vg_name") == "vgs2" && field(r, "vg_uuid") == uuid),
        "{row:?}"
    );
    e.vgck_clean("vgs2");
    assert_eq!(e.lv_names("vgs2"), ["lin"]);
    // Back, named by uuid.
    e.ok(&["vgrename", &uuid, "vgr"]);
    e.vgck_clean("vgr");
    for (new, want) in [
        ("taken", "already exists"),
        ("vgr", "must differ"),
        ("a/b", "invalid"),
    ] {
        let err = e.fails(&["vgrename", "vgr", new]);
        assert!(err.contains(want), "{new}: {err}");
    }

    // An active LV blocks the rename and the restore; deactivated, they go through.
    let state = e.lvm.path("state");
    let d = DaemonProc::start(&state);
    let devs = e.devices.clone();
    d.ok(&[
        "lvchange",
        "-ay",
        "vgr/lin",
        "--nbd",
        "127.0.0.1:0",
        "--devices",
        &devs,
    ]);
    let err = e.fails(&["vgrename", "vgr", "vgq"]);
    assert!(
        err.contains("lin") && err.contains("vgchange -an vgr"),
        "{err}"
    );
    // lvdisplay says it is active and where.
    let shown = e.ok(&["lvdisplay", "vgr/lin"]);
    assert!(
        shown.contains("  LV Status              available\n")
            && shown.contains("  Block device           nbd://127.0.0.1:"),
        "{shown}"
    );
    let backup = e.lvm.path("vgr.vg");
    e.ok(&["vgcfgbackup", "-f", backup.to_str().unwrap(), "vgr"]);
    let err = e.fails(&["vgcfgrestore", "-f", backup.to_str().unwrap(), "vgr"]);
    assert!(
        err.contains("active") && err.contains("Restore aborted"),
        "{err}"
    );
    d.ok(&["lvchange", "-an", "vgr/lin", "--devices", &devs]);
    e.ok(&["vgrename", "vgr", "vgq"]);
    e.ok(&["vgrename", "vgq", "vgr"]);
    drop(d);

    // pvresize: ours on l1, lvm2's on l2, the same size: the same metadata.
    e.ok(&["pvresize", "--setphysicalvolumesize", "40m", "-y", l1]);
    e.lvm
        .run(&["pvresize", "--setphysicalvolumesize", "40m", "-y", l2]);
    e.vgck_clean("vgr");
    let file = e.lvm.path("after.vg");
    e.lvm
        .run(&["vgcfgbackup", "-f", file.to_str().unwrap(), "vgr"]);
    let md = lvm::Metadata::from_text(&std::fs::read(&file).unwrap()).unwrap();
    let pv_of = |dev: &str| {
        md.vg
            .physical_volumes
            .iter()
            .find(|p| p.device.as_deref() == Some(dev))
            .unwrap_or_else(|| panic!("{dev} in {file:?}"))
            .clone()
    };
    let (ours, theirs) = (pv_of(l1), pv_of(l2));
    assert_eq!(ours.pe_count, lvm::Extents(39));
    assert_eq!(
        (ours.dev_size, ours.pe_start, ours.pe_count),
        (theirs.dev_size, theirs.pe_start, theirs.pe_count)
    );
    // Without a size: back to the device's.
    e.ok(&["pvresize", l1]);
    assert!(e.pvs().contains(&(l1.to_string(), "vgr".into(), 63)));
    // Shrinking over an LV is refused naming it; without -y, refused.
    let err = e.fails(&["pvresize", "--setphysicalvolumesize", "10m", "-y", l0]);
    assert!(err.contains("lin"), "{err}");
    let err = e.fails(&["pvresize", "--setphysicalvolumesize", "30m", l0]);
    assert!(err.contains("-y"), "{err}");
    e.ok(&["pvresize", "--setphysicalvolumesize", "30m", "-y", l0]);
    assert!(e.pvs().contains(&(l0.to_string(), "vgr".into(), 29)));
    e.vgck_clean("vgr");
    // An orphan: its label's size, which lvm2 reports as its size.
    e.ok(&["vgreduce", "vgr", l2]);
    e.ok(&["pvresize", "--setphysicalvolumesize", "48m", "-y", l2]);
    let r = &e.lvm.report(&["pvs", "-o", "pv_size", l2], "pv")[0];
    assert_eq!(num(r, "pv_size"), 48 << 20);
    let ours = e.ok(&[
        "pvs",
        "--noheadings",
        "--units",
        "b",
        "--nosuffix",
        "-o",
        "pv_size",
        l2,
    ]);
    assert_eq!(ours.trim(), (48u64 << 20).to_string());
    // A VG made on it takes that size too, as lvm2's would.
    e.ok(&["vgcreate", "-s", "1m", "vgn", l2]);
    assert!(e.pvs().contains(&(l2.to_string(), "vgn".into(), 47)));
    e.vgck_clean("vgn");
}

#[test]
fn vgcfgrestore_both_ways_and_over_damaged_metadata() {
    let e = Env::new(&[64, 64, 64]);
    let (l0, l1, l2) = (e.l(0), e.l(1), e.l(2));
    e.lvm.run(&["pvcreate", l0, l1, l2]);
    e.lvm.run(&["vgcreate", "-s", "1m", "vgb", l0, l1]);
    e.lvcreate(&["-l", "10", "-n", "lin", "vgb"]);
    e.lvcreate(&["-i", "2", "-I", "64k", "-l", "8", "-n", "str", "vgb"]);
    let theirs = e.lvm.path("theirs.vg");
    let theirs_s = theirs.to_str().unwrap();
    e.lvm.run(&["vgcfgbackup", "-f", theirs_s, "vgb"]);
    e.lvcreate(&["-l", "4", "-n", "later", "vgb"]);

    // Every copy's text destroyed: lvm2 finds no VG; lvm2's backup restores through us.
    e.garble_text(l0);
    e.garble_text(l1);
    let vgs = e.lvm.try_run(&["vgs", "--noheadings", "-o", "vg_name"]);
    let vgs = String::from_utf8_lossy(&vgs.stdout);
    assert!(!vgs.contains("vgb"), "{vgs}");
    let err = e.fails(&["vgck", "vgb"]);
    assert!(err.contains("not found"), "{err}");
    let out = e.ok(&["vgcfgrestore", "-f", theirs_s, "vgb"]);
    assert!(out.contains("Restored volume group vgb."), "{out}");
    e.vgck_clean("vgb");
    assert_eq!(e.lv_names("vgb"), ["lin", "str"]);
    let seqno = num(
        &e.lvm.report(&["vgs", "-o", "vg_seqno", "vgb"], "vg")[0],
        "vg_seqno",
    );
    // The backup's seqno is 3 (vgcreate, two lvcreates); the disks' 4 cannot be read.
    assert_eq!(seqno, 4);

    // Ours restored by lvm2.
    let ours = e.lvm.path("ours.vg");
    let ours_s = ours.to_str().unwrap();
    e.ok(&["vgcfgbackup", "-f", ours_s, "vgb"]);
    e.lvm
        .run(&["lvremove", "--driverloaded", "n", "-y", "vgb/str"]);
    assert_eq!(e.lv_names("vgb"), ["lin"]);
    e.lvm.run(&["vgcfgrestore", "-f", ours_s, "vgb"]);
    e.vgck_clean("vgb");
    assert_eq!(e.lv_names("vgb"), ["lin", "str"]);

    // A missing PV is refused (lvm2 too), --force writes to the PVs present.
    let err = fails(
        e.vm_on(&["vgcfgrestore", "-f", ours_s, "vgb"], l0),
        &["vgcfgrestore (l1 missing)"],
    );
    assert!(
        err.contains("missing") && err.contains("Restore failed"),
        "{err}"
    );
    // A PV now in another VG is refused.
    e.lvm.run(&["vgcreate", "vgo", l2]);
    let mut md = lvm::Metadata::from_text(&std::fs::read(&ours).unwrap()).unwrap();
    let l2_uuid: lvm::Uuid = field(
        &e.lvm.report(&["pvs", "-o", "pv_uuid", l2], "pv")[0],
        "pv_uuid",
    )
    .parse()
    .unwrap();
    md.vg.physical_volumes[1].id = l2_uuid;
    let moved = e.lvm.path("moved.vg");
    std::fs::write(&moved, md.to_text(lvm::text::Style::File).unwrap()).unwrap();
    let err = e.fails(&["vgcfgrestore", "-f", moved.to_str().unwrap(), "vgb"]);
    assert!(err.contains("vgo"), "{err}");

    // The PVs made orphans (vgremove): the backup brings the VG back on them.
    e.ok(&["vgremove", "-f", "vgb"]);
    assert_eq!(e.vg_of(l0), "");
    e.ok(&["vgcfgrestore", "-f", ours_s, "vgb"]);
    e.vgck_clean("vgb");
    assert_eq!(e.lv_names("vgb"), ["lin", "str"]);
    assert_eq!(e.vg_of(l1), "vgb");

    // A damaged header (crc), then a damaged text: our vgck names each, --updatemetadata
    // rewrites it, and lvm2 finds the VG clean.
    let f = open_rw(l1);
    let mut h = [0u8; 512];
    f.read_exact_at(&mut h, 4096).unwrap();
    h[200] ^= 0xff;
    f.write_all_at(&h, 4096).unwrap();
    f.sync_all().unwrap();
    let err = e.fails(&["vgck", "vgb"]);
    assert!(err.contains(l1) && err.contains("checksum"), "{err}");
    e.ok(&["vgck", "--updatemetadata", "vgb"]);
    e.vgck_clean("vgb");
    e.garble_text(l0);
    let err = e.fails(&["vgck", "vgb"]);
    assert!(err.contains(l0) && err.contains("checksum"), "{err}");
    e.ok(&["vgck", "--updatemetadata", "vgb"]);
    e.vgck_clean("vgb");
    let r = &e.lvm.report(
        &["vgs", "-o", "vg_mda_count,vg_mda_used_count", "vgb"],
        "vg",
    )[0];
    assert_eq!(num(r, "vg_mda_used_count"), 2);
    assert_eq!(e.lv_names("vgb"), ["lin", "str"]);
}

#[test]
fn display_verbs_print_what_lvm2_prints() {
    let e = Env::new(&[64, 64, 64, 64]);
    let (l0, l1, l2, l3) = (e.l(0), e.l(1), e.l(2), e.l(3));
    e.lvm.run(&["pvcreate", l0, l1, l2, l3]);
    e.lvm.run(&["vgcreate", "-s", "1m", "vgd", l0, l1]);
    e.lvm.run(&["vgcreate", "vge", l2]);
    e.lvcreate(&["-l", "10", "-n", "lin", "vgd", l0]);
    e.lvcreate(&["-i", "2", "-I", "64k", "-l", "8", "-n", "str", "vgd"]);
    e.lvcreate(&["--type", "zero", "-L", "8m", "-n", "z", "vgd"]);
    e.lvcreate(&["--alloc", "contiguous", "-l", "50", "-n", "full", "vgd", l1]);
    e.lvcreate(&["-l", "3", "-n", "other", "vge"]);
    e.lvm
        .run(&["lvchange", "--driverloaded", "n", "-r", "256", "vgd/lin"]);
    // A PV we resized (its dev_size less than the device) and an orphan of a set size.
    e.ok(&["pvresize", "--setphysicalvolumesize", "60m", "-y", l1]);
    e.ok(&["pvresize", "--setphysicalvolumesize", "40m", "-y", l3]);
    for cmd in [
        "pvdisplay",
        "pvdisplay -m",
        "pvdisplay -c",
        "pvdisplay -s",
        "vgdisplay",
        "vgdisplay -v",
        "vgdisplay -c",
        "vgdisplay -s",
        "vgdisplay vge",
        "lvdisplay",
        "lvdisplay -m",
        "lvdisplay -c",
        "lvdisplay vgd/str",
    ] {
        let args: Vec<&str> = cmd.split(' ').collect();
        // Without --driverloaded n, so lvm2 says whether each LV is active (it cannot be).
        let theirs = e.lvm.try_run(&args);
        let theirs = String::from_utf8_lossy(&theirs.stdout);
        let ours = e.ok(&args);
        let (t, o): (Vec<&str>, Vec<&str>) = (theirs.lines().collect(), ours.lines().collect());
        for (i, (t, o)) in t.iter().zip(&o).enumerate() {
            assert_eq!(
                o,
                t,
                "{cmd}: line {}\nlvm2:\n{theirs}\nours:\n{ours}",
                i + 1
            );
        }
        assert_eq!(
            o.len(),
            t.len(),
            "{cmd}: line count\nlvm2:\n{theirs}\nours:\n{ours}"
        );
        assert!(
            ours.contains("---") || ours.contains(':') || cmd.ends_with("-s"),
            "{cmd}: {ours}"
        );
    }
}

/// An immutable file (`chattr +i`: even root cannot open it for writing), made mutable again
/// on drop so its directory can go.
struct Immutable(std::path::PathBuf);

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

#[test]
fn a_device_that_cannot_be_written_among_those_scanned_does_not_stop_a_write() {
    e2e::require_tool("chattr");
    let e = Env::new(&[64, 64]);
    let (l0, l1) = (e.l(0), e.l(1));
    let file = e.lvm.path("ro.img");
    std::fs::File::create(&file)
        .and_then(|f| f.set_len(16 << 20))
        .unwrap();
    let ok = Command::new("chattr")
        .arg("+i")
        .arg(&file)
        .status()
        .unwrap();
    assert!(ok.success(), "chattr +i {}", file.display());
    let ro = Immutable(file);
    e.lvm.run(&["pvcreate", l0, l1]);
    e.lvm.run(&["vgcreate", "vgw", l0]);
    let devices = format!("{l0},{l1},{}", ro.0.display());
    let o = e.vm_on(&["vgextend", "vgw", l1], &devices);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    e.vgck_clean("vgw");
    assert_eq!(e.vg_of(l1), "vgw");
}

/// A PV seen twice (a disk cloned with `cp`): reports warn naming the PV and both devices and
/// list the PV once; every verb that would write to the VG's PVs, and activation, is refused
/// naming both devices, as lvm2 2.03 refuses them ("Cannot update volume group ... with
/// duplicate PV devices", "Cannot activate LVs in VG ... while PVs appear on duplicate
/// devices"); nothing is written to any of the three files. Deactivation and reports still
/// work, and without the copy the VG is used as before.
#[test]
fn a_pv_on_two_devices_is_reported_and_nothing_writes_to_or_activates_the_vg() {
    let dir = tempfile::tempdir().unwrap();
    let file = |n: &str| dir.path().join(n).display().to_string();
    let (a, b, c, d) = (file("a.img"), file("b.img"), file("c.img"), file("d.img"));
    for f in [&a, &b, &d] {
        std::fs::File::create(f)
            .and_then(|f| f.set_len(64 << 20))
            .unwrap();
    }
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    // A daemon, so that an activation that was not refused would succeed.
    let dm = DaemonProc::start(&state);
    let two = format!("{a},{b}");
    let on = |devices: &str, args: &[&str]| {
        let mut v = args.to_vec();
        v.extend_from_slice(&["--devices", devices]);
        dm.vm(&v)
    };
    let ok = |devices: &str, args: &[&str]| {
        let o = on(devices, args);
        assert!(
            o.status.success(),
            "volmgr {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    ok(&two, &["vgcreate", "-s", "1m", "vgdup", &a, &b]);
    ok(&two, &["lvcreate", "-an", "-L", "8m", "-n", "lv", "vgdup"]);
    let backup = file("vgdup.vg");
    ok(&two, &["vgcfgbackup", "-f", &backup, "vgdup"]);
    let uuid = ok(&two, &["pvs", "--noheadings", "-o", "pv_uuid", &a])
        .trim()
        .to_string();
    assert_eq!(uuid.len(), 38, "PV uuid of {a}: '{uuid}'");
    let cp = Command::new("cp")
        .args(["--sparse=always", &a, &c])
        .status()
        .unwrap();
    assert!(cp.success(), "cp {a} {c}");
    let all = format!("{a},{b},{c},{d}");
    let names_both = |text: &str| text.contains(&uuid) && text.contains(&a) && text.contains(&c);

    // Reports: a warning naming the PV and both devices; the PV once, on the device used.
    let o = on(&all, &["pvs", "--noheadings", "-o", "pv_name,vg_name"]);
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success() && names_both(&err), "pvs: {out}{err}");
    let rows: Vec<&str> = out.lines().map(str::trim).collect();
    assert_eq!(rows, [format!("{a} vgdup"), format!("{b} vgdup")], "pvs");
    let o = on(
        &all,
        &["vgs", "--noheadings", "-o", "vg_name,pv_count,lv_count"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && names_both(&err), "vgs: {err}");
    let row: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert_eq!(row, ["vgdup", "2", "1"], "vgs");

    // Each file's bytes and modification time: a write of bytes already there (zeroing free
    // extents) shows too.
    let sums = || -> Vec<(Vec<u8>, std::time::SystemTime)> {
        [&a, &b, &c, &d]
            .map(|f| {
                let m = std::fs::metadata(f).and_then(|m| m.modified()).unwrap();
                (std::fs::read(f).unwrap(), m)
            })
            .into()
    };
    let before = sums();
    let nbd = ["--nbd", "127.0.0.1:0"];
    let refused: &[(&[&str], &str)] = &[
        (
            &["lvchange", "-ay", "vgdup/lv", nbd[0], nbd[1]],
            "Cannot activate LVs in VG vgdup",
        ),
        (
            &["vgchange", "-ay", "vgdup", nbd[0], nbd[1]],
            "Cannot activate LVs in VG vgdup",
        ),
        (
            &["vgchange", "-ay", nbd[0], nbd[1]],
            "Cannot activate LVs in VG vgdup",
        ),
        (
            &["lvcreate", "-L", "4m", "-n", "new", "vgdup", nbd[0], nbd[1]],
            "Cannot update",
        ),
        (
            &["lvextend", "-L", "+4m", "vgdup/lv"],
            "Cannot update volume group vgdup",
        ),
        (
            &["lvreduce", "-y", "-L", "4m", "vgdup/lv"],
            "Cannot update volume group vgdup",
        ),
        (
            &["lvrename", "vgdup", "lv", "lv2"],
            "Cannot update volume group vgdup",
        ),
        (
            &["lvconvert", "-y", "-m", "1", "vgdup/lv"],
            "Cannot update volume group vgdup",
        ),
        (&["pvmove", &a], "Cannot update volume group vgdup"),
        (
            &["lvremove", "-y", "vgdup/lv"],
            "Cannot update volume group vgdup",
        ),
        (
            &["vgextend", "vgdup", &d],
            "Cannot update volume group vgdup",
        ),
        (
            &["vgreduce", "vgdup", &b],
            "Cannot update volume group vgdup",
        ),
        (
            &["vgrename", "vgdup", "vgnew"],
            "Cannot update volume group vgdup",
        ),
        (
            &["vgck", "--updatemetadata", "vgdup"],
            "Cannot update volume group vgdup",
        ),
        (
            &["vgcfgrestore", "-f", &backup, "vgdup"],
            "Cannot update volume group vgdup",
        ),
        (
            &["vgremove", "-ff", "-y", "vgdup"],
            "Cannot update volume group vgdup",
        ),
        (
            &["pvresize", &c],
            &format!("Cannot use device {c} with duplicates"),
        ),
        (
            &["pvremove", "-ff", "-y", &c],
            &format!("Cannot use device {c} with duplicates"),
        ),
        (
            &["pvcreate", "-ff", "-y", &c],
            &format!("Cannot use device {c} with duplicates"),
        ),
        (
            &["vgcreate", "vgc", &c],
            &format!("Cannot use device {c} with duplicates"),
        ),
    ];
    for (args, why) in refused {
        let o = on(&all, args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(why) && names_both(&err),
            "volmgr {args:?} with {uuid} on {a} and {c} must be refused naming both ({why}): \
             exit {:?}\n{}{err}",
            o.status.code(),
            String::from_utf8_lossy(&o.stdout)
        );
        assert!(
            sums() == before,
            "volmgr {args:?} wrote to a device although it was refused"
        );
    }
    assert!(
        !dm.ok(&["dev", "list"]).contains("vgdup"),
        "an LV of vgdup is active"
    );
    // Taking things down is not refused.
    ok(&all, &["vgchange", "-an", "vgdup"]);
    assert!(sums() == before, "vgchange -an wrote to a device");

    // Without the copy, the same VG activates and changes.
    ok(&two, &["lvchange", "-ay", "vgdup/lv", nbd[0], nbd[1]]);
    ok(&two, &["lvextend", "-L", "+4m", "vgdup/lv"]);
    assert!(dm.ok(&["dev", "list"]).contains("vgdup-lv"));
    ok(&two, &["vgchange", "-an", "vgdup"]);
    assert!(
        sums()[2] == before[2],
        "the copy changed although it was never given"
    );
}
