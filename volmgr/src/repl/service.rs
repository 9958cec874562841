//! The daemon side of `volmgr repl`: the replication engines (one thread per replicated
//! volume, holding the volume's pool), their recorded configuration, and the verbs the CLI
//! sends as [`Request::Service`](ublk_target::control::Request::Service) words.
//!
//! The words: `start JSON` (a [`ReplConfig`]), `stop VOLUME`, `status`, `promote VOLUME
//! [force]`, `demote VOLUME SECONDS`, `remove VOLUME`.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use replicate::{Phase, Primary, PrimaryConfig, Secondary, SecondaryConfig, State, Status};
use serde::Serialize;
use tables::Bytes;
use thin::{Pool, ThinId};
use ublk_target::daemon::{Daemon, Service};

use super::config::{self, valid_volume, ReplConfig, Role};

/// dm-thin device ids are 24-bit; replication snapshots are taken from the top down, far
/// from the ids LVM hands out from 1 upwards.
const MAX_THIN_ID: u32 = (1 << 24) - 1;

enum Engine {
    Primary(Arc<Primary>),
    Secondary(Arc<Secondary>),
}

struct Running {
    engine: Engine,
    thread: JoinHandle<()>,
}

impl Running {
    fn status(&self) -> Status {
        match &self.engine {
            Engine::Primary(p) => p.status(),
            Engine::Secondary(s) => s.status(),
        }
    }

    /// Stops the engine and waits for its thread (bounded: a primary checks its stop flag
    /// between two data messages; a secondary's connection is shut down).
    fn stop(self) {
        match &self.engine {
            Engine::Primary(p) => p.stop(),
            Engine::Secondary(s) => s.stop(),
        }
        if self.thread.join().is_err() {
            log::error!("a replication thread panicked while stopping");
        }
    }
}

#[derive(Default)]
struct Inner {
    configs: BTreeMap<String, ReplConfig>,
    running: BTreeMap<String, Running>,
    /// Why a volume recorded as running could not start (its pool not active...).
    failed: BTreeMap<String, String>,
}

/// The replication service (`repl`).
pub struct ReplService {
    dir: PathBuf,
    inner: Mutex<Inner>,
}

/// One volume in `repl status --json`.
#[derive(Serialize)]
struct VolumeStatus {
    #[serde(flatten)]
    status: Status,
    pool: String,
    thin: u32,
    peer: Option<String>,
    listen: Option<String>,
    interval_ms: u64,
    bwlimit: Option<u64>,
    running: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ReplService {
    /// The service of the daemon whose state directory is `state_dir` (its records live in
    /// `state_dir/replication`).
    pub fn open(state_dir: &std::path::Path) -> Result<ReplService, String> {
        let dir = state_dir.join("replication");
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let configs = config::load(&dir.join("volumes.json"))?;
        Ok(ReplService {
            dir,
            inner: Mutex::new(Inner {
                configs,
                ..Inner::default()
            }),
        })
    }

    /// Starts every volume recorded as running (after the daemon restored its devices);
    /// returns what could not start.
    pub fn resume(&self, d: &Daemon) -> Vec<String> {
        let todo: Vec<ReplConfig> = lock(&self.inner)
            .configs
            .values()
            .filter(|c| c.running)
            .cloned()
            .collect();
        let mut problems = Vec::new();
        for c in todo {
            if let Err(e) = self.launch(d, &c) {
                let why = format!("replication of {}: {e}", c.volume);
                lock(&self.inner)
                    .failed
                    .insert(c.volume.clone(), why.clone());
                problems.push(why);
            }
        }
        problems
    }

    fn save(&self, inner: &Inner) -> Result<(), String> {
        config::save(&self.dir.join("volumes.json"), &inner.configs)
    }

    fn pool_of(d: &Daemon, name: &str) -> Result<Arc<Pool>, String> {
        let dev = d
            .device(name)
            .ok_or_else(|| format!("no active device named '{name}'"))?;
        thin::target::find_pool(&dev).ok_or_else(|| format!("{name} is not a thin-pool device"))
    }

    /// The device whose table maps thin `id` of `pool`, if one does.
    fn thin_user(d: &Daemon, pool: &str, id: u32) -> Option<String> {
        let id = id.to_string();
        d.tables().into_iter().find_map(|(name, table)| {
            table
                .lines()
                .any(|l| {
                    let w: Vec<&str> = l.split_whitespace().collect();
                    w.len() >= 5
                        && w[2] == "thin"
                        && (w[3] == pool || w[3].strip_prefix("/dev/volmgr/") == Some(pool))
                        && w[4] == id
                })
                .then_some(name)
        })
    }

    /// Two thin ids free in `pool` and in no other record, from the top of the id space.
    fn free_snap_ids(inner: &Inner, pool: &Pool, pool_name: &str) -> Result<[u32; 2], String> {
        let used: Vec<u32> = pool
            .devices()
            .map_err(|e| format!("{pool_name}: {e}"))?
            .into_iter()
            .map(|(id, _)| id.0)
            .chain(
                inner
                    .configs
                    .values()
                    .filter(|c| c.pool == pool_name)
                    .flat_map(|c| [c.thin, c.snap_ids[0], c.snap_ids[1]]),
            )
            .collect();
        let mut free = (1..=MAX_THIN_ID).rev().filter(|i| !used.contains(i));
        match (free.next(), free.next()) {
            (Some(a), Some(b)) => Ok([a, b]),
            _ => Err(format!("{pool_name} has no two free thin ids left")),
        }
    }

    /// Builds and starts the engine of `c` (already recorded).
    fn launch(&self, d: &Daemon, c: &ReplConfig) -> Result<(), String> {
        let pool = Self::pool_of(d, &c.pool)?;
        let state_path = config::state_path(&self.dir, &c.volume);
        let snap_ids = [ThinId(c.snap_ids[0]), ThinId(c.snap_ids[1])];
        let running = match c.role {
            Role::Primary => {
                let peer = c
                    .peer
                    .clone()
                    .ok_or("a primary needs the secondary's address (--peer)")?;
                if !pool.has_thin(ThinId(c.thin)).map_err(|e| e.to_string())? {
                    return Err(format!("{} has no thin device {}", c.pool, c.thin));
                }
                let tls = match (&c.tls_dir, c.insecure) {
                    (Some(dir), _) => {
                        Some(replicate::tls::client_config(dir).map_err(|e| e.to_string())?)
                    }
                    (None, true) => None,
                    (None, false) => return Err("give --tls-dir, or --insecure".into()),
                };
                let server_name = c.server_name.clone().unwrap_or_else(|| {
                    peer.rsplit_once(':')
                        .map_or(peer.as_str(), |(h, _)| h)
                        .trim_matches(['[', ']'])
                        .to_string()
                });
                let p = Arc::new(Primary::new(PrimaryConfig {
                    volume: c.volume.clone(),
                    pool,
                    thin: ThinId(c.thin),
                    size: Bytes(c.size),
                    snap_ids,
                    interval: Duration::from_millis(c.interval_ms.max(100)),
                    state_path,
                    peer,
                    server_name,
                    tls,
                    bwlimit: c.bwlimit,
                }));
                let p2 = p.clone();
                let thread = std::thread::Builder::new()
                    .name(format!("repl-{}", c.volume))
                    .spawn(move || p2.run())
                    .map_err(|e| format!("starting a thread: {e}"))?;
                Running {
                    engine: Engine::Primary(p),
                    thread,
                }
            }
            Role::Secondary => {
                let listen = c
                    .listen
                    .clone()
                    .ok_or("a secondary needs an address to listen on (--listen)")?;
                if let Some(user) = Self::thin_user(d, &c.pool, c.thin) {
                    return Err(format!(
                        "thin {} of {} is active as device {user}: the copy is rewritten every \
                         interval, remove that device first",
                        c.thin, c.pool
                    ));
                }
                let tls = match (&c.tls_dir, c.insecure) {
                    (Some(dir), _) => {
                        Some(replicate::tls::server_config(dir).map_err(|e| e.to_string())?)
                    }
                    (None, true) => None,
                    (None, false) => return Err("give --tls-dir, or --insecure".into()),
                };
                let listener = TcpListener::bind(&listen)
                    .map_err(|e| format!("listening on {listen}: {e}"))?;
                let s = Arc::new(
                    Secondary::new(SecondaryConfig {
                        volume: c.volume.clone(),
                        pool,
                        copy: ThinId(c.thin),
                        size: Bytes(c.size),
                        snap_ids,
                        state_path,
                        tls,
                    })
                    .map_err(|e| e.to_string())?,
                );
                let s2 = s.clone();
                let volume = c.volume.clone();
                let thread = std::thread::Builder::new()
                    .name(format!("repl-{}", c.volume))
                    .spawn(move || {
                        if let Err(e) = s2.serve(listener) {
                            log::error!("replication of {volume}: the listener failed: {e}");
                        }
                    })
                    .map_err(|e| format!("starting a thread: {e}"))?;
                Running {
                    engine: Engine::Secondary(s),
                    thread,
                }
            }
        };
        let mut inner = lock(&self.inner);
        inner.failed.remove(&c.volume);
        inner.running.insert(c.volume.clone(), running);
        Ok(())
    }

    fn start(&self, d: &Daemon, json: &str) -> Result<String, String> {
        let mut c: ReplConfig =
            serde_json::from_str(json).map_err(|e| format!("bad start request: {e}"))?;
        if !valid_volume(&c.volume) {
            return Err(format!(
                "volume name '{}': use letters, digits and -_.+",
                c.volume
            ));
        }
        if c.size == 0 {
            return Err(format!("{}: the volume size is 0", c.volume));
        }
        let pool = Self::pool_of(d, &c.pool)?;
        let block = pool.block_bytes().0;
        if !c.size.is_multiple_of(block) {
            return Err(format!(
                "{}: size {} is not a multiple of {}'s block size ({block} bytes)",
                c.volume, c.size, c.pool
            ));
        }
        {
            let mut inner = lock(&self.inner);
            if inner.running.contains_key(&c.volume) {
                return Err(format!(
                    "{} is already replicating here: `volmgr repl stop {}` first",
                    c.volume, c.volume
                ));
            }
            // A volume known before (stopped, demoted or promoted) keeps its snapshot ids:
            // the last common snapshot is in one of them.
            match inner.configs.get(&c.volume) {
                Some(old) if old.pool == c.pool && old.thin == c.thin => {
                    c.snap_ids = old.snap_ids;
                }
                Some(old) => {
                    return Err(format!(
                        "{} is recorded on thin {} of {}: `volmgr repl remove {}` first",
                        c.volume, old.thin, old.pool, c.volume
                    ))
                }
                None => c.snap_ids = Self::free_snap_ids(&inner, &pool, &c.pool)?,
            }
            if let Some(other) = inner
                .configs
                .values()
                .find(|o| o.volume != c.volume && o.pool == c.pool && o.thin == c.thin)
            {
                return Err(format!(
                    "thin {} of {} is replicated as {} already",
                    c.thin, c.pool, other.volume
                ));
            }
            c.running = true;
            inner.configs.insert(c.volume.clone(), c.clone());
            self.save(&inner)?;
        }
        if let Err(e) = self.launch(d, &c) {
            let mut inner = lock(&self.inner);
            if let Some(r) = inner.configs.get_mut(&c.volume) {
                r.running = false;
            }
            self.save(&inner)?;
            return Err(format!("{}: {e}", c.volume));
        }
        Ok(match c.role {
            Role::Primary => format!(
                "{}: replicating thin {} of {} to {} every {} ms",
                c.volume,
                c.thin,
                c.pool,
                c.peer.as_deref().unwrap_or("?"),
                c.interval_ms
            ),
            Role::Secondary => format!(
                "{}: receiving into thin {} of {} on {}",
                c.volume,
                c.thin,
                c.pool,
                c.listen.as_deref().unwrap_or("?")
            ),
        })
    }

    /// Takes the volume's engine out (the lock is not held while it stops).
    fn take(&self, volume: &str) -> Result<(ReplConfig, Option<Running>), String> {
        let mut inner = lock(&self.inner);
        let c = inner
            .configs
            .get(volume)
            .cloned()
            .ok_or_else(|| format!("no replicated volume named '{volume}' here"))?;
        Ok((c, inner.running.remove(volume)))
    }

    fn record(&self, c: ReplConfig) -> Result<(), String> {
        let mut inner = lock(&self.inner);
        inner.failed.remove(&c.volume);
        inner.configs.insert(c.volume.clone(), c);
        self.save(&inner)
    }

    fn stop_volume(&self, volume: &str) -> Result<String, String> {
        let (mut c, r) = self.take(volume)?;
        let was = r.is_some();
        if let Some(r) = r {
            r.stop();
        }
        c.running = false;
        self.record(c)?;
        Ok(if was {
            format!("{volume}: stopped")
        } else {
            format!("{volume}: was not running")
        })
    }

    fn promote(&self, d: &Daemon, volume: &str, force: bool) -> Result<String, String> {
        let (mut c, r) = self.take(volume)?;
        if c.role != Role::Secondary {
            if let Some(r) = r {
                lock(&self.inner).running.insert(volume.to_string(), r);
            }
            return Err(format!("{volume} is the primary here already"));
        }
        let clean =
            matches!(&r, Some(Running { engine: Engine::Secondary(s), .. }) if s.primary_stopped());
        if !clean && !force {
            if let Some(r) = r {
                lock(&self.inner).running.insert(volume.to_string(), r);
            }
            return Err(format!(
                "{volume}: the primary has not stopped replicating here (demote it there \
                 first), or this side cannot tell: if the primary is lost, promote with --force \
                 (its writes after the last complete snapshot are lost)"
            ));
        }
        if let Some(r) = r {
            r.stop();
        }
        let pool = Self::pool_of(d, &c.pool)?;
        let s = Secondary::new(SecondaryConfig {
            volume: c.volume.clone(),
            pool,
            copy: ThinId(c.thin),
            size: Bytes(c.size),
            snap_ids: [ThinId(c.snap_ids[0]), ThinId(c.snap_ids[1])],
            state_path: config::state_path(&self.dir, volume),
            tls: None,
        })
        .map_err(|e| e.to_string())?;
        let at = s.restore_copy().map_err(|e| format!("{volume}: {e}"))?;
        let Some((snap, taken)) = at else {
            c.running = false;
            self.record(c)?;
            return Err(format!(
                "{volume}: no snapshot was ever completed here: nothing to promote"
            ));
        };
        c.role = Role::Primary;
        c.running = false;
        c.listen = None;
        self.record(c.clone())?;
        let age = replicate::state::now_secs().saturating_sub(taken);
        Ok(format!(
            "{volume}: promoted{}: thin {} of {} holds snapshot {snap}, taken {age} s ago on \
             the old primary; activate it, then `volmgr repl primary` to replicate back",
            if clean { "" } else { " (forced)" },
            c.thin,
            c.pool
        ))
    }

    fn demote(&self, d: &Daemon, volume: &str, wait: Duration) -> Result<String, String> {
        let (mut c, r) = self.take(volume)?;
        let put_back = |r: Option<Running>| {
            if let Some(r) = r {
                lock(&self.inner).running.insert(volume.to_string(), r);
            }
        };
        if c.role != Role::Primary {
            put_back(r);
            return Err(format!("{volume} is a secondary here already"));
        }
        if let Some(user) = Self::thin_user(d, &c.pool, c.thin) {
            put_back(r);
            return Err(format!(
                "{volume} is active as device {user}: remove it first (writes after the final \
                 snapshot would be lost)"
            ));
        }
        let text = match r {
            Some(r) => {
                let Engine::Primary(p) = &r.engine else {
                    put_back(Some(r));
                    return Err(format!("{volume}: its engine is not a primary's"));
                };
                let p = p.clone();
                p.demote();
                let t0 = Instant::now();
                while !r.thread.is_finished() && t0.elapsed() < wait {
                    std::thread::sleep(Duration::from_millis(50));
                }
                r.stop();
                match p.demoted_at() {
                    Some(s) => format!(
                        "{volume}: demoted; its final snapshot {s} is complete on the secondary, \
                         which can be promoted"
                    ),
                    None => format!(
                        "{volume}: demoted, but its final snapshot did not reach the secondary \
                         within {} s ({}): promoting there needs --force",
                        wait.as_secs(),
                        p.status().last_error.unwrap_or_else(|| "no answer".into())
                    ),
                }
            }
            None => {
                format!("{volume}: demoted (it was not replicating: no final snapshot was shipped)")
            }
        };
        c.role = Role::Secondary;
        c.running = false;
        c.peer = None;
        self.record(c)?;
        Ok(text)
    }

    fn remove(&self, d: &Daemon, volume: &str) -> Result<String, String> {
        let (c, r) = self.take(volume)?;
        if let Some(r) = r {
            r.stop();
        }
        let mut left = Vec::new();
        match Self::pool_of(d, &c.pool) {
            Ok(pool) => {
                for id in c.snap_ids {
                    match pool.has_thin(ThinId(id)) {
                        Ok(true) => {
                            if let Err(e) = pool.delete(ThinId(id)) {
                                left.push(format!("thin {id}: {e}"));
                            }
                        }
                        Ok(false) => {}
                        Err(e) => left.push(format!("thin {id}: {e}")),
                    }
                }
                match iort::block_on(pool.commit()) {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => left.push(format!("commit: {e}")),
                    Err(e) => left.push(format!("commit: runtime: {e}")),
                }
            }
            Err(e) => left.push(e),
        }
        {
            let mut inner = lock(&self.inner);
            inner.configs.remove(volume);
            inner.failed.remove(volume);
            self.save(&inner)?;
        }
        let _ = std::fs::remove_file(config::state_path(&self.dir, volume));
        Ok(if left.is_empty() {
            format!("{volume}: replication removed, its snapshots released")
        } else {
            format!(
                "{volume}: replication removed; snapshots {:?} of {} may be left: {}",
                c.snap_ids,
                c.pool,
                left.join("; ")
            )
        })
    }

    fn status(&self) -> Result<String, String> {
        let inner = lock(&self.inner);
        let list: Vec<VolumeStatus> = inner
            .configs
            .values()
            .map(|c| {
                let mut status = match inner.running.get(&c.volume) {
                    Some(r) => r.status(),
                    None => {
                        let st = State::load(&config::state_path(&self.dir, &c.volume))
                            .unwrap_or_default();
                        Status {
                            role: c.role.word().into(),
                            volume: c.volume.clone(),
                            state: if inner.failed.contains_key(&c.volume) {
                                Phase::Error
                            } else {
                                Phase::Stopped
                            },
                            last_synced_snapshot: st.snapshot,
                            last_synced_time: st.taken_at,
                            last_error: inner.failed.get(&c.volume).cloned(),
                            ..Status::default()
                        }
                        .current()
                    }
                };
                status.role = c.role.word().into();
                VolumeStatus {
                    status,
                    pool: c.pool.clone(),
                    thin: c.thin,
                    peer: c.peer.clone(),
                    listen: c.listen.clone(),
                    interval_ms: c.interval_ms,
                    bwlimit: c.bwlimit,
                    running: c.running,
                }
            })
            .collect();
        serde_json::to_string(&list).map_err(|e| e.to_string())
    }
}

impl Service for ReplService {
    fn handle(&self, d: &Daemon, args: &[String]) -> Result<String, String> {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        match a.as_slice() {
            ["start", json] => self.start(d, json),
            ["stop", v] => self.stop_volume(v),
            ["status"] => self.status(),
            ["promote", v] => self.promote(d, v, false),
            ["promote", v, "force"] => self.promote(d, v, true),
            ["demote", v, secs] => {
                let s: u64 = secs
                    .parse()
                    .map_err(|_| format!("demote: '{secs}' is not a number of seconds"))?;
                self.demote(d, v, Duration::from_secs(s))
            }
            ["remove", v] => self.remove(d, v),
            _ => Err(format!("repl: unknown request {a:?}")),
        }
    }

    fn users_of(&self, name: &str) -> Vec<String> {
        let inner = lock(&self.inner);
        inner
            .running
            .keys()
            .filter(|v| inner.configs.get(*v).is_some_and(|c| c.pool == name))
            .map(|v| format!("replication of {v}"))
            .collect()
    }

    fn stop(&self) {
        let all: Vec<Running> = {
            let mut inner = lock(&self.inner);
            std::mem::take(&mut inner.running).into_values().collect()
        };
        for r in all {
            r.stop();
        }
    }
}
