//! The small state file each side keeps (last complete snapshot), written crash-safely, and
//! the status both sides report.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{ReplError, ReplResult};

/// What survives a restart: the last snapshot both sides hold complete.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Volume uuid this state belongs to.
    pub volume: String,
    /// Last complete (secondary) / acknowledged (primary) snapshot id; 0: none.
    pub snapshot: u64,
    /// Thin id in the local pool holding that snapshot.
    pub thin_id: u32,
    /// When that snapshot was taken on the primary (seconds since the epoch).
    pub taken_at: u64,
    /// Primary only: the snapshot shipped but not acknowledged yet (0: none), so a restart
    /// between the secondary's commit and its ACK still finds the common snapshot.
    #[serde(default)]
    pub pending_snapshot: u64,
    /// Thin id of the pending snapshot.
    #[serde(default)]
    pub pending_thin_id: u32,
    /// When the pending snapshot was taken.
    #[serde(default)]
    pub pending_taken_at: u64,
    /// Secondary only: the last primary said BYE (stopped on purpose) and none has connected
    /// since, so `promote` needs no `--force` even after this side restarted.
    #[serde(default)]
    pub primary_said_bye: bool,
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Seconds since the epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl State {
    /// Reads `path`; a missing file is the empty state (nothing replicated yet).
    pub fn load(path: &Path) -> ReplResult<State> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| ReplError::Config(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(ReplError::Config(format!("{}: {e}", path.display()))),
        }
    }

    /// Writes `path` crash-safely: a temporary file, fsync, rename over, fsync the directory.
    pub fn save(&self, path: &Path) -> ReplResult<()> {
        let err = |p: &Path, e: std::io::Error| ReplError::Config(format!("{}: {e}", p.display()));
        let tmp = PathBuf::from(format!("{}.tmp", path.display()));
        let body = serde_json::to_vec_pretty(self)
            .map_err(|e| ReplError::Config(format!("{}: {e}", path.display())))?;
        let mut f = std::fs::File::create(&tmp).map_err(|e| err(&tmp, e))?;
        f.write_all(&body).map_err(|e| err(&tmp, e))?;
        f.sync_all().map_err(|e| err(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| err(path, e))?;
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        let dir = dir.unwrap_or(Path::new("."));
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| err(dir, e))
    }
}

/// Replication state as `rbd mirror image status` names them.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Connected, shipping intervals as they come.
    Replaying,
    /// A first full copy (no common snapshot) is being shipped.
    Syncing,
    /// Not running.
    #[default]
    Stopped,
    /// The last attempt failed (see `last_error`); retrying.
    Error,
}

/// What `repl status --json` shows, on either side.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// `primary` or `secondary`.
    pub role: String,
    /// Volume uuid.
    pub volume: String,
    /// State.
    pub state: Phase,
    /// Last snapshot complete on the secondary (0: none).
    pub last_synced_snapshot: u64,
    /// When the primary took it (seconds since the epoch; 0: never).
    pub last_synced_time: u64,
    /// Now minus that time (how old the secondary's copy is).
    pub seconds_behind: u64,
    /// On the primary: when it took that snapshot, in milliseconds (0: not known here).
    #[serde(default)]
    pub last_synced_ms: u64,
    /// On the primary: now minus `last_synced_ms` (the lag in milliseconds; 0 when not
    /// known).
    #[serde(default)]
    pub lag_ms: u64,
    /// Bytes of the interval in flight not yet sent.
    pub bytes_pending: u64,
    /// Blocks of the interval in flight not yet sent.
    pub blocks_pending: u64,
    /// Bytes per second over the last interval.
    pub throughput: u64,
    /// Volume data bytes shipped (DATA payloads) since start.
    pub bytes_shipped: u64,
    /// Volume data bytes the secondary already held and mapped from their hash (dedup
    /// pools): sent as 16-byte references instead.
    #[serde(default)]
    pub bytes_referenced: u64,
    /// Intervals completed since start.
    pub intervals: u64,
    /// Last error, if any.
    pub last_error: Option<String>,
}

impl Status {
    /// The status with `seconds_behind` brought up to now.
    pub fn current(&self) -> Status {
        let mut s = self.clone();
        if s.last_synced_time != 0 {
            s.seconds_behind = now_secs().saturating_sub(s.last_synced_time);
        }
        if s.last_synced_ms != 0 {
            s.lag_ms = now_ms().saturating_sub(s.last_synced_ms);
        }
        s
    }
}
