//! The pool: metadata + data device, the thin volume I/O path, commits and messages.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use tables::io::{
    all_done, BlockDevice, Dst, FixedBuf, IoFuture, Limits, MappedCopy, MappedReq, Served, Src,
};
use tables::{Bytes, DeviceRef, IoError, IoResult, Sectors, WriteFlags};

use crate::dedup::HashKind;
use crate::error::{MetaError, MetaResult};
use crate::meta::{self, Lookup, Metadata};
use crate::sync::{CellLocks, Gate};
use crate::types::{DataBlock, ThinId, VBlock, META_BLOCK_SIZE};

mod dedup_io;
mod delta;
use dedup_io::{index_size, DedupCounters};
pub use dedup_io::{DedupStats, ScanProgress};

/// Pool settings (the table line's block size, low-water mark and feature arguments).
#[derive(Clone, Debug)]
pub struct PoolOptions {
    /// Data block size in sectors (power of two, 8..=2097152).
    pub data_block_sectors: u32,
    /// Free data blocks at which a warning is logged and an event counted.
    pub low_water_blocks: u64,
    /// Partial writes to new blocks leave the rest of the block as it was on the data device.
    pub skip_block_zeroing: bool,
    /// Thin devices ignore discards.
    pub ignore_discard: bool,
    /// Freed blocks are not discarded on the data device.
    pub no_discard_passdown: bool,
    /// No metadata changes; writes to unprovisioned or shared blocks fail.
    pub read_only: bool,
    /// Fail writes at once when the pool is out of data space (else wait `no_space_timeout`).
    pub error_if_no_space: bool,
    /// Background commit period (`None`: only on FLUSH/FUA and explicit commits).
    pub commit_interval: Option<Duration>,
    /// How long writes wait for data space before failing with ENOSPC, counted from when
    /// the pool ran out: after that, writes that need a block fail at once until space
    /// comes back (dm-thin's `no_space_timeout`).
    pub no_space_timeout: Duration,
    /// Inline deduplication (feature `dedup`; needs 4 KiB data blocks). Once a pool has
    /// been opened with it, it must always be.
    pub dedup: bool,
    /// Compare bytes before sharing a block found by its hash (feature `dedup_verify`,
    /// implies `dedup`).
    pub dedup_verify: bool,
    /// RAM for the dedup index in bytes (the table's `dedup_index_mb N` is N MiB); `None`:
    /// room for every data block of the pool.
    pub dedup_index_bytes: Option<u64>,
    /// The content hash (tests use a weak one to force collisions).
    #[doc(hidden)]
    pub dedup_hash: HashKind,
}

impl Default for PoolOptions {
    fn default() -> PoolOptions {
        PoolOptions {
            data_block_sectors: 128,
            low_water_blocks: 0,
            skip_block_zeroing: false,
            ignore_discard: false,
            no_discard_passdown: false,
            read_only: false,
            error_if_no_space: false,
            commit_interval: Some(Duration::from_secs(1)),
            no_space_timeout: Duration::from_secs(60),
            dedup: false,
            dedup_verify: false,
            dedup_index_bytes: None,
            dedup_hash: HashKind::Blake3,
        }
    }
}

/// Counters and sizes of a pool, as `status` prints them.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct PoolStats {
    /// User transaction id.
    pub transaction_id: u64,
    /// Metadata blocks used.
    pub meta_used: u64,
    /// Metadata blocks in total.
    pub meta_total: u64,
    /// Data blocks used (reference count > 0).
    pub data_used: u64,
    /// Data blocks in total.
    pub data_total: u64,
    /// Data blocks allocatable now.
    pub data_free: u64,
    /// `rw`, `ro`, `out_of_data_space` or `fail`.
    pub mode: String,
    /// Times the free data blocks fell to the low-water mark.
    pub low_water_events: u64,
    /// Commits done since open.
    pub commits: u64,
    /// Dedup counters (dedup pools only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dedup: Option<DedupStats>,
}

/// Largest piece a copy-on-write or zero-fill of one block handles at a time.
const COPY_CHUNK: u64 = 1 << 20;

/// Zeroes written from memory around a partial write to a fresh block; larger ranges go
/// through the data device's `write_zeroes`.
const ZERO_BUF: usize = 64 << 10;
/// Page-aligned, so a direct-I/O data device takes it without a bounce buffer.
#[repr(align(4096))]
struct ZeroBuf([u8; ZERO_BUF]);
static ZEROES: ZeroBuf = ZeroBuf([0; ZERO_BUF]);

/// Zeroes `len` bytes of `data` at byte `at`: small ranges by writing from a shared zero
/// buffer (stays on the ring, as dm-thin's zeroing writes), large ones with `write_zeroes`.
async fn zero_range(data: &DeviceRef, at: u64, len: u64) -> IoResult<()> {
    if len == 0 {
        return Ok(());
    }
    if len <= ZERO_BUF as u64 {
        // SAFETY: the buffer is a static: never freed or reused, whatever becomes of this
        // future.
        return unsafe { data.write(Bytes(at), &ZEROES.0[..len as usize], WriteFlags::default()) }
            .await;
    }
    data.write_zeroes(Bytes(at), Bytes(len), WriteFlags::default())
        .await
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An open pool.
pub struct Pool {
    name: String,
    meta_dev: DeviceRef,
    data_dev: Mutex<DeviceRef>,
    opts: Mutex<PoolOptions>,
    block_bytes: u64,
    meta: Mutex<Metadata>,
    /// A panic happened while `meta` was locked: the metadata may be half changed, so it is
    /// neither committed nor used for I/O again.
    poisoned: AtomicBool,
    commit_lock: futures::lock::Mutex<()>,
    cells: CellLocks<(ThinId, VBlock)>,
    gates: Mutex<HashMap<ThinId, Gate>>,
    open_thins: Mutex<HashMap<ThinId, usize>>,
    failed: Mutex<Option<String>>,
    out_of_space: AtomicBool,
    /// When the pool last ran out of data space (None while it has space). Once it has
    /// been out for `no_space_timeout`, writes needing a block fail at once, as dm-thin's
    /// error mode does, instead of each waiting the whole timeout again.
    no_space_since: Mutex<Option<Instant>>,
    low_water_armed: AtomicBool,
    low_water_events: AtomicU64,
    commits: AtomicU64,
    last_commit: Mutex<Instant>,
    stop: Arc<AtomicBool>,
    /// Dedup counters and the scan cursor.
    dd: DedupCounters,
}

impl Drop for Pool {
    /// The last handle is gone: stop the committer and make a final commit (best effort,
    /// on a helper thread with its own runtime, since drop may run inside one).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Locking first: a poisoned lock fails the pool before `failed` is read.
        let dirty = self.meta().is_dirty();
        let due = dirty && lock(&self.failed).is_none() && !lock(&self.opts).read_only;
        if !due {
            return;
        }
        let this: &Pool = self;
        // The last handle may go inside a runtime's task: commit on a thread of its own.
        match iort::run_on_io_thread(|| this.commit()) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => log::error!("{}: final commit failed: {e}", self.name),
            Err(e) => log::error!("{}: final commit: {e}", self.name),
        }
    }
}

fn meta_io(e: MetaError) -> IoError {
    e.into()
}

impl Pool {
    /// Opens the pool on `meta_dev`/`data_dev`, formatting the metadata if block 0 is all
    /// zeroes. A data or metadata device that grew is taken into use.
    pub async fn open(
        meta_dev: DeviceRef,
        data_dev: DeviceRef,
        opts: PoolOptions,
    ) -> MetaResult<Arc<Pool>> {
        let dbs = opts.data_block_sectors;
        if !dbs.is_power_of_two() || !(8..=2_097_152).contains(&dbs) {
            return Err(MetaError::Invalid(format!(
                "data block size {dbs} sectors: must be a power of two from 8 (4 KiB) to 2097152 (1 GiB)"
            )));
        }
        if (opts.dedup || opts.dedup_verify) && dbs != 8 {
            return Err(MetaError::Invalid(format!(
                "dedup needs a data block size of 8 sectors (4 KiB), got {dbs}"
            )));
        }
        let block_bytes = Sectors(dbs as u64).bytes().0;
        let nr_data = data_dev.size().0 / block_bytes;
        let nr_meta = meta_dev.size().0 / META_BLOCK_SIZE as u64;
        let (m, fresh) = match meta::read_superblock(&*meta_dev).await? {
            None => {
                if opts.read_only {
                    return Err(MetaError::Invalid(format!(
                        "{}: metadata device is blank and the pool is read_only",
                        meta_dev.name()
                    )));
                }
                (Metadata::format(dbs, nr_data, nr_meta)?, true)
            }
            Some(sb) => {
                // Against the table and the data device before anything is sized from the
                // superblock (load checks it against the metadata device).
                if sb.data_block_sectors != dbs {
                    return Err(MetaError::Invalid(format!(
                        "{}: pool was created with data block size {} sectors, table says {dbs}",
                        meta_dev.name(),
                        sb.data_block_sectors
                    )));
                }
                if nr_data < sb.nr_data_blocks {
                    return Err(MetaError::Invalid(format!(
                        "{}: data device holds {nr_data} blocks but the pool has {} (shrinking is not supported)",
                        data_dev.name(),
                        sb.nr_data_blocks
                    )));
                }
                if sb.dedup && !opts.dedup {
                    return Err(MetaError::Invalid(format!(
                        "{}: the pool deduplicates, the table must say dedup (without it its hash records would go stale)",
                        meta_dev.name()
                    )));
                }
                if !sb.dedup && opts.dedup && opts.read_only {
                    return Err(MetaError::Invalid(format!(
                        "{}: dedup cannot be turned on for a read_only pool",
                        meta_dev.name()
                    )));
                }
                let (mut m, report) = meta::load(&*meta_dev).await?;
                if !report.leaked.is_empty() {
                    log::warn!(
                        "{}: {} data blocks have a higher reference count than references (leaked space; run check/repair)",
                        meta_dev.name(),
                        report.leaked.len()
                    );
                }
                if !opts.read_only {
                    m.grow_meta(nr_meta);
                    m.grow_data(nr_data);
                }
                (m, false)
            }
        };
        let mut m = m;
        if opts.dedup {
            m.enable_dedup(index_size(&opts))?;
        }
        let pool = Arc::new(Pool {
            name: format!("thin-pool({})", meta_dev.name()),
            meta_dev,
            data_dev: Mutex::new(data_dev),
            opts: Mutex::new(opts.clone()),
            block_bytes,
            meta: Mutex::new(m),
            poisoned: AtomicBool::new(false),
            commit_lock: futures::lock::Mutex::new(()),
            cells: CellLocks::default(),
            gates: Mutex::new(HashMap::new()),
            open_thins: Mutex::new(HashMap::new()),
            failed: Mutex::new(None),
            out_of_space: AtomicBool::new(false),
            no_space_since: Mutex::new(None),
            low_water_armed: AtomicBool::new(true),
            low_water_events: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            last_commit: Mutex::new(Instant::now()),
            stop: Arc::new(AtomicBool::new(false)),
            dd: DedupCounters::new(opts.dedup_hash),
        });
        if fresh || pool.meta().is_dirty() {
            pool.commit().await.map_err(MetaError::Io)?;
        }
        pool.dd.on.store(opts.dedup, Ordering::Relaxed);
        if let Some(iv) = opts.commit_interval {
            spawn_committer(&pool, iv);
        }
        Ok(pool)
    }

    /// Name for messages.
    pub fn name(&self) -> String {
        self.name.clone()
    }
    /// Data block size in bytes.
    pub fn block_bytes(&self) -> Bytes {
        Bytes(self.block_bytes)
    }
    /// The metadata device.
    pub fn meta_dev(&self) -> DeviceRef {
        self.meta_dev.clone()
    }
    /// The data device.
    pub fn data_dev(&self) -> DeviceRef {
        lock(&self.data_dev).clone()
    }
    /// Current options.
    pub fn options(&self) -> PoolOptions {
        lock(&self.opts).clone()
    }

    /// Applies a reloaded table line to the live pool: new options, and a data device that
    /// may have grown (it must be at least as large as the pool).
    pub fn reconfigure(&self, data_dev: DeviceRef, opts: PoolOptions) -> Result<(), String> {
        let nr_data = data_dev.size().0 / self.block_bytes;
        let mut m = self.meta_for_io().map_err(|e| e.to_string())?;
        if nr_data < m.sb.nr_data_blocks {
            return Err(format!(
                "data device {} holds {nr_data} blocks but the pool has {} (shrinking is not supported)",
                data_dev.name(),
                m.sb.nr_data_blocks
            ));
        }
        if opts.data_block_sectors as u64 * 512 != self.block_bytes {
            return Err("the data block size of a live pool cannot change".into());
        }
        if m.sb.dedup && !opts.dedup {
            return Err(
                "the pool deduplicates: the table must say dedup (without it its hash records would go stale)"
                    .into(),
            );
        }
        if !opts.read_only {
            m.grow_meta(self.meta_dev.size().0 / META_BLOCK_SIZE as u64);
            m.grow_data(nr_data);
        }
        let was = self.options();
        if opts.dedup && (!m.dedup_enabled() || index_size(&was) != index_size(&opts)) {
            if opts.read_only && !m.sb.dedup {
                return Err("dedup cannot be turned on for a read_only pool".into());
            }
            m.enable_dedup(index_size(&opts))
                .map_err(|e| e.to_string())?;
        }
        self.dd.on.store(opts.dedup, Ordering::Relaxed);
        drop(m);
        *lock(&self.data_dev) = data_dev;
        *lock(&self.opts) = opts;
        self.low_water_armed.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Takes into use whatever the data and metadata devices have grown by since the pool
    /// was opened (`pool resize` after the devices were extended). Committed with the next
    /// commit.
    pub fn grow_to_devices(&self) -> IoResult<PoolStats> {
        let nr_data = self.data_dev().size().0 / self.block_bytes;
        let nr_meta = self.meta_dev.size().0 / META_BLOCK_SIZE as u64;
        {
            let mut m = self.meta_for_io()?;
            self.writable()?;
            m.grow_meta(nr_meta);
            m.grow_data(nr_data);
        }
        self.low_water_check();
        Ok(self.stats())
    }

    /// The metadata, locked. A poisoned lock (a panic while it was held, e.g. half way
    /// through a tree change) puts the pool in fail mode, so none of it is committed; the
    /// guard is still returned for status and bookkeeping.
    fn meta(&self) -> MutexGuard<'_, Metadata> {
        self.meta.lock().unwrap_or_else(|e| {
            if !self.poisoned.swap(true, Ordering::Relaxed) {
                self.fail("a panic while the metadata lock was held may have left the metadata half changed".into());
            }
            e.into_inner()
        })
    }

    /// The metadata for I/O and changes: refused with EIO once a panic may have left it half
    /// changed (even a lookup could then follow a half-split node).
    fn meta_for_io(&self) -> IoResult<MutexGuard<'_, Metadata>> {
        let m = self.meta();
        if self.poisoned.load(Ordering::Relaxed) {
            return Err(IoError::eio(format!(
                "{}: pool failed (a panic left the metadata possibly half changed; run check)",
                self.name
            )));
        }
        Ok(m)
    }

    fn gate(&self, id: ThinId) -> Gate {
        lock(&self.gates).entry(id).or_default().clone()
    }

    fn fail(&self, why: String) {
        log::error!(
            "{}: metadata operation failed, pool is now read-only: {why}",
            self.name
        );
        let mut f = lock(&self.failed);
        if f.is_none() {
            *f = Some(why);
        }
    }

    fn writable(&self) -> IoResult<()> {
        if let Some(why) = lock(&self.failed).as_ref() {
            return Err(IoError::eio(format!("{}: pool failed ({why})", self.name)));
        }
        if lock(&self.opts).read_only {
            return Err(IoError::read_only(format!(
                "{}: pool is read_only",
                self.name
            )));
        }
        Ok(())
    }

    /// Runs a metadata mutation; an error that means the in-memory state may be damaged
    /// (anything but space and argument errors) fails the pool.
    fn mutate<T>(&self, f: impl FnOnce(&mut Metadata) -> MetaResult<T>) -> IoResult<T> {
        // Locked before `writable`: taking a poisoned lock is what fails the pool.
        let mut m = self.meta_for_io()?;
        self.writable()?;
        let r = f(&mut m);
        drop(m);
        match r {
            Ok(v) => Ok(v),
            Err(e @ MetaError::NoSpace(_)) => Err(meta_io(e)),
            Err(e @ MetaError::Invalid(_)) => Err(meta_io(e)),
            Err(e) => {
                self.fail(e.to_string());
                Err(meta_io(e))
            }
        }
    }

    /// Statistics.
    pub fn stats(&self) -> PoolStats {
        let m = self.meta();
        let opts = lock(&self.opts);
        let mode = if lock(&self.failed).is_some() {
            "fail"
        } else if opts.read_only {
            "ro"
        } else if self.out_of_space.load(Ordering::Relaxed) {
            "out_of_data_space"
        } else {
            "rw"
        };
        PoolStats {
            transaction_id: m.sb.transaction_id,
            meta_used: m.meta_used(),
            meta_total: m.sb.nr_meta_blocks,
            data_used: m.data_used(),
            data_total: m.sb.nr_data_blocks,
            data_free: m.data_free(),
            mode: mode.into(),
            low_water_events: self.low_water_events.load(Ordering::Relaxed),
            commits: self.commits.load(Ordering::Relaxed),
            dedup: self.dedup_stats(&m),
        }
    }

    /// The dm-thin style status line.
    pub fn status_line(&self) -> String {
        let s = self.stats();
        let o = self.options();
        let held = self.meta().sb.held_root.0;
        format!(
            "{} {}/{} {}/{} {} {} {} {} {} {}",
            s.transaction_id,
            s.meta_used,
            s.meta_total,
            s.data_used,
            s.data_total,
            if held == 0 {
                "-".to_string()
            } else {
                held.to_string()
            },
            s.mode,
            if o.no_discard_passdown {
                "no_discard_passdown"
            } else {
                "discard_passdown"
            },
            if o.error_if_no_space {
                "error_if_no_space"
            } else {
                "queue_if_no_space"
            },
            if lock(&self.failed).is_some() {
                "needs_check"
            } else {
                "-"
            },
            (s.meta_total / 32).clamp(16, 256),
        ) + &s.dedup.map(|d| format!(" {d}")).unwrap_or_default()
    }

    /// Device ids and their mapped block counts.
    pub fn devices(&self) -> IoResult<Vec<(ThinId, u64)>> {
        Ok(self
            .meta_for_io()?
            .devices()
            .map_err(meta_io)?
            .into_iter()
            .map(|(id, i)| (id, i.mapped))
            .collect())
    }

    /// `create_thin <id>`.
    pub fn create_thin(&self, id: ThinId) -> IoResult<()> {
        self.mutate(|m| m.create_thin(id))
    }

    /// `create_snap <id> <origin>`: waits for the origin's in-flight writes, then shares its
    /// mapping in O(1).
    pub async fn create_snap(&self, id: ThinId, origin: ThinId) -> IoResult<()> {
        self.writable()?;
        let _g = self.gate(origin).exclusive().await;
        self.mutate(|m| m.create_snap(id, origin))
    }

    /// `delete <id>`: refused while a thin device of that id is open.
    pub fn delete(&self, id: ThinId) -> IoResult<()> {
        if lock(&self.open_thins).get(&id).copied().unwrap_or(0) > 0 {
            return Err(IoError::new(
                libc::EBUSY,
                format!("{}: {id} is open; remove its table first", self.name),
            ));
        }
        self.mutate(|m| m.delete(id))
    }

    /// `set_transaction_id <old> <new>`.
    pub fn set_transaction_id(&self, old: u64, new: u64) -> IoResult<()> {
        self.mutate(|m| m.set_transaction_id(old, new))
    }

    /// Whether a periodic commit is due.
    fn commit_due(&self, interval: Duration) -> bool {
        self.meta().is_dirty()
            && lock(&self.failed).is_none()
            && lock(&self.last_commit).elapsed() >= interval
    }

    /// Makes every completed write durable: flushes the data device, writes the metadata
    /// changed since the last commit, flushes, then writes the superblock with FUA. Blocks
    /// freed by the transaction are discarded on the data device (unless disabled) and only
    /// then handed out again.
    pub async fn commit(&self) -> IoResult<()> {
        let _c = self.commit_lock.lock().await;
        let data = self.data_dev();
        let prepared = {
            let mut m = self.meta();
            let failed = lock(&self.failed).clone();
            if let (Some(why), true) = (failed.as_ref(), m.is_dirty()) {
                // What changed since the last commit cannot be made durable.
                return Err(IoError::eio(format!(
                    "{}: pool failed ({why}); changes since the last commit are not committed",
                    self.name
                )));
            }
            if m.is_dirty() && failed.is_none() && !lock(&self.opts).read_only {
                match m.prepare_commit() {
                    Ok(p) => Some(p),
                    Err(e) => {
                        drop(m);
                        self.fail(e.to_string());
                        return Err(meta_io(e));
                    }
                }
            } else {
                None
            }
        };
        let r = async {
            data.flush()
                .await
                .map_err(|e| e.context(format!("{}: flushing data device", self.name)))?;
            let Some(p) = prepared.as_ref() else {
                return Ok(());
            };
            for chunk in p.blocks.chunks(64) {
                // SAFETY: the block images belong to `prepared`, which this future holds
                // until after the writes are joined here (completed, dropped first, which
                // waits for the kernel, or leaked with it); so does the superblock below.
                let futs = chunk
                    .iter()
                    .map(|(b, buf)| unsafe { meta::write_block(&*self.meta_dev, *b, buf, false) });
                iort::try_join_all(futs.collect()).await.map_err(meta_io)?;
            }
            self.meta_dev.flush().await?;
            // SAFETY: as for the blocks above.
            unsafe {
                meta::write_block(
                    &*self.meta_dev,
                    crate::types::MetaBlock(0),
                    &p.superblock,
                    true,
                )
            }
            .await
            .map_err(meta_io)?;
            if !self.meta_dev.limits().fua {
                self.meta_dev.flush().await?;
            }
            Ok::<(), IoError>(())
        }
        .await;
        let Some(p) = prepared else {
            return r;
        };
        if let Err(e) = r {
            self.meta().abort_commit(p);
            return Err(e.context(format!("{}: commit", self.name)));
        }
        let freed = self.meta().finish_commit(p);
        self.commits.fetch_add(1, Ordering::Relaxed);
        *lock(&self.last_commit) = Instant::now();
        let o = self.options();
        if !o.no_discard_passdown && !o.ignore_discard && !freed.is_empty() {
            // (first block, number of blocks)
            let mut runs: Vec<(DataBlock, u64)> = Vec::new();
            let mut sorted = freed.clone();
            sorted.sort_unstable();
            for d in sorted {
                match runs.last_mut() {
                    Some((s, n)) if s.0 + *n == d.0 => *n += 1,
                    _ => runs.push((d, 1)),
                }
            }
            for (s, n) in runs {
                if let Err(e) = data
                    .discard(Bytes(self.block_off(s)), Bytes(n * self.block_bytes))
                    .await
                {
                    log::debug!("{}: discard passdown failed: {e}", self.name);
                }
            }
        }
        self.meta().release_data(&freed);
        Ok(())
    }

    /// Commits what is pending; call before dropping the last handle.
    pub async fn close(&self) -> IoResult<()> {
        self.commit().await
    }

    /// Opens thin device `id` with virtual size `size`, reading unmapped blocks from
    /// `origin` if given.
    pub fn thin(
        self: &Arc<Pool>,
        id: ThinId,
        size: Bytes,
        origin: Option<DeviceRef>,
    ) -> IoResult<Arc<ThinDevice>> {
        if self.meta_for_io()?.device(id).map_err(meta_io)?.is_none() {
            return Err(IoError::new(
                libc::ENODEV,
                format!("{}: {id} does not exist (create_thin first)", self.name),
            ));
        }
        *lock(&self.open_thins).entry(id).or_insert(0) += 1;
        Ok(Arc::new(ThinDevice {
            pool: self.clone(),
            id,
            gate: self.gate(id),
            size,
            origin,
            name: format!("thin({}, {})", self.name, id.0),
        }))
    }

    fn block_off(&self, d: DataBlock) -> u64 {
        d.0 * self.block_bytes
    }

    /// Waits for a free data block, as the no-space policy says.
    async fn alloc_data(&self) -> IoResult<DataBlock> {
        loop {
            let (got, pending) = {
                let mut m = self.meta_for_io()?;
                (m.reserve_data(), m.data_pending())
            };
            if let Some(d) = got {
                self.space_found();
                return Ok(d);
            }
            if pending > 0 {
                // Freed blocks come back once their transaction is durable.
                self.commit().await?;
                continue;
            }
            self.out_of_space.store(true, Ordering::Relaxed);
            // The wait counts from when the pool ran out, not from this write.
            let since = *lock(&self.no_space_since).get_or_insert_with(Instant::now);
            let o = self.options();
            if o.error_if_no_space || since.elapsed() >= o.no_space_timeout {
                return Err(IoError::nospc(format!("{}: out of data space", self.name)));
            }
            iort::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A data block was reserved: the pool is not out of space (any more).
    fn space_found(&self) {
        self.out_of_space.store(false, Ordering::Relaxed);
        *lock(&self.no_space_since) = None;
    }

    fn low_water_check(&self) {
        let free = self.meta().data_free();
        self.low_water_at(free);
    }

    /// The low-water check with the free block count already in hand.
    fn low_water_at(&self, free: u64) {
        let lw = lock(&self.opts).low_water_blocks;
        if free <= lw {
            if self.low_water_armed.swap(false, Ordering::Relaxed) {
                self.low_water_events.fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "{}: free data blocks ({free}) reached the low-water mark ({lw})",
                    self.name
                );
            }
        } else {
            self.low_water_armed.store(true, Ordering::Relaxed);
        }
    }

    /// # Safety
    /// The origin may lend `buf` to the kernel: keep the
    /// [lending contract](tables::io#the-lending-contract) for the returned future.
    async unsafe fn read_origin(origin: &DeviceRef, off: u64, buf: &mut [u8]) -> IoResult<()> {
        let size = origin.size().0;
        if off >= size {
            buf.fill(0);
            return Ok(());
        }
        let n = ((size - off) as usize).min(buf.len());
        origin.read(Bytes(off), &mut buf[..n]).await?;
        buf[n..].fill(0);
        Ok(())
    }

    /// # Safety
    /// For `Dst::Mem` the data device may lend that memory to the kernel: keep the
    /// [lending contract](tables::io#the-lending-contract) for the returned future.
    async unsafe fn read_block(
        &self,
        t: &ThinDevice,
        v: VBlock,
        off: usize,
        mut buf: Dst<'_>,
    ) -> IoResult<Served> {
        let _cell = self.cells.lock((t.id, v)).await;
        let look = self.meta_for_io()?.map_lookup(t.id, v).map_err(meta_io)?;
        if let Some(l) = look {
            let data = self.data_dev();
            return buf
                .read_from(&*data, Bytes(self.block_off(l.block) + off as u64))
                .await;
        }
        // Zeroes and the origin's short tail are filled in memory.
        let Dst::Mem(buf) = buf else {
            return Ok(Served::NeedsMemory);
        };
        match &t.origin {
            Some(o) => Self::read_origin(o, v.0 * self.block_bytes + off as u64, buf).await?,
            None => buf.fill(0),
        }
        Ok(Served::Done)
    }

    /// # Safety
    /// For `Src::Mem` the data device may lend that memory to the kernel: keep the
    /// [lending contract](tables::io#the-lending-contract) for the returned future.
    async unsafe fn write_block(
        &self,
        t: &ThinDevice,
        v: VBlock,
        off: usize,
        src: Src<'_>,
    ) -> IoResult<Served> {
        let _cell = self.cells.lock((t.id, v)).await;
        if self.dedup_on() {
            // Hashed blocks are never written in place: every write takes the dedup path.
            // SAFETY: this function's own contract for `src` is passed on.
            return unsafe { self.dedup_write_block(t, v, off, src) }.await;
        }
        let look = self.meta_for_io()?.map_lookup(t.id, v).map_err(meta_io)?;
        let data = self.data_dev();
        if let Some(Lookup {
            block,
            exclusive: true,
        }) = look
        {
            if lock(&self.failed).is_none() {
                let at = Bytes(self.block_off(block) + off as u64);
                return src.write_to(&*data, at, WriteFlags::default()).await;
            }
        }
        let bs = self.block_bytes;
        let whole = off == 0 && src.len() as u64 == bs;
        let copies = !whole && (look.is_some() || t.origin.is_some());
        if copies && !matches!(src, Src::Mem(_)) {
            // Copy-on-write merges old bytes with the write's in memory.
            return Ok(Served::NeedsMemory);
        }
        self.writable()?;
        let d = self.alloc_data().await?;
        let res = async {
            let at = self.block_off(d);
            if whole {
                return src.write_to(&*data, Bytes(at), WriteFlags::default()).await;
            }
            if !copies {
                let body_at = Bytes(at + off as u64);
                if self.options().skip_block_zeroing {
                    return src.write_to(&*data, body_at, WriteFlags::default()).await;
                }
                // A fresh block with nothing under it: the write as is, zeroes around it
                // from a shared zero buffer, concurrently; no block-sized buffer to allocate,
                // zero and copy into per write.
                let (w0, w1) = (off as u64, (off + src.len()) as u64);
                let (head, body, tail) = futures::future::join3(
                    zero_range(&data, at, w0),
                    src.write_to(&*data, body_at, WriteFlags::default()),
                    zero_range(&data, at + w1, bs - w1),
                )
                .await;
                return head.and(tail).and(body);
            }
            let Src::Mem(src) = src else {
                return Ok(Served::NeedsMemory);
            };
            // Build the new block chunk by chunk (blocks may be up to 1 GiB): each chunk is
            // the old shared block, the origin or zeroes, with the write laid over it.
            let (w0, w1) = (off as u64, (off + src.len()) as u64);
            let mut buf = vec![0u8; bs.min(COPY_CHUNK) as usize];
            let mut c0 = 0u64;
            while c0 < bs {
                let c1 = (c0 + COPY_CHUNK).min(bs);
                let chunk = &mut buf[..(c1 - c0) as usize];
                let overlaps = w0 < c1 && c0 < w1;
                match (look, &t.origin) {
                    (Some(l), _) => {
                        data.read(Bytes(self.block_off(l.block) + c0), chunk)
                            .await?
                    }
                    (None, Some(o)) => {
                        Self::read_origin(o, v.0 * bs + c0, chunk).await?;
                    }
                    (None, None) if !overlaps => {
                        data.write_zeroes(Bytes(at + c0), Bytes(c1 - c0), WriteFlags::default())
                            .await?;
                        c0 = c1;
                        continue;
                    }
                    (None, None) => chunk.fill(0),
                }
                if overlaps {
                    let (s0, s1) = (w0.max(c0), w1.min(c1));
                    chunk[(s0 - c0) as usize..(s1 - c0) as usize]
                        .copy_from_slice(&src[(s0 - w0) as usize..(s1 - w0) as usize]);
                }
                data.write(Bytes(at + c0), chunk, WriteFlags::default())
                    .await?;
                c0 = c1;
            }
            Ok(Served::Done)
        }
        .await;
        match res {
            Ok(Served::Done) => {}
            // The caller redoes the write from memory; the block goes back unused.
            Ok(Served::NeedsMemory) => {
                self.meta().unreserve(d);
                return Ok(Served::NeedsMemory);
            }
            Err(e) => {
                self.meta().unreserve(d);
                return Err(e);
            }
        }
        let mut r = self.mutate(|m| m.map_insert(t.id, v, d));
        if matches!(&r, Err(e) if e.errno == libc::ENOSPC) && self.meta().meta_pending() > 0 {
            // Metadata freed by this transaction comes back once it is committed.
            if self.commit().await.is_ok() {
                r = self.mutate(|m| m.map_insert(t.id, v, d));
            }
        }
        if let Err(e) = r {
            self.meta().unreserve(d);
            return Err(e);
        }
        self.low_water_check();
        Ok(Served::Done)
    }

    /// Unmaps the whole blocks of `[first, end)` of device `id`.
    async fn unmap(&self, id: ThinId, first: VBlock, end: VBlock) -> IoResult<()> {
        self.writable()?;
        let mut lo = first;
        loop {
            let batch = self
                .meta_for_io()?
                .map_range(id, lo, end, 1024)
                .map_err(meta_io)?;
            let Some(&(last, _)) = batch.last() else {
                return Ok(());
            };
            for (v, _) in batch {
                let _cell = self.cells.lock((id, v)).await;
                let mut r = self.mutate(|m| m.map_remove(id, v));
                if matches!(&r, Err(e) if e.errno == libc::ENOSPC) && self.meta().meta_pending() > 0
                {
                    self.commit().await?;
                    r = self.mutate(|m| m.map_remove(id, v));
                }
                r?;
            }
            lo = VBlock(last.0 + 1);
        }
    }
}

fn spawn_committer(pool: &Arc<Pool>, interval: Duration) {
    let weak: Weak<Pool> = Arc::downgrade(pool);
    let stop = pool.stop.clone();
    let step = (interval / 8).max(Duration::from_millis(10));
    let r = std::thread::Builder::new()
        .name("thin-commit".into())
        .spawn(move || loop {
            std::thread::sleep(step);
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let Some(p) = weak.upgrade() else { return };
            if p.commit_due(interval) {
                let r = match iort::block_on(p.commit()) {
                    Ok(r) => r,
                    Err(_) => futures::executor::block_on(p.commit()),
                };
                if let Err(e) = r {
                    log::error!("{}: periodic commit failed: {e}", p.name);
                }
            }
        });
    if let Err(e) = r {
        log::error!("{}: cannot start the commit thread: {e}", pool.name);
    }
}

/// A thin volume: a virtual device whose blocks the pool provisions on first write.
pub struct ThinDevice {
    pool: Arc<Pool>,
    id: ThinId,
    /// The device's snapshot gate (shared by every handle on this id).
    gate: Gate,
    size: Bytes,
    origin: Option<DeviceRef>,
    name: String,
}

impl Drop for ThinDevice {
    fn drop(&mut self) {
        if let Some(n) = lock(&self.pool.open_thins).get_mut(&self.id) {
            *n = n.saturating_sub(1);
        }
    }
}

impl ThinDevice {
    /// The pool.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }
    /// The device id.
    pub fn id(&self) -> ThinId {
        self.id
    }

    /// Splits `[offset, offset+len)` into per-block pieces: (vblock, offset in block, offset
    /// in request, length).
    fn pieces(&self, offset: u64, len: usize) -> Vec<(VBlock, usize, usize, usize)> {
        let bs = self.pool.block_bytes;
        let mut out = Vec::new();
        let mut done = 0usize;
        while done < len {
            let pos = offset + done as u64;
            let v = pos / bs;
            let in_b = (pos % bs) as usize;
            let n = (bs as usize - in_b).min(len - done);
            out.push((VBlock(v), in_b, done, n));
            done += n;
        }
        out
    }

    /// # Safety
    /// For `Src::Mem` the data device may lend that memory to the kernel: keep the
    /// [lending contract](tables::io#the-lending-contract) for the returned future.
    async unsafe fn do_write(
        &self,
        offset: Bytes,
        buf: Src<'_>,
        flags: WriteFlags,
    ) -> IoResult<Served> {
        tables::io::check_range(&self.name, self.size, offset, Bytes(buf.len() as u64))?;
        let _g = self.gate.shared().await;
        let pieces = self.pieces(offset.0, buf.len());
        let r = if let [(v, in_b, at, n)] = pieces[..] {
            self.pool.write_block(self, v, in_b, buf.piece(at, n)).await
        } else {
            // Blocks of one request go to the data device concurrently (distinct cells).
            let futs: Vec<_> = pieces
                .into_iter()
                .map(|(v, in_b, at, n)| self.pool.write_block(self, v, in_b, buf.piece(at, n)))
                .collect();
            iort::try_join_all(futs).await.map(all_done)
        };
        let served = r.map_err(|e| e.context(format!("{} at byte {}", self.name, offset.0)))?;
        drop(_g);
        // A write redone from memory commits then.
        if flags.fua && served == Served::Done {
            self.pool.commit().await?;
        }
        Ok(served)
    }

    /// # Safety
    /// For `Dst::Mem` the data device may lend that memory to the kernel: keep the
    /// [lending contract](tables::io#the-lending-contract) for the returned future.
    async unsafe fn do_read(&self, offset: Bytes, buf: Dst<'_>) -> IoResult<Served> {
        tables::io::check_range(&self.name, self.size, offset, Bytes(buf.len() as u64))?;
        let pieces = self.pieces(offset.0, buf.len());
        let r = if let [(v, in_b, _, _)] = pieces[..] {
            self.pool.read_block(self, v, in_b, buf).await
        } else {
            let lens: Vec<usize> = pieces.iter().map(|p| p.3).collect();
            let futs: Vec<_> = pieces
                .into_iter()
                .zip(buf.split(&lens))
                .map(|((v, in_b, _, _), piece)| self.pool.read_block(self, v, in_b, piece))
                .collect();
            iort::try_join_all(futs).await.map(all_done)
        };
        r.map_err(|e| e.context(format!("{} at byte {}", self.name, offset.0)))
    }

    /// Whole blocks inside `[offset, offset+len)`.
    fn whole_blocks(&self, offset: Bytes, len: Bytes) -> (VBlock, VBlock) {
        let bs = self.pool.block_bytes;
        let first = offset.0.div_ceil(bs);
        let end = (offset.0 + len.0) / bs;
        (VBlock(first), VBlock(end.max(first)))
    }

    async fn do_discard(&self, offset: Bytes, len: Bytes) -> IoResult<()> {
        tables::io::check_range(&self.name, self.size, offset, len)?;
        if self.pool.options().ignore_discard {
            return Ok(());
        }
        let (first, end) = self.whole_blocks(offset, len);
        self.pool.unmap(self.id, first, end).await
    }

    async fn do_write_zeroes(&self, offset: Bytes, len: Bytes, flags: WriteFlags) -> IoResult<()> {
        tables::io::check_range(&self.name, self.size, offset, len)?;
        let bs = self.pool.block_bytes;
        let (first, end) = self.whole_blocks(offset, len);
        if self.origin.is_some() || first >= end {
            return tables::io::write_zeroes_by_writing(self, offset, len, flags).await;
        }
        let head = Bytes(first.0 * bs - offset.0);
        let tail_at = Bytes(end.0 * bs);
        let tail = Bytes(offset.0 + len.0 - tail_at.0);
        if head.0 > 0 {
            tables::io::write_zeroes_by_writing(self, offset, head, WriteFlags::default()).await?;
        }
        {
            let _g = self.gate.shared().await;
            self.pool.unmap(self.id, first, end).await?;
        }
        if tail.0 > 0 {
            tables::io::write_zeroes_by_writing(self, tail_at, tail, WriteFlags::default()).await?;
        }
        if flags.fua {
            self.pool.commit().await?;
        }
        Ok(())
    }

    /// Mapped blocks and the highest mapped block.
    pub fn mapping_stats(&self) -> IoResult<(u64, Option<VBlock>)> {
        let m = self.pool.meta_for_io()?;
        let info = m
            .device(self.id)
            .map_err(meta_io)?
            .ok_or_else(|| IoError::new(libc::ENODEV, format!("{}: deleted", self.name)))?;
        Ok((info.mapped, m.highest_mapped(self.id).map_err(meta_io)?))
    }
}

impl BlockDevice for ThinDevice {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn size(&self) -> Bytes {
        self.size
    }
    fn limits(&self) -> Limits {
        let o = self.pool.options();
        let bs = self.pool.block_bytes.min(u32::MAX as u64) as u32;
        Limits {
            io_opt: bs,
            discard_granularity: if o.ignore_discard { 0 } else { bs },
            discard_zeroes: false,
            write_zeroes: true,
            read_only: o.read_only,
            ..Limits::default()
        }
    }
    unsafe fn read<'a>(&'a self, offset: Bytes, buf: &'a mut [u8]) -> IoFuture<'a> {
        Box::pin(async move { self.do_read(offset, Dst::Mem(buf)).await.map(|_| ()) })
    }
    unsafe fn write<'a>(&'a self, offset: Bytes, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a> {
        Box::pin(async move {
            self.do_write(offset, Src::Mem(buf), flags)
                .await
                .map(|_| ())
        })
    }
    fn read_fixed(&self, offset: Bytes, buf: FixedBuf) -> IoFuture<'_, Served> {
        // SAFETY: a registered buffer lends no memory of ours.
        Box::pin(unsafe { self.do_read(offset, Dst::Fixed(buf)) })
    }
    fn write_fixed(&self, offset: Bytes, buf: FixedBuf, flags: WriteFlags) -> IoFuture<'_, Served> {
        // SAFETY: as in `read_fixed`.
        Box::pin(unsafe { self.do_write(offset, Src::Fixed(buf), flags) })
    }
    fn copy_mapped<'a>(
        &'a self,
        offset: Bytes,
        len: usize,
        write: Option<WriteFlags>,
        copy: MappedCopy<'a>,
    ) -> IoFuture<'a, Served> {
        let req = MappedReq { copy, at: 0, len };
        // SAFETY: a mapped request lends no memory of ours (its copies are synchronous).
        unsafe {
            match write {
                Some(flags) => Box::pin(self.do_write(offset, Src::Mapped(req), flags)),
                None => Box::pin(self.do_read(offset, Dst::Mapped(req))),
            }
        }
    }
    fn flush(&self) -> IoFuture<'_> {
        Box::pin(self.pool.commit())
    }
    fn discard(&self, offset: Bytes, len: Bytes) -> IoFuture<'_> {
        Box::pin(self.do_discard(offset, len))
    }
    fn write_zeroes(&self, offset: Bytes, len: Bytes, flags: WriteFlags) -> IoFuture<'_> {
        Box::pin(self.do_write_zeroes(offset, len, flags))
    }
    fn status(&self) -> String {
        let sectors = self.pool.block_bytes / 512;
        match self.mapping_stats() {
            // Counts and keys come from disk: saturate rather than overflow.
            Ok((mapped, Some(h))) => format!(
                "{} {}",
                mapped.saturating_mul(sectors),
                h.0.saturating_add(1).saturating_mul(sectors) - 1
            ),
            Ok((mapped, None)) => format!("{} -", mapped.saturating_mul(sectors)),
            Err(_) => "Fail".into(),
        }
    }
}

/// Parses and runs a pool message; returns the reply.
pub async fn pool_message(pool: &Pool, args: &[String]) -> IoResult<String> {
    let name = pool.name();
    let bad = |m: String| IoError::invalid(format!("{name}: message '{}': {m}", args.join(" ")));
    let id = |i: usize| -> IoResult<ThinId> {
        let s = args
            .get(i)
            .ok_or_else(|| bad(format!("argument {i} missing")))?;
        s.parse::<u32>()
            .ok()
            .filter(|&v| v < (1 << 24))
            .map(ThinId)
            .ok_or_else(|| bad(format!("'{s}' is not a device id (0..16777215)")))
    };
    let num = |i: usize| -> IoResult<u64> {
        let s = args
            .get(i)
            .ok_or_else(|| bad(format!("argument {i} missing")))?;
        s.parse::<u64>()
            .map_err(|_| bad(format!("'{s}' is not a number")))
    };
    let want = |n: usize| -> IoResult<()> {
        if args.len() != n {
            return Err(bad(format!("takes {} arguments", n - 1)));
        }
        Ok(())
    };
    match args.first().map(String::as_str) {
        Some("create_thin") => {
            want(2)?;
            pool.create_thin(id(1)?)?;
        }
        Some("create_snap") => {
            want(3)?;
            pool.create_snap(id(1)?, id(2)?).await?;
        }
        Some("delete") => {
            want(2)?;
            pool.delete(id(1)?)?;
        }
        Some("set_transaction_id") => {
            want(3)?;
            pool.set_transaction_id(num(1)?, num(2)?)?;
        }
        Some("reserve_metadata_snap") => {
            want(1)?;
            pool.mutate(|m| m.reserve_metadata_snap().map(|_| ()))?;
        }
        Some("release_metadata_snap") => {
            want(1)?;
            pool.mutate(|m| m.release_metadata_snap())?;
        }
        Some("dedup_scan") => {
            // `dedup_scan [N]`: one bounded scan step over at most N mappings (4096).
            if args.len() > 2 {
                return Err(bad("takes at most 1 argument".into()));
            }
            let n = if args.len() == 2 { num(1)? } else { 4096 };
            let p = pool.dedup_scan_step(n).await?;
            pool.commit().await?;
            return Ok(p.to_string());
        }
        _ => {
            return Err(bad(
                "unknown (create_thin, create_snap, delete, set_transaction_id, reserve_metadata_snap, release_metadata_snap, dedup_scan)".into(),
            ))
        }
    }
    // As dm-thin: a message's change is committed before the reply.
    pool.commit().await?;
    Ok(String::new())
}
