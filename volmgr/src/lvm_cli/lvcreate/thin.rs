//! Thin pools and thin LVs on volmgr's thin format.
//!
//! A pool is a hidden `_tdata` LV (the data blocks), a hidden `_tmeta` LV (its metadata,
//! zeroed at its start so the pool formats it on first use) and the visible pool LV with a
//! `volmgr-thin-pool` segment, activated without a front end. A thin LV is a
//! `volmgr-thin` segment naming the pool and a device id; the id is created in the pool
//! (`create_thin`, or `create_snap` for a snapshot of another thin LV) before the VG
//! metadata that records it is committed, so a crash between the two leaves an unused id in
//! the pool, never an LV without its device. The pool's transaction id follows the metadata's
//! (`set_transaction_id`), as LVM does with dm-thin.

use anyhow::{bail, Context, Result};
use lvm::activate::{dm_name, MissingPvs};
use lvm::alloc::{self, Request, Sign};
use lvm::segtypes::{ThinPoolSegment, ThinSegment, VolmgrSegment};
use lvm::{Extents, LogicalVolume, VolumeGroup};
use tables::Sectors;
use ublk_target::control::Request as Ctl;

use super::plain::note_lines;
use super::{pv_selection, Draft, LvcreateArgs};
use crate::client::{call, expect_text, StateDir};
use crate::lvm_cli::activate::{activate_one, daemon_devices};

/// lvm2's default thin pool chunk size (64 KiB).
const DEFAULT_CHUNK: Sectors = Sectors(128);
/// The block size of a dedup pool (4 KiB: the thin crate's dedup works per pool block).
const DEDUP_CHUNK: Sectors = Sectors(8);
/// Smallest metadata LV volmgr makes (lvm2's minimum is 2 MiB).
const MIN_META: u64 = 4 << 20;

pub(super) fn create_pool(a: &LvcreateArgs, d: &mut Draft, zero: bool) -> Result<()> {
    let vg = d.md.vg.clone();
    let pvs = pv_selection(&d.scan, &vg, &a.pvs)?;
    let chunk = match &a.chunksize {
        Some(c) => super::super::parse_lvm_size(c, 'k')?.sectors_floor(),
        None if a.dedup => DEDUP_CHUNK,
        None => DEFAULT_CHUNK,
    };
    if a.dedup && chunk != DEDUP_CHUNK {
        bail!(
            "--chunksize: a --dedup pool has 4k blocks, got {}k",
            chunk.0 / 2
        );
    }
    if !a.dedup && (!chunk.0.is_power_of_two() || !(128..=2_097_152).contains(&chunk.0)) {
        bail!("--chunksize: a power of two from 64k to 1g, as lvm2 takes it");
    }
    // Mapping and (for dedup) hash tree bytes per pool block, with room to spare.
    let meta_per_block = if a.dedup { 128 } else { 64 };
    let size = a.size()?;
    let stripes = a.stripes.unwrap_or(1);
    let (data_extents, note) = size.to_extents(&vg, pvs.as_ref(), stripes)?;
    note_lines(note);
    let policy = a.policy()?;
    let stripe_size = if stripes > 1 {
        let (s, note) = alloc::stripe_size(&vg, stripes, None)?;
        note_lines(note);
        s
    } else {
        None
    };
    let data = alloc::allocate(
        &vg,
        &Request {
            extents: data_extents,
            stripes,
            stripe_size,
            policy,
            pvs: pvs.clone(),
            approx: size.is_approximate(),
            ..Request::default()
        },
    )?;
    let data_extents = data.extents;
    let name = d.name.clone();
    let tdata = d.lv(
        &format!("{name}_tdata"),
        false,
        data.legs.into_iter().next().unwrap_or_default(),
    );
    // The metadata goes where the data is not: allocate it in the VG with the data LV in it.
    let ext_bytes = vg.extent_size.bytes().0.max(1);
    let data_bytes = u64::from(data_extents.0) * ext_bytes;
    let meta_bytes = match &a.poolmetadatasize {
        Some(s) => super::super::parse_lvm_size(s, 'm')?.0,
        None => (data_bytes / chunk.bytes().0.max(1))
            .saturating_mul(meta_per_block)
            .max(MIN_META),
    };
    let meta_extents = Extents(
        u32::try_from(meta_bytes.div_ceil(ext_bytes)).context("--poolmetadatasize is too large")?,
    );
    let mut with_data = vg.clone();
    with_data.logical_volumes.push(tdata.clone());
    let meta = alloc::allocate(
        &with_data,
        &Request {
            extents: meta_extents,
            policy,
            pvs,
            ..Request::default()
        },
    )
    .context("allocating the pool's metadata LV")?;
    let tmeta = d.lv(
        &format!("{name}_tmeta"),
        false,
        meta.legs.into_iter().next().unwrap_or_default(),
    );
    d.zero_start(&tmeta, 64 << 10)?;
    let pool = d.lv(
        &name,
        true,
        vec![VolmgrSegment::ThinPool(ThinPoolSegment {
            metadata: tmeta.name.clone(),
            data: tdata.name.clone(),
            transaction_id: 0,
            chunk_size: chunk,
            zero_new_blocks: zero,
            dedup: a.dedup,
            dedup_verify: a.dedup_verify,
        })
        .to_segment(Extents(0), data_extents)],
    );
    d.commit(vec![pool, tdata, tmeta])
}

/// The `volmgr-thin-pool` segment of `lv`, if it is a pool.
pub(crate) fn pool_segment(lv: &LogicalVolume) -> Option<ThinPoolSegment> {
    match lv.segments.first().map(VolmgrSegment::parse) {
        Some(Ok(Some(VolmgrSegment::ThinPool(p)))) => Some(p),
        _ => None,
    }
}

/// The `volmgr-thin` segment of `lv`, if it is a thin LV.
pub(crate) fn thin_segment(lv: &LogicalVolume) -> Option<ThinSegment> {
    match lv.segments.first().map(VolmgrSegment::parse) {
        Some(Ok(Some(VolmgrSegment::Thin(t)))) => Some(t),
        _ => None,
    }
}

/// Sends a message to the daemon device `name`; returns its answer.
pub(crate) fn message(sd: &StateDir, name: &str, args: &[String]) -> Result<String> {
    expect_text(call(
        sd,
        Ctl::Message {
            name: name.to_string(),
            args: args.to_vec(),
        },
    )?)
    .with_context(|| format!("{name}: message '{}'", args.join(" ")))
}

/// Makes sure the pool `pool` of `vg` is active (the daemon holds its metadata) and returns
/// its daemon device name.
pub(crate) fn ensure_pool_active(
    scan: &crate::lvm_cli::scan::Scan,
    vg: &VolumeGroup,
    pool: &LogicalVolume,
    sd: &StateDir,
) -> Result<String> {
    if !sd.state_dir.join("control.sock").exists() {
        bail!(
            "thin LVs live in their pool's metadata, which the daemon keeps: no volmgr daemon \
             at {}",
            sd.state_dir.display()
        );
    }
    let running = daemon_devices(sd);
    let name = dm_name(&vg.name, &pool.name);
    if !running.contains_key(&name) {
        activate_one(scan, vg, pool, MissingPvs::Refuse, None, sd, &running)?;
    }
    Ok(name)
}

/// Bumps the pool's transaction id in the pool and in `vg`'s pool segment.
pub(crate) fn bump_transaction(
    vg: &mut VolumeGroup,
    pool_lv: &str,
    sd: &StateDir,
    pool_dev: &str,
) -> Result<()> {
    let lv = vg.lv_mut(pool_lv).context("the pool LV")?;
    let mut p = pool_segment(lv).context("the pool segment")?;
    let old = p.transaction_id;
    p.transaction_id = old + 1;
    let count = lv.segments[0].extent_count;
    lv.segments[0] = VolmgrSegment::ThinPool(p).to_segment(Extents(0), count);
    if let Err(e) = message(
        sd,
        pool_dev,
        &[
            "set_transaction_id".into(),
            old.to_string(),
            (old + 1).to_string(),
        ],
    ) {
        // The ids have drifted (an earlier command was cut between the pool and the
        // metadata): the metadata is the record; say so and go on.
        eprintln!("  WARNING: {e:#}");
    }
    Ok(())
}

/// A thin LV in a pool (`-V SIZE --thinpool POOL`), or a snapshot of the thin LV `origin`.
pub(super) fn create_thin(a: &LvcreateArgs, d: &mut Draft, origin: Option<String>) -> Result<()> {
    let vg = d.md.vg.clone();
    let (pool_name, extents, origin_id) = match &origin {
        Some(o) => {
            let olv = vg
                .lv(o)
                .with_context(|| format!("Failed to find logical volume \"{}/{o}\"", vg.name))?;
            let t = thin_segment(olv).with_context(|| {
                format!(
                    "{}/{o} is not a thin LV: volmgr makes thin snapshots only (of thin LVs)",
                    vg.name
                )
            })?;
            if a.size.is_some() || a.extents.is_some() {
                bail!("a thin snapshot takes no -L/-l: it has its origin's size");
            }
            (
                t.thin_pool,
                olv.extent_count().context("origin size")?,
                Some(t.device_id),
            )
        }
        None => {
            let pool = a.thinpool.as_deref().context("-V needs --thinpool POOL")?;
            let pool = pool.rsplit('/').next().unwrap_or(pool).to_string();
            let v = a
                .virtualsize
                .as_deref()
                .context("--thinpool with -V SIZE")?;
            let size = alloc::parse_size(v, false)?;
            let alloc::Amount::Sectors(s) = size.amount else {
                bail!("-V takes a size");
            };
            if size.sign != Sign::None || s.0 == 0 {
                bail!("-V {v}: give a positive size");
            }
            let e = s.0.div_ceil(vg.extent_size.0.max(1));
            if e * vg.extent_size.0 != s.0 {
                eprintln!(
                    "  Rounding up size to full physical extent {}.",
                    alloc::display_size(e * vg.extent_size.0)
                );
            }
            (
                pool,
                Extents(u32::try_from(e).context("-V is too large")?),
                None,
            )
        }
    };
    let pool_lv = vg
        .lv(&pool_name)
        .with_context(|| format!("Failed to find thin pool \"{}/{pool_name}\"", vg.name))?;
    if pool_segment(pool_lv).is_none() {
        bail!("{}/{pool_name} is not a volmgr thin pool", vg.name);
    }
    // The next id lvm2 would take: one past the highest the metadata records for this pool.
    let mut id = vg
        .logical_volumes
        .iter()
        .filter_map(thin_segment)
        .filter(|t| t.thin_pool == pool_name)
        .map(|t| t.device_id)
        .max()
        .unwrap_or(0)
        + 1;
    let pool_dev = ensure_pool_active(&d.scan, &vg, pool_lv, &a.sd)?;
    // An id left behind in the pool by a command cut before its commit is skipped.
    let mut tries = 0;
    loop {
        let msg: Vec<String> = match origin_id {
            Some(o) => vec!["create_snap".into(), id.to_string(), o.to_string()],
            None => vec!["create_thin".into(), id.to_string()],
        };
        match message(&a.sd, &pool_dev, &msg) {
            Ok(_) => break,
            Err(e) if tries < 16 && format!("{e:#}").contains("exists") => {
                tries += 1;
                id += 1;
            }
            Err(e) => return Err(e),
        }
    }
    bump_transaction(&mut d.md.vg, &pool_name, &a.sd, &pool_dev)?;
    let lv = d.lv(
        &d.name,
        true,
        vec![VolmgrSegment::Thin(ThinSegment {
            thin_pool: pool_name,
            device_id: id,
            origin,
        })
        .to_segment(Extents(0), extents)],
    );
    d.commit(vec![lv])
}
