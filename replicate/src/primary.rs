//! The sending side: every interval, a replication snapshot of the volume, the changed
//! blocks since the last acknowledged one (from the metadata walk), read from the new
//! snapshot (a consistent point in time) and shipped, then COMMIT; on ACK the older
//! snapshot is released and the new one recorded as the common point.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::client::ClientConfig;
use tables::io::read_all_blocking;
use tables::Bytes;
use thin::meta::DeltaKind;
use thin::{Pool, ThinId};

use crate::error::{ReplError, ReplResult};
use crate::proto::{recv, send, Msg, Payload, MAX_DATA};
use crate::state::{now_ms, now_secs, Phase, State, Status};
use crate::tls::{connect_watched, Link, IO_TIMEOUT};
use crate::{lock, run_io};

/// Between intervals the primary pings this often (well inside the link timeout).
const PING_EVERY: Duration = Duration::from_secs(2);

/// A call still blocked this long after a stop is cut.
const STOP_GRACE: Duration = Duration::from_millis(500);

/// What the primary replicates and where to.
#[derive(Clone)]
pub struct PrimaryConfig {
    /// Volume uuid (the secondary must be configured with the same).
    pub volume: String,
    /// The pool holding the volume.
    pub pool: Arc<Pool>,
    /// The volume's thin id.
    pub thin: ThinId,
    /// The volume's size.
    pub size: Bytes,
    /// Two thin ids the replication snapshots alternate between (at most two exist: the
    /// acknowledged one and the one in flight).
    pub snap_ids: [ThinId; 2],
    /// Time between snapshots.
    pub interval: Duration,
    /// The state file (last acknowledged snapshot).
    pub state_path: std::path::PathBuf,
    /// The secondary's `host:port`.
    pub peer: String,
    /// Name the secondary's certificate must carry.
    pub server_name: String,
    /// TLS credentials; `None` only with `--insecure`.
    pub tls: Option<Arc<ClientConfig>>,
    /// Most volume bytes per second shipped (`None`: as fast as the link goes).
    pub bwlimit: Option<u64>,
}

/// A replication snapshot taken but not yet acknowledged.
#[derive(Copy, Clone, Debug)]
struct Pending {
    snapshot: u64,
    thin: ThinId,
    taken_at: u64,
    /// When it was taken, in milliseconds since the epoch (for the lag; 0: unknown,
    /// after a restart).
    taken_ms: u64,
}

/// The primary's engine; [`Primary::run`] loops until [`Primary::stop`].
pub struct Primary {
    cfg: PrimaryConfig,
    status: Arc<Mutex<Status>>,
    stop: Arc<AtomicBool>,
    /// [`Primary::demote`] asked for one last interval before stopping.
    demote: AtomicBool,
    /// The snapshot the last interval of a demotion completed (0: none yet).
    demoted_at: AtomicU64,
}

impl Primary {
    /// An engine for `cfg` (nothing happens until [`Primary::run`]).
    pub fn new(cfg: PrimaryConfig) -> Primary {
        let status = Status {
            role: "primary".into(),
            volume: cfg.volume.clone(),
            ..Status::default()
        };
        Primary {
            cfg,
            status: Arc::new(Mutex::new(status)),
            stop: Arc::new(AtomicBool::new(false)),
            demote: AtomicBool::new(false),
            demoted_at: AtomicU64::new(0),
        }
    }

    /// Asks for one last interval at once (the volume's state now, which the caller has
    /// stopped writing to), after which [`Primary::run`] returns; see
    /// [`Primary::demoted_at`].
    pub fn demote(&self) {
        self.demote.store(true, Ordering::SeqCst);
    }

    /// The snapshot the final interval of a demotion made complete on the secondary, once
    /// it did.
    pub fn demoted_at(&self) -> Option<u64> {
        match self.demoted_at.load(Ordering::SeqCst) {
            0 => None,
            n => Some(n),
        }
    }

    /// The status now.
    pub fn status(&self) -> Status {
        lock(&self.status).current()
    }

    /// Asks [`Primary::run`] to return after the interval in flight.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Connects, ships intervals, reconnects after a failure (one interval later), until
    /// stopped. Each connection resumes from the last common snapshot.
    pub fn run(&self) {
        while !self.stop.load(Ordering::SeqCst) {
            if let Err(e) = self.session() {
                if self.stop.load(Ordering::SeqCst) {
                    // Cut short by stop(): not a failure of the link.
                    break;
                }
                log::warn!(
                    "replication of {} to {}: {e}",
                    self.cfg.volume,
                    self.cfg.peer
                );
                let mut s = lock(&self.status);
                s.state = Phase::Error;
                s.last_error = Some(e.to_string());
                drop(s);
                self.sleep(self.cfg.interval);
            }
        }
        lock(&self.status).state = Phase::Stopped;
    }

    /// Waits `d` between two intervals on an open link, with a PING every
    /// [`PING_EVERY`] so the secondary (and a dead link) are told apart from a long interval.
    fn idle(&self, link: &mut Box<dyn Link>, d: Duration) -> ReplResult<()> {
        let end = Instant::now() + d;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() || self.stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            let step = left.min(PING_EVERY);
            self.sleep(step);
            if self.demote.load(Ordering::SeqCst) {
                return Ok(());
            }
            if step == PING_EVERY {
                send(link, &Msg::Ping)?;
                link.flush().map_err(ReplError::Net)?;
            }
        }
    }

    /// Sleeps `d`, or less when stopped or asked to demote.
    fn sleep(&self, d: Duration) {
        let end = Instant::now() + d;
        while !self.stop.load(Ordering::SeqCst) && !self.demote.load(Ordering::SeqCst) {
            let now = Instant::now();
            if now >= end {
                break;
            }
            std::thread::sleep((end - now).min(Duration::from_millis(50)));
        }
    }

    /// The acknowledged state, with a snapshot that no longer exists (lost in a crash
    /// before its commit) treated as none; and the pending snapshot, if it still exists.
    fn load_state(&self) -> ReplResult<(State, Option<Pending>)> {
        let mut st = State::load(&self.cfg.state_path)?;
        let pool = &self.cfg.pool;
        let ours = st.volume == self.cfg.volume;
        let pending =
            if ours && st.pending_snapshot != 0 && pool.has_thin(ThinId(st.pending_thin_id))? {
                Some(Pending {
                    snapshot: st.pending_snapshot,
                    thin: ThinId(st.pending_thin_id),
                    taken_at: st.pending_taken_at,
                    taken_ms: 0,
                })
            } else {
                None
            };
        if !ours || !pool.has_thin(ThinId(st.thin_id))? {
            st = State {
                volume: self.cfg.volume.clone(),
                ..State::default()
            };
        }
        Ok((st, pending))
    }

    /// One connection, watched: cut when stopped, or when one read or write has been
    /// blocked for longer than the link timeout (a dead link or a stalled peer).
    fn session(&self) -> ReplResult<()> {
        let (link, watch) =
            connect_watched(&self.cfg.peer, &self.cfg.server_name, self.cfg.tls.as_ref())?;
        let done = AtomicBool::new(false);
        let stalled = AtomicBool::new(false);
        std::thread::scope(|sc| {
            sc.spawn(|| {
                while !done.load(Ordering::SeqCst) {
                    // Stopped: cut a call that is blocked (one that is not, such as the
                    // BYE going out, finishes first).
                    if self.stop.load(Ordering::SeqCst) && watch.stuck_for() > STOP_GRACE {
                        watch.cut();
                        return;
                    }
                    if watch.stuck_for() > IO_TIMEOUT {
                        stalled.store(true, Ordering::SeqCst);
                        watch.cut();
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
            let r = self.session_on(link);
            done.store(true, Ordering::SeqCst);
            match r {
                Err(ReplError::Net(e)) if stalled.load(Ordering::SeqCst) => {
                    Err(ReplError::Net(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no progress for {} s, link cut ({e})", IO_TIMEOUT.as_secs()),
                    )))
                }
                r => r,
            }
        })
    }

    /// Tells the secondary this side stops on purpose.
    fn bye(link: &mut Box<dyn Link>) -> ReplResult<()> {
        send(link, &Msg::Bye)?;
        link.flush().map_err(ReplError::Net)
    }

    /// HELLO, agree on the base, then one interval after another.
    fn session_on(&self, mut link: Box<dyn Link>) -> ReplResult<()> {
        let (mut st, pending) = self.load_state()?;
        send(
            &mut link,
            &Msg::Hello {
                volume: self.cfg.volume.clone(),
                last_common: st.snapshot,
            },
        )?;
        let theirs = match recv(&mut link)?.0 {
            Msg::Ack { snapshot } => snapshot,
            Msg::Error { text } => return Err(ReplError::Peer(text)),
            m => {
                return Err(ReplError::Protocol(format!(
                    "expected ACK to HELLO, got {m:?}"
                )))
            }
        };
        let refs = match recv(&mut link)?.0 {
            Msg::Caps { dedup_block } => self.hash_block_size(dedup_block),
            Msg::Error { text } => return Err(ReplError::Peer(text)),
            m => return Err(ReplError::Protocol(format!("expected CAPS, got {m:?}"))),
        };
        let mut base = if theirs != 0 && theirs == st.snapshot {
            Some(st.clone())
        } else if let Some(p) = pending.filter(|p| p.snapshot == theirs) {
            // The secondary completed the interval whose ACK was lost.
            Some(self.acknowledged(&mut st, p)?)
        } else {
            None
        };
        // Snapshot ids only grow, whatever either side held before.
        let mut next = st
            .snapshot
            .max(theirs)
            .max(pending.map_or(0, |p| p.snapshot));
        loop {
            let started = Instant::now();
            let last = self.demote.load(Ordering::SeqCst);
            next = next
                .checked_add(1)
                .ok_or_else(|| ReplError::Protocol("snapshot ids exhausted".into()))?;
            let p = self.take_snapshot(next, &mut st)?;
            let from = base.as_ref().map(|b| (b.snapshot, ThinId(b.thin_id)));
            self.ship(&mut link, p, from, refs)?;
            let acked = match recv(&mut link)?.0 {
                Msg::Ack { snapshot } if snapshot == p.snapshot => snapshot,
                Msg::Error { text } => return Err(ReplError::Peer(text)),
                m => {
                    return Err(ReplError::Protocol(format!(
                        "expected ACK of snapshot {}, got {m:?}",
                        p.snapshot
                    )))
                }
            };
            log::debug!("{}: snapshot {acked} acknowledged", self.cfg.volume);
            base = Some(self.acknowledged(&mut st, p)?);
            if last {
                self.demoted_at.store(p.snapshot, Ordering::SeqCst);
                self.stop.store(true, Ordering::SeqCst);
            }
            if self.stop.load(Ordering::SeqCst) {
                return Self::bye(&mut link);
            }
            self.idle(
                &mut link,
                self.cfg.interval.saturating_sub(started.elapsed()),
            )?;
            if self.stop.load(Ordering::SeqCst) {
                return Self::bye(&mut link);
            }
        }
    }

    /// Snapshot `seq` of the volume into the snapshot id not holding the acknowledged one
    /// (an unacknowledged leftover there is dropped first), committed before it is used.
    fn take_snapshot(&self, seq: u64, st: &mut State) -> ReplResult<Pending> {
        let [a, b] = self.cfg.snap_ids;
        let id = if st.snapshot != 0 && ThinId(st.thin_id) == a {
            b
        } else {
            a
        };
        let pool = &self.cfg.pool;
        if pool.has_thin(id)? {
            pool.delete(id)?;
        }
        run_io(pool.create_snap(id, self.cfg.thin))?;
        run_io(pool.commit())?;
        let p = Pending {
            snapshot: seq,
            thin: id,
            taken_at: now_secs(),
            taken_ms: now_ms(),
        };
        st.pending_snapshot = p.snapshot;
        st.pending_thin_id = p.thin.0;
        st.pending_taken_at = p.taken_at;
        st.save(&self.cfg.state_path)?;
        Ok(p)
    }

    /// Sends one interval: BEGIN, the changed blocks read from snapshot `p`, COMMIT.
    /// The block size to send hashes for, when the secondary takes references in blocks
    /// that tile this side's changed ranges and DATA chunks.
    fn hash_block_size(&self, dedup_block: u64) -> Option<u64> {
        let bs = self.cfg.pool.block_bytes().0;
        (dedup_block >= 512
            && bs.is_multiple_of(dedup_block)
            && (MAX_DATA as u64).is_multiple_of(dedup_block))
        .then_some(dedup_block)
    }

    /// Sends `buf` (volume bytes at `off`) as HASHES, then DATA for the blocks the
    /// secondary did not map from them. Returns (messages sent, bytes sent as DATA) and
    /// chains their frames into `crc`.
    fn ship_by_hash(
        &self,
        link: &mut Box<dyn Link>,
        off: u64,
        buf: &[u8],
        hb: u64,
        crc: &mut u32,
    ) -> ReplResult<(u64, u64)> {
        let hb = hb as usize;
        let hashes: Vec<[u64; 2]> = buf
            .chunks(hb)
            .map(|c| thin::dedup::hash(thin::dedup::HashKind::Blake3, c))
            .collect();
        let n = hashes.len();
        *crc = send(
            link,
            &Msg::Hashes {
                offset: off,
                hashes,
            },
        )?
        .chain(*crc);
        link.flush().map_err(ReplError::Net)?;
        let held = match recv(link)?.0 {
            Msg::Have { offset, held } if offset == off && held.len() == n => held,
            Msg::Error { text } => return Err(ReplError::Peer(text)),
            m => {
                return Err(ReplError::Protocol(format!(
                    "expected HAVE of {n} blocks at {off}, got {m:?}"
                )))
            }
        };
        let (mut msgs, mut sent) = (1u64, 0u64);
        let mut i = 0;
        while i < n {
            if held[i] {
                i += 1;
                continue;
            }
            let j = (i..n).find(|&k| held[k]).unwrap_or(n);
            let m = Msg::Data {
                offset: off + (i * hb) as u64,
                bytes: Payload::copy_of(&buf[i * hb..j * hb])?,
            };
            *crc = send(link, &m)?.chain(*crc);
            msgs += 1;
            sent += ((j - i) * hb) as u64;
            i = j;
        }
        let referenced = held.iter().filter(|h| **h).count() as u64 * hb as u64;
        lock(&self.status).bytes_referenced += referenced;
        Ok((msgs, sent))
    }

    fn ship(
        &self,
        link: &mut Box<dyn Link>,
        p: Pending,
        base: Option<(u64, ThinId)>,
        refs: Option<u64>,
    ) -> ReplResult<()> {
        let pool = &self.cfg.pool;
        let delta = pool.delta(base.map(|b| b.1), p.thin)?;
        let bs = pool.block_bytes().0;
        let size = self.cfg.size.0;
        // Byte ranges within the volume (the tree may map blocks past a shrunk size).
        let ranges: Vec<(u64, u64, DeltaKind)> = delta
            .ranges
            .iter()
            .filter_map(|r| {
                let start = r.start.checked_mul(bs)?.min(size);
                let end = r.start.checked_add(r.len)?.checked_mul(bs)?.min(size);
                (end > start).then_some((start, end - start, r.kind))
            })
            .collect();
        {
            let mut s = lock(&self.status);
            s.state = if base.is_some() {
                Phase::Replaying
            } else {
                Phase::Syncing
            };
            s.blocks_pending = delta.changed_blocks();
            s.bytes_pending = ranges
                .iter()
                .filter(|r| r.2 == DeltaKind::Changed)
                .map(|r| r.1)
                .sum();
        }
        send(
            link,
            &Msg::Begin {
                snapshot: p.snapshot,
                base: base.map_or(0, |b| b.0),
                volume_size: size,
                taken_at: p.taken_at,
            },
        )?;
        let started = Instant::now();
        let dev = pool.thin(p.thin, self.cfg.size, None)?;
        // What ships, in order: UNMAP ranges, and the changed ranges cut into DATA chunks.
        let mut pieces = Vec::new();
        for (start, len, kind) in ranges {
            if kind == DeltaKind::Unmapped {
                pieces.push(Piece::Unmap(start, len));
                continue;
            }
            let end = start + len;
            let mut off = start;
            while off < end {
                let n = (end - off).min(MAX_DATA as u64);
                pieces.push(Piece::Data(off, n as usize));
                off += n;
            }
        }
        let (mut count, mut crc, mut shipped) = (0u64, 0u32, 0u64);
        let mut pace = Pace::new(self.cfg.bwlimit);
        // A reader thread keeps READ_BATCH chunks in flight on the snapshot and READ_AHEAD
        // batches ahead of the link: the device's latency overlaps the sends.
        std::thread::scope(|sc| -> ReplResult<()> {
            // Both ends live in this closure: an early return drops `rx`, so a reader blocked
            // on a full channel ends and the scope's join cannot hang.
            let (tx, rx) = std::sync::mpsc::sync_channel(READ_AHEAD * READ_BATCH);
            let (reader_dev, reader_pieces, stop) = (&*dev, &pieces, &self.stop);
            sc.spawn(move || read_ahead(reader_dev, reader_pieces, stop, tx));
            for piece in &pieces {
                let (msgs, sent) = match *piece {
                    Piece::Unmap(offset, len) => {
                        crc = send(link, &Msg::Unmap { offset, len })?.chain(crc);
                        (1, 0)
                    }
                    Piece::Data(off, n) => {
                        if self.stop.load(Ordering::SeqCst) {
                            return Err(ReplError::Io(format!(
                                "stopped in the middle of snapshot {}",
                                p.snapshot
                            )));
                        }
                        let bytes = rx
                            .recv()
                            .map_err(|_| ReplError::Io("the snapshot's reader stopped".into()))??;
                        pace.take(n as u64);
                        let r = self.ship_chunk(link, off, bytes, refs, &mut crc)?;
                        let mut s = lock(&self.status);
                        s.bytes_shipped += r.1;
                        s.bytes_pending = s.bytes_pending.saturating_sub(n as u64);
                        s.blocks_pending = s.blocks_pending.saturating_sub(n as u64 / bs.max(1));
                        r
                    }
                };
                count += msgs;
                shipped += sent;
            }
            Ok(())
        })?;
        drop(dev);
        send(
            link,
            &Msg::Commit {
                snapshot: p.snapshot,
                count,
                checksum: crc,
            },
        )?;
        link.flush().map_err(ReplError::Net)?;
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        lock(&self.status).throughput = (shipped as f64 / secs) as u64;
        Ok(())
    }

    /// Sends `bytes` (volume bytes at `off`, read from the snapshot): as HASHES first when
    /// the secondary takes references in blocks that tile it, else as one DATA. Returns
    /// (messages sent, bytes sent as DATA) and chains their frames into `crc`.
    fn ship_chunk(
        &self,
        link: &mut Box<dyn Link>,
        off: u64,
        bytes: Payload,
        refs: Option<u64>,
        crc: &mut u32,
    ) -> ReplResult<(u64, u64)> {
        let n = bytes.len() as u64;
        match refs.filter(|hb| off.is_multiple_of(*hb) && n.is_multiple_of(*hb)) {
            Some(hb) => self.ship_by_hash(link, off, &bytes, hb, crc),
            None => {
                *crc = send(link, &Msg::Data { offset: off, bytes })?.chain(*crc);
                Ok((1, n))
            }
        }
    }

    /// `p` is complete on the secondary: record it, release the older snapshot.
    fn acknowledged(&self, st: &mut State, p: Pending) -> ReplResult<State> {
        let old = (st.snapshot != 0 && st.thin_id != p.thin.0).then_some(ThinId(st.thin_id));
        *st = State {
            volume: self.cfg.volume.clone(),
            snapshot: p.snapshot,
            thin_id: p.thin.0,
            taken_at: p.taken_at,
            ..State::default()
        };
        st.save(&self.cfg.state_path)?;
        if let Some(o) = old {
            if self.cfg.pool.has_thin(o)? {
                self.cfg.pool.delete(o)?;
            }
        }
        let mut s = lock(&self.status);
        // A first full copy is over once acknowledged.
        s.state = Phase::Replaying;
        s.last_synced_snapshot = p.snapshot;
        s.last_synced_time = p.taken_at;
        s.last_synced_ms = p.taken_ms;
        s.intervals += 1;
        s.bytes_pending = 0;
        s.blocks_pending = 0;
        s.last_error = None;
        Ok(st.clone())
    }
}

/// A bandwidth limit: [`Pace::take`] sleeps so the bytes taken since the start never run
/// ahead of the rate by more than a fraction of a second.
struct Pace {
    rate: Option<u64>,
    start: Instant,
    bytes: u64,
}

impl Pace {
    fn new(rate: Option<u64>) -> Pace {
        Pace {
            rate: rate.filter(|r| *r > 0),
            start: Instant::now(),
            bytes: 0,
        }
    }

    /// Accounts for `n` bytes about to go out, sleeping first if they would exceed the rate.
    fn take(&mut self, n: u64) {
        let Some(rate) = self.rate else { return };
        self.bytes += n;
        let due = Duration::from_secs_f64(self.bytes as f64 / rate as f64);
        let spent = self.start.elapsed();
        if due > spent {
            std::thread::sleep(due - spent);
        }
    }
}

/// Chunks of up to [`MAX_DATA`] bytes read at once from the snapshot (requests in flight).
const READ_BATCH: usize = 16;
/// Batches read ahead of the link.
const READ_AHEAD: usize = 2;

/// One thing to ship, in order.
enum Piece {
    /// UNMAP of `(offset, len)`.
    Unmap(u64, u64),
    /// DATA of `(offset, len)` read from the snapshot.
    Data(u64, usize),
}

/// Reads the DATA pieces of `pieces` from `dev` in batches of [`READ_BATCH`] concurrent
/// requests and sends their bytes to `tx` in order; ends at the first error (sent), a stop,
/// or when the receiver is gone.
fn read_ahead(
    dev: &dyn tables::io::BlockDevice,
    pieces: &[Piece],
    stop: &AtomicBool,
    tx: std::sync::mpsc::SyncSender<ReplResult<Payload>>,
) {
    let reads: Vec<(u64, usize)> = pieces
        .iter()
        .filter_map(|p| match *p {
            Piece::Data(off, n) => Some((off, n)),
            Piece::Unmap(..) => None,
        })
        .collect();
    for group in reads.chunks(READ_BATCH) {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let read = group
            .iter()
            .map(|&(_, n)| Payload::for_filling(n))
            .collect::<ReplResult<Vec<Payload>>>()
            .and_then(|mut bufs| {
                let mut reqs: Vec<(Bytes, &mut [u8])> = group
                    .iter()
                    .zip(bufs.iter_mut())
                    .map(|(&(o, _), b)| (Bytes(o), &mut b[..]))
                    .collect();
                read_all_blocking(dev, &mut reqs)?;
                Ok(bufs)
            });
        match read {
            Ok(bufs) => {
                for b in bufs {
                    if tx.send(Ok(b)).is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        }
    }
}

#[cfg(test)]
mod pace_tests {
    use super::*;

    #[test]
    fn a_limit_holds_the_rate_and_no_limit_never_waits() {
        let t = Instant::now();
        let mut p = Pace::new(Some(4 << 20));
        for _ in 0..8 {
            p.take(256 << 10);
        }
        // 2 MiB at 4 MiB/s: half a second.
        let e = t.elapsed();
        assert!(e >= Duration::from_millis(450), "{e:?}");
        let t = Instant::now();
        let mut p = Pace::new(None);
        for _ in 0..1000 {
            p.take(1 << 30);
        }
        assert!(t.elapsed() < Duration::from_millis(50));
    }
}
