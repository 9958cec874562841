//! What the daemon records of each replicated volume (`replication/volumes.json` in its
//! state directory), so replication resumes after a restart with the same roles, peers and
//! snapshot ids.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Which way the volume's data flows.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// This side's volume is written by its users and shipped to the peer.
    Primary,
    /// This side's copy follows the peer's volume.
    Secondary,
}

impl Role {
    /// `primary` or `secondary`.
    pub fn word(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Secondary => "secondary",
        }
    }
}

/// One replicated volume on this side.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplConfig {
    /// The name both sides know the volume by.
    pub volume: String,
    /// This side's role.
    pub role: Role,
    /// The daemon's thin-pool device holding the volume.
    pub pool: String,
    /// The volume's thin id in that pool (the copy, on a secondary).
    pub thin: u32,
    /// Volume size in bytes.
    pub size: u64,
    /// The two thin ids replication snapshots alternate between (kept across role swaps:
    /// the last common snapshot lives in one of them).
    #[serde(default)]
    pub snap_ids: [u32; 2],
    /// Primary: the secondary's `HOST:PORT`.
    #[serde(default)]
    pub peer: Option<String>,
    /// Primary: the name the secondary's certificate carries (default: the peer's host).
    #[serde(default)]
    pub server_name: Option<String>,
    /// Secondary: the `ADDR:PORT` it listens on.
    #[serde(default)]
    pub listen: Option<String>,
    /// Directory with `ca-cert.pem`, `cert.pem` and `key.pem` (both sides).
    #[serde(default)]
    pub tls_dir: Option<PathBuf>,
    /// No TLS and no peer authentication (tests on a private link only).
    #[serde(default)]
    pub insecure: bool,
    /// Primary: time between replication snapshots, in milliseconds.
    #[serde(default)]
    pub interval_ms: u64,
    /// Primary: most bytes per second shipped.
    #[serde(default)]
    pub bwlimit: Option<u64>,
    /// Whether replication runs (and resumes when the daemon starts).
    #[serde(default)]
    pub running: bool,
}

/// The state file of `volume` (last common snapshot) under `dir`.
pub fn state_path(dir: &Path, volume: &str) -> PathBuf {
    dir.join(format!("{volume}.state"))
}

/// Reads the recorded volumes; a missing file is none.
pub fn load(path: &Path) -> Result<BTreeMap<String, ReplConfig>, String> {
    match std::fs::read(path) {
        Ok(b) => {
            let list: Vec<ReplConfig> =
                serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", path.display()))?;
            Ok(list.into_iter().map(|c| (c.volume.clone(), c)).collect())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Writes the recorded volumes crash-safely (temporary file, fsync, rename, fsync the
/// directory).
pub fn save(path: &Path, all: &BTreeMap<String, ReplConfig>) -> Result<(), String> {
    let list: Vec<&ReplConfig> = all.values().collect();
    let body = serde_json::to_vec_pretty(&list).map_err(|e| e.to_string())?;
    let tmp = path.with_extension("json.tmp");
    let err = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
    let mut f = std::fs::File::create(&tmp).map_err(|e| err(&tmp, e))?;
    f.write_all(&body).map_err(|e| err(&tmp, e))?;
    f.sync_all().map_err(|e| err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| err(path, e))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| err(dir, e))
}

/// Volume names: what is safe in a file name and a message.
pub fn valid_volume(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 128
        && v.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.+".contains(&c))
        && !v.starts_with('.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_round_trip_and_names_are_checked() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("volumes.json");
        assert!(load(&p).unwrap().is_empty());
        let c = ReplConfig {
            volume: "db-1".into(),
            role: Role::Primary,
            pool: "pool".into(),
            thin: 1,
            size: 1 << 30,
            snap_ids: [16777215, 16777214],
            peer: Some("10.0.0.2:7480".into()),
            server_name: None,
            listen: None,
            tls_dir: None,
            insecure: true,
            interval_ms: 1000,
            bwlimit: Some(50 << 20),
            running: true,
        };
        let mut all = BTreeMap::new();
        all.insert(c.volume.clone(), c.clone());
        save(&p, &all).unwrap();
        assert_eq!(load(&p).unwrap().get("db-1"), Some(&c));
        std::fs::write(&p, b"{garbage").unwrap();
        assert!(load(&p).unwrap_err().contains("volumes.json"));
        assert!(valid_volume("vg0-lv_1.a"));
        for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(129)] {
            assert!(!valid_volume(bad), "{bad}");
        }
    }
}
