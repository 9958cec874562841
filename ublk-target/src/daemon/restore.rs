//! Start and stop: bringing every recorded device back in dependency order, and taking them
//! down in the reverse order.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::graph::{bring_up_order, DepList};
use tables::registry::Resolver;
use tables::table::Table;

use super::state::PersistedDevice;
use super::{lock, Daemon, DaemonError, Entry, State, DEVICE_PREFIX};

impl Daemon {
    /// Brings every recorded device back, each after the devices it uses (whatever order they
    /// were created in); after a crash, ublk devices still present in the kernel are
    /// re-attached through user recovery. A device that cannot be brought up stays recorded
    /// as failed with its reason (`dev list`), and can be retried; the others still come up.
    /// Returns one line per device that failed. A stop request ends the restore between two
    /// devices (the rest stay recorded, `pending`).
    pub fn restore(&self) -> Result<Vec<String>, DaemonError> {
        let mut problems = Vec::new();
        {
            let mut d = self.devs();
            for rec in self.load_state()? {
                if d.map.contains_key(&rec.name) {
                    // Only a hand-edited file can say this; the first record wins.
                    problems.push(format!(
                        "{}: listed twice in devices.json; the second record is ignored and \
                         will be dropped at the next change",
                        rec.name
                    ));
                    continue;
                }
                d.order.push(rec.name.clone());
                d.map.insert(
                    rec.name.clone(),
                    Entry {
                        rec,
                        state: State::Pending,
                        op: Arc::new(Mutex::new(())),
                    },
                );
            }
        }
        self.stop_services();
        let names: Vec<String> = self.devs().order.clone();
        let deps: DepList = names
            .iter()
            .map(|n| (n.clone(), self.deps_of_name(n)))
            .collect();
        let (order, cyclic) = bring_up_order(&deps);
        for (n, why) in cyclic {
            problems.push(format!("{n}: {why}"));
            self.set_state(&n, State::Failed(why));
        }
        for (i, name) in order.iter().enumerate() {
            if self.stopping() {
                problems.push(format!(
                    "restore interrupted by a stop request: {} device(s) not brought up",
                    order.len() - i
                ));
                break;
            }
            let Some(op) = self.devs().map.get(name).map(|e| e.op.clone()) else {
                continue;
            };
            let _g = lock(&op);
            let mut rec = {
                let mut d = self.devs();
                let Some(e) = d.map.get_mut(name) else {
                    continue;
                };
                e.state = State::Building;
                e.rec.clone()
            };
            if let Some(said) = self.without_failed_deps(&mut rec) {
                log::warn!("{said}");
            }
            let bring = |rec: PersistedDevice| {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.bring_up(rec, true)))
                    .unwrap_or_else(|p| {
                        Err(format!("{name}: panicked: {}", super::panic_text(&*p)))
                    })
            };
            let mut r = bring(rec.clone());
            if r.is_err() {
                // A leg named directly (a remote URI whose server is down) may be what failed.
                if let Some(said) = self.without_unopenable(&mut rec) {
                    let again = bring(rec);
                    if again.is_ok() {
                        log::warn!("{said}");
                        r = again;
                    }
                }
            }
            match r {
                Ok((live, rec)) => {
                    if let Some(e) = self.devs().map.get_mut(name) {
                        e.rec = rec;
                        e.state = State::Active(live);
                    }
                }
                Err(why) => {
                    log::error!("could not restore {why}");
                    problems.push(why.clone());
                    self.set_state(name, State::Failed(why));
                }
            }
            // Every record is written back, whatever its state: a kill now loses nothing.
            if let Err(e) = self.save_state() {
                problems.push(e);
            }
        }
        Ok(problems)
    }

    /// At start, a device whose table names devices that could not be brought back (a raid
    /// leg's sub-LV whose host is down) runs without them when its target allows it: a raid
    /// leg becomes `- -` and the array comes up degraded instead of not at all (lvm2's
    /// `--activationmode degraded`). The record keeps the degraded table, as `lvchange -ay`
    /// in that mode writes it: a leg that returns later is not trusted blindly, it comes
    /// back through a repair (`lvconvert --repair`, or the monitor). Returns what was left
    /// out, for the log; `None` when nothing was (no dependency failed, or the target cannot
    /// run without it: the device then fails as before, naming the dependency).
    fn without_failed_deps(&self, rec: &mut PersistedDevice) -> Option<String> {
        let failed: Vec<(String, String)> = {
            let deps = self.deps_of_name(&rec.name);
            let d = self.devs();
            deps.into_iter()
                .filter_map(|n| match d.map.get(&n).map(|e| &e.state) {
                    Some(State::Failed(why)) => Some((n, why.clone())),
                    _ => None,
                })
                .collect()
        };
        if failed.is_empty() {
            return None;
        }
        let paths: Vec<String> = failed
            .iter()
            .map(|(n, _)| format!("{DEVICE_PREFIX}{n}"))
            .collect();
        let table = Table::parse(&rec.table, &self.registry).ok()?;
        let degraded = table.without_devices(&self.registry, |a| paths.iter().any(|p| p == a))?;
        rec.table = degraded.to_string();
        let why: Vec<String> = failed
            .iter()
            .map(|(n, why)| format!("{n} ({why})"))
            .collect();
        Some(format!(
            "{}: restored degraded, without {}: their devices could not be brought back",
            rec.name,
            why.join("; ")
        ))
    }

    /// After a device failed to come up at start: the devices its table names that cannot
    /// be opened now (a remote extent whose server is down) left out, when its target can run
    /// without them (see [`Self::without_failed_deps`]). Each device is opened once to find
    /// out, only on this failure path. Returns what was left out, for the log.
    fn without_unopenable(&self, rec: &mut PersistedDevice) -> Option<String> {
        let table = Table::parse(&rec.table, &self.registry).ok()?;
        let res = self.resolver();
        let gone: Vec<(String, String)> = table
            .devices(&self.registry)
            .into_iter()
            .filter_map(|d| match res.open(&d.name) {
                Ok(_) => None,
                Err(e) => Some((d.name, e)),
            })
            .collect();
        if gone.is_empty() {
            return None;
        }
        let degraded =
            table.without_devices(&self.registry, |a| gone.iter().any(|(n, _)| n == a))?;
        rec.table = degraded.to_string();
        let why: Vec<String> = gone.iter().map(|(n, e)| format!("{n} ({e})")).collect();
        Some(format!(
            "{}: restored degraded, without {}: they could not be opened",
            rec.name,
            why.join("; ")
        ))
    }

    /// Orderly shutdown: every running device, users before the devices they use, is flushed
    /// (unless suspended: it was flushed when suspended, and requests parked at its gate
    /// fail) and its front end stopped (ublk devices deleted). devices.json is kept, so the
    /// next start brings them back. Returns one line per problem.
    pub fn shutdown(&self) -> Vec<String> {
        let mut problems = Vec::new();
        self.stop.store(true, Ordering::SeqCst);
        // Give control commands in progress a moment to finish (each is bounded by io_timeout).
        let t0 = Instant::now();
        while self.clients.load(Ordering::SeqCst) > 0 && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let names: Vec<String> = self.devs().order.clone();
        let deps: DepList = names
            .iter()
            .map(|n| (n.clone(), self.deps_of_name(n)))
            .collect();
        let (mut order, cyclic) = bring_up_order(&deps);
        order.extend(cyclic.into_iter().map(|(n, _)| n));
        for name in order.iter().rev() {
            let live = {
                let mut d = self.devs();
                d.map.get_mut(name).and_then(|e| {
                    match std::mem::replace(&mut e.state, State::Stopping) {
                        State::Active(l) => Some(l),
                        other => {
                            e.state = other;
                            None
                        }
                    }
                })
            };
            let Some(live) = live else { continue };
            if !live.sw.is_suspended() {
                if let Err(e) = self.flush_io(name, &live.sw) {
                    problems.push(format!("{name}: final flush: {e}"));
                }
            }
            if let Err(e) = self.stop_live(name, live, "daemon shutting down") {
                problems.push(e);
            }
        }
        let _ = std::fs::remove_file(self.socket_path());
        problems
    }
}
