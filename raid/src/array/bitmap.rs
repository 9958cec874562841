//! The write-intent bitmap on the I/O path: setting bits durably before a write moves data,
//! and clearing them lazily after a flush.

use futures::future::join_all;
use tables::io::{IoError, IoResult, WriteFlags};
use tables::Bytes;

use crate::meta::{self, BITS_PER_PAGE, META_BLOCK};

use super::{Inner, LegState};

impl Inner {
    /// Makes bitmap generation `gen` durable on every in-sync metadata device.
    pub(super) async fn persist_bitmap(&self, gen: u64, fua: bool) -> IoResult<()> {
        if !self.has_meta {
            return Ok(());
        }
        if self.bm_state().disk_gen >= gen {
            // Fast path: the bits this caller needs are already durable.
            return Ok(());
        }
        let _g = self.bm_lock.lock(0, true).await;
        let (pages, snap_gen) = {
            let mut bm = self.bm_state();
            if bm.disk_gen >= gen {
                return Ok(());
            }
            let mut pages = Vec::new();
            for p in 0..bm.dirty_pages.len() {
                if bm.dirty_pages[p] {
                    bm.dirty_pages[p] = false;
                    pages.push((p as u64, meta::encode_bitmap_page(p as u64, &bm.words)));
                }
            }
            (pages, bm.mem_gen)
        };
        let flags = if fua {
            WriteFlags::FUA
        } else {
            WriteFlags::default()
        };
        let blocks: Vec<(u64, Vec<u8>, String)> = pages
            .into_iter()
            .map(|(p, b)| ((1 + p) * META_BLOCK as u64, b, format!("bitmap page {p}")))
            .collect();
        if !self.write_metas(&blocks, flags).await {
            // Put the pages back so a later persist retries them.
            let mut bm = self.bm_state();
            for (off, _, _) in &blocks {
                bm.dirty_pages[(off / META_BLOCK as u64 - 1) as usize] = true;
            }
            return Err(IoError::eio(format!(
                "{}: write-intent bitmap could not be written to any leg",
                self.name
            )));
        }
        let mut bm = self.bm_state();
        bm.disk_gen = bm.disk_gen.max(snap_gen);
        Ok(())
    }

    /// Writes `blocks` (offset, bytes, what for errors) to the metadata device of every
    /// in-sync leg, failing the legs whose writes fail; returns whether any leg took them all.
    pub(super) async fn write_metas(
        &self,
        blocks: &[(u64, Vec<u8>, String)],
        flags: WriteFlags,
    ) -> bool {
        let targets: Vec<usize> = (0..self.n())
            .filter(|&i| self.legs[i].state() == LegState::InSync)
            .collect();
        let futs = targets.iter().map(|&i| async move {
            let Some(m) = &self.legs[i].meta else {
                return (i, Ok(()));
            };
            for (off, b, what) in blocks {
                // SAFETY: the buffer belongs to this future and the call is awaited in it:
                // completed, dropped first (waiting for the kernel), or leaked with it.
                if let Err(e) = unsafe { m.write(Bytes(*off), b, flags) }.await {
                    return (i, Err(e.context(what)));
                }
            }
            (i, Ok(()))
        });
        let mut ok = 0;
        for (i, r) in join_all(futs).await {
            match r {
                Ok(()) => ok += 1,
                Err(e) => self.fail_leg(i, &e).await,
            }
        }
        ok > 0
    }

    /// Marks regions `[first, last]` as being written: sets (and durably persists) their bits
    /// before any data moves.
    pub(super) async fn start_write(&self, first: u64, last: u64) -> IoResult<()> {
        if !self.has_meta {
            return Ok(());
        }
        let gen = {
            let mut bm = self.bm_state();
            let mut changed = false;
            for r in first..=last {
                let r = r as usize;
                bm.inflight[r] += 1;
                bm.seq[r] = bm.seq[r].wrapping_add(1);
                if bm.words[r / 64] >> (r % 64) & 1 == 0 {
                    bm.words[r / 64] |= 1 << (r % 64);
                    bm.dirty_pages[r / BITS_PER_PAGE] = true;
                    changed = true;
                }
            }
            if changed {
                bm.mem_gen += 1;
            }
            bm.mem_gen
        };
        let r = self.persist_bitmap(gen, true).await;
        if r.is_err() {
            self.end_write(first, last);
        }
        r
    }

    pub(super) fn end_write(&self, first: u64, last: u64) {
        if !self.has_meta {
            return;
        }
        let mut bm = self.bm_state();
        for r in first..=last {
            let r = r as usize;
            bm.inflight[r] = bm.inflight[r].saturating_sub(1);
        }
    }

    /// Flushes every live leg, then lazily clears the bits of regions whose writes all
    /// completed before the flush started.
    pub(super) async fn flush_all(&self) -> IoResult<()> {
        let candidates: Vec<(usize, u32)> = if self.has_meta {
            let bm = self.bm_state();
            let st = self.sync_state();
            (0..self.regions() as usize)
                .filter(|&r| {
                    bm.words[r / 64] >> (r % 64) & 1 == 1 && bm.inflight[r] == 0 && !st.pending[r]
                })
                .map(|r| (r, bm.seq[r]))
                .collect()
        } else {
            Vec::new()
        };
        self.flush_live_legs("flush").await;
        if !self.legs.iter().any(|l| l.state() == LegState::InSync) {
            return Err(IoError::eio(format!(
                "{}: flush failed on every leg",
                self.name
            )));
        }
        self.ensure_failures_persisted().await?;
        if !candidates.is_empty() {
            let gen = {
                let mut bm = self.bm_state();
                let st = self.sync_state();
                let mut changed = false;
                for (r, seq) in candidates {
                    if bm.inflight[r] == 0 && bm.seq[r] == seq && !st.pending[r] {
                        bm.words[r / 64] &= !(1 << (r % 64));
                        bm.dirty_pages[r / BITS_PER_PAGE] = true;
                        changed = true;
                    }
                }
                if changed {
                    bm.mem_gen += 1;
                }
                bm.mem_gen
            };
            // Clearing happens only here, after a flush, so it is already lazy. It is still
            // written FUA: a non-FUA clear could be reordered after the FUA write that sets the
            // bit again for a newer write, and a lost set bit is a lost resync.
            self.persist_bitmap(gen, true).await?;
        }
        Ok(())
    }
}
