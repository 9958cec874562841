//! `--lv VG/LV`: replication named by the volume manager's names. A thin LV resolves to its
//! pool's daemon device, its thin id and its size, as `lvchange -ay` would map it.

use anyhow::{bail, Context, Result};
use lvm::activate::dm_name;

use crate::client::StateDir;
use crate::lvm_cli::activate::daemon_devices;
use crate::lvm_cli::devices::DeviceArgs;
use crate::lvm_cli::lvcreate::thin::{ensure_pool_active, thin_segment};
use crate::lvm_cli::scan::Scan;

use super::config::Role;

/// What a thin LV is to the replication engines.
#[derive(Debug, PartialEq, Eq)]
pub struct ThinLv {
    /// The pool LV's daemon device (`VG-POOL`).
    pub pool: String,
    /// The LV's thin id in that pool.
    pub thin: u32,
    /// The LV's size in bytes.
    pub size: u64,
    /// The default name both sides know the volume by: the LV's device-mapper name.
    pub volume: String,
}

/// Resolves `name` (`VG/LV`) through a scan of `dev`'s devices; activates the LV's pool when
/// the daemon of `sd` does not hold it yet. A secondary's copy must not be active: it is
/// rewritten every interval.
pub fn resolve(name: &str, dev: &DeviceArgs, sd: &StateDir, role: Role) -> Result<ThinLv> {
    let (vg_name, lv_name) = name
        .split_once('/')
        .with_context(|| format!("--lv '{name}': name the LV as VG/LV"))?;
    let scan = Scan::run(dev)?;
    scan.warn();
    let sv = scan.vg(vg_name)?;
    let vg = &sv.metadata.vg;
    let lv = vg
        .lv(lv_name)
        .with_context(|| format!("Failed to find logical volume \"{name}\""))?;
    let Some(t) = thin_segment(lv) else {
        bail!(
            "{name} is not a thin LV: replication ships the blocks changed between snapshots \
             of a thin volume"
        );
    };
    let size = lv
        .extent_count()
        .and_then(|e| e.to_sectors(vg.extent_size))
        .with_context(|| format!("{name}: its segments do not add up to a size"))?
        .bytes()
        .0;
    let pool_lv = vg
        .lv(&t.thin_pool)
        .with_context(|| format!("{name}: its pool {} is not in the VG", t.thin_pool))?;
    let me = dm_name(vg_name, lv_name);
    if role == Role::Secondary && daemon_devices(sd).contains_key(&me) {
        bail!(
            "{name} is active: a secondary's copy is rewritten every interval; deactivate it \
             (lvchange -an {name}) and activate it after `repl promote`"
        );
    }
    let pool = ensure_pool_active(&scan, vg, pool_lv, sd)?;
    Ok(ThinLv {
        pool,
        thin: t.device_id,
        size,
        volume: me,
    })
}
