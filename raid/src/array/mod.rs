//! The RAID device: its shared state and the [`BlockDevice`] impl that dispatches requests.
//!
//! The work is split by job: `assembly` (open, superblock trust decisions), `superblock`
//! (event counter, recording failures), `bitmap` (write-intent bits), `mirror_io` (raid1 /
//! raid10), `parity_io` (raid4/5), `ppl_io` (the partial parity log), `sync` (the background
//! thread: resync, recovery, check, repair), `status` (status line, messages), `grow` (a
//! larger table: the new size made durable, the new regions resynced) and `live` (the arrays
//! open in this process, so a reloaded table reaches the array that is already running).
//!
//! A [`RaidDevice`] is one table's handle on an array: its size is the table's. Handles of one
//! array share its state; a reload builds a second handle on the running array instead of
//! assembling it a second time, and the array grows to the new handle's size once that handle
//! is in use (its first request beyond the old end, or the older handles gone).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use tables::io::{
    check_range, BlockDevice, DeviceRef, Dst, FixedBuf, IoError, IoFuture, IoResult, Limits,
    MappedCopy, MappedReq, Served, Src, WriteFlags,
};
use tables::Bytes;

use crate::lock::LockTable;
use crate::meta;
use crate::parse::{RaidConfig, SyncMode};
use crate::ppl;

mod assembly;
mod bitmap;
mod grow;
pub(crate) mod live;
mod mirror_io;
mod parity_io;
mod ppl_io;
mod status;
mod superblock;
mod sync;

/// Leg health.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum LegState {
    /// Holds valid data everywhere.
    InSync,
    /// Being rebuilt: valid only below the recovery position.
    Recovering,
    /// Failed: never read or written again until replaced.
    Failed,
}

const ST_INSYNC: u8 = 0;
const ST_RECOVERING: u8 = 1;
const ST_FAILED: u8 = 2;

struct Leg {
    data: RwLock<DeviceRef>,
    meta: Option<DeviceRef>,
    state: AtomicU8,
    /// Trusted, but its superblock missed the newest event (an interrupted superblock round):
    /// a full resync runs and this leg is never the source while it does.
    stale: AtomicBool,
    /// Given as `- -` in the table and not replaced since: there is no device to rebuild.
    missing: AtomicBool,
    last_error: Mutex<Option<String>>,
    /// When it failed at run time on a remote extent: the extent's connection count then
    /// (see `BlockDevice::connections_made`); a larger count later means it came back.
    failed_at_conn: Mutex<Option<u64>>,
}

impl Leg {
    fn state(&self) -> LegState {
        match self.state.load(Ordering::Acquire) {
            ST_INSYNC => LegState::InSync,
            ST_RECOVERING => LegState::Recovering,
            _ => LegState::Failed,
        }
    }
    fn set(&self, s: LegState) {
        let v = match s {
            LegState::InSync => ST_INSYNC,
            LegState::Recovering => ST_RECOVERING,
            LegState::Failed => ST_FAILED,
        };
        self.state.store(v, Ordering::Release);
    }
    fn dev(&self) -> DeviceRef {
        self.data.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Sync action shown in `status`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum SyncAction {
    /// Nothing to do.
    Idle,
    /// Stopped by `frozen`.
    Frozen,
    /// Making copies/parity consistent over dirty regions.
    Resync,
    /// Rebuilding legs.
    Recover,
    /// Comparing copies/parity, counting mismatches.
    Check,
    /// Comparing and fixing.
    Repair,
}

impl SyncAction {
    fn as_str(self) -> &'static str {
        match self {
            SyncAction::Idle => "idle",
            SyncAction::Frozen => "frozen",
            SyncAction::Resync => "resync",
            SyncAction::Recover => "recover",
            SyncAction::Check => "check",
            SyncAction::Repair => "repair",
        }
    }
}

#[derive(Default)]
struct SyncState {
    frozen: bool,
    /// Regions whose copies/parity may disagree (from the bitmap at start, or `resync`).
    pending: Vec<bool>,
    pending_count: u64,
    /// Cursor of the resync / check pass, in regions.
    cursor: u64,
    /// Requested scrub (Check or Repair) and its cursor.
    scrub: Option<SyncAction>,
    /// Why recovery cannot proceed (too many missing legs), shown in status.
    stuck: Option<String>,
    /// Set when a parity array starts unclean while a leg is missing and the partial parity
    /// log was not being kept (the leg went missing across the restart, or failed with
    /// unlogged writes not yet durable): the dirty stripes' parity may not match their data,
    /// so the missing leg's data there may be wrong. Shown in status.
    dirty_degraded: u64,
}

struct BmState {
    words: Vec<u64>,
    inflight: Vec<u32>,
    seq: Vec<u32>,
    dirty_pages: Vec<bool>,
    mem_gen: u64,
    disk_gen: u64,
}

/// The partial parity log's run-time state (see [`crate::ppl`]).
#[derive(Default)]
struct PplState {
    /// Where the log lives; `None` without one (mirror, no metadata, too small).
    geo: Option<ppl::Geometry>,
    /// Why there is no log, for status.
    why_none: Option<&'static str>,
    /// Leg whose metadata device holds the active log; `None` while no log is kept (every
    /// leg in sync).
    log_leg: Option<usize>,
    /// Generation and key of each segment (generation 0 = nothing valid).
    gens: [u64; ppl::SEGMENTS],
    keys: [u64; ppl::SEGMENTS],
    /// Segment being filled and the offset of its free space.
    cur: usize,
    next_off: u64,
    /// Highest generation on any leg, so a new one is always newer.
    max_gen: u64,
    next_seq: u64,
    /// Set while the log is being started: no write may go unlogged meanwhile.
    activating: bool,
    /// Stripe -> number of the last flush started when its last logged write completed. That
    /// write is durable once a higher-numbered flush completes; until then a new partial
    /// entry for the stripe would assume data a cut can still take back.
    unflushed: std::collections::HashMap<u64, u64>,
    /// Flushes of every leg: the number of the last one started and the highest completed.
    flush_started: u64,
    flush_done: u64,
    /// Stripe writes in flight per generation they were logged in (0: not logged).
    inflight: std::collections::HashMap<u64, usize>,
    /// Entries written in this run and replayed at assembly (status).
    written: u64,
    replayed: u64,
}

/// Geometry of the array.
#[derive(Clone, Debug)]
enum Geo {
    /// raid1 (copies == legs, identity offsets) or raid10 near.
    Mirror {
        copies: usize,
        chunk: u64,
        raid1: bool,
    },
    /// raid4/5.
    Parity {
        layout: crate::layout::Raid5Layout,
        chunk: u64,
    },
}

/// Options for [`RaidDevice::open`].
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Run resync/recovery/scrub on a background thread owned by the device. With `false`
    /// the caller drives [`RaidDevice::sync_step`] (deterministic tests).
    pub background: bool,
}

impl Default for OpenOptions {
    fn default() -> OpenOptions {
        OpenOptions { background: true }
    }
}

/// Opens a device by name for `rebuild <idx> <device>` messages.
pub type LegOpener = Arc<dyn Fn(&str) -> Result<DeviceRef, String> + Send + Sync>;

/// A table's handle on the array: its size and sync mode.
struct HandleInfo {
    id: u64,
    size: u64,
    sync: SyncMode,
}

struct Inner {
    name: String,
    cfg: RaidConfig,
    geo: Geo,
    /// Exposed size, bytes per leg and bitmap regions in use. They only grow (`grow.rs`),
    /// each stored after the state it covers (bitmap and sync vectors) has room for it.
    size: AtomicU64,
    leg_bytes: AtomicU64,
    regions: AtomicU64,
    /// What superblocks record: `(leg_bytes, array_bytes)`. A grow sets it before its
    /// superblock round, ahead of the fields above.
    recorded: Mutex<(u64, u64)>,
    region_bytes: u64,
    legs: Vec<Leg>,
    has_meta: bool,
    uuid: [u8; 16],
    events: AtomicU64,
    /// Bumped whenever a leg is failed in memory; `persisted_epoch` trails it until the
    /// superblocks record the failure. No write completes while they differ.
    fail_epoch: AtomicU64,
    persisted_epoch: AtomicU64,
    sb_lock: Arc<LockTable>,
    /// Serialises recovery steps against `replace_leg` resetting the recovery position.
    rec_lock: Arc<LockTable>,
    bm: Mutex<BmState>,
    bm_lock: Arc<LockTable>,
    locks: Arc<LockTable>,
    ppl: Mutex<PplState>,
    /// Serialises starting, moving, segment switches and dropping of the log.
    ppl_lock: Arc<LockTable>,
    sync: Mutex<SyncState>,
    /// Recovery progress: stripes (parity) or regions (mirror) below this are rebuilt.
    recover_pos: AtomicU64,
    /// Units (regions) the last mirror recovery step moved, for the rate throttle; 0 when the
    /// last step moved one unit.
    step_units: AtomicU64,
    mismatches: AtomicU64,
    rr: AtomicUsize,
    client_ios: AtomicU64,
    opener: Mutex<Option<LegOpener>>,
    wake: (Mutex<bool>, Condvar),
    stop: AtomicBool,
    limits: Limits,
    /// Live handles on this array.
    handles: Mutex<Vec<HandleInfo>>,
    /// A size (and sync mode for the new regions) to grow to, asked for when the handle that
    /// wants it became the only one; the background step applies it.
    grow_want: Mutex<Option<(u64, SyncMode)>>,
    /// Serialises grows.
    grow_lock: Arc<LockTable>,
    /// Why the last grow failed, for status.
    grow_error: Mutex<Option<String>>,
}

/// Owns the array's background thread: shared by every handle, so the thread stops when the
/// last handle goes.
struct Owner {
    inner: Arc<Inner>,
    bg: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Release);
        self.inner.kick();
        if let Some(h) = self.bg.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = h.join();
        }
    }
}

/// A RAID array as a block device: one table's handle on the array (see the module docs).
pub struct RaidDevice {
    inner: Arc<Inner>,
    /// Keeps the array's background thread running while any handle lives.
    _owner: Arc<Owner>,
    id: u64,
    /// The table's size: requests are checked against it, and the array grows to it once
    /// this handle is in use.
    size: Bytes,
    /// The table's sync mode, which decides whether the regions a grow adds are resynced.
    sync: SyncMode,
}

impl RaidDevice {
    /// A new handle of `size` bytes on the array `owner` runs.
    fn handle(owner: Arc<Owner>, size: Bytes, sync: SyncMode) -> RaidDevice {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let inner = owner.inner.clone();
        inner
            .handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(HandleInfo {
                id,
                size: size.0,
                sync,
            });
        RaidDevice {
            inner,
            _owner: owner,
            id,
            size,
            sync,
        }
    }

    /// Grows the array to this handle's size first when `end` lies beyond the array's end.
    async fn reach(&self, end: u64) -> IoResult<()> {
        if end > self.inner.size() {
            self.inner.ensure_size(self.size.0, self.sync).await?;
        }
        Ok(())
    }

    /// The array's size now: this handle's size once the array has grown to it.
    pub fn array_size(&self) -> Bytes {
        Bytes(self.inner.size())
    }

    /// Installs the opener used by `rebuild <idx> <device>` messages.
    pub fn set_opener(&self, opener: LegOpener) {
        *self.inner.opener.lock().unwrap_or_else(|e| e.into_inner()) = Some(opener);
    }

    /// Health of every leg.
    pub fn leg_states(&self) -> Vec<LegState> {
        self.inner.legs.iter().map(Leg::state).collect()
    }

    /// The last I/O error each leg returned (why it was failed).
    pub fn leg_errors(&self) -> Vec<Option<String>> {
        self.inner
            .legs
            .iter()
            .map(|l| {
                l.last_error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
            })
            .collect()
    }

    /// Mismatches found by the last `check`/`repair`/resync, in sectors.
    pub fn mismatch_count(&self) -> u64 {
        self.inner.mismatches.load(Ordering::Relaxed)
    }

    /// The array UUID (from the superblocks, or freshly made).
    pub fn uuid(&self) -> String {
        meta::uuid_string(&self.inner.uuid)
    }

    /// Current sync action. Before the array has grown to this handle's size, that grow's
    /// resync counts as pending (unless the table says `nosync`).
    pub fn sync_action(&self) -> SyncAction {
        let a = self.inner.current_action();
        if a == SyncAction::Idle && self.size.0 > self.inner.size() && self.sync != SyncMode::Skip {
            return SyncAction::Resync;
        }
        a
    }

    /// Does one unit of background work (a region, or a stripe of recovery); returns whether
    /// more work remains. Background threads call it in a loop; tests call it directly.
    pub async fn sync_step(&self) -> IoResult<bool> {
        self.inner.sync_step().await
    }

    /// Runs background work until there is none (for tests and tools).
    pub async fn sync_all(&self) -> IoResult<()> {
        while self.inner.sync_step().await? {}
        Ok(())
    }

    /// Replaces leg `idx` (failed or recovering) with `dev` and starts rebuilding it.
    pub async fn replace_leg(&self, idx: usize, dev: DeviceRef) -> IoResult<()> {
        self.inner.replace_leg(idx, Some(dev)).await
    }

    /// Marks leg `idx` failed (as if it had returned an I/O error).
    pub async fn fail_leg(&self, idx: usize) -> IoResult<()> {
        if idx >= self.inner.legs.len() {
            return Err(IoError::invalid(format!(
                "{}: no leg {idx}",
                self.inner.name
            )));
        }
        self.inner
            .fail_leg(idx, &IoError::eio("failed by request"))
            .await;
        Ok(())
    }

    /// Waits until the background thread (if any) has nothing left to do, or `timeout`.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let start = std::time::Instant::now();
        while start.elapsed() < timeout {
            if self.sync_action() == SyncAction::Idle {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }
}

impl Drop for RaidDevice {
    fn drop(&mut self) {
        let mut hs = self.inner.handles.lock().unwrap_or_else(|e| e.into_inner());
        hs.retain(|h| h.id != self.id);
        // A reload swaps the new table in and drops the old one: the handle left is the one
        // in use, and the array grows to it. A reload that failed drops the new handle
        // instead, and the one left is no larger than the array.
        if let [h] = hs.as_slice() {
            if h.size > self.inner.size() {
                *self
                    .inner
                    .grow_want
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some((h.size, h.sync));
                drop(hs);
                self.inner.kick();
            }
        }
    }
}

impl Inner {
    fn kick(&self) {
        let (m, cv) = (&self.wake.0, &self.wake.1);
        *m.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
    }

    fn n(&self) -> usize {
        self.legs.len()
    }

    /// Exposed size in bytes.
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Bytes of each leg in use.
    fn leg_bytes(&self) -> u64 {
        self.leg_bytes.load(Ordering::Acquire)
    }

    /// Bitmap regions in use.
    fn regions(&self) -> u64 {
        self.regions.load(Ordering::Acquire)
    }

    fn leg_errors_now(&self) -> Vec<Option<String>> {
        self.legs
            .iter()
            .map(|l| {
                l.last_error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
            })
            .collect()
    }

    fn bm_state(&self) -> std::sync::MutexGuard<'_, BmState> {
        self.bm.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sync_state(&self) -> std::sync::MutexGuard<'_, SyncState> {
        self.sync.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn current_action(&self) -> SyncAction {
        let st = self.sync_state();
        if st.frozen {
            return SyncAction::Frozen;
        }
        if st.stuck.is_none() && self.legs.iter().any(|l| l.state() == LegState::Recovering) {
            return SyncAction::Recover;
        }
        if st.pending_count > 0 {
            return SyncAction::Resync;
        }
        st.scrub.unwrap_or(SyncAction::Idle)
    }
}

impl RaidDevice {
    /// A read into a registered buffer or a mapped copy (`read_fixed`, `copy_mapped`).
    ///
    /// # Safety
    /// For `Dst::Mem` the legs may lend that memory to the kernel: keep the
    /// [lending contract](tables::io#the-lending-contract) for the returned future.
    async unsafe fn read_direct(&self, offset: Bytes, buf: Dst<'_>) -> IoResult<Served> {
        let inner = &self.inner;
        check_range(&inner.name, self.size, offset, Bytes(buf.len() as u64))?;
        if buf.is_empty() {
            return Ok(Served::Done);
        }
        self.reach(offset.0 + buf.len() as u64).await?;
        let r = match inner.geo {
            Geo::Mirror { .. } => inner.mirror_read(offset.0, buf).await,
            Geo::Parity { .. } => inner.parity_read(offset.0, buf).await,
        };
        // A fallback is counted when the caller redoes the read.
        if !matches!(r, Ok(Served::NeedsMemory)) {
            inner.client_ios.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// A write from a registered buffer or a mapped copy: mirrors only, since parity is
    /// computed from the bytes.
    ///
    /// # Safety
    /// For `Src::Mem` the legs may lend that memory to the kernel: keep the
    /// [lending contract](tables::io#the-lending-contract) for the returned future.
    async unsafe fn write_direct(
        &self,
        offset: Bytes,
        buf: Src<'_>,
        flags: WriteFlags,
    ) -> IoResult<Served> {
        let inner = &self.inner;
        check_range(&inner.name, self.size, offset, Bytes(buf.len() as u64))?;
        if buf.is_empty() {
            return Ok(Served::Done);
        }
        let Geo::Mirror { .. } = inner.geo else {
            return Ok(Served::NeedsMemory);
        };
        self.reach(offset.0 + buf.len() as u64).await?;
        let r = inner.mirror_write(offset.0, buf.len(), buf, flags).await;
        if !matches!(r, Ok(Served::NeedsMemory)) {
            inner.client_ios.fetch_add(1, Ordering::Relaxed);
        }
        r
    }
}

impl BlockDevice for RaidDevice {
    fn name(&self) -> String {
        self.inner.name.clone()
    }
    fn size(&self) -> Bytes {
        self.size
    }
    fn limits(&self) -> Limits {
        self.inner.limits
    }
    unsafe fn read<'a>(&'a self, offset: Bytes, buf: &'a mut [u8]) -> IoFuture<'a> {
        Box::pin(async move {
            let inner = &self.inner;
            check_range(&inner.name, self.size, offset, Bytes(buf.len() as u64))?;
            if buf.is_empty() {
                return Ok(());
            }
            self.reach(offset.0 + buf.len() as u64).await?;
            inner.client_ios.fetch_add(1, Ordering::Relaxed);
            match inner.geo {
                Geo::Mirror { .. } => inner.mirror_read(offset.0, Dst::Mem(buf)).await,
                Geo::Parity { .. } => inner.parity_read(offset.0, Dst::Mem(buf)).await,
            }
            .map(|_| ())
        })
    }
    unsafe fn write<'a>(&'a self, offset: Bytes, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a> {
        Box::pin(async move {
            let inner = &self.inner;
            check_range(&inner.name, self.size, offset, Bytes(buf.len() as u64))?;
            if buf.is_empty() {
                return Ok(());
            }
            self.reach(offset.0 + buf.len() as u64).await?;
            inner.client_ios.fetch_add(1, Ordering::Relaxed);
            match inner.geo {
                Geo::Mirror { .. } => inner
                    .mirror_write(offset.0, buf.len(), Src::Mem(buf), flags)
                    .await
                    .map(|_| ()),
                Geo::Parity { .. } => inner.parity_write(offset.0, buf, flags).await,
            }
        })
    }
    fn read_fixed(&self, offset: Bytes, buf: FixedBuf) -> IoFuture<'_, Served> {
        // SAFETY: a registered buffer lends no memory of ours.
        Box::pin(unsafe { self.read_direct(offset, Dst::Fixed(buf)) })
    }
    fn write_fixed(&self, offset: Bytes, buf: FixedBuf, flags: WriteFlags) -> IoFuture<'_, Served> {
        // SAFETY: as in `read_fixed`.
        Box::pin(unsafe { self.write_direct(offset, Src::Fixed(buf), flags) })
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
                Some(flags) => Box::pin(self.write_direct(offset, Src::Mapped(req), flags)),
                None => Box::pin(self.read_direct(offset, Dst::Mapped(req))),
            }
        }
    }
    fn flush(&self) -> IoFuture<'_> {
        Box::pin(self.inner.flush_all())
    }
    fn discard(&self, offset: Bytes, len: Bytes) -> IoFuture<'_> {
        // A hint we do not act on: forwarding it could leave copies/parity inconsistent on
        // legs whose discard does not zero.
        Box::pin(async move { check_range(&self.inner.name, self.size, offset, len) })
    }
    fn write_zeroes(&self, offset: Bytes, len: Bytes, flags: WriteFlags) -> IoFuture<'_> {
        Box::pin(async move {
            check_range(&self.inner.name, self.size, offset, len)?;
            tables::io::write_zeroes_by_writing(self, offset, len, flags).await
        })
    }
    fn status(&self) -> String {
        self.inner.status_line(self.size.0, self.sync)
    }
    fn message<'a>(&'a self, args: &'a [String]) -> IoFuture<'a, String> {
        Box::pin(self.inner.handle_message(args))
    }
}
