//! A served device's failure: a queue thread that dies (its event loop fails, a tag task
//! fails, the thread panics) leaves requests on its queue that nobody will complete. It
//! records why here, and the device is stopped (STOP_DEV) from a thread of its own, so the
//! kernel fails the device's outstanding and new I/O instead of leaving it hanging.

use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use libublk::ctrl::UblkCtrl;

use super::options::describe;
use super::server::{ensure_ctrl_ring, wait_until};

/// Shared by a [`super::UblkServer`] and its device's threads.
pub(super) struct DeviceFailure {
    /// The device's name, for the logs.
    name: String,
    /// Weak: the server needs the only strong reference left to delete the device.
    ctrl: Weak<UblkCtrl>,
    state: Mutex<State>,
    /// The thread stopping the device after a failure.
    stopper: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Default)]
struct State {
    /// Why the device failed: the first failure reported.
    reason: Option<String>,
    /// Whether the device has started: a failure before that only fails the start (and a
    /// failed recovery must leave the device recoverable), unless the device starts anyway.
    started: bool,
    /// Whether the server is stopping the device itself: a queue dying then is no failure.
    stopping: bool,
}

impl DeviceFailure {
    pub(super) fn new(name: String, ctrl: Weak<UblkCtrl>) -> DeviceFailure {
        DeviceFailure {
            name,
            ctrl,
            state: Mutex::new(State::default()),
            stopper: Mutex::new(None),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Why the device failed, if it did.
    pub(super) fn reason(&self) -> Option<String> {
        self.state().reason.clone()
    }

    /// The device is serving: from now on a failure stops it (and so does one before).
    pub(super) fn mark_started(&self) {
        let reason = {
            let mut st = self.state();
            st.started = true;
            st.reason.clone()
        };
        if let Some(reason) = reason {
            self.stop_device(&reason);
        }
    }

    /// The server stops the device: queue threads that die from now on are not failures.
    pub(super) fn mark_stopping(&self) {
        self.state().stopping = true;
    }

    /// Records that `what` (e.g. "ublk queue 1") died because of `why`, and stops the device
    /// unless it has not started yet or an earlier failure already did.
    pub(super) fn fail(&self, what: &str, why: String) {
        let name = &self.name;
        let reason = format!("{what} died: {why}");
        {
            let mut st = self.state();
            if st.stopping {
                log::warn!("{name}: {reason}, while stopping");
                return;
            }
            if let Some(first) = &st.reason {
                log::error!("{name}: {reason} (after: {first})");
                return;
            }
            st.reason = Some(reason.clone());
            if !st.started {
                log::error!("{name}: {reason}, while starting");
                return;
            }
        }
        self.stop_device(&reason);
    }

    /// Stops the device from a thread of its own (the caller may be one the stop waits for).
    fn stop_device(&self, reason: &str) {
        let name = &self.name;
        let Some(ctrl) = self.ctrl.upgrade() else {
            log::error!("{name}: {reason}; the device is already being stopped");
            return;
        };
        log::error!("{name}: {reason}; stopping the device so that its I/O fails");
        let thread_name = name.clone();
        let stopper = std::thread::Builder::new()
            .name("ublk-stopper".into())
            .spawn(move || stop_device(&thread_name, &ctrl));
        match stopper {
            Ok(t) => *self.stopper.lock().unwrap_or_else(|e| e.into_inner()) = Some(t),
            Err(e) => log::error!(
                "{name}: cannot spawn a thread to stop the failed device ({e}); its I/O \
                 fails only once the server stops it"
            ),
        }
    }

    /// Waits up to `limit` for the stopping thread (it holds the device's control).
    /// False if it is still running.
    pub(super) fn join_stopper(&self, limit: Duration) -> bool {
        let Some(t) = self
            .stopper
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return true;
        };
        if !wait_until(limit, || t.is_finished()) {
            return false;
        }
        let _ = t.join();
        true
    }
}

/// The text a panic was raised with.
pub(super) fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s
    } else {
        "(no message)"
    }
}

/// STOP_DEV: the kernel fails the I/O queued on the device and aborts the queues' commands,
/// which ends the other queue threads; the control thread then returns.
fn stop_device(name: &str, ctrl: &Arc<UblkCtrl>) {
    if let Err(e) = ensure_ctrl_ring() {
        log::error!(
            "{name}: cannot stop the failed device: control ring: {}",
            describe(&e)
        );
        return;
    }
    match ctrl.kill_dev() {
        Ok(_) => log::warn!("{name}: failed device stopped"),
        Err(e) => log::error!("{name}: stopping the failed device: {}", describe(&e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure() -> DeviceFailure {
        // No control: stopping the device is then only logged.
        DeviceFailure::new("d".into(), Weak::new())
    }

    #[test]
    fn the_first_failure_is_the_reason() {
        let f = failure();
        f.mark_started();
        assert_eq!(f.reason(), None);
        f.fail("ublk queue 1", "tag 3 failed: EIO".into());
        f.fail("ublk queue 0", "the thread panicked: bug".into());
        assert_eq!(
            f.reason().as_deref(),
            Some("ublk queue 1 died: tag 3 failed: EIO")
        );
        assert!(f.join_stopper(Duration::from_secs(1)));
    }

    #[test]
    fn a_failure_before_the_start_is_kept() {
        let f = failure();
        f.fail("ublk queue 0", "setup failed".into());
        assert!(f.reason().is_some());
        f.mark_started();
        assert_eq!(
            f.reason().as_deref(),
            Some("ublk queue 0 died: setup failed")
        );
    }

    #[test]
    fn queues_ending_in_a_stop_are_no_failure() {
        let f = failure();
        f.mark_started();
        f.mark_stopping();
        f.fail("ublk queue 0", "tag 1 failed".into());
        assert_eq!(f.reason(), None);
    }
}
