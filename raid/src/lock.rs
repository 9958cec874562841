//! An async lock table keyed by `u64` (stripe or sync-unit index), shared or exclusive.
//!
//! Client futures run on many threads (each on its own runtime) and the background sync runs on
//! its own thread, so the lock must be `Send + Sync` and must never block a thread: a contended
//! acquisition parks the task's waker and returns `Pending`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};

#[derive(Default)]
struct Entry {
    shared: u32,
    exclusive: bool,
    waiters: Vec<Waker>,
}

/// The lock table.
#[derive(Default)]
pub struct LockTable {
    map: Mutex<HashMap<u64, Entry>>,
}

/// A held lock on one key; released on drop.
pub struct LockGuard {
    table: Arc<LockTable>,
    key: u64,
    exclusive: bool,
}

impl LockTable {
    fn guard(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Acquires `key` in the given mode, waiting (asynchronously) for conflicting holders.
    pub async fn lock(self: &Arc<Self>, key: u64, exclusive: bool) -> LockGuard {
        std::future::poll_fn(|cx| {
            let mut map = self.guard();
            let e = map.entry(key).or_default();
            let free = if exclusive {
                !e.exclusive && e.shared == 0
            } else {
                !e.exclusive
            };
            if free {
                if exclusive {
                    e.exclusive = true;
                } else {
                    e.shared += 1;
                }
                Poll::Ready(())
            } else {
                if !e.waiters.iter().any(|w| w.will_wake(cx.waker())) {
                    e.waiters.push(cx.waker().clone());
                }
                Poll::Pending
            }
        })
        .await;
        LockGuard {
            table: self.clone(),
            key,
            exclusive,
        }
    }

    /// Acquires several keys in ascending order (so two multi-key holders cannot deadlock).
    pub async fn lock_many(self: &Arc<Self>, keys: &[u64], exclusive: bool) -> Vec<LockGuard> {
        let mut sorted = keys.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let mut out = Vec::with_capacity(sorted.len());
        for k in sorted {
            out.push(self.lock(k, exclusive).await);
        }
        out
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        let waiters = {
            let mut map = self.table.guard();
            let Some(e) = map.get_mut(&self.key) else {
                return;
            };
            if self.exclusive {
                e.exclusive = false;
            } else {
                e.shared = e.shared.saturating_sub(1);
            }
            if e.exclusive || e.shared > 0 {
                // Still held: only an exclusive waiter could be blocked, and it must keep waiting.
                return;
            }
            let w = std::mem::take(&mut e.waiters);
            map.remove(&self.key);
            w
        };
        for w in waiters {
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    #[test]
    fn exclusive_excludes_and_shared_shares() {
        let t = Arc::new(LockTable::default());
        let order = Rc::new(Cell::new(0u32));
        iort::block_on(async {
            let g1 = t.lock(1, false).await;
            let g2 = t.lock(1, false).await;
            let o = order.clone();
            let t2 = t.clone();
            let waiter = async move {
                let _g = t2.lock(1, true).await;
                assert_eq!(
                    o.get(),
                    1,
                    "exclusive lock granted while shared holders remained"
                );
                o.set(2);
            };
            let release = async {
                iort::yield_now().await;
                drop(g1);
                iort::yield_now().await;
                order.set(1);
                drop(g2);
            };
            futures::future::join(waiter, release).await;
        })
        .unwrap();
        assert_eq!(order.get(), 2);
        assert!(t.guard().is_empty());
    }
}
