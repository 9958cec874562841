//! The administrator's operations on one device: create, reload, suspend, resume, remove,
//! retry, message, status. Each takes the device's own operation lock (list, table and status
//! take none), never holds the lock over the set of devices across I/O, and bounds every wait
//! for the device's I/O by the configured `io_timeout`.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use tables::switch::Switchable;
use tables::table::Table;
use tables::{BlockDevice, DeviceRef};

use super::graph::path_between;
use super::{
    link_device, lock, unlink_device, valid_name, Daemon, Entry, Live, PersistedDevice, State,
    DEVICE_PREFIX,
};
use crate::frontend::{Frontend, FrontendKind};

/// Undoes the state change of an operation on `name` that fails or panics half way (run on
/// drop unless disarmed by taking `undo`).
struct Undo<'a> {
    daemon: &'a Daemon,
    name: String,
    undo: Option<fn(&Daemon, &str)>,
}

impl Drop for Undo<'_> {
    fn drop(&mut self) {
        if let Some(f) = self.undo.take() {
            f(self.daemon, &self.name);
        }
    }
}

/// A device record that never came up goes away.
fn forget_building(d: &Daemon, name: &str) {
    let mut devs = d.devs();
    if matches!(devs.map.get(name).map(|e| &e.state), Some(State::Building)) {
        devs.remove(name);
    }
}

/// A device whose rebuild panicked is failed again.
fn fail_rebuild(d: &Daemon, name: &str) {
    d.set_state(name, State::Failed("rebuild panicked".into()));
}

impl Daemon {
    fn op_of(&self, name: &str) -> Result<Arc<Mutex<()>>, String> {
        self.devs()
            .map
            .get(name)
            .map(|e| e.op.clone())
            .ok_or_else(|| format!("no device named '{name}'"))
    }

    pub(super) fn set_state(&self, name: &str, state: State) {
        if let Some(e) = self.devs().map.get_mut(name) {
            e.state = state;
        }
    }

    /// The gate of an active device.
    fn switch_of(&self, name: &str) -> Result<Arc<Switchable>, String> {
        match self.devs().map.get(name).map(|e| &e.state) {
            Some(State::Active(l)) => Ok(l.sw.clone()),
            Some(State::Failed(why)) => Err(format!("{name} is failed: {why}")),
            Some(s) => Err(format!("{name} is {}", s.word(false))),
            None => Err(format!("no device named '{name}'")),
        }
    }

    /// Runs `f` (which drives a device's I/O on its own io_uring runtime) on a helper thread
    /// and waits at most `io_timeout` for it. A device stuck in I/O then fails the command,
    /// not the control socket: the helper thread is left to finish (or not) on its own.
    pub(super) fn run_io<T: Send + 'static>(
        &self,
        what: &str,
        f: impl FnOnce() -> Result<T, String> + Send + 'static,
    ) -> Result<T, String> {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("volmgr-ctl-io".into())
            .spawn(move || {
                let _ = tx.send(f());
            })
            .map_err(|e| format!("{what}: cannot start a thread: {e}"))?;
        let limit = self.cfg.io_timeout;
        match rx.recv_timeout(limit) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(format!(
                "{what} did not finish within {} s (the device's I/O is stuck); \
                 the daemon and the other devices keep serving",
                limit.as_secs_f64()
            )),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(format!("{what} panicked")),
        }
    }

    /// `sw.flush()`, bounded.
    pub(super) fn flush_io(&self, name: &str, sw: &Arc<Switchable>) -> Result<(), String> {
        let sw = sw.clone();
        self.run_io(&format!("{name}: flush"), move || {
            iort::block_on(sw.flush())
                .map_err(|e| format!("no io_uring runtime: {e}"))?
                .map_err(|e| e.to_string())
        })
    }

    /// `sw.suspend()` (stop admitting, drain, flush; without `flush` only drain), bounded; on
    /// any failure the device is admitted again (with no table swap) and the error says why.
    fn suspend_io(&self, name: &str, sw: &Arc<Switchable>, flush: bool) -> Result<(), String> {
        let s = sw.clone();
        let what = if flush {
            "suspend (drain and flush)"
        } else {
            "suspend (drain)"
        };
        let r = self.run_io(&format!("{name}: {what}"), move || {
            let done = if flush {
                iort::block_on(s.suspend())
            } else {
                iort::block_on(async move {
                    s.drain().await;
                    Ok(())
                })
            };
            done.map_err(|e| format!("no io_uring runtime: {e}"))?
                .map_err(|e| format!("flush failed: {e}"))
        });
        if r.is_err() {
            sw.unstage();
            sw.resume();
        }
        r.map_err(|e| format!("{e}; the device stays active"))
    }

    /// The daemon's own ublk devices by device number, from every record with a ublk id
    /// whose node exists (active or not: a restored device's node may predate it).
    fn own_ublk_devnums(&self) -> BTreeMap<(u32, u32), String> {
        let ids: Vec<(String, u32)> = self
            .devs()
            .map
            .values()
            .filter_map(|e| e.rec.ublk_id.map(|id| (e.rec.name.clone(), id)))
            .collect();
        ids.into_iter()
            .filter_map(|(n, id)| block_devnum(&format!("/dev/ublkb{id}")).map(|dn| (dn, n)))
            .collect()
    }

    /// Parses `text` and rewrites every way of naming one of the daemon's own devices
    /// (`/dev/ublkbN`, `major:minor`, a symlink such as `/dev/volmgr/NAME` itself or one under
    /// `/dev/disk`) to `/dev/volmgr/NAME`, so the device is reached directly, stacking shows in
    /// the table, and cycles can be seen. Relative paths and malformed URIs are refused.
    pub(super) fn canonical_table(&self, name: &str, text: &str) -> Result<Table, String> {
        let mut table = Table::parse(text, &self.registry).map_err(|e| format!("{name}: {e}"))?;
        let by_id: BTreeMap<u32, String> = self
            .devs()
            .map
            .values()
            .filter_map(|e| e.rec.ublk_id.map(|id| (id, e.rec.name.clone())))
            .collect();
        let by_num = self.own_ublk_devnums();
        table.map_devices(&self.registry, |dev| -> Result<String, String> {
            if let Some(n) = dev.strip_prefix(DEVICE_PREFIX) {
                if !valid_name(n) {
                    return Err(format!("{name}: '{dev}' is not a valid volmgr device name"));
                }
                return Ok(dev.to_string());
            }
            if let Some(r) = self.base.check_remote(dev) {
                // A remote extent: checked here so a bad URI is refused before anything opens.
                r.map_err(|e| format!("{name}: {e}"))?;
                return Ok(dev.to_string());
            }
            if !dev.starts_with('/') && !super::is_devnum(dev) {
                return Err(format!(
                    "{name}: the table names '{dev}', a relative path: give an absolute path \
                     (the daemon's working directory is not yours; the volmgr CLI makes paths \
                     absolute)"
                ));
            }
            // `/dev/ublkbN` of a recorded device, even before its node exists again.
            if let Some(other) = dev
                .strip_prefix("/dev/ublkb")
                .and_then(|n| n.parse::<u32>().ok())
                .and_then(|id| by_id.get(&id))
            {
                return Ok(format!("{DEVICE_PREFIX}{other}"));
            }
            let num = devnum_of(dev);
            if let Some(other) = num.and_then(|dn| by_num.get(&dn)) {
                return Ok(format!("{DEVICE_PREFIX}{other}"));
            }
            Ok(dev.to_string())
        })?;
        Ok(table)
    }

    /// The daemon devices a table uses: `/dev/volmgr/NAME` arguments, plus the devices under
    /// any kernel block device it names that is stacked on one of ours (a loop or dm device
    /// over `/dev/ublkbN`).
    pub(super) fn deps_of_table(&self, table: &Table) -> Vec<String> {
        let by_num = self.own_ublk_devnums();
        let mut out = Vec::new();
        for d in table.devices(&self.registry) {
            if let Some(n) = d.name.strip_prefix(DEVICE_PREFIX) {
                out.push(n.to_string());
            } else if let Some(dn) = devnum_of(&d.name) {
                for below in kernel_lower_devnums(dn) {
                    if let Some(n) = by_num.get(&below) {
                        out.push(n.clone());
                    }
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// The devices `name`'s recorded table uses (empty if it does not parse).
    pub(super) fn deps_of_name(&self, name: &str) -> Vec<String> {
        let text = self.devs().map.get(name).map(|e| e.rec.table.clone());
        text.and_then(|t| Table::parse(&t, &self.registry).ok())
            .map(|t| self.deps_of_table(&t))
            .unwrap_or_default()
    }

    /// Names of the devices whose tables use `name`, with their state when not active.
    fn users_of(&self, name: &str) -> Vec<String> {
        let recs: Vec<(String, String)> = {
            let d = self.devs();
            d.order
                .iter()
                .filter(|n| *n != name)
                .filter_map(|n| {
                    d.map
                        .get(n)
                        .map(|e| (n.clone(), e.state.word(false).to_string()))
                })
                .collect()
        };
        let mut users: Vec<String> = recs
            .into_iter()
            .filter(|(n, _)| self.deps_of_name(n).iter().any(|d| d == name))
            .map(|(n, st)| {
                if st == "active" {
                    n
                } else {
                    format!("{n} ({st})")
                }
            })
            .collect();
        users.extend(self.service_users_of(name));
        users
    }

    /// Refuses a table for `name` that would make it use itself, directly or through other
    /// devices; the error spells the cycle out.
    fn check_no_cycle(&self, name: &str, table: &Table) -> Result<(), String> {
        for d in self.deps_of_table(table) {
            if d == name {
                return Err(format!(
                    "{name}: the table uses {DEVICE_PREFIX}{name} itself (directly or through a \
                     kernel alias): refused, a device reading from itself hangs"
                ));
            }
            if let Some(path) = path_between(&d, name, |x| self.deps_of_name(x)) {
                return Err(format!(
                    "{name}: the table would make {name} use itself: {name} -> {}: refused",
                    path.join(" -> ")
                ));
            }
        }
        Ok(())
    }

    /// Builds `rec`'s table and starts its front end. With `restoring`, a ublk device still
    /// present in the kernel is re-attached (user recovery). Returns the running device and
    /// the record as it should be persisted (canonical table, ublk id).
    pub(super) fn bring_up(
        &self,
        mut rec: PersistedDevice,
        restoring: bool,
    ) -> Result<(Live, PersistedDevice), String> {
        let name = rec.name.clone();
        let table = self.canonical_table(&name, &rec.table)?;
        self.check_no_cycle(&name, &table)?;
        let dev = table
            .build_named(&name, &self.registry, &self.resolver())
            .map_err(|e| format!("{name}: {e}"))?;
        let sw = Arc::new(Switchable::new(name.clone(), dev));
        let kind = match (&rec.nbd, self.cfg.ublk_available) {
            (Some(_), _) if rec.internal => {
                return Err(format!("{name}: an internal device has no NBD export"))
            }
            (None, _) if rec.internal => FrontendKind::Internal,
            (Some(addr), _) => FrontendKind::Nbd(addr.clone()),
            (None, true) => FrontendKind::Ublk(rec.ublk_id),
            (None, false) => {
                return Err(format!(
                    "{name}: this host has no ublk (/dev/ublk-control is missing); give --nbd \
                     ADDR to export it over NBD"
                ))
            }
        };
        let limits = rec
            .nbd_limits
            .apply(&self.cfg.nbd_limits)
            .map_err(|e| format!("{name}: NBD limits: {e}"))?;
        // An NBD export carries the record's export name (LVM's VG/LV), else the device's.
        let export = rec.export.clone().unwrap_or_else(|| name.clone());
        let front = Frontend::start(
            &export,
            sw.clone() as DeviceRef,
            kind,
            restoring,
            &limits,
            self.cfg.nbd_tls.as_ref(),
        )
        .map_err(|e| format!("{name}: {e}"))?;
        if let Some(id) = front.ublk_id() {
            rec.ublk_id = Some(id);
            link_device(&name, &front.path());
        }
        rec.table = table.to_string();
        Ok((Live { table, sw, front }, rec))
    }

    /// Creates a device; returns its path (`/dev/ublkbN` or an NBD URI).
    pub(super) fn create(&self, rec: PersistedDevice) -> Result<String, String> {
        let name = rec.name.clone();
        if !valid_name(&name) {
            return Err(format!(
                "invalid device name '{name}': use letters, digits, '-', '_', '.', '+'"
            ));
        }
        let op = Arc::new(Mutex::new(()));
        {
            let mut d = self.devs();
            if let Some(e) = d.map.get(&name) {
                return Err(format!(
                    "device '{name}' already exists ({})",
                    e.state.word(false)
                ));
            }
            d.map.insert(
                name.clone(),
                Entry {
                    rec: rec.clone(),
                    state: State::Building,
                    op: op.clone(),
                },
            );
            d.order.push(name.clone());
        }
        let _g = lock(&op);
        let mut guard = Undo {
            daemon: self,
            name: name.clone(),
            undo: Some(forget_building),
        };
        let (live, rec) = self.bring_up(rec, false)?;
        let path = live.front.path();
        if let Some(e) = self.devs().map.get_mut(&name) {
            e.rec = rec;
            e.state = State::Active(live);
        }
        guard.undo = None;
        if let Err(e) = self.save_state() {
            // Not persisted: not created. Take it down again.
            let entry = self.devs().remove(&name);
            if let Some(Entry {
                state: State::Active(live),
                ..
            }) = entry
            {
                let _ = self.stop_live(&name, live, "creation undone");
            }
            return Err(format!("{name}: not created: {e}"));
        }
        Ok(path)
    }

    /// Builds a failed (or never restored) device again from its record, or from `table`
    /// when given (which replaces the record only if the device then comes up).
    fn rebuild(&self, name: &str, table: Option<&str>) -> Result<String, String> {
        // A device whose front end died (a ublk queue thread) is taken down first.
        let dead = {
            let mut d = self.devs();
            match d.map.get_mut(name) {
                Some(e) if matches!(&e.state, State::Active(l) if l.front.failed().is_some()) => {
                    match std::mem::replace(&mut e.state, State::Stopping) {
                        State::Active(l) => Some(l),
                        other => {
                            e.state = other;
                            None
                        }
                    }
                }
                _ => None,
            }
        };
        if let Some(live) = dead {
            let why = live.front.failed().unwrap_or_default();
            if let Err(e) = self.stop_live(name, live, "front end failed") {
                log::warn!("{e}");
            }
            self.set_state(name, State::Failed(why));
        }
        let rec = {
            let mut d = self.devs();
            let e = d
                .map
                .get_mut(name)
                .ok_or_else(|| format!("no device named '{name}'"))?;
            match &e.state {
                State::Failed(_) | State::Pending => {}
                s => return Err(format!("{name} is {}, not failed", s.word(false))),
            }
            e.state = State::Building;
            let mut rec = e.rec.clone();
            if let Some(t) = table {
                rec.table = t.to_string();
            }
            rec
        };
        let mut guard = Undo {
            daemon: self,
            name: name.to_string(),
            undo: Some(fail_rebuild),
        };
        let r = self.bring_up(rec, true);
        guard.undo = None;
        match r {
            Ok((live, rec)) => {
                let path = live.front.path();
                if let Some(e) = self.devs().map.get_mut(name) {
                    e.rec = rec;
                    e.state = State::Active(live);
                }
                self.save_state()
                    .map_err(|e| format!("{name}: up at {path}, but {e}"))?;
                Ok(path)
            }
            Err(why) => {
                self.set_state(name, State::Failed(why.clone()));
                Err(why)
            }
        }
    }

    /// Retries a failed device from its recorded table.
    pub(super) fn retry(&self, name: &str) -> Result<String, String> {
        let op = self.op_of(name)?;
        let _g = lock(&op);
        self.rebuild(name, None)
    }

    /// Loads a new table and swaps it in: build, suspend (drain, and with `flush` flush the
    /// old table), persist, resume. Any failure leaves the old table serving and devices.json
    /// as it was.
    pub(super) fn reload(&self, name: &str, text: &str, flush: bool) -> Result<String, String> {
        let op = self.op_of(name)?;
        let _g = lock(&op);
        // A service holds this device's object (a replication holds its pool): a new table
        // would put a second object over the same metadata.
        let held = self.service_users_of(name);
        if !held.is_empty() {
            return Err(format!(
                "{name} is used by {}: stop that first",
                held.join(", ")
            ));
        }
        let live = match self.devs().map.get(name).map(|e| &e.state) {
            Some(State::Active(l)) if l.front.failed().is_some() => Ok(None),
            Some(State::Active(l)) => Ok(Some((l.sw.clone(), l.front.can_resize()))),
            Some(State::Failed(_) | State::Pending) => Ok(None),
            Some(s) => Err(format!("{name} is {}", s.word(false))),
            None => Err(format!("no device named '{name}'")),
        }?;
        // A device that is not running gets the new table the way a retry would.
        let Some((sw, can_resize)) = live else {
            return self.rebuild(name, Some(text));
        };
        let table = self.canonical_table(name, text)?;
        self.check_no_cycle(name, &table)?;
        let dev = table
            .build_named(name, &self.registry, &self.resolver())
            .map_err(|e| format!("{name}: {e}"))?;
        let (new_size, old_size) = (dev.size(), sw.size());
        if new_size != old_size && !can_resize {
            // Swapping anyway would leave the table and the kernel's idea of the size apart.
            return Err(format!(
                "{name}: the new table is {} bytes and the device {} bytes, but this kernel's \
                 ublk driver cannot resize a live device (UBLK_U_CMD_UPDATE_SIZE needs Linux \
                 6.16 or later); reload refused, the old table stays",
                new_size.0, old_size.0
            ));
        }
        sw.load(dev).map_err(|e| e.to_string())?;
        self.suspend_io(name, &sw, flush)
            .map_err(|e| format!("{e}; reload refused, the old table stays"))?;
        let new_text = table.to_string();
        let old_text = {
            let mut d = self.devs();
            d.map
                .get_mut(name)
                .map(|e| std::mem::replace(&mut e.rec.table, new_text.clone()))
        };
        if let Err(e) = self.save_state() {
            if let (Some(old), Some(e)) = (old_text, self.devs().map.get_mut(name)) {
                e.rec.table = old;
            }
            sw.unstage();
            sw.resume();
            return Err(format!("{name}: {e}; reload refused, the old table stays"));
        }
        sw.resume();
        let resized = {
            let mut d = self.devs();
            match d.map.get_mut(name).map(|e| &mut e.state) {
                Some(State::Active(l)) => {
                    l.table = table;
                    // Same size (a table swapped under a running device: lvconvert, pvmove):
                    // nothing to tell the front end, which may not be able to resize at all.
                    (new_size != old_size).then(|| l.front.resize(new_size))
                }
                _ => None,
            }
        };
        if let Some(Err(e)) = resized {
            return Err(format!(
                "{name}: table reloaded but the front end did not take the new size: {e}"
            ));
        }
        Ok(format!("{name}: table reloaded ({} bytes)", new_size.0))
    }

    /// Stop admitting I/O, drain, flush (bounded by `io_timeout`).
    pub(super) fn suspend(&self, name: &str) -> Result<String, String> {
        let op = self.op_of(name)?;
        let _g = lock(&op);
        let sw = self.switch_of(name)?;
        if sw.is_suspended() {
            return Ok(format!("{name}: already suspended"));
        }
        self.suspend_io(name, &sw, true)?;
        Ok(format!("{name}: suspended"))
    }

    /// Admit I/O again.
    pub(super) fn resume(&self, name: &str) -> Result<String, String> {
        let op = self.op_of(name)?;
        let _g = lock(&op);
        let sw = self.switch_of(name)?;
        sw.resume();
        Ok(format!("{name}: resumed"))
    }

    /// A target message (dmsetup message), bounded by `io_timeout`.
    pub(super) fn message(&self, name: &str, args: Vec<String>) -> Result<String, String> {
        let sw = self.switch_of(name)?;
        self.run_io(
            &format!("{name}: message '{}'", args.join(" ")),
            move || {
                iort::block_on(sw.message(&args))
                    .map_err(|e| format!("no io_uring runtime: {e}"))?
                    .map_err(|e| e.to_string())
            },
        )
    }

    /// Status line(s); never waits for I/O.
    pub(super) fn status(&self, name: &str) -> Result<String, String> {
        let sw = self.switch_of(name)?;
        let mut s = sw.status();
        let extents = {
            let d = self.devs();
            match d.map.get(name).map(|e| &e.state) {
                Some(State::Active(l)) => self.extents_of(&l.table),
                _ => Vec::new(),
            }
        };
        for x in extents {
            if !s.is_empty() && !s.ends_with('\n') {
                s.push('\n');
            }
            s.push_str(&x.line());
        }
        Ok(s)
    }

    /// The table: the live one, or the recorded one of a device that is not up.
    pub(super) fn table_of(&self, name: &str) -> Result<String, String> {
        let d = self.devs();
        let e = d
            .map
            .get(name)
            .ok_or_else(|| format!("no device named '{name}'"))?;
        Ok(match &e.state {
            State::Active(l) => l.table.to_string(),
            _ => e.rec.table.clone(),
        })
    }

    /// Flushes and removes a device (its record too). Refused while other devices use it, while
    /// it is open or mounted (unless `force`), and when the final flush fails (unless `force`).
    pub(super) fn remove(&self, name: &str, force: bool) -> Result<String, String> {
        let op = self.op_of(name)?;
        let _g = lock(&op);
        let users = self.users_of(name);
        if !users.is_empty() {
            return Err(format!(
                "{name} is used by {}: remove those first",
                users.join(", ")
            ));
        }
        let (sw, busy) = match self.devs().map.get(name).map(|e| &e.state) {
            Some(State::Active(l)) => (Some(l.sw.clone()), l.front.busy()),
            Some(State::Failed(_) | State::Pending) => (None, None),
            Some(s) => return Err(format!("{name} is {}", s.word(false))),
            None => return Err(format!("no device named '{name}'")),
        };
        let Some(sw) = sw else {
            self.devs().remove(name);
            self.save_state()?;
            return Ok(format!("{name}: removed (it was not running)"));
        };
        if let Some(why) = busy {
            if !force {
                return Err(format!(
                    "{name} is {why}; refusing to remove it (use --force)"
                ));
            }
        }
        let mut notes = Vec::new();
        if !sw.is_suspended() {
            if let Err(e) = self.flush_io(name, &sw) {
                if !force {
                    return Err(format!(
                        "{e}; {name} is kept (use --force to remove it without a final flush)"
                    ));
                }
                notes.push(format!("final flush failed: {e}"));
            }
        }
        let entry = {
            let mut d = self.devs();
            let live = d.map.get_mut(name).and_then(|e| {
                match std::mem::replace(&mut e.state, State::Stopping) {
                    State::Active(l) => Some(l),
                    other => {
                        e.state = other;
                        None
                    }
                }
            });
            live
        };
        if let Some(live) = entry {
            if let Err(e) = self.stop_live(name, live, "device removed") {
                notes.push(e);
            }
        }
        self.devs().remove(name);
        self.save_state()?;
        if notes.is_empty() {
            Ok(format!("{name}: removed"))
        } else {
            Err(format!("{name}: removed, but {}", notes.join("; ")))
        }
    }

    /// Stops a running device's front end. A suspended device's gate is killed first (it was
    /// drained and flushed when it was suspended), so requests parked there fail instead of
    /// holding the front end up; otherwise the front end's own last flush still goes through.
    pub(super) fn stop_live(&self, name: &str, live: Live, reason: &str) -> Result<(), String> {
        if live.sw.is_suspended() {
            live.sw.kill(format!("{reason} while suspended"));
        }
        let r = live
            .front
            .stop()
            .map_err(|e| format!("{name}: stopping front end: {e}"));
        live.sw.kill(reason);
        unlink_device(name);
        r
    }
}

/// The device number a table argument reaches, if it is a block device (or `major:minor`).
fn devnum_of(dev: &str) -> Option<(u32, u32)> {
    if super::is_devnum(dev) {
        let (a, b) = dev.split_once(':')?;
        return Some((a.parse().ok()?, b.parse().ok()?));
    }
    block_devnum(dev)
}

/// `stat` of a path (following symlinks): its device number if it is a block device.
fn block_devnum(path: &str) -> Option<(u32, u32)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let md = std::fs::metadata(path).ok()?;
    if !md.file_type().is_block_device() {
        return None;
    }
    let d = md.rdev();
    // glibc's dev_t encoding.
    let major = ((d >> 8) & 0xfff) | ((d >> 32) & !0xfff);
    let minor = (d & 0xff) | ((d >> 12) & !0xff);
    Some((major as u32, minor as u32))
}

/// Every block device below `dn` in the kernel's stack (`/sys/dev/block/M:m/slaves`,
/// recursively): a loop device lists its backing device's disk only when it is a block
/// device, a dm or md device its members.
fn kernel_lower_devnums(dn: (u32, u32)) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    let mut todo = vec![dn];
    while let Some((maj, min)) = todo.pop() {
        // Kernel stacks are shallow; the bound only guards against a sysfs loop.
        if out.len() > 256 {
            break;
        }
        let dir = format!("/sys/dev/block/{maj}:{min}/slaves");
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for ent in rd.flatten() {
            let dev = ent.path().join("dev");
            let Ok(s) = std::fs::read_to_string(&dev) else {
                continue;
            };
            let mut it = s.trim().split(':');
            if let (Some(Ok(a)), Some(Ok(b))) =
                (it.next().map(str::parse), it.next().map(str::parse))
            {
                if !out.contains(&(a, b)) {
                    out.push((a, b));
                    todo.push((a, b));
                }
            }
        }
    }
    out
}
