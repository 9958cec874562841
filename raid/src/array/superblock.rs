//! Superblock writes: the event counter, and recording leg failures in the surviving legs'
//! metadata before any write that skipped a failed leg completes.

use std::sync::atomic::Ordering;

use futures::future::join_all;
use tables::io::{IoError, IoResult, WriteFlags};
use tables::Bytes;

use crate::meta::{self, Superblock};

use super::{Inner, LegState, ST_FAILED};

impl Inner {
    pub(super) fn want_sb(&self, idx: usize) -> Superblock {
        let (level, layout) = self.cfg.level.codes();
        let (leg_bytes, array_bytes) = *self.recorded.lock().unwrap_or_else(|e| e.into_inner());
        Superblock {
            uuid: self.uuid,
            leg_index: idx as u32,
            legs: self.n() as u32,
            level,
            layout,
            chunk_sectors: self.cfg.chunk.0,
            region_sectors: self.region_bytes / 512,
            leg_bytes,
            events: self.events.load(Ordering::Acquire),
            // A leg without a metadata device here (a `- -` leg, even once replaced and
            // rebuilt) has no superblock of its own to vouch for its data: it stays marked, so
            // whatever device is named for it at the next start is rebuilt.
            failed_mask: self
                .legs
                .iter()
                .enumerate()
                .filter(|(_, l)| l.state() != LegState::InSync || l.meta.is_none())
                .fold(0u64, |m, (i, _)| m | (1 << i)),
            clean: false,
            data_id: meta::data_id(&self.legs[idx].dev().name()),
            array_bytes,
        }
    }

    /// Bumps the event counter and writes superblocks to every in-sync leg. A leg whose
    /// metadata write fails is failed too (and the others rewritten).
    pub(super) async fn write_superblocks(&self) -> IoResult<()> {
        if !self.has_meta {
            return Ok(());
        }
        let _g = self.sb_lock.lock(0, true).await;
        for _ in 0..=self.n() {
            let epoch = self.fail_epoch.load(Ordering::Acquire);
            self.events.fetch_add(1, Ordering::AcqRel);
            let targets: Vec<usize> = (0..self.n())
                .filter(|&i| self.legs[i].state() == LegState::InSync)
                .collect();
            if targets.is_empty() {
                return Err(IoError::eio(format!(
                    "{}: no in-sync leg left to hold the superblock",
                    self.name
                )));
            }
            let clean = self.bm_state().words.iter().all(|&w| w == 0);
            let blocks: Vec<Vec<u8>> = targets
                .iter()
                .map(|&i| {
                    let mut sb = self.want_sb(i);
                    sb.clean = clean;
                    sb.encode()
                })
                .collect();
            let futs = targets.iter().zip(&blocks).map(|(&i, b)| async move {
                match &self.legs[i].meta {
                    // SAFETY: the buffer belongs to this future and the call is awaited in it:
                    // completed, dropped first (waiting for the kernel), or leaked with it.
                    Some(m) => (i, unsafe { m.write(Bytes(0), b, WriteFlags::FUA) }.await),
                    None => (i, Ok(())),
                }
            });
            let mut failed = false;
            for (i, r) in join_all(futs).await {
                if let Err(e) = r {
                    self.mark_failed(i, &e.context("superblock write"));
                    failed = true;
                }
            }
            if !failed {
                self.persisted_epoch.fetch_max(epoch, Ordering::AcqRel);
                return Ok(());
            }
        }
        Err(IoError::eio(format!(
            "{}: superblock writes keep failing",
            self.name
        )))
    }

    /// Sets the failed state (memory only). Returns whether it changed.
    pub(super) fn mark_failed(&self, i: usize, e: &IoError) -> bool {
        let prev = self.legs[i].state.swap(ST_FAILED, Ordering::AcqRel);
        if prev != ST_FAILED {
            self.fail_epoch.fetch_add(1, Ordering::AcqRel);
            *self.legs[i]
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(format!("{}", e));
            let conns = self.legs[i]
                .data
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .connections_made();
            *self.legs[i]
                .failed_at_conn
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = conns;
            self.kick();
            true
        } else {
            false
        }
    }

    /// Fails leg `i` after an I/O error and records it in the surviving superblocks before
    /// the request that saw the error completes (so a restart never trusts the stale leg).
    pub(super) async fn fail_leg(&self, i: usize, e: &IoError) {
        if self.mark_failed(i, e) {
            // If this fails there is no in-sync leg left; the caller's own checks report EIO.
            let _ = self.write_superblocks().await;
        }
    }

    /// Waits until every leg failure seen so far is in the superblocks (a write that skipped a
    /// failed leg must not complete before a restart would also skip it).
    pub(super) async fn ensure_failures_persisted(&self) -> IoResult<()> {
        if !self.has_meta
            || self.persisted_epoch.load(Ordering::Acquire)
                >= self.fail_epoch.load(Ordering::Acquire)
        {
            return Ok(());
        }
        self.write_superblocks().await
    }
}
