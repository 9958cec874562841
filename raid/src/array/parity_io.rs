//! raid4/5 client I/O: reads (reconstructing a missing chunk), and stripe writes in two steps:
//! *plan* (which bytes to read, read-modify-write or reconstruct-write, and the new parity) and
//! *commit* (log while degraded, then write data and parity).

use std::sync::atomic::Ordering;

use futures::future::join_all;
use tables::io::{all_done, Dst, IoError, IoResult, Served, WriteFlags};
use tables::Bytes;

use crate::layout::{raid5_stripe, StripeMap};
use crate::scratch::Scratch;
use crate::xor::{xor_into, xor_many};

use super::{Geo, Inner, LegState};

/// One stripe's share of a client write.
struct StripeWrite<'d> {
    stripe: u64,
    map: StripeMap,
    /// Byte offset of the stripe's chunks on every leg.
    base: u64,
    /// Per data chunk: written range `[lo, hi)` in chunk coordinates and offset into `data`.
    w: Vec<Option<(u64, u64, usize)>>,
    /// The parity range `[plo, phi)`: the union of the written ranges.
    plo: u64,
    phi: u64,
    data: &'d [u8],
}

impl StripeWrite<'_> {
    fn plen(&self) -> usize {
        (self.phi - self.plo) as usize
    }
    /// Whether data chunk `i` is written over the whole parity range.
    fn full(&self, i: usize) -> bool {
        matches!(self.w[i], Some((lo, hi, _)) if lo == self.plo && hi == self.phi)
    }
}

/// One piece of a parity read: within one chunk.
struct ParityPiece {
    stripe: u64,
    data_idx: usize,
    in_chunk: u64,
    len: usize,
}

impl Inner {
    pub(super) fn parity_geo(&self) -> (crate::layout::Raid5Layout, u64) {
        match self.geo {
            Geo::Parity { layout, chunk } => (layout, chunk),
            // Not reached: parity paths are only taken for parity geometry.
            Geo::Mirror { .. } => (crate::layout::Raid5Layout::LeftSymmetric, 1),
        }
    }

    pub(super) fn stripe_map(&self, stripe: u64) -> StripeMap {
        let (layout, _) = self.parity_geo();
        raid5_stripe(layout, self.n(), stripe)
    }

    pub(super) fn stripe_region(&self, stripe: u64) -> u64 {
        let (_, chunk) = self.parity_geo();
        stripe * chunk / self.region_bytes
    }

    /// Whether leg `i` holds valid contents for `stripe`.
    pub(super) fn parity_readable(&self, i: usize, stripe: u64) -> bool {
        match self.legs[i].state() {
            LegState::InSync => true,
            LegState::Recovering => stripe < self.recover_pos.load(Ordering::Acquire),
            LegState::Failed => false,
        }
    }

    pub(super) fn missing_in_stripe(&self, stripe: u64) -> Vec<usize> {
        (0..self.n())
            .filter(|&i| !self.parity_readable(i, stripe))
            .collect()
    }

    /// # Safety
    /// For `Dst::Mem` the legs may lend that memory to the kernel: keep the
    /// [lending contract](tables::io#the-lending-contract) for the returned future.
    pub(super) async unsafe fn parity_read(&self, off: u64, buf: Dst<'_>) -> IoResult<Served> {
        let (_, chunk) = self.parity_geo();
        let k = self.n() as u64 - 1;
        let width = chunk * k;
        let mut pieces = Vec::new();
        let mut pos = off;
        let end = off + buf.len() as u64;
        while pos < end {
            let stripe = pos / width;
            let within = pos % width;
            let l = (chunk - within % chunk).min(end - pos);
            pieces.push(ParityPiece {
                stripe,
                data_idx: (within / chunk) as usize,
                in_chunk: within % chunk,
                len: l as usize,
            });
            pos += l;
        }
        let lens: Vec<usize> = pieces.iter().map(|p| p.len).collect();
        let bufs = buf.split(&lens);
        let futs = pieces
            .iter()
            .zip(bufs)
            .map(|(p, b)| self.parity_read_piece(p, b));
        iort::try_join_all(futs.collect()).await.map(all_done)
    }

    /// # Safety
    /// For `Dst::Mem` the legs may lend that memory to the kernel: keep the
    /// [lending contract](tables::io#the-lending-contract) for the returned future.
    async unsafe fn parity_read_piece(
        &self,
        p: &ParityPiece,
        mut buf: Dst<'_>,
    ) -> IoResult<Served> {
        let (_, chunk) = self.parity_geo();
        let map = self.stripe_map(p.stripe);
        let leg = map.data[p.data_idx];
        let loff = p.stripe * chunk + p.in_chunk;
        if self.parity_readable(leg, p.stripe) {
            match buf.read_from(&*self.legs[leg].dev(), Bytes(loff)).await {
                Ok(s) => return Ok(s),
                Err(e) => {
                    self.fail_leg(leg, &e.context(format!("leg {leg} read")))
                        .await
                }
            }
        }
        // Degraded: rebuild the piece from the other legs under the stripe lock, so a write
        // to the same stripe cannot change parity halfway through. The XOR needs memory.
        let Dst::Mem(buf) = buf else {
            return Ok(Served::NeedsMemory);
        };
        let _g = self.locks.lock(p.stripe, true).await;
        self.reconstruct(p.stripe, leg, loff, buf)
            .await
            .map(|()| Served::Done)
    }

    /// Rebuilds leg `missing`'s bytes at leg offset `loff` of `stripe` by XOR of every other
    /// leg. Caller holds the stripe lock. Fails cleanly if another leg is missing too.
    pub(super) async fn reconstruct(
        &self,
        stripe: u64,
        missing: usize,
        loff: u64,
        buf: &mut [u8],
    ) -> IoResult<()> {
        let others: Vec<usize> = (0..self.n()).filter(|&i| i != missing).collect();
        for &i in &others {
            if !self.parity_readable(i, stripe) {
                return Err(IoError::eio(format!(
                    "{}: stripe {stripe} has two legs missing ({missing} and {i}); data lost",
                    self.name
                )));
            }
        }
        let mut bufs: Vec<Scratch> = others.iter().map(|_| Scratch::new(buf.len())).collect();
        let futs = others
            .iter()
            .zip(bufs.iter_mut())
            .map(|(&i, b)| async move {
                // SAFETY: the buffer belongs to this future and the call is awaited in it:
                // completed, dropped first (waiting for the kernel), or leaked with it.
                (i, unsafe { self.legs[i].dev().read(Bytes(loff), b) }.await)
            });
        let mut err = None;
        for (i, r) in join_all(futs).await {
            if let Err(e) = r {
                self.fail_leg(i, &e.clone().context(format!("leg {i} read")))
                    .await;
                err = Some(IoError::eio(format!(
                    "{}: stripe {stripe}: leg {i} failed while leg {missing} is missing; \
                     data lost ({e})",
                    self.name
                )));
            }
        }
        if let Some(e) = err {
            return Err(e);
        }
        let srcs: Vec<&[u8]> = bufs.iter().map(|b| &b[..]).collect();
        xor_many(buf, &srcs);
        Ok(())
    }

    /// # Safety
    /// The legs may lend `buf` to the kernel: keep the
    /// [lending contract](tables::io#the-lending-contract) for the returned future.
    pub(super) async unsafe fn parity_write(
        &self,
        off: u64,
        buf: &[u8],
        flags: WriteFlags,
    ) -> IoResult<()> {
        let (_, chunk) = self.parity_geo();
        let width = chunk * (self.n() as u64 - 1);
        let first_stripe = off / width;
        let last_stripe = (off + buf.len() as u64 - 1) / width;
        let (r0, r1) = (
            self.stripe_region(first_stripe),
            self.stripe_region(last_stripe),
        );
        self.start_write(r0, r1).await?;
        let mut jobs = Vec::new();
        let mut pos = off;
        let end = off + buf.len() as u64;
        while pos < end {
            let stripe = pos / width;
            let within = pos % width;
            let l = (width - within).min(end - pos);
            let data = &buf[(pos - off) as usize..(pos - off + l) as usize];
            jobs.push(self.stripe_write(stripe, within, data, flags));
            pos += l;
        }
        let r = iort::try_join_all(jobs).await.map(|_| ());
        let r = r.and(self.ensure_failures_persisted().await);
        self.end_write(r0, r1);
        r
    }

    /// Writes `data` at byte `within` of `stripe`'s data, updating parity: plans under the
    /// stripe lock (reads and the new parity), then commits (log entry, data, parity).
    ///
    /// # Safety
    /// The legs may lend `data` to the kernel: keep the
    /// [lending contract](tables::io#the-lending-contract) for the returned future.
    async unsafe fn stripe_write(
        &self,
        stripe: u64,
        within: u64,
        data: &[u8],
        flags: WriteFlags,
    ) -> IoResult<()> {
        let sw = self.stripe_ranges(stripe, within, data);
        let _g = self.locks.lock(stripe, true).await;
        self.client_ios.fetch_add(1, Ordering::Relaxed);
        let parity = self.stripe_plan(&sw).await?;
        self.stripe_commit(&sw, parity.as_deref(), flags).await
    }

    /// Which bytes of each data chunk of `stripe` a write of `data` at byte `within` of the
    /// stripe's data covers, and the parity range they span.
    fn stripe_ranges<'d>(&self, stripe: u64, within: u64, data: &'d [u8]) -> StripeWrite<'d> {
        let (_, chunk) = self.parity_geo();
        let k = self.n() - 1;
        let map = self.stripe_map(stripe);
        let base = stripe * chunk;
        // Per data chunk: written range [lo, hi) in chunk coordinates and offset into `data`.
        let mut w: Vec<Option<(u64, u64, usize)>> = vec![None; k];
        let end = within + data.len() as u64;
        for (i, wi) in w.iter_mut().enumerate() {
            let cs = i as u64 * chunk;
            let lo = within.max(cs);
            let hi = end.min(cs + chunk);
            if lo < hi {
                *wi = Some((lo - cs, hi - cs, (lo - within) as usize));
            }
        }
        let plo = w.iter().flatten().map(|x| x.0).min().unwrap_or(0);
        let phi = w.iter().flatten().map(|x| x.1).max().unwrap_or(0);
        StripeWrite {
            stripe,
            map,
            base,
            w,
            plo,
            phi,
            data,
        }
    }

    /// The plan step of a stripe write (caller holds the stripe lock): chooses read-modify-
    /// write or reconstruct-write by fewest bytes read (or what the missing leg allows), reads
    /// and computes the new parity over `[plo, phi)`; `None` when the parity leg is failed. A
    /// read failure fails the leg and re-plans (at most once per leg).
    async fn stripe_plan(&self, sw: &StripeWrite<'_>) -> IoResult<Option<Scratch>> {
        let k = self.n() - 1;
        let (stripe, map, w) = (sw.stripe, &sw.map, &sw.w);
        let plen = sw.plen();
        loop {
            let missing = self.missing_in_stripe(stripe);
            if missing.len() > 1 {
                return Err(IoError::eio(format!(
                    "{}: stripe {stripe} has legs {missing:?} missing; refusing the write",
                    self.name
                )));
            }
            let pleg = map.parity;
            let parity_missing = missing.contains(&pleg);
            if parity_missing && self.legs[pleg].state() == LegState::Failed {
                // No parity to maintain.
                return Ok(None);
            }
            let data_missing: Option<usize> = (0..k).find(|&i| missing.contains(&map.data[i]));
            let full = |i: usize| sw.full(i);
            // Bytes each strategy reads.
            let rcw_reads: u64 = (0..k).filter(|&i| !full(i)).count() as u64 * plen as u64;
            let rmw_reads: u64 = w.iter().flatten().map(|x| x.1 - x.0).sum::<u64>() + plen as u64;
            let rcw_ok = data_missing.is_none_or(full);
            let rmw_ok = !parity_missing && data_missing.is_none_or(|f| w[f].is_none());
            // A stripe awaiting resync (a new array, a grown one's new part, a dirty region
            // after a cut) may hold parity that matches nothing: read-modify-write would carry
            // the mismatch on, so parity is computed from every data chunk, as md does below
            // its resync point. A leg lost before the resync then still reads back right.
            let unsynced = self
                .sync_state()
                .pending
                .get(self.stripe_region(stripe) as usize)
                .copied()
                .unwrap_or(true);
            let use_rmw = rmw_ok && (!rcw_ok || (!unsynced && rmw_reads < rcw_reads));
            let planned = if use_rmw {
                self.plan_rmw(sw).await
            } else if (0..k).all(full) {
                // Full-stripe write: parity straight from the caller's data; no reads, and no
                // per-chunk buffers to allocate, zero and copy into (the general path below
                // copies every chunk first).
                let srcs: Vec<&[u8]> = w
                    .iter()
                    .flatten()
                    .map(|&(lo, hi, doff)| &sw.data[doff..doff + (hi - lo) as usize])
                    .collect();
                let mut p = Scratch::new(plen);
                xor_many(&mut p, &srcs);
                Some(p)
            } else {
                self.plan_rcw(sw, data_missing).await?
            };
            if let Some(p) = planned {
                return Ok(Some(p));
            }
        }
    }

    /// Read-modify-write: new P = old P ^ old D ^ new D over each written range. `None` if a
    /// read failed (its leg is failed; the caller re-plans).
    async fn plan_rmw(&self, sw: &StripeWrite<'_>) -> Option<Scratch> {
        let (map, w, base, plo, data) = (&sw.map, &sw.w, sw.base, sw.plo, sw.data);
        let pleg = map.parity;
        let mut p = Scratch::new(sw.plen());
        let mut olds: Vec<(usize, Scratch)> = w
            .iter()
            .enumerate()
            .filter_map(|(i, x)| x.map(|(lo, hi, _)| (i, Scratch::new((hi - lo) as usize))))
            .collect();
        let pdev = self.legs[pleg].dev();
        // SAFETY: the buffer belongs to this future and the call is awaited in it: completed,
        // dropped first (waiting for the kernel), or leaked with it.
        let pread = async { (pleg, unsafe { pdev.read(Bytes(base + plo), &mut p) }.await) };
        let dreads = olds.iter_mut().map(|(i, b)| {
            let leg = map.data[*i];
            let lo = w[*i].map(|x| x.0).unwrap_or(0);
            async move {
                (
                    leg,
                    // SAFETY: the buffer belongs to this future and the call is awaited in it:
                    // completed,
                    // dropped first (waiting for the kernel), or leaked with it.
                    unsafe { self.legs[leg].dev().read(Bytes(base + lo), b) }.await,
                )
            }
        });
        let (pr, drs) = futures::future::join(pread, join_all(dreads)).await;
        if self.fail_reads(std::iter::once(pr).chain(drs)).await {
            return None;
        }
        for (i, old) in &olds {
            if let Some((lo, hi, doff)) = w[*i] {
                let seg = &mut p[(lo - plo) as usize..(hi - plo) as usize];
                xor_into(seg, old);
                xor_into(seg, &data[doff..doff + (hi - lo) as usize]);
            }
        }
        Some(p)
    }

    /// Reconstruct-write: assembles every data chunk's new contents over `[plo, phi)` (a
    /// missing, partly written chunk's old contents rebuilt from parity first) and XORs them.
    /// `Ok(None)` if a read failed (its leg is failed; the caller re-plans).
    async fn plan_rcw(
        &self,
        sw: &StripeWrite<'_>,
        data_missing: Option<usize>,
    ) -> IoResult<Option<Scratch>> {
        let k = self.n() - 1;
        let (stripe, map, w, base, plo, data) =
            (sw.stripe, &sw.map, &sw.w, sw.base, sw.plo, sw.data);
        let plen = sw.plen();
        let pleg = map.parity;
        let full = |i: usize| sw.full(i);
        let mut cols: Vec<Option<Scratch>> = (0..k).map(|_| None).collect();
        let mut need: Vec<usize> = (0..k).filter(|&i| !full(i)).collect();
        let mut pbuf: Option<Scratch> = None;
        let rebuild_missing = data_missing.filter(|&f| !full(f));
        if let Some(f) = rebuild_missing {
            // Old contents of the missing chunk come from parity and the old contents of
            // every other chunk (fully written ones included).
            need = (0..k).filter(|&i| i != f).collect();
            pbuf = Some(Scratch::new(plen));
        }
        for &i in &need {
            cols[i] = Some(Scratch::new(plen));
        }
        {
            let pdev = self.legs[pleg].dev();
            let pread = async {
                match pbuf.as_mut() {
                    None => (pleg, Ok(())),
                    // SAFETY: the buffer belongs to this future and the call is awaited in it:
                    // completed, dropped first (waiting for the kernel), or leaked with it.
                    Some(b) => (pleg, unsafe { pdev.read(Bytes(base + plo), b) }.await),
                }
            };
            let dreads = cols
                .iter_mut()
                .enumerate()
                .filter_map(|(i, b)| b.as_mut().map(|b| (i, b)))
                .map(|(i, b)| {
                    let leg = map.data[i];
                    async move {
                        (
                            leg,
                            // SAFETY: the buffer belongs to this future and the call is awaited in
                            // it:
                            // completed, dropped first (waiting for the kernel), or leaked with it.
                            unsafe { self.legs[leg].dev().read(Bytes(base + plo), b) }.await,
                        )
                    }
                });
            let (pr, drs) = futures::future::join(pread, join_all(dreads)).await;
            if self.fail_reads(std::iter::once(pr).chain(drs)).await {
                return Ok(None);
            }
        }
        if let (Some(f), Some(mut old)) = (rebuild_missing, pbuf) {
            for (i, c) in cols.iter().enumerate() {
                if let (true, Some(c)) = (i != f, c) {
                    xor_into(&mut old, c);
                }
            }
            cols[f] = Some(old);
        }
        // A fully written chunk is never read, so its column is the caller's data itself.
        let mut srcs: Vec<&[u8]> = Vec::with_capacity(k);
        for (i, c) in cols.iter_mut().enumerate() {
            match (w[i], c) {
                (Some((lo, hi, doff)), Some(c)) => {
                    c[(lo - plo) as usize..(hi - plo) as usize]
                        .copy_from_slice(&data[doff..doff + (hi - lo) as usize]);
                    srcs.push(&c[..]);
                }
                (Some((lo, hi, doff)), None) => {
                    srcs.push(&data[doff..doff + (hi - lo) as usize]);
                }
                (None, Some(c)) => srcs.push(&c[..]),
                (None, None) => {
                    return Err(IoError::eio(format!(
                        "{}: stripe {stripe}: chunk {i} neither written nor read (bug)",
                        self.name
                    )))
                }
            }
        }
        let mut p = Scratch::new(plen);
        xor_many(&mut p, &srcs);
        Ok(Some(p))
    }

    /// The commit step of a stripe write (caller holds the stripe lock): while a leg is not in
    /// sync the stripe's parity log entry is made durable first, then data and `parity` are
    /// written concurrently.
    ///
    /// # Safety
    /// The legs may lend `sw.data` and `parity` to the kernel: keep the
    /// [lending contract](tables::io#the-lending-contract) for the returned future.
    async unsafe fn stripe_commit(
        &self,
        sw: &StripeWrite<'_>,
        parity: Option<&[u8]>,
        flags: WriteFlags,
    ) -> IoResult<()> {
        let (stripe, map, w, base, plo, phi, data) =
            (sw.stripe, &sw.map, &sw.w, sw.base, sw.plo, sw.phi, sw.data);
        // While a leg is not in sync, the stripe's parity log entry is durable before any
        // data or parity moves (this closes the write hole of the degraded array).
        let _hold = match parity {
            Some(p) => self.ppl_begin(stripe, map, w, (plo, phi), p, data).await?,
            None => None,
        };
        // Write data and parity concurrently.
        let mut jobs = Vec::new();
        for (i, wi) in w.iter().enumerate() {
            let Some((lo, hi, doff)) = *wi else { continue };
            let leg = map.data[i];
            if self.legs[leg].state() == LegState::Failed {
                continue;
            }
            let d = &data[doff..doff + (hi - lo) as usize];
            let dev = self.legs[leg].dev();
            jobs.push(
                Box::pin(async move { (leg, dev.write(Bytes(base + lo), d, flags).await) })
                    as std::pin::Pin<Box<dyn std::future::Future<Output = (usize, IoResult<()>)>>>,
            );
        }
        if let Some(p) = parity {
            let pleg = map.parity;
            if self.legs[pleg].state() != LegState::Failed {
                let dev = self.legs[pleg].dev();
                jobs.push(Box::pin(async move {
                    (pleg, dev.write(Bytes(base + plo), p, flags).await)
                }));
            }
        }
        for (i, r) in join_all(jobs).await {
            if let Err(e) = r {
                self.fail_leg(i, &e.context(format!("leg {i} write"))).await;
            }
        }
        let missing = self.missing_in_stripe(stripe);
        if missing.len() > 1 {
            return Err(IoError::eio(format!(
                "{}: stripe {stripe}: legs {missing:?} missing after the write",
                self.name
            )));
        }
        Ok(())
    }

    /// Fails the legs whose reads errored; returns whether any did.
    pub(super) async fn fail_reads(&self, rs: impl Iterator<Item = (usize, IoResult<()>)>) -> bool {
        let mut any = false;
        for (i, r) in rs {
            if let Err(e) = r {
                self.fail_leg(i, &e.context(format!("leg {i} read"))).await;
                any = true;
            }
        }
        any
    }
}
