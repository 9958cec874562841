//! Opening an array: sizing it from the table, reading every leg's superblock and deciding
//! which legs to trust, loading the write-intent bitmap and picking the initial sync work. An
//! array whose superblocks record a smaller size than the table's is assembled at that size
//! and then grown (`grow.rs`); a larger one is refused (no shrinking).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};

use tables::io::{DeviceRef, IoError, Limits};
use tables::Bytes;

use crate::geometry::{self, Recorded};
use crate::lock::LockTable;
use crate::meta::{self, SbRead, Superblock, META_BLOCK};
use crate::missing::MissingLeg;
use crate::parse::{Level, RaidConfig, SyncMode};
use crate::RaidError;

use super::sync::background_loop;
use super::{
    live, BmState, Geo, Inner, Leg, LegState, OpenOptions, Owner, PplState, RaidDevice, SyncState,
    ST_FAILED, ST_INSYNC,
};

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
        // The same checks `table check` runs, for configurations built in code.
        cfg.check()
            .map_err(|e| RaidError::Geometry(format!("table: {}", e.msg)))?;
        let sizing = geometry::sizing(&cfg, size).map_err(RaidError::Geometry)?;
        let (leg_bytes, region_bytes, regions) =
            (sizing.leg_bytes, sizing.region_bytes, sizing.regions);
        let c = sizing.chunk_bytes;
        let geo = match cfg.level {
            Level::Raid1 => Geo::Mirror {
                copies: n,
                chunk: 0,
                raid1: true,
            },
            Level::Raid10 { copies } => Geo::Mirror {
                copies,
                chunk: c,
                raid1: false,
            },
            Level::Raid5(layout) => Geo::Parity { layout, chunk: c },
        };
        // A leg given as `- -` has no device: it is failed from the start.
        let missing: Vec<bool> = cfg.legs.iter().map(|l| l.data.is_none()).collect();
        let legs: Vec<(Option<DeviceRef>, DeviceRef)> = legs
            .into_iter()
            .enumerate()
            .map(|(i, l)| match missing[i] {
                true => (None, Arc::new(MissingLeg::new(i)) as DeviceRef),
                false => l,
            })
            .collect();
        let has_meta = legs
            .iter()
            .zip(&missing)
            .all(|(l, &gone)| gone || l.0.is_some());
        let mut limits = Limits::default();
        for (i, (m, d)) in legs.iter().enumerate() {
            if missing[i] {
                continue;
            }
            if d.size().0 < leg_bytes {
                return Err(RaidError::Geometry(format!(
                    "leg {i} ({}) has {} bytes; this array needs {leg_bytes} per leg",
                    d.name(),
                    d.size().0
                )));
            }
            if let Some(m) = m {
                let need = sizing.meta_bytes;
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
            limits.io_opt = chunk.saturating_mul(n as u64 - 1).min(u32::MAX as u64) as u32;
        }
        let words = (regions as usize).div_ceil(64);
        let pages = meta::bitmap_pages(regions) as usize;
        let sync = cfg.sync;
        let inner = Inner {
            name,
            cfg,
            geo,
            size: AtomicU64::new(size.0),
            leg_bytes: AtomicU64::new(leg_bytes),
            regions: AtomicU64::new(regions),
            recorded: Mutex::new((leg_bytes, size.0)),
            region_bytes,
            legs: legs
                .into_iter()
                .zip(missing)
                .enumerate()
                .map(|(i, ((m, d), gone))| Leg {
                    data: RwLock::new(d),
                    meta: m,
                    state: AtomicU8::new(if gone { ST_FAILED } else { ST_INSYNC }),
                    stale: AtomicBool::new(false),
                    missing: AtomicBool::new(gone),
                    last_error: Mutex::new(
                        gone.then(|| format!("leg {i} is missing ('- -' in the table)")),
                    ),
                    failed_at_conn: Mutex::new(None),
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
            step_units: AtomicU64::new(0),
            mismatches: AtomicU64::new(0),
            rr: AtomicUsize::new(0),
            client_ios: AtomicU64::new(0),
            opener: Mutex::new(None),
            wake: (Mutex::new(false), Condvar::new()),
            stop: AtomicBool::new(false),
            limits,
            handles: Mutex::new(Vec::new()),
            grow_want: Mutex::new(None),
            grow_lock: Arc::new(LockTable::default()),
            grow_error: Mutex::new(None),
        };
        let mut inner = inner;
        // Building may run inside another runtime's task: assemble on a thread of its own.
        iort::run_on_io_thread(|| inner.assemble())
            .map_err(|e| RaidError::Io(IoError::eio(format!("raid assembly: {e}"))))??;
        let inner = Arc::new(inner);
        let owner = Arc::new(Owner {
            inner: inner.clone(),
            bg: Mutex::new(None),
        });
        if opts.background {
            let weak = Arc::downgrade(&inner);
            let h = std::thread::Builder::new()
                .name(format!("raid-sync {}", inner.name))
                .spawn(move || background_loop(weak))
                .map_err(|e| RaidError::Io(IoError::from(e)))?;
            *owner.bg.lock().unwrap_or_else(|e| e.into_inner()) = Some(h);
        }
        if inner.has_meta {
            // Only arrays with superblocks: their UUID is how a reload finds them.
            live::register(&owner);
        }
        Ok(RaidDevice::handle(owner, size, sync))
    }
}

/// The refusal of a table smaller than the array leg `leg`'s superblock records.
fn shrinking(leg: usize, size: u64, table: u64) -> RaidError {
    RaidError::Geometry(format!(
        "the array is {size} bytes (leg {leg}'s superblock) but the table asks for {table}: \
         shrinking a raid array is refused"
    ))
}

impl Inner {
    /// Reads the superblocks, decides which legs are trusted, loads the bitmap and picks the
    /// initial sync work; then writes fresh superblocks.
    async fn assemble(&mut self) -> Result<(), RaidError> {
        let n = self.n();
        let mut pending_all = false;
        let mut pending_from_bitmap = false;
        // The table's size when the superblocks record a smaller one.
        let mut grow_to = None;
        if !self.has_meta {
            self.uuid = meta::new_uuid();
            pending_all = self.cfg.sync != SyncMode::Skip;
        } else {
            // Per leg; `None` for a missing leg (`- -`), which has no metadata to read.
            let mut sbs = Vec::with_capacity(n);
            for (i, l) in self.legs.iter().enumerate() {
                let Some(m) = &l.meta else {
                    sbs.push(None);
                    continue;
                };
                let mut b = vec![0u8; META_BLOCK];
                // SAFETY: the buffer belongs to this future and the call is awaited in it:
                // completed, dropped first (waiting for the kernel), or leaked with it.
                let r = match unsafe { m.read(Bytes(0), &mut b) }.await {
                    Ok(()) => Superblock::decode(&b),
                    Err(e) => SbRead::Invalid(format!("unreadable: {e}")),
                };
                if let SbRead::Invalid(why) = &r {
                    *l.last_error.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(format!("leg {i} superblock: {why}"));
                }
                sbs.push(Some(r));
            }
            // Screen every superblock whose checksums hold before trusting anything it says:
            // a field no real array writes (a forged or colliding block) makes that leg's
            // metadata unusable, that leg alone. Only a superblock that fits this leg and the
            // table's geometry can be the reference.
            let table = self.want_sb(0);
            let table_size = Bytes(self.size());
            // Usable superblocks with the size each records.
            let mut usable: Vec<Option<(&Superblock, Recorded)>> = vec![None; n];
            let mut bad: Vec<Option<String>> = vec![None; n];
            let mut mismatched: Vec<&Superblock> = Vec::new();
            // Legs whose superblock records a larger array than the table's.
            let mut larger: Vec<(usize, u64, &Superblock)> = Vec::new();
            for (i, s) in sbs.iter().enumerate() {
                let Some(SbRead::Valid(sb)) = s else { continue };
                if let Some(p) = sb.problem(i, n) {
                    bad[i] = Some(p);
                } else if let Err(e) = meta::check_geometry(sb, &table) {
                    bad[i] = Some(e.to_string());
                    mismatched.push(sb);
                } else {
                    match geometry::recorded_size(
                        &self.cfg,
                        sb.leg_bytes,
                        sb.array_bytes,
                        table_size,
                    ) {
                        Err(why) => bad[i] = Some(format!("size: {why}")),
                        Ok(r) if r.size > table_size.0 => {
                            bad[i] = Some(format!(
                                "records an array of {} bytes, larger than the table's {}",
                                r.size, table_size.0
                            ));
                            larger.push((i, r.size, sb));
                        }
                        Ok(r) => usable[i] = Some((sb, r)),
                    }
                }
                if let Some(p) = &bad[i] {
                    *self.legs[i]
                        .last_error
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) =
                        Some(format!("leg {i} superblock: {p}"));
                }
            }
            // The array is the UUID most usable legs carry (a leg of another array cannot
            // outvote the others); its newest superblock is the reference.
            let reference = {
                let cands: Vec<(&Superblock, Recorded)> =
                    usable.iter().flatten().copied().collect();
                let votes = |u: &[u8; 16]| cands.iter().filter(|(s, _)| &s.uuid == u).count();
                cands
                    .iter()
                    .max_by_key(|(s, r)| (votes(&s.uuid), s.events, r.size))
                    .map(|(s, r)| ((*s).clone(), *r))
            };
            match reference {
                None => {
                    // No shrinking: an array that is larger than the table stays unassembled.
                    if let Some(&(i, size, _)) = larger.iter().max_by_key(|x| x.1) {
                        return Err(shrinking(i, size, table_size.0));
                    }
                    // Every leg with a superblock disagrees with the table: the table is wrong
                    // (or the metadata belongs elsewhere); say how.
                    if let Some(sb) = mismatched.iter().max_by_key(|s| s.events) {
                        meta::check_geometry(sb, &table)?;
                    }
                    if bad.iter().any(Option::is_some)
                        || sbs
                            .iter()
                            .flatten()
                            .any(|s| matches!(s, SbRead::Invalid(_)))
                    {
                        let why: Vec<String> =
                            self.leg_errors_now().into_iter().flatten().collect();
                        return Err(RaidError::Metadata(format!(
                            "no leg holds a usable superblock and not all are blank: {}",
                            why.join("; ")
                        )));
                    }
                    // A new array.
                    self.uuid = meta::new_uuid();
                    pending_all = self.cfg.sync != SyncMode::Skip;
                }
                Some((r, rec)) => {
                    // A newer superblock of this array records a larger size (the table
                    // predates a grow whose superblock round a cut interrupted): a shrink.
                    if let Some(&(i, size, _)) = larger
                        .iter()
                        .find(|(_, _, sb)| sb.uuid == r.uuid && sb.events > r.events)
                    {
                        return Err(shrinking(i, size, table_size.0));
                    }
                    self.uuid = r.uuid;
                    self.events.store(r.events, Ordering::Release);
                    if rec.size < table_size.0 {
                        // Assembled as the superblocks have it; grown to the table at the end.
                        grow_to = Some(table_size.0);
                        self.set_recorded_dims(rec.size)?;
                    }
                    if rec.full_resync {
                        pending_all = true;
                    }
                    for (i, s) in sbs.iter().enumerate() {
                        let Some(s) = s else { continue };
                        let trusted = usable[i].is_some_and(|(sb, _)| {
                            sb.uuid == r.uuid
                                && sb.data_id == meta::data_id(&self.legs[i].dev().name())
                                && r.failed_mask & (1 << i) == 0
                        });
                        if let (true, Some((sb, srec))) = (trusted, usable[i]) {
                            // A leg recording another size than the newest superblock missed
                            // the grow's superblock round, which bumped the event count.
                            if sb.events < r.events || srec.size != rec.size {
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
                            let why = match (s, &bad[i]) {
                                (_, Some(p)) => p.clone(),
                                (SbRead::Valid(sb), _) if sb.uuid != r.uuid => format!(
                                    "belongs to array {} (not {})",
                                    meta::uuid_string(&sb.uuid),
                                    meta::uuid_string(&r.uuid)
                                ),
                                (SbRead::Valid(sb), _)
                                    if sb.data_id != meta::data_id(&self.legs[i].dev().name()) =>
                                {
                                    format!(
                                        "metadata was written for another data device than {}",
                                        self.legs[i].dev().name()
                                    )
                                }
                                (SbRead::Valid(sb), _) if sb.events != r.events => format!(
                                    "stale (events {} < {} in leg {}'s superblock)",
                                    sb.events, r.events, r.leg_index
                                ),
                                (SbRead::Valid(_), _) => format!(
                                    "marked failed/not in sync in the failed-legs mask of leg \
                                     {}'s superblock",
                                    r.leg_index
                                ),
                                (SbRead::Blank, _) => "blank metadata (new leg)".into(),
                                (SbRead::Invalid(w), _) => w.clone(),
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
                    let regions = self.regions();
                    let pages = meta::bitmap_pages(regions);
                    let mut words = vec![0u64; (regions as usize).div_ceil(64)];
                    for l in self.legs.iter().filter(|l| l.state() == LegState::InSync) {
                        let Some(m) = &l.meta else { continue };
                        for p in 0..pages {
                            let mut b = vec![0u8; META_BLOCK];
                            let off = Bytes((1 + p) * META_BLOCK as u64);
                            // SAFETY: the buffer belongs to this future and the call is awaited in
                            // it: completed, dropped first (waiting for the kernel), or leaked with
                            // it.
                            if unsafe { m.read(off, &mut b) }.await.is_err() {
                                b.fill(0xff);
                            }
                            meta::decode_bitmap_page(p, &b, &mut words);
                        }
                    }
                    // A page may carry bits past the last region (a forged page): they name
                    // no region, and would keep the bitmap from ever reading clean.
                    if let (Some(w), tail @ 1..) = (words.last_mut(), regions % 64) {
                        *w &= (1u64 << tail) - 1;
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
        let log = self.ppl_scan().await;
        self.check_assemblable().map_err(RaidError::Assemble)?;
        // A parity array that stopped while degraded: parity first follows the log.
        let log_covered = self.ppl_replay(log).await?;
        // Initial sync work.
        {
            let mut bm = self.bm.lock().unwrap_or_else(|e| e.into_inner());
            let mut st = self.sync.lock().unwrap_or_else(|e| e.into_inner());
            let mut from_bitmap = 0u64;
            for r in 0..self.regions() as usize {
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
        if let Some(size) = grow_to {
            let old = self.size();
            self.grow_plan(size).map_err(|why| {
                RaidError::Geometry(format!(
                    "the array cannot grow from {old} to {size} bytes: {why}"
                ))
            })?;
            self.ensure_size(size, self.cfg.sync)
                .await
                .map_err(RaidError::Io)?;
        }
        Ok(())
    }

    /// Before anything is loaded, sets the sizes to those of an array of `size` bytes (what
    /// its superblocks record, smaller than the table's) and trims the bitmap and sync state
    /// to its regions.
    fn set_recorded_dims(&mut self, size: u64) -> Result<(), RaidError> {
        let s = geometry::sizing(&self.cfg, Bytes(size))
            .map_err(|e| RaidError::Geometry(format!("recorded size {size} bytes: {e}")))?;
        let regions = s.regions as usize;
        {
            let bm = self.bm.get_mut().unwrap_or_else(|e| e.into_inner());
            bm.words.truncate(regions.div_ceil(64));
            bm.inflight.truncate(regions);
            bm.seq.truncate(regions);
            bm.dirty_pages
                .truncate(meta::bitmap_pages(s.regions) as usize);
        }
        self.sync
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .pending
            .truncate(regions);
        *self.recorded.get_mut().unwrap_or_else(|e| e.into_inner()) = (s.leg_bytes, size);
        *self.size.get_mut() = size;
        *self.leg_bytes.get_mut() = s.leg_bytes;
        *self.regions.get_mut() = s.regions;
        Ok(())
    }

    /// Whether every piece of data still has a valid source.
    pub(super) fn check_assemblable(&self) -> Result<(), String> {
        let bad: Vec<usize> = (0..self.n())
            .filter(|&i| self.legs[i].state() != LegState::InSync)
            .collect();
        if self.cfg.level.tolerates(self.n(), |i| bad.contains(&i)) {
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
}
