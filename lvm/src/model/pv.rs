//! A PV as the VG metadata describes it (`physical_volumes { pv0 { ... } }`).

use tables::Sectors;

use super::fields::{int, Flags, Reader};
use super::ModelError;
use crate::text::{Item, Section, Value};
use crate::units::Extents;
use crate::uuid::Uuid;

/// One entry of `physical_volumes`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PhysicalVolume {
    /// The section's key (`pv0`, `pv1`, ...): segments name the PV by it.
    pub key: String,
    /// The PV's uuid (the same as in its label).
    pub id: Uuid,
    /// `device`: the path it had when written (a hint only).
    pub device: Option<String>,
    /// `status` flags (`ALLOCATABLE`, `EXPORTED`, `MISSING`).
    pub status: Flags,
    /// `flags` (compatibility flags; LVM2 writes `[]`).
    pub flags: Flags,
    /// `dev_size`: the device size when written.
    pub dev_size: Option<Sectors>,
    /// `pe_start`: where the first extent starts.
    pub pe_start: Sectors,
    /// `pe_count`: extents on this PV.
    pub pe_count: Extents,
    /// Every other entry (`tags`, `device_id`, `ba_start`, ...), in order.
    pub extra: Vec<(String, Item)>,
}

impl PhysicalVolume {
    pub(crate) fn from_section(
        path: &str,
        key: &str,
        s: &Section,
    ) -> Result<PhysicalVolume, ModelError> {
        let mut r = Reader::new(format!("{path}/{key}"), s);
        Ok(PhysicalVolume {
            key: key.to_string(),
            id: r.uuid("id")?,
            device: r.opt_str("device")?,
            status: r.flags("status")?,
            flags: r.opt_flags("flags")?.unwrap_or_default(),
            dev_size: r.opt_u64("dev_size")?.map(Sectors),
            pe_start: r.sectors("pe_start")?,
            pe_count: r.extents("pe_count")?,
            extra: r.rest(),
        })
    }

    pub(crate) fn to_section(&self, path: &str) -> Result<Section, ModelError> {
        let path = format!("{path}/{}", self.key);
        let mut s = Section::new();
        s.push_str("id", self.id.to_string());
        if let Some(d) = &self.device {
            s.push_str("device", d.clone());
        }
        s.push("status", self.status.item());
        s.push("flags", self.flags.item());
        if let Some(d) = self.dev_size {
            s.push_value("dev_size", int(&path, "dev_size", d.0)?);
        }
        s.push_value("pe_start", int(&path, "pe_start", self.pe_start.0)?);
        s.push_value("pe_count", Value::Int(i64::from(self.pe_count.0)));
        s.entries.extend(self.extra.iter().cloned());
        Ok(s)
    }
}
