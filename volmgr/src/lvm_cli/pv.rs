//! `pvcreate`, `pvremove`, `pvresize`, `pvs`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use lvm::pvcreate::PvCreateOptions;
use tables::{BlockDevice, DeviceRef};

use super::report::{Field, Kind, Value};
use super::scan::{used_extents, Scan};
use super::{absolute, parse_lvm_size, Confirm, DeviceArgs, ReportArgs};

#[derive(Args)]
pub struct PvcreateArgs {
    /// Devices or files to initialize.
    #[arg(required = true, value_name = "PV")]
    pvs: Vec<PathBuf>,
    /// Size of the metadata area (lvm2's default 1m; rounded as lvm2 rounds it).
    #[arg(long, value_name = "SIZE")]
    metadatasize: Option<String>,
    /// Metadata areas on the PV: 0, 1 or 2.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pvmetadatacopies: u32,
    /// Align the start of the data area to this (lvm2's default 1m).
    #[arg(long, value_name = "SIZE")]
    dataalignment: Option<String>,
    /// The PV's uuid (one device only).
    #[arg(short = 'u', long, value_name = "UUID")]
    uuid: Option<String>,
    #[command(flatten)]
    confirm: Confirm,
    #[command(flatten)]
    dev: DeviceArgs,
}

#[derive(Args)]
pub struct PvremoveArgs {
    /// PVs to wipe the label of.
    #[arg(required = true, value_name = "PV")]
    pvs: Vec<PathBuf>,
    #[command(flatten)]
    confirm: Confirm,
    #[command(flatten)]
    dev: DeviceArgs,
}

#[derive(Args)]
pub struct PvresizeArgs {
    /// PVs to resize.
    #[arg(required = true, value_name = "PV")]
    pvs: Vec<PathBuf>,
    /// The size to use instead of the device's (to shrink a PV before its device shrinks).
    #[arg(long, value_name = "SIZE")]
    setphysicalvolumesize: Option<String>,
    #[command(flatten)]
    confirm: Confirm,
    #[command(flatten)]
    dev: DeviceArgs,
}

#[derive(Args)]
pub struct PvsArgs {
    /// Only these PVs.
    pvs: Vec<PathBuf>,
    #[command(flatten)]
    report: ReportArgs,
    #[command(flatten)]
    dev: DeviceArgs,
}

/// Signatures `pvcreate` refuses to write over without `-y` (what `wipefs` would see).
pub(crate) fn foreign_signature(dev: &dyn BlockDevice) -> Option<&'static str> {
    let mut b = vec![0u8; 8192];
    lvm::io::read_at(dev, 0, &mut b).ok()?;
    let at = |off: usize, magic: &[u8]| b.get(off..off + magic.len()) == Some(magic);
    if at(1080, &[0x53, 0xef]) {
        Some("ext2/3/4")
    } else if at(0, b"XFSB") {
        Some("xfs")
    } else if at(4086, b"SWAPSPACE2") || at(4086, b"SWAP-SPACE") {
        Some("swap")
    } else if at(0, b"LUKS\xba\xbe") {
        Some("crypto_LUKS")
    } else if at(512, b"EFI PART") {
        Some("gpt")
    } else if at(510, &[0x55, 0xaa]) {
        Some("dos partition table")
    } else if at(0, b"RSTRAID\x01") {
        Some("volmgr raid metadata")
    } else {
        None
    }
}

fn open_rw(p: &std::path::Path) -> Result<DeviceRef> {
    let exclusive = extents::OpenOptions::default().exclusive;
    lvm::scan::open_device(p, false, exclusive).with_context(|| format!("opening {}", p.display()))
}

pub fn pvcreate(a: PvcreateArgs) -> Result<()> {
    let mut opts = PvCreateOptions {
        metadata_copies: a.pvmetadatacopies,
        ..PvCreateOptions::default()
    };
    if let Some(s) = &a.metadatasize {
        opts.metadata_size = parse_lvm_size(s, 'm')?.sectors_ceil();
    }
    if let Some(s) = &a.dataalignment {
        opts.data_alignment = parse_lvm_size(s, 'k')?.sectors_ceil();
    }
    if let Some(u) = &a.uuid {
        if a.pvs.len() != 1 {
            bail!("--uuid needs exactly one device");
        }
        opts.uuid = Some(u.parse().map_err(|e| anyhow::anyhow!("--uuid {u}: {e}"))?);
    }
    let devices = absolute(&a.pvs);
    let scan = Scan::run(&a.dev)?;
    for p in &devices {
        scan.refuse_duplicate_device(p)?;
        if let Some(i) = scan.device_index(p) {
            if let Some(l) = &scan.report.devices[i].label {
                if let Some(vg) = scan.vg_of_pv(&l.pv_uuid) {
                    bail!(
                        "Can't initialize physical volume \"{}\" of volume group \"{}\": \
                         it is in use (vgreduce it first)",
                        p.display(),
                        vg.name()
                    );
                }
                if a.confirm.force == 0 {
                    bail!(
                        "{} is already a physical volume: add -f to initialize it again",
                        p.display()
                    );
                }
            }
        }
    }
    for p in &devices {
        let dev = open_rw(p)?;
        if let Some(sig) = foreign_signature(dev.as_ref()) {
            if !a.confirm.yes {
                bail!(
                    "{} has a {sig} signature: add -y to overwrite it (its data is lost)",
                    p.display()
                );
            }
        }
        lvm::pvcreate::pvcreate(dev.as_ref(), &opts).with_context(|| format!("{}", p.display()))?;
        if super::is_group(p) {
            // Written through one path: each other path must now show the same new PV.
            drop(dev);
            lvm::scan::open_paths(std::slice::from_ref(p), true).with_context(|| {
                format!("{}: checking the new PV through every path", p.display())
            })?;
        }
        println!(
            "  Physical volume \"{}\" successfully created.",
            p.display()
        );
    }
    a.dev.remember(&devices)
}

pub fn pvremove(a: PvremoveArgs) -> Result<()> {
    let devices = absolute(&a.pvs);
    let scan = Scan::run(&a.dev)?;
    // Before any label is wiped.
    for p in &devices {
        scan.refuse_duplicate_device(p)?;
    }
    for p in &devices {
        let label = scan
            .device_index(p)
            .and_then(|i| scan.report.devices[i].label.clone())
            .ok_or_else(|| anyhow::anyhow!("No PV found on device {}.", p.display()))?;
        if let Some(vg) = scan.vg_of_pv(&label.pv_uuid) {
            if a.confirm.force < 2 {
                bail!(
                    "PV {} is used by VG {}: remove it with vgreduce first (or -ff)",
                    p.display(),
                    vg.name()
                );
            }
        }
        let dev = open_rw(p)?;
        let zero = vec![0u8; 512];
        lvm::io::write_at(dev.as_ref(), label.sector * 512, &zero, true)
            .and_then(|()| lvm::io::flush(dev.as_ref()))
            .with_context(|| format!("wiping the label of {}", p.display()))?;
        println!(
            "  Labels on physical volume \"{}\" successfully wiped.",
            p.display()
        );
    }
    a.dev.forget(&devices)
}

pub fn pvresize(a: PvresizeArgs) -> Result<()> {
    super::vg::lvm_status(resize(&a))
}

fn resize(a: &PvresizeArgs) -> Result<()> {
    let size = match &a.setphysicalvolumesize {
        Some(s) => Some(parse_lvm_size(s, 'm')?),
        None => None,
    };
    let paths = absolute(&a.pvs);
    let mut done = 0;
    for p in &paths {
        // Each resize may write a VG version the next one builds on: scan each time.
        match resize_one(a, p, size) {
            Ok(()) => {
                done += 1;
                println!("  Physical volume \"{}\" changed", p.display());
            }
            Err(e) => eprintln!("  {e:#}"),
        }
    }
    println!(
        "  {done} physical volume(s) resized or updated / {} physical volume(s) not resized",
        paths.len() - done
    );
    if done < paths.len() {
        bail!("{} physical volume(s) not resized", paths.len() - done);
    }
    Ok(())
}

fn resize_one(a: &PvresizeArgs, p: &std::path::Path, size: Option<tables::Bytes>) -> Result<()> {
    let scan = Scan::run_writable(&a.dev)?;
    let shown = p.display();
    scan.refuse_duplicate_device(p)?;
    let i = scan
        .device_index(p)
        .filter(|&i| scan.report.devices[i].label.is_some())
        .ok_or_else(|| anyhow::anyhow!("Failed to find physical volume \"{shown}\"."))?;
    let real = scan.report.devices[i].size;
    let new = size.unwrap_or(real);
    if new > real {
        bail!(
            "{shown}: requested size {} exceeds real size {}: not done here (it would put \
             extents past the device's end)\n  Physical Volume {shown} not resized.",
            tables::units::human(new),
            tables::units::human(real)
        );
    }
    if new < real && !a.confirm.yes {
        bail!(
            "{shown}: requested size {} is less than real size {}: add -y to proceed\n  \
             Physical Volume {shown} not resized.",
            tables::units::human(new),
            tables::units::human(real)
        );
    }
    if new < real {
        eprintln!(
            "  WARNING: {shown}: Pretending size is {} not {} sectors.",
            new.0 / 512,
            real.0 / 512
        );
    }
    lvm::pvresize::pvresize(&scan.report, i, new, &super::vg::description())
        .map_err(|e| anyhow::anyhow!("{e}\n  Physical Volume {shown} not resized."))?;
    Ok(())
}

const PV_FIELDS: &[Field] = &[
    Field {
        name: "pv_name",
        heading: "PV",
        kind: Kind::Text,
    },
    Field {
        name: "vg_name",
        heading: "VG",
        kind: Kind::Text,
    },
    Field {
        name: "pv_fmt",
        heading: "Fmt",
        kind: Kind::Text,
    },
    Field {
        name: "pv_attr",
        heading: "Attr",
        kind: Kind::Text,
    },
    Field {
        name: "pv_size",
        heading: "PSize",
        kind: Kind::Size,
    },
    Field {
        name: "pv_free",
        heading: "PFree",
        kind: Kind::Size,
    },
    Field {
        name: "pv_uuid",
        heading: "PV UUID",
        kind: Kind::Text,
    },
    Field {
        name: "dev_size",
        heading: "DevSize",
        kind: Kind::Size,
    },
    Field {
        name: "pe_start",
        heading: "1st PE",
        kind: Kind::Size,
    },
    Field {
        name: "pv_pe_count",
        heading: "PE",
        kind: Kind::Number,
    },
    Field {
        name: "pv_pe_alloc_count",
        heading: "Alloc",
        kind: Kind::Number,
    },
    Field {
        name: "pv_mda_count",
        heading: "#PMda",
        kind: Kind::Number,
    },
    Field {
        name: "pv_tags",
        heading: "PV Tags",
        kind: Kind::Text,
    },
    Field {
        name: "pv_missing",
        heading: "Missing",
        kind: Kind::Text,
    },
    // Ours (lvm2 has no such field): the storage host, from a `host:` tag or the PV's URI.
    Field {
        name: "pv_host",
        heading: "Host",
        kind: Kind::Text,
    },
];
const PV_DEFAULT: &[&str] = &[
    "pv_name", "vg_name", "pv_fmt", "pv_attr", "pv_size", "pv_free",
];

/// One PV row.
struct PvRow {
    name: String,
    vg: String,
    attr: String,
    size: u64,
    free: u64,
    uuid: String,
    dev_size: u64,
    pe_start: u64,
    pe_count: u64,
    alloc: u64,
    mdas: u64,
    tags: String,
    missing: bool,
    host: String,
}

impl PvRow {
    /// The row of `pv` of `v` as its metadata describes it (`missing`: not on any scanned
    /// device, so the device's own fields are the metadata's).
    fn in_vg(v: &lvm::VolumeGroup, pv: &lvm::PhysicalVolume, name: String, missing: bool) -> PvRow {
        let ext = v.extent_size.bytes().0;
        let count = u64::from(pv.pe_count.0);
        let alloc = used_extents(v).get(&pv.key).copied().unwrap_or(0);
        let a = if pv.status.has("ALLOCATABLE") {
            'a'
        } else {
            '-'
        };
        PvRow {
            name,
            vg: v.name.clone(),
            attr: format!("{a}-{}", if missing { 'm' } else { '-' }),
            size: count * ext,
            free: count.saturating_sub(alloc) * ext,
            uuid: pv.id.to_string(),
            dev_size: pv.dev_size.map_or(0, |s| s.bytes().0),
            pe_start: pv.pe_start.bytes().0,
            pe_count: count,
            alloc,
            mdas: 0,
            tags: pv.tags().join(","),
            missing: missing || pv.is_missing(),
            host: pv.host().unwrap_or_default(),
        }
    }
}

pub fn pvs(a: PvsArgs) -> Result<()> {
    let scan = Scan::run(&a.dev)?;
    scan.warn();
    let only = absolute(&a.pvs);
    let mut rows = Vec::new();
    for (i, d) in scan.report.devices.iter().enumerate() {
        let Some(l) = &d.label else { continue };
        // The copy of a PV seen twice that is not used (the warning names it).
        if scan.is_unused_duplicate(i) {
            continue;
        }
        let path = &scan.paths[i];
        if !only.is_empty() && !only.iter().any(|p| scan.device_index(p) == Some(i)) {
            continue;
        }
        let pe_start = l.pe_start().map(|b| b.0).unwrap_or(0);
        let in_vg = scan
            .vg_of_pv(&l.pv_uuid)
            .and_then(|vg| vg.metadata.vg.pv_by_id(&l.pv_uuid).map(|pv| (vg, pv)));
        let row = match in_vg {
            Some((vg, pv)) => PvRow {
                dev_size: d.size.0,
                pe_start,
                mdas: l.metadata_areas.len() as u64,
                ..PvRow::in_vg(&vg.metadata.vg, pv, path.display().to_string(), false)
            },
            // An orphan's size is its label's (lvm2: pvresize may have set it smaller).
            None => PvRow {
                name: path.display().to_string(),
                vg: String::new(),
                attr: "---".into(),
                size: l.device_size.0.min(d.size.0),
                free: l.device_size.0.min(d.size.0),
                uuid: l.pv_uuid.to_string(),
                dev_size: d.size.0,
                pe_start,
                pe_count: 0,
                alloc: 0,
                mdas: l.metadata_areas.len() as u64,
                tags: String::new(),
                missing: false,
                host: lvm::hosts::uri_host(&path.display().to_string()).unwrap_or_default(),
            },
        };
        rows.push(row);
    }
    // PVs a VG lists that no scanned device carries: lvm2 shows them as `[unknown]`, `m` in
    // the attributes.
    if only.is_empty() {
        for vg in &scan.report.vgs {
            let v = &vg.metadata.vg;
            for vp in vg.pvs.iter().filter(|p| p.device.is_none()) {
                let Some(pv) = v.pv_by_key(&vp.key) else {
                    continue;
                };
                rows.push(PvRow::in_vg(v, pv, "[unknown]".into(), true));
            }
        }
    }
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    a.report
        .print("pv", PV_FIELDS, PV_DEFAULT, &rows, |r, f| match f {
            "pv_name" => Value::Text(r.name.clone()),
            "vg_name" => Value::Text(r.vg.clone()),
            "pv_fmt" => Value::Text("lvm2".into()),
            "pv_attr" => Value::Text(r.attr.clone()),
            "pv_size" => Value::Size(r.size),
            "pv_free" => Value::Size(r.free),
            "pv_uuid" => Value::Text(r.uuid.clone()),
            "dev_size" => Value::Size(r.dev_size),
            "pe_start" => Value::Size(r.pe_start),
            "pv_pe_count" => Value::Number(r.pe_count),
            "pv_pe_alloc_count" => Value::Number(r.alloc),
            "pv_mda_count" => Value::Number(r.mdas),
            "pv_tags" => Value::Text(r.tags.clone()),
            "pv_missing" => Value::Text(if r.missing { "missing" } else { "" }.into()),
            "pv_host" => Value::Text(r.host.clone()),
            _ => Value::Empty,
        })
}
