//! Helpers for the tests against the real lvm2 tools: loop devices over sparse files, and an
//! lvm2 configuration private to the test that lets lvm2 see those loop devices and nothing
//! else on the machine.
//!
//! Missing tools or privileges fail the test loudly (never a silent pass): lvm2 must be
//! installed (`apt-get install -y lvm2`), and losetup needs root.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use lvm::scan;
use tables::DeviceRef;

/// Fails the test unless `tool` is on PATH.
pub fn require_tool(tool: &str, package: &str) {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "'{tool}' is not installed: install {package} (apt-get install -y {package}); \
         this test cannot pass without it"
    );
}

/// Fails the test unless running as root (losetup needs it).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        uid, 0,
        "this test needs root for losetup; it runs as uid {uid}"
    );
}

/// Loop devices over sparse files in a temporary directory, and a private lvm2 configuration
/// (`LVM_SYSTEM_DIR`) that accepts only them. Dropping it detaches the loop devices, also when
/// the test fails.
pub struct Lvm2 {
    dir: tempfile::TempDir,
    /// `/dev/loopN` of each device, in order.
    pub loops: Vec<String>,
}

impl Lvm2 {
    /// `sizes` MiB devices.
    pub fn new(sizes_mib: &[u64]) -> Lvm2 {
        require_root();
        require_tool("losetup", "mount");
        require_tool("pvcreate", "lvm2");
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut env = Lvm2 {
            dir,
            loops: Vec::new(),
        };
        for (i, mib) in sizes_mib.iter().enumerate() {
            let f = env.dir.path().join(format!("disk{i}"));
            std::fs::File::create(&f)
                .and_then(|file| file.set_len(mib << 20))
                .expect("sparse file");
            let out = Command::new("losetup")
                .args(["-f", "--show"])
                .arg(&f)
                .output()
                .expect("running losetup");
            assert!(
                out.status.success(),
                "losetup -f --show {}: {}",
                f.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            env.loops
                .push(String::from_utf8_lossy(&out.stdout).trim().to_string());
        }
        env.write_config();
        env
    }

    fn write_config(&self) {
        let accept: Vec<String> = self.loops.iter().map(|l| format!("\"a|^{l}$|\"")).collect();
        let filter = format!("[ {}, \"r|.*|\" ]", accept.join(", "));
        let d = self.dir.path().display();
        let conf = format!(
            "devices {{\n filter = {filter}\n global_filter = {filter}\n use_devicesfile = 0\n \
             obtain_device_list_from_udev = 0\n hints = \"none\"\n scan = [ \"/dev\" ]\n}}\n\
             activation {{\n udev_sync = 0\n udev_rules = 0\n monitoring = 0\n}}\n\
             backup {{\n backup = 1\n backup_dir = \"{d}/backup\"\n archive = 0\n \
             archive_dir = \"{d}/archive\"\n}}\n"
        );
        std::fs::write(self.dir.path().join("lvm.conf"), conf).expect("writing lvm.conf");
    }

    /// The test's scratch directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A file path in the scratch directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs `lvm ARGS...` in the private configuration.
    pub fn try_run(&self, args: &[&str]) -> Output {
        Command::new("lvm")
            .args(args)
            .env("LVM_SYSTEM_DIR", self.dir.path())
            .env("LVM_SUPPRESS_FD_WARNINGS", "1")
            .stdin(Stdio::null())
            .output()
            .expect("running lvm")
    }

    /// Runs `lvm ARGS...`, asserting success; returns stdout.
    pub fn run(&self, args: &[&str]) -> String {
        let out = self.try_run(args);
        assert!(
            out.status.success(),
            "lvm {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a report command with `--reportformat json` and returns its rows (`report[0][key]`).
    pub fn report(&self, args: &[&str], key: &str) -> Vec<serde_json::Value> {
        let mut all = args.to_vec();
        all.extend_from_slice(&[
            "--reportformat",
            "json",
            "--units",
            "b",
            "--nosuffix",
            "--config",
            "report { time_format = \"%s\" }",
        ]);
        let out = self.run(&all);
        let v: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("lvm {}: bad JSON ({e}): {out}", all.join(" ")));
        v["report"][0][key]
            .as_array()
            .cloned()
            .unwrap_or_else(|| panic!("no '{key}' rows in {out}"))
    }

    /// lvm2's `vgck VG` passes and warns about nothing (device-mapper's absence aside).
    pub fn assert_vgck_clean(&self, name: &str) {
        let out = self.try_run(&["vgck", name]);
        let err = String::from_utf8_lossy(&out.stderr);
        let warnings: Vec<&str> = err
            .lines()
            .filter(|l| l.contains("WARNING") || l.contains("rror") || l.contains("nconsistent"))
            .filter(|l| !l.contains("device-mapper") && !l.contains("Activation disabled"))
            .collect();
        assert!(
            out.status.success() && warnings.is_empty(),
            "vgck {name}: {}{err}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    /// Opens the loop devices as our devices (not claimed exclusively).
    pub fn open(&self, read_only: bool) -> Vec<DeviceRef> {
        scan::open_paths(&self.loops, read_only).expect("opening the loop devices")
    }
}

impl Drop for Lvm2 {
    fn drop(&mut self) {
        for l in &self.loops {
            let _ = Command::new("losetup").args(["-d", l]).status();
        }
    }
}

/// A report field as a string.
pub fn field(row: &serde_json::Value, name: &str) -> String {
    row[name]
        .as_str()
        .unwrap_or_else(|| panic!("no field {name} in {row}"))
        .to_string()
}

/// A report field as a number.
pub fn num(row: &serde_json::Value, name: &str) -> u64 {
    let s = field(row, name);
    s.parse()
        .unwrap_or_else(|_| panic!("field {name} = '{s}' is not a number"))
}

/// The first run of `need` free extents on PV `pv_key` of `vg` (striped areas only count as
/// used; enough for tests, which allocate nothing else).
pub fn first_free(vg: &lvm::VolumeGroup, pv_key: &str, need: u32) -> Option<lvm::Extents> {
    let pv = vg.pv_by_key(pv_key)?;
    let mut used: Vec<(u32, u32)> = Vec::new();
    for lv in &vg.logical_volumes {
        for seg in &lv.segments {
            if let lvm::SegmentKind::Striped { stripes, .. } = &seg.kind {
                let len = seg.area_len()?.0;
                for a in stripes.iter().filter(|a| a.volume == pv_key) {
                    used.push((a.start.0, len));
                }
            }
        }
    }
    used.sort();
    let mut at = 0u32;
    for (s, l) in used {
        if s >= at + need {
            break;
        }
        at = at.max(s + l);
    }
    (at + need <= pv.pe_count.0).then_some(lvm::Extents(at))
}

/// A linear LV of `count` extents on PV `pv_key`, at its first free extent.
pub fn linear_lv(
    vg: &lvm::VolumeGroup,
    name: &str,
    pv_key: &str,
    count: u32,
) -> lvm::LogicalVolume {
    let start = first_free(vg, pv_key, count).expect("free extents for the test LV");
    lvm::LogicalVolume {
        name: name.to_string(),
        id: lvm::Uuid::generate(),
        status: lvm::model::Flags::of(&["READ", "WRITE", "VISIBLE"]),
        flags: lvm::model::Flags::default(),
        creation_time: Some(1_700_000_000),
        creation_host: Some("lvm-crate-test".into()),
        segments: vec![lvm::Segment::linear(
            lvm::Extents(0),
            lvm::Extents(count),
            pv_key,
            start,
        )],
        extra: Vec::new(),
    }
}

/// The first version of a VG: `pvs`, no LVs, what LVM2's vgcreate sets.
pub fn new_vg(
    name: &str,
    extent_size: tables::Sectors,
    pvs: Vec<lvm::PhysicalVolume>,
) -> lvm::VolumeGroup {
    lvm::vgcreate::new_vg(name, extent_size, pvs)
}

/// The VG entry for the PV `label` describes (see [`lvm::vgcreate::pv_entry`]).
pub fn pv_entry(
    key: &str,
    label: &lvm::Label,
    size: tables::Bytes,
    extent_size: tables::Sectors,
    device: Option<String>,
) -> lvm::PhysicalVolume {
    lvm::vgcreate::pv_entry(key, label, size, extent_size, device).expect("a PV entry")
}

/// `n` in-memory devices of `size` bytes (`disk0`, `disk1`, ...), each made a PV with LVM2's
/// default layout, and the VG entry of each (`pv0`, `pv1`, ...) for extents of `extent`.
pub fn mem_pvs(
    n: usize,
    size: tables::Bytes,
    extent: tables::Sectors,
) -> (
    Vec<std::sync::Arc<tables::mem::MemDevice>>,
    Vec<lvm::PhysicalVolume>,
) {
    let mem: Vec<std::sync::Arc<tables::mem::MemDevice>> = (0..n)
        .map(|i| std::sync::Arc::new(tables::mem::MemDevice::new(format!("disk{i}"), size)))
        .collect();
    let pvs = mem
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let l = lvm::pvcreate::pvcreate(m.as_ref(), &Default::default()).expect("pvcreate");
            pv_entry(&format!("pv{i}"), &l, size, extent, None)
        })
        .collect();
    (mem, pvs)
}

/// A VG entry for a PV of `pe_count` extents with no device behind it (allocator tests);
/// `status` as `ALLOCATABLE`, `MISSING`.
pub fn bare_pv(key: &str, pe_count: u32, status: lvm::model::Flags) -> lvm::PhysicalVolume {
    lvm::PhysicalVolume {
        key: key.into(),
        id: lvm::Uuid::generate(),
        device: None,
        status,
        flags: lvm::model::Flags::default(),
        dev_size: None,
        pe_start: tables::Sectors(2048),
        pe_count: lvm::Extents(pe_count),
        extra: Vec::new(),
    }
}

/// A linear LV of `len` extents at extent `start` of PV `pv`.
pub fn linear_at(name: &str, pv: &str, start: u32, len: u32) -> lvm::LogicalVolume {
    lvm::LogicalVolume::new(
        name,
        vec![lvm::Segment::linear(
            lvm::Extents(0),
            lvm::Extents(len),
            pv,
            lvm::Extents(start),
        )],
    )
}
