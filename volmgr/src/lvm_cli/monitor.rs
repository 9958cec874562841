//! The daemon's raid monitor (what dmeventd does for lvm2): every few seconds it reads the
//! status of each active device; when a raid LV runs with a failed leg it logs it and, if the
//! LV's `raid_fault_policy` is `allocate` (a `raid_fault_policy:allocate` tag on the LV or
//! its VG, else the daemon's `--raid-fault-policy`), replaces the failed image from free
//! space on a host no surviving image uses and starts the rebuild ([`super::lvrepair`]).
//!
//! It talks to its own daemon over the control socket, exactly as `lvconvert --repair` would,
//! so a repair is the same code path whoever starts it. A failed attempt (no free space on a
//! suitable host, the metadata changed underneath) is retried after [`RETRY`]; the same
//! failure is logged once, not every round.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use lvm::alloc::Policy;

use super::activate::daemon_devices;
use super::lvrepair::{failed_legs, repair_lv, FaultPolicy};
use super::scan::Scan;
use super::DeviceArgs;
use crate::client::{call, expect_text, StateDir};

/// Wait before trying the same repair again after it failed.
pub const RETRY: Duration = Duration::from_secs(30);

/// The VG and LV of a device-mapper style name (`VG-LV`, `-` inside a name doubled), if it
/// is one.
pub fn split_dm_name(name: &str) -> Option<(String, String)> {
    let b = name.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'-' {
            if b.get(i + 1) == Some(&b'-') {
                i += 2;
                continue;
            }
            let (vg, lv) = (&name[..i], &name[i + 1..]);
            if vg.is_empty() || lv.is_empty() {
                return None;
            }
            return Some((vg.replace("--", "-"), lv.replace("--", "-")));
        }
        i += 1;
    }
    None
}

/// What the monitor remembers of one LV between rounds.
#[derive(Default)]
struct Seen {
    /// The failed legs last reported (to log a change once).
    legs: Vec<usize>,
    /// When a repair last failed, and why.
    failed_at: Option<(Instant, String)>,
}

/// The monitor's state and one round of it.
pub struct Monitor {
    sd: StateDir,
    dev: DeviceArgs,
    default: FaultPolicy,
    seen: HashMap<String, Seen>,
}

impl Monitor {
    /// A monitor of the daemon at `sd`, scanning PVs as `dev` says.
    pub fn new(sd: StateDir, dev: DeviceArgs, default: FaultPolicy) -> Monitor {
        Monitor {
            sd,
            dev,
            default,
            seen: HashMap::new(),
        }
    }

    /// One look at every device.
    pub fn round(&mut self) {
        let devices = daemon_devices(&self.sd);
        self.seen.retain(|n, _| devices.contains_key(n));
        for name in devices.keys() {
            let Some((vg, lv)) = split_dm_name(name) else {
                continue;
            };
            let Ok(status) = call(
                &self.sd,
                ublk_target::control::Request::Status { name: name.clone() },
            )
            .and_then(expect_text) else {
                continue;
            };
            let legs = failed_legs(&status);
            let seen = self.seen.entry(name.clone()).or_default();
            if legs.is_empty() {
                if !seen.legs.is_empty() {
                    eprintln!("volmgr daemon: monitor: {vg}/{lv}: every leg is back in service");
                }
                *seen = Seen::default();
                continue;
            }
            let new = seen.legs != legs;
            seen.legs = legs.clone();
            let policy = match Scan::run(&self.dev) {
                Ok(scan) => match scan.vg(&vg) {
                    Ok(v) => FaultPolicy::of(&v.metadata.vg, &lv, self.default),
                    Err(_) => continue, // not an LVM device of a VG we can see
                },
                Err(e) => {
                    if new {
                        eprintln!("volmgr daemon: monitor: {vg}/{lv}: scanning PVs: {e:#}");
                    }
                    continue;
                }
            };
            if new {
                eprintln!(
                    "volmgr daemon: monitor: {vg}/{lv}: leg(s) {legs:?} failed (raid_fault_policy \
                     {})",
                    match policy {
                        FaultPolicy::Warn => "warn: not replacing them",
                        FaultPolicy::Allocate => "allocate: replacing them",
                    }
                );
            }
            if policy == FaultPolicy::Warn {
                continue;
            }
            if seen
                .failed_at
                .as_ref()
                .is_some_and(|(t, _)| t.elapsed() < RETRY)
            {
                continue;
            }
            let say = |m: &str| eprintln!("volmgr daemon: monitor: {m}");
            match repair_lv(&self.dev, &self.sd, &vg, &lv, Policy::Inherit, &say) {
                Ok(Some(r)) => {
                    eprintln!(
                        "volmgr daemon: monitor: {vg}/{lv}: replaced image(s) {:?}: {}",
                        r.images,
                        r.placed.join(", ")
                    );
                    seen.failed_at = None;
                }
                Ok(None) => {}
                Err(e) => {
                    let why = format!("{e:#}");
                    if seen.failed_at.as_ref().map(|(_, w)| w) != Some(&why) {
                        eprintln!(
                            "volmgr daemon: monitor: {vg}/{lv}: repair failed (retrying every \
                             {}s): {why}",
                            RETRY.as_secs()
                        );
                    }
                    seen.failed_at = Some((Instant::now(), why));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dm_names_split_as_lvm_writes_them() {
        assert_eq!(split_dm_name("vg-lv"), Some(("vg".into(), "lv".into())));
        assert_eq!(
            split_dm_name("my--vg-r_rimage_0"),
            Some(("my-vg".into(), "r_rimage_0".into()))
        );
        assert_eq!(
            split_dm_name("vg-my--lv"),
            Some(("vg".into(), "my-lv".into()))
        );
        assert_eq!(split_dm_name("plain"), None);
        assert_eq!(split_dm_name("-x"), None);
    }
}
