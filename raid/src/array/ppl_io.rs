//! The partial parity log on the I/O path: logging stripe writes while a leg is not in sync,
//! moving to the next segment, dropping the log once every leg is in sync again, and replay at
//! assembly. The on-disk format and the replay arithmetic are in [`crate::ppl`].

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::time::Duration;

use futures::future::join_all;
use tables::io::{IoError, IoResult, WriteFlags};
use tables::Bytes;

use crate::layout::StripeMap;
use crate::meta::{self, META_BLOCK};
use crate::ppl::{self, Checkpoint, ChunkSource, Entry, Geometry};
use crate::xor::xor_into;
use crate::RaidError;

use super::{Geo, Inner, LegState, PplState};

/// A stripe write's hold on the log: counted in flight under the generation it was logged in
/// (0: not logged) until dropped, so a segment is not reused and the log is not (re)started
/// while a write it does not cover may still be in a volatile cache.
pub(super) struct PplHold<'a> {
    inner: &'a Inner,
    gen: u64,
    stripe: u64,
}

impl Drop for PplHold<'_> {
    fn drop(&mut self) {
        let mut s = self.inner.ppl_state();
        if self.gen != 0 {
            let started = s.flush_started;
            s.unflushed.insert(self.stripe, started);
        }
        if let Some(c) = s.inflight.get_mut(&self.gen) {
            *c -= 1;
            if *c == 0 {
                s.inflight.remove(&self.gen);
            }
        }
    }
}

impl Inner {
    pub(super) fn ppl_state(&self) -> std::sync::MutexGuard<'_, PplState> {
        self.ppl.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn all_in_sync(&self) -> bool {
        self.legs.iter().all(|l| l.state() == LegState::InSync)
    }

    /// Called by a stripe write once its new parity `p` over `[plo, plo + p.len())` is known,
    /// before any data or parity moves. While a leg is not in sync this writes the stripe's
    /// log entry (FUA) and returns when it is durable; otherwise it only counts the write.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn ppl_begin(
        &self,
        stripe: u64,
        map: &StripeMap,
        w: &[Option<(u64, u64, usize)>],
        (plo, phi): (u64, u64),
        p: &[u8],
        data: &[u8],
    ) -> IoResult<Option<PplHold<'_>>> {
        // Partial parity holds the chunks this write leaves alone, as they are now. If the
        // stripe's previous write is not durable yet, a cut could still take those contents
        // back, and replay would then encode the wrong missing data: flush first. A write that
        // covers the whole parity range in every chunk assumes nothing.
        let partial = w
            .iter()
            .any(|x| !matches!(x, Some((lo, hi, _)) if *lo == plo && *hi == phi));
        {
            let mut s = self.ppl_state();
            if s.geo.is_none() {
                return Ok(None);
            }
            // The common case, every leg in sync and no log kept: count the write and go,
            // without building an entry nobody writes.
            if s.log_leg.is_none() && !s.activating && self.all_in_sync() {
                return Ok(Some(self.unlogged(&mut s, stripe)));
            }
        }
        let mut entry = self.ppl_entry(stripe, map, w, (plo, phi), partial, p, data);
        let need = ppl::aligned(entry.encoded_len());
        for _ in 0..self.n() + 4 {
            let got = {
                let mut s = self.ppl_state();
                // Read each round: a grow moves the log (only while no log is kept).
                let Some(geo) = s.geo else {
                    return Ok(None);
                };
                let degraded = !self.all_in_sync();
                match s.log_leg {
                    None if !degraded && !s.activating => {
                        return Ok(Some(self.unlogged(&mut s, stripe)));
                    }
                    Some(l)
                        if degraded
                            && self.legs[l].state() == LegState::InSync
                            && s.next_off + need <= geo.seg_bytes =>
                    {
                        let off = geo.seg_offset(s.cur) + s.next_off;
                        s.next_off += need;
                        let gen = s.gens[s.cur];
                        entry.gen = gen;
                        entry.key = s.keys[s.cur];
                        entry.seq = s.next_seq;
                        s.next_seq += 1;
                        s.written += 1;
                        *s.inflight.entry(gen).or_default() += 1;
                        Some((l, off, gen))
                    }
                    _ => None,
                }
            };
            let Some((l, off, gen)) = got else {
                let _g = self.ppl_lock.lock(0, true).await;
                let Some(geo) = self.ppl_state().geo else {
                    return Ok(None);
                };
                self.ppl_transition(geo, need).await?;
                continue;
            };
            let hold = PplHold {
                inner: self,
                gen,
                stripe,
            };
            let stale = partial && {
                let s = self.ppl_state();
                s.unflushed.get(&stripe).is_some_and(|&t| s.flush_done <= t)
            };
            if stale {
                self.flush_live_legs("flush for the parity log").await;
            }
            let Some(m) = &self.legs[l].meta else {
                break;
            };
            // SAFETY: the buffer belongs to this future and the call is awaited in it: completed,
            // dropped first (waiting for the kernel), or leaked with it.
            match unsafe { m.write(Bytes(off), &entry.encode(&self.uuid), WriteFlags::FUA) }.await {
                Ok(()) => return Ok(Some(hold)),
                Err(e) => {
                    drop(hold);
                    // The log moves to another leg on the next round.
                    self.fail_leg(l, &e.context(format!("leg {l} parity log write")))
                        .await;
                }
            }
        }
        Err(IoError::eio(format!(
            "{}: stripe {stripe}: the partial parity log could not be written to any leg",
            self.name
        )))
    }

    /// Counts a write that goes unlogged (every leg in sync, no log kept).
    fn unlogged(&self, s: &mut PplState, stripe: u64) -> PplHold<'_> {
        *s.inflight.entry(0).or_default() += 1;
        PplHold {
            inner: self,
            gen: 0,
            stripe,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn ppl_entry<'d>(
        &self,
        stripe: u64,
        map: &StripeMap,
        w: &[Option<(u64, u64, usize)>],
        (plo, phi): (u64, u64),
        partial: bool,
        p: &[u8],
        data: &'d [u8],
    ) -> Entry<'d> {
        // Partial parity = new parity with the new contents of every written range XORed out;
        // zero (and not stored) when every chunk is written over the whole range.
        let mut pp = partial.then(|| p.to_vec());
        let mut logged = Vec::new();
        let mut ranges = Vec::with_capacity(w.len());
        for (i, wi) in w.iter().enumerate() {
            let Some((lo, hi, doff)) = *wi else {
                ranges.push(None);
                continue;
            };
            let d = &data[doff..doff + (hi - lo) as usize];
            if let Some(pp) = pp.as_mut() {
                xor_into(&mut pp[(lo - plo) as usize..(hi - plo) as usize], d);
            }
            if self.legs[map.data[i]].state() != LegState::InSync && logged.len() < ppl::MAX_LOGGED
            {
                logged.push((i, Cow::Borrowed(d)));
            }
            ranges.push(Some((lo, hi)));
        }
        // Generation, key and sequence are filled in when space is taken.
        Entry {
            gen: 0,
            key: 0,
            seq: 0,
            stripe,
            plo,
            plen: phi - plo,
            ranges,
            pp: pp.map(Cow::Owned),
            logged,
        }
    }

    /// Under `ppl_lock`: starts, moves, advances to the next segment of, or drops the log,
    /// whichever the array's state asks for (another writer may already have done it). `need`
    /// is the space the caller's entry takes.
    pub(super) async fn ppl_transition(&self, geo: Geometry, need: u64) -> IoResult<()> {
        let degraded = !self.all_in_sync();
        let (log_leg, cur, next_off) = {
            let s = self.ppl_state();
            (s.log_leg, s.cur, s.next_off)
        };
        if !degraded {
            if let Some(l) = log_leg {
                // Every leg is in sync again: the log is dropped before any write goes
                // unlogged (its entries would be stale under those writes). Writes still in
                // flight under it are covered by the bitmap: all legs are there to resync.
                let none = ([0; ppl::SEGMENTS], [0; ppl::SEGMENTS]);
                if self.ppl_write_cp(l, none, geo).await.is_ok() {
                    let mut s = self.ppl_state();
                    s.log_leg = None;
                    (s.gens, s.keys) = none;
                }
            }
            return Ok(());
        }
        let log_ok = log_leg.is_some_and(|l| self.legs[l].state() == LegState::InSync);
        if log_ok && next_off + need <= geo.seg_bytes {
            return Ok(());
        }
        // Starting (or moving) the log: every write in flight, logged or not, must be durable
        // before the new generation is the only one replayed. Advancing: the same for the
        // writes logged in the segment about to be reused.
        let next = (cur + 1) % ppl::SEGMENTS;
        let reuse = log_ok.then(|| self.ppl_state().gens[next]);
        self.ppl_state().activating = reuse.is_none();
        let r = self.ppl_restart(geo, log_leg, reuse, next).await;
        self.ppl_state().activating = false;
        r
    }

    async fn ppl_restart(
        &self,
        geo: Geometry,
        log_leg: Option<usize>,
        reuse: Option<u64>,
        next: usize,
    ) -> IoResult<()> {
        loop {
            let busy = self
                .ppl_state()
                .inflight
                .iter()
                .any(|(&g, &c)| c > 0 && reuse.is_none_or(|old| g == old && old != 0));
            if !busy {
                break;
            }
            iort::sleep(Duration::from_micros(100)).await;
        }
        self.flush_live_legs("flush for the parity log").await;
        let l = match (reuse, log_leg) {
            (Some(_), Some(l)) => l,
            _ => (0..self.n())
                .find(|&i| self.legs[i].state() == LegState::InSync && self.legs[i].meta.is_some())
                .ok_or_else(|| {
                    IoError::eio(format!(
                        "{}: no in-sync leg left to hold the partial parity log",
                        self.name
                    ))
                })?,
        };
        let (gen, mut gens, mut keys) = {
            let mut s = self.ppl_state();
            s.max_gen += 1;
            (s.max_gen, s.gens, s.keys)
        };
        let key = u64::from_le_bytes(meta::new_uuid()[..8].try_into().unwrap_or([1; 8])) | 1;
        let seg = match reuse {
            Some(_) => next,
            None => {
                // A fresh log: nothing older is valid.
                gens = [0; ppl::SEGMENTS];
                keys = [0; ppl::SEGMENTS];
                0
            }
        };
        gens[seg] = gen;
        keys[seg] = key;
        if self.ppl_write_cp(l, (gens, keys), geo).await.is_ok() {
            let mut s = self.ppl_state();
            s.log_leg = Some(l);
            s.gens = gens;
            s.keys = keys;
            s.cur = seg;
            s.next_off = 0;
        }
        // On failure the leg is failed; the caller's next round moves the log.
        Ok(())
    }

    async fn ppl_write_cp(
        &self,
        l: usize,
        (gens, keys): ([u64; ppl::SEGMENTS], [u64; ppl::SEGMENTS]),
        geo: Geometry,
    ) -> IoResult<()> {
        let cp = Checkpoint {
            uuid: self.uuid,
            gens,
            keys,
            seg_bytes: geo.seg_bytes,
        };
        let Some(m) = &self.legs[l].meta else {
            return Err(IoError::eio(format!(
                "{}: leg {l} has no metadata device for the log",
                self.name
            )));
        };
        // SAFETY: the buffer belongs to this future and the call is awaited in it: completed,
        // dropped first (waiting for the kernel), or leaked with it.
        match unsafe { m.write(Bytes(geo.base), &cp.encode(), WriteFlags::FUA) }.await {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = e.context(format!("leg {l} parity log checkpoint"));
                self.fail_leg(l, &e).await;
                Err(e)
            }
        }
    }

    /// Numbers a flush of every leg about to start.
    pub(super) fn flush_ticket(&self) -> u64 {
        let mut s = self.ppl_state();
        s.flush_started += 1;
        s.flush_started
    }

    /// Records that flush `ticket` completed: writes that completed before it started are
    /// durable.
    pub(super) fn flush_done(&self, ticket: u64) {
        let mut s = self.ppl_state();
        s.flush_done = s.flush_done.max(ticket);
        s.unflushed.retain(|_, t| *t >= ticket);
    }

    /// Flushes the data and metadata devices of every live leg, failing legs that error
    /// (`what` names the flush in their error), and numbers the flush for the log.
    pub(super) async fn flush_live_legs(&self, what: &str) {
        let ticket = self.flush_ticket();
        let live: Vec<usize> = (0..self.n())
            .filter(|&i| self.legs[i].state() != LegState::Failed)
            .collect();
        let futs = live.iter().map(|&i| async move {
            let r = self.legs[i].dev().flush().await;
            let r2 = match &self.legs[i].meta {
                Some(m) => m.flush().await,
                None => Ok(()),
            };
            (i, r.and(r2))
        });
        for (i, r) in join_all(futs).await {
            if let Err(e) = r {
                self.fail_leg(i, &e.context(what.to_string())).await;
            }
        }
        self.flush_done(ticket);
    }

    /// At assembly, after the legs to trust are known: sizes the log and finds the newest
    /// checkpoint of this array on any leg. A checkpoint whose checksum holds but whose
    /// segments or generations this code could not have written makes its leg untrusted (to
    /// be rebuilt, with the reason), as a bad superblock does.
    pub(super) async fn ppl_scan(&self) -> Option<(usize, Checkpoint)> {
        let Geo::Parity { chunk, .. } = self.geo else {
            return None;
        };
        if !self.has_meta {
            return None;
        }
        let base = meta::meta_bytes(self.regions());
        let min_meta = self
            .legs
            .iter()
            .filter_map(|l| l.meta.as_ref().map(|m| m.size().0))
            .min()
            .unwrap_or(0);
        {
            let mut s = self.ppl_state();
            if self.n() - 1 > ppl::MAX_DATA_CHUNKS {
                s.why_none = Some("too_many_legs");
            } else {
                s.geo = Geometry::fit(base, min_meta, chunk);
                if s.geo.is_none() {
                    s.why_none = Some("metadata_device_too_small");
                }
            }
        }
        // The newest checkpoint on any leg: a leg not trusted now may still hold the log.
        let mut best: Option<(usize, Checkpoint)> = None;
        for (i, l) in self.legs.iter().enumerate() {
            let Some(m) = &l.meta else { continue };
            if m.size().0 < base + META_BLOCK as u64 {
                continue;
            }
            let mut b = vec![0u8; META_BLOCK];
            // SAFETY: the buffer belongs to this future and the call is awaited in it: completed,
            // dropped first (waiting for the kernel), or leaked with it.
            if unsafe { m.read(Bytes(base), &mut b) }.await.is_err() {
                continue;
            }
            let Some(cp) = Checkpoint::decode(&b) else {
                continue;
            };
            if cp.uuid != self.uuid {
                continue; // left by an earlier array on this device
            }
            if let Some(why) = cp.problem(base, m.size().0) {
                if l.state() == LegState::InSync {
                    *l.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!(
                        "leg {i} not trusted: parity log checkpoint: {why}; rebuilding"
                    ));
                    l.set(LegState::Recovering);
                }
                continue;
            }
            if best
                .as_ref()
                .is_none_or(|(_, c)| cp.max_gen() > c.max_gen())
            {
                best = Some((i, cp));
            }
        }
        best
    }

    /// At assembly, once the legs are settled: if a leg is missing, replays the entries of the
    /// checkpoint [`ppl_scan`](Self::ppl_scan) found into parity (flushed before any client
    /// I/O). Returns whether a log was being kept when the array stopped (then every write
    /// that might not have been durable is covered by it).
    pub(super) async fn ppl_replay(
        &self,
        best: Option<(usize, Checkpoint)>,
    ) -> Result<bool, RaidError> {
        let Geo::Parity { chunk, .. } = self.geo else {
            return Ok(false);
        };
        let Some((li, cp)) = best else {
            return Ok(false);
        };
        let base = meta::meta_bytes(self.regions());
        let io = |what: String| move |e: IoError| RaidError::Io(e.context(what));
        self.ppl_state().max_gen = cp.max_gen();
        let active = cp.active();
        if !active || self.all_in_sync() {
            // With every leg present the bitmap resync recomputes parity from the data.
            return Ok(active);
        }
        let Some(m) = self.legs[li].meta.clone() else {
            return Ok(false);
        };
        let lg = Geometry {
            base,
            seg_bytes: cp.seg_bytes,
        };
        let stripes = self.leg_bytes() / chunk;
        let k = self.n() - 1;
        let mut entries = Vec::new();
        for seg in 0..ppl::SEGMENTS {
            if cp.gens[seg] == 0 {
                continue;
            }
            let mut b = vec![0u8; cp.seg_bytes as usize];
            // SAFETY: the buffer belongs to this future and the call is awaited in it: completed,
            // dropped first (waiting for the kernel), or leaked with it.
            unsafe { m.read(Bytes(lg.seg_offset(seg)), &mut b) }
                .await
                .map_err(io(format!("parity log replay: segment {seg} read")))?;
            let mut pos = 0usize;
            while pos + META_BLOCK <= b.len() {
                match Entry::decode(&b[pos..], &self.uuid, chunk) {
                    Some(e)
                        if e.gen == cp.gens[seg]
                            && e.key == cp.keys[seg]
                            && e.stripe < stripes
                            && e.ranges.len() == k =>
                    {
                        pos += ppl::aligned(e.encoded_len()) as usize;
                        entries.push(e);
                    }
                    _ => pos += META_BLOCK,
                }
            }
        }
        // Oldest first: the newest write to a byte decides its parity.
        entries.sort_by_key(|e| e.seq);
        let mut touched = BTreeSet::new();
        let mut replayed = 0u64;
        for e in &entries {
            let map = self.stripe_map(e.stripe);
            let pleg = map.parity;
            if self.legs[pleg].state() != LegState::InSync {
                continue; // no parity to restore
            }
            let at = e.stripe * chunk;
            let mut disk: Vec<Option<Vec<u8>>> = vec![None; k];
            for (i, r) in e.ranges.iter().enumerate() {
                let Some((lo, hi)) = *r else { continue };
                let leg = map.data[i];
                if self.legs[leg].state() == LegState::InSync {
                    let mut b = vec![0u8; (hi - lo) as usize];
                    // SAFETY: the buffer belongs to this future and the call is awaited in it:
                    // completed, dropped first (waiting for the kernel), or leaked with it.
                    unsafe { self.legs[leg].dev().read(Bytes(at + lo), &mut b) }
                        .await
                        .map_err(io(format!(
                            "parity log replay, stripe {}: leg {leg} read",
                            e.stripe
                        )))?;
                    disk[i] = Some(b);
                }
            }
            let runs = ppl::replay_entry(e, |i| {
                match (&disk[i], e.logged.iter().find(|x| x.0 == i)) {
                    (Some(d), _) => ChunkSource::Disk(d),
                    (None, Some((_, d))) => ChunkSource::Logged(d),
                    (None, None) => ChunkSource::Lost,
                }
            });
            let pdev = self.legs[pleg].dev();
            for (o, buf) in runs {
                // SAFETY: the buffer belongs to this future and the call is awaited in it:
                // completed, dropped first (waiting for the kernel), or leaked with it.
                unsafe { pdev.write(Bytes(at + o), &buf, WriteFlags::default()) }
                    .await
                    .map_err(io(format!(
                        "parity log replay, stripe {}: leg {pleg} parity write",
                        e.stripe
                    )))?;
            }
            touched.insert(pleg);
            replayed += 1;
        }
        for pleg in touched {
            self.legs[pleg]
                .dev()
                .flush()
                .await
                .map_err(io(format!("parity log replay: leg {pleg} flush")))?;
        }
        let mut s = self.ppl_state();
        s.replayed = replayed;
        s.next_seq = entries.last().map(|e| e.seq + 1).unwrap_or(0);
        Ok(true)
    }

    /// The log's part of the status line (parity arrays with metadata devices).
    pub(super) fn ppl_status(&self) -> String {
        let s = self.ppl_state();
        let mut out = match (s.geo, s.why_none) {
            (None, why) => format!(" ppl:none({})", why.unwrap_or("no_metadata")),
            (Some(g), _) if s.log_leg.is_some() => format!(
                " ppl:active({}_entries,{}x{}KiB)",
                s.written,
                ppl::SEGMENTS,
                g.seg_bytes >> 10
            ),
            (Some(g), _) => format!(" ppl:idle({}x{}KiB)", ppl::SEGMENTS, g.seg_bytes >> 10),
        };
        if s.replayed > 0 {
            out.push_str(&format!(" ppl_replayed:{}_entries", s.replayed));
        }
        out
    }
}
