//! `vgrename`: a VG's next version under a new name, as LVM2's `vgrename` writes it. The VG is
//! named by its name or its uuid; the new name must follow LVM's name rules, fit LVM2's path
//! limit, differ from the old one, and be neither another VG's name nor another VG's uuid.
//! PVs are found by uuid and the VG by its uuid, so a cut between PVs leaves some copies on
//! the old name and some on the new, and the scan takes the newest (the new name).
//!
//! Whether LVs of the VG are active is the caller's check (the daemon knows); LVM2 renames
//! active LVs' device nodes, which is not done here.

use crate::commit::{self, Committed};
use crate::scan::{ScanReport, ScannedVg};
use crate::uuid::Uuid;
use crate::vgcreate::check_name;
use crate::Error;

/// LVM2's `NAME_LEN`: a VG path (`/dev/` + name) must stay under it with room for `/LV`.
pub const NAME_LEN: usize = 128;

/// Why the VG cannot take the name; nothing was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenameError {
    /// Against LVM's name rules.
    #[error("New volume group name \"{name}\" is invalid: {why}")]
    Invalid {
        /// The name.
        name: String,
        /// The rule.
        why: String,
    },
    /// Too long for LVM2's device paths.
    #[error("New volume group path exceeds maximum length of {max}!")]
    TooLong {
        /// The longest name allowed.
        max: usize,
    },
    /// The same as the old.
    #[error("Old and new volume group names must differ")]
    Same,
    /// Another VG has it.
    #[error("New VG name \"{0}\" already exists")]
    Taken(String),
    /// It is another VG's uuid (LVM2 would take it for that VG).
    #[error("New VG name \"{name}\" matches the UUID of existing VG {vg}")]
    MatchesUuid {
        /// The name.
        name: String,
        /// That VG's name.
        vg: String,
    },
}

/// The VG `name_or_uuid` names: by name first, then by uuid (either form), as LVM2 looks it
/// up.
pub fn find_vg<'a>(report: &'a ScanReport, name_or_uuid: &str) -> Option<&'a ScannedVg> {
    report.vg(name_or_uuid).or_else(|| {
        name_or_uuid
            .parse::<Uuid>()
            .ok()
            .and_then(|id| report.vg_by_id(&id))
    })
}

/// Checks `new` as a new name for `sv`; `dev_dir` is the device directory (`/dev/`) whose
/// length counts against [`NAME_LEN`].
pub fn check_new_name(
    report: &ScanReport,
    sv: &ScannedVg,
    new: &str,
    dev_dir: &str,
) -> Result<(), RenameError> {
    let max = NAME_LEN.saturating_sub(dev_dir.len()).saturating_sub(2);
    if new.len() > max {
        return Err(RenameError::TooLong { max });
    }
    check_name("VG", new).map_err(|why| RenameError::Invalid {
        name: new.to_string(),
        why,
    })?;
    if new == sv.name() {
        return Err(RenameError::Same);
    }
    if report.vg(new).is_some() {
        return Err(RenameError::Taken(new.to_string()));
    }
    if let Some(other) = new.parse::<Uuid>().ok().and_then(|id| report.vg_by_id(&id)) {
        return Err(RenameError::MatchesUuid {
            name: new.to_string(),
            vg: other.name().to_string(),
        });
    }
    Ok(())
}

/// Writes `sv` as its next version named `new` (checked with [`check_new_name`] first),
/// stamped with `description`.
pub fn vgrename(
    report: &ScanReport,
    sv: &ScannedVg,
    new: &str,
    dev_dir: &str,
    description: &str,
) -> Result<Committed, Error> {
    check_new_name(report, sv, new, dev_dir)?;
    let mut md = sv.metadata.clone();
    md.vg.name = new.to_string();
    md.stamp(description);
    commit::commit(report, &mut md)
}
