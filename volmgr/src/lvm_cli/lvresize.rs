//! `lvextend` / `lvresize` (growing): more extents from [`lvm::alloc::extend`] (a raid LV:
//! every image's share from [`lvm::alloc::extend_raid`], never on another image's PVs),
//! committed, then the active device's table reloaded in place, sub-LVs first (the daemon
//! grows the device while it serves; a raid array resyncs what it gained), then with `-r` the
//! file system on it grown online (`resize2fs`, `xfs_growfs`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::Args;
use lvm::activate::{dm_name, MissingPvs};
use lvm::alloc::{self, Policy, Sign};
use lvm::{Extents, SegmentKind};
use ublk_target::control::Request;

use super::activate::{daemon_devices, ensure_mpaths, table_of};
use super::lvcreate::pv_selection;
use super::scan::Scan;
use super::{split_lv_name, Confirm, DeviceArgs};
use crate::client::{call, expect_text, StateDir};

#[derive(Args)]
pub struct LvresizeArgs {
    /// The LV, as VG/LV.
    lv: String,
    /// PVs to allocate from, optionally with extent ranges.
    pvs: Vec<String>,
    /// New size, or +SIZE to add (units k m g t p e, s; default MiB).
    #[arg(
        short = 'L',
        long = "size",
        value_name = "[+]SIZE",
        conflicts_with = "extents",
        allow_hyphen_values = true
    )]
    size: Option<String>,
    /// New size in extents, or +N to add; N%VG, N%FREE, N%PVS, N%LV.
    #[arg(
        short = 'l',
        long = "extents",
        value_name = "[+]N[%...]",
        required_unless_present = "size",
        allow_hyphen_values = true
    )]
    extents: Option<String>,
    /// Grow the file system on the LV too (ext2/3/4 with resize2fs, mounted XFS with
    /// xfs_growfs).
    #[arg(short = 'r', long = "resizefs")]
    resizefs: bool,
    /// Allocation policy (inherit: the LV's, else the VG's).
    #[arg(long = "alloc", value_name = "POLICY", default_value = "inherit")]
    alloc: String,
    #[command(flatten)]
    confirm: Confirm,
    #[command(flatten)]
    sd: StateDir,
    #[command(flatten)]
    dev: DeviceArgs,
}

impl LvresizeArgs {
    /// `-L` or `-l` as given.
    fn size(&self) -> Result<alloc::Size> {
        Ok(match (&self.size, &self.extents) {
            (Some(s), _) => alloc::parse_size(s, false)?,
            (None, Some(l)) => alloc::parse_size(l, true)?,
            (None, None) => bail!("Please specify either size or extents"),
        })
    }

    /// The LV named on the command line, as `vg` has it.
    fn lv_in(&self, vg: &lvm::VolumeGroup) -> Result<lvm::LogicalVolume> {
        let (vg_name, lv_name) = split_lv_name(&self.lv)?;
        vg.lv(lv_name).cloned().with_context(|| {
            format!("Logical volume {lv_name} not found in volume group {vg_name}")
        })
    }
}

pub fn lvextend(a: LvresizeArgs) -> Result<()> {
    let scan = Scan::run_writable(&a.dev)?;
    extend(a, scan)
}

fn extend(a: LvresizeArgs, scan: Scan) -> Result<()> {
    let (vg_name, lv_name) = split_lv_name(&a.lv)?;
    let policy: Policy = a.alloc.parse()?;
    scan.warn();
    let mut md = scan.vg(vg_name)?.metadata.clone();
    let pvs = pv_selection(&scan, &md.vg, &a.pvs)?;
    let size = a.size()?;
    if size.sign == Sign::Minus {
        bail!("{vg_name}/{lv_name}: a negative size shrinks: use lvreduce or lvresize");
    }
    let lv = a.lv_in(&md.vg)?;
    let old = lv.extent_count().context("LV length overflows")?;
    // A thin pool grows by its data sub-LV; the pool's segment follows.
    let pool = super::lvcreate::thin::pool_segment(&lv);
    let target = pool
        .as_ref()
        .map(|p| p.data.clone())
        .unwrap_or_else(|| lv_name.to_string());
    let (more, note) = size.to_extend_extents(&md.vg, &target, pvs.as_ref())?;
    if let Some(n) = note {
        for line in n.lines() {
            eprintln!("  {line}");
        }
    }
    let policy = policy.resolve_for_lv(&md.vg, &lv);
    let name = dm_name(vg_name, lv_name);
    let running = daemon_devices(&a.sd);
    // The LVs that change, in the order their active devices take the longer tables: the
    // sub-LVs first (a pool's data, a raid LV's images), then the LV.
    let mut order = vec![lv_name.to_string()];
    if let Some(raid) = alloc::raid_segment(&md.vg, lv_name) {
        if running.contains_key(&name) {
            raid_in_sync(&a.sd, &name, raid.images.len(), vg_name, lv_name)?;
        }
        let x = alloc::extend_raid(&md.vg, lv_name, more, policy, pvs.as_ref())?;
        for (img, segs) in &x.images {
            let l = md.vg.lv_mut(img).context("a raid image")?;
            for s in segs {
                if !l.push_segment(s.clone()) {
                    bail!("{vg_name}/{img}: the allocator returned a segment that does not start at the image's end");
                }
            }
        }
        let seg =
            lvm::segtypes::VolmgrSegment::Raid(x.raid.clone()).to_segment(Extents(0), x.lv_extents);
        md.vg.lv_mut(lv_name).context("the raid LV")?.segments = vec![seg];
        order.splice(0..0, x.images.into_iter().map(|(img, _)| img));
    } else {
        let segs = alloc::extend(&md.vg, &target, more, policy, pvs.as_ref())?;
        let l = md.vg.lv_mut(&target).context("the LV")?;
        for s in segs {
            if !l.push_segment(s) {
                bail!("{vg_name}/{target}: the allocator returned a segment that does not start at the LV's end");
            }
        }
        let new = l.extent_count().context("LV length overflows")?;
        if let Some(p) = pool {
            let seg = lvm::segtypes::VolmgrSegment::ThinPool(p).to_segment(Extents(0), new);
            md.vg.lv_mut(lv_name).context("the pool LV")?.segments = vec![seg];
            // The pool takes the new blocks at its own reload, after its data sub-LV's.
            order.insert(0, target.clone());
        }
    }
    let new = md
        .vg
        .lv(&target)
        .and_then(|l| l.extent_count())
        .context("LV length overflows")?;
    let changed: Vec<&lvm::LogicalVolume> = order.iter().filter_map(|n| md.vg.lv(n)).collect();
    super::activate::check_tables(&scan, &md.vg, &changed)?;
    md.stamp(format!(
        "Created *after* executing 'volmgr lvextend {vg_name}/{lv_name}'"
    ));
    let ext = md.vg.extent_size.bytes().0;
    scan.commit(&mut md)?;
    println!(
        "  Size of logical volume {vg_name}/{lv_name} changed from {} ({old} extents) to {} ({new} extents).",
        alloc::display_size(u64::from(old.0) * ext / 512),
        alloc::display_size(u64::from(new.0) * ext / 512),
    );

    // Active: the daemon takes the longer tables in place.
    let Some(info) = running.get(&name) else {
        if a.resizefs {
            bail!(
                "{vg_name}/{lv_name} is not active: its file system was not resized (activate \
                 it, then run the file system's own resize tool)"
            );
        }
        println!("  Logical volume {vg_name}/{lv_name} successfully resized.");
        return Ok(());
    };
    let vg = &md.vg;
    for n in &order {
        let lv = vg.lv(n).context("the LV")?;
        let table = table_of(&scan, vg, lv, MissingPvs::Refuse)?;
        let mut running = daemon_devices(&a.sd).into_keys().collect();
        ensure_mpaths(&scan, vg, &table, &a.sd, &mut running)?;
        expect_text(call(
            &a.sd,
            Request::Reload {
                name: dm_name(vg_name, n),
                table,
            },
        )?)
        .with_context(|| {
            format!(
                "{vg_name}/{n}: the metadata has the new size, but the active device did not \
                 take it (deactivate and activate it)"
            )
        })?;
    }
    println!("  Logical volume {vg_name}/{lv_name} successfully resized.");
    if a.resizefs {
        if !info.path.starts_with('/') {
            bail!(
                "{vg_name}/{lv_name} is exported as {}: -r needs it as a local block device \
                 (ublk)",
                info.path
            );
        }
        grow_fs(Path::new(&info.path))?;
    }
    Ok(())
}

/// Refuses to grow the active raid LV `dm` (of `images` images) while a leg is failed or
/// being rebuilt: the raid target would refuse the longer table after the commit.
fn raid_in_sync(sd: &StateDir, dm: &str, images: usize, vg: &str, lv: &str) -> Result<()> {
    let status = expect_text(call(
        sd,
        Request::Status {
            name: dm.to_string(),
        },
    )?)?;
    // `raid1 2 AA 1024/2048 resync ...`: the health word, then the sync action.
    let words: Vec<&str> = status.split_whitespace().collect();
    let health = words
        .iter()
        .find(|w| w.len() == images && w.chars().all(|c| "ADa".contains(c)))
        .copied()
        .unwrap_or("");
    if health.contains('D') || words.contains(&"recover") {
        bail!(
            "Cannot resize {vg}/{lv} while it is not in-sync (legs {health}: one is failed or \
             being rebuilt); let it rebuild, then extend it"
        );
    }
    Ok(())
}

/// The file system type on `dev`, as blkid reads it.
fn fs_type(dev: &Path) -> Result<String> {
    let o = Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "TYPE"])
        .arg(dev)
        .output()
        .context("running blkid")?;
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// Where `dev` is mounted, from /proc/self/mounts.
fn mount_point(dev: &Path) -> Option<PathBuf> {
    let want = std::fs::canonicalize(dev).ok()?;
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let src = f.next()?;
        let dir = f.next()?;
        (std::fs::canonicalize(src).ok()? == want).then(|| PathBuf::from(dir.replace("\\040", " ")))
    })
}

/// Grows the file system on `dev` to the device's size.
fn grow_fs(dev: &Path) -> Result<()> {
    let fs = fs_type(dev)?;
    let mut cmd = match fs.as_str() {
        "ext2" | "ext3" | "ext4" => {
            let mut c = Command::new("resize2fs");
            c.arg(dev);
            c
        }
        "xfs" => {
            let mnt = mount_point(dev).with_context(|| {
                format!(
                    "{}: XFS grows only while mounted: mount it first",
                    dev.display()
                )
            })?;
            let mut c = Command::new("xfs_growfs");
            c.arg(mnt);
            c
        }
        "" => bail!("{}: no file system found to resize", dev.display()),
        other => bail!("{}: cannot resize a {other} file system", dev.display()),
    };
    let o = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !o.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    println!("  File system on {} resized ({fs}).", dev.display());
    Ok(())
}

/// The LV's new length for lvreduce: `-L`/`-l` absolute or with `-`, rounded up to whole
/// extents (never cutting more than asked).
fn reduced_length(size: &alloc::Size, cur: Extents, extent: u64) -> Result<Extents> {
    let extent = extent.max(1);
    let new = match (size.sign, size.amount) {
        (Sign::Minus, alloc::Amount::Sectors(s)) => {
            let cur_s = u64::from(cur.0) * extent;
            cur_s.saturating_sub(s.0).div_ceil(extent)
        }
        (Sign::Minus, alloc::Amount::Extents(e)) => u64::from(cur.0.saturating_sub(e.0)),
        (Sign::None, alloc::Amount::Sectors(s)) => s.0.div_ceil(extent),
        (Sign::None, alloc::Amount::Extents(e)) => u64::from(e.0),
        (Sign::Plus, _) => bail!("a size with + grows: use lvextend"),
        (_, alloc::Amount::Percent { .. }) => {
            bail!("lvreduce takes a size or an extent count, not a percentage")
        }
    };
    Ok(Extents(u32::try_from(new).context("size too large")?))
}

/// Whether the resize asks for a smaller LV (lvresize then reduces).
fn shrinks(a: &LvresizeArgs, scan: &Scan) -> Result<bool> {
    let size = a.size()?;
    if size.sign == Sign::Minus {
        return Ok(true);
    }
    if size.sign == Sign::Plus || matches!(size.amount, alloc::Amount::Percent { .. }) {
        return Ok(false);
    }
    let (vg_name, _) = split_lv_name(&a.lv)?;
    let vg = &scan.vg(vg_name)?.metadata.vg;
    let cur = a.lv_in(vg)?.extent_count().context("LV length")?;
    Ok(reduced_length(&size, cur, vg.extent_size.0)? < cur)
}

/// `lvresize`: grows with lvextend, shrinks with lvreduce.
pub fn lvresize(a: LvresizeArgs) -> Result<()> {
    // One scan serves the decision and the change.
    let scan = Scan::run_writable(&a.dev)?;
    if shrinks(&a, &scan)? {
        reduce(a, scan)
    } else {
        extend(a, scan)
    }
}

/// `lvreduce`: a linear or striped LV loses its last extents, after its file system was
/// shrunk to fit (`-r`, ext2/3/4 unmounted; XFS cannot shrink). An active LV is deactivated
/// for the cut and activated again (the daemon never shrinks a live device under a client),
/// so it must not be open.
pub fn lvreduce(a: LvresizeArgs) -> Result<()> {
    let scan = Scan::run_writable(&a.dev)?;
    reduce(a, scan)
}

fn reduce(a: LvresizeArgs, scan: Scan) -> Result<()> {
    let (vg_name, lv_name) = split_lv_name(&a.lv)?;
    scan.warn();
    let mut md = scan.vg(vg_name)?.metadata.clone();
    let lv = a.lv_in(&md.vg)?;
    if !lv
        .segments
        .iter()
        .all(|s| matches!(s.kind, SegmentKind::Striped { .. }))
    {
        bail!("{vg_name}/{lv_name}: lvreduce shrinks linear and striped LVs only");
    }
    let size = a.size()?;
    let ext = md.vg.extent_size.0;
    let cur = lv.extent_count().context("LV length")?;
    let new = reduced_length(&size, cur, ext)?;
    let mut cut = lv.clone();
    cut.reduce_to(new)
        .map_err(|e| anyhow::anyhow!("{vg_name}/{lv_name}: {e}"))?;
    let new_bytes = u64::from(new.0) * ext * 512;
    let dm = dm_name(vg_name, lv_name);
    let running = daemon_devices(&a.sd);
    let active = running.get(&dm).cloned();
    if !a.resizefs
        && !a.confirm.ask(&format!(
            "WARNING: Reducing logical volume {vg_name}/{lv_name} to {}. THIS MAY DESTROY YOUR \
             DATA (filesystem etc.) Do you really want to reduce {vg_name}/{lv_name}?",
            alloc::display_size(new_bytes / 512)
        ))?
    {
        bail!("Logical volume {vg_name}/{lv_name} NOT reduced.");
    }
    if a.resizefs {
        let Some(info) = active.as_ref().filter(|i| i.path.starts_with('/')) else {
            bail!(
                "{vg_name}/{lv_name}: -r needs the LV active as a local block device (ublk) to \
                 shrink its file system first"
            );
        };
        shrink_fs(Path::new(&info.path), new_bytes)?;
    }
    // The cut: down (so no client sees the device shrink under it), commit, up again.
    if active.is_some() {
        super::activate::deactivate_one(&md.vg, &lv, &a.sd, &running).with_context(|| {
            format!("{vg_name}/{lv_name}: deactivating for the cut (is it in use?)")
        })?;
    }
    let l = md.vg.lv_mut(lv_name).context("the LV")?;
    *l = cut;
    md.stamp(format!(
        "Created *after* executing 'volmgr lvreduce {vg_name}/{lv_name}'"
    ));
    scan.commit(&mut md)?;
    println!(
        "  Size of logical volume {vg_name}/{lv_name} changed from {} ({cur} extents) to {} ({new} extents).",
        alloc::display_size(u64::from(cur.0) * ext),
        alloc::display_size(u64::from(new.0) * ext),
    );
    if let Some(info) = active {
        // Back as it was: the same NBD address, or ublk.
        let nbd = info
            .path
            .strip_prefix("nbd://")
            .and_then(|r| r.split('/').next())
            .map(str::to_string);
        let vg = &md.vg;
        let lv = vg.lv(lv_name).context("the LV")?;
        super::activate::activate_one(
            &scan,
            vg,
            lv,
            MissingPvs::Refuse,
            nbd,
            &a.sd,
            &daemon_devices(&a.sd),
        )?;
    }
    println!("  Logical volume {vg_name}/{lv_name} successfully resized.");
    Ok(())
}

/// Shrinks the file system on `dev` to `bytes` (ext2/3/4, which must not be mounted).
fn shrink_fs(dev: &Path, bytes: u64) -> Result<()> {
    if let Some(m) = mount_point(dev) {
        bail!(
            "{} is mounted on {}: ext4 shrinks only unmounted (umount it first)",
            dev.display(),
            m.display()
        );
    }
    match fs_type(dev)?.as_str() {
        "ext2" | "ext3" | "ext4" => {}
        "xfs" => bail!("{}: XFS cannot shrink", dev.display()),
        "" => return Ok(()),
        other => bail!("{}: cannot shrink a {other} file system", dev.display()),
    }
    for cmd in [
        Command::new("e2fsck").args(["-f", "-p"]).arg(dev).output(),
        Command::new("resize2fs")
            .arg(dev)
            .arg(format!("{}K", bytes / 1024))
            .output(),
    ] {
        let o = cmd.context("running e2fsck/resize2fs")?;
        if !o.status.success() {
            bail!(
                "{}: {}{}",
                dev.display(),
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
    println!(
        "  File system on {} shrunk to {} KiB.",
        dev.display(),
        bytes / 1024
    );
    Ok(())
}
