//! Finding VGs on devices, as LVM2's label scan and `vg_read` do, and saying precisely what
//! is wrong with what is not used.
//!
//! For every device: the label (sectors 0-3), each metadata area's header, and the committed
//! copy of the text in each area, checked (crc) and parsed. Copies are grouped by VG uuid; the
//! valid copy with the highest seqno is the VG. Everything else becomes a [`Problem`]: a bad
//! label, header or text (device, field, byte offset), a stale copy, two different texts with
//! the same seqno, a PV uuid on two devices, a PV of the VG that is missing or claimed by
//! another VG, a device too small for the extents the metadata gives it.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use tables::{Bytes, DeviceRef};

use crate::io::DevIoError;
use crate::label::{self, DiskArea, FindLabelError, Label, LabelError};
use crate::mda::{self, MdaError, MdaHeader, MdaIoError, RawLocn};
use crate::model::{Metadata, MetadataError};
use crate::uuid::Uuid;

/// One valid copy of metadata text found in a metadata area.
#[derive(Clone, Debug)]
pub struct FoundText {
    /// Where it is in its area.
    pub locn: RawLocn,
    /// The bytes (trailing NUL included).
    pub text: Vec<u8>,
    /// What it says.
    pub metadata: Metadata,
}

/// A metadata area of a PV as scanned.
#[derive(Clone, Debug)]
pub struct MdaScan {
    /// Where the area is (from the label).
    pub area: DiskArea,
    /// Its header, if it could be read and checked.
    pub header: Option<MdaHeader>,
    /// The committed copy, if there is one and it is valid.
    pub text: Option<FoundText>,
}

impl MdaScan {
    /// Whether the area is marked ignored (not used for metadata).
    pub fn ignored(&self) -> bool {
        self.header.as_ref().is_some_and(|h| h.ignored())
    }
}

/// A device as scanned.
#[derive(Clone)]
pub struct DeviceScan {
    /// The device.
    pub dev: DeviceRef,
    /// Its name.
    pub name: String,
    /// Its size.
    pub size: Bytes,
    /// Its PV label, if it has a valid one.
    pub label: Option<Label>,
    /// Its metadata areas, in label order.
    pub mdas: Vec<MdaScan>,
}

impl fmt::Debug for DeviceScan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceScan")
            .field("name", &self.name)
            .field("size", &self.size)
            .field("label", &self.label)
            .field("mdas", &self.mdas)
            .finish()
    }
}

/// A PV the VG's metadata lists, and where it was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VgPv {
    /// Its key in the metadata (`pv0`).
    pub key: String,
    /// Its uuid.
    pub id: Uuid,
    /// Index in [`ScanReport::devices`] of the device carrying it, if found.
    pub device: Option<usize>,
}

/// A VG found by the scan: its newest valid metadata and where the copies are.
#[derive(Clone, Debug)]
pub struct ScannedVg {
    /// The newest valid metadata.
    pub metadata: Metadata,
    /// Its text, as read (trailing NUL included).
    pub text: Vec<u8>,
    /// The PVs it lists.
    pub pvs: Vec<VgPv>,
    /// Copies of the newest text: (device index, metadata area index).
    pub current: Vec<(usize, usize)>,
    /// Older copies: (device index, metadata area index, their seqno).
    pub stale: Vec<(usize, usize, u32)>,
    /// What is wrong with this VG (also in [`ScanReport::problems`]).
    pub problems: Vec<Problem>,
}

impl ScannedVg {
    /// The VG's name.
    pub fn name(&self) -> &str {
        &self.metadata.vg.name
    }
    /// The VG's uuid.
    pub fn id(&self) -> Uuid {
        self.metadata.vg.id
    }
    /// The newest seqno.
    pub fn seqno(&self) -> u32 {
        self.metadata.vg.seqno
    }
    /// Whether every PV is present and every copy is current and agrees.
    pub fn is_consistent(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Something the scan found wrong. Every variant names the device (or devices), and the byte
/// offset where it applies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// A device could not be read.
    Unreadable(DevIoError),
    /// A label is damaged (bad crc, wrong sector, areas outside the device...).
    BadLabel(LabelError),
    /// A metadata area header or text is damaged (bad crc, magic, location...).
    BadMetadataArea(MdaError),
    /// A copy of the text passed its crc but does not parse or is not a valid VG.
    BadText {
        /// Device name.
        device: String,
        /// Byte offset of the text on the device.
        offset: u64,
        /// What is wrong.
        error: MetadataError,
    },
    /// An area has precommitted text that was never committed (an update was interrupted
    /// between its two header writes).
    Uncommitted {
        /// Device name.
        device: String,
        /// Byte offset of the area's header.
        area: u64,
    },
    /// A copy older than the VG's newest.
    Stale {
        /// VG name.
        vg: String,
        /// Device name.
        device: String,
        /// Byte offset of the area's header.
        area: u64,
        /// Its seqno.
        seqno: u32,
        /// The newest seqno.
        newest: u32,
    },
    /// Two valid copies with the same seqno but different text.
    SeqnoConflict {
        /// VG name.
        vg: String,
        /// The seqno.
        seqno: u32,
        /// Devices (with area offsets) holding the copy not used.
        devices: Vec<(String, u64)>,
    },
    /// The same PV uuid on two or more devices (the first is used).
    DuplicatePv {
        /// The PV uuid.
        id: Uuid,
        /// The devices.
        devices: Vec<String>,
    },
    /// Two VGs with the same name.
    DuplicateVgName {
        /// The name.
        name: String,
        /// Their uuids.
        ids: Vec<Uuid>,
    },
    /// A PV the VG lists was not found on any device.
    MissingPv {
        /// VG name.
        vg: String,
        /// PV uuid.
        id: Uuid,
        /// The `device` hint the metadata records.
        hint: Option<String>,
    },
    /// A PV the VG lists carries the newest metadata of another VG.
    PvOfOtherVg {
        /// The VG that lists it.
        vg: String,
        /// Device name.
        device: String,
        /// PV uuid.
        id: Uuid,
        /// The VG its own metadata areas name.
        other: String,
    },
    /// A device carries metadata of a VG whose newest metadata does not list its PV.
    NotInVg {
        /// VG name.
        vg: String,
        /// Device name.
        device: String,
        /// PV uuid.
        id: Uuid,
    },
    /// A PV's extents, per the metadata, end past the device.
    PvTooSmall {
        /// VG name.
        vg: String,
        /// Device name.
        device: String,
        /// Byte where its last extent ends.
        needs: u64,
        /// Device size.
        size: u64,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Unreadable(e) => write!(f, "{e}"),
            Problem::BadLabel(e) => write!(f, "{e}"),
            Problem::BadMetadataArea(e) => write!(f, "{e}"),
            Problem::BadText {
                device,
                offset,
                error,
            } => write!(f, "{device}: metadata text at byte {offset}: {error}"),
            Problem::Uncommitted { device, area } => write!(
                f,
                "{device}: metadata area at byte {area} holds precommitted metadata that was \
                 never committed (an update was interrupted)"
            ),
            Problem::Stale {
                vg,
                device,
                area,
                seqno,
                newest,
            } => write!(
                f,
                "{device}: metadata area at byte {area} has seqno {seqno} of VG {vg}, the \
                 newest is {newest}"
            ),
            Problem::SeqnoConflict { vg, seqno, devices } => {
                let list: Vec<String> = devices
                    .iter()
                    .map(|(d, a)| format!("{d} (area at byte {a})"))
                    .collect();
                write!(
                    f,
                    "VG {vg}: seqno {seqno} has a different text on {}",
                    list.join(", ")
                )
            }
            Problem::DuplicatePv { id, devices } => write!(
                f,
                "PV {id} is on more than one device: {} (using the first)",
                devices.join(", ")
            ),
            Problem::DuplicateVgName { name, ids } => {
                let ids: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
                write!(f, "two VGs are named {name}: {}", ids.join(", "))
            }
            Problem::MissingPv { vg, id, hint } => write!(
                f,
                "VG {vg}: PV {id} (last seen as {}) was not found",
                hint.as_deref().unwrap_or("unknown device")
            ),
            Problem::PvOfOtherVg {
                vg,
                device,
                id,
                other,
            } => write!(
                f,
                "{device}: PV {id} is listed by VG {vg} but its metadata belongs to VG {other}"
            ),
            Problem::NotInVg { vg, device, id } => write!(
                f,
                "{device}: PV {id} carries metadata of VG {vg}, which no longer lists it"
            ),
            Problem::PvTooSmall {
                vg,
                device,
                needs,
                size,
            } => write!(
                f,
                "{device}: VG {vg} puts extents up to byte {needs}, the device has {size} bytes"
            ),
        }
    }
}

/// Everything a scan found.
#[derive(Clone, Debug, Default)]
pub struct ScanReport {
    /// Every device scanned, in the order given.
    pub devices: Vec<DeviceScan>,
    /// The VGs found, in order of first appearance.
    pub vgs: Vec<ScannedVg>,
    /// Everything wrong, device-level and VG-level.
    pub problems: Vec<Problem>,
}

impl ScanReport {
    /// The VG named `name` (the first, if the name is used twice: see
    /// [`Problem::DuplicateVgName`]).
    pub fn vg(&self, name: &str) -> Option<&ScannedVg> {
        self.vgs.iter().find(|v| v.name() == name)
    }

    /// The VG with uuid `id`.
    pub fn vg_by_id(&self, id: &Uuid) -> Option<&ScannedVg> {
        self.vgs.iter().find(|v| &v.id() == id)
    }

    /// Index of the device whose label carries PV `id` (the first one, if several do).
    pub fn device_of_pv(&self, id: &Uuid) -> Option<usize> {
        self.devices
            .iter()
            .position(|d| d.label.as_ref().is_some_and(|l| &l.pv_uuid == id))
    }
}

/// Reads the label and metadata areas of one device.
fn scan_device(dev: DeviceRef, problems: &mut Vec<Problem>) -> DeviceScan {
    let name = dev.name();
    let size = dev.size();
    let mut d = DeviceScan {
        dev: dev.clone(),
        name: name.clone(),
        size,
        label: None,
        mdas: Vec::new(),
    };
    let label = match label::find(dev.as_ref()) {
        Ok(Some(l)) => l,
        Ok(None) => return d,
        Err(FindLabelError::Io(e)) => {
            problems.push(Problem::Unreadable(e));
            return d;
        }
        Err(FindLabelError::Label(e)) => {
            problems.push(Problem::BadLabel(e));
            return d;
        }
    };
    for area in &label.metadata_areas {
        let mut m = MdaScan {
            area: *area,
            header: None,
            text: None,
        };
        match mda::read_header(dev.as_ref(), area) {
            Ok(h) => m.header = Some(h),
            Err(e) => {
                problems.push(mda_problem(e));
                d.mdas.push(m);
                continue;
            }
        }
        let Some(h) = &m.header else { continue };
        if h.ignored() || h.committed.is_empty() {
            d.mdas.push(m);
            continue;
        }
        if !h.precommitted.is_empty() && h.precommitted != h.committed {
            problems.push(Problem::Uncommitted {
                device: name.clone(),
                area: area.offset.0,
            });
        }
        match mda::read_text(dev.as_ref(), h, &h.committed) {
            Err(e) => problems.push(mda_problem(e)),
            Ok(text) => match Metadata::from_text(&text) {
                Ok(metadata) => {
                    m.text = Some(FoundText {
                        locn: h.committed,
                        text,
                        metadata,
                    })
                }
                Err(error) => problems.push(Problem::BadText {
                    device: name.clone(),
                    offset: area.offset.0.saturating_add(h.committed.offset),
                    error,
                }),
            },
        }
        d.mdas.push(m);
    }
    d.label = Some(label);
    d
}

fn mda_problem(e: MdaIoError) -> Problem {
    match e {
        MdaIoError::Io(e) => Problem::Unreadable(e),
        MdaIoError::Mda(e) => Problem::BadMetadataArea(e),
    }
}

/// Scans `devices`: labels, metadata areas, VGs, problems. Never fails as a whole: a device
/// that cannot be read is a [`Problem::Unreadable`].
pub fn scan(devices: &[DeviceRef]) -> ScanReport {
    let mut r = ScanReport::default();
    for dev in devices {
        let d = scan_device(dev.clone(), &mut r.problems);
        r.devices.push(d);
    }

    // PV uuids on more than one device.
    let mut by_pv: BTreeMap<Uuid, Vec<usize>> = BTreeMap::new();
    for (i, d) in r.devices.iter().enumerate() {
        if let Some(l) = &d.label {
            by_pv.entry(l.pv_uuid).or_default().push(i);
        }
    }
    for (id, devs) in &by_pv {
        if devs.len() > 1 {
            r.problems.push(Problem::DuplicatePv {
                id: *id,
                devices: devs.iter().map(|&i| r.devices[i].name.clone()).collect(),
            });
        }
    }

    // Copies by VG uuid, in order of first appearance.
    let mut order: Vec<Uuid> = Vec::new();
    let mut copies: HashMap<Uuid, Vec<(usize, usize)>> = HashMap::new();
    for (i, d) in r.devices.iter().enumerate() {
        for (j, m) in d.mdas.iter().enumerate() {
            if let Some(t) = &m.text {
                let id = t.metadata.vg.id;
                if !copies.contains_key(&id) {
                    order.push(id);
                }
                copies.entry(id).or_default().push((i, j));
            }
        }
    }
    for id in order {
        let list = copies.remove(&id).unwrap_or_default();
        if let Some(vg) = assemble(&r.devices, list) {
            r.vgs.push(vg);
        }
    }

    cross_check(&mut r);
    for vg in &r.vgs {
        r.problems.extend(vg.problems.iter().cloned());
    }
    r
}

/// A copy of metadata: (device index, metadata area index).
type CopyAt = (usize, usize);

/// Picks the newest copy of one VG and sorts the others into current and stale.
fn assemble(devices: &[DeviceScan], list: Vec<(usize, usize)>) -> Option<ScannedVg> {
    let text_of = |&(i, j): &(usize, usize)| devices[i].mdas[j].text.as_ref();
    let newest = list
        .iter()
        .filter_map(|c| text_of(c).map(|t| t.metadata.vg.seqno))
        .max()?;
    // Among copies of the newest seqno, the text most copies agree on (first on a tie).
    let mut variants: Vec<(&[u8], Vec<CopyAt>)> = Vec::new();
    let mut stale = Vec::new();
    for c in &list {
        let Some(t) = text_of(c) else { continue };
        if t.metadata.vg.seqno != newest {
            stale.push((c.0, c.1, t.metadata.vg.seqno));
            continue;
        }
        match variants
            .iter_mut()
            .find(|(txt, _)| *txt == t.text.as_slice())
        {
            Some((_, v)) => v.push(*c),
            None => variants.push((&t.text, vec![*c])),
        }
    }
    let best = (0..variants.len()).max_by_key(|&k| (variants[k].1.len(), usize::MAX - k))?;
    let (_, current) = variants.remove(best);
    let found = text_of(current.first()?)?;
    let metadata = found.metadata.clone();
    let vg_name = metadata.vg.name.clone();
    let mut problems = Vec::new();
    if !variants.is_empty() {
        problems.push(Problem::SeqnoConflict {
            vg: vg_name.clone(),
            seqno: newest,
            devices: variants
                .iter()
                .flat_map(|(_, v)| v.iter())
                .map(|&(i, j)| (devices[i].name.clone(), devices[i].mdas[j].area.offset.0))
                .collect(),
        });
    }
    for &(i, j, seqno) in &stale {
        problems.push(Problem::Stale {
            vg: vg_name.clone(),
            device: devices[i].name.clone(),
            area: devices[i].mdas[j].area.offset.0,
            seqno,
            newest,
        });
    }
    Some(ScannedVg {
        text: found.text.clone(),
        pvs: Vec::new(),
        metadata,
        current,
        stale,
        problems,
    })
}

/// Ties each VG to its PVs' devices: missing PVs, PVs claimed by another VG, devices whose
/// metadata names a VG that dropped them, devices too small, two VGs of one name.
fn cross_check(r: &mut ScanReport) {
    // The newest VG each device's own metadata names.
    let own_vg = |d: &DeviceScan| -> Option<(Uuid, String)> {
        d.mdas
            .iter()
            .filter_map(|m| m.text.as_ref())
            .max_by_key(|t| t.metadata.vg.seqno)
            .map(|t| (t.metadata.vg.id, t.metadata.vg.name.clone()))
    };
    let mut names: BTreeMap<String, Vec<Uuid>> = BTreeMap::new();
    for k in 0..r.vgs.len() {
        let (vg_id, vg_name, extent_size) = {
            let v = &r.vgs[k].metadata.vg;
            (v.id, v.name.clone(), v.extent_size)
        };
        names.entry(vg_name.clone()).or_default().push(vg_id);
        let mut pvs = Vec::new();
        let mut problems = Vec::new();
        for pv in &r.vgs[k].metadata.vg.physical_volumes {
            let device = r.device_of_pv(&pv.id);
            match device {
                None => problems.push(Problem::MissingPv {
                    vg: vg_name.clone(),
                    id: pv.id,
                    hint: pv.device.clone(),
                }),
                Some(i) => {
                    let d = &r.devices[i];
                    if let Some((other_id, other)) = own_vg(d) {
                        if other_id != vg_id {
                            problems.push(Problem::PvOfOtherVg {
                                vg: vg_name.clone(),
                                device: d.name.clone(),
                                id: pv.id,
                                other,
                            });
                        }
                    }
                    let end = pv
                        .pe_count
                        .to_sectors(extent_size)
                        .and_then(|s| s.checked_add(pv.pe_start))
                        .and_then(|s| s.checked_bytes());
                    match end {
                        Some(end) if end <= d.size => {}
                        _ => problems.push(Problem::PvTooSmall {
                            vg: vg_name.clone(),
                            device: d.name.clone(),
                            needs: end.map_or(u64::MAX, |b| b.0),
                            size: d.size.0,
                        }),
                    }
                }
            }
            pvs.push(VgPv {
                key: pv.key.clone(),
                id: pv.id,
                device,
            });
        }
        // Devices with metadata of this VG whose PV it no longer lists.
        for d in &r.devices {
            let Some(l) = &d.label else { continue };
            let names_it = d
                .mdas
                .iter()
                .filter_map(|m| m.text.as_ref())
                .any(|t| t.metadata.vg.id == vg_id);
            if names_it && r.vgs[k].metadata.vg.pv_by_id(&l.pv_uuid).is_none() {
                problems.push(Problem::NotInVg {
                    vg: vg_name.clone(),
                    device: d.name.clone(),
                    id: l.pv_uuid,
                });
            }
        }
        let vg = &mut r.vgs[k];
        vg.pvs = pvs;
        vg.problems.extend(problems);
    }
    for (name, ids) in names {
        if ids.len() > 1 {
            r.problems.push(Problem::DuplicateVgName { name, ids });
        }
    }
}

/// Opens `paths` read-only (files or block devices, shared: not claimed exclusively) and
/// scans them.
pub fn scan_paths<P: AsRef<Path>>(paths: &[P]) -> Result<ScanReport, crate::Error> {
    Ok(scan(&open_paths(paths, true)?))
}

/// Opens `paths` as devices for [`scan`] (and, writable, for [`crate::commit`]), without
/// claiming them exclusively, so LVM2's tools can still open them.
pub fn open_paths<P: AsRef<Path>>(
    paths: &[P],
    read_only: bool,
) -> Result<Vec<DeviceRef>, crate::Error> {
    paths
        .iter()
        .map(|p| open_device(p.as_ref(), read_only, false))
        .collect()
}

/// Opens one PV device: a file or block device, or a network extent when `path` is spelled
/// as one (`nbd://...`, `iscsi://...`: a PV may live on another storage host). A network
/// extent is opened read-write whatever `read_only` says (the server decides), and is never
/// claimed exclusively.
///
/// A group of paths (`PATH1|PATH2`, [`crate::paths`]) opens every path, refuses paths that
/// show different PVs, and gives the first working path; paths that do not work are skipped
/// with a warning on stderr (the PV is still found through the others).
pub fn open_device(
    path: &Path,
    read_only: bool,
    exclusive: bool,
) -> Result<DeviceRef, crate::Error> {
    let name = path.to_string_lossy();
    if crate::paths::is_group(&name) {
        let g = crate::paths::open_group(&name, &|p| open_one(p, read_only, exclusive))?;
        for (p, e) in &g.skipped {
            eprintln!("  WARNING: {name}: path {p} skipped: {e}");
        }
        return Ok(g.device);
    }
    open_one(path, read_only, exclusive)
}

/// [`open_device`] of a single path.
fn open_one(path: &Path, read_only: bool, exclusive: bool) -> Result<DeviceRef, crate::Error> {
    let name = path.to_string_lossy();
    if extents::net::NetUri::is_network(&name) {
        return extents::net::open(&name)
            .map(|e| e.device())
            .map_err(|e| crate::Error::OpenRemote(Arc::new(e)));
    }
    let opts = extents::OpenOptions {
        read_only,
        exclusive,
        ..extents::OpenOptions::default()
    };
    extents::FileExtent::open(path, opts)
        .map(|e| Arc::new(e) as DeviceRef)
        .map_err(|source| crate::Error::Open {
            path: path.to_path_buf(),
            source: Arc::new(source),
        })
}
