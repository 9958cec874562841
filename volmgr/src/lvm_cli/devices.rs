//! Where PVs are looked for, as lvm2 does it: `--devices` names the devices to use; otherwise a
//! devices file (lvm2's `use_devicesfile`; ours is `/etc/volmgr/lvm-devices`, one path per
//! line, files allowed, a PV with several paths as one line `PATH1|PATH2`) restricts the scan to what it lists; with neither, every block device
//! of the machine is scanned, except the daemon's own volumes (`/dev/ublkb*`, as lvm2 skips LVs
//! with `scan_lvs = 0`), empty loop devices and devices of no size. `pvcreate` and
//! `vgcreate`/`vgextend` add what they format to the devices file when there is one (and
//! create it for a regular file, which a scan would never find).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;

/// The default devices file.
pub const DEVICES_FILE: &str = "/etc/volmgr/lvm-devices";

/// Options every LVM verb takes to say where PVs are.
#[derive(Args, Clone, Debug, Default)]
pub struct DeviceArgs {
    /// Use only these devices (comma-separated, or the option repeated), as lvm2's --devices.
    #[arg(
        long = "devices",
        value_name = "DEV[,DEV...]",
        value_delimiter = ',',
        global = true
    )]
    pub devices: Vec<PathBuf>,
    /// The devices file to use instead of /etc/volmgr/lvm-devices.
    #[arg(
        long = "devicesfile",
        value_name = "PATH",
        env = "VOLMGR_LVM_DEVICESFILE",
        global = true
    )]
    pub devicesfile: Option<PathBuf>,
}

impl DeviceArgs {
    fn file(&self) -> PathBuf {
        self.devicesfile
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEVICES_FILE))
    }

    /// The devices to scan.
    pub fn candidates(&self) -> Result<Vec<PathBuf>> {
        if !self.devices.is_empty() {
            return Ok(self.devices.clone());
        }
        let file = self.file();
        match std::fs::read_to_string(&file) {
            Ok(text) => Ok(parse_devices_file(&text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => block_devices(),
            Err(e) => Err(e).with_context(|| format!("reading {}", file.display())),
        }
    }

    /// Records `paths` in the devices file: always for regular files, network extents and
    /// groups of paths (a scan would never find them), for block devices only when the file exists (it then restricts the scan). Not
    /// with `--devices` (the caller said exactly what to use).
    pub fn remember(&self, paths: &[PathBuf]) -> Result<()> {
        if !self.devices.is_empty() {
            return Ok(());
        }
        let file = self.file();
        let exists = file.exists();
        let wanted: Vec<&PathBuf> = paths
            .iter()
            .filter(|p| {
                exists
                    || super::is_network(p)
                    || super::is_group(p)
                    || std::fs::metadata(p).map(|m| m.is_file()).unwrap_or(false)
            })
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        let mut list = match std::fs::read_to_string(&file) {
            Ok(t) => parse_devices_file(&t),
            Err(_) => Vec::new(),
        };
        if !exists {
            // A new devices file restricts scanning from now on: put the block devices that
            // carry PVs today in it too, so nothing that was found is lost.
            list.extend(block_devices()?.into_iter().filter(|d| has_label(d)));
        }
        for p in wanted {
            let abs = super::absolute_one(p);
            if !list.contains(&abs) {
                list.push(abs);
            }
        }
        write_devices_file(&file, &list)
    }

    /// Drops `paths` from the devices file (pvremove).
    pub fn forget(&self, paths: &[PathBuf]) -> Result<()> {
        let file = self.file();
        let Ok(text) = std::fs::read_to_string(&file) else {
            return Ok(());
        };
        let abs = super::absolute(paths);
        let list: Vec<PathBuf> = parse_devices_file(&text)
            .into_iter()
            .filter(|p| !abs.contains(p))
            .collect();
        write_devices_file(&file, &list)
    }
}

fn parse_devices_file(text: &str) -> Vec<PathBuf> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(PathBuf::from)
        .collect()
}

fn write_devices_file(file: &Path, list: &[PathBuf]) -> Result<()> {
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut text = String::from(
        "# Devices volmgr's LVM verbs look at for PVs (one path per line; files allowed).\n",
    );
    for p in list {
        text.push_str(&p.to_string_lossy());
        text.push('\n');
    }
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, file).with_context(|| format!("replacing {}", file.display()))
}

/// Whether a device carries an LVM label (cheap: the first 4 sectors).
fn has_label(p: &Path) -> bool {
    lvm::scan::scan_paths(&[p])
        .map(|r| r.devices.iter().any(|d| d.label.is_some()))
        .unwrap_or(false)
}

/// Every block device of the machine worth scanning (see the module docs).
pub fn block_devices() -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir("/sys/class/block") {
        Ok(rd) => rd,
        Err(_) => return Ok(out),
    };
    let mut names: Vec<String> = rd
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for n in names {
        let sys = Path::new("/sys/class/block").join(&n);
        let size: u64 = std::fs::read_to_string(sys.join("size"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let skip = size == 0
            || ["ublkb", "ram", "zram", "sr", "fd", "nbd"]
                .iter()
                .any(|p| n.starts_with(p))
            || (n.starts_with("loop") && !sys.join("loop/backing_file").exists());
        let node = Path::new("/dev").join(&n);
        if !skip && node.exists() {
            out.push(node);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_file_lines_and_comments() {
        let l = parse_devices_file("# c\n/dev/sdb\n  /var/lib/pv.img  # a file\n\n");
        assert_eq!(
            l,
            [PathBuf::from("/dev/sdb"), PathBuf::from("/var/lib/pv.img")]
        );
    }

    #[test]
    fn files_are_remembered_and_forgotten() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("pv.img");
        std::fs::write(&f, b"").unwrap();
        let a = DeviceArgs {
            devices: Vec::new(),
            devicesfile: Some(d.path().join("lvm-devices")),
        };
        a.remember(std::slice::from_ref(&f)).unwrap();
        assert!(a.candidates().unwrap().contains(&f));
        a.forget(std::slice::from_ref(&f)).unwrap();
        assert!(!a.candidates().unwrap().contains(&f));
    }
}
