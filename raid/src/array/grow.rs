//! Growing an array to a larger table: the legs must hold the new size and every leg be in
//! sync; the new size is made durable so that a power cut at any point leaves the old size or
//! the new one on disk, never a bitmap that calls a new, unsynced region in sync:
//!
//! 1. room in memory for the new regions, and the write-intent bits of every region that
//!    reaches past the old end set (unless the table says `nosync`) as for a write in flight,
//!    so no flush clears them;
//! 2. the bitmap pages written (FUA) to every in-sync metadata device, the new pages whole
//!    (they held the end of the old partial parity log);
//! 3. a raid4/5 array whose bitmap took more pages moves its (idle) parity log past them: the
//!    block where the new checkpoint goes is zeroed (FUA), so no old log bytes read as one;
//! 4. the superblocks written (FUA) with the new size: the commit. A cut before it leaves
//!    the old size, and the table's larger size grows the array again at assembly; a cut
//!    during it leaves some legs on each size, and assembly takes the newest superblock and
//!    resyncs everything (the others missed a superblock round);
//! 5. the new regions marked pending (the background resync copies or recomputes them; reads
//!    there use the first in-sync copy meanwhile, raid4/5 writes compute whole parity), then
//!    the new sizes published.
//!
//! An array never changes its region size when it grows: a size that would need more regions
//! than the bitmap holds at that size is refused, as is any shrinking.

use std::sync::atomic::Ordering;

use tables::io::{IoError, IoResult, WriteFlags};
use tables::Bytes;

use crate::geometry::{self, Sizing, MAX_REGIONS};
use crate::meta::{self, BITS_PER_PAGE, META_BLOCK};
use crate::parse::SyncMode;
use crate::ppl::{self, Geometry};

use super::{Geo, Inner, LegState};

impl Inner {
    /// What growing to `new` bytes makes of the array, or why it cannot grow to it (the
    /// reason names the leg and the sizes).
    pub(super) fn grow_plan(&self, new: u64) -> Result<Sizing, String> {
        let s = geometry::sizing(&self.cfg, Bytes(new))?;
        if s.region_bytes != self.region_bytes {
            return Err(format!(
                "its bitmap regions are {} sectors, and {new} bytes would need regions of {} \
                 sectors (at most {MAX_REGIONS} regions); an array keeps its region size when \
                 it grows",
                self.region_bytes / 512,
                s.region_bytes / 512
            ));
        }
        for (i, l) in self.legs.iter().enumerate() {
            let st = l.state();
            if st != LegState::InSync {
                let what = match st {
                    LegState::Recovering => "being rebuilt",
                    _ => "failed or missing",
                };
                return Err(format!(
                    "leg {i} ({}) is {what}: an array grows only with every leg in sync",
                    l.dev().name()
                ));
            }
        }
        for (i, l) in self.legs.iter().enumerate() {
            let d = l.dev();
            if d.size().0 < s.leg_bytes {
                return Err(format!(
                    "leg {i} ({}) has {} bytes; {new} bytes need {} per leg",
                    d.name(),
                    d.size().0,
                    s.leg_bytes
                ));
            }
            if let Some(m) = &l.meta {
                if m.size().0 < s.meta_bytes {
                    return Err(format!(
                        "metadata device of leg {i} ({}) has {} bytes; needs {} (superblock + \
                         bitmap of {} regions)",
                        m.name(),
                        m.size().0,
                        s.meta_bytes,
                        s.regions
                    ));
                }
            }
        }
        let log = self.ppl_state().geo;
        if let (Geo::Parity { chunk, .. }, Some(_)) = (&self.geo, log) {
            // A log that fits now must still fit after the larger bitmap.
            let base = meta::meta_bytes(s.regions);
            if Geometry::fit(base, self.min_meta_bytes(), *chunk).is_none() {
                let need = ppl::Geometry::bytes_for(base, ppl::max_entry_bytes(*chunk));
                return Err(format!(
                    "the metadata devices ({} bytes) cannot hold the bitmap of {} regions and \
                     the partial parity log after it ({need} bytes)",
                    self.min_meta_bytes(),
                    s.regions
                ));
            }
        }
        Ok(s)
    }

    /// The smallest metadata device (the parity log must fit every one).
    pub(super) fn min_meta_bytes(&self) -> u64 {
        self.legs
            .iter()
            .filter_map(|l| l.meta.as_ref().map(|m| m.size().0))
            .min()
            .unwrap_or(0)
    }

    /// Grows the array to `new` bytes unless it is that large already; the regions it adds
    /// are resynced unless `sync` is `nosync`. Concurrent callers wait for one grow.
    pub(super) async fn ensure_size(&self, new: u64, sync: SyncMode) -> IoResult<()> {
        if self.size() >= new {
            return Ok(());
        }
        let _g = self.grow_lock.lock(0, true).await;
        if self.size() >= new {
            return Ok(());
        }
        let r = self.grow_locked(new, sync).await;
        *self.grow_error.lock().unwrap_or_else(|e| e.into_inner()) =
            r.as_ref().err().map(|e| e.msg.clone());
        r
    }

    /// Under `grow_lock`: the steps in the module docs.
    async fn grow_locked(&self, new: u64, sync: SyncMode) -> IoResult<()> {
        let old = self.size();
        let fail = |why: String| {
            IoError::eio(format!(
                "{}: cannot grow from {old} to {new} bytes: {why}",
                self.name
            ))
        };
        let s = self.grow_plan(new).map_err(fail)?;
        // No parity log starts while the bitmap runs into its space and it moves.
        let _log = self.ppl_lock.lock(0, true).await;
        // A log kept until a leg came back is dropped at the next write; here, now.
        let geo = self.ppl_state().geo;
        if let Some(g) = geo {
            self.ppl_transition(g, 0).await.map_err(|e| fail(e.msg))?;
        }
        {
            let p = self.ppl_state();
            if p.log_leg.is_some() || p.activating {
                return Err(fail(
                    "the partial parity log is in use (a leg went out of sync)".into(),
                ));
            }
        }
        let old_regions = self.regions();
        let new_regions = s.regions;
        // The region holding the old end is partly new: it is resynced with the new ones.
        let span = match self.geo {
            Geo::Parity { .. } => self.leg_bytes(),
            Geo::Mirror { .. } => old,
        };
        let first = (span / self.region_bytes).min(old_regions);
        let resync = sync != SyncMode::Skip;
        let marked = if resync { first..new_regions } else { 0..0 };
        // 1. Room, and the bits of the regions to resync, held as by a write in flight.
        let gen = {
            let mut bm = self.bm_state();
            let n = new_regions as usize;
            bm.words.resize(n.div_ceil(64), 0);
            bm.inflight.resize(n, 0);
            bm.seq.resize(n, 0);
            // New pages are written whole: they held parity log bytes.
            let pages = meta::bitmap_pages(new_regions) as usize;
            bm.dirty_pages.resize(pages, true);
            for r in marked.clone() {
                let r = r as usize;
                bm.inflight[r] += 1;
                bm.seq[r] = bm.seq[r].wrapping_add(1);
                bm.words[r / 64] |= 1 << (r % 64);
                bm.dirty_pages[r / BITS_PER_PAGE] = true;
            }
            bm.mem_gen += 1;
            bm.mem_gen
        };
        self.sync_state()
            .pending
            .resize(new_regions as usize, false);
        let r = self.grow_commit(&s, new, gen).await;
        if r.is_ok() {
            // 5. Publish: pending first, then the sizes, under the sync lock the background
            // step reads the region count under.
            let mut st = self.sync_state();
            for r in marked.clone() {
                let p = &mut st.pending[r as usize];
                if !*p {
                    *p = true;
                    st.pending_count += 1;
                }
            }
            self.leg_bytes.store(s.leg_bytes, Ordering::Release);
            self.regions.store(new_regions, Ordering::Release);
            self.size.store(new, Ordering::Release);
        }
        {
            let mut bm = self.bm_state();
            for r in marked {
                let c = &mut bm.inflight[r as usize];
                *c = c.saturating_sub(1);
            }
        }
        if r.is_ok() {
            self.kick();
        }
        r.map_err(|e| fail(e.msg))
    }

    /// Steps 2 to 4: the bitmap, the parity log's new place and the superblocks.
    async fn grow_commit(&self, s: &Sizing, new: u64, gen: u64) -> IoResult<()> {
        self.persist_bitmap(gen, true).await?;
        let moved = match self.geo {
            Geo::Parity { chunk, .. } => {
                let base = meta::meta_bytes(s.regions);
                let cur = self.ppl_state().geo;
                cur.filter(|g| g.base != base)
                    .and_then(|_| Geometry::fit(base, self.min_meta_bytes(), chunk))
            }
            Geo::Mirror { .. } => None,
        };
        if let Some(g) = moved {
            self.clear_checkpoint(g.base).await?;
        }
        *self.recorded.lock().unwrap_or_else(|e| e.into_inner()) = (s.leg_bytes, new);
        self.write_superblocks().await?;
        if moved.is_some() {
            self.ppl_state().geo = moved;
        }
        Ok(())
    }

    /// Zeroes the block at `base` on every in-sync metadata device (FUA): where the moved
    /// parity log's checkpoint goes, so that nothing there reads as one until the log starts.
    async fn clear_checkpoint(&self, base: u64) -> IoResult<()> {
        let zero = [(base, vec![0u8; META_BLOCK], "parity log move".to_string())];
        if !self.write_metas(&zero, WriteFlags::FUA).await {
            return Err(IoError::eio(format!(
                "{}: the parity log's new place could not be cleared on any leg",
                self.name
            )));
        }
        Ok(())
    }
}
