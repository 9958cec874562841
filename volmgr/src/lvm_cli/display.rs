//! `pvdisplay`, `vgdisplay`, `lvdisplay` in lvm2's layout (`lib/display/display.c`): the
//! `--- Physical volume ---` blocks with the same field names, order and spacing, sizes as
//! lvm2 shows them (`64.00 MiB`, `<2.00 GiB` when rounded up, `0   ` for nothing), `-c` colon
//! lines, `-m` maps (physical segments, LV segments) and `vgdisplay -v`. What only the kernel
//! knows is what the daemon says here: an LV is `available` when it is the daemon's device,
//! and its `Block device` is that device's.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use lvm::activate::dm_name;
use lvm::scan::ScannedVg;
use lvm::text::{Item, Value};
use lvm::{LogicalVolume, PhysicalVolume, SegmentKind, VolumeGroup};
use ublk_target::control::DeviceInfo;

use super::activate::daemon_devices;
use super::scan::{used_extents, Scan};
use super::{absolute, DeviceArgs};
use crate::client::StateDir;

#[derive(Args)]
pub struct PvdisplayArgs {
    /// Only these PVs.
    #[arg(value_name = "PV")]
    pvs: Vec<PathBuf>,
    /// Show each PV's segments: which LV extents its extents hold.
    #[arg(short = 'm', long, conflicts_with = "colon")]
    maps: bool,
    /// One line of colon-separated fields per PV.
    #[arg(short = 'c', long)]
    colon: bool,
    /// Only each device's free capacity.
    #[arg(short = 's', long, conflicts_with = "colon")]
    short: bool,
    #[command(flatten)]
    dev: DeviceArgs,
}

#[derive(Args)]
pub struct VgdisplayArgs {
    /// Only these VGs.
    vgs: Vec<String>,
    /// Also each LV and PV of the VG.
    #[arg(short = 'v', long)]
    verbose: bool,
    /// One line of colon-separated fields per VG.
    #[arg(short = 'c', long)]
    colon: bool,
    /// One line per VG: its size, used and free.
    #[arg(short = 's', long, conflicts_with = "colon")]
    short: bool,
    #[command(flatten)]
    dev: DeviceArgs,
    #[command(flatten)]
    sd: StateDir,
}

#[derive(Args)]
pub struct LvdisplayArgs {
    /// Only these VGs or VG/LV names.
    names: Vec<String>,
    /// Internal LVs too.
    #[arg(short = 'a', long)]
    all: bool,
    /// Show each LV's segments and where their extents are.
    #[arg(short = 'm', long, conflicts_with = "colon")]
    maps: bool,
    /// One line of colon-separated fields per LV.
    #[arg(short = 'c', long)]
    colon: bool,
    #[command(flatten)]
    dev: DeviceArgs,
    #[command(flatten)]
    sd: StateDir,
}

/// Collects lvm2's `log_print` lines: each indented by two spaces.
#[derive(Default)]
struct Out(String);

impl Out {
    fn line(&mut self, s: impl AsRef<str>) {
        let _ = writeln!(self.0, "  {}", s.as_ref());
    }
}

/// A size in bytes as lvm2's `display_size` writes it with its default units (`r`: human,
/// powers of 1024, `<` when the value was rounded up).
pub fn display_size(bytes: u64) -> String {
    const SUFFIX: [&str; 7] = [" EiB", " PiB", " TiB", " GiB", " MiB", " KiB", " B"];
    if bytes == 0 {
        return "0   ".into();
    }
    let mut unit: u64 = 1 << 60;
    let mut s = 0;
    while s < 6 && bytes < unit {
        unit >>= 10;
        s += 1;
    }
    let v = bytes as f64 / unit as f64;
    if s == 6 {
        return format!("{bytes}{}", SUFFIX[s]);
    }
    let d = 100.0 * v;
    let prefix = if d.floor() != d.round_ties_even() {
        "<"
    } else {
        ""
    };
    format!("{prefix}{v:.2}{}", SUFFIX[s])
}

/// Where lvm2 puts `/dev/VG/LV` (`$DM_DEV_DIR`, else `/dev`), with a trailing slash.
pub(crate) fn dev_dir() -> String {
    let mut d = std::env::var("DM_DEV_DIR").unwrap_or_else(|_| "/dev".into());
    if !d.ends_with('/') {
        d.push('/');
    }
    d
}

/// A PV as the display verbs see it.
struct PvView<'a> {
    path: String,
    uuid: String,
    /// Its VG and its entry there; `None` for an orphan.
    vg: Option<(&'a VolumeGroup, &'a PhysicalVolume)>,
    /// Sectors: the metadata's `dev_size`, or for an orphan its label's size.
    size: u64,
    alloc: u64,
}

/// The VGs in the order lvm2 processes them: lvm2's cache puts each VG first as its label
/// scan finds it, so the VG found last comes first (found: the first device, in scan order,
/// holding a copy of its metadata).
fn lvm2_order(scan: &Scan) -> Vec<&ScannedVg> {
    let mut vgs: Vec<&ScannedVg> = scan.report.vgs.iter().collect();
    let found = |v: &ScannedVg| {
        v.current
            .iter()
            .map(|c| c.0)
            .chain(v.stale.iter().map(|c| c.0))
            .min()
            .unwrap_or(0)
    };
    vgs.sort_by_key(|v| std::cmp::Reverse(found(v)));
    vgs
}

fn pv_views<'a>(scan: &'a Scan, only: &[PathBuf]) -> Vec<PvView<'a>> {
    let wanted = |i: usize| only.is_empty() || only.iter().any(|p| scan.device_index(p) == Some(i));
    let mut out = Vec::new();
    // PVs of each VG, in the VG's order; then the orphans, in device order.
    for sv in lvm2_order(scan) {
        let vg = &sv.metadata.vg;
        let used = used_extents(vg);
        for p in &sv.pvs {
            let (Some(i), Some(pv)) = (p.device, vg.pv_by_id(&p.id)) else {
                continue;
            };
            if !wanted(i) {
                continue;
            }
            let d = &scan.report.devices[i];
            out.push(PvView {
                path: scan.paths[i].display().to_string(),
                uuid: pv.id.to_string(),
                size: pv.dev_size.map_or(d.size.0 / 512, |s| s.0),
                alloc: used.get(&pv.key).copied().unwrap_or(0),
                vg: Some((vg, pv)),
            });
        }
    }
    for (i, d) in scan.report.devices.iter().enumerate() {
        let Some(l) = &d.label else { continue };
        if !wanted(i) || scan.vg_of_pv(&l.pv_uuid).is_some() || scan.is_unused_duplicate(i) {
            continue;
        }
        out.push(PvView {
            path: scan.paths[i].display().to_string(),
            uuid: l.pv_uuid.to_string(),
            size: l.device_size.0.min(d.size.0) / 512,
            alloc: 0,
            vg: None,
        });
    }
    out
}

/// `pvdisplay_full`.
fn pv_full(o: &mut Out, p: &PvView<'_>) {
    let (pe_size, pe_count, pe_start) = match p.vg {
        Some((vg, pv)) => (vg.extent_size.0, u64::from(pv.pe_count.0), pv.pe_start.0),
        None => (0, 0, 0),
    };
    o.line(format!(
        "--- {}Physical volume ---",
        if pe_size > 0 { "" } else { "NEW " }
    ));
    o.line(format!("PV Name               {}", p.path));
    let (vg_name, exported) = match p.vg {
        Some((vg, _)) => (vg.name.as_str(), vg.status.has("EXPORTED")),
        None => ("", false),
    };
    o.line(format!(
        "VG Name               {vg_name}{}",
        if exported { " (exported)" } else { "" }
    ));
    let data = pe_count.saturating_mul(pe_size);
    let (pvsize, unusable) = if p.size > data.saturating_add(pe_start) {
        (p.size, p.size - data)
    } else {
        let s = data.saturating_add(pe_start);
        (s, s - p.size)
    };
    if data > 0 {
        o.line(format!(
            "PV Size               {} / not usable {}",
            display_size(pvsize.saturating_mul(512)),
            display_size(unusable.saturating_mul(512))
        ));
    } else {
        o.line(format!(
            "PV Size               {}",
            display_size(pvsize.saturating_mul(512))
        ));
    }
    let free = pe_count.saturating_sub(p.alloc);
    let allocatable = p.vg.is_some_and(|(_, pv)| pv.status.has("ALLOCATABLE"));
    if pe_count > 0 && allocatable {
        o.line(format!(
            "Allocatable           yes {}",
            if free == 0 { "(but full)" } else { "" }
        ));
    } else {
        o.line("Allocatable           NO");
    }
    o.line(format!(
        "PE Size               {}",
        display_size(pe_size.saturating_mul(512))
    ));
    o.line(format!("Total PE              {pe_count}"));
    o.line(format!("Free PE               {free}"));
    o.line(format!("Allocated PE          {}", p.alloc));
    o.line(format!("PV UUID               {}", p.uuid));
    o.line(" ");
}

/// `pvdisplay_segments`: the PV's extents in runs, each an LV segment's or free.
fn pv_segments(o: &mut Out, p: &PvView<'_>) {
    let Some((vg, pv)) = p.vg else {
        o.line(" ");
        return;
    };
    o.line("--- Physical Segments ---");
    // (first PE, length, LV, first LE of the LV segment, its length)
    let mut runs: Vec<(u64, u64, &str, u64, u64)> = Vec::new();
    for lv in &vg.logical_volumes {
        for seg in &lv.segments {
            let (SegmentKind::Striped { stripes, .. }, Some(len)) = (&seg.kind, seg.area_len())
            else {
                continue;
            };
            for a in stripes.iter().filter(|a| a.volume == pv.key) {
                runs.push((
                    u64::from(a.start.0),
                    u64::from(len.0),
                    &lv.name,
                    u64::from(seg.start_extent.0),
                    u64::from(seg.extent_count.0),
                ));
            }
        }
    }
    runs.sort();
    let mut at = 0u64;
    let count = u64::from(pv.pe_count.0);
    let free = |o: &mut Out, from: u64, to: u64| {
        o.line(format!("Physical extent {from} to {}:", to - 1));
        o.line("  FREE");
    };
    for (pe, len, lv, le, le_len) in runs {
        if pe > at {
            free(o, at, pe);
        }
        o.line(format!(
            "Physical extent {pe} to {}:",
            (pe + len).saturating_sub(1)
        ));
        o.line(format!("  Logical volume\t{}{}/{lv}", dev_dir(), vg.name));
        o.line(format!(
            "  Logical extents\t{le} to {}",
            (le + le_len).saturating_sub(1)
        ));
        at = at.max(pe + len);
    }
    if at < count {
        free(o, at, count);
    }
    o.line(" ");
}

/// `pvdisplay_colons`.
fn pv_colons(o: &mut Out, p: &PvView<'_>) {
    let (vg, status, pe_size, pe_count) = match p.vg {
        Some((vg, pv)) => (
            vg.name.as_str(),
            if pv.status.has("ALLOCATABLE") { 8 } else { 0 },
            vg.extent_size.0,
            u64::from(pv.pe_count.0),
        ),
        None => ("", 0, 0, 0),
    };
    o.line(format!(
        "{}:{vg}:{}:-1:{status}:{status}:-1:{}:{pe_count}:{}:{}:{}",
        p.path,
        p.size,
        pe_size / 2,
        pe_count.saturating_sub(p.alloc),
        p.alloc,
        p.uuid
    ));
}

pub fn pvdisplay(a: PvdisplayArgs) -> Result<()> {
    let scan = Scan::run(&a.dev)?;
    scan.warn();
    let only = absolute(&a.pvs);
    for p in &only {
        let is_pv = scan
            .device_index(p)
            .is_some_and(|i| scan.report.devices[i].label.is_some());
        if !is_pv {
            eprintln!("  Failed to find physical volume \"{}\".", p.display());
        }
    }
    let views = pv_views(&scan, &only);
    let mut o = Out::default();
    for p in &views {
        let free = match p.vg {
            Some((vg, pv)) => u64::from(pv.pe_count.0)
                .saturating_sub(p.alloc)
                .saturating_mul(vg.extent_size.0),
            None => p.size,
        };
        if a.short {
            o.line(format!(
                "Device \"{}\" has a capacity of {}",
                p.path,
                display_size(free.saturating_mul(512))
            ));
            continue;
        }
        if p.vg.is_none() {
            o.line(format!(
                "\"{}\" is a new physical volume of \"{}\"",
                p.path,
                display_size(free.saturating_mul(512))
            ));
        }
        if a.colon {
            pv_colons(&mut o, p);
            continue;
        }
        pv_full(&mut o, p);
        if a.maps {
            pv_segments(&mut o, p);
        }
    }
    print!("{}", o.0);
    Ok(())
}

/// VG figures: extents, free extents, PVs present, metadata areas.
struct VgFigures {
    extents: u64,
    free: u64,
    present: u64,
    mdas: u64,
}

fn figures(scan: &Scan, sv: &ScannedVg) -> VgFigures {
    let vg = &sv.metadata.vg;
    let extents: u64 = vg
        .physical_volumes
        .iter()
        .map(|p| u64::from(p.pe_count.0))
        .sum();
    let present: Vec<usize> = sv.pvs.iter().filter_map(|p| p.device).collect();
    let mdas = present
        .iter()
        .filter_map(|&i| scan.report.devices[i].label.as_ref())
        .map(|l| l.metadata_areas.len() as u64)
        .sum();
    VgFigures {
        extents,
        free: super::scan::free_extents(vg),
        present: present.len() as u64,
        mdas,
    }
}

fn visible_lvs(vg: &VolumeGroup) -> u64 {
    vg.logical_volumes
        .iter()
        .filter(|l| l.status.has("VISIBLE"))
        .count() as u64
}

/// `vgdisplay_full`.
fn vg_full(o: &mut Out, sv: &ScannedVg, f: &VgFigures) {
    let vg = &sv.metadata.vg;
    let ext = vg.extent_size.0;
    let system_id = vg.extra.iter().find_map(|(k, i)| match (k.as_str(), i) {
        ("system_id", Item::Value(Value::Str(s))) => Some(s.as_str()),
        _ => None,
    });
    o.line("--- Volume group ---");
    o.line(format!("VG Name               {}", vg.name));
    o.line(format!("System ID             {}", system_id.unwrap_or("")));
    o.line(format!(
        "Format                {}",
        vg.format.as_deref().unwrap_or("lvm2")
    ));
    o.line(format!("Metadata Areas        {}", f.mdas));
    o.line(format!("Metadata Sequence No  {}", vg.seqno));
    let access = match (vg.status.has("READ"), vg.status.has("WRITE")) {
        (true, true) => "read/write",
        (true, false) => "read",
        (false, true) => "write",
        (false, false) => "error",
    };
    o.line(format!("VG Access             {access}"));
    o.line(format!(
        "VG Status             {}{}resizable",
        if vg.status.has("EXPORTED") {
            "exported/"
        } else {
            ""
        },
        if vg.status.has("RESIZEABLE") {
            ""
        } else {
            "NOT "
        }
    ));
    o.line(format!("MAX LV                {}", vg.max_lv));
    o.line(format!("Cur LV                {}", visible_lvs(vg)));
    o.line("Open LV               0");
    o.line(format!("Max PV                {}", vg.max_pv));
    o.line(format!(
        "Cur PV                {}",
        vg.physical_volumes.len()
    ));
    o.line(format!("Act PV                {}", f.present));
    let size = |n: u64| display_size(n.saturating_mul(ext).saturating_mul(512));
    o.line(format!("VG Size               {}", size(f.extents)));
    o.line(format!("PE Size               {}", size(1)));
    o.line(format!("Total PE              {}", f.extents));
    let alloc = f.extents.saturating_sub(f.free);
    o.line(format!("Alloc PE / Size       {alloc} / {}", size(alloc)));
    o.line(format!(
        "Free  PE / Size       {} / {}",
        f.free,
        size(f.free)
    ));
    o.line(format!("VG UUID               {}", vg.id));
    o.line(" ");
}

/// `vgdisplay_colons`.
fn vg_colons(o: &mut Out, sv: &ScannedVg, f: &VgFigures) {
    let vg = &sv.metadata.vg;
    let has = |flag: &str, bit: u64| if vg.status.has(flag) { bit } else { 0 };
    let status =
        has("EXPORTED", 0x2) | has("RESIZEABLE", 0x4) | has("READ", 0x100) | has("WRITE", 0x200);
    let access = match (vg.status.has("READ"), vg.status.has("WRITE")) {
        (true, true) => "r/w",
        (true, false) => "r",
        (false, true) => "w",
        (false, false) => "",
    };
    let ext_k = vg.extent_size.0 / 2;
    o.line(format!(
        "{}:{access}:{status}:-1:{}:{}:0:-1:{}:{}:{}:{}:{ext_k}:{}:{}:{}:{}",
        vg.name,
        vg.max_lv,
        visible_lvs(vg),
        vg.max_pv,
        vg.physical_volumes.len(),
        f.present,
        f.extents.saturating_mul(ext_k),
        f.extents,
        f.extents.saturating_sub(f.free),
        f.free,
        vg.id
    ));
}

/// `pvdisplay_short`, for `vgdisplay -v`.
fn pv_short(o: &mut Out, p: &PvView<'_>) {
    let (pe_count, allocatable) = match p.vg {
        Some((_, pv)) => (u64::from(pv.pe_count.0), pv.status.has("ALLOCATABLE")),
        None => (0, false),
    };
    o.line(format!("PV Name               {}     ", p.path));
    o.line(format!("PV UUID               {}", p.uuid));
    o.line(format!(
        "PV Status             {}allocatable",
        if allocatable { "" } else { "NOT " }
    ));
    o.line(format!(
        "Total PE / Free PE    {pe_count} / {}",
        pe_count.saturating_sub(p.alloc)
    ));
    o.line(" ");
}

fn selected_vgs<'a>(scan: &'a Scan, names: &[String]) -> Vec<&'a ScannedVg> {
    for n in names {
        if scan.report.vg(n).is_none() {
            eprintln!("  Volume group \"{n}\" not found");
        }
    }
    lvm2_order(scan)
        .into_iter()
        .filter(|v| names.is_empty() || names.iter().any(|n| n == v.name()))
        .collect()
}

pub fn vgdisplay(a: VgdisplayArgs) -> Result<()> {
    let scan = Scan::run(&a.dev)?;
    scan.warn();
    let running = daemon_devices(&a.sd);
    let mut o = Out::default();
    for sv in selected_vgs(&scan, &a.vgs) {
        let f = figures(&scan, sv);
        let vg = &sv.metadata.vg;
        if a.colon {
            vg_colons(&mut o, sv, &f);
            continue;
        }
        if a.short {
            let ext = vg.extent_size.0.saturating_mul(512);
            let alloc = f.extents.saturating_sub(f.free);
            o.line(format!(
                "\"{}\" {:<9} [{:<9} used / {} free]",
                vg.name,
                display_size(f.extents.saturating_mul(ext)),
                display_size(alloc.saturating_mul(ext)),
                display_size(f.free.saturating_mul(ext))
            ));
            continue;
        }
        vg_full(&mut o, sv, &f);
        if a.verbose {
            for lv in vg.logical_volumes.iter() {
                lv_full(&mut o, vg, lv, &running);
            }
            o.line("--- Physical volumes ---");
            let views = pv_views(&scan, &[]);
            for p in views
                .iter()
                .filter(|p| p.vg.is_some_and(|(v, _)| v.id == vg.id))
            {
                pv_short(&mut o, p);
            }
        }
    }
    print!("{}", o.0);
    Ok(())
}

/// `read_ahead` of an LV in sectors: `None` for auto (the default, or "auto").
fn read_ahead(lv: &LogicalVolume) -> Option<u64> {
    lv.extra.iter().find_map(|(k, i)| match (k.as_str(), i) {
        ("read_ahead", Item::Value(Value::Int(n))) => u64::try_from(*n).ok(),
        _ => None,
    })
}

fn allocation(lv: &LogicalVolume) -> &str {
    lv.extra
        .iter()
        .find_map(|(k, i)| match (k.as_str(), i) {
            ("allocation_policy", Item::Value(Value::Str(s))) => Some(s.as_str()),
            _ => None,
        })
        .unwrap_or("inherit")
}

/// `creation_time` as lvm2 shows it: local time, `%Y-%m-%d %H:%M:%S %z`.
fn local_time(secs: u64) -> String {
    let Ok(t) = libc::time_t::try_from(secs) else {
        return String::new();
    };
    // SAFETY: an all-zero `tm` is a valid value of this plain C struct.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are to live, properly aligned values for the call's duration.
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return String::new();
    }
    let mut buf = [0u8; 64];
    let fmt = c"%Y-%m-%d %H:%M:%S %z";
    // SAFETY: `buf` is writable for its length, `fmt` is NUL-terminated and `tm` was filled
    // by localtime_r; strftime writes at most `buf.len()` bytes and returns how many.
    let n = unsafe { libc::strftime(buf.as_mut_ptr().cast(), buf.len(), fmt.as_ptr(), &tm) };
    String::from_utf8_lossy(&buf[..n.min(buf.len())]).into_owned()
}

/// `lvdisplay_full`.
fn lv_full(
    o: &mut Out,
    vg: &VolumeGroup,
    lv: &LogicalVolume,
    running: &HashMap<String, DeviceInfo>,
) {
    let active = running.get(&dm_name(&vg.name, &lv.name));
    let extents = lv.extent_count().map_or(0, |e| u64::from(e.0));
    o.line("--- Logical volume ---");
    if lv.status.has("VISIBLE") {
        o.line(format!(
            "LV Path                {}{}/{}",
            dev_dir(),
            vg.name,
            lv.name
        ));
        o.line(format!("LV Name                {}", lv.name));
    } else {
        o.line(format!("Internal LV Name       {}", lv.name));
    }
    o.line(format!("VG Name                {}", vg.name));
    o.line(format!("LV UUID                {}", lv.id));
    o.line(format!(
        "LV Write Access        {}",
        if lv.status.has("WRITE") {
            "read/write"
        } else {
            "read only"
        }
    ));
    o.line(format!(
        "LV Creation host, time {}, {}",
        lv.creation_host.as_deref().unwrap_or(""),
        lv.creation_time.map(local_time).unwrap_or_default()
    ));
    let available = active.is_some_and(|d| d.state == "active");
    match active {
        Some(d) if d.state == "suspended" => o.line("LV Status              suspended"),
        _ => o.line(format!(
            "LV Status              {}available",
            if available { "" } else { "NOT " }
        )),
    }
    o.line(format!(
        "LV Size                {}",
        display_size(extents.saturating_mul(vg.extent_size.bytes().0))
    ));
    o.line(format!("Current LE             {extents}"));
    o.line(format!("Segments               {}", lv.segments.len()));
    o.line(format!("Allocation             {}", allocation(lv)));
    match read_ahead(lv) {
        None => o.line("Read ahead sectors     auto"),
        Some(n) => o.line(format!("Read ahead sectors     {n}")),
    }
    if let Some(d) = active {
        o.line(format!("Block device           {}", block_device(&d.path)));
    }
    o.line(" ");
}

/// `MAJOR:MINOR` of a device node, else the path (an NBD export).
fn block_device(path: &str) -> String {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_block_device() => {
            let rdev = m.rdev();
            format!("{}:{}", libc::major(rdev), libc::minor(rdev))
        }
        _ => path.to_string(),
    }
}

/// Whether lvm2 calls the LV virtual: a segment of a type with no data area of its own.
fn is_virtual(lv: &LogicalVolume) -> bool {
    lv.segments.iter().any(|s| {
        matches!(&s.kind, SegmentKind::Other { segtype }
            if ["zero", "error", "free", "thin", "vdo"].contains(&segtype.as_str()))
    })
}

/// `lvdisplay_segments`.
fn lv_segments(o: &mut Out, scan: &Scan, vg: &VolumeGroup, lv: &LogicalVolume) {
    o.line("--- Segments ---");
    for seg in &lv.segments {
        let first = u64::from(seg.start_extent.0);
        let last = (first + u64::from(seg.extent_count.0)).saturating_sub(1);
        o.line(format!(
            "{} extents {first} to {last}:",
            if is_virtual(lv) { "Virtual" } else { "Logical" }
        ));
        let pv_line = |o: &mut Out, pre: &str, a: &lvm::model::Area, len: u32| {
            let path = vg
                .pv_by_key(&a.volume)
                .and_then(|pv| scan.pv_path(&pv.id))
                .map(|p| p.display().to_string());
            match path {
                Some(p) => {
                    o.line(format!("{pre}Physical volume\t{p}"));
                    o.line(format!(
                        "{pre}Physical extents\t{} to {}",
                        a.start.0,
                        (u64::from(a.start.0) + u64::from(len)).saturating_sub(1)
                    ));
                }
                None => o.line(format!("{pre}Physical volume\tMissing")),
            }
        };
        match &seg.kind {
            SegmentKind::Striped {
                stripe_size,
                stripes,
            } => {
                let len = seg.area_len().map_or(0, |l| l.0);
                if stripes.len() == 1 {
                    o.line("  Type\t\tlinear");
                    pv_line(o, "  ", &stripes[0], len);
                } else {
                    o.line("  Type\t\tstriped");
                    o.line(format!("  Stripes\t\t{}", stripes.len()));
                    o.line(format!(
                        "  Stripe size\t\t{}",
                        display_size(stripe_size.map_or(0, |s| s.bytes().0))
                    ));
                    for (i, a) in stripes.iter().enumerate() {
                        o.line(format!("  Stripe {i}:"));
                        pv_line(o, "    ", a, len);
                    }
                }
                // lvm2's striped type ends its part with a blank line; others have none.
                o.line(" ");
            }
            SegmentKind::Other { segtype } => o.line(format!("  Type\t\t{segtype}")),
        }
    }
    o.line(" ");
}

/// `lvdisplay_colons`.
fn lv_colons(o: &mut Out, vg: &VolumeGroup, lv: &LogicalVolume, active: Option<&DeviceInfo>) {
    let access = u8::from(lv.status.has("READ")) | (u8::from(lv.status.has("WRITE")) << 1);
    let extents = lv.extent_count().map_or(0, |e| u64::from(e.0));
    let contiguous = if allocation(lv) == "contiguous" { 2 } else { 0 };
    let read_ahead = read_ahead(lv).map_or("-1".to_string(), |n| n.to_string());
    let (major, minor) = match active.map(|d| block_device(&d.path)) {
        Some(mm) if mm.contains(':') && !mm.contains('/') => {
            let (a, b) = mm.split_once(':').unwrap_or(("-1", "-1"));
            (a.to_string(), b.to_string())
        }
        _ => ("-1".into(), "-1".into()),
    };
    o.line(format!(
        "{}{}/{}:{}:{access}:{}:-1:0:{}:{extents}:-1:{contiguous}:{read_ahead}:{major}:{minor}",
        dev_dir(),
        vg.name,
        lv.name,
        vg.name,
        u8::from(active.is_some()),
        extents.saturating_mul(vg.extent_size.0),
    ));
}

pub fn lvdisplay(a: LvdisplayArgs) -> Result<()> {
    let scan = Scan::run(&a.dev)?;
    scan.warn();
    let running = daemon_devices(&a.sd);
    let mut o = Out::default();
    for n in &a.names {
        let vg = n.split('/').next().unwrap_or(n);
        if scan.report.vg(vg).is_none() {
            eprintln!("  Volume group \"{vg}\" not found");
        }
    }
    for sv in lvm2_order(&scan) {
        let vg = &sv.metadata.vg;
        for lv in &vg.logical_volumes {
            if !a.all && !lv.status.has("VISIBLE") {
                continue;
            }
            if !super::lv_wanted(&a.names, &vg.name, &lv.name) {
                continue;
            }
            if a.colon {
                lv_colons(&mut o, vg, lv, running.get(&dm_name(&vg.name, &lv.name)));
                continue;
            }
            lv_full(&mut o, vg, lv, &running);
            if a.maps {
                lv_segments(&mut o, &scan, vg, lv);
            }
        }
    }
    print!("{}", o.0);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::display_size;

    #[test]
    fn sizes_as_lvm2_displays_them() {
        assert_eq!(display_size(0), "0   ");
        assert_eq!(display_size(64 << 20), "64.00 MiB");
        assert_eq!(display_size(64 << 10), "64.00 KiB");
        assert_eq!(display_size(512), "512 B");
        assert_eq!(display_size(3 << 29), "1.50 GiB");
        // 2043 MiB is 1.995 GiB: shown rounded up, marked.
        assert_eq!(display_size(2043 << 20), "<2.00 GiB");
        assert_eq!(display_size((63 << 20) + (1 << 19)), "63.50 MiB");
    }
}
