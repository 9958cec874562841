//! The daemon's control protocol: one JSON request per line on a unix socket, one JSON reply.
//!
//! The socket lives in the state directory with mode 0600 (root only); the CLI verbs
//! (`volmgr dev ...`) are thin clients of it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A request from the CLI.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Create a device from a table and expose it.
    Create {
        /// Device name (unique).
        name: String,
        /// Table text.
        table: String,
        /// Requested ublk device id.
        ublk_id: Option<u32>,
        /// Export over NBD at this address instead of (or where there is no) ublk.
        nbd: Option<String>,
        /// NBD limits of this device over the daemon's defaults.
        #[serde(default, skip_serializing_if = "NbdOverrides::is_empty")]
        nbd_limits: NbdOverrides,
        /// No front end: the device only serves the daemon's other devices, whose tables
        /// name it as `/dev/volmgr/NAME` (LVM's sub-LVs: raid images, thin data/metadata).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        internal: bool,
        /// The NBD export name, when not the device name (LVM's `VG/LV`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        export: Option<String>,
    },
    /// List devices.
    List,
    /// Print a device's table.
    Table {
        /// Device name.
        name: String,
    },
    /// Stage a new table and swap it in (suspend, swap, resume).
    Reload {
        /// Device name.
        name: String,
        /// New table text.
        table: String,
    },
    /// [`Request::Reload`] without the flush of the old table (dmsetup's `--noflush`): for a
    /// table whose devices are gone (a raid leg on a dead host being replaced), whose flush
    /// can only fail. In-flight requests are still drained.
    ReloadNoFlush {
        /// Device name.
        name: String,
        /// New table text.
        table: String,
    },
    /// Stop admitting I/O, drain, flush.
    Suspend {
        /// Device name.
        name: String,
    },
    /// Admit I/O again.
    Resume {
        /// Device name.
        name: String,
    },
    /// Flush and remove a device.
    Remove {
        /// Device name.
        name: String,
        /// Remove even if open or mounted.
        force: bool,
    },
    /// Send a target message (dmsetup message).
    Message {
        /// Device name.
        name: String,
        /// Message words.
        args: Vec<String>,
    },
    /// Status line(s) of a device.
    Status {
        /// Device name.
        name: String,
    },
    /// Build a failed device again from its recorded table.
    Retry {
        /// Device name.
        name: String,
    },
    /// Ask the daemon to stop (as SIGTERM).
    Shutdown,
    /// A request for a service living in the daemon beside its devices (replication...).
    Service {
        /// The service's name (`repl`).
        service: String,
        /// Its words.
        args: Vec<String>,
    },
}

impl Request {
    /// The operation's name as it travels (`create`, `list`...), for messages.
    pub fn op_name(&self) -> &'static str {
        match self {
            Request::Create { .. } => "create",
            Request::List => "list",
            Request::Table { .. } => "table",
            Request::Reload { .. } => "reload",
            Request::ReloadNoFlush { .. } => "reload --noflush",
            Request::Suspend { .. } => "suspend",
            Request::Resume { .. } => "resume",
            Request::Remove { .. } => "remove",
            Request::Message { .. } => "message",
            Request::Status { .. } => "status",
            Request::Retry { .. } => "retry",
            Request::Shutdown => "shutdown",
            Request::Service { .. } => "service",
        }
    }
}

/// NBD server limits set for one device (or one `serve`), each over a default that comes
/// from the daemon's configuration (see [`nbd::Limits`] for what each means).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NbdOverrides {
    /// [`nbd::Limits::max_connections`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// [`nbd::Limits::memory_budget_bytes`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_budget_bytes: Option<u64>,
    /// [`nbd::Limits::idle_timeout_ms`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_timeout_ms: Option<u64>,
    /// [`nbd::Limits::handshake_timeout_ms`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handshake_timeout_ms: Option<u64>,
}

impl NbdOverrides {
    /// Whether nothing is set.
    pub fn is_empty(&self) -> bool {
        *self == NbdOverrides::default()
    }

    /// `base` with these values put over it; the result is validated, and the error names
    /// the field.
    pub fn apply(&self, base: &nbd::Limits) -> Result<nbd::Limits, String> {
        let mut l = *base;
        if let Some(v) = self.max_connections {
            l.max_connections = v;
        }
        if let Some(v) = self.memory_budget_bytes {
            l.memory_budget_bytes = v;
        }
        if let Some(v) = self.idle_timeout_ms {
            l.idle_timeout_ms = v;
        }
        if let Some(v) = self.handshake_timeout_ms {
            l.handshake_timeout_ms = v;
        }
        l.validate().map(|()| l)
    }
}

/// One device in a listing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeviceInfo {
    /// Name.
    pub name: String,
    /// `/dev/ublkbN`, or `nbd://ADDR/NAME`.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// `active`, `suspended`, `failed` (see `error`), `pending` (not restored yet),
    /// `building`, `stopping`.
    pub state: String,
    /// Number of table lines.
    pub segments: usize,
    /// Target types used, in order (`striped`, `linear,linear`).
    pub targets: String,
    /// Completed reads.
    pub reads: u64,
    /// Completed writes.
    pub writes: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Failed requests.
    pub errors: u64,
    /// How request data moves: `zero-copy` (ublk with `UBLK_F_AUTO_BUF_REG`), `copy` (ublk,
    /// the driver copies), `nbd`; empty while the device has no front end.
    #[serde(default)]
    pub data_path: String,
    /// Why the device is failed (could not be built or restored, or its front end died).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The remote extents (NBD exports...) its table uses, and how their connections are.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extents: Vec<ExtentInfo>,
}

/// A remote extent of a device's table, in a listing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct ExtentInfo {
    /// The extent as the table names it (its URI; it holds no secret).
    pub name: String,
    /// Its connections and errors.
    #[serde(flatten)]
    pub health: tables::registry::ExtentHealth,
}

impl ExtentInfo {
    /// One line for `dev status`.
    pub fn line(&self) -> String {
        format!("extent {}", self.health.line(&self.name))
    }
}

/// A reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Reply {
    /// Success with a text payload (a path, a table, a status line, a message reply).
    Ok {
        /// Text for the user.
        text: String,
    },
    /// A device listing.
    Devices {
        /// The devices.
        devices: Vec<DeviceInfo>,
    },
    /// Failure, with a message that names the device.
    Error {
        /// What went wrong.
        message: String,
    },
}

/// Errors talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No daemon listens on the socket.
    #[error("cannot reach the volmgr daemon at {path}: {source} (is `volmgr daemon` running?)")]
    Connect {
        /// Socket path.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The conversation failed.
    #[error("control socket I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The daemon sent something that is not a reply.
    #[error("bad reply from the daemon: {0}")]
    BadReply(String),
}

/// Sends one request and waits for the reply (long operations such as a suspend that drains
/// I/O may take a while: the timeout is generous).
pub fn call(socket: &Path, req: &Request) -> Result<Reply, ControlError> {
    let mut s = UnixStream::connect(socket).map_err(|e| ControlError::Connect {
        path: socket.display().to_string(),
        source: e,
    })?;
    s.set_read_timeout(Some(Duration::from_secs(600)))?;
    let mut line = serde_json::to_string(req).map_err(|e| ControlError::BadReply(e.to_string()))?;
    line.push('\n');
    s.write_all(line.as_bytes())?;
    let mut r = BufReader::new(s);
    let mut resp = String::new();
    r.read_line(&mut resp)?;
    serde_json::from_str(&resp).map_err(|e| ControlError::BadReply(format!("{e}: {resp:?}")))
}
