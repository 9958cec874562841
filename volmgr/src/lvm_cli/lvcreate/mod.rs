//! `lvcreate`: a new LV of any type volmgr builds (linear, striped, raid1/5/10 on volmgr's
//! raid format, thin pools and thin LVs and their snapshots on volmgr's thin format), placed
//! by [`lvm::alloc`], committed to every PV, and activated through the daemon, as lvm2 does by
//! default.
//!
//! - `plain.rs`: linear and striped.
//! - `raid.rs`: raid1/5/10: hidden `_rmeta_N`/`_rimage_N` sub-LVs and a `volmgr-raid*` LV.
//! - `thin.rs`: thin pools (`_tdata`/`_tmeta` sub-LVs), thin LVs (`-V`) and thin snapshots
//!   (`-s`), with the pool's messages (`create_thin`, `create_snap`).

mod plain;
mod raid;
pub(crate) mod thin;

use anyhow::{bail, Context, Result};
use clap::Args;
use lvm::activate::MissingPvs;
use lvm::alloc::{self, PvSelection, Size};
use lvm::model::Flags;
use lvm::{LogicalVolume, Metadata, Segment, Uuid, VolumeGroup};

use super::activate::{activate_one, daemon_devices};
use super::scan::Scan;
use super::DeviceArgs;
use crate::client::StateDir;

#[derive(Args)]
pub struct LvcreateArgs {
    /// The VG (or VG/LV, naming the LV too; with -s, the origin VG/LV).
    vg: String,
    /// PVs to allocate from, optionally with extent ranges (`/dev/sdb:0-99:200-`).
    pvs: Vec<String>,
    /// Name of the new LV (default: lvolN, the first free).
    #[arg(short = 'n', long = "name")]
    name: Option<String>,
    /// Size with units (k m g t p e, s for sectors; default unit MiB), rounded up to extents.
    #[arg(
        short = 'L',
        long = "size",
        value_name = "SIZE",
        conflicts_with = "extents"
    )]
    size: Option<String>,
    /// Size in extents, or a percentage: N%VG, N%FREE, N%PVS.
    #[arg(short = 'l', long = "extents", value_name = "N[%VG|%FREE|%PVS]")]
    extents: Option<String>,
    /// Number of stripes (raid5, raid10: data stripes).
    #[arg(short = 'i', long = "stripes")]
    stripes: Option<u32>,
    /// Stripe size (a power of two, at least 4k; default 64k).
    #[arg(short = 'I', long = "stripesize", value_name = "SIZE")]
    stripesize: Option<String>,
    /// Segment type: linear, striped, raid1, raid5, raid10, thin-pool, thin.
    #[arg(long = "type", value_name = "TYPE")]
    segtype: Option<String>,
    /// Mirrors: copies beyond the first (raid1 -m 1 is two images; raid10 takes 1).
    #[arg(short = 'm', long = "mirrors")]
    mirrors: Option<u32>,
    /// Region size of a raid LV (its bitmap's unit; default 2m as lvm2).
    #[arg(short = 'R', long = "regionsize", value_name = "SIZE")]
    regionsize: Option<String>,
    /// Virtual size of a thin LV.
    #[arg(short = 'V', long = "virtualsize", value_name = "SIZE")]
    virtualsize: Option<String>,
    /// The thin pool, as POOL or VG/POOL (with -V: the pool the thin LV goes in).
    #[arg(short = 'T', long = "thinpool", value_name = "POOL")]
    thinpool: Option<String>,
    /// A thin snapshot of the thin LV named as the VG argument (VG/LV).
    #[arg(short = 's', long = "snapshot")]
    snapshot: bool,
    /// Thin pool block size (default 64k; 4k, the only size, with --dedup).
    #[arg(short = 'c', long = "chunksize", value_name = "SIZE")]
    chunksize: Option<String>,
    /// A thin pool with inline deduplication (the pool table's `dedup` feature): identical
    /// 4 KiB blocks of all its thin LVs are stored once. Its blocks are 4 KiB and its default
    /// metadata is 128 bytes per block (mappings plus content hashes).
    #[arg(long)]
    dedup: bool,
    /// With --dedup: compare the bytes of a block before sharing it (`dedup_verify`).
    #[arg(long, requires = "dedup")]
    dedup_verify: bool,
    /// Thin pool metadata size (default: 64 bytes per pool block, 128 with --dedup, at least 4m).
    #[arg(long = "poolmetadatasize", value_name = "SIZE")]
    poolmetadatasize: Option<String>,
    /// Allocation policy: normal, contiguous, anywhere, inherit (lvm2's names; cling is
    /// taken as normal).
    #[arg(long = "alloc", value_name = "POLICY", default_value = "inherit")]
    alloc: String,
    /// Zero the first 4 KiB of the new LV (y, as lvm2) or not (n); a thin pool's new blocks.
    #[arg(short = 'Z', long = "zero", value_name = "y|n", default_value = "y")]
    zero: String,
    /// Activate the new LV (y, the default, when a daemon runs) or not (n).
    #[arg(
        short = 'a',
        long = "activate",
        value_name = "y|n",
        default_value = "y"
    )]
    activate: String,
    /// Export the new LV over NBD at this address instead of ublk.
    #[arg(long, value_name = "ADDR")]
    nbd: Option<String>,
    #[command(flatten)]
    sd: StateDir,
    #[command(flatten)]
    dev: DeviceArgs,
}

fn yes_no(flag: &str, v: &str) -> Result<bool> {
    match v {
        "y" | "ay" | "ey" | "ly" | "yes" => Ok(true),
        "n" | "an" | "en" | "ln" | "no" => Ok(false),
        _ => bail!("{flag} '{v}': use y or n"),
    }
}

/// lvm2's name for an LV created without `-n`: `lvolN`, the first N not taken.
fn default_name(vg: &VolumeGroup) -> String {
    (0u32..)
        .map(|i| format!("lvol{i}"))
        .find(|n| vg.lv(n).is_none())
        .unwrap_or_else(|| "lvol".into())
}

/// The PV list of the command line, by PV key, with its extent ranges.
pub fn pv_selection(scan: &Scan, vg: &VolumeGroup, args: &[String]) -> Result<Option<PvSelection>> {
    if args.is_empty() {
        return Ok(None);
    }
    let mut sel = PvSelection::new();
    for arg in args {
        let (path, ranges) = PvSelection::split_arg(arg);
        let pv = scan
            .device_index(std::path::Path::new(&path))
            .and_then(|i| scan.report.devices[i].label.as_ref())
            .and_then(|l| vg.pv_by_id(&l.pv_uuid))
            .with_context(|| {
                format!(
                    "Physical Volume \"{path}\" not found in Volume Group \"{}\".",
                    vg.name
                )
            })?;
        sel.add(vg, &pv.key, ranges.as_deref())?;
    }
    Ok(Some(sel))
}

/// What kind of LV the arguments ask for.
enum Kind {
    Plain,
    Raid(lvm::segtypes::RaidLevel),
    ThinPool,
    Thin,
    Snapshot,
}

impl LvcreateArgs {
    fn kind(&self) -> Result<Kind> {
        if self.snapshot {
            return Ok(Kind::Snapshot);
        }
        match self.segtype.as_deref() {
            None if self.virtualsize.is_some() => Ok(Kind::Thin),
            None if self.thinpool.is_some() => Ok(Kind::ThinPool),
            None if self.mirrors.unwrap_or(0) > 0 => {
                Ok(Kind::Raid(lvm::segtypes::RaidLevel::Raid1))
            }
            None | Some("linear") | Some("striped") => {
                if self.segtype.as_deref() == Some("linear") && self.stripes.unwrap_or(1) > 1 {
                    bail!("--type linear takes no -i: use --type striped");
                }
                Ok(Kind::Plain)
            }
            Some("thin-pool") => Ok(Kind::ThinPool),
            Some("thin") => Ok(Kind::Thin),
            Some(t) => match lvm::segtypes::RaidLevel::from_name(t) {
                Some(l) => Ok(Kind::Raid(l)),
                None if matches!(
                    t,
                    "raid4"
                        | "raid6"
                        | "raid0"
                        | "mirror"
                        | "snapshot"
                        | "cache"
                        | "vdo"
                        | "writecache"
                ) =>
                {
                    bail!(
                        "--type {t}: volmgr creates linear, striped, raid1, raid5, raid10, \
                     thin-pool and thin LVs; {t} is not one of them"
                    )
                }
                None => bail!("Invalid argument for --type: {t}"),
            },
        }
    }

    /// `-L` or `-l` as given, or an error naming both.
    fn size(&self) -> Result<Size> {
        Ok(match (&self.size, &self.extents) {
            (Some(s), _) => alloc::parse_size(s, false)?,
            (None, Some(l)) => alloc::parse_size(l, true)?,
            (None, None) => bail!("Please specify either size or extents"),
        })
    }

    fn policy(&self) -> Result<alloc::Policy> {
        Ok(self.alloc.parse()?)
    }
}

/// The VG being changed: a writable scan, its metadata, the new LV's name.
pub(super) struct Draft {
    scan: Scan,
    md: Metadata,
    name: String,
    vg_name: String,
}

impl Draft {
    /// A hidden or visible LV of this draft's creation stamp.
    fn lv(&self, name: &str, visible: bool, segments: Vec<Segment>) -> LogicalVolume {
        let mut status = Flags::of(&["READ", "WRITE"]);
        if visible {
            status.set("VISIBLE");
        }
        LogicalVolume {
            name: name.to_string(),
            id: Uuid::generate(),
            status,
            flags: Flags::default(),
            creation_time: Some(self.md.creation_time),
            creation_host: Some(self.md.creation_host.clone()),
            segments,
            extra: Vec::new(),
        }
    }

    /// Adds `lvs` (visible ones first, as LVM2 orders them) and commits.
    fn commit(&mut self, lvs: Vec<LogicalVolume>) -> Result<()> {
        for l in &lvs {
            if self.md.vg.lv(&l.name).is_some() {
                bail!(
                    "Logical Volume \"{}\" already exists in volume group \"{}\"",
                    l.name,
                    self.vg_name
                );
            }
        }
        let (visible, hidden): (Vec<_>, Vec<_>) =
            lvs.into_iter().partition(|l| l.status.has("VISIBLE"));
        let at = self
            .md
            .vg
            .logical_volumes
            .iter()
            .position(|l| !l.status.has("VISIBLE"))
            .unwrap_or(self.md.vg.logical_volumes.len());
        let names: Vec<String> = visible
            .iter()
            .chain(&hidden)
            .map(|l| l.name.clone())
            .collect();
        self.md.vg.logical_volumes.splice(at..at, visible);
        self.md.vg.logical_volumes.extend(hidden);
        let new: Vec<&LogicalVolume> = names.iter().filter_map(|n| self.md.vg.lv(n)).collect();
        crate::lvm_cli::activate::check_tables(&self.scan, &self.md.vg, &new)?;
        self.scan.commit(&mut self.md)?;
        Ok(())
    }

    /// Zeroes `len` bytes (at most the LV) from the start of LV `lv`, straight on its PVs
    /// through the table the LV would get; done before the commit, while its extents are
    /// still free, so a crash leaves no new LV with old data at its start.
    fn zero_start(&self, lv: &LogicalVolume, len: u64) -> Result<()> {
        let vg = &self.md.vg;
        let table = crate::lvm_cli::activate::scan_table(&self.scan, vg, lv)?;
        let size = lv
            .extent_count()
            .and_then(|e| e.to_sectors(vg.extent_size))
            .map(|s| s.bytes().0)
            .unwrap_or(0);
        let len = len.min(size);
        let mut done = 0u64;
        for line in table.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            // Linear lines only: sub-LVs and plain LVs that are zeroed whole are linear or
            // striped; for a striped line the first chunk (at least 4 KiB) is on stripe 0.
            let (dev, off, seg_len) = match f.as_slice() {
                [_, l, "linear", dev, off] => (*dev, *off, *l),
                [_, _, "striped", _, chunk, dev, off, ..] => (*dev, *off, *chunk),
                _ => bail!("{}/{}: cannot find its sectors to zero", vg.name, lv.name),
            };
            let off: u64 = off.parse().context("table offset")?;
            let seg_bytes: u64 = seg_len.parse::<u64>().context("table length")? * 512;
            let i = self
                .scan
                .device_index(std::path::Path::new(dev))
                .with_context(|| format!("{dev}: not among the scanned devices"))?;
            let d = &self.scan.report.devices[i].dev;
            let n = seg_bytes.min(len - done);
            let zero = vec![0u8; 1 << 20];
            let mut at = 0u64;
            while at < n {
                let k = (n - at).min(zero.len() as u64);
                lvm::io::write_at(d.as_ref(), off * 512 + at, &zero[..k as usize], false)
                    .with_context(|| format!("{}/{}: zeroing", vg.name, lv.name))?;
                at += k;
            }
            lvm::io::flush(d.as_ref())
                .with_context(|| format!("{}/{}: zeroing", vg.name, lv.name))?;
            done += n;
            if done >= len {
                break;
            }
        }
        Ok(())
    }
}

pub fn lvcreate(a: LvcreateArgs) -> Result<()> {
    let kind = a.kind()?;
    if a.dedup && !matches!(kind, Kind::ThinPool) {
        bail!("--dedup applies to thin pools (--type thin-pool)");
    }
    let zero = yes_no("--zero", &a.zero)?;
    let activate = yes_no("--activate", &a.activate)?;
    let (vg_name, lv_from_path) = match a.vg.split_once('/') {
        Some((v, l)) => (v.to_string(), Some(l.to_string())),
        None => (a.vg.clone(), None),
    };
    let scan = Scan::run_writable(&a.dev)?;
    scan.warn();
    let mut md = scan.vg(&vg_name)?.metadata.clone();
    md.stamp(format!(
        "Created *after* executing 'volmgr lvcreate {}'",
        a.vg
    ));
    let name = match (a.name.clone(), lv_from_path.clone()) {
        // With -s the VG/LV argument is the origin, not the new LV.
        (Some(n), _) if a.snapshot => n,
        (None, _) if a.snapshot => default_name(&md.vg),
        (Some(n), Some(p)) if n != p => bail!("LV name given twice: {p} and {n}"),
        (Some(n), _) | (None, Some(n)) => n,
        (None, None) => default_name(&md.vg),
    };
    lvm::vgcreate::check_name("LV", &name).map_err(anyhow::Error::msg)?;
    if md.vg.lv(&name).is_some() {
        bail!("Logical Volume \"{name}\" already exists in volume group \"{vg_name}\"");
    }
    let mut draft = Draft {
        scan,
        md,
        name: name.clone(),
        vg_name: vg_name.clone(),
    };
    match kind {
        Kind::Plain => plain::create(&a, &mut draft, zero)?,
        Kind::Raid(level) => raid::create(&a, &mut draft, level)?,
        Kind::ThinPool => thin::create_pool(&a, &mut draft, zero)?,
        Kind::Thin => thin::create_thin(&a, &mut draft, None)?,
        Kind::Snapshot => {
            let origin =
                lv_from_path.context("-s takes the origin as VG/LV (thin snapshots only)")?;
            thin::create_thin(&a, &mut draft, Some(origin))?
        }
    }
    println!("  Logical volume \"{name}\" created.");

    let sock = a.sd.state_dir.join("control.sock");
    if !activate || !sock.exists() {
        if activate {
            eprintln!(
                "  WARNING: {vg_name}/{name} not activated: no volmgr daemon at {} (start it, \
                 then lvchange -ay {vg_name}/{name})",
                a.sd.state_dir.display()
            );
        }
        return Ok(());
    }
    let vg = &draft.md.vg;
    let lv = vg.lv(&name).context("the new LV")?;
    activate_one(
        &draft.scan,
        vg,
        lv,
        MissingPvs::Refuse,
        a.nbd.clone(),
        &a.sd,
        &daemon_devices(&a.sd),
    )
}
