//! The volume daemon: named devices built from tables, each exposed as `/dev/ublkbN` or over
//! NBD, managed over a control socket, persisted in a state directory.
//!
//! - One daemon per state directory (an exclusive `flock` on `daemon.lock`).
//! - The control socket `control.sock` is created with mode 0600: root only. Each client is
//!   served on its own thread with a read timeout and a size limit, so a stuck client or a
//!   device stuck in I/O never blocks another command ([`control_server`]).
//! - `devices.json` lists every device record (name, table, ublk id, NBD address) in creation
//!   order ([`state`]). A record goes only when an administrator removes the device: a device
//!   that cannot be restored stays listed as `failed` with its reason and can be retried.
//! - Tables may use other devices of the same daemon as extents by naming them
//!   `/dev/volmgr/NAME` (or any kernel alias of one: `/dev/ublkbN`, `major:minor`, a
//!   symlink): the daemon rewrites such aliases to `/dev/volmgr/NAME`, resolves that name to
//!   its own device object (no round trip through the kernel), refuses a table that would make
//!   a device use itself, and restores devices in dependency order ([`graph`]). For ublk
//!   devices it also keeps `/dev/volmgr/NAME` as a symlink to `/dev/ublkbN`, so the same table
//!   means the same thing to kernel tools.
//! - Each device sits behind a [`Switchable`], which gives dmsetup's suspend / reload / resume.
//!   Operations on one device are serialized by that device's own lock; the lock over the set
//!   of devices is never held across I/O.

mod control_server;
mod graph;
mod mountns;
mod ops;
mod restore;
mod service;
mod state;

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tables::registry::{Registry, Resolver};
use tables::switch::Switchable;
use tables::table::Table;
use tables::{BlockDevice, DeviceRef};

use crate::control::{DeviceInfo, ExtentInfo, Reply, Request};
use crate::frontend::Frontend;

pub use mountns::enter_private_mount_ns;
pub use service::Service;
pub use state::PersistedDevice;

/// Prefix under which tables name the daemon's own devices.
pub const DEVICE_PREFIX: &str = "/dev/volmgr/";

/// Errors that stop the daemon from starting.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Another daemon holds the state directory.
    #[error("another volmgr daemon already runs on state directory {0}")]
    AlreadyRunning(String),
    /// State directory or socket trouble.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// devices.json is unreadable.
    #[error("state file {path} is corrupt: {msg}")]
    CorruptState {
        /// File.
        path: String,
        /// Parser message.
        msg: String,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DaemonError {
    let what = what.into();
    move |source| DaemonError::Io { what, source }
}

/// Daemon configuration.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// State directory (lock, socket, devices.json).
    pub state_dir: PathBuf,
    /// Whether ublk may be used (false where `/dev/ublk-control` is missing).
    pub ublk_available: bool,
    /// Run in a private mount namespace (see [`enter_private_mount_ns`]).
    pub private_mount_ns: bool,
    /// Longest a control command waits for a device's I/O (the drain and flush of a suspend,
    /// the final flush of a remove, a target message) before it gives up with an error
    /// naming the device; the daemon and every other device keep serving meanwhile.
    pub io_timeout: Duration,
    /// Limits of every NBD export (a device's own `nbd_limits` go over these).
    pub nbd_limits: nbd::Limits,
    /// TLS offered or required on every NBD export, with its credentials.
    pub nbd_tls: Option<nbd::Tls>,
}

impl DaemonConfig {
    /// A configuration with the defaults for everything but the state directory.
    pub fn new(state_dir: impl Into<PathBuf>) -> DaemonConfig {
        DaemonConfig {
            state_dir: state_dir.into(),
            ublk_available: Path::new("/dev/ublk-control").exists(),
            private_mount_ns: true,
            io_timeout: Duration::from_secs(60),
            nbd_limits: nbd::Limits::default(),
            nbd_tls: None,
        }
    }
}

/// A running device: its table, its I/O gate and its front end.
struct Live {
    table: Table,
    sw: Arc<Switchable>,
    front: Frontend,
}

/// Where a device record stands.
enum State {
    /// Listed in devices.json, not brought up yet (restore is running or was interrupted).
    Pending,
    /// Being built (create, retry, reload of a failed device).
    Building,
    /// Serving.
    Active(Live),
    /// Could not be built or restored; the record stays until removed and can be retried.
    Failed(String),
    /// Being removed or stopped.
    Stopping,
}

impl State {
    fn word(&self, live_suspended: bool) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Building => "building",
            State::Active(_) if live_suspended => "suspended",
            State::Active(_) => "active",
            State::Failed(_) => "failed",
            State::Stopping => "stopping",
        }
    }
}

struct Entry {
    rec: PersistedDevice,
    state: State,
    /// Serializes the administrator's operations on this device (create, reload, suspend,
    /// resume, remove, retry); never held by list, table or status.
    op: Arc<Mutex<()>>,
}

#[derive(Default)]
struct Devices {
    map: BTreeMap<String, Entry>,
    /// Creation order (devices.json order).
    order: Vec<String>,
}

impl Devices {
    fn records(&self) -> Vec<PersistedDevice> {
        self.order
            .iter()
            .filter_map(|n| self.map.get(n).map(|e| e.rec.clone()))
            .collect()
    }

    fn remove(&mut self, name: &str) -> Option<Entry> {
        self.order.retain(|n| n != name);
        self.map.remove(name)
    }
}

/// The running daemon.
pub struct Daemon {
    cfg: DaemonConfig,
    registry: Registry,
    base: Arc<dyn Resolver + Send + Sync>,
    devices: Mutex<Devices>,
    /// Serializes rewrites of devices.json.
    save_lock: Mutex<()>,
    stop: AtomicBool,
    /// Control clients being served right now.
    clients: AtomicUsize,
    /// Services living beside the devices, by name.
    services: Mutex<BTreeMap<String, Arc<dyn Service>>>,
    _lock: std::fs::File,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while a lock was held is caught per request; the data it guards (maps of
    // records, counters) stays consistent at every await-free step, so carry on.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Daemon {
    /// Takes the state directory's lock and prepares the daemon (devices are restored by
    /// [`Daemon::restore`]).
    pub fn open(
        cfg: DaemonConfig,
        registry: Registry,
        base: Arc<dyn Resolver + Send + Sync>,
    ) -> Result<Daemon, DaemonError> {
        std::fs::create_dir_all(&cfg.state_dir)
            .map_err(io_err(format!("creating {}", cfg.state_dir.display())))?;
        let lock_path = cfg.state_dir.join("daemon.lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(format!("opening {}", lock_path.display())))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(DaemonError::AlreadyRunning(
                cfg.state_dir.display().to_string(),
            ));
        }
        Ok(Daemon {
            cfg,
            registry,
            base,
            devices: Mutex::new(Devices::default()),
            save_lock: Mutex::new(()),
            stop: AtomicBool::new(false),
            clients: AtomicUsize::new(0),
            services: Mutex::new(BTreeMap::new()),
            _lock: lock,
        })
    }

    fn devs(&self) -> MutexGuard<'_, Devices> {
        lock(&self.devices)
    }

    fn state_file(&self) -> PathBuf {
        self.cfg.state_dir.join("devices.json")
    }

    /// Path of the control socket.
    pub fn socket_path(&self) -> PathBuf {
        self.cfg.state_dir.join("control.sock")
    }

    /// Reads devices.json.
    pub fn load_state(&self) -> Result<Vec<PersistedDevice>, DaemonError> {
        state::load(&self.state_file())
    }

    /// Writes every record (whatever its state) to devices.json.
    fn save_state(&self) -> Result<(), String> {
        let _g = lock(&self.save_lock);
        let list = self.devs().records();
        state::save(&self.state_file(), &list)
    }

    /// Whether a stop was requested (signal or `Shutdown` request).
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Asks the daemon to stop (from a signal thread, at any time: during restore too);
    /// wakes the control loop with a dummy connection.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::os::unix::net::UnixStream::connect(self.socket_path());
    }

    /// How many device records the daemon holds (whatever their state).
    pub fn device_count(&self) -> usize {
        self.devs().map.len()
    }

    /// Names of the devices that are failed right now, with their reasons.
    pub fn failed_devices(&self) -> Vec<(String, String)> {
        let d = self.devs();
        d.order
            .iter()
            .filter_map(|n| match d.map.get(n).map(|e| &e.state) {
                Some(State::Failed(why)) => Some((n.clone(), why.clone())),
                Some(State::Active(l)) => l.front.failed().map(|why| (n.clone(), why)),
                _ => None,
            })
            .collect()
    }

    /// The daemon's own devices that tables can use, by name.
    fn active_devices(&self) -> BTreeMap<String, DeviceRef> {
        self.devs()
            .map
            .iter()
            .filter_map(|(n, e)| match &e.state {
                State::Active(l) => Some((n.clone(), l.sw.clone() as DeviceRef)),
                _ => None,
            })
            .collect()
    }

    /// A resolver that knows this daemon's devices (`/dev/volmgr/NAME`) and otherwise defers to
    /// the base resolver (absolute paths, `major:minor`, remote extents' URIs).
    fn resolver(&self) -> impl Resolver + '_ {
        let known = self.active_devices();
        move |dev: &str| -> Result<DeviceRef, String> {
            if let Some(name) = dev.strip_prefix(DEVICE_PREFIX) {
                return known.get(name).cloned().ok_or_else(|| {
                    match self.devs().map.get(name).map(|e| &e.state) {
                        Some(State::Failed(why)) => {
                            format!("volmgr device '{name}' is failed ({why})")
                        }
                        Some(s) => format!("volmgr device '{name}' is {}", s.word(false)),
                        None => format!("no volmgr device named '{name}'"),
                    }
                });
            }
            let remote = self.base.check_remote(dev).is_some();
            if !remote && !dev.starts_with('/') && !is_devnum(dev) {
                return Err(format!(
                    "'{dev}' is a relative path, which means nothing to the daemon: give an \
                     absolute path (the volmgr CLI makes table paths absolute)"
                ));
            }
            self.base.open(dev)
        }
    }

    /// The remote extents `table` names, with their health.
    pub(super) fn extents_of(&self, table: &Table) -> Vec<ExtentInfo> {
        let mut out: Vec<ExtentInfo> = Vec::new();
        for d in table.devices(&self.registry) {
            if out.iter().any(|x| x.name == d.name) {
                continue;
            }
            if let Some(h) = self.base.extent_health(&d.name) {
                out.push(ExtentInfo {
                    name: d.name.clone(),
                    health: h,
                });
            }
        }
        out
    }

    fn info(&self, e: &Entry) -> DeviceInfo {
        let mut info = DeviceInfo {
            name: e.rec.name.clone(),
            path: String::new(),
            size: 0,
            state: e.state.word(false).into(),
            segments: 0,
            targets: String::new(),
            reads: 0,
            writes: 0,
            read_bytes: 0,
            write_bytes: 0,
            errors: 0,
            data_path: String::new(),
            error: None,
            extents: Vec::new(),
        };
        match &e.state {
            State::Active(l) => {
                let st = &l.sw.stats;
                let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
                info.path = l.front.path();
                info.size = l.sw.size().0;
                info.state = e.state.word(l.sw.is_suspended()).into();
                info.segments = l.table.segments.len();
                info.targets = targets_of(&l.table);
                info.reads = ld(&st.reads);
                info.writes = ld(&st.writes);
                info.read_bytes = ld(&st.read_bytes);
                info.write_bytes = ld(&st.write_bytes);
                info.errors = ld(&st.errors);
                info.data_path = l.front.data_path().to_string();
                info.extents = self.extents_of(&l.table);
                if let Some(why) = l.front.failed() {
                    info.state = "failed".into();
                    info.error = Some(why);
                }
            }
            State::Failed(why) => {
                info.error = Some(why.clone());
                if let Ok(t) = Table::parse(&e.rec.table, &self.registry) {
                    info.size = t.size().bytes().0;
                    info.segments = t.segments.len();
                    info.targets = targets_of(&t);
                }
            }
            _ => {}
        }
        info
    }

    /// Handles one control request. A panic while handling it answers it with an error; the
    /// daemon and its devices keep serving.
    pub fn handle(&self, req: Request) -> Reply {
        let op = req.op_name();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.dispatch(req))) {
            Ok(r) => r,
            Err(p) => {
                let what = panic_text(&*p);
                log::error!("control request '{op}' panicked: {what}");
                Reply::Error {
                    message: format!(
                        "internal error while handling '{op}': {what} (the daemon keeps serving)"
                    ),
                }
            }
        }
    }

    fn dispatch(&self, req: Request) -> Reply {
        let r: Result<String, String> = match req {
            Request::Create {
                name,
                table,
                ublk_id,
                nbd,
                nbd_limits,
                internal,
                export,
            } => self.create(PersistedDevice {
                name,
                table,
                ublk_id,
                nbd,
                nbd_limits,
                internal,
                export,
            }),
            Request::List => {
                let d = self.devs();
                return Reply::Devices {
                    devices: d
                        .order
                        .iter()
                        .filter_map(|n| d.map.get(n).map(|e| self.info(e)))
                        .collect(),
                };
            }
            Request::Table { name } => self.table_of(&name),
            Request::Reload { name, table } => self.reload(&name, &table, true),
            Request::ReloadNoFlush { name, table } => self.reload(&name, &table, false),
            Request::Suspend { name } => self.suspend(&name),
            Request::Resume { name } => self.resume(&name),
            Request::Remove { name, force } => self.remove(&name, force),
            Request::Retry { name } => self.retry(&name),
            Request::Message { name, args } => self.message(&name, args),
            Request::Status { name } => self.status(&name),
            Request::Shutdown => {
                self.stop.store(true, Ordering::SeqCst);
                Ok("shutting down".into())
            }
            Request::Service { service, args } => self.service_request(&service, &args),
        };
        match r {
            Ok(text) => Reply::Ok { text },
            Err(message) => Reply::Error { message },
        }
    }
}

fn targets_of(t: &Table) -> String {
    t.segments
        .iter()
        .map(|s| s.target.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// The message of a caught panic.
fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

/// `major:minor`, as dmsetup prints devices.
fn is_devnum(s: &str) -> bool {
    let digits = |x: &str| !x.is_empty() && x.bytes().all(|c| c.is_ascii_digit());
    s.split_once(':')
        .is_some_and(|(a, b)| digits(a) && digits(b))
}

/// Device names: what is safe in a path and a table line.
pub fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 127
        && !n.starts_with('.')
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+'))
}

fn link_device(name: &str, target: &str) {
    let dir = Path::new(DEVICE_PREFIX);
    if std::fs::create_dir_all(dir).is_ok() {
        let link = dir.join(name);
        let _ = std::fs::remove_file(&link);
        let _ = std::os::unix::fs::symlink(target, link);
    }
}

fn unlink_device(name: &str) {
    let _ = std::fs::remove_file(Path::new(DEVICE_PREFIX).join(name));
}

#[cfg(test)]
mod tests;
