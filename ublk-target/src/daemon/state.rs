//! `devices.json`: every device record the daemon keeps, in creation order.
//!
//! A record goes only when an administrator removes the device: a device that could not be
//! restored stays listed (failed, with its reason) and is written back with the others, so a
//! kill during restore, or a backing file missing at start, never loses another device's
//! table. The file is replaced atomically (write, fsync, rename, fsync the directory).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::DaemonError;
use crate::control::NbdOverrides;

/// What the daemon persists about one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistedDevice {
    /// Name.
    pub name: String,
    /// Table text (normalized: absolute paths, the daemon's own devices as
    /// `/dev/volmgr/NAME`).
    pub table: String,
    /// ublk device id, if exposed through ublk.
    pub ublk_id: Option<u32>,
    /// NBD address, if exported over NBD.
    pub nbd: Option<String>,
    /// This device's NBD limits over the daemon's defaults.
    #[serde(default, skip_serializing_if = "NbdOverrides::is_empty")]
    pub nbd_limits: NbdOverrides,
    /// No front end (see [`crate::control::Request::Create`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub internal: bool,
    /// The NBD export name, when not the device name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export: Option<String>,
}

/// Reads the records; a missing file is an empty list.
pub(crate) fn load(path: &Path) -> Result<Vec<PersistedDevice>, DaemonError> {
    match std::fs::read_to_string(path) {
        Ok(s) => serde_json::from_str(&s).map_err(|e| DaemonError::CorruptState {
            path: path.display().to_string(),
            msg: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(DaemonError::Io {
            what: format!("reading {}", path.display()),
            source: e,
        }),
    }
}

/// Replaces the file with `list`, atomically and durably.
pub(crate) fn save(path: &Path, list: &[PersistedDevice]) -> Result<(), String> {
    let text = serde_json::to_string_pretty(list).map_err(|e| e.to_string())?;
    let tmp = tmp_path(path);
    let dir = path.parent().unwrap_or(Path::new("."));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| format!("saving {}: {e}", path.display()))
}

fn tmp_path(path: &Path) -> PathBuf {
    path.with_extension("json.tmp")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(name: &str) -> PersistedDevice {
        PersistedDevice {
            name: name.into(),
            table: "0 8 zero\n".into(),
            ublk_id: None,
            nbd: Some("127.0.0.1:0".into()),
            nbd_limits: NbdOverrides::default(),
            internal: false,
            export: None,
        }
    }

    #[test]
    fn round_trip_and_missing_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("devices.json");
        assert!(load(&p).unwrap().is_empty());
        let list = vec![rec("a"), rec("b")];
        save(&p, &list).unwrap();
        assert_eq!(load(&p).unwrap(), list);
        assert!(!tmp_path(&p).exists());
    }

    #[test]
    fn garbage_is_reported_as_corrupt_with_the_path() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("devices.json");
        std::fs::write(&p, "{not json").unwrap();
        let e = load(&p).unwrap_err().to_string();
        assert!(e.contains("devices.json") && e.contains("corrupt"), "{e}");
    }
}
