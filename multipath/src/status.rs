//! `dmsetup status` and `dmsetup message` for the multipath device, with dm-multipath's
//! format and message names.

use std::sync::atomic::Ordering;

use tables::io::{IoError, IoResult};

use crate::device::Inner;
use crate::parse::SelectorKind;

impl Inner {
    /// dm-mpath's `multipath_status` (STATUSTYPE_INFO):
    /// `2 <queue_if_no_path 0|1> <pg_init_count> 0 <#pg> <current pg>` then per group
    /// `<D|A|E> 0 <#paths> <#per-path info args>` and per path
    /// `<dev> <A|F> <fail count> [selector info]` (queue-length: requests in flight;
    /// service-time: bytes in flight and relative throughput; round-robin: nothing).
    pub fn status(&self) -> String {
        let queueing = self.state().queueing();
        let cur = self.current_group();
        let mut s = format!(
            "2 {} 0 0 {} {}",
            u8::from(queueing),
            self.groups.len(),
            cur + 1
        );
        for (g, grp) in self.groups.iter().enumerate() {
            let st = if grp.bypassed.load(Ordering::Acquire) {
                'D'
            } else if g == cur {
                'A'
            } else {
                'E'
            };
            s.push_str(&format!(" {st} 0 {} {}", grp.len, grp.kind.info_args()));
            for p in self.paths.iter().filter(|p| p.group == g) {
                s.push_str(&format!(
                    " {} {} {}",
                    p.name,
                    if p.is_active() { 'A' } else { 'F' },
                    p.fail_count.load(Ordering::Relaxed)
                ));
                match grp.kind {
                    SelectorKind::RoundRobin => {}
                    SelectorKind::QueueLength => {
                        s.push_str(&format!(" {}", p.in_flight.load(Ordering::Relaxed)))
                    }
                    SelectorKind::ServiceTime => s.push_str(&format!(
                        " {} {}",
                        p.in_flight_bytes.load(Ordering::Relaxed),
                        p.relative_throughput
                    )),
                }
            }
        }
        s
    }

    fn group_arg(&self, msg: &str, n: &str) -> IoResult<usize> {
        match n.parse::<usize>() {
            Ok(g) if (1..=self.groups.len()).contains(&g) => Ok(g - 1),
            _ => Err(IoError::invalid(format!(
                "{}: {msg}: '{n}' is not a path group (1..={})",
                self.name,
                self.groups.len()
            ))),
        }
    }

    fn path_arg(&self, msg: &str, dev: &str) -> IoResult<usize> {
        self.path(dev).ok_or_else(|| {
            IoError::invalid(format!(
                "{}: {msg}: no path '{dev}' (paths: {})",
                self.name,
                self.paths
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
    }

    /// dm-multipath's messages: `fail_path DEV`, `reinstate_path DEV`, `switch_group N`,
    /// `disable_group N`, `enable_group N`, `queue_if_no_path`, `fail_if_no_path`.
    pub fn message(&self, args: &[String]) -> IoResult<String> {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        match a.as_slice() {
            ["fail_path", dev] => {
                let i = self.path_arg("fail_path", dev)?;
                self.fail_path(i, &IoError::eio("failed by message"));
            }
            ["reinstate_path", dev] => {
                let i = self.path_arg("reinstate_path", dev)?;
                self.reinstate_path(i, "by message");
            }
            ["switch_group", n] => {
                let g = self.group_arg("switch_group", n)?;
                // As dm: every group is enabled again, and this one is tried first.
                for grp in &self.groups {
                    grp.bypassed.store(false, Ordering::Release);
                }
                self.preferred.store(g, Ordering::Release);
            }
            ["disable_group", n] => {
                let g = self.group_arg("disable_group", n)?;
                self.groups[g].bypassed.store(true, Ordering::Release);
            }
            ["enable_group", n] => {
                let g = self.group_arg("enable_group", n)?;
                self.groups[g].bypassed.store(false, Ordering::Release);
            }
            ["queue_if_no_path"] => {
                let mut st = self.state();
                st.queue_if_no_path = true;
                st.no_path_checks = 0;
            }
            ["fail_if_no_path"] => {
                // Requests waiting for a path look again: with none, they fail with EIO.
                let mut st = self.state();
                st.queue_if_no_path = false;
                st.wake_all();
            }
            _ => {
                return Err(IoError::invalid(format!(
                    "{}: unknown message '{}' (fail_path DEV, reinstate_path DEV, \
                     switch_group N, disable_group N, enable_group N, queue_if_no_path, \
                     fail_if_no_path)",
                    self.name,
                    args.join(" ")
                )))
            }
        }
        Ok(String::new())
    }
}
