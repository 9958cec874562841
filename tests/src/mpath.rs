//! Helpers of the multipath end-to-end tests: a path's state in `dev status`, and a writer
//! of patterned 1 MiB slots through an NBD export that fails on any client error.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{qemu_io, DaemonProc};

/// The state (`A`/`F`) and fail count `dev status NAME` shows for the path `uri`.
pub fn path_state(d: &DaemonProc, name: &str, uri: &str) -> (String, String) {
    let st = d.ok(&["dev", "status", name]);
    let f: Vec<&str> = st.split_whitespace().collect();
    f.windows(3)
        .find(|w| w[0] == uri && (w[1] == "A" || w[1] == "F"))
        .map(|w| (w[1].to_string(), w[2].to_string()))
        .unwrap_or_else(|| panic!("no path {uri} in the status of {name}: {st}"))
}

/// Waits (at most `secs`) until path `uri` of `name` shows `want`; returns its fail count.
pub fn wait_path(d: &DaemonProc, name: &str, uri: &str, want: &str, secs: u64) -> String {
    let t0 = Instant::now();
    loop {
        let (s, n) = path_state(d, name, uri);
        if s == want {
            return n;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "{uri} never showed {want}: {}\n{}",
            d.ok(&["dev", "status", name]),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A thread writing pattern `k % 250 + 1` to 1 MiB slot `k % slots` of an NBD export with
/// qemu-io, each write flushed and read back; any error panics the thread.
pub struct PatternWriter {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<(Vec<u8>, usize)>,
}

impl PatternWriter {
    /// Starts writing to `uri`.
    pub fn start(uri: &str, slots: usize) -> PatternWriter {
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, uri) = (stop.clone(), uri.to_string());
        let thread = std::thread::spawn(move || {
            let mut last = vec![0u8; slots];
            let mut k = 0usize;
            while !stop2.load(Ordering::Acquire) {
                let slot = k % slots;
                let pat = (k % 250 + 1) as u8;
                let off = slot << 20;
                qemu_io(
                    &uri,
                    &[
                        &format!("write -P {pat} {off} 1M"),
                        "flush",
                        &format!("read -P {pat} {off} 1M"),
                    ],
                );
                last[slot] = pat;
                k += 1;
            }
            (last, k)
        });
        PatternWriter { stop, thread }
    }

    /// Whether the thread ended (only an error ends it before [`PatternWriter::finish`]).
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Stops the writer; returns the last pattern of each slot (0: never written) and the
    /// number of writes, or `None` if the writer saw an error.
    pub fn finish(self) -> Option<(Vec<u8>, usize)> {
        self.stop.store(true, Ordering::Release);
        self.thread.join().ok()
    }
}
