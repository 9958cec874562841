//! The dedup side of the pool's I/O path: every write to a dedup pool becomes a full-block
//! write (a partial one is merged with the old block, the origin or zeroes first), which is
//! hashed and then eliminated (all zeroes, no external origin), shared with a block that
//! already holds that content, or written to a fresh block that gets a record and an index
//! entry. Hashed blocks are never written in place. Also the status counters and the
//! background scan that hashes and shares blocks written before dedup was on.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tables::io::{Served, Src};
use tables::{Bytes, IoError, IoResult, WriteFlags};

use super::{lock, meta_io, Pool, PoolOptions, ThinDevice};
use crate::dedup::{hash, is_zero, Hash128, HashKind};
use crate::error::MetaResult;
use crate::meta::{IndexSize, Metadata};
use crate::types::{DataBlock, ThinId, VBlock};

/// How big the index of a pool with these options is.
pub(super) fn index_size(o: &PoolOptions) -> IndexSize {
    match o.dedup_index_bytes {
        Some(b) => IndexSize::Bytes(b),
        None => IndexSize::AllBlocks,
    }
}

/// Counters of the dedup path (RAM only, since open) and the scan cursor.
pub(super) struct DedupCounters {
    /// The pool deduplicates now.
    pub(super) on: AtomicBool,
    kind: HashKind,
    hashes: AtomicU64,
    zero_blocks: AtomicU64,
    verify_mismatches: AtomicU64,
    /// Client block writes served (since open): the scan's caller throttles when this moves.
    client_writes: AtomicU64,
    /// (window start, hashes then, rate of the last full window)
    rate: Mutex<(Instant, u64, u64)>,
    /// Where the next scan step starts.
    scan: Mutex<(ThinId, VBlock)>,
}

impl DedupCounters {
    pub(super) fn new(kind: HashKind) -> DedupCounters {
        DedupCounters {
            on: AtomicBool::new(false),
            kind,
            hashes: AtomicU64::new(0),
            zero_blocks: AtomicU64::new(0),
            verify_mismatches: AtomicU64::new(0),
            client_writes: AtomicU64::new(0),
            rate: Mutex::new((Instant::now(), 0, 0)),
            scan: Mutex::new((ThinId(0), VBlock(0))),
        }
    }
}

/// Dedup figures of a pool (`PoolStats::dedup`, and the status line's tail).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct DedupStats {
    /// Mapped blocks summed over the thin devices (what the volumes hold).
    pub logical_blocks: u64,
    /// Data blocks in use.
    pub used_blocks: u64,
    /// Data blocks referenced more than once (by duplicates or snapshots).
    pub shared_blocks: u64,
    /// All-zero block writes that took no data block (since open).
    pub zero_blocks: u64,
    /// `logical_blocks / used_blocks` (1 when nothing is used).
    pub ratio: f64,
    /// Index entries.
    pub index_entries: u64,
    /// Most entries the index takes.
    pub index_capacity: u64,
    /// RAM of the index in bytes.
    pub index_bytes: u64,
    /// Blocks hashed per second over the last second or so.
    pub hashes_per_sec: u64,
    /// Live blocks without a record (written before dedup was on, not scanned yet).
    pub unhashed_blocks: u64,
    /// The index ran out of room: some unique blocks are not in it (they are not found
    /// as duplicates; data is never wrong).
    pub index_full: bool,
    /// Live records left out of the index.
    pub index_left_out: u64,
    /// Candidates `dedup_verify` found to differ byte-wise (hash collisions; since open).
    pub verify_mismatches: u64,
}

/// The status tail: `dedup <logical>/<used> <shared> <zero blocks> <ratio>
/// <index entries>/<capacity> <index bytes> <hashes/s> <unhashed> index_full|- <left out>
/// <verify mismatches>`.
impl fmt::Display for DedupStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "dedup {}/{} {} {} {:.2} {}/{} {} {} {} {} {} {}",
            self.logical_blocks,
            self.used_blocks,
            self.shared_blocks,
            self.zero_blocks,
            self.ratio,
            self.index_entries,
            self.index_capacity,
            self.index_bytes,
            self.hashes_per_sec,
            self.unhashed_blocks,
            if self.index_full { "index_full" } else { "-" },
            self.index_left_out,
            self.verify_mismatches
        )
    }
}

/// What one [`Pool::dedup_scan_step`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ScanProgress {
    /// Mappings looked at in this step.
    pub visited: u64,
    /// Blocks read and hashed in this step.
    pub hashed: u64,
    /// Mappings moved onto an existing block with the same content.
    pub shared: u64,
    /// Blocks that got a record (first of their content).
    pub recorded: u64,
    /// Live blocks still without a record (the work left, give or take blocks that
    /// become free or shared meanwhile).
    pub unhashed_left: u64,
    /// This step reached the end of the last device (the next one starts over).
    pub pass_done: bool,
    /// Client block writes the pool has served since it was opened: a caller that sees this move
    /// between steps knows clients are busy and can back off.
    pub client_writes: u64,
}

impl fmt::Display for ScanProgress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "visited {} hashed {} shared {} recorded {} unhashed {} {} writes {}",
            self.visited,
            self.hashed,
            self.shared,
            self.recorded,
            self.unhashed_left,
            if self.pass_done {
                "pass_done"
            } else {
                "running"
            },
            self.client_writes
        )
    }
}

/// What the first metadata round trip of a dedup write found.
enum Probe {
    /// The block was mapped to a live block with the same content.
    Shared,
    /// No such block: this fresh one is reserved for the write.
    Reserved(DataBlock),
    /// No such block and no free one: the allocator's slow path decides.
    Full,
}

/// Longest a scan step runs (it holds no lock across its reads, but its caller may want
/// to throttle between steps).
const SCAN_STEP_TIME: Duration = Duration::from_millis(50);

impl Pool {
    pub(super) fn dedup_on(&self) -> bool {
        self.dd.on.load(Ordering::Relaxed)
    }

    /// Whether [`Pool::map_by_hash`] can map blocks: a dedup pool without `dedup_verify`
    /// (which compares bytes, so it needs them).
    pub fn takes_hash_refs(&self) -> bool {
        self.dedup_on() && !lock(&self.opts).dedup_verify
    }

    /// Maps virtual block `v` of thin `id` onto a live block whose content hash
    /// ([`crate::dedup::hash`] with BLAKE3) is `h`, if this pool holds one, as a write of
    /// those bytes would; returns whether it did. Replication sends a block the receiving
    /// pool holds as its hash, not its bytes. Never maps anything unless
    /// [`Pool::takes_hash_refs`]. The caller is the only writer of `v` meanwhile.
    pub async fn map_by_hash(&self, id: ThinId, v: VBlock, h: &Hash128) -> IoResult<bool> {
        if !self.takes_hash_refs() || self.dd.kind != HashKind::Blake3 {
            return Ok(false);
        }
        self.writable()?;
        self.mutate_retry(|m| match m.dedup_first_candidate(h, None)? {
            Some(c) => m.map_insert(id, v, c).map(|_| true),
            None => Ok(false),
        })
        .await
    }

    fn hash_block(&self, b: &[u8]) -> Hash128 {
        self.dd.hashes.fetch_add(1, Ordering::Relaxed);
        hash(self.dd.kind, b)
    }

    pub(super) fn dedup_stats(&self, m: &Metadata) -> Option<DedupStats> {
        let s = m.dedup_meta_stats()?;
        let logical = m
            .devices()
            .map(|d| d.iter().fold(0u64, |a, (_, i)| a.saturating_add(i.mapped)))
            .unwrap_or(0);
        let used = m.data_used();
        let hashes = self.dd.hashes.load(Ordering::Relaxed);
        let per_sec = {
            let mut r = lock(&self.dd.rate);
            let el = r.0.elapsed();
            if el >= Duration::from_secs(1) {
                let n = hashes.saturating_sub(r.1);
                *r = (Instant::now(), hashes, (n as f64 / el.as_secs_f64()) as u64);
            }
            r.2
        };
        Some(DedupStats {
            logical_blocks: logical,
            used_blocks: used,
            shared_blocks: s.shared_blocks,
            zero_blocks: self.dd.zero_blocks.load(Ordering::Relaxed),
            ratio: if used == 0 {
                1.0
            } else {
                logical as f64 / used as f64
            },
            index_entries: s.index_entries,
            index_capacity: s.index_capacity,
            index_bytes: s.index_bytes,
            hashes_per_sec: per_sec,
            unhashed_blocks: used.saturating_sub(s.live_records),
            index_full: s.left_out > 0,
            index_left_out: s.left_out,
            verify_mismatches: self.dd.verify_mismatches.load(Ordering::Relaxed),
        })
    }

    /// A metadata change that, out of metadata space with freed blocks awaiting a commit,
    /// commits and tries once more.
    async fn mutate_retry<T>(
        &self,
        mut f: impl FnMut(&mut Metadata) -> MetaResult<T>,
    ) -> IoResult<T> {
        let r = self.mutate(&mut f);
        if matches!(&r, Err(e) if e.errno == libc::ENOSPC) && self.meta().meta_pending() > 0 {
            self.commit().await?;
            return self.mutate(&mut f);
        }
        r
    }

    /// Writes `src` at `off` of virtual block `v` of `t` in a dedup pool (the caller holds
    /// the block's cell). Sources other than memory are sent back (`NeedsMemory`): the
    /// bytes must be hashed.
    ///
    /// # Safety
    /// A whole-block `Src::Mem` is written to the data device from where it is: keep the
    /// [lending contract](tables::io#the-lending-contract) for the returned future.
    pub(super) async unsafe fn dedup_write_block(
        &self,
        t: &ThinDevice,
        v: VBlock,
        off: usize,
        src: Src<'_>,
    ) -> IoResult<Served> {
        let Src::Mem(src) = src else {
            return Ok(Served::NeedsMemory);
        };
        self.writable()?;
        self.dd.client_writes.fetch_add(1, Ordering::Relaxed);
        let bs = self.block_bytes as usize;
        if off == 0 && src.len() == bs {
            // A whole block is in memory already: hash it and write it from there.
            // SAFETY: the caller keeps the lending contract for `src`.
            unsafe { self.dedup_store(t.id, v, src, t.origin.is_some()) }.await?;
            return Ok(Served::Done);
        }
        // Read-merge: the old block, the origin or zeroes, with the write over it.
        let mut buf = vec![0u8; bs];
        let look = self.meta_for_io()?.map_lookup(t.id, v).map_err(meta_io)?;
        match (look, &t.origin) {
            (Some(l), _) => {
                let data = self.data_dev();
                // SAFETY: `buf` belongs to this future and the read is awaited here.
                unsafe { data.read(Bytes(self.block_off(l.block)), &mut buf) }.await?
            }
            (None, Some(o)) => {
                // SAFETY: as above.
                unsafe { Self::read_origin(o, v.0 * bs as u64, &mut buf) }.await?
            }
            (None, None) => {}
        }
        buf[off..off + src.len()].copy_from_slice(src);
        // SAFETY: `buf` belongs to this future.
        unsafe { self.dedup_store(t.id, v, &buf, t.origin.is_some()) }.await?;
        Ok(Served::Done)
    }

    /// Stores the full block `buf` as virtual block `v` of `id`: without `dedup_verify`,
    /// one metadata round trip shares it or reserves a fresh block, and one more (after the
    /// data write) records it. The hash is taken outside any lock.
    ///
    /// # Safety
    /// `buf` may be lent to the data device: keep the
    /// [lending contract](tables::io#the-lending-contract) for the returned future.
    async unsafe fn dedup_store(
        &self,
        id: ThinId,
        v: VBlock,
        buf: &[u8],
        has_origin: bool,
    ) -> IoResult<()> {
        if !has_origin && is_zero(buf) {
            // An unmapped block reads as zeroes: no data block at all (and no hash).
            self.dd.zero_blocks.fetch_add(1, Ordering::Relaxed);
            return self.mutate_retry(|m| m.map_remove(id, v).map(|_| ())).await;
        }
        let h = self.hash_block(buf);
        let verify = lock(&self.opts).dedup_verify;
        let reserved = if verify {
            if self.try_share(id, v, &h, buf, None).await? {
                return Ok(());
            }
            None
        } else {
            // Share with a live block of this content, or reserve a fresh one, in one go.
            let probe = self
                .mutate_retry(|m| {
                    if let Some(c) = m.dedup_first_candidate(&h, None)? {
                        m.map_insert(id, v, c)?;
                        return Ok(Probe::Shared);
                    }
                    Ok(m.reserve_data().map_or(Probe::Full, Probe::Reserved))
                })
                .await?;
            match probe {
                Probe::Shared => return Ok(()),
                Probe::Reserved(d) => {
                    self.space_found();
                    Some(d)
                }
                Probe::Full => None,
            }
        };
        let d = match reserved {
            Some(d) => d,
            // Out of space, or verify: the allocator's path (commits, waits, errors).
            None => self.alloc_data().await?,
        };
        let data = self.data_dev();
        // SAFETY: the caller keeps the lending contract for `buf`; the write is awaited here.
        let w = unsafe { data.write(Bytes(self.block_off(d)), buf, WriteFlags::default()) }.await;
        if let Err(e) = w {
            self.meta().unreserve(d);
            return Err(e);
        }
        let r = self
            .mutate_retry(|m| {
                // Another writer may have stored the same content meanwhile: share it and
                // drop the fresh block. (With verify that would need a read under the
                // lock; the duplicate is then kept: fewer duplicates, never wrong data.)
                if !verify {
                    if let Some(c) = m.dedup_first_candidate(&h, None)? {
                        m.map_insert(id, v, c)?;
                        return Ok((false, m.data_free()));
                    }
                }
                m.dedup_map_unique(id, v, d, &h)?;
                Ok((true, m.data_free()))
            })
            .await;
        match r {
            Ok((true, free)) => self.low_water_at(free),
            Ok((false, _)) => self.meta().unreserve(d),
            Err(e) => {
                self.meta().unreserve(d);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Maps `v` of `id` to a live block other than `not` holding `buf` (hash `h`), if there
    /// is one. With `dedup_verify` each candidate is read and compared first (outside the
    /// metadata lock), then re-checked under the lock: still live with the same record, and
    /// no freed block became allocatable meanwhile (so it cannot have been reused).
    async fn try_share(
        &self,
        id: ThinId,
        v: VBlock,
        h: &Hash128,
        buf: &[u8],
        not: Option<DataBlock>,
    ) -> IoResult<bool> {
        if !lock(&self.opts).dedup_verify {
            return self
                .mutate_retry(|m| {
                    let c = m.dedup_first_candidate(h, not)?;
                    match c {
                        Some(c) => m.map_insert(id, v, c).map(|_| true),
                        None => Ok(false),
                    }
                })
                .await;
        }
        let (cands, gen) = {
            let m = self.meta_for_io()?;
            (m.dedup_candidates(h).map_err(meta_io)?, m.release_gen())
        };
        let data = self.data_dev();
        let mut other = vec![0u8; buf.len()];
        for c in cands.into_iter().filter(|&c| Some(c) != not) {
            // SAFETY: `other` belongs to this future and the read is awaited here.
            unsafe { data.read(Bytes(self.block_off(c)), &mut other) }.await?;
            if other != buf {
                self.dd.verify_mismatches.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let shared = self
                .mutate_retry(|m| {
                    if m.release_gen() != gen
                        || m.data_count(c) == 0
                        || m.hash_record(c)? != Some(*h)
                    {
                        return Ok(false);
                    }
                    m.map_insert(id, v, c).map(|_| true)
                })
                .await?;
            if shared {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// One bounded step of the dedup scan (for `pool dedup-scan`): walks the devices'
    /// mappings from where the last step stopped, reads and hashes blocks that have no
    /// record, and either moves the mapping onto a live block with the same content (the
    /// old block is freed when nobody else maps it) or records the block. Stops after
    /// `max_blocks` mappings or about 50 ms, whichever comes first; call again until
    /// `pass_done` (then `unhashed_left` says whether another pass is worth it). The cursor
    /// is kept in RAM; after a restart a pass starts over and skips hashed blocks quickly.
    /// Zero blocks are shared like any content (the pool does not know which devices have
    /// an external origin, so it cannot unmap them). Changes are committed like writes.
    pub async fn dedup_scan_step(&self, max_blocks: u64) -> IoResult<ScanProgress> {
        if !self.dedup_on() {
            return Err(IoError::invalid(format!(
                "{}: not a dedup pool (the table needs the dedup feature)",
                self.name
            )));
        }
        self.writable()?;
        let start = Instant::now();
        let mut p = ScanProgress::default();
        let mut cur = *lock(&self.dd.scan);
        let data = self.data_dev();
        let mut buf = vec![0u8; self.block_bytes as usize];
        'outer: while p.visited < max_blocks && start.elapsed() < SCAN_STEP_TIME {
            let want = (max_blocks - p.visited).min(256) as usize;
            let batch = self.scan_batch(cur, want)?;
            if batch.is_empty() {
                p.pass_done = true;
                cur = (ThinId(0), VBlock(0));
                break;
            }
            for (id, v, d) in batch {
                if start.elapsed() >= SCAN_STEP_TIME {
                    break 'outer;
                }
                cur = (id, VBlock(v.0.saturating_add(1)));
                p.visited += 1;
                if self
                    .meta_for_io()?
                    .hash_record(d)
                    .map_err(meta_io)?
                    .is_some()
                {
                    continue;
                }
                let _cell = self.cells.lock((id, v)).await;
                // Still mapped there? (written, discarded or deleted meanwhile)
                match self.meta_for_io()?.map_range(id, v, VBlock(v.0 + 1), 1) {
                    Ok(m) if m.first().map(|x| x.1) == Some(d) => {}
                    _ => continue,
                }
                // SAFETY: `buf` belongs to this future and the read is awaited here.
                unsafe { data.read(Bytes(self.block_off(d)), &mut buf) }.await?;
                p.hashed += 1;
                let h = self.hash_block(&buf);
                if self.try_share(id, v, &h, &buf, Some(d)).await? {
                    p.shared += 1;
                    continue;
                }
                // Nothing else holds it: `d` (mapped here under our cell, so live and, in a
                // dedup pool, never written in place) becomes the block of this content.
                let rec = self
                    .mutate_retry(|m| {
                        if m.data_count(d) == 0 || m.hash_record(d)?.is_some() {
                            return Ok(false);
                        }
                        m.dedup_record(d, &h).map(|_| true)
                    })
                    .await?;
                p.recorded += u64::from(rec);
            }
        }
        *lock(&self.dd.scan) = cur;
        let m = self.meta_for_io()?;
        if let Some(s) = m.dedup_meta_stats() {
            p.unhashed_left = m.data_used().saturating_sub(s.live_records);
        }
        p.client_writes = self.dd.client_writes.load(Ordering::Relaxed);
        Ok(p)
    }

    /// Up to `want` mappings from `(id, v)` on, in device then block order.
    fn scan_batch(
        &self,
        (from_id, from_v): (ThinId, VBlock),
        want: usize,
    ) -> IoResult<Vec<(ThinId, VBlock, DataBlock)>> {
        let m = self.meta_for_io()?;
        let mut out = Vec::new();
        for (id, _) in m.devices().map_err(meta_io)? {
            if id < from_id {
                continue;
            }
            let lo = if id == from_id { from_v } else { VBlock(0) };
            let maps = m
                .map_range(id, lo, VBlock(u64::MAX), want - out.len())
                .map_err(meta_io)?;
            out.extend(maps.into_iter().map(|(v, d)| (id, v, d)));
            if out.len() >= want {
                break;
            }
        }
        Ok(out)
    }
}
