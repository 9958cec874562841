//! The receiving side: one primary at a time, for the one volume it was configured for.
//!
//! Each interval starts by rebuilding the copy volume from the last complete snapshot (O(1):
//! delete and snapshot again), so the bytes of an interval cut halfway never leak into the
//! next one; the blocks are written into the copy; on COMMIT, if the message count and the
//! checksum match what arrived, the copy is snapshotted, the pool committed, the state file
//! rewritten (temp + fsync + rename), the older snapshot released, and only then ACK sent.
//! Nothing is written before a valid HELLO for the configured volume and a BEGIN that
//! continues from the snapshot this side holds.

use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::server::ServerConfig;
use tables::io::{write_all_blocking, BlockDevice};
use tables::{Bytes, WriteFlags};
use thin::{Pool, ThinId, VBlock};

use crate::error::{ReplError, ReplResult};
use crate::proto::{recv, send, Msg, Payload};
use crate::state::{now_secs, Phase, State, Status};
use crate::tls::{accept, Link};
use crate::{lock, run_io};

/// What the secondary accepts and where it writes.
#[derive(Clone)]
pub struct SecondaryConfig {
    /// Volume uuid: a HELLO for any other volume is refused.
    pub volume: String,
    /// The pool holding the copy.
    pub pool: Arc<Pool>,
    /// Thin id of the copy volume (rebuilt every interval; do not use it elsewhere).
    pub copy: ThinId,
    /// Volume size: a BEGIN with another size is refused.
    pub size: Bytes,
    /// Two thin ids the complete snapshots alternate between.
    pub snap_ids: [ThinId; 2],
    /// The state file (last complete snapshot).
    pub state_path: std::path::PathBuf,
    /// TLS credentials; `None` only with `--insecure`.
    pub tls: Option<Arc<ServerConfig>>,
}

/// The secondary's engine.
pub struct Secondary {
    cfg: SecondaryConfig,
    status: Arc<Mutex<Status>>,
    stop: Arc<AtomicBool>,
    /// The connection being served, so [`Secondary::stop`] can cut it.
    conn: Mutex<Option<TcpStream>>,
    /// The last primary said BYE (it stopped replicating on purpose: demoted or stopped),
    /// and none has connected since.
    clean_end: AtomicBool,
}

impl Secondary {
    /// An engine for `cfg`.
    pub fn new(cfg: SecondaryConfig) -> ReplResult<Secondary> {
        let st = State::load(&cfg.state_path)?;
        let status = Status {
            role: "secondary".into(),
            volume: cfg.volume.clone(),
            last_synced_snapshot: st.snapshot,
            last_synced_time: st.taken_at,
            ..Status::default()
        };
        Ok(Secondary {
            cfg,
            status: Arc::new(Mutex::new(status)),
            stop: Arc::new(AtomicBool::new(false)),
            conn: Mutex::new(None),
            clean_end: AtomicBool::new(st.primary_said_bye),
        })
    }

    /// Whether the last primary stopped replicating on purpose (it said BYE: `demote` or
    /// `stop` there) and no primary is connected now. A primary that died or was cut off
    /// said nothing.
    pub fn primary_stopped(&self) -> bool {
        self.clean_end.load(Ordering::SeqCst)
    }

    /// Records whether the last primary said BYE, in memory and in the state file (a
    /// restarted secondary still knows; a failed write only costs `--force` later).
    fn set_clean_end(&self, said_bye: bool) {
        self.clean_end.store(said_bye, Ordering::SeqCst);
        let path = &self.cfg.state_path;
        match State::load(path) {
            Ok(mut st) if st.primary_said_bye != said_bye => {
                st.primary_said_bye = said_bye;
                if let Err(e) = st.save(path) {
                    log::warn!("replication of {}: {e}", self.cfg.volume);
                }
            }
            Ok(_) => {}
            Err(e) => log::warn!("replication of {}: {e}", self.cfg.volume),
        }
    }

    /// Makes the copy volume hold exactly the last complete snapshot (an interval cut
    /// halfway may have left part of itself in it) and commits; the copy is then the
    /// promoted volume. Call only after [`Secondary::stop`] and the end of
    /// [`Secondary::serve`]. Returns the snapshot id and when the primary took it.
    pub fn restore_copy(&self) -> ReplResult<Option<(u64, u64)>> {
        let st = self.load_state()?;
        let pool = &self.cfg.pool;
        let copy = self.cfg.copy;
        if st.snapshot == 0 {
            return Ok(None);
        }
        if pool.has_thin(copy)? {
            pool.delete(copy)?;
        }
        run_io(pool.create_snap(copy, ThinId(st.thin_id)))?;
        run_io(pool.commit())?;
        Ok(Some((st.snapshot, st.taken_at)))
    }

    /// The status now.
    pub fn status(&self) -> Status {
        lock(&self.status).current()
    }

    /// The last complete snapshot: (snapshot id, thin id in the pool), if any.
    pub fn latest(&self) -> ReplResult<Option<(u64, ThinId)>> {
        let st = self.load_state()?;
        Ok((st.snapshot != 0).then_some((st.snapshot, ThinId(st.thin_id))))
    }

    /// Makes [`Secondary::serve`] return: the connection being served is shut down (an
    /// interval in flight is abandoned; the last complete snapshot stays).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(c) = lock(&self.conn).as_ref() {
            // Best effort: the connection may be gone already.
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// Serves primaries on `listener`, one connection at a time, until stopped.
    pub fn serve(&self, listener: TcpListener) -> ReplResult<()> {
        listener.set_nonblocking(true).map_err(ReplError::Net)?;
        while !self.stop.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok((s, peer)) => {
                    s.set_nonblocking(false).map_err(ReplError::Net)?;
                    *lock(&self.conn) = Some(s.try_clone().map_err(ReplError::Net)?);
                    if self.stop.load(Ordering::SeqCst) {
                        break;
                    }
                    lock(&self.status).state = Phase::Replaying;
                    self.set_clean_end(false);
                    let r = accept(s, self.cfg.tls.as_ref()).and_then(|l| self.session(l));
                    *lock(&self.conn) = None;
                    let mut st = lock(&self.status);
                    match r {
                        Ok(said_bye) => {
                            st.state = Phase::Stopped;
                            drop(st);
                            self.set_clean_end(said_bye);
                        }
                        Err(e) => {
                            log::warn!("replication of {} from {peer}: {e}", self.cfg.volume);
                            st.state = Phase::Error;
                            st.last_error = Some(format!("{peer}: {e}"));
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(ReplError::Net(e)),
            }
        }
        lock(&self.status).state = Phase::Stopped;
        Ok(())
    }

    /// After a role swap this side was the primary: its state may hold, as pending, the
    /// snapshot whose ACK it never got. When the new primary names that snapshot as the
    /// last common one, it completed it, so it is common: take it as the base.
    fn adopt_pending(&self, st: &mut State, last_common: u64) -> ReplResult<()> {
        let raw = State::load(&self.cfg.state_path)?;
        let pending = ThinId(raw.pending_thin_id);
        if last_common == 0
            || last_common == st.snapshot
            || raw.volume != self.cfg.volume
            || raw.pending_snapshot != last_common
            || !self.cfg.snap_ids.contains(&pending)
            || !self.cfg.pool.has_thin(pending)?
        {
            return Ok(());
        }
        *st = State {
            volume: self.cfg.volume.clone(),
            snapshot: raw.pending_snapshot,
            thin_id: pending.0,
            taken_at: raw.pending_taken_at,
            ..State::default()
        };
        st.save(&self.cfg.state_path)
    }

    fn load_state(&self) -> ReplResult<State> {
        let mut st = State::load(&self.cfg.state_path)?;
        let known = self.cfg.snap_ids.contains(&ThinId(st.thin_id));
        if st.volume != self.cfg.volume || !known || !self.cfg.pool.has_thin(ThinId(st.thin_id))? {
            st = State {
                volume: self.cfg.volume.clone(),
                ..State::default()
            };
        }
        Ok(st)
    }

    /// One primary's connection; `Ok(true)` when it said BYE (stopped on purpose),
    /// `Ok(false)` when it just hung up between intervals.
    fn session(&self, mut link: Box<dyn Link>) -> ReplResult<bool> {
        let last_common = match recv(&mut link)?.0 {
            Msg::Hello {
                volume,
                last_common,
            } if volume == self.cfg.volume => last_common,
            Msg::Hello { volume, .. } => {
                let text = format!(
                    "this side replicates volume {}, not {volume}",
                    self.cfg.volume
                );
                // Best effort: the peer is told why before the connection goes.
                let _ = send(&mut link, &Msg::Error { text: text.clone() });
                return Err(ReplError::Peer(text));
            }
            m => return Err(ReplError::Protocol(format!("expected HELLO, got {m:?}"))),
        };
        let mut st = self.load_state()?;
        self.adopt_pending(&mut st, last_common)?;
        send(
            &mut link,
            &Msg::Ack {
                snapshot: st.snapshot,
            },
        )?;
        let pool = &self.cfg.pool;
        let dedup_block = if pool.takes_hash_refs() {
            pool.block_bytes().0
        } else {
            0
        };
        send(&mut link, &Msg::Caps { dedup_block })?;
        loop {
            let (snapshot, base, taken_at) = match recv(&mut link) {
                Ok((
                    Msg::Begin {
                        snapshot,
                        base,
                        volume_size,
                        taken_at,
                    },
                    _,
                )) => {
                    if base != 0 && base != st.snapshot {
                        return Err(ReplError::Peer(format!(
                            "BEGIN of snapshot {snapshot} from base {base}, this side holds {}",
                            st.snapshot
                        )));
                    }
                    if snapshot <= st.snapshot {
                        return Err(ReplError::Peer(format!(
                            "BEGIN of snapshot {snapshot}, not after {} held here",
                            st.snapshot
                        )));
                    }
                    if volume_size != self.cfg.size.0 {
                        return Err(ReplError::Peer(format!(
                            "volume size {volume_size}, this copy has {}",
                            self.cfg.size.0
                        )));
                    }
                    (snapshot, base, taken_at)
                }
                Ok((Msg::Ping, _)) => continue,
                Ok((Msg::Bye, _)) => return Ok(true),
                Ok((m, _)) => {
                    return Err(ReplError::Protocol(format!("expected BEGIN, got {m:?}")))
                }
                // The primary hung up between intervals.
                Err(ReplError::Net(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Ok(false)
                }
                Err(e) => return Err(e),
            };
            self.receive(&mut link, &mut st, snapshot, base, taken_at)?;
            send(&mut link, &Msg::Ack { snapshot })?;
        }
    }

    /// Takes in one interval's DATA, UNMAP and HASHES up to its COMMIT, writing them into
    /// the copy `dev`, and checks the COMMIT against what arrived. Returns (bytes received
    /// as DATA, bytes mapped from hashes).
    fn take_interval(
        &self,
        link: &mut Box<dyn Link>,
        dev: &dyn BlockDevice,
        snapshot: u64,
    ) -> ReplResult<(u64, u64)> {
        let (mut count, mut crc, mut received, mut referenced) = (0u64, 0u32, 0u64, 0u64);
        // DATA is written behind the link by a writer thread (WRITE_BATCH requests in
        // flight); everything else waits until what was queued before it is written.
        std::thread::scope(|sc| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<WriteJob>(WRITE_QUEUE);
            sc.spawn(move || write_behind(dev, rx));
            loop {
                let (m, frame) = recv(link)?;
                match m {
                    Msg::Data { offset, bytes } => {
                        self.in_volume(offset, bytes.len() as u64)?;
                        received += bytes.len() as u64;
                        tx.send(WriteJob::Data(offset, bytes))
                            .map_err(|_| ReplError::Io("the copy's writer stopped".into()))?;
                    }
                    Msg::Hashes { offset, hashes } => {
                        drain(&tx)?;
                        let held = self.map_hashes(offset, &hashes)?;
                        referenced += held.iter().filter(|h| **h).count() as u64
                            * self.cfg.pool.block_bytes().0;
                        send(link, &Msg::Have { offset, held })?;
                        link.flush().map_err(ReplError::Net)?;
                    }
                    Msg::Unmap { offset, len } => {
                        self.in_volume(offset, len)?;
                        drain(&tx)?;
                        run_io(dev.write_zeroes(Bytes(offset), Bytes(len), WriteFlags::default()))?;
                    }
                    Msg::Commit {
                        snapshot: s,
                        count: n,
                        checksum,
                    } => {
                        drain(&tx)?;
                        if s != snapshot || n != count || checksum != crc {
                            return Err(ReplError::Protocol(format!(
                                "COMMIT of snapshot {s} with {n} messages and checksum \
                                 {checksum:#010x}; received snapshot {snapshot}: {count} \
                                 messages, checksum {crc:#010x}"
                            )));
                        }
                        return Ok((received, referenced));
                    }
                    m => {
                        return Err(ReplError::Protocol(format!(
                            "expected DATA, UNMAP or COMMIT in snapshot {snapshot}, got {m:?}"
                        )))
                    }
                }
                crc = frame.chain(crc);
                count += 1;
            }
        })
    }

    /// Maps into the copy every block of a HASHES message at `offset` that the pool holds;
    /// one flag per hash.
    fn map_hashes(&self, offset: u64, hashes: &[[u64; 2]]) -> ReplResult<Vec<bool>> {
        let pool = &self.cfg.pool;
        let bs = pool.block_bytes().0;
        if !pool.takes_hash_refs() || !offset.is_multiple_of(bs) {
            return Err(ReplError::Protocol(format!(
                "HASHES at offset {offset}: this side takes no references in blocks of {bs} \
                 bytes there"
            )));
        }
        self.in_volume(offset, hashes.len() as u64 * bs)?;
        hashes
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let v = VBlock(offset / bs + i as u64);
                run_io(pool.map_by_hash(self.cfg.copy, v, h))
            })
            .collect()
    }

    /// `len` bytes at `offset` lie inside the volume.
    fn in_volume(&self, offset: u64, len: u64) -> ReplResult<()> {
        let size = self.cfg.size.0;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(ReplError::Protocol(format!(
                "{len} bytes at offset {offset}: past the end of the volume ({size} bytes)"
            ))),
        }
    }

    /// Rebuilds the copy from `base` (0: empty), takes in one interval, and on a valid
    /// COMMIT makes it the new complete snapshot.
    fn receive(
        &self,
        link: &mut Box<dyn Link>,
        st: &mut State,
        snapshot: u64,
        base: u64,
        taken_at: u64,
    ) -> ReplResult<()> {
        let pool = &self.cfg.pool;
        let copy = self.cfg.copy;
        if pool.has_thin(copy)? {
            pool.delete(copy)?;
        }
        if base == 0 {
            pool.create_thin(copy)?;
        } else {
            run_io(pool.create_snap(copy, ThinId(st.thin_id)))?;
        }
        let dev = pool.thin(copy, self.cfg.size, None)?;
        let started = Instant::now();
        let (received, referenced) = self.take_interval(link, &*dev, snapshot)?;
        drop(dev);
        let [a, b] = self.cfg.snap_ids;
        let id = if st.snapshot != 0 && ThinId(st.thin_id) == a {
            b
        } else {
            a
        };
        if pool.has_thin(id)? {
            pool.delete(id)?;
        }
        run_io(pool.create_snap(id, copy))?;
        run_io(pool.commit())?;
        let old = (st.snapshot != 0 && st.thin_id != id.0).then_some(ThinId(st.thin_id));
        *st = State {
            volume: self.cfg.volume.clone(),
            snapshot,
            thin_id: id.0,
            taken_at,
            ..State::default()
        };
        st.save(&self.cfg.state_path)?;
        if let Some(o) = old {
            pool.delete(o)?;
            run_io(pool.commit())?;
        }
        let mut s = lock(&self.status);
        s.last_synced_snapshot = snapshot;
        s.last_synced_time = taken_at.min(now_secs());
        s.bytes_shipped += received;
        s.bytes_referenced += referenced;
        s.throughput = (received as f64 / started.elapsed().as_secs_f64().max(1e-3)) as u64;
        s.intervals += 1;
        s.last_error = None;
        Ok(())
    }
}

/// DATA writes in flight on the copy at once.
const WRITE_BATCH: usize = 16;
/// DATA messages queued for the writer.
const WRITE_QUEUE: usize = 32;

/// Work for the copy's writer thread.
enum WriteJob {
    /// Write these bytes at this offset.
    Data(u64, Payload),
    /// Answer once everything queued before is written: the first write error, if any.
    Flush(std::sync::mpsc::SyncSender<ReplResult<()>>),
}

/// Waits until everything queued on `tx` is written; the first write error.
fn drain(tx: &std::sync::mpsc::SyncSender<WriteJob>) -> ReplResult<()> {
    let (ack, done) = std::sync::mpsc::sync_channel(1);
    let gone = || ReplError::Io("the copy's writer stopped".into());
    tx.send(WriteJob::Flush(ack)).map_err(|_| gone())?;
    done.recv().map_err(|_| gone())?
}

/// The writer thread: batches of up to [`WRITE_BATCH`] queued writes go to `dev` at once.
/// After a failed write the rest are dropped and every flush reports that failure (the
/// interval then fails before its snapshot). Ends when the queue's sender is gone.
fn write_behind(dev: &dyn BlockDevice, rx: std::sync::mpsc::Receiver<WriteJob>) {
    let mut failed: Option<String> = None;
    let mut next: Option<WriteJob> = None;
    loop {
        let job = match next.take() {
            Some(j) => j,
            None => match rx.recv() {
                Ok(j) => j,
                Err(_) => return,
            },
        };
        match job {
            WriteJob::Flush(ack) => {
                let _ = ack.send(match &failed {
                    None => Ok(()),
                    Some(e) => Err(ReplError::Io(e.clone())),
                });
            }
            WriteJob::Data(off, bytes) => {
                let mut batch = vec![(off, bytes)];
                while batch.len() < WRITE_BATCH {
                    match rx.try_recv() {
                        Ok(WriteJob::Data(o, b)) => batch.push((o, b)),
                        Ok(flush) => {
                            next = Some(flush);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                if failed.is_none() {
                    let reqs: Vec<(Bytes, &[u8])> =
                        batch.iter().map(|(o, b)| (Bytes(*o), &b[..])).collect();
                    if let Err(e) = write_all_blocking(dev, &reqs, WriteFlags::default()) {
                        failed = Some(e.to_string());
                    }
                }
            }
        }
    }
}
