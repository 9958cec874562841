//! The volume daemon: named devices built from tables, each exposed as `/dev/ublkbN` or over
//! NBD, managed over a control socket, persisted in a state directory.
//!
//! - One daemon per state directory (an exclusive `flock` on `daemon.lock`).
//! - The control socket `control.sock` is created with mode 0600: root only.
//! - `devices.json` lists every device (name, table, ublk id, NBD address) in creation order; it
//!   is rewritten atomically on every change, and on start the daemon re-creates (or, after a
//!   crash, re-attaches through ublk user recovery) every device in it.
//! - Tables may use other devices of the same daemon as extents by naming them
//!   `/dev/volmgr/NAME`: the daemon resolves that name to its own device object (no round trip
//!   through the kernel), and for ublk devices also keeps `/dev/volmgr/NAME` as a symlink to
//!   `/dev/ublkbN`, so the same table means the same thing to kernel tools.
//! - Each device sits behind a [`Switchable`], which gives dmsetup's suspend / reload / resume.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use tables::registry::{Registry, Resolver};
use tables::switch::Switchable;
use tables::table::Table;
use tables::{BlockDevice, DeviceRef};

use crate::control::{DeviceInfo, Reply, Request};
use crate::frontend::{Frontend, FrontendKind};

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

/// What the daemon persists about one device.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PersistedDevice {
    /// Name.
    pub name: String,
    /// Table text as given.
    pub table: String,
    /// ublk device id, if exposed through ublk.
    pub ublk_id: Option<u32>,
    /// NBD address, if exported over NBD.
    pub nbd: Option<String>,
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
}

struct Device {
    persisted: PersistedDevice,
    table: Table,
    sw: Arc<Switchable>,
    front: Option<Frontend>,
}

/// The running daemon.
pub struct Daemon {
    cfg: DaemonConfig,
    registry: Registry,
    base: Arc<dyn Resolver + Send + Sync>,
    devices: Mutex<BTreeMap<String, Device>>,
    /// Creation order (for persistence and orderly shutdown).
    order: Mutex<Vec<String>>,
    stop: AtomicBool,
    _lock: std::fs::File,
}

/// Makes this process's mounts private in a new mount namespace: a ublk server that shares the
/// mount namespace of a mounted `/dev/ublkbN` can deadlock on exit (the kernel waits for the
/// device's last opener while the opener waits for the server).
///
/// The new namespace starts as a copy of the caller's, so a daemon restarted after a crash
/// while a `/dev/ublkbN` is mounted would hold its own copy of that mount: the administrator's
/// `umount` would then leave the filesystem alive (dirty, "in use") inside the daemon, and
/// stopping the device would hit it with I/O errors and hang. So every filesystem on a ublk
/// device is detached from the new namespace (only there; the caller's mounts are untouched).
pub fn enter_private_mount_ns() -> std::io::Result<()> {
    // SAFETY: plain syscalls with constant arguments.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let root = c"/";
        if libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    detach_ublk_mounts();
    Ok(())
}

/// Lazily unmounts, in this process's (private) mount namespace, every filesystem whose source
/// is a ublk block device (by name or by the `ublkb` block major). Failures are logged: a
/// mount left behind only matters if that device is later stopped while it is still mounted.
fn detach_ublk_mounts() {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let ublk_major = std::fs::read_to_string("/proc/devices").ok().and_then(|d| {
        d.split("Block devices:").nth(1).and_then(|b| {
            b.lines().find_map(|l| {
                let mut w = l.split_whitespace();
                let major = w.next()?;
                (w.next() == Some("ublkb")).then(|| major.to_string())
            })
        })
    });
    // Children before parents: mountinfo lists parents first.
    for line in info.lines().rev() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let (Some(majmin), Some(target), Some(source)) =
            (fields.get(2), fields.get(4), fields.get(sep + 2))
        else {
            continue;
        };
        let by_major = ublk_major
            .as_deref()
            .is_some_and(|m| majmin.split(':').next() == Some(m));
        if !(by_major || source.starts_with("/dev/ublkb")) {
            continue;
        }
        let target = unescape_mountinfo(target);
        let Ok(c) = std::ffi::CString::new(target.clone()) else {
            continue;
        };
        // SAFETY: umount2 with a valid NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            log::warn!(
                "cannot detach {source} on {target} from the daemon's mount namespace: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .map(|d| d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0')))
            .and_then(|v| u8::try_from(v).ok());
        if let Some(v) = oct {
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
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
            devices: Mutex::new(BTreeMap::new()),
            order: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            _lock: lock,
        })
    }

    fn devs(&self) -> MutexGuard<'_, BTreeMap<String, Device>> {
        self.devices.lock().unwrap_or_else(|e| e.into_inner())
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
        let p = self.state_file();
        match std::fs::read_to_string(&p) {
            Ok(s) => serde_json::from_str(&s).map_err(|e| DaemonError::CorruptState {
                path: p.display().to_string(),
                msg: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(io_err(format!("reading {}", p.display()))(e)),
        }
    }

    fn save_state(&self) -> Result<(), String> {
        let list: Vec<PersistedDevice> = {
            let devs = self.devs();
            let order = self.order.lock().unwrap_or_else(|e| e.into_inner());
            order
                .iter()
                .filter_map(|n| devs.get(n).map(|d| d.persisted.clone()))
                .collect()
        };
        let p = self.state_file();
        let tmp = p.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(&list).map_err(|e| e.to_string())?;
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &p)?;
            std::fs::File::open(&self.cfg.state_dir)?.sync_all()
        };
        write().map_err(|e| format!("saving {}: {e}", p.display()))
    }

    /// Re-creates every persisted device; after a crash, ublk devices still present in the
    /// kernel are re-attached through user recovery. Failures are reported per device and the
    /// others still come up.
    pub fn restore(&self) -> Result<Vec<String>, DaemonError> {
        let mut problems = Vec::new();
        for p in self.load_state()? {
            let name = p.name.clone();
            if let Err(e) = self.create(p, true) {
                problems.push(format!("{name}: {e}"));
            }
        }
        Ok(problems)
    }

    /// A resolver that knows this daemon's devices (`/dev/volmgr/NAME`) and otherwise defers to
    /// the base resolver (paths, `major:minor`).
    fn resolver(&self) -> impl Resolver + '_ {
        let known: BTreeMap<String, DeviceRef> = self
            .devs()
            .iter()
            .map(|(n, d)| (n.clone(), d.sw.clone() as DeviceRef))
            .collect();
        move |dev: &str| -> Result<DeviceRef, String> {
            if let Some(name) = dev.strip_prefix(DEVICE_PREFIX) {
                return known
                    .get(name)
                    .cloned()
                    .ok_or_else(|| format!("no volmgr device named '{name}'"));
            }
            self.base.open(dev)
        }
    }

    fn build_table(&self, name: &str, text: &str) -> Result<(Table, DeviceRef), String> {
        let table = Table::parse(text, &self.registry).map_err(|e| format!("{name}: {e}"))?;
        let dev = table
            .build(&self.registry, &self.resolver())
            .map_err(|e| format!("{name}: {e}"))?;
        Ok((table, dev))
    }

    fn create(&self, p: PersistedDevice, restoring: bool) -> Result<String, String> {
        if !valid_name(&p.name) {
            return Err(format!(
                "invalid device name '{}': use letters, digits, '-', '_', '.'",
                p.name
            ));
        }
        if self.devs().contains_key(&p.name) {
            return Err(format!("device '{}' already exists", p.name));
        }
        let (table, dev) = self.build_table(&p.name, &p.table)?;
        let sw = Arc::new(Switchable::new(p.name.clone(), dev));
        let kind = match (&p.nbd, self.cfg.ublk_available) {
            (Some(addr), _) => FrontendKind::Nbd(addr.clone()),
            (None, true) => FrontendKind::Ublk(p.ublk_id),
            (None, false) => {
                return Err(format!(
                    "{}: this host has no ublk (/dev/ublk-control is missing); give --nbd ADDR to export it over NBD",
                    p.name
                ))
            }
        };
        let front = Frontend::start(&p.name, sw.clone() as DeviceRef, kind, restoring)
            .map_err(|e| format!("{}: {e}", p.name))?;
        let path = front.path();
        let mut persisted = p;
        if let Some(id) = front.ublk_id() {
            persisted.ublk_id = Some(id);
            link_device(&persisted.name, &path);
        }
        let name = persisted.name.clone();
        self.devs().insert(
            name.clone(),
            Device {
                persisted,
                table,
                sw,
                front: Some(front),
            },
        );
        self.order
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(name.clone());
        self.save_state()?;
        Ok(path)
    }

    fn info(d: &Device) -> DeviceInfo {
        let st = &d.sw.stats;
        let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        DeviceInfo {
            name: d.persisted.name.clone(),
            path: d.front.as_ref().map(|f| f.path()).unwrap_or_default(),
            size: d.sw.size().0,
            state: if d.sw.is_suspended() {
                "suspended".into()
            } else {
                "active".into()
            },
            segments: d.table.segments.len(),
            targets: d
                .table
                .segments
                .iter()
                .map(|s| s.target.as_str())
                .collect::<Vec<_>>()
                .join(","),
            reads: ld(&st.reads),
            writes: ld(&st.writes),
            read_bytes: ld(&st.read_bytes),
            write_bytes: ld(&st.write_bytes),
            errors: ld(&st.errors),
            data_path: d
                .front
                .as_ref()
                .map(|f| f.data_path().to_string())
                .unwrap_or_default(),
        }
    }

    fn switch_of(&self, name: &str) -> Result<Arc<Switchable>, String> {
        self.devs()
            .get(name)
            .map(|d| d.sw.clone())
            .ok_or_else(|| format!("no device named '{name}'"))
    }

    /// Names of devices whose tables use `name`.
    fn users_of(&self, name: &str) -> Vec<String> {
        let needle = format!("{DEVICE_PREFIX}{name}");
        self.devs()
            .values()
            .filter(|d| {
                d.table
                    .segments
                    .iter()
                    .any(|s| s.args.iter().any(|a| a == &needle))
            })
            .map(|d| d.persisted.name.clone())
            .collect()
    }

    fn reload(&self, name: &str, text: &str) -> Result<String, String> {
        let sw = self.switch_of(name)?;
        let (table, dev) = self.build_table(name, text)?;
        let new_size = dev.size();
        let old_size = sw.size();
        if new_size != old_size {
            let fixed = self
                .devs()
                .get(name)
                .and_then(|d| d.front.as_ref().map(|f| !f.can_resize()))
                .unwrap_or(false);
            if fixed {
                // Swapping anyway would leave the table and the kernel's idea of the size
                // apart (and `dev list` showing a size the block device does not have).
                return Err(format!(
                    "{name}: the new table is {} bytes and the device {} bytes, but this                      kernel's ublk driver cannot resize a live device (UBLK_U_CMD_UPDATE_SIZE                      needs Linux 6.16 or later); reload refused, the old table stays",
                    new_size.0, old_size.0
                ));
            }
        }
        sw.load(dev).map_err(|e| e.to_string())?;
        iort::block_on(sw.suspend())
            .map_err(|e| format!("{name}: suspend: {e}"))?
            .map_err(|e| {
                sw.resume();
                format!("{name}: flush before reload failed: {e}")
            })?;
        sw.resume();
        let mut devs = self.devs();
        let resize = if let Some(d) = devs.get_mut(name) {
            d.table = table;
            d.persisted.table = text.to_string();
            d.front.as_ref().map(|f| f.resize(new_size))
        } else {
            None
        };
        drop(devs);
        self.save_state()?;
        if let Some(Err(e)) = resize {
            return Err(format!(
                "{name}: table reloaded but the front end did not take the new size: {e}"
            ));
        }
        Ok(format!("{name}: table reloaded ({} bytes)", new_size.0))
    }

    fn remove(&self, name: &str, force: bool) -> Result<String, String> {
        let users = self.users_of(name);
        if !users.is_empty() {
            return Err(format!(
                "{name} is used by {}: remove those first",
                users.join(", ")
            ));
        }
        let front_busy = {
            let devs = self.devs();
            let d = devs
                .get(name)
                .ok_or_else(|| format!("no device named '{name}'"))?;
            d.front.as_ref().map(|f| f.busy()).unwrap_or(None)
        };
        if let Some(why) = front_busy {
            if !force {
                return Err(format!(
                    "{name} is {why}; refusing to remove it (use --force)"
                ));
            }
        }
        let mut d = self
            .devs()
            .remove(name)
            .ok_or_else(|| format!("no device named '{name}'"))?;
        self.order
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|n| n != name);
        let flushed = iort::block_on(d.sw.flush())
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        if let Some(f) = d.front.take() {
            f.stop()
                .map_err(|e| format!("{name}: stopping front end: {e}"))?;
        }
        unlink_device(name);
        self.save_state()?;
        flushed.map_err(|e| format!("{name}: removed, but the final flush failed: {e}"))?;
        Ok(format!("{name}: removed"))
    }

    /// Handles one control request.
    pub fn handle(&self, req: Request) -> Reply {
        let r: Result<String, String> = match req {
            Request::Create {
                name,
                table,
                ublk_id,
                nbd,
            } => self.create(
                PersistedDevice {
                    name,
                    table,
                    ublk_id,
                    nbd,
                },
                false,
            ),
            Request::List => {
                let devs = self.devs();
                let order = self.order.lock().unwrap_or_else(|e| e.into_inner());
                return Reply::Devices {
                    devices: order
                        .iter()
                        .filter_map(|n| devs.get(n).map(Daemon::info))
                        .collect(),
                };
            }
            Request::Table { name } => self
                .devs()
                .get(&name)
                .map(|d| d.table.to_string())
                .ok_or_else(|| format!("no device named '{name}'")),
            Request::Reload { name, table } => self.reload(&name, &table),
            Request::Suspend { name } => self.switch_of(&name).and_then(|sw| {
                iort::block_on(sw.suspend())
                    .map_err(|e| e.to_string())?
                    .map_err(|e| format!("{name}: flush on suspend: {e}"))?;
                Ok(format!("{name}: suspended"))
            }),
            Request::Resume { name } => self.switch_of(&name).map(|sw| {
                sw.resume();
                format!("{name}: resumed")
            }),
            Request::Remove { name, force } => self.remove(&name, force),
            Request::Message { name, args } => self.switch_of(&name).and_then(|sw| {
                iort::block_on(sw.message(&args))
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())
            }),
            Request::Status { name } => self.switch_of(&name).map(|sw| sw.status()),
            Request::Shutdown => {
                self.stop.store(true, Ordering::SeqCst);
                Ok("shutting down".into())
            }
        };
        match r {
            Ok(text) => Reply::Ok { text },
            Err(message) => Reply::Error { message },
        }
    }

    /// Serves the control socket until a shutdown request or [`Daemon::request_stop`].
    pub fn serve_control(self: &Arc<Self>) -> Result<(), DaemonError> {
        let sock = self.socket_path();
        let _ = std::fs::remove_file(&sock); // stale socket of a dead daemon: we hold the lock
                                             // SAFETY: umask has no failure mode; restrict the socket to its owner from birth.
        let old = unsafe { libc::umask(0o177) };
        let listener = UnixListener::bind(&sock);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let listener = listener.map_err(io_err(format!("binding {}", sock.display())))?;
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err(format!("chmod {}", sock.display())))?;
        for conn in listener.incoming() {
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            let Ok(conn) = conn else { continue };
            if !peer_is_root(&conn) {
                let _ = reply(
                    &conn,
                    &Reply::Error {
                        message: "the volmgr control socket is for root only".into(),
                    },
                );
                continue;
            }
            self.handle_conn(conn);
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
        }
        Ok(())
    }

    fn handle_conn(&self, conn: UnixStream) {
        let mut line = String::new();
        let mut r = BufReader::new(&conn);
        if r.read_line(&mut line).is_err() {
            return;
        }
        let rep = match serde_json::from_str::<Request>(&line) {
            Ok(req) => self.handle(req),
            Err(e) => Reply::Error {
                message: format!("malformed request: {e}"),
            },
        };
        let _ = reply(&conn, &rep);
    }

    /// Asks the control loop to stop (from a signal thread); wakes it with a dummy connection.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(self.socket_path());
    }

    /// Orderly shutdown: devices in reverse creation order are flushed and their front ends
    /// stopped (ublk devices deleted). devices.json is kept, so the next start brings them back.
    pub fn shutdown(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let order: Vec<String> = self.order.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for name in order.iter().rev() {
            let Some(mut d) = self.devs().remove(name) else {
                continue;
            };
            match iort::block_on(d.sw.flush()) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => problems.push(format!("{name}: final flush: {e}")),
                Err(e) => problems.push(format!("{name}: final flush: {e}")),
            }
            if let Some(f) = d.front.take() {
                if let Err(e) = f.stop() {
                    problems.push(format!("{name}: stopping front end: {e}"));
                }
            }
            unlink_device(name);
        }
        let _ = std::fs::remove_file(self.socket_path());
        problems
    }
}

fn reply(conn: &UnixStream, rep: &Reply) -> std::io::Result<()> {
    let mut s = serde_json::to_string(rep).map_err(std::io::Error::other)?;
    s.push('\n');
    (&*conn).write_all(s.as_bytes())
}

fn peer_is_root(conn: &UnixStream) -> bool {
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`.
    let r = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    r == 0 && cred.uid == 0
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
mod tests {
    use super::*;

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape_mountinfo("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape_mountinfo("/x\\134y\\011"), "/x\\y\t");
        assert_eq!(unescape_mountinfo("/plain\\"), "/plain\\");
    }

    #[test]
    fn names() {
        assert!(valid_name("pool0"));
        assert!(valid_name("vg-lv_1.snap"));
        assert!(!valid_name(""));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(".."));
        assert!(!valid_name("a b"));
    }
}
