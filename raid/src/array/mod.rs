//! The RAID device: its shared state and the [`BlockDevice`] impl that dispatches requests.
//!
//! The work is split by job: `assembly` (open, superblock trust decisions), `superblock`
//! (event counter, recording failures), `bitmap` (write-intent bits), `mirror_io` (raid1 /
//! raid10), `parity_io` (raid4/5), `ppl_io` (the partial parity log), `sync` (the background
//! thread: resync, recovery, check, repair) and `status` (status line, messages).

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
use crate::parse::RaidConfig;
use crate::ppl;

mod assembly;
mod bitmap;
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

struct Inner {
    name: String,
    cfg: RaidConfig,
    geo: Geo,
    size: Bytes,
    leg_bytes: u64,
    region_bytes: u64,
    regions: u64,
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
    mismatches: AtomicU64,
    rr: AtomicUsize,
    client_ios: AtomicU64,
    opener: Mutex<Option<LegOpener>>,
    wake: (Mutex<bool>, Condvar),
    stop: AtomicBool,
    limits: Limits,
}

/// A RAID array as a block device.
pub struct RaidDevice {
    inner: Arc<Inner>,
    bg: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl RaidDevice {
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

    /// Current sync action.
    pub fn sync_action(&self) -> SyncAction {
        self.inner.current_action()
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
            if self.inner.current_action() == SyncAction::Idle {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }
}

impl Drop for RaidDevice {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Release);
        self.inner.kick();
        if let Some(h) = self.bg.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = h.join();
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
        check_range(&inner.name, inner.size, offset, Bytes(buf.len() as u64))?;
        if buf.is_empty() {
            return Ok(Served::Done);
        }
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
        check_range(&inner.name, inner.size, offset, Bytes(buf.len() as u64))?;
        if buf.is_empty() {
            return Ok(Served::Done);
        }
        let Geo::Mirror { .. } = inner.geo else {
            return Ok(Served::NeedsMemory);
        };
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
        self.inner.size
    }
    fn limits(&self) -> Limits {
        self.inner.limits
    }
    unsafe fn read<'a>(&'a self, offset: Bytes, buf: &'a mut [u8]) -> IoFuture<'a> {
        Box::pin(async move {
            let inner = &self.inner;
            check_range(&inner.name, inner.size, offset, Bytes(buf.len() as u64))?;
            if buf.is_empty() {
                return Ok(());
            }
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
            check_range(&inner.name, inner.size, offset, Bytes(buf.len() as u64))?;
            if buf.is_empty() {
                return Ok(());
            }
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
        Box::pin(async move { check_range(&self.inner.name, self.inner.size, offset, len) })
    }
    fn write_zeroes(&self, offset: Bytes, len: Bytes, flags: WriteFlags) -> IoFuture<'_> {
        Box::pin(async move {
            check_range(&self.inner.name, self.inner.size, offset, len)?;
            tables::io::write_zeroes_by_writing(self, offset, len, flags).await
        })
    }
    fn status(&self) -> String {
        self.inner.status_line()
    }
    fn message<'a>(&'a self, args: &'a [String]) -> IoFuture<'a, String> {
        Box::pin(self.inner.handle_message(args))
    }
}
