//! Typed VG metadata, to and from the [`crate::text`] tree.
//!
//! [`Metadata`] is one metadata text: the VG section plus the header lines LVM2 writes around
//! it (`contents`, `version`, `description`, `creation_host`, `creation_time`). Known fields
//! are typed; every other entry, at every level, is kept in order in an `extra` list and
//! written back, and segments of types other than `striped` are kept whole, so a VG read and
//! written again loses nothing LVM2 (or a newer LVM2) wrote.
//!
//! Units: `extent_size`, `pe_start`, `dev_size` and `stripe_size` are [`Sectors`] as in the
//! text; extent counts and numbers are [`Extents`].

mod fields;
mod lv;
mod pv;
mod validate;

pub use fields::{valid_name, Flags};
pub use lv::{Area, LogicalVolume, Segment, SegmentKind, STRIPED};
pub use pv::PhysicalVolume;

use tables::Sectors;

use crate::text::{self, Item, Section, Style, Value};
use crate::uuid::Uuid;
use fields::{int, subsections, Reader};

/// `contents` of every VG metadata text.
pub const CONTENTS: &str = "Text Format Volume Group";
/// `version` of the text format.
pub const FORMAT_VERSION: i64 = 1;

/// Metadata that does not make a valid VG, naming the key path (`vg0/logical_volumes/lv1/
/// segment1/stripes`) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {problem}")]
pub struct ModelError {
    /// Where: the key path from the top of the text.
    pub path: String,
    /// What is wrong.
    pub problem: String,
}

/// Metadata text that cannot be read: not parseable, or not a valid VG.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetadataError {
    /// The text does not parse.
    #[error("metadata text: {0}")]
    Text(#[from] text::TextError),
    /// The tree is not a valid VG.
    #[error("metadata: {0}")]
    Model(#[from] ModelError),
}

/// A volume group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeGroup {
    /// The VG name (the section's key).
    pub name: String,
    /// `id`.
    pub id: Uuid,
    /// `seqno`: bumped by every committed change.
    pub seqno: u32,
    /// `format` (`"lvm2"`; informational).
    pub format: Option<String>,
    /// `status` flags (`RESIZEABLE`, `READ`, `WRITE`, `EXPORTED`, ...).
    pub status: Flags,
    /// `flags` (compatibility flags).
    pub flags: Flags,
    /// `extent_size` in sectors.
    pub extent_size: Sectors,
    /// `max_lv` (0: no limit).
    pub max_lv: u32,
    /// `max_pv` (0: no limit).
    pub max_pv: u32,
    /// `metadata_copies` (0: unmanaged; absent in old metadata).
    pub metadata_copies: Option<u32>,
    /// `physical_volumes`, in order.
    pub physical_volumes: Vec<PhysicalVolume>,
    /// `logical_volumes`, in order (LVM2 writes visible LVs first).
    pub logical_volumes: Vec<LogicalVolume>,
    /// Every other entry (`tags`, `system_id`, `lock_type`, `historical_logical_volumes`,
    /// ...), in order.
    pub extra: Vec<(String, Item)>,
}

/// One metadata text: a VG and its header lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Metadata {
    /// The VG.
    pub vg: VolumeGroup,
    /// `description` (LVM2: the command that wrote it).
    pub description: String,
    /// `creation_host`.
    pub creation_host: String,
    /// `creation_time`, seconds since the epoch.
    pub creation_time: u64,
    /// Other top-level entries, in order (a [`Style::File`] text puts the values among them
    /// before the VG and the sections after it).
    pub extra: Vec<(String, Item)>,
}

/// Keys the typed structures own: they may not appear in an `extra` list (they would be
/// written twice).
const VG_KEYS: &[&str] = &[
    "id",
    "seqno",
    "format",
    "status",
    "flags",
    "extent_size",
    "max_lv",
    "max_pv",
    "metadata_copies",
    "physical_volumes",
    "logical_volumes",
];
const TOP_KEYS: &[&str] = &[
    "contents",
    "version",
    "description",
    "creation_host",
    "creation_time",
];

impl VolumeGroup {
    /// Reads the VG section `name { ... }`.
    pub fn from_section(name: &str, s: &Section) -> Result<VolumeGroup, ModelError> {
        let mut r = Reader::new(name, s);
        let id = r.uuid("id")?;
        let seqno = r.u32("seqno")?;
        let format = r.opt_str("format")?;
        let status = r.flags("status")?;
        let flags = r.opt_flags("flags")?.unwrap_or_default();
        let extent_size = r.sectors("extent_size")?;
        let max_lv = r.u32("max_lv")?;
        let max_pv = r.u32("max_pv")?;
        let metadata_copies = r.opt_u32("metadata_copies")?;
        let pvs = r
            .opt_section("physical_volumes")?
            .ok_or_else(|| r.err("physical_volumes", "missing"))?;
        let physical_volumes = subsections(
            &format!("{name}/physical_volumes"),
            pvs,
            PhysicalVolume::from_section,
        )?;
        let logical_volumes = match r.opt_section("logical_volumes")? {
            None => Vec::new(),
            Some(lvs) => subsections(
                &format!("{name}/logical_volumes"),
                lvs,
                LogicalVolume::from_section,
            )?,
        };
        let vg = VolumeGroup {
            name: name.to_string(),
            id,
            seqno,
            format,
            status,
            flags,
            extent_size,
            max_lv,
            max_pv,
            metadata_copies,
            physical_volumes,
            logical_volumes,
            extra: r.rest(),
        };
        vg.validate()?;
        Ok(vg)
    }

    /// The VG section's contents (validated first).
    pub fn to_section(&self) -> Result<Section, ModelError> {
        self.validate()?;
        let path = self.name.as_str();
        let mut s = Section::new();
        s.push_str("id", self.id.to_string());
        s.push_int("seqno", i64::from(self.seqno));
        if let Some(f) = &self.format {
            s.push_str("format", f.clone());
        }
        s.push("status", self.status.item());
        s.push("flags", self.flags.item());
        s.push_value("extent_size", int(path, "extent_size", self.extent_size.0)?);
        s.push_int("max_lv", i64::from(self.max_lv));
        s.push_int("max_pv", i64::from(self.max_pv));
        if let Some(c) = self.metadata_copies {
            s.push_int("metadata_copies", i64::from(c));
        }
        s.entries.extend(self.extra.iter().cloned());
        let pv_path = format!("{path}/physical_volumes");
        let mut pvs = Section::new();
        for pv in &self.physical_volumes {
            pvs.push(pv.key.clone(), Item::Section(pv.to_section(&pv_path)?));
        }
        s.push("physical_volumes", Item::Section(pvs));
        if !self.logical_volumes.is_empty() {
            let lv_path = format!("{path}/logical_volumes");
            let mut lvs = Section::new();
            for lv in &self.logical_volumes {
                lvs.push(lv.name.clone(), Item::Section(lv.to_section(&lv_path)?));
            }
            s.push("logical_volumes", Item::Section(lvs));
        }
        Ok(s)
    }

    /// The PV with key `key` (`pv0`).
    pub fn pv_by_key(&self, key: &str) -> Option<&PhysicalVolume> {
        self.physical_volumes.iter().find(|p| p.key == key)
    }

    /// The PV with uuid `id`.
    pub fn pv_by_id(&self, id: &Uuid) -> Option<&PhysicalVolume> {
        self.physical_volumes.iter().find(|p| &p.id == id)
    }

    /// The LV named `name`.
    pub fn lv(&self, name: &str) -> Option<&LogicalVolume> {
        self.logical_volumes.iter().find(|l| l.name == name)
    }

    /// The LV named `name`, to change.
    pub fn lv_mut(&mut self, name: &str) -> Option<&mut LogicalVolume> {
        self.logical_volumes.iter_mut().find(|l| l.name == name)
    }
}

impl Metadata {
    /// A metadata text for `vg`, with LVM2-style header lines.
    pub fn new(vg: VolumeGroup, description: impl Into<String>) -> Metadata {
        Metadata {
            vg,
            description: description.into(),
            creation_host: hostname(),
            creation_time: now(),
            extra: Vec::new(),
        }
    }

    /// Sets the header lines for a new version about to be written, as LVM2 does on every
    /// write: `description` (LVM2 puts the command line there), this host, the time now.
    pub fn stamp(&mut self, description: impl Into<String>) {
        self.description = description.into();
        self.creation_host = hostname();
        self.creation_time = now();
    }

    /// Reads a parsed text: checks `contents` and `version` as LVM2 does, takes the first
    /// section as the VG.
    pub fn from_tree(root: &Section) -> Result<Metadata, ModelError> {
        let mut r = Reader::new("", root);
        let top_err = |key: &str, problem: &str| ModelError {
            path: key.to_string(),
            problem: problem.to_string(),
        };
        match r.opt_str("contents") {
            Ok(Some(c)) if c == CONTENTS => {}
            Ok(None) => return Err(top_err("contents", "missing")),
            _ => return Err(top_err("contents", "is not \"Text Format Volume Group\"")),
        }
        match r.take("version")? {
            Some(Item::Value(Value::Int(FORMAT_VERSION))) => {}
            None => return Err(top_err("version", "missing")),
            Some(_) => return Err(top_err("version", "is not 1")),
        }
        let description = r.opt_str("description")?.unwrap_or_default();
        let creation_host = r.opt_str("creation_host")?.unwrap_or_default();
        let creation_time = r.opt_u64("creation_time")?.unwrap_or(0);
        let mut extra = r.rest();
        let vg_at = extra
            .iter()
            .position(|(_, i)| matches!(i, Item::Section(_)))
            .ok_or_else(|| top_err("", "no volume group section"))?;
        let (name, item) = extra.remove(vg_at);
        let Item::Section(vg_section) = item else {
            return Err(top_err(&name, "is not a section"));
        };
        let vg = VolumeGroup::from_section(&name, &vg_section)?;
        let md = Metadata {
            vg,
            description,
            creation_host,
            creation_time,
            extra,
        };
        md.check_extra()?;
        Ok(md)
    }

    /// Parses and reads metadata text (a copy from a metadata area, NUL and all, or a backup
    /// file).
    pub fn from_text(text: &[u8]) -> Result<Metadata, MetadataError> {
        Ok(Metadata::from_tree(&text::parse(text)?)?)
    }

    fn check_extra(&self) -> Result<(), ModelError> {
        for (k, _) in &self.extra {
            if TOP_KEYS.contains(&k.as_str()) {
                return Err(ModelError {
                    path: k.clone(),
                    problem: "is a header field, not an extra entry".into(),
                });
            }
        }
        Ok(())
    }

    /// The tree LVM2 would write: on disk the VG section comes first and the header lines
    /// after it, in files the header lines come first. Extra top-level sections always
    /// follow the VG's (the first section is the VG); extra values go with the header.
    pub fn to_tree(&self, style: Style) -> Result<Section, ModelError> {
        self.check_extra()?;
        let mut header = Section::new();
        header.push_str("contents", CONTENTS);
        header.push_int("version", FORMAT_VERSION);
        header.push_str("description", self.description.clone());
        header.push_str("creation_host", self.creation_host.clone());
        header.push_value(
            "creation_time",
            int("", "creation_time", self.creation_time)?,
        );
        let vg = (self.vg.name.clone(), Item::Section(self.vg.to_section()?));
        let mut root = Section::new();
        match style {
            Style::Disk => {
                root.entries.push(vg);
                root.entries.extend(header.entries);
                root.entries.extend(self.extra.iter().cloned());
            }
            Style::File => {
                let (sections, values): (Vec<_>, Vec<_>) = self
                    .extra
                    .iter()
                    .cloned()
                    .partition(|(_, i)| matches!(i, Item::Section(_)));
                root.entries.extend(header.entries);
                root.entries.extend(values);
                root.entries.push(vg);
                root.entries.extend(sections);
            }
        }
        Ok(root)
    }

    /// The text LVM2 reads: [`Style::Disk`] for a metadata area (a NUL is appended when it
    /// is written there), [`Style::File`] for `vgcfgrestore`.
    pub fn to_text(&self, style: Style) -> Result<String, MetadataError> {
        Ok(text::write(&self.to_tree(style)?, style)?)
    }
}

/// Seconds since the epoch (0 if the clock is before it).
fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// This machine's node name, as LVM2 records it in `creation_host`.
pub fn hostname() -> String {
    // SAFETY: `uname` fills the zeroed struct it is given and has no other preconditions.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable utsname.
    if unsafe { libc::uname(&mut u) } != 0 {
        return String::new();
    }
    let bytes: Vec<u8> = u
        .nodename
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}
