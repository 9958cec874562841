//! `lvchange -ay|-an` and `vgchange -ay|-an`: LVs become the daemon's devices.
//!
//! An active LV is a daemon device named as device-mapper names it (`VG-LV`, hyphens inside
//! names doubled), whose table [`lvm::activate::lv_table`] builds from the metadata: the same
//! sectors kernel LVM would map. Through ublk it gets `$DM_DEV_DIR/VG/LV` (default
//! `/dev/VG/LV`), a symlink to its `/dev/ublkbN`; with `--nbd ADDR` it is exported over NBD
//! under its device name instead. The daemon persists the device, so a restart brings the LV
//! back.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use lvm::activate::{dm_name, lv_table, MissingPvs};
use lvm::{LogicalVolume, VolumeGroup};
use ublk_target::control::{DeviceInfo, NbdOverrides, Reply, Request};

use super::scan::{DuplicateUse, Scan};
use super::DeviceArgs;
use crate::client::{call, expect_text, StateDir};

/// `-a`/`--activate` and what goes with it.
#[derive(Args, Clone, Debug)]
pub struct ActivationArgs {
    /// `y` (or `ay`, `ey`, `ly`: all activate here) or `n`.
    #[arg(short = 'a', long = "activate", value_name = "y|n")]
    pub activate: String,
    /// `complete` (refuse an LV with an area on a missing PV), `degraded` (the default, as
    /// lvm2: a raid LV runs without the legs on missing PVs if its level allows; other LVs
    /// as complete), `partial` (also map other areas on missing PVs onto the error target).
    #[arg(long, value_name = "MODE", default_value = "degraded")]
    pub activationmode: String,
    /// Export over NBD at this address instead of ublk (`HOST:PORT`; with several LVs the
    /// ports count up from PORT, or each gets a free port when PORT is 0).
    #[arg(long, value_name = "ADDR")]
    pub nbd: Option<String>,
    #[command(flatten)]
    pub sd: StateDir,
}

#[derive(Args)]
pub struct LvchangeArgs {
    /// LVs, as VG/LV.
    #[arg(required = true)]
    lvs: Vec<String>,
    #[command(flatten)]
    act: ActivationArgs,
    #[command(flatten)]
    dev: DeviceArgs,
}

#[derive(Args)]
pub struct VgchangeArgs {
    /// VGs (all VGs found when none is named).
    vgs: Vec<String>,
    #[command(flatten)]
    act: ActivationArgs,
    #[command(flatten)]
    dev: DeviceArgs,
}

impl ActivationArgs {
    fn wants_active(&self) -> Result<bool> {
        match self.activate.as_str() {
            "y" | "ay" | "ey" | "ly" | "sy" => Ok(true),
            "n" | "an" | "en" | "ln" | "sn" => Ok(false),
            other => bail!("--activate '{other}': use y or n"),
        }
    }

    fn missing(&self) -> Result<MissingPvs> {
        match self.activationmode.as_str() {
            "complete" => Ok(MissingPvs::Refuse),
            "degraded" => Ok(MissingPvs::Degraded),
            "partial" => Ok(MissingPvs::Error),
            other => bail!("--activationmode '{other}': use complete, degraded or partial"),
        }
    }

    /// The NBD address for the `i`th LV activated by this command.
    fn nbd_addr(&self, i: usize) -> Result<Option<String>> {
        let Some(addr) = &self.nbd else {
            return Ok(None);
        };
        let (host, port) = addr
            .rsplit_once(':')
            .with_context(|| format!("--nbd '{addr}': expected HOST:PORT"))?;
        let port: u16 = port
            .parse()
            .with_context(|| format!("--nbd '{addr}': bad port"))?;
        if port == 0 {
            return Ok(Some(addr.clone()));
        }
        let p = u16::try_from(i)
            .ok()
            .and_then(|i| port.checked_add(i))
            .with_context(|| format!("--nbd '{addr}': ports run past 65535"))?;
        Ok(Some(format!("{host}:{p}")))
    }
}

/// The daemon's devices by name; empty when no daemon listens (nothing is active then).
pub fn daemon_devices(sd: &StateDir) -> HashMap<String, DeviceInfo> {
    let sock = sd.state_dir.join("control.sock");
    if !sock.exists() {
        return HashMap::new();
    }
    match call(sd, Request::List) {
        Ok(Reply::Devices { devices }) => {
            devices.into_iter().map(|d| (d.name.clone(), d)).collect()
        }
        Ok(_) | Err(_) => HashMap::new(),
    }
}

/// Where `/dev/VG/LV` links live: `$DM_DEV_DIR` as lvm2 reads it, else `/dev`.
pub fn dev_dir() -> PathBuf {
    std::env::var_os("DM_DEV_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/dev"))
}

pub fn lvchange(a: LvchangeArgs) -> Result<()> {
    let scan = Scan::run(&a.dev)?;
    scan.warn();
    let mut todo: Vec<(&VolumeGroup, &LogicalVolume)> = Vec::new();
    for name in &a.lvs {
        let (vg, lv) = name
            .split_once('/')
            .with_context(|| format!("'{name}': name the LV as VG/LV"))?;
        let sv = scan.vg(vg)?;
        let vg = &sv.metadata.vg;
        let lv = vg
            .lv(lv)
            .with_context(|| format!("Failed to find logical volume \"{name}\""))?;
        todo.push((vg, lv));
    }
    change(&scan, &todo, &a.act)
}

pub fn vgchange(a: VgchangeArgs) -> Result<()> {
    let scan = Scan::run(&a.dev)?;
    scan.warn();
    let mut todo: Vec<(&VolumeGroup, &LogicalVolume)> = Vec::new();
    let vgs: Vec<&lvm::scan::ScannedVg> = if a.vgs.is_empty() {
        scan.report.vgs.iter().collect()
    } else {
        a.vgs.iter().map(|n| scan.vg(n)).collect::<Result<_>>()?
    };
    for sv in vgs {
        let vg = &sv.metadata.vg;
        todo.extend(
            vg.logical_volumes
                .iter()
                .filter(|l| l.status.has("VISIBLE"))
                .map(|l| (vg, l)),
        );
    }
    let active = a.act.wants_active()?;
    change(&scan, &todo, &a.act)?;
    let mut seen = Vec::new();
    for (vg, _) in &todo {
        if !seen.contains(&vg.name) {
            seen.push(vg.name.clone());
        }
    }
    for vg in seen {
        let n = todo.iter().filter(|(v, _)| v.name == vg).count();
        println!(
            "  {n} logical volume(s) in volume group \"{vg}\" now {}",
            if active { "active" } else { "inactive" }
        );
    }
    Ok(())
}

/// Activates or deactivates each LV of `todo`; every LV is tried, and the command fails if
/// any did.
fn change(
    scan: &Scan,
    todo: &[(&VolumeGroup, &LogicalVolume)],
    act: &ActivationArgs,
) -> Result<()> {
    let active = act.wants_active()?;
    let missing = act.missing()?;
    let mut failed = 0;
    // Deactivation takes the LVs others are built on (thin pools) last.
    let mut order: Vec<usize> = (0..todo.len()).collect();
    if !active {
        order.sort_by_key(|&i| lvm::activate::is_internal(todo[i].1));
    }
    for i in order {
        let (vg, lv) = todo[i];
        // Each LV may have brought up (or taken down) devices the next one shares.
        let running = daemon_devices(&act.sd);
        let r = if active {
            act.nbd_addr(i)
                .and_then(|nbd| activate_one(scan, vg, lv, missing, nbd, &act.sd, &running))
        } else {
            deactivate_one(vg, lv, &act.sd, &running)
        };
        if let Err(e) = r {
            eprintln!("  {:#}", e);
            failed += 1;
        }
    }
    if failed > 0 {
        bail!(
            "{failed} of {} logical volume(s) could not be {}",
            todo.len(),
            if active { "activated" } else { "deactivated" }
        );
    }
    Ok(())
}

/// The visible LVs of `vg` that are active on the daemon.
pub fn active_lvs<'a>(vg: &'a VolumeGroup, sd: &StateDir) -> Vec<&'a LogicalVolume> {
    let running = daemon_devices(sd);
    vg.logical_volumes
        .iter()
        .filter(|l| l.status.has("VISIBLE") && running.contains_key(&dm_name(&vg.name, &l.name)))
        .collect()
}

/// Deactivates every active LV of `vg` (users before what they are built on).
pub fn deactivate_vg(vg: &VolumeGroup, sd: &StateDir) -> Result<()> {
    let mut lvs = active_lvs(vg, sd);
    lvs.sort_by_key(|l| lvm::activate::is_internal(l));
    for lv in lvs {
        let running = daemon_devices(sd);
        deactivate_one(vg, lv, sd, &running)
            .with_context(|| format!("{}/{}: deactivating", vg.name, lv.name))?;
    }
    Ok(())
}

/// How deep LVs may stack on LVs (thin on pool on sub-LVs is 2): crafted metadata whose LVs
/// name each other in a loop stops here instead of recursing forever.
const MAX_STACK: usize = 8;

/// The table of `lv`, with each PV at the path this scan found it on.
pub fn table_of(
    scan: &Scan,
    vg: &VolumeGroup,
    lv: &LogicalVolume,
    missing: MissingPvs,
) -> Result<String> {
    Ok(lv_table(vg, lv, &|pv| pv_device(scan, pv), missing)?)
}

/// The table of `lv` with each PV named as this scan opened it (a PV with several paths as
/// its `PATH1|PATH2` entry, not its multipath device): for volmgr to find the PVs' sectors
/// itself through [`Scan::device_index`] (zeroing before a commit), never for the daemon.
pub fn scan_table(scan: &Scan, vg: &VolumeGroup, lv: &LogicalVolume) -> Result<String> {
    Ok(lv_table(
        vg,
        lv,
        &|pv| scan.pv_path(&pv.id).map(|p| p.display().to_string()),
        MissingPvs::Refuse,
    )?)
}

/// The absolute path of the device this scan found PV `pv` on; for a PV with several paths
/// (`PATH1|PATH2`), its internal multipath device `/dev/volmgr/VG-KEY_mpath` (see
/// [`ensure_mpaths`]).
pub fn pv_device(scan: &Scan, pv: &lvm::PhysicalVolume) -> Option<String> {
    let path = scan.pv_path(&pv.id)?;
    if super::is_group(path) {
        let vg = scan.vg_of_pv(&pv.id)?;
        return Some(format!(
            "{}{}",
            lvm::activate::DAEMON_DEVICE_DIR,
            mpath_name(vg.name(), &pv.key)
        ));
    }
    Some(super::absolute_one(path).display().to_string())
}

/// The daemon name of the multipath device of PV `key` of VG `vg` (`VG-KEY_mpath`).
pub fn mpath_name(vg: &str, key: &str) -> String {
    dm_name(vg, &format!("{key}_mpath"))
}

/// The table of the multipath device over `paths` (a PV's `PATH1|PATH2`), `sectors` long:
/// one round-robin group of every path; no endless queueing (`no_path_retry 12`: I/O waits
/// 12 checker rounds for a path to come back, then fails, so a raid above it can fail the
/// leg), failed paths probed every second.
pub fn mpath_table(paths: &str, sectors: u64) -> String {
    let list = lvm::paths::group_paths(paths);
    let mut t = format!(
        "0 {sectors} multipath 4 no_path_retry 12 checker_interval_ms 1000 0 1 1 round-robin 0 {} 1",
        list.len()
    );
    for p in list {
        t.push_str(&format!(
            " {} 1",
            super::absolute_one(std::path::Path::new(p)).display()
        ));
    }
    t.push('\n');
    t
}

/// Creates, as internal devices, the multipath devices of the PVs with several paths that
/// `table` names and the daemon does not run yet (`running`, updated): an LV's table names
/// `/dev/volmgr/VG-KEY_mpath` for an area on such a PV.
pub fn ensure_mpaths(
    scan: &Scan,
    vg: &VolumeGroup,
    table: &str,
    sd: &StateDir,
    running: &mut HashSet<String>,
) -> Result<()> {
    for pv in &vg.physical_volumes {
        let Some(i) = scan.report.device_of_pv(&pv.id) else {
            continue;
        };
        let Some(path) = scan.paths.get(i).filter(|p| super::is_group(p)) else {
            continue;
        };
        let name = mpath_name(&vg.name, &pv.key);
        let dev = format!("{}{name}", lvm::activate::DAEMON_DEVICE_DIR);
        if running.contains(&name) || !table.split_whitespace().any(|w| w == dev) {
            continue;
        }
        let sectors = scan.report.devices[i].size.0 / 512;
        let reply = call(
            sd,
            Request::Create {
                name: name.clone(),
                table: mpath_table(&path.to_string_lossy(), sectors),
                ublk_id: None,
                export: None,
                nbd: None,
                nbd_limits: NbdOverrides::default(),
                internal: true,
            },
        )
        .with_context(|| format!("{}: PV {}: asking the daemon", vg.name, pv.key))?;
        expect_text(reply).with_context(|| {
            format!(
                "{}: PV {}: creating its multipath device {name}",
                vg.name, pv.key
            )
        })?;
        running.insert(name);
    }
    Ok(())
}

/// Removes the multipath devices of `vg`'s PVs that no device uses any more (the daemon
/// refuses to remove one that is used: that one stays).
fn remove_unused_mpaths(vg: &VolumeGroup, sd: &StateDir) -> Result<()> {
    let running = daemon_devices(sd);
    for pv in &vg.physical_volumes {
        let name = mpath_name(&vg.name, &pv.key);
        if !running.contains_key(&name) {
            continue;
        }
        match expect_text(call(
            sd,
            Request::Remove {
                name: name.clone(),
                force: false,
            },
        )?) {
            Ok(_) => {}
            Err(e) if e.to_string().contains("is used by") => {}
            Err(e) => return Err(e.context(format!("{}: removing {name}", vg.name))),
        }
    }
    Ok(())
}

/// Checks that each of `lvs` makes a table every target accepts (what `table check` runs:
/// all of a build's checks but opening devices), before metadata that holds them is written.
pub fn check_tables(scan: &Scan, vg: &VolumeGroup, lvs: &[&LogicalVolume]) -> Result<()> {
    let reg = volmgr::registry();
    for lv in lvs {
        let t = table_of(scan, vg, lv, MissingPvs::Refuse)?;
        tables::table::Table::parse(&t, &reg)
            .with_context(|| format!("{}/{}: its table would be refused", vg.name, lv.name))?;
    }
    Ok(())
}

/// Makes sure every LV `lv` is built on is active, as internal devices, deepest first.
fn activate_dependencies(
    scan: &Scan,
    vg: &VolumeGroup,
    lv: &LogicalVolume,
    missing: MissingPvs,
    sd: &StateDir,
    active: &mut HashSet<String>,
    depth: usize,
) -> Result<()> {
    if depth > MAX_STACK {
        bail!(
            "{}/{}: LVs stack deeper than {MAX_STACK} (a loop in the metadata?)",
            vg.name,
            lv.name
        );
    }
    let raid = lv.segments.iter().any(|s| {
        matches!(
            lvm::segtypes::VolmgrSegment::parse(s),
            Ok(Some(lvm::segtypes::VolmgrSegment::Raid(_)))
        )
    });
    for dep in lvm::activate::lv_dependencies(vg, lv) {
        let name = dm_name(&vg.name, &dep.name);
        if active.contains(&name) {
            continue;
        }
        // A raid leg on a missing PV is left out: the raid's table says `- -` for it.
        if raid
            && missing != MissingPvs::Refuse
            && !lvm::activate::lv_available(vg, dep, &|pv| pv_device(scan, pv))
        {
            eprintln!(
                "  WARNING: {}/{} is on a missing PV: {} runs without it",
                vg.name, dep.name, lv.name
            );
            continue;
        }
        activate_dependencies(scan, vg, dep, missing, sd, active, depth + 1)?;
        let table = table_of(scan, vg, dep, missing)?;
        ensure_mpaths(scan, vg, &table, sd, active)?;
        create(sd, vg, dep, name.clone(), table, None, true)?;
        active.insert(name);
    }
    Ok(())
}

/// Asks the daemon for the device `name`.
fn create(
    sd: &StateDir,
    vg: &VolumeGroup,
    lv: &LogicalVolume,
    name: String,
    table: String,
    nbd: Option<String>,
    internal: bool,
) -> Result<()> {
    let reply = call(
        sd,
        Request::Create {
            name,
            table,
            ublk_id: None,
            // Over NBD an LV is exported as LVM names it, VG/LV.
            export: nbd.as_ref().map(|_| format!("{}/{}", vg.name, lv.name)),
            nbd,
            nbd_limits: NbdOverrides::default(),
            internal,
        },
    )
    .with_context(|| format!("{}/{}: asking the daemon", vg.name, lv.name))?;
    expect_text(reply).with_context(|| format!("{}/{}: activating", vg.name, lv.name))?;
    Ok(())
}

/// Activates `lv` through the daemon of `sd` (over NBD at `nbd`, else ublk; thin pools and
/// sub-LVs without a front end), the LVs it is built on first, unless the daemon already has
/// it (`running`).
pub fn activate_one(
    scan: &Scan,
    vg: &VolumeGroup,
    lv: &LogicalVolume,
    missing: MissingPvs,
    nbd: Option<String>,
    sd: &StateDir,
    running: &HashMap<String, DeviceInfo>,
) -> Result<()> {
    scan.refuse_duplicates(vg, DuplicateUse::Activate)?;
    let name = dm_name(&vg.name, &lv.name);
    let table = table_of(scan, vg, lv, missing)?;
    if let Some(d) = running.get(&name) {
        // Already active: leave it (lvm2 is quiet too), but say when its table is stale.
        let current = expect_text(call(sd, Request::Table { name: name.clone() })?)?;
        if current.trim() != table.trim() {
            eprintln!(
                "  WARNING: {}/{} is active as {} with a table that differs from the metadata; \
                 deactivate and activate it again to reload",
                vg.name, lv.name, d.path
            );
        }
        return Ok(());
    }
    let mut active: HashSet<String> = running.keys().cloned().collect();
    activate_dependencies(scan, vg, lv, missing, sd, &mut active, 0)?;
    ensure_mpaths(scan, vg, &table, sd, &mut active)?;
    let internal = lvm::activate::is_internal(lv);
    let nbd = if internal { None } else { nbd };
    let via_ublk = nbd.is_none() && !internal;
    create(sd, vg, lv, name.clone(), table, nbd, internal)?;
    if internal {
        println!(
            "  {}/{}: active (internal: used by the LVs built on it)",
            vg.name, lv.name
        );
        return Ok(());
    }
    let path = daemon_devices(sd)
        .get(&name)
        .map(|d| d.path.clone())
        .unwrap_or_default();
    if via_ublk && path.starts_with('/') {
        let dir = dev_dir().join(&vg.name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let link = dir.join(&lv.name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&path, &link)
            .with_context(|| format!("linking {} to {path}", link.display()))?;
        println!(
            "  {}/{}: active as {} ({path})",
            vg.name,
            lv.name,
            link.display()
        );
    } else {
        println!("  {}/{}: active as {path}", vg.name, lv.name);
    }
    Ok(())
}

/// Removes the internal devices `lv` was built on that nothing else uses any more, deepest
/// last. One still in use (a thin pool with other thin LVs active) stays.
fn deactivate_dependencies(
    vg: &VolumeGroup,
    lv: &LogicalVolume,
    sd: &StateDir,
    depth: usize,
) -> Result<()> {
    if depth > MAX_STACK {
        return Ok(());
    }
    let running = daemon_devices(sd);
    for dep in lvm::activate::lv_dependencies(vg, lv) {
        let name = dm_name(&vg.name, &dep.name);
        if !running.contains_key(&name) || !lvm::activate::is_internal(dep) {
            continue;
        }
        match expect_text(call(sd, Request::Remove { name, force: false })?) {
            Ok(_) => deactivate_dependencies(vg, dep, sd, depth + 1)?,
            Err(e) if e.to_string().contains("is used by") => {}
            Err(e) => return Err(e.context(format!("{}/{}: deactivating", vg.name, dep.name))),
        }
    }
    Ok(())
}

/// Deactivates `lv` and the internal devices under it that nothing else uses; removes its
/// `/dev/VG/LV` link.
pub fn deactivate_one(
    vg: &VolumeGroup,
    lv: &LogicalVolume,
    sd: &StateDir,
    running: &HashMap<String, DeviceInfo>,
) -> Result<()> {
    let name = dm_name(&vg.name, &lv.name);
    if running.contains_key(&name) {
        let reply = call(sd, Request::Remove { name, force: false })
            .with_context(|| format!("{}/{}: asking the daemon", vg.name, lv.name))?;
        expect_text(reply).with_context(|| format!("{}/{}: deactivating", vg.name, lv.name))?;
    }
    deactivate_dependencies(vg, lv, sd, 0)?;
    remove_unused_mpaths(vg, sd)?;
    let dir = dev_dir().join(&vg.name);
    let _ = std::fs::remove_file(dir.join(&lv.name));
    // The VG's directory goes with its last LV link, as with lvm2.
    let _ = std::fs::remove_dir(&dir);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pvs_multipath_table_is_one_round_robin_group_the_target_accepts() {
        let t = mpath_table("nbd://10.0.1.2/d|nbd://10.0.2.2/d", 131072);
        assert_eq!(
            t,
            "0 131072 multipath 4 no_path_retry 12 checker_interval_ms 1000 0 1 1 round-robin \
             0 2 1 nbd://10.0.1.2/d 1 nbd://10.0.2.2/d 1\n"
        );
        tables::table::Table::parse(&t, &volmgr::registry())
            .expect("the multipath target refuses it");
        assert_eq!(mpath_name("my-vg", "pv0"), "my--vg-pv0_mpath");
    }
}
