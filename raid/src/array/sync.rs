//! Background work: the sync thread, resync of dirty regions, recovery of rebuilt legs,
//! check / repair, and leg replacement.

use std::sync::atomic::Ordering;
use std::sync::Weak;
use std::time::{Duration, Instant};

use futures::future::join_all;
use tables::io::{DeviceRef, IoError, IoResult, WriteFlags};
use tables::Bytes;

use crate::xor::xor_many;

use super::mirror_io::MirrorPiece;
use super::{Geo, Inner, LegState, SyncAction};

/// How many bytes of a mirror's regions one recovery step copies at once.
const RECOVER_BYTES: u64 = 16 << 20;
/// At most this many regions per recovery step (small regions).
const RECOVER_MAX: u64 = 16;

pub(super) fn background_loop(weak: Weak<Inner>) {
    let Ok(rt) = iort::Runtime::new(64) else {
        return;
    };
    loop {
        let Some(inner) = weak.upgrade() else { return };
        if inner.stop.load(Ordering::Acquire) {
            return;
        }
        let ios_before = inner.client_ios.load(Ordering::Relaxed);
        let more = rt.block_on(inner.sync_step()).unwrap_or(false);
        if more {
            // Throttle: honour max_recovery_rate, and otherwise back off briefly whenever
            // clients were active during the step so their I/O keeps going.
            // A step moves one stripe (parity) or one region (mirror) per leg.
            let unit = match inner.geo {
                Geo::Parity { chunk, .. } => chunk,
                Geo::Mirror { .. } => inner
                    .region_bytes
                    .saturating_mul(inner.step_units.swap(0, Ordering::Relaxed).max(1)),
            };
            let rate_pause = (unit as u128 * 1_000_000 / 1024)
                .checked_div(inner.cfg.max_recovery_kib as u128)
                .map(|us| u64::try_from(us).unwrap_or(u64::MAX));
            let pause = match rate_pause {
                Some(us) => Duration::from_micros(us),
                None if inner.client_ios.load(Ordering::Relaxed) != ios_before => {
                    Duration::from_millis(1)
                }
                None => Duration::ZERO,
            };
            if !pause.is_zero() {
                inner.pause(pause);
            }
            continue;
        }
        let (m, cv) = (&inner.wake.0, &inner.wake.1);
        let g = m.lock().unwrap_or_else(|e| e.into_inner());
        let mut g = if *g {
            g
        } else {
            cv.wait_timeout(g, Duration::from_millis(200))
                .map(|r| r.0)
                .unwrap_or_else(|e| e.into_inner().0)
        };
        *g = false;
    }
}

impl Inner {
    /// Sleeps `d` between background steps, but returns as soon as the device is stopped: a
    /// slow `max_recovery_rate` can ask for hours, and dropping the device must not wait.
    fn pause(&self, d: Duration) {
        let deadline = Instant::now().checked_add(d);
        let mut g = self.wake.0.lock().unwrap_or_else(|e| e.into_inner());
        while !self.stop.load(Ordering::Acquire) {
            let left = match deadline {
                Some(t) => t.saturating_duration_since(Instant::now()),
                None => Duration::from_secs(3600),
            };
            if left.is_zero() {
                break;
            }
            g = self
                .wake
                .1
                .wait_timeout(g, left)
                .map(|r| r.0)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    pub(super) async fn sync_step(&self) -> IoResult<bool> {
        let want = self
            .grow_want
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some((size, sync)) = want {
            // The handle that asked is the one in use now (see `RaidDevice`'s drop); a failed
            // grow is in status, and that handle's first request beyond the old end retries.
            if self.ensure_size(size, sync).await.is_ok() {
                return Ok(true);
            }
        }
        if self.readd_returned_legs().await {
            return Ok(true);
        }
        let action = self.current_action();
        match action {
            SyncAction::Idle | SyncAction::Frozen => Ok(false),
            SyncAction::Recover => {
                let _g = self.rec_lock.lock(0, true).await;
                match self.recover_step().await {
                    Ok(more) => Ok(more),
                    Err(e) => {
                        // Recovery cannot make progress (another leg failed): stop and say so
                        // in status until a leg is replaced.
                        self.sync_state().stuck = Some(e.msg.clone());
                        Err(e)
                    }
                }
            }
            SyncAction::Resync | SyncAction::Check | SyncAction::Repair => {
                let next = {
                    let mut st = self.sync_state();
                    // Read under the sync lock: a grow stores a larger count under it, after
                    // making room in `pending`.
                    let regions = self.regions();
                    let mut r = st.cursor;
                    if action == SyncAction::Resync {
                        while r < regions && !st.pending[r as usize] {
                            r += 1;
                        }
                        if r >= regions {
                            // Wrap: pending regions behind the cursor (set by a later `resync`).
                            r = (0..regions)
                                .find(|&x| st.pending[x as usize])
                                .unwrap_or(regions);
                        }
                    }
                    if r >= regions {
                        st.cursor = 0;
                        if action != SyncAction::Resync {
                            st.scrub = None;
                        }
                        None
                    } else {
                        st.cursor = r + 1;
                        Some(r)
                    }
                };
                let Some(r) = next else {
                    // Pass complete: flush so the bitmap bits of resynced regions clear.
                    self.flush_all().await?;
                    if action == SyncAction::Resync && self.sync_state().pending_count == 0 {
                        for l in &self.legs {
                            l.stale.store(false, Ordering::Release);
                        }
                    }
                    return Ok(self.current_action() != SyncAction::Idle);
                };
                let mode = match action {
                    SyncAction::Check => SyncMode2::Check,
                    _ => SyncMode2::Fix,
                };
                self.sync_region(r, mode).await?;
                if action == SyncAction::Resync {
                    let done = {
                        let mut st = self.sync_state();
                        if st.pending[r as usize] {
                            st.pending[r as usize] = false;
                            st.pending_count -= 1;
                        }
                        st.pending_count == 0
                    };
                    if done {
                        // Resync complete: flush so the bits clear; stale legs are current now.
                        self.flush_all().await?;
                        for l in &self.legs {
                            l.stale.store(false, Ordering::Release);
                        }
                    }
                }
                Ok(true)
            }
        }
    }

    pub(super) fn recover_units(&self) -> u64 {
        match self.geo {
            Geo::Mirror { .. } => self.regions(),
            Geo::Parity { chunk, .. } => self.leg_bytes() / chunk,
        }
    }

    async fn recover_step(&self) -> IoResult<bool> {
        let pos = self.recover_pos.load(Ordering::Acquire);
        if pos >= self.recover_units() {
            // Done: the rebuilt legs become in-sync and the superblocks say so.
            for l in &self.legs {
                if l.state() == LegState::Recovering {
                    l.set(LegState::InSync);
                }
            }
            self.recover_pos.store(0, Ordering::Release);
            {
                let mut bm = self.bm_state();
                for d in bm.dirty_pages.iter_mut() {
                    *d = true;
                }
                bm.mem_gen += 1;
            }
            self.flush_all().await?;
            self.write_superblocks().await?;
            let g = self.bm_state().mem_gen;
            self.persist_bitmap(g, true).await?;
            return Ok(self.current_action() != SyncAction::Idle);
        }
        match self.geo {
            Geo::Mirror { .. } => {
                // Several regions at once (each under its own region lock), so the read of
                // one overlaps the write of another: over a network leg one region at a time
                // waits out a round trip per read and per write.
                let batch = (RECOVER_BYTES / self.region_bytes.max(1)).clamp(1, RECOVER_MAX);
                let end = pos.saturating_add(batch).min(self.recover_units());
                let copied = join_all((pos..end).map(|r| self.recover_region(r))).await;
                copied.into_iter().collect::<IoResult<Vec<()>>>()?;
                // Every region below `end` is on the rebuilt legs now, and client writes reach
                // those legs too: reads may use them there. (`replace_leg` resets the position
                // under `rec_lock`, which this step holds.)
                self.recover_pos.store(end, Ordering::Release);
                self.step_units.store(end - pos, Ordering::Relaxed);
            }
            Geo::Parity { chunk, .. } => {
                let stripe = pos;
                let g = self.locks.lock(stripe, true).await;
                let recovering: Vec<usize> = (0..self.n())
                    .filter(|&i| self.legs[i].state() == LegState::Recovering)
                    .collect();
                let failed = (0..self.n())
                    .filter(|&i| self.legs[i].state() == LegState::Failed)
                    .count();
                if recovering.len() + failed > 1 {
                    let why = format!(
                        "cannot rebuild: {} legs missing at once in a single-parity array",
                        recovering.len() + failed
                    );
                    self.sync_state().stuck = Some(why.clone());
                    return Err(IoError::eio(format!("{}: {why}", self.name)));
                }
                if let Some(&m) = recovering.first() {
                    let mut b = vec![0u8; chunk as usize];
                    let loff = stripe * chunk;
                    // Treat the leg as missing for this stripe while it is rebuilt.
                    match self.reconstruct(stripe, m, loff, &mut b).await {
                        Ok(()) => {
                            // SAFETY: the buffer belongs to this future and the call is awaited in
                            // it: completed, dropped first (waiting for the kernel), or leaked with
                            // it.
                            if let Err(e) = unsafe {
                                self.legs[m]
                                    .dev()
                                    .write(Bytes(loff), &b, WriteFlags::default())
                            }
                            .await
                            {
                                self.fail_leg(m, &e.context(format!("leg {m} rebuild write")))
                                    .await;
                            }
                        }
                        Err(e) => return Err(e),
                    }
                }
                self.recover_pos.store(stripe + 1, Ordering::Release);
                drop(g);
                // A region whose stripes are all rebuilt is consistent by construction.
                let per_region = self.region_bytes / chunk;
                if (stripe + 1).is_multiple_of(per_region) || stripe + 1 == self.recover_units() {
                    let r = stripe / per_region;
                    let mut st = self.sync_state();
                    if st.pending[r as usize] {
                        st.pending[r as usize] = false;
                        st.pending_count -= 1;
                    }
                }
            }
        }
        Ok(true)
    }

    /// Copies mirror region `r` to the recovering legs (the whole region made consistent
    /// when it also awaits resync). The caller advances the recovery position.
    async fn recover_region(&self, r: u64) -> IoResult<()> {
        let pending = self.sync_state().pending[r as usize];
        let mode = if pending {
            SyncMode2::Fix
        } else {
            SyncMode2::Recover
        };
        self.sync_region(r, mode).await?;
        if pending {
            let mut st = self.sync_state();
            if st.pending[r as usize] {
                st.pending[r as usize] = false;
                st.pending_count -= 1;
            }
        }
        Ok(())
    }

    /// Resync, check or repair one region; for mirrors in Recover mode, copies to the
    /// recovering legs only.
    async fn sync_region(&self, r: u64, mode: SyncMode2) -> IoResult<()> {
        match self.geo {
            Geo::Mirror { .. } => {
                let _g = self.locks.lock(r, true).await;
                let start = r * self.region_bytes;
                let end = (r + 1).saturating_mul(self.region_bytes).min(self.size());
                if start < end {
                    for p in self.mirror_pieces(start, end - start) {
                        self.sync_mirror_piece(&p, r, mode).await?;
                    }
                }
                Ok(())
            }
            Geo::Parity { chunk, .. } => {
                let per_region = self.region_bytes / chunk;
                let stripes = self.leg_bytes() / chunk;
                for s in r * per_region..((r + 1) * per_region).min(stripes) {
                    self.sync_stripe(s, mode).await?;
                }
                Ok(())
            }
        }
    }

    async fn sync_mirror_piece(
        &self,
        p: &MirrorPiece,
        region: u64,
        mode: SyncMode2,
    ) -> IoResult<()> {
        let mut buf = vec![0u8; p.len];
        // Source: the first copy that is valid (the same one reads use in unsynced regions).
        let src = loop {
            let insync = |i: usize| self.legs[i].state() == LegState::InSync;
            let fresh = p
                .copies
                .iter()
                .find(|&&(i, _)| insync(i) && !self.legs[i].stale.load(Ordering::Acquire));
            let Some(&(i, loff)) = fresh.or_else(|| p.copies.iter().find(|&&(i, _)| insync(i)))
            else {
                return Err(IoError::eio(format!(
                    "{}: no in-sync copy of bytes {}.. to sync from",
                    self.name, p.off
                )));
            };
            // SAFETY: the buffer belongs to this future and the call is awaited in it: completed,
            // dropped first (waiting for the kernel), or leaked with it.
            match unsafe { self.legs[i].dev().read(Bytes(loff), &mut buf) }.await {
                Ok(()) => break i,
                Err(e) => {
                    self.fail_leg(i, &e.context(format!("leg {i} sync read")))
                        .await
                }
            }
        };
        let _ = region;
        for &(i, loff) in &p.copies {
            if i == src {
                continue;
            }
            let st = self.legs[i].state();
            let write = match (mode, st) {
                (_, LegState::Failed) => false,
                (SyncMode2::Recover, s) => s == LegState::Recovering,
                (_, LegState::Recovering) => mode == SyncMode2::Fix,
                (SyncMode2::Check | SyncMode2::Fix, LegState::InSync) => {
                    let mut other = vec![0u8; p.len];
                    // SAFETY: the buffer belongs to this future and the call is awaited in it:
                    // completed, dropped first (waiting for the kernel), or leaked with it.
                    match unsafe { self.legs[i].dev().read(Bytes(loff), &mut other) }.await {
                        Ok(()) => {
                            let diff = count_diff_sectors(&buf, &other);
                            self.mismatches.fetch_add(diff, Ordering::Relaxed);
                            diff > 0 && mode == SyncMode2::Fix
                        }
                        Err(e) => {
                            self.fail_leg(i, &e.context(format!("leg {i} check read")))
                                .await;
                            false
                        }
                    }
                }
            };
            if write {
                // SAFETY: the buffer belongs to this future and the call is awaited in it:
                // completed, dropped first (waiting for the kernel), or leaked with it.
                if let Err(e) = unsafe {
                    self.legs[i]
                        .dev()
                        .write(Bytes(loff), &buf, WriteFlags::default())
                }
                .await
                {
                    self.fail_leg(i, &e.context(format!("leg {i} sync write")))
                        .await;
                }
            }
        }
        Ok(())
    }

    async fn sync_stripe(&self, s: u64, mode: SyncMode2) -> IoResult<()> {
        let (_, chunk) = self.parity_geo();
        let _g = self.locks.lock(s, true).await;
        let missing = self.missing_in_stripe(s);
        if !missing.is_empty() {
            // Degraded: there is no redundancy to check or restore.
            return Ok(());
        }
        let map = self.stripe_map(s);
        let loff = s * chunk;
        let mut bufs: Vec<Vec<u8>> = (0..self.n()).map(|_| vec![0u8; chunk as usize]).collect();
        let futs = bufs.iter_mut().enumerate().map(|(i, b)| async move {
            // SAFETY: the buffer belongs to this future and the call is awaited in it:
            // completed, dropped first (waiting for the kernel), or leaked with it.
            (i, unsafe { self.legs[i].dev().read(Bytes(loff), b) }.await)
        });
        let rs: Vec<_> = join_all(futs).await;
        if self.fail_reads(rs.into_iter()).await {
            return Ok(());
        }
        let mut p = vec![0u8; chunk as usize];
        let srcs: Vec<&[u8]> = map.data.iter().map(|&i| bufs[i].as_slice()).collect();
        xor_many(&mut p, &srcs);
        let diff = count_diff_sectors(&p, &bufs[map.parity]);
        self.mismatches.fetch_add(diff, Ordering::Relaxed);
        if diff > 0 && mode == SyncMode2::Fix {
            let pl = map.parity;
            // SAFETY: the buffer belongs to this future and the call is awaited in it: completed,
            // dropped first (waiting for the kernel), or leaked with it.
            if let Err(e) = unsafe {
                self.legs[pl]
                    .dev()
                    .write(Bytes(loff), &p, WriteFlags::default())
            }
            .await
            {
                self.fail_leg(pl, &e.context(format!("leg {pl} parity write")))
                    .await;
            }
        }
        Ok(())
    }

    /// A leg on a remote extent that failed (its server died, its link was cut) and whose
    /// extent has connected again since is rebuilt onto the same device, as an administrator's
    /// `rebuild IDX` would. Legs failed by real I/O errors on a live connection stay failed.
    /// Returns whether a rebuild started.
    async fn readd_returned_legs(&self) -> bool {
        for i in 0..self.n() {
            let leg = &self.legs[i];
            if leg.state() != LegState::Failed || leg.missing.load(Ordering::Acquire) {
                continue;
            }
            let Some(then) = *leg.failed_at_conn.lock().unwrap_or_else(|e| e.into_inner()) else {
                continue;
            };
            let dev = leg.data.read().unwrap_or_else(|e| e.into_inner()).clone();
            if dev.connections_made().is_none_or(|now| now <= then) {
                continue;
            }
            *leg.failed_at_conn.lock().unwrap_or_else(|e| e.into_inner()) = None;
            log::warn!(
                "{}: leg {i} ({}) is reachable again: rebuilding onto it",
                self.name,
                dev.name()
            );
            match self.replace_leg(i, None).await {
                Ok(()) => return true,
                Err(e) => log::warn!("{}: leg {i}: the rebuild did not start: {e}", self.name),
            }
        }
        false
    }

    pub(super) async fn replace_leg(&self, idx: usize, dev: Option<DeviceRef>) -> IoResult<()> {
        if idx >= self.n() {
            return Err(IoError::invalid(format!(
                "{}: no leg {idx} (0-based, {} legs)",
                self.name,
                self.n()
            )));
        }
        if dev.is_none() && self.legs[idx].missing.load(Ordering::Acquire) {
            return Err(IoError::invalid(format!(
                "{}: leg {idx} is missing ('- -' in the table): rebuild it onto a device with \
                 'rebuild {idx} <device>'",
                self.name
            )));
        }
        let st = self.legs[idx].state();
        if st == LegState::InSync {
            // Rebuilding an in-sync leg is allowed only if the array keeps a valid source.
            self.legs[idx].set(LegState::Recovering);
            if let Err(e) = self.check_assemblable() {
                self.legs[idx].set(LegState::InSync);
                return Err(IoError::invalid(format!("rebuild {idx}: {e}")));
            }
        }
        // Whatever happens now, the failure this leg was waiting out is dealt with.
        *self.legs[idx]
            .failed_at_conn
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
        if let Some(d) = dev {
            if d.size().0 < self.leg_bytes() {
                if st == LegState::InSync {
                    self.legs[idx].set(LegState::InSync);
                }
                return Err(IoError::invalid(format!(
                    "{}: replacement for leg {idx} ({}) has {} bytes; needs {}",
                    self.name,
                    d.name(),
                    d.size().0,
                    self.leg_bytes()
                )));
            }
            *self.legs[idx]
                .data
                .write()
                .unwrap_or_else(|e| e.into_inner()) = d;
            self.legs[idx].missing.store(false, Ordering::Release);
        }
        // Recovery restarts from the beginning for every recovering leg.
        let _g = self.rec_lock.lock(0, true).await;
        self.recover_pos.store(0, Ordering::Release);
        self.legs[idx].set(LegState::Recovering);
        self.sync_state().stuck = None;
        self.write_superblocks().await?;
        self.kick();
        Ok(())
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum SyncMode2 {
    /// Compare only.
    Check,
    /// Make consistent (resync, repair), including recovering legs.
    Fix,
    /// Copy to recovering legs only.
    Recover,
}

fn count_diff_sectors(a: &[u8], b: &[u8]) -> u64 {
    a.chunks(512)
        .zip(b.chunks(512))
        .filter(|(x, y)| x != y)
        .count() as u64
}
