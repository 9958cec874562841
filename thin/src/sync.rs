//! Small async locks that work across threads (waker based, no runtime needed).
//!
//! - [`CellLocks`]: one exclusive lock per (thin device, virtual block), like dm's bio
//!   prison: I/O to one block is serialized so a provisioning or copy-on-write is never seen
//!   half done and a block freed by a remap is not reused under a read in flight.
//! - [`Gate`]: per-device shared/exclusive gate. Writes hold it shared; `create_snap` holds the
//!   origin's gate exclusively, so in-flight writes finish before the snapshot shares the
//!   mapping and later writes see the snapshot.

use std::collections::HashMap;
use std::future::poll_fn;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Exclusive locks keyed by `K`.
pub struct CellLocks<K: Eq + Hash + Copy> {
    held: Mutex<HashMap<K, Vec<Waker>>>,
}

impl<K: Eq + Hash + Copy> Default for CellLocks<K> {
    fn default() -> Self {
        CellLocks {
            held: Mutex::new(HashMap::new()),
        }
    }
}

/// A held cell; released on drop.
pub struct CellGuard<'a, K: Eq + Hash + Copy> {
    locks: &'a CellLocks<K>,
    key: K,
}

impl<K: Eq + Hash + Copy> CellLocks<K> {
    /// Waits for and takes the lock on `key`.
    pub async fn lock(&self, key: K) -> CellGuard<'_, K> {
        poll_fn(|cx| {
            let mut h = lock(&self.held);
            match h.get_mut(&key) {
                None => {
                    h.insert(key, Vec::new());
                    Poll::Ready(())
                }
                Some(w) => {
                    w.push(cx.waker().clone());
                    Poll::Pending
                }
            }
        })
        .await;
        CellGuard { locks: self, key }
    }
    /// Number of held cells.
    pub fn held(&self) -> usize {
        lock(&self.held).len()
    }
}

impl<K: Eq + Hash + Copy> Drop for CellGuard<'_, K> {
    fn drop(&mut self) {
        let waiters = lock(&self.locks.held).remove(&self.key);
        for w in waiters.into_iter().flatten() {
            w.wake();
        }
    }
}

#[derive(Default)]
struct GateState {
    shared: usize,
    exclusive: bool,
    exclusive_waiting: usize,
    waiters: Vec<Waker>,
}

/// A shared/exclusive gate; waiting exclusive holders block new shared ones (no starvation).
#[derive(Default, Clone)]
pub struct Gate {
    st: Arc<Mutex<GateState>>,
}

/// A held gate; released on drop.
pub struct GateGuard {
    st: Arc<Mutex<GateState>>,
    exclusive: bool,
}

struct WaitingExclusive<'a>(&'a Mutex<GateState>, bool);

impl Drop for WaitingExclusive<'_> {
    fn drop(&mut self) {
        if self.1 {
            let mut s = lock(self.0);
            s.exclusive_waiting -= 1;
            for w in s.waiters.drain(..) {
                w.wake();
            }
        }
    }
}

impl Gate {
    /// Enters shared.
    pub async fn shared(&self) -> GateGuard {
        poll_fn(|cx| {
            let mut s = lock(&self.st);
            if s.exclusive || s.exclusive_waiting > 0 {
                s.waiters.push(cx.waker().clone());
                Poll::Pending
            } else {
                s.shared += 1;
                Poll::Ready(())
            }
        })
        .await;
        GateGuard {
            st: self.st.clone(),
            exclusive: false,
        }
    }

    /// Enters exclusive: waits for shared holders to leave.
    pub async fn exclusive(&self) -> GateGuard {
        lock(&self.st).exclusive_waiting += 1;
        let mut waiting = WaitingExclusive(&self.st, true);
        poll_fn(|cx| {
            let mut s = lock(&self.st);
            if s.exclusive || s.shared > 0 {
                s.waiters.push(cx.waker().clone());
                Poll::Pending
            } else {
                s.exclusive = true;
                s.exclusive_waiting -= 1;
                Poll::Ready(())
            }
        })
        .await;
        waiting.1 = false;
        drop(waiting);
        GateGuard {
            st: self.st.clone(),
            exclusive: true,
        }
    }
}

impl Drop for GateGuard {
    fn drop(&mut self) {
        let mut s = lock(&self.st);
        if self.exclusive {
            s.exclusive = false;
        } else {
            s.shared -= 1;
        }
        for w in s.waiters.drain(..) {
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;
    use futures::FutureExt;

    #[test]
    fn cell_excludes_and_gate_orders() {
        let c: CellLocks<u32> = CellLocks::default();
        block_on(async {
            let g = c.lock(1).await;
            assert!(c.lock(1).now_or_never().is_none());
            let _h = c.lock(2).await;
            drop(g);
            assert!(c.lock(1).now_or_never().is_some());
        });
        let gate = Gate::default();
        block_on(async {
            let s = gate.shared().await;
            let mut ex = Box::pin(gate.exclusive());
            assert!((&mut ex).now_or_never().is_none());
            // A waiting exclusive blocks new shared holders.
            assert!(gate.shared().now_or_never().is_none());
            drop(s);
            let e = ex.await;
            drop(e);
            assert!(gate.shared().now_or_never().is_some());
        });
    }
}
