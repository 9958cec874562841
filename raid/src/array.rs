//! The RAID device: geometry, leg states, the write-intent bitmap, client I/O, and the
//! background sync engine (resync, recovery, check, repair).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, Weak};
use std::time::Duration;

use futures::future::join_all;
use tables::io::{
    all_done, check_range, BlockDevice, DeviceRef, Dst, FixedBuf, IoError, IoFuture, IoResult,
    Limits, MappedCopy, MappedReq, Served, Src, WriteFlags,
};
use tables::{Bytes, Sectors};

use crate::layout::{raid10_near, raid5_stripe, ChunkCopy, StripeMap};
use crate::lock::LockTable;
use crate::meta::{self, SbRead, Superblock, BITS_PER_PAGE, META_BLOCK};
use crate::parse::{Level, RaidConfig, SyncMode};
use crate::ppl;
use crate::scratch::Scratch;
use crate::xor::{xor_into, xor_many};
use crate::RaidError;

mod ppl_io;

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

fn regions_for(span: u64, region: u64) -> u64 {
    span.div_ceil(region).max(1)
}

/// Runs `f`'s future on a fresh thread with its own io_uring runtime: building may be called
/// from inside another runtime's task, where blocking on the same ring would deadlock.
fn run_on_io_thread<T: Send, Fut: std::future::Future<Output = T>>(
    f: impl FnOnce() -> Fut + Send,
) -> Result<T, RaidError> {
    std::thread::scope(|s| {
        s.spawn(|| -> Result<T, RaidError> {
            let rt = iort::Runtime::new(64).map_err(|e| RaidError::Io(IoError::from(e)))?;
            Ok(rt.block_on(f()))
        })
        .join()
        .map_err(|_| RaidError::Io(IoError::eio("raid assembly thread panicked")))?
    })
}

impl RaidDevice {
    /// Assembles an array from opened legs: `legs[i] = (metadata, data)`, data devices
    /// already windowed (mirror offsets applied). `size` is the exposed size.
    pub fn open(
        name: String,
        cfg: RaidConfig,
        size: Bytes,
        legs: Vec<(Option<DeviceRef>, DeviceRef)>,
        opts: OpenOptions,
    ) -> Result<RaidDevice, RaidError> {
        let n = legs.len();
        if n != cfg.legs.len() {
            return Err(RaidError::Geometry(format!(
                "{n} legs opened but the table names {}",
                cfg.legs.len()
            )));
        }
        if !size.is_sector_aligned() || size.0 == 0 {
            return Err(RaidError::Geometry(format!(
                "size {} bytes is not a positive whole number of sectors",
                size.0
            )));
        }
        let (geo, leg_bytes) = match cfg.level {
            Level::Raid1 => (
                Geo::Mirror {
                    copies: n,
                    chunk: 0,
                    raid1: true,
                },
                size.0,
            ),
            Level::Raid10 { copies } => {
                let c = cfg.chunk.bytes().0;
                let array_chunks = size.0.div_ceil(c);
                let dev_chunks = (array_chunks * copies as u64).div_ceil(n as u64);
                (
                    Geo::Mirror {
                        copies,
                        chunk: c,
                        raid1: false,
                    },
                    dev_chunks * c,
                )
            }
            Level::Raid5(layout) => {
                let c = cfg.chunk.bytes().0;
                let stripes = size.0.div_ceil(c * (n as u64 - 1));
                (Geo::Parity { layout, chunk: c }, stripes * c)
            }
        };
        // Regions: array space for mirrors, per-leg space (whole stripes) for parity.
        let default_region = Sectors(4096).bytes().0; // 2 MiB
        let mut region_bytes = cfg.region.map(|r| r.bytes().0).unwrap_or(default_region);
        let span = match geo {
            Geo::Mirror { .. } => size.0,
            Geo::Parity { chunk, .. } => {
                region_bytes = region_bytes.max(chunk).div_ceil(chunk) * chunk;
                leg_bytes
            }
        };
        let regions = regions_for(span, region_bytes);
        let has_meta = legs.iter().all(|l| l.0.is_some());
        let mut limits = Limits::default();
        for (i, (m, d)) in legs.iter().enumerate() {
            if d.size().0 < leg_bytes {
                return Err(RaidError::Geometry(format!(
                    "leg {i} ({}) has {} bytes; this array needs {leg_bytes} per leg",
                    d.name(),
                    d.size().0
                )));
            }
            if let Some(m) = m {
                let need = meta::meta_bytes(regions);
                if m.size().0 < need {
                    return Err(RaidError::Geometry(format!(
                        "metadata device of leg {i} ({}) has {} bytes; needs {need} \
                         (superblock + bitmap of {regions} regions)",
                        m.name(),
                        m.size().0
                    )));
                }
            }
            limits = limits.stack(&d.limits());
        }
        limits.discard_granularity = 0;
        limits.discard_zeroes = false;
        limits.write_zeroes = false;
        limits.read_only = false;
        if let Geo::Parity { chunk, .. } = geo {
            limits.io_opt = (chunk * (n as u64 - 1)).min(u32::MAX as u64) as u32;
        }
        let words = (regions as usize).div_ceil(64);
        let pages = meta::bitmap_pages(regions) as usize;
        let inner = Inner {
            name,
            cfg,
            geo,
            size,
            leg_bytes,
            region_bytes,
            regions,
            legs: legs
                .into_iter()
                .map(|(m, d)| Leg {
                    data: RwLock::new(d),
                    meta: m,
                    state: AtomicU8::new(ST_INSYNC),
                    stale: AtomicBool::new(false),
                    last_error: Mutex::new(None),
                })
                .collect(),
            has_meta,
            uuid: [0; 16],
            events: AtomicU64::new(0),
            fail_epoch: AtomicU64::new(0),
            persisted_epoch: AtomicU64::new(0),
            sb_lock: Arc::new(LockTable::default()),
            rec_lock: Arc::new(LockTable::default()),
            bm: Mutex::new(BmState {
                words: vec![0; words],
                inflight: vec![0; regions as usize],
                seq: vec![0; regions as usize],
                dirty_pages: vec![false; pages],
                mem_gen: 0,
                disk_gen: 0,
            }),
            bm_lock: Arc::new(LockTable::default()),
            locks: Arc::new(LockTable::default()),
            ppl: Mutex::new(PplState::default()),
            ppl_lock: Arc::new(LockTable::default()),
            sync: Mutex::new(SyncState {
                pending: vec![false; regions as usize],
                ..SyncState::default()
            }),
            recover_pos: AtomicU64::new(0),
            mismatches: AtomicU64::new(0),
            rr: AtomicUsize::new(0),
            client_ios: AtomicU64::new(0),
            opener: Mutex::new(None),
            wake: (Mutex::new(false), Condvar::new()),
            stop: AtomicBool::new(false),
            limits,
        };
        let mut inner = inner;
        run_on_io_thread(|| inner.assemble())??;
        let inner = Arc::new(inner);
        let dev = RaidDevice {
            inner: inner.clone(),
            bg: Mutex::new(None),
        };
        if opts.background {
            let weak = Arc::downgrade(&inner);
            let h = std::thread::Builder::new()
                .name(format!("raid-sync {}", inner.name))
                .spawn(move || background_loop(weak))
                .map_err(|e| RaidError::Io(IoError::from(e)))?;
            *dev.bg.lock().unwrap_or_else(|e| e.into_inner()) = Some(h);
        }
        Ok(dev)
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

fn background_loop(weak: Weak<Inner>) {
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
                Geo::Mirror { .. } => inner.region_bytes,
            };
            let rate_pause = (unit * 1_000_000 / 1024).checked_div(inner.cfg.max_recovery_kib);
            let pause = match rate_pause {
                Some(us) => Duration::from_micros(us),
                None if inner.client_ios.load(Ordering::Relaxed) != ios_before => {
                    Duration::from_millis(1)
                }
                None => Duration::ZERO,
            };
            drop(inner);
            if !pause.is_zero() {
                std::thread::sleep(pause);
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

/// One piece of a mirror request: `len` bytes at array `off`, stored at `copies`.
struct MirrorPiece {
    off: u64,
    len: usize,
    copies: Vec<(usize, u64)>,
}

/// One piece of a parity read: within one chunk.
struct ParityPiece {
    stripe: u64,
    data_idx: usize,
    in_chunk: u64,
    len: usize,
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

    fn want_sb(&self, idx: usize) -> Superblock {
        let (level, layout) = self.cfg.level.codes();
        Superblock {
            uuid: self.uuid,
            leg_index: idx as u32,
            legs: self.n() as u32,
            level,
            layout,
            chunk_sectors: self.cfg.chunk.0,
            region_sectors: self.region_bytes / 512,
            leg_bytes: self.leg_bytes,
            events: self.events.load(Ordering::Acquire),
            failed_mask: self
                .legs
                .iter()
                .enumerate()
                .filter(|(_, l)| l.state() != LegState::InSync)
                .fold(0u64, |m, (i, _)| m | (1 << i)),
            clean: false,
            data_id: meta::data_id(&self.legs[idx].dev().name()),
        }
    }

    /// Reads the superblocks, decides which legs are trusted, loads the bitmap and picks the
    /// initial sync work; then writes fresh superblocks.
    async fn assemble(&mut self) -> Result<(), RaidError> {
        let n = self.n();
        let mut pending_all = false;
        let mut pending_from_bitmap = false;
        if !self.has_meta {
            self.uuid = meta::new_uuid();
            pending_all = self.cfg.sync != SyncMode::Skip;
        } else {
            let mut sbs = Vec::with_capacity(n);
            for (i, l) in self.legs.iter().enumerate() {
                let Some(m) = &l.meta else { continue };
                let mut b = vec![0u8; META_BLOCK];
                let r = match m.read(Bytes(0), &mut b).await {
                    Ok(()) => Superblock::decode(&b),
                    Err(e) => SbRead::Invalid(format!("unreadable: {e}")),
                };
                if let SbRead::Invalid(why) = &r {
                    *l.last_error.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(format!("leg {i} superblock: {why}"));
                }
                sbs.push(r);
            }
            let reference = sbs
                .iter()
                .filter_map(|s| match s {
                    SbRead::Valid(sb) => Some(sb.clone()),
                    _ => None,
                })
                .max_by_key(|sb| sb.events);
            match reference {
                None => {
                    if sbs.iter().any(|s| matches!(s, SbRead::Invalid(_))) {
                        let why: Vec<String> =
                            self.leg_errors_now().into_iter().flatten().collect();
                        return Err(RaidError::Metadata(format!(
                            "no leg holds a valid superblock and not all are blank: {}",
                            why.join("; ")
                        )));
                    }
                    // A new array.
                    self.uuid = meta::new_uuid();
                    pending_all = self.cfg.sync != SyncMode::Skip;
                }
                Some(r) => {
                    self.uuid = r.uuid;
                    let mut want = self.want_sb(r.leg_index as usize);
                    want.events = r.events;
                    want.failed_mask = r.failed_mask;
                    want.clean = r.clean;
                    meta::check_geometry(&r, &want)?;
                    self.events.store(r.events, Ordering::Release);
                    for (i, s) in sbs.iter().enumerate() {
                        let trusted = match s {
                            SbRead::Valid(sb) => {
                                sb.uuid == r.uuid
                                    && sb.leg_index as usize == i
                                    && sb.data_id == meta::data_id(&self.legs[i].dev().name())
                                    && r.failed_mask & (1 << i) == 0
                            }
                            _ => false,
                        };
                        if let SbRead::Valid(sb) = s {
                            if trusted && sb.events < r.events {
                                // Not marked failed by the newest superblock, so it missed no
                                // acknowledged write (failures are recorded before any write
                                // that skipped the leg completes); only the superblock round
                                // was cut short. Resync everything, never sourcing from it.
                                self.legs[i].stale.store(true, Ordering::Release);
                                *self.legs[i]
                                    .last_error
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner()) = Some(format!(
                                    "leg {i}: superblock events {} older than {}; full resync",
                                    sb.events, r.events
                                ));
                                pending_all = true;
                            }
                        }
                        if !trusted {
                            let why = match s {
                                SbRead::Valid(sb) if sb.uuid != r.uuid => format!(
                                    "belongs to array {} (not {})",
                                    meta::uuid_string(&sb.uuid),
                                    meta::uuid_string(&r.uuid)
                                ),
                                SbRead::Valid(sb) if sb.leg_index as usize != i => {
                                    format!("superblock says leg {}", sb.leg_index)
                                }
                                SbRead::Valid(sb)
                                    if sb.data_id != meta::data_id(&self.legs[i].dev().name()) =>
                                {
                                    format!(
                                        "metadata was written for another data device than {}",
                                        self.legs[i].dev().name()
                                    )
                                }
                                SbRead::Valid(sb) if sb.events != r.events => {
                                    format!("stale (events {} < {})", sb.events, r.events)
                                }
                                SbRead::Valid(_) => "marked failed/not in sync".into(),
                                SbRead::Blank => "blank metadata (new leg)".into(),
                                SbRead::Invalid(w) => w.clone(),
                            };
                            *self.legs[i]
                                .last_error
                                .lock()
                                .unwrap_or_else(|e| e.into_inner()) =
                                Some(format!("leg {i} not trusted: {why}; rebuilding"));
                            self.legs[i].set(LegState::Recovering);
                        }
                    }
                    // The bitmap: union over every trusted leg.
                    let pages = meta::bitmap_pages(self.regions);
                    let mut words = vec![0u64; (self.regions as usize).div_ceil(64)];
                    for l in self.legs.iter().filter(|l| l.state() == LegState::InSync) {
                        let Some(m) = &l.meta else { continue };
                        for p in 0..pages {
                            let mut b = vec![0u8; META_BLOCK];
                            let off = Bytes((1 + p) * META_BLOCK as u64);
                            if m.read(off, &mut b).await.is_err() {
                                b.fill(0xff);
                            }
                            meta::decode_bitmap_page(p, &b, &mut words);
                        }
                    }
                    self.bm_state().words = words;
                    pending_from_bitmap = true;
                    if self.cfg.sync == SyncMode::Force {
                        pending_all = true;
                    }
                }
            }
        }
        for &r in &self.cfg.rebuild {
            self.legs[r].set(LegState::Recovering);
        }
        self.check_assemblable().map_err(RaidError::Assemble)?;
        // A parity array that stopped while degraded: parity first follows the log.
        let log_covered = self.ppl_replay().await?;
        // Initial sync work.
        {
            let mut bm = self.bm.lock().unwrap_or_else(|e| e.into_inner());
            let mut st = self.sync.lock().unwrap_or_else(|e| e.into_inner());
            let mut from_bitmap = 0u64;
            for r in 0..self.regions as usize {
                let in_bitmap = pending_from_bitmap && bm.words[r / 64] >> (r % 64) & 1 == 1;
                from_bitmap += in_bitmap as u64;
                let dirty = pending_all || in_bitmap;
                if dirty {
                    st.pending[r] = true;
                    st.pending_count += 1;
                    bm.words[r / 64] |= 1 << (r % 64);
                }
            }
            for d in bm.dirty_pages.iter_mut() {
                *d = true;
            }
            bm.mem_gen += 1;
            let degraded = self.legs.iter().any(|l| l.state() != LegState::InSync);
            if matches!(self.geo, Geo::Parity { .. }) && degraded && !log_covered {
                st.dirty_degraded = from_bitmap;
            }
        }
        if self.has_meta {
            self.write_superblocks().await.map_err(RaidError::Io)?;
            let g = self.bm_state().mem_gen;
            self.persist_bitmap(g, true).await.map_err(RaidError::Io)?;
        }
        Ok(())
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

    /// Whether every piece of data still has a valid source.
    fn check_assemblable(&self) -> Result<(), String> {
        let bad: Vec<usize> = (0..self.n())
            .filter(|&i| self.legs[i].state() != LegState::InSync)
            .collect();
        let ok = match &self.geo {
            Geo::Mirror { copies, .. } => {
                let mut v = Vec::new();
                (0..(self.n() * copies) as u64).all(|c| {
                    self.copies_of_chunk(c, &mut v);
                    v.iter().any(|cp| !bad.contains(&cp.leg))
                })
            }
            Geo::Parity { .. } => bad.len() <= 1,
        };
        if ok {
            Ok(())
        } else {
            Err(format!(
                "{}: too many legs missing or not in sync ({:?}) to assemble {}: {}",
                self.name,
                bad,
                self.cfg.level.type_name(),
                self.leg_errors_now()
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join("; ")
            ))
        }
    }

    fn copies_of_chunk(&self, chunk: u64, out: &mut Vec<ChunkCopy>) {
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

    // ---------------------------------------------------------------- metadata writes

    /// Bumps the event counter and writes superblocks to every in-sync leg. A leg whose
    /// metadata write fails is failed too (and the others rewritten).
    async fn write_superblocks(&self) -> IoResult<()> {
        if !self.has_meta {
            return Ok(());
        }
        let _g = self.sb_lock.lock(0, true).await;
        for _ in 0..=self.n() {
            let epoch = self.fail_epoch.load(Ordering::Acquire);
            self.events.fetch_add(1, Ordering::AcqRel);
            let targets: Vec<usize> = (0..self.n())
                .filter(|&i| self.legs[i].state() == LegState::InSync)
                .collect();
            if targets.is_empty() {
                return Err(IoError::eio(format!(
                    "{}: no in-sync leg left to hold the superblock",
                    self.name
                )));
            }
            let clean = self.bm_state().words.iter().all(|&w| w == 0);
            let blocks: Vec<Vec<u8>> = targets
                .iter()
                .map(|&i| {
                    let mut sb = self.want_sb(i);
                    sb.clean = clean;
                    sb.encode()
                })
                .collect();
            let futs = targets.iter().zip(&blocks).map(|(&i, b)| async move {
                match &self.legs[i].meta {
                    Some(m) => (i, m.write(Bytes(0), b, WriteFlags::FUA).await),
                    None => (i, Ok(())),
                }
            });
            let mut failed = false;
            for (i, r) in join_all(futs).await {
                if let Err(e) = r {
                    self.mark_failed(i, &e.context("superblock write"));
                    failed = true;
                }
            }
            if !failed {
                self.persisted_epoch.fetch_max(epoch, Ordering::AcqRel);
                return Ok(());
            }
        }
        Err(IoError::eio(format!(
            "{}: superblock writes keep failing",
            self.name
        )))
    }

    /// Sets the failed state (memory only). Returns whether it changed.
    fn mark_failed(&self, i: usize, e: &IoError) -> bool {
        let prev = self.legs[i].state.swap(ST_FAILED, Ordering::AcqRel);
        if prev != ST_FAILED {
            self.fail_epoch.fetch_add(1, Ordering::AcqRel);
            *self.legs[i]
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(format!("{}", e));
            self.kick();
            true
        } else {
            false
        }
    }

    /// Fails leg `i` after an I/O error and records it in the surviving superblocks before
    /// the request that saw the error completes (so a restart never trusts the stale leg).
    async fn fail_leg(&self, i: usize, e: &IoError) {
        if self.mark_failed(i, e) {
            // If this fails there is no in-sync leg left; the caller's own checks report EIO.
            let _ = self.write_superblocks().await;
        }
    }

    /// Waits until every leg failure seen so far is in the superblocks (a write that skipped a
    /// failed leg must not complete before a restart would also skip it).
    async fn ensure_failures_persisted(&self) -> IoResult<()> {
        if !self.has_meta
            || self.persisted_epoch.load(Ordering::Acquire)
                >= self.fail_epoch.load(Ordering::Acquire)
        {
            return Ok(());
        }
        self.write_superblocks().await
    }

    /// Makes bitmap generation `gen` durable on every in-sync metadata device.
    async fn persist_bitmap(&self, gen: u64, fua: bool) -> IoResult<()> {
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
        let targets: Vec<usize> = (0..self.n())
            .filter(|&i| self.legs[i].state() == LegState::InSync)
            .collect();
        let futs = targets.iter().map(|&i| {
            let pages = &pages;
            async move {
                let Some(m) = &self.legs[i].meta else {
                    return (i, Ok(()));
                };
                for (p, b) in pages {
                    let off = Bytes((1 + p) * META_BLOCK as u64);
                    if let Err(e) = m.write(off, b, flags).await {
                        return (i, Err(e.context(format!("bitmap page {p}"))));
                    }
                }
                (i, Ok(()))
            }
        });
        let mut ok = 0;
        for (i, r) in join_all(futs).await {
            match r {
                Ok(()) => ok += 1,
                Err(e) => self.fail_leg(i, &e).await,
            }
        }
        if ok == 0 {
            // Put the pages back so a later persist retries them.
            let mut bm = self.bm_state();
            for (p, _) in &pages {
                bm.dirty_pages[*p as usize] = true;
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

    /// Marks regions `[first, last]` as being written: sets (and durably persists) their bits
    /// before any data moves.
    async fn start_write(&self, first: u64, last: u64) -> IoResult<()> {
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

    fn end_write(&self, first: u64, last: u64) {
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
    async fn flush_all(&self) -> IoResult<()> {
        let candidates: Vec<(usize, u32)> = if self.has_meta {
            let bm = self.bm_state();
            let st = self.sync_state();
            (0..self.regions as usize)
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

    // ---------------------------------------------------------------- mirror I/O

    fn mirror_pieces(&self, off: u64, len: u64) -> Vec<MirrorPiece> {
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

    fn region_of(&self, off: u64) -> u64 {
        off / self.region_bytes
    }

    /// Whether leg `i` holds valid data for mirror region `region`.
    fn mirror_valid(&self, i: usize, region: u64) -> bool {
        match self.legs[i].state() {
            LegState::InSync => true,
            LegState::Recovering => region < self.recover_pos.load(Ordering::Acquire),
            LegState::Failed => false,
        }
    }

    async fn mirror_read_piece(&self, p: &MirrorPiece, mut buf: Dst<'_>) -> IoResult<Served> {
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

    async fn mirror_read(&self, off: u64, buf: Dst<'_>) -> IoResult<Served> {
        let pieces = self.mirror_pieces(off, buf.len() as u64);
        let lens: Vec<usize> = pieces.iter().map(|p| p.len).collect();
        let bufs = buf.split(&lens);
        let futs = pieces
            .iter()
            .zip(bufs)
            .map(|(p, b)| self.mirror_read_piece(p, b));
        iort::try_join_all(futs.collect()).await.map(all_done)
    }

    async fn mirror_write(
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

    async fn mirror_write_locked(
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

    // ---------------------------------------------------------------- parity I/O

    fn parity_geo(&self) -> (crate::layout::Raid5Layout, u64) {
        match self.geo {
            Geo::Parity { layout, chunk } => (layout, chunk),
            // Not reached: parity paths are only taken for parity geometry.
            Geo::Mirror { .. } => (crate::layout::Raid5Layout::LeftSymmetric, 1),
        }
    }

    fn stripe_map(&self, stripe: u64) -> StripeMap {
        let (layout, _) = self.parity_geo();
        raid5_stripe(layout, self.n(), stripe)
    }

    fn stripe_region(&self, stripe: u64) -> u64 {
        let (_, chunk) = self.parity_geo();
        stripe * chunk / self.region_bytes
    }

    /// Whether leg `i` holds valid contents for `stripe`.
    fn parity_readable(&self, i: usize, stripe: u64) -> bool {
        match self.legs[i].state() {
            LegState::InSync => true,
            LegState::Recovering => stripe < self.recover_pos.load(Ordering::Acquire),
            LegState::Failed => false,
        }
    }

    fn missing_in_stripe(&self, stripe: u64) -> Vec<usize> {
        (0..self.n())
            .filter(|&i| !self.parity_readable(i, stripe))
            .collect()
    }

    async fn parity_read(&self, off: u64, buf: Dst<'_>) -> IoResult<Served> {
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

    async fn parity_read_piece(&self, p: &ParityPiece, mut buf: Dst<'_>) -> IoResult<Served> {
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
    async fn reconstruct(
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
            .map(|(&i, b)| async move { (i, self.legs[i].dev().read(Bytes(loff), b).await) });
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

    async fn parity_write(&self, off: u64, buf: &[u8], flags: WriteFlags) -> IoResult<()> {
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

    /// Writes `data` at byte `within` of `stripe`'s data, updating parity.
    async fn stripe_write(
        &self,
        stripe: u64,
        within: u64,
        data: &[u8],
        flags: WriteFlags,
    ) -> IoResult<()> {
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
        let plen = (phi - plo) as usize;
        let _g = self.locks.lock(stripe, true).await;
        self.client_ios.fetch_add(1, Ordering::Relaxed);

        // Plan and read; a read failure fails the leg and re-plans (at most once per leg).
        let parity = 'plan: loop {
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
                break 'plan None;
            }
            let data_missing: Option<usize> = (0..k).find(|&i| missing.contains(&map.data[i]));
            let full = |i: usize| matches!(w[i], Some((lo, hi, _)) if lo == plo && hi == phi);
            // Bytes each strategy reads.
            let rcw_reads: u64 = (0..k).filter(|&i| !full(i)).count() as u64 * plen as u64;
            let rmw_reads: u64 = w.iter().flatten().map(|x| x.1 - x.0).sum::<u64>() + plen as u64;
            let rcw_ok = data_missing.is_none_or(full);
            let rmw_ok = !parity_missing && data_missing.is_none_or(|f| w[f].is_none());
            let use_rmw = rmw_ok && (!rcw_ok || rmw_reads < rcw_reads);
            if use_rmw {
                // New P = old P ^ old D ^ new D over each written range.
                let mut p = Scratch::new(plen);
                let mut olds: Vec<(usize, Scratch)> = w
                    .iter()
                    .enumerate()
                    .filter_map(|(i, x)| x.map(|(lo, hi, _)| (i, Scratch::new((hi - lo) as usize))))
                    .collect();
                let pdev = self.legs[pleg].dev();
                let pread = async { (pleg, pdev.read(Bytes(base + plo), &mut p).await) };
                let dreads = olds.iter_mut().map(|(i, b)| {
                    let leg = map.data[*i];
                    let lo = w[*i].map(|x| x.0).unwrap_or(0);
                    async move { (leg, self.legs[leg].dev().read(Bytes(base + lo), b).await) }
                });
                let (pr, drs) = futures::future::join(pread, join_all(dreads)).await;
                if self.fail_reads(std::iter::once(pr).chain(drs)).await {
                    continue 'plan;
                }
                for (i, old) in &olds {
                    if let Some((lo, hi, doff)) = w[*i] {
                        let seg = &mut p[(lo - plo) as usize..(hi - plo) as usize];
                        xor_into(seg, old);
                        xor_into(seg, &data[doff..doff + (hi - lo) as usize]);
                    }
                }
                break 'plan Some(p);
            }
            if (0..k).all(full) {
                // Full-stripe write: parity straight from the caller's data; no reads, and no
                // per-chunk buffers to allocate, zero and copy into (the general path below
                // copies every chunk first).
                let srcs: Vec<&[u8]> = w
                    .iter()
                    .flatten()
                    .map(|&(lo, hi, doff)| &data[doff..doff + (hi - lo) as usize])
                    .collect();
                let mut p = Scratch::new(plen);
                xor_many(&mut p, &srcs);
                break 'plan Some(p);
            }
            // Reconstruct-write: assemble every data chunk's new contents over [plo, phi).
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
                        Some(b) => (pleg, pdev.read(Bytes(base + plo), b).await),
                    }
                };
                let dreads = cols
                    .iter_mut()
                    .enumerate()
                    .filter_map(|(i, b)| b.as_mut().map(|b| (i, b)))
                    .map(|(i, b)| {
                        let leg = map.data[i];
                        async move { (leg, self.legs[leg].dev().read(Bytes(base + plo), b).await) }
                    });
                let (pr, drs) = futures::future::join(pread, join_all(dreads)).await;
                if self.fail_reads(std::iter::once(pr).chain(drs)).await {
                    continue 'plan;
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
            break 'plan Some(p);
        };

        // While a leg is not in sync, the stripe's parity log entry is durable before any
        // data or parity moves (this closes the write hole of the degraded array).
        let _hold = match &parity {
            Some(p) => {
                self.ppl_begin(stripe, &map, &w, (plo, phi), p, data)
                    .await?
            }
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
        if let Some(p) = &parity {
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
    async fn fail_reads(&self, rs: impl Iterator<Item = (usize, IoResult<()>)>) -> bool {
        let mut any = false;
        for (i, r) in rs {
            if let Err(e) = r {
                self.fail_leg(i, &e.context(format!("leg {i} read"))).await;
                any = true;
            }
        }
        any
    }

    // ---------------------------------------------------------------- background work

    async fn sync_step(&self) -> IoResult<bool> {
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
                    let mut r = st.cursor;
                    if action == SyncAction::Resync {
                        while r < self.regions && !st.pending[r as usize] {
                            r += 1;
                        }
                        if r >= self.regions {
                            // Wrap: pending regions behind the cursor (set by a later `resync`).
                            r = (0..self.regions)
                                .find(|&x| st.pending[x as usize])
                                .unwrap_or(self.regions);
                        }
                    }
                    if r >= self.regions {
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

    fn recover_units(&self) -> u64 {
        match self.geo {
            Geo::Mirror { .. } => self.regions,
            Geo::Parity { chunk, .. } => self.leg_bytes / chunk,
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
                let pending = self.sync_state().pending[pos as usize];
                let mode = if pending {
                    SyncMode2::Fix
                } else {
                    SyncMode2::Recover
                };
                self.sync_region(pos, mode).await?;
                // sync_region advanced recover_pos under the region lock.
                if pending {
                    let mut st = self.sync_state();
                    if st.pending[pos as usize] {
                        st.pending[pos as usize] = false;
                        st.pending_count -= 1;
                    }
                }
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
                            if let Err(e) = self.legs[m]
                                .dev()
                                .write(Bytes(loff), &b, WriteFlags::default())
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

    /// Resync, check or repair one region; for mirrors in Recover mode, copies to the
    /// recovering legs only and advances the recovery position.
    async fn sync_region(&self, r: u64, mode: SyncMode2) -> IoResult<()> {
        match self.geo {
            Geo::Mirror { .. } => {
                let _g = self.locks.lock(r, true).await;
                let start = r * self.region_bytes;
                let end = ((r + 1) * self.region_bytes).min(self.size.0);
                if start < end {
                    for p in self.mirror_pieces(start, end - start) {
                        self.sync_mirror_piece(&p, r, mode).await?;
                    }
                }
                if mode != SyncMode2::Check
                    && self.legs.iter().any(|l| l.state() == LegState::Recovering)
                {
                    let cur = self.recover_pos.load(Ordering::Acquire);
                    if cur == r {
                        self.recover_pos.store(r + 1, Ordering::Release);
                    }
                }
                Ok(())
            }
            Geo::Parity { chunk, .. } => {
                let per_region = self.region_bytes / chunk;
                let stripes = self.leg_bytes / chunk;
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
            match self.legs[i].dev().read(Bytes(loff), &mut buf).await {
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
                    match self.legs[i].dev().read(Bytes(loff), &mut other).await {
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
                if let Err(e) = self.legs[i]
                    .dev()
                    .write(Bytes(loff), &buf, WriteFlags::default())
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
        let futs = bufs
            .iter_mut()
            .enumerate()
            .map(|(i, b)| async move { (i, self.legs[i].dev().read(Bytes(loff), b).await) });
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
            if let Err(e) = self.legs[pl]
                .dev()
                .write(Bytes(loff), &p, WriteFlags::default())
                .await
            {
                self.fail_leg(pl, &e.context(format!("leg {pl} parity write")))
                    .await;
            }
        }
        Ok(())
    }

    async fn replace_leg(&self, idx: usize, dev: Option<DeviceRef>) -> IoResult<()> {
        if idx >= self.n() {
            return Err(IoError::invalid(format!(
                "{}: no leg {idx} (0-based, {} legs)",
                self.name,
                self.n()
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
        if let Some(d) = dev {
            if d.size().0 < self.leg_bytes {
                if st == LegState::InSync {
                    self.legs[idx].set(LegState::InSync);
                }
                return Err(IoError::invalid(format!(
                    "{}: replacement for leg {idx} ({}) has {} bytes; needs {}",
                    self.name,
                    d.name(),
                    d.size().0,
                    self.leg_bytes
                )));
            }
            *self.legs[idx]
                .data
                .write()
                .unwrap_or_else(|e| e.into_inner()) = d;
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

    fn status_line(&self) -> String {
        let action = self.current_action();
        let health: String = self
            .legs
            .iter()
            .map(|l| match l.state() {
                LegState::Failed => 'D',
                LegState::Recovering => 'a',
                LegState::InSync if action == SyncAction::Resync => 'a',
                LegState::InSync => 'A',
            })
            .collect();
        let total = self.size.sectors_floor().0;
        let done = match action {
            SyncAction::Recover => {
                let units = self.recover_units().max(1);
                total * self.recover_pos.load(Ordering::Acquire).min(units) / units
            }
            SyncAction::Resync => {
                let st = self.sync_state();
                total - total * st.pending_count.min(self.regions) / self.regions
            }
            SyncAction::Check | SyncAction::Repair => {
                let st = self.sync_state();
                total * st.cursor.min(self.regions) / self.regions
            }
            _ => total,
        };
        let bitmap = if self.has_meta {
            let bm = self.bm_state();
            let dirty: u32 = bm.words.iter().map(|w| w.count_ones()).sum();
            format!("bitmap:{dirty}/{}", self.regions)
        } else {
            "bitmap:none(full-resync-on-start)".to_string()
        };
        let mut s = format!(
            "{} {} {} {}/{} {} {} 0 - {}",
            self.cfg.level.type_name(),
            self.n(),
            health,
            done,
            total,
            action.as_str(),
            self.mismatches.load(Ordering::Relaxed),
            bitmap
        );
        if self.has_meta && matches!(self.geo, Geo::Parity { .. }) {
            s.push_str(&self.ppl_status());
        }
        let st = self.sync_state();
        if let Some(why) = &st.stuck {
            s.push_str(&format!(" stuck:{}", why.replace(' ', "_")));
        }
        if st.dirty_degraded > 0 {
            s.push_str(&format!(
                " dirty_degraded_start:{}_regions",
                st.dirty_degraded
            ));
        }
        s
    }

    async fn handle_message(&self, args: &[String]) -> IoResult<String> {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        match a.as_slice() {
            ["check"] | ["repair"] => {
                let mut st = self.sync_state();
                st.frozen = false;
                st.cursor = 0;
                st.scrub = Some(if a[0] == "check" {
                    SyncAction::Check
                } else {
                    SyncAction::Repair
                });
                drop(st);
                self.mismatches.store(0, Ordering::Relaxed);
                self.kick();
                Ok(String::new())
            }
            ["idle"] => {
                let mut st = self.sync_state();
                st.frozen = false;
                st.scrub = None;
                drop(st);
                self.kick();
                Ok(String::new())
            }
            ["frozen"] => {
                self.sync_state().frozen = true;
                Ok(String::new())
            }
            ["resync"] => {
                {
                    let mut st = self.sync_state();
                    st.frozen = false;
                    for p in st.pending.iter_mut() {
                        *p = true;
                    }
                    st.pending_count = self.regions;
                }
                {
                    let mut bm = self.bm_state();
                    for w in bm.words.iter_mut() {
                        *w = u64::MAX;
                    }
                    for d in bm.dirty_pages.iter_mut() {
                        *d = true;
                    }
                    bm.mem_gen += 1;
                }
                let g = self.bm_state().mem_gen;
                self.persist_bitmap(g, true).await?;
                self.kick();
                Ok(String::new())
            }
            ["fail", idx] => {
                let i = parse_idx(idx, self.n())?;
                self.fail_leg(i, &IoError::eio("failed by message")).await;
                Ok(String::new())
            }
            ["rebuild", idx] => {
                let i = parse_idx(idx, self.n())?;
                self.replace_leg(i, None).await?;
                Ok(String::new())
            }
            ["rebuild", idx, dev] => {
                let i = parse_idx(idx, self.n())?;
                let opener = self
                    .opener
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                let Some(open) = opener else {
                    return Err(IoError::unsupported(format!(
                        "{}: this device has no opener for 'rebuild {idx} {dev}'; reload the \
                         table with 'rebuild {idx}' or call replace_leg",
                        self.name
                    )));
                };
                let d =
                    open(dev).map_err(|e| IoError::invalid(format!("rebuild {idx} {dev}: {e}")))?;
                self.replace_leg(i, Some(d)).await?;
                Ok(String::new())
            }
            _ => Err(IoError::invalid(format!(
                "{}: unknown message '{}' (check, repair, idle, frozen, resync, fail IDX, \
                 rebuild IDX [DEVICE])",
                self.name,
                args.join(" ")
            ))),
        }
    }
}

fn parse_idx(s: &str, n: usize) -> IoResult<usize> {
    match s.parse::<usize>() {
        Ok(i) if i < n => Ok(i),
        _ => Err(IoError::invalid(format!(
            "leg index '{s}' is not in 0..{n}"
        ))),
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

impl RaidDevice {
    /// A read into a registered buffer or a mapped copy (`read_fixed`, `copy_mapped`).
    async fn read_direct(&self, offset: Bytes, buf: Dst<'_>) -> IoResult<Served> {
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
    async fn write_direct(
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
    fn read<'a>(&'a self, offset: Bytes, buf: &'a mut [u8]) -> IoFuture<'a> {
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
    fn write<'a>(&'a self, offset: Bytes, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a> {
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
        Box::pin(self.read_direct(offset, Dst::Fixed(buf)))
    }
    fn write_fixed(&self, offset: Bytes, buf: FixedBuf, flags: WriteFlags) -> IoFuture<'_, Served> {
        Box::pin(self.write_direct(offset, Src::Fixed(buf), flags))
    }
    fn copy_mapped<'a>(
        &'a self,
        offset: Bytes,
        len: usize,
        write: Option<WriteFlags>,
        copy: MappedCopy<'a>,
    ) -> IoFuture<'a, Served> {
        let req = MappedReq { copy, at: 0, len };
        match write {
            Some(flags) => Box::pin(self.write_direct(offset, Src::Mapped(req), flags)),
            None => Box::pin(self.read_direct(offset, Dst::Mapped(req))),
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
