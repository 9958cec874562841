//! raid1 / raid10 client I/O: splitting a request into pieces per chunk, reading one valid
//! copy, writing every live copy.

use std::sync::atomic::Ordering;

use futures::future::join_all;
use tables::io::{all_done, Dst, IoError, IoResult, Served, Src, WriteFlags};
use tables::Bytes;

use crate::layout::{raid10_near, ChunkCopy};

use super::{Geo, Inner, LegState};

/// One piece of a mirror request: `len` bytes at array `off`, stored at `copies`.
pub(super) struct MirrorPiece {
    pub(super) off: u64,
    pub(super) len: usize,
    pub(super) copies: Vec<(usize, u64)>,
}

impl Inner {
    pub(super) fn copies_of_chunk(&self, chunk: u64, out: &mut Vec<ChunkCopy>) {
        match self.geo {
            Geo::Mirror {
                copies,
                raid1: true,
                ..
            } => {
                out.clear();
                out.extend((0..copies).map(|leg| ChunkCopy {
                    leg,
                    dev_chunk: chunk,
                }));
            }
            Geo::Mirror { copies, .. } => raid10_near(self.n(), copies, chunk, out),
            Geo::Parity { .. } => out.clear(),
        }
    }

    pub(super) fn mirror_pieces(&self, off: u64, len: u64) -> Vec<MirrorPiece> {
        let Geo::Mirror { chunk, raid1, .. } = self.geo else {
            return Vec::new();
        };
        if raid1 {
            return vec![MirrorPiece {
                off,
                len: len as usize,
                copies: (0..self.n()).map(|i| (i, off)).collect(),
            }];
        }
        let mut out = Vec::new();
        let mut pos = off;
        let end = off + len;
        let mut v = Vec::new();
        while pos < end {
            let c = pos / chunk;
            let within = pos % chunk;
            let l = (chunk - within).min(end - pos);
            self.copies_of_chunk(c, &mut v);
            out.push(MirrorPiece {
                off: pos,
                len: l as usize,
                copies: v
                    .iter()
                    .map(|cp| (cp.leg, cp.dev_chunk * chunk + within))
                    .collect(),
            });
            pos += l;
        }
        out
    }

    pub(super) fn region_of(&self, off: u64) -> u64 {
        off / self.region_bytes
    }

    /// Whether leg `i` holds valid data for mirror region `region`.
    pub(super) fn mirror_valid(&self, i: usize, region: u64) -> bool {
        match self.legs[i].state() {
            LegState::InSync => true,
            LegState::Recovering => region < self.recover_pos.load(Ordering::Acquire),
            LegState::Failed => false,
        }
    }

    /// # Safety
    /// For `Dst::Mem` the legs may lend that memory to the kernel: keep the
    /// [lending contract](tables::io#the-lending-contract) for the returned future.
    async unsafe fn mirror_read_piece(
        &self,
        p: &MirrorPiece,
        mut buf: Dst<'_>,
    ) -> IoResult<Served> {
        let region = self.region_of(p.off);
        let last_region = self.region_of(p.off + p.len as u64 - 1);
        // In a region that still awaits resync the copies may differ: read the copy resync
        // will propagate (the first valid one), so two reads never disagree.
        let unsynced = {
            let st = self.sync_state();
            (region..=last_region).any(|r| st.pending[r as usize])
        };
        let mut tried = Vec::new();
        loop {
            let cands: Vec<(usize, u64)> = p
                .copies
                .iter()
                .copied()
                .filter(|&(i, _)| {
                    !tried.contains(&i)
                        && self.mirror_valid(i, region)
                        && self.mirror_valid(i, last_region)
                })
                .collect();
            if cands.is_empty() {
                return Err(IoError::eio(format!(
                    "{}: no readable copy of bytes {}..{} (every leg holding them failed)",
                    self.name,
                    p.off,
                    p.off + p.len as u64
                )));
            }
            let pick = if unsynced {
                cands
                    .iter()
                    .copied()
                    .find(|&(i, _)| !self.legs[i].stale.load(Ordering::Acquire))
                    .unwrap_or(cands[0])
            } else {
                cands[self.rr.fetch_add(1, Ordering::Relaxed) % cands.len()]
            };
            tried.push(pick.0);
            let dev = self.legs[pick.0].dev();
            match buf.read_from(&*dev, Bytes(pick.1)).await {
                Ok(s) => return Ok(s),
                Err(e) => {
                    self.fail_leg(pick.0, &e.context(format!("leg {} read", pick.0)))
                        .await
                }
            }
        }
    }

    /// # Safety
    /// For `Dst::Mem` the legs may lend that memory to the kernel: keep the
    /// [lending contract](tables::io#the-lending-contract) for the returned future.
    pub(super) async unsafe fn mirror_read(&self, off: u64, buf: Dst<'_>) -> IoResult<Served> {
        let pieces = self.mirror_pieces(off, buf.len() as u64);
        let lens: Vec<usize> = pieces.iter().map(|p| p.len).collect();
        let bufs = buf.split(&lens);
        let futs = pieces
            .iter()
            .zip(bufs)
            .map(|(p, b)| self.mirror_read_piece(p, b));
        iort::try_join_all(futs.collect()).await.map(all_done)
    }

    /// # Safety
    /// For `Src::Mem` the legs may lend that memory to the kernel: keep the
    /// [lending contract](tables::io#the-lending-contract) for the returned future.
    pub(super) async unsafe fn mirror_write(
        &self,
        off: u64,
        len: usize,
        buf: Src<'_>,
        flags: WriteFlags,
    ) -> IoResult<Served> {
        let first = self.region_of(off);
        let last = self.region_of(off + len as u64 - 1);
        let keys: Vec<u64> = (first..=last).collect();
        let _locks = self.locks.lock_many(&keys, false).await;
        self.start_write(first, last).await?;
        let r = self.mirror_write_locked(off, len, buf, flags).await;
        self.end_write(first, last);
        r
    }

    /// # Safety
    /// For `Src::Mem` the legs may lend that memory to the kernel: keep the
    /// [lending contract](tables::io#the-lending-contract) for the returned future.
    async unsafe fn mirror_write_locked(
        &self,
        off: u64,
        len: usize,
        buf: Src<'_>,
        flags: WriteFlags,
    ) -> IoResult<Served> {
        let pieces = self.mirror_pieces(off, len as u64);
        let mut pos = 0usize;
        let mut jobs = Vec::new();
        for p in &pieces {
            let data = buf.piece(pos, p.len);
            pos += p.len;
            for &(i, loff) in &p.copies {
                if self.legs[i].state() == LegState::Failed {
                    continue;
                }
                let dev = self.legs[i].dev();
                jobs.push(async move { (i, data.write_to(&*dev, Bytes(loff), flags).await) });
            }
        }
        let results = join_all(jobs).await;
        let mut served = Served::Done;
        for (i, r) in &results {
            match r {
                Err(e) => {
                    self.fail_leg(*i, &e.clone().context(format!("leg {i} write")))
                        .await
                }
                Ok(Served::NeedsMemory) => served = Served::NeedsMemory,
                Ok(Served::Done) => {}
            }
        }
        self.ensure_failures_persisted().await?;
        if served == Served::NeedsMemory {
            // Some copy needs the bytes in memory: the caller redoes the whole write.
            return Ok(served);
        }
        // Every piece must have landed on at least one copy that is valid for it.
        for p in &pieces {
            let region = self.region_of(p.off);
            let ok = p.copies.iter().any(|&(i, _)| self.mirror_valid(i, region));
            if !ok {
                return Err(IoError::eio(format!(
                    "{}: write at byte {} reached no in-sync copy",
                    self.name, p.off
                )));
            }
        }
        Ok(Served::Done)
    }
}
