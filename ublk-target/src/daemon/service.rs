//! Services that live in the daemon beside its devices and act on them (asynchronous
//! replication holds a thin pool and ships its snapshots). The daemon routes
//! [`Request::Service`](crate::control::Request::Service) to them, asks them before a device
//! they hold is removed or reloaded, and stops them before it stops its devices.

use std::sync::Arc;

use tables::DeviceRef;

use super::{lock, Daemon, State};

/// A service registered with [`Daemon::add_service`].
pub trait Service: Send + Sync {
    /// Handles one request's words; the text answers the CLI (JSON where it asked for it).
    fn handle(&self, daemon: &Daemon, args: &[String]) -> Result<String, String>;

    /// What of this service uses device `name` (`replication of VOLUME`), so the daemon
    /// refuses to remove or reload it; empty when nothing does.
    fn users_of(&self, name: &str) -> Vec<String> {
        let _ = name;
        Vec::new()
    }

    /// Stops whatever the service runs; called once, before the devices stop.
    fn stop(&self) {}
}

impl Daemon {
    /// Registers `service` under `name` (a second one with the same name replaces it).
    pub fn add_service(&self, name: &str, service: Arc<dyn Service>) {
        lock(&self.services).insert(name.to_string(), service);
    }

    /// The active device `name`'s object (behind its switch), if it is active.
    pub fn device(&self, name: &str) -> Option<DeviceRef> {
        match self.devs().map.get(name).map(|e| &e.state) {
            Some(State::Active(l)) => Some(l.sw.clone() as DeviceRef),
            _ => None,
        }
    }

    /// Every device's name and recorded table, in creation order.
    pub fn tables(&self) -> Vec<(String, String)> {
        let d = self.devs();
        d.order
            .iter()
            .filter_map(|n| d.map.get(n).map(|e| (n.clone(), e.rec.table.clone())))
            .collect()
    }

    pub(super) fn service_request(&self, name: &str, args: &[String]) -> Result<String, String> {
        let svc = lock(&self.services).get(name).cloned();
        match svc {
            Some(s) => s.handle(self, args),
            None => Err(format!("this daemon runs no service named '{name}'")),
        }
    }

    pub(super) fn service_users_of(&self, device: &str) -> Vec<String> {
        let all: Vec<Arc<dyn Service>> = lock(&self.services).values().cloned().collect();
        all.iter().flat_map(|s| s.users_of(device)).collect()
    }

    /// Stops every service (before the devices they use stop).
    pub(super) fn stop_services(&self) {
        let all: Vec<Arc<dyn Service>> = lock(&self.services).values().cloned().collect();
        for s in all {
            s.stop();
        }
    }
}
