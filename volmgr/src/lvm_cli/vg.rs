//! `vgcreate`, `vgremove`, `vgs`, `vgck`, `vgcfgbackup`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use lvm::mda::MdaHeader;
use lvm::text::Style;
use lvm::Metadata;
use tables::DeviceRef;

use super::report::{Field, Kind, Value};
use super::scan::{free_extents, Scan};
use super::{absolute, parse_lvm_size, Confirm, DeviceArgs, ReportArgs};

#[derive(Args)]
pub struct VgcreateArgs {
    /// Name of the new VG.
    vg: String,
    /// PVs (devices or files); ones that are not PVs yet are initialized as pvcreate would.
    #[arg(required = true)]
    pvs: Vec<PathBuf>,
    /// Extent size (lvm2's default 4m; a power of two, at least 1k... as lvm2 checks it).
    #[arg(short = 's', long = "physicalextentsize", value_name = "SIZE")]
    extent_size: Option<String>,
    #[command(flatten)]
    confirm: Confirm,
    #[command(flatten)]
    dev: DeviceArgs,
}

#[derive(Args)]
pub struct VgremoveArgs {
    /// VGs to remove.
    #[arg(required = true)]
    vgs: Vec<String>,
    #[command(flatten)]
    confirm: Confirm,
    #[command(flatten)]
    dev: DeviceArgs,
}

#[derive(Args)]
pub struct VgsArgs {
    /// Only these VGs.
    vgs: Vec<String>,
    #[command(flatten)]
    report: ReportArgs,
    #[command(flatten)]
    dev: DeviceArgs,
}

#[derive(Args)]
pub struct VgckArgs {
    /// VGs to check (all when none is named).
    vgs: Vec<String>,
    #[command(flatten)]
    dev: DeviceArgs,
}

#[derive(Args)]
pub struct VgcfgbackupArgs {
    /// The VG.
    vg: String,
    /// Write here (lvm2's default directory is /etc/lvm/backup).
    #[arg(short = 'f', long, value_name = "FILE")]
    file: PathBuf,
    #[command(flatten)]
    dev: DeviceArgs,
}

fn open_rw(p: &std::path::Path) -> Result<DeviceRef> {
    let opts = extents::OpenOptions {
        // lvm2's tools (and a scan of ours) may hold the device open too.
        exclusive: false,
        ..extents::OpenOptions::default()
    };
    let e =
        extents::FileExtent::open(p, opts).with_context(|| format!("opening {}", p.display()))?;
    Ok(std::sync::Arc::new(e))
}

pub fn vgcreate(a: VgcreateArgs) -> Result<()> {
    lvm::vgcreate::check_name("VG", &a.vg).map_err(anyhow::Error::msg)?;
    let extent = match &a.extent_size {
        Some(s) => {
            let b = parse_lvm_size(s, 'm')?;
            if b.0 < 1024 || !b.0.is_power_of_two() {
                bail!("-s {s}: the extent size must be a power of two of at least 1 KiB");
            }
            b.sectors_floor()
        }
        None => lvm::vgcreate::DEFAULT_EXTENT_SIZE,
    };
    let pvs = absolute(&a.pvs);
    let scan = Scan::run(&a.dev)?;
    if scan.report.vg(&a.vg).is_some() {
        bail!("A volume group called {} already exists.", a.vg);
    }
    let mut devs = Vec::new();
    let mut entries = Vec::new();
    for (i, p) in pvs.iter().enumerate() {
        let dev = open_rw(p)?;
        let label = match scan
            .device_index(p)
            .and_then(|k| scan.report.devices[k].label.clone())
        {
            Some(l) => {
                if let Some(vg) = scan.vg_of_pv(&l.pv_uuid) {
                    bail!(
                        "Physical volume '{}' is already in volume group '{}'",
                        p.display(),
                        vg.name()
                    );
                }
                l
            }
            None => {
                let l = lvm::pvcreate::pvcreate(dev.as_ref(), &Default::default())
                    .with_context(|| format!("{}", p.display()))?;
                println!(
                    "  Physical volume \"{}\" successfully created.",
                    p.display()
                );
                l
            }
        };
        let e = lvm::vgcreate::pv_entry(
            &format!("pv{i}"),
            &label,
            tables::BlockDevice::size(dev.as_ref()),
            extent,
            Some(p.display().to_string()),
        )
        .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
        entries.push(e);
        devs.push(dev);
    }
    let vg = lvm::vgcreate::new_vg(&a.vg, extent, entries);
    let md = Metadata::new(vg, format!("volmgr vgcreate {}", a.vg));
    lvm::commit::create(&devs, &md).with_context(|| format!("creating VG {}", a.vg))?;
    a.dev.remember(&pvs)?;
    println!("  Volume group \"{}\" successfully created", a.vg);
    Ok(())
}

pub fn vgremove(a: VgremoveArgs) -> Result<()> {
    let scan = Scan::run(&a.dev)?;
    for name in &a.vgs {
        let vg = scan.vg(name)?;
        let lvs = vg.metadata.vg.logical_volumes.len();
        if lvs > 0 && a.confirm.force == 0 {
            bail!(
                "Volume group \"{name}\" still contains {lvs} logical volume(s): remove them \
                 first, or add -f to remove them with it"
            );
        }
        if !vg.is_consistent() && a.confirm.force == 0 {
            bail!("Volume group \"{name}\" has problems (run vgck): add -f to remove it anyway");
        }
        // Every PV of the VG becomes an orphan: empty metadata area headers, then the label
        // without its "used" flag (lvm2's order).
        for pv in &vg.pvs {
            let Some(path) = pv.device.and_then(|i| scan.paths.get(i)) else {
                eprintln!(
                    "  WARNING: PV {} of {name} is missing; its copy stays",
                    pv.id
                );
                continue;
            };
            let dev = open_rw(path)?;
            let mut label = scan.report.devices[pv.device.unwrap_or(0)]
                .label
                .clone()
                .context("the scan found no label on it")?;
            for area in &label.metadata_areas {
                lvm::mda::write_header(dev.as_ref(), &MdaHeader::new(area), true)
                    .with_context(|| format!("{}: clearing its metadata area", path.display()))?;
            }
            if let Some(ext) = &mut label.extension {
                ext.flags &= !lvm::label::PV_EXT_USED;
            }
            lvm::label::write(dev.as_ref(), &label)
                .with_context(|| format!("{}: rewriting its label", path.display()))?;
        }
        println!("  Volume group \"{name}\" successfully removed");
    }
    Ok(())
}

const VG_FIELDS: &[Field] = &[
    Field {
        name: "vg_name",
        heading: "VG",
        kind: Kind::Text,
    },
    Field {
        name: "pv_count",
        heading: "#PV",
        kind: Kind::Number,
    },
    Field {
        name: "lv_count",
        heading: "#LV",
        kind: Kind::Number,
    },
    Field {
        name: "snap_count",
        heading: "#SN",
        kind: Kind::Number,
    },
    Field {
        name: "vg_attr",
        heading: "Attr",
        kind: Kind::Text,
    },
    Field {
        name: "vg_size",
        heading: "VSize",
        kind: Kind::Size,
    },
    Field {
        name: "vg_free",
        heading: "VFree",
        kind: Kind::Size,
    },
    Field {
        name: "vg_uuid",
        heading: "VG UUID",
        kind: Kind::Text,
    },
    Field {
        name: "vg_extent_size",
        heading: "Ext",
        kind: Kind::Size,
    },
    Field {
        name: "vg_extent_count",
        heading: "#Ext",
        kind: Kind::Number,
    },
    Field {
        name: "vg_free_count",
        heading: "Free",
        kind: Kind::Number,
    },
    Field {
        name: "vg_seqno",
        heading: "Seq",
        kind: Kind::Number,
    },
    Field {
        name: "vg_mda_count",
        heading: "#VMda",
        kind: Kind::Number,
    },
];
const VG_DEFAULT: &[&str] = &[
    "vg_name",
    "pv_count",
    "lv_count",
    "snap_count",
    "vg_attr",
    "vg_size",
    "vg_free",
];

pub fn vgs(a: VgsArgs) -> Result<()> {
    let scan = Scan::run(&a.dev)?;
    scan.warn();
    let mut vgs: Vec<&lvm::scan::ScannedVg> = scan
        .report
        .vgs
        .iter()
        .filter(|v| a.vgs.is_empty() || a.vgs.iter().any(|n| n == v.name()))
        .collect();
    for n in &a.vgs {
        if !vgs.iter().any(|v| v.name() == n) {
            eprintln!("  Volume group \"{n}\" not found");
        }
    }
    vgs.sort_by(|x, y| x.name().cmp(y.name()));
    a.report.print("vg", VG_FIELDS, VG_DEFAULT, &vgs, |sv, f| {
        let v = &sv.metadata.vg;
        let ext = v.extent_size.bytes().0;
        let count: u64 = v
            .physical_volumes
            .iter()
            .map(|p| u64::from(p.pe_count.0))
            .sum();
        let free = free_extents(v);
        match f {
            "vg_name" => Value::Text(v.name.clone()),
            "pv_count" => Value::Number(v.physical_volumes.len() as u64),
            "lv_count" => Value::Number(
                v.logical_volumes
                    .iter()
                    .filter(|l| l.status.has("VISIBLE"))
                    .count() as u64,
            ),
            "snap_count" => Value::Number(0),
            "vg_attr" => Value::Text(format!(
                "{}{}-{}n-",
                if v.status.has("WRITE") { 'w' } else { 'r' },
                if v.status.has("RESIZEABLE") { 'z' } else { '-' },
                if sv.pvs.iter().any(|p| p.device.is_none()) {
                    'p'
                } else {
                    '-'
                },
            )),
            "vg_size" => Value::Size(count * ext),
            "vg_free" => Value::Size(free * ext),
            "vg_uuid" => Value::Text(v.id.to_string()),
            "vg_extent_size" => Value::Size(ext),
            "vg_extent_count" => Value::Number(count),
            "vg_free_count" => Value::Number(free),
            "vg_seqno" => Value::Number(u64::from(v.seqno)),
            "vg_mda_count" => Value::Number((sv.current.len() + sv.stale.len()) as u64),
            _ => Value::Empty,
        }
    })
}

/// `vgck`: every copy of every VG's metadata read and compared; exit 1 on any problem.
pub fn vgck(a: VgckArgs) -> Result<()> {
    let scan = Scan::run(&a.dev)?;
    let mut bad = 0;
    for v in &scan.report.vgs {
        if !a.vgs.is_empty() && !a.vgs.iter().any(|n| n == v.name()) {
            continue;
        }
        for p in &v.problems {
            eprintln!("  {}: {p}", v.name());
            bad += 1;
        }
    }
    for n in &a.vgs {
        scan.vg(n)?;
    }
    if bad > 0 {
        bail!("{bad} problem(s) found");
    }
    Ok(())
}

pub fn vgcfgbackup(a: VgcfgbackupArgs) -> Result<()> {
    let scan = Scan::run(&a.dev)?;
    let v = scan.vg(&a.vg)?;
    let mut md = v.metadata.clone();
    md.description = format!("Created *after* executing 'volmgr vgcfgbackup {}'", a.vg);
    let text = md.to_text(Style::File).context("writing the backup text")?;
    std::fs::write(&a.file, text).with_context(|| format!("writing {}", a.file.display()))?;
    println!("  Volume group \"{}\" successfully backed up.", a.vg);
    Ok(())
}
